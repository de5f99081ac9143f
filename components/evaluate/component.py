from kfp import dsl

from cycleqd_kfp.components.runtime import EVALUATOR_IMAGE


@dsl.component(base_image=EVALUATOR_IMAGE, install_kfp_package=False)
def evaluate(
    campaign_config: str, store_uri: str, genome_ids: str, scores: dsl.Output[dsl.Metrics]
):
    """Materialise a group of children from their recipes and score each on every skill.

    One warm model scores the whole group (a local run's evaluation server, where there is
    one). Results are kept in the store, so a retried task reads back the children it
    already scored instead of evaluating them again.

    Args:
        campaign_config: The campaign config (YAML; see the README's "Configuration").
        store_uri: The campaign store: s3://bucket/prefix, or a folder where the task runs.
        genome_ids: The children to score: one of breed's groups (comma-separated ids).

    Returns:
        scores: Each child's score per skill (`<id>.<skill>`, the id's first 12 characters)
            and whether it was rejected (`<id>.rejected`: 1 where its weights were not
            finite; such a child enters no archive).
    """
    from cycleqd.evaluation_service import evaluate_children

    records = evaluate_children(campaign_config, store_uri, genome_ids.split(","))
    for record in records:
        child = record["genome_id"][:12]
        for skill, value in (record["scores"] or {}).items():
            scores.log_metric(f"{child}.{skill}", value)
        scores.log_metric(f"{child}.rejected", float(record["scores"] is None))

from kfp import dsl

from cycleqd_kfp.components.runtime import EVALUATOR_IMAGE


@dsl.component(base_image=EVALUATOR_IMAGE, install_kfp_package=False)
def evaluate(
    campaign_config: str, store_uri: str, genome_ids: str, scores: dsl.Output[dsl.Metrics]
):
    """Materialise children (comma-separated genome ids) from their recipes and score each on
    every skill, with one warm model (a local run's evaluation server, where there is one).
    Results are kept in the store, so a retried task reads back the children it already
    scored instead of evaluating them again."""
    from cycleqd.evaluation_service import evaluate_children

    records = evaluate_children(campaign_config, store_uri, genome_ids.split(","))
    for record in records:
        child = record["genome_id"][:12]
        for skill, value in (record["scores"] or {}).items():
            scores.log_metric(f"{child}.{skill}", value)
        scores.log_metric(f"{child}.rejected", float(record["scores"] is None))

from kfp import dsl

from cycleqd_kfp.components.runtime import EVALUATOR_IMAGE


@dsl.component(base_image=EVALUATOR_IMAGE, install_kfp_package=False)
def evaluate(
    campaign_config: str,
    store_uri: str,
    genome_ids: str,
    scores: dsl.Output[dsl.Metrics],
    run_owner: str = "",
) -> str:
    """Materialise a group of children from their recipes and score each on every skill.

    One warm model scores the whole group: the run's warm evaluators where it started some
    (each child on one evaluator held for it, moved to another if that one dies), else a
    local run's evaluation server, else a model loaded in this task. Results are kept in the
    store, so a retried task reads back the children it already scored instead of
    evaluating them again.

    Args:
        campaign_config: The campaign config (see the README's "Configuration"): a YAML
            document, one-line JSON, or a config file's URI (s3://, https://, a path).
        store_uri: The campaign store: s3://bucket/prefix, or a folder where the task runs.
        genome_ids: The children to score: one of breed's groups (comma-separated ids).
        run_owner: This run's id: its warm evaluators, if it started any.

    Returns:
        scores: The group's scores under names that stay the same from run to run:
            `<skill>_best_child` and `<skill>_mean` (over the children scored),
            `children_scored` and `children_rejected` (weights not finite: such a child
            enters no archive).
        Output: Each child's scores by genome id (JSON; null for a rejected child).
    """
    import json

    from cycleqd.evaluation_service import evaluate_children, evaluation_metrics

    records = evaluate_children(campaign_config, store_uri, genome_ids.split(","), run_owner)
    for name, value in evaluation_metrics(records).items():
        scores.log_metric(name, value)
    return json.dumps({record["genome_id"]: record["scores"] for record in records})

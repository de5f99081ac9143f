from kfp import dsl

from cycleqd_kfp.components.runtime import EVALUATOR_IMAGE


@dsl.component(base_image=EVALUATOR_IMAGE, install_kfp_package=False)
def evaluate(campaign_config: str, store_uri: str, genome_id: str, scores: dsl.Output[dsl.Metrics]):
    """Materialise one child from its recipe and score it on every skill. The result is kept
    in the store, so a retried task reads it back instead of evaluating again."""
    from cycleqd import steps

    record = steps.evaluate(campaign_config, store_uri, genome_id)
    for skill, value in (record["scores"] or {}).items():
        scores.log_metric(skill, value)
    scores.log_metric("rejected", float(record["scores"] is None))

from kfp import dsl

from cycleqd_kfp.components.runtime import EVALUATOR_IMAGE


@dsl.component(base_image=EVALUATOR_IMAGE, install_kfp_package=False)
def export(
    campaign_config: str,
    store_uri: str,
    tracking_uri: str,
    run_owner: str,
    final_scores: dsl.Output[dsl.Metrics],
) -> str:
    """Merge the best elite of each archive (beta = softmax of qualities), write the model to
    the store's exports and register it in MLflow. Returns its URI and sha256 (JSON)."""
    import json

    from cycleqd import steps

    result = steps.export(campaign_config, store_uri, tracking_uri, run_owner)
    for skill, value in (result["scores"] or {}).items():
        final_scores.log_metric(skill, value)
    return json.dumps(result)

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
    """Build the campaign's final model, write it to the store's exports and register it.

    The final model is built from the last committed archives by the config's `final.method`:
    `merge_best` (the best elite of each archive merged with beta = softmax of their
    qualities) or `best_mean` (the elite with the best mean score over the skills). It is
    scored on every skill, written as a loadable model folder under the store's `exports/`
    and registered in MLflow with its lineage.

    Args:
        campaign_config: The campaign config (YAML; see the README's "Configuration").
        store_uri: The campaign store: s3://bucket/prefix, or a folder where the task runs.
        tracking_uri: MLflow tracking URI; empty: no tracking (nothing registered).
        run_owner: This run's id, the owner of the campaign's lease.

    Returns:
        final_scores: The final model's score on every skill.
        Output: The export (JSON): genome id, URI, sha256 of the weights, scores, the
            generation it was built from.
    """
    import json

    from cycleqd import steps

    result = steps.export(campaign_config, store_uri, tracking_uri, run_owner)
    for skill, value in (result["scores"] or {}).items():
        final_scores.log_metric(skill, value)
    return json.dumps(result)

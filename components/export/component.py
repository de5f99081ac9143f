from kfp import dsl

from cycleqd_kfp.components.runtime import EVALUATOR_IMAGE


@dsl.component(base_image=EVALUATOR_IMAGE, install_kfp_package=False)
def export(
    campaign_config: str,
    store_uri: str,
    tracking_uri: str,
    run_owner: str,
    final_scores: dsl.Output[dsl.Metrics],
    final_model: dsl.Output[dsl.Model],
    search_generations: int = 0,
) -> str:
    """Build the campaign's final model, write it to the store's exports and register it.

    The final model is built from the last committed archives by the config's `final.method`:
    `merge_best` (the best elite of each archive merged with beta = softmax of their
    qualities) or `best_mean` (the elite with the best mean score over the skills). It is
    scored on every skill, written as a loadable model folder under the store's `exports/`
    and registered in MLflow with its lineage.

    Args:
        campaign_config: The campaign config (see the README's "Configuration"): a YAML
            document, one-line JSON, or a config file's URI (s3://, https://, a path).
        store_uri: The campaign store: s3://bucket/prefix, or a folder where the task runs.
        tracking_uri: MLflow tracking URI; empty: no tracking (nothing registered).
        run_owner: This run's id, the owner of the campaign's lease.
        search_generations: Generations to reach; 0: the config's `generations`.

    Returns:
        final_scores: The final model's score on every skill (`<skill>`).
        final_model: The final model: its metadata `uri` is where its weights are in the
            campaign store (`<store>/exports/<genome id>`), with its `genome_id`, the
            `sha256` of its weights, its `scores` per skill, the final `method` and the
            `generation` it was built from; its file holds the same as JSON. The weights
            stay in the store: KFP uploads an output artifact to the pipeline root, and a
            copy there would double an 8B model's 16 GB.
        Output: The export (JSON): the final model's metadata, and what MLflow missed.
    """
    import json

    from cycleqd import steps

    result = steps.export(campaign_config, store_uri, tracking_uri, run_owner, search_generations)
    for skill, value in (result["scores"] or {}).items():
        final_scores.log_metric(skill, value)
    card = steps.final_model_card(result)
    final_model.metadata.update(card)
    with open(final_model.path, "w") as f:
        json.dump(card, f, indent=1, sort_keys=True)
    return json.dumps(result)

from kfp import dsl

from cycleqd_kfp.components.runtime import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def preflight(
    campaign_config: str,
    store_uri: str,
    tracking_uri: str,
    run_owner: str,
    search_generations: int = 0,
) -> list:
    """Fail fast on bad setup, before any GPU is requested or any campaign state is written.

    Checks the config, the skills (their data sets and services), the store's
    credentials and bucket, the experts' architectures, the fine-tuning specs (their data
    sets, LoRA targets the base has), another run holding the campaign, and MLflow. The
    campaign's state (name, store, last and target generation) goes to the task's log.

    Args:
        campaign_config: The campaign config (see the README's "Configuration"): a YAML
            document, one-line JSON, or a config file's URI (s3://, https://, a path).
        store_uri: The campaign store: s3://bucket/prefix, or a folder where the task runs.
        tracking_uri: MLflow tracking URI; empty: no tracking.
        run_owner: This run's id, the owner of the campaign's lease.
        search_generations: Generations to reach; 0: the config's `generations`.

    Returns:
        Output: The skills whose expert the experts stage fine-tunes (empty: every expert
            is given by location).
    """
    import json

    from cycleqd import steps

    state = steps.preflight(campaign_config, store_uri, tracking_uri, run_owner, search_generations)
    print(json.dumps(state))
    return state["experts_to_train"]

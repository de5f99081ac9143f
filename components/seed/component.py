from kfp import dsl

from cycleqd_kfp.components.runtime import EVALUATOR_IMAGE


@dsl.component(base_image=EVALUATOR_IMAGE, install_kfp_package=False)
def seed(
    campaign_config: str,
    store_uri: str,
    tracking_uri: str,
    run_owner: str,
    search_generations: int = 0,
) -> int:
    """Generation 0: score every expert on every skill and put them in the archives.

    Done once per campaign: a retried task, or a later run of the campaign, changes nothing.

    Args:
        campaign_config: The campaign config (see the README's "Configuration"): a YAML
            document, one-line JSON, or a config file's URI (s3://, https://, a path).
        store_uri: The campaign store: s3://bucket/prefix, or a folder where the task runs.
        tracking_uri: MLflow tracking URI; empty: no tracking.
        run_owner: This run's id, the owner of the campaign's lease.
        search_generations: Generations to reach; 0: the config's `generations`.

    Returns:
        Output: The campaign's last committed generation (0 after seeding).
    """
    from cycleqd import steps

    return steps.seed(campaign_config, store_uri, tracking_uri, run_owner, search_generations)

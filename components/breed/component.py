from kfp import dsl

from cycleqd_kfp.components.runtime import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def breed(
    campaign_config: str,
    store_uri: str,
    run_owner: str,
    shards: int = 1,
    search_generations: int = 0,
) -> list:
    """Breed the next generation's children and deal them into evaluation groups.

    Each child is a recipe (parents, merge weights, a seeded mutation; a few KB) written to the
    campaign store, never weights. A retried task returns the children it already bred.

    Args:
        campaign_config: The campaign config (see the README's "Configuration"): a YAML
            document, one-line JSON, or a config file's URI (s3://, https://, a path).
        store_uri: The campaign store: s3://bucket/prefix, or a folder where the task runs.
        run_owner: This run's id, the owner of the campaign's lease.
        shards: At most this many groups, one evaluation task each (the GPUs to use).
        search_generations: Generations to reach; 0: the config's `generations`.

    Returns:
        Output: The groups, each a comma-separated list of genome ids; empty once the
            campaign has reached the generations to reach.
    """
    from cycleqd import steps

    children = steps.breed(campaign_config, store_uri, run_owner, search_generations)
    return steps.shard(children, shards)

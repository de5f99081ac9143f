from kfp import dsl

from cycleqd_kfp.components.runtime import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def breed(campaign_config: str, store_uri: str, run_owner: str, shards: int = 1) -> list:
    """The next generation's children (recipes in the store; a few KB each), dealt into at
    most `shards` evaluation groups: a list of comma-separated genome ids. Empty once the
    campaign has reached its target number of generations."""
    from cycleqd import steps

    return steps.shard(steps.breed(campaign_config, store_uri, run_owner), shards)

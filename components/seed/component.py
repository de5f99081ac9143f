from kfp import dsl

from cycleqd_kfp.components.runtime import EVALUATOR_IMAGE


@dsl.component(base_image=EVALUATOR_IMAGE, install_kfp_package=False)
def seed(campaign_config: str, store_uri: str, tracking_uri: str, run_owner: str) -> int:
    """Generation 0: score every expert on every skill and seed the archives (once)."""
    from cycleqd import steps

    return steps.seed(campaign_config, store_uri, tracking_uri, run_owner)

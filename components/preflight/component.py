from kfp import dsl

from cycleqd_kfp.components.runtime import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def preflight(campaign_config: str, store_uri: str, tracking_uri: str, run_owner: str) -> str:
    """Fail fast on bad setup: config, store credentials and bucket, experts' architectures,
    another run holding the campaign, MLflow reachability. Returns the campaign's state (JSON)."""
    import json

    from cycleqd import steps

    return json.dumps(steps.preflight(campaign_config, store_uri, tracking_uri, run_owner))

from kfp import dsl

from cycleqd_kfp.components.runtime import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def commit(
    campaign_config: str,
    store_uri: str,
    tracking_uri: str,
    run_owner: str,
    archives: dsl.Output[dsl.Metrics],
    elite_maps: dsl.Output[dsl.HTML],
) -> str:
    """Insert the generation's evaluated children into every archive they win and commit the
    archives as a new, never-overwritten snapshot. Shows the archives' fill and elite maps."""
    import json

    from cycleqd import steps

    summary = steps.commit(campaign_config, store_uri, tracking_uri, run_owner)
    archives.log_metric("generation", summary["generation"])
    for skill, archive in summary["archives"].items():
        archives.log_metric(f"{skill}_best", archive["best"])
        archives.log_metric(f"{skill}_elites", archive["elites"])
    with open(elite_maps.path, "w") as f:
        f.write(steps.elite_maps_html(campaign_config, store_uri))
    return json.dumps(summary)

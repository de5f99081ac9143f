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
    search_generations: int = 0,
) -> str:
    """Insert the generation's evaluated children into the archives and commit them.

    Every child enters each archive whose cell it beats; the archives are written as a new,
    never-overwritten snapshot. A retried task whose generation was committed changes nothing.

    Args:
        campaign_config: The campaign config (see the README's "Configuration"): a YAML
            document, one-line JSON, or a config file's URI (s3://, https://, a path).
        store_uri: The campaign store: s3://bucket/prefix, or a folder where the task runs.
        tracking_uri: MLflow tracking URI; empty: no tracking.
        run_owner: This run's id, the owner of the campaign's lease.
        search_generations: Generations to reach; 0: the config's `generations`.

    Returns:
        archives: The committed generation, and each archive's best quality and elite count.
        elite_maps: One heatmap per archive (SVG; each elite's scores in its tooltip).
        Output: The commit's summary (JSON): generation, whether it committed, the children
            with their scores and the archives they entered, the archives' fill.
    """
    import json

    from cycleqd import steps

    summary = steps.commit(campaign_config, store_uri, tracking_uri, run_owner, search_generations)
    archives.log_metric("generation", summary["generation"])
    for skill, archive in summary["archives"].items():
        archives.log_metric(f"{skill}_best", archive["best"])
        archives.log_metric(f"{skill}_elites", archive["elites"])
    with open(elite_maps.path, "w") as f:
        f.write(steps.elite_maps_html(campaign_config, store_uri))
    return json.dumps(summary)

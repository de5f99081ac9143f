from kfp import dsl

from cycleqd_kfp.components.runtime import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def start_evaluators(
    campaign_config: str,
    store_uri: str,
    run_owner: str,
    count: int,
    launcher: str = "auto",
    settings_json: str = "",
) -> str:
    """Start the run's warm evaluators: engines that stay loaded for the whole run and score
    children one after another with in-place weight swaps.

    On a cluster each is a `vllm serve` pod (a StatefulSet, a headless Service, a
    NetworkPolicy admitting only this run's pods, a token Secret; owned by the run's
    workflow), elsewhere a local process. Returns at once: the evaluators warm up while the
    run seeds, and the evaluation tasks wait until they answer. The run's exit handler
    (`release`) deletes them.

    Args:
        campaign_config: The campaign config: a YAML document, one-line JSON, or a config
            file's URI (s3://, https://, a path).
        store_uri: The campaign store: s3://bucket/prefix, or a folder where the task runs.
        run_owner: This run's id: the evaluators' names and their registry in the store.
        count: How many evaluators (one per GPU).
        launcher: `kubernetes`, `local`, or `auto` (Kubernetes inside a pod, else local).
        settings_json: The Kubernetes launcher's settings (image, resources, secrets), set
            when the pipeline is compiled.

    Returns:
        Output: The evaluators' names and addresses (JSON).
    """
    import json

    from cycleqd import warm_evaluators

    started = warm_evaluators.start(
        campaign_config, store_uri, run_owner, count, launcher, settings_json
    )
    return json.dumps(started)

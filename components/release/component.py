from kfp import dsl

from cycleqd_kfp.components.runtime import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def release(
    store_uri: str,
    run_owner: str,
    campaign_config: str = "",
    search_generations: int = 0,
    continue_until_done: bool = False,
):
    """End the run (the pipeline's exit handler): stop its warm evaluators, give its lease on
    the campaign back, and see that the campaign goes on without babysitting.

    Runs whatever happened before; a lease another run holds is left alone. In a cluster,
    where the campaign reached its target, a recurring run this run belongs to is disabled;
    where it has not and `continue_until_done` is set, a one-off run that made progress
    starts the next run (same pipeline version, parameters, experiment). The follow-up
    never fails the task: what it did, or why it could not, goes to the log.

    Args:
        store_uri: The campaign store: s3://bucket/prefix, or a folder where the task runs.
        run_owner: This run's id: only a lease it owns is given back.
        campaign_config: The campaign config (YAML, one-line JSON or a URI): the target the
            follow-up compares with; empty: no follow-up.
        search_generations: Generations to reach; 0: the config's `generations`.
        continue_until_done: Start the next run when this one ends before the target.
    """
    from cycleqd import steps
    from cycleqd.evaluator_launch import in_cluster

    state = steps.release(store_uri, run_owner, campaign_config, search_generations)
    print(f"campaign: {state}")
    if "done" in state and in_cluster():
        from cycleqd_kfp.pipelines.continuation import follow_up, in_cluster_client

        print(
            follow_up(
                in_cluster_client,
                run_owner,
                campaign_done=state["done"],
                progressed=state["progressed"],
                continue_runs=continue_until_done,
            )
        )

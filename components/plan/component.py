from kfp import dsl

from cycleqd_kfp.components.runtime import CPU_IMAGE


# One stage per task, its answer the single `Output` (not a NamedTuple of both answers):
# kfp.local 2.17 resolves a dsl.If condition only on a task's `Output`, and takes a condition
# on a named output as false, silently.
@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def plan(campaign_config: str, store_uri: str, stage: str) -> bool:
    """Decide on the CPU whether a GPU stage has work to do, so that its pod is only started
    when it has.

    `seed` has work while the campaign is not seeded; `export` while the final genome of the
    last committed archives has no complete export (read after the run's last generation
    commits). The pipeline gates each stage's task on this answer.

    Args:
        campaign_config: The campaign config (YAML; see the README's "Configuration").
        store_uri: The campaign store: s3://bucket/prefix, or a folder where the task runs.
        stage: The GPU stage to decide on: `seed` or `export`.

    Returns:
        Output: Whether the stage has work to do (the campaign's state goes to the log).
    """
    import json

    from cycleqd import steps
    from cycleqd.errors import ConfigError

    if stage not in steps.PLANNED_STAGES:
        raise ConfigError(f"plan decides on one of {steps.PLANNED_STAGES}, not {stage!r}")
    state = steps.plan(campaign_config, store_uri)
    print(json.dumps(state))
    return state[stage]

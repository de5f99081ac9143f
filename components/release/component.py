from kfp import dsl

from cycleqd_kfp.components.runtime import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def release(store_uri: str, run_owner: str):
    """Give the run's lease on the campaign back (the pipeline's exit handler).

    Runs whatever happened before; a lease another run holds is left alone.

    Args:
        store_uri: The campaign store: s3://bucket/prefix, or a folder where the task runs.
        run_owner: This run's id: only a lease it owns is given back.
    """
    from cycleqd import steps

    steps.release(store_uri, run_owner)

"""What a run does when its generations are over: the campaign goes on, or stops, untended.

A campaign spans several Kubeflow Pipelines runs; the pipeline's exit task calls `follow_up`
once the run's generations are committed (and the campaign given back):

- **A run of a recurring run**: the schedule starts the next. Once the campaign reached its
  target, the recurring run is disabled, so it stops firing runs with nothing to do.
- **A one-off run** (`cycleqd submit`), `continue_runs` on: the next run is started at once,
  with the same pipeline version, experiment, parameters, pipeline root and service account,
  named "<name> (continued N)". Not when the campaign is done, nor when this run committed no
  generation: a run that cannot progress would otherwise start itself forever.

**The follow-up never raises.** Its failures (the API refused or unreachable, an unexpected
answer) come back as one message starting with "follow-up failed: ", for the caller to log:
the campaign's generations are committed already, and an exit task that failed over its
follow-up would show a run that did its work as failed (and, with retries, could chain twice).

In the cluster (`in_cluster_client`), the exit task's pod needs the label
`access-ml-pipeline: "true"` (Kubeflow's PodDefault of that name projects a ServiceAccount
token with audience `pipelines.kubeflow.org` at /var/run/secrets/kubeflow/pipelines/token and
sets $KF_PIPELINES_SA_TOKEN_PATH), and the run's service account the KFP rights of
ClusterRole `kubeflow-pipelines-edit` in the profile namespace: runs get/list/create, jobs
(recurring runs) disable.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from typing import Any

from cycleqd_kfp.pipelines import kfp_client

ENDPOINT_ENV = "KF_PIPELINES_ENDPOINT"
IN_CLUSTER_HOST = "http://ml-pipeline.kubeflow.svc.cluster.local:8888"
SA_TOKEN_PATH_ENV = "KF_PIPELINES_SA_TOKEN_PATH"
SA_TOKEN_PATH = "/var/run/secrets/kubeflow/pipelines/token"
FAILED = "follow-up failed: "

_COUNTER_RE = re.compile(r"^(?P<base>.*?) \(continued (?P<n>[0-9]+)\)$")
_RECENT_RUNS = 50  # runs of the experiment looked at for a continuation already started


def in_cluster_host() -> str:
    """The KFP API as a pipeline pod reaches it: $KF_PIPELINES_ENDPOINT, else the
    `ml-pipeline` service of the `kubeflow` namespace."""
    return os.environ.get(ENDPOINT_ENV) or IN_CLUSTER_HOST


def in_cluster_client() -> Any:
    """A kfp.Client for a pipeline pod, through `kfp_client.connect`, to an explicit host.

    kfp reads the projected token by itself only when given no host and it finds itself in a
    cluster, and it then addresses `ml-pipeline.<namespace>` with the *profile* namespace
    `connect` passes: so the host is named here and the token handed over. The token file
    ($KF_PIPELINES_SA_TOKEN_PATH, else /var/run/secrets/kubeflow/pipelines/token) is read
    once: it lives hours (7200 s in Kubeflow's PodDefault), a follow-up seconds. Without the
    file (single-user KFP), no token: $KF_PIPELINES_TOKEN if set, else none. In multi-user
    mode kfp takes the pod's namespace as the user namespace."""
    return kfp_client.connect(in_cluster_host(), None, _service_account_token())


def _service_account_token() -> str | None:
    path = os.environ.get(SA_TOKEN_PATH_ENV) or SA_TOKEN_PATH
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip() or None
    except OSError:
        return None


def follow_up(
    client: Any,
    run_id: str,
    campaign_done: bool,
    progressed: bool,
    continue_runs: bool,
    *,
    host: str | None = None,
) -> str:
    """After run `run_id`'s generations: disable its recurring run once the campaign is done,
    or start the next run of a one-off campaign; what was done, as one line. Never raises: a
    failure is a message starting with "follow-up failed: " (see the module's docstring).

    `client`: a kfp.Client, or a function that makes one (`in_cluster_client`), so that a
    client that cannot be made is a failed follow-up too. `campaign_done`: the campaign
    reached its config's target. `progressed`: this run committed at least one generation.
    `host`: named in messages (default: the in-cluster address)."""
    if not campaign_done and not (continue_runs and progressed):
        # Nothing to ask the API: whether a schedule or no one starts the next run, this one
        # starts none.
        if not continue_runs:
            return f"run {run_id}: campaign not done; continue_runs off: no further run started"
        return (
            f"run {run_id} committed no generation: no further run started (another would "
            "loop without progress); a recurring run's schedule still fires"
        )
    try:
        with kfp_client.reported(host or in_cluster_host()), _refused_in_cluster():
            if callable(client) and not hasattr(client, "get_run"):
                client = client()
            return _follow_up(client, run_id, campaign_done, progressed, continue_runs)
    except kfp_client.KubeflowError as exc:
        hint = ""
        if str(exc).startswith("cannot reach") and host is None:
            hint = f" (in a pipeline pod: ${ENDPOINT_ENV}, default {IN_CLUSTER_HOST})"
        return f"{FAILED}{exc}{hint}"
    except Exception as exc:  # never hide the campaign's own result behind this one
        return f"{FAILED}{type(exc).__name__}: {str(exc)[:300]}"


def _follow_up(
    client: Any, run_id: str, campaign_done: bool, progressed: bool, continue_runs: bool
) -> str:
    run = client.get_run(run_id)
    recurring_run_id = getattr(run, "recurring_run_id", None)
    if recurring_run_id:
        if campaign_done:
            client.disable_recurring_run(recurring_run_id)
            return f"recurring run {recurring_run_id} disabled: campaign reached its target"
        return (
            f"run {run_id} belongs to recurring run {recurring_run_id}: its schedule starts "
            "the next"
        )
    if campaign_done:
        return f"run {run_id}: campaign reached its target: no further run"
    return _continue(client, run)


def _continue(client: Any, run: Any) -> str:
    reference = getattr(run, "pipeline_version_reference", None)
    pipeline_id = getattr(reference, "pipeline_id", None)
    version_id = getattr(reference, "pipeline_version_id", None) or getattr(
        run, "pipeline_version_id", None
    )
    if not version_id:
        raise kfp_client.KubeflowError(
            f"run {run.run_id} names no pipeline version (its package was sent inline): "
            "cannot start the same pipeline again; submit with `cycleqd submit`, which "
            "versions the pipeline"
        )
    name = next_run_name(run.display_name or "cycleqd")
    started = _started_already(client, run.experiment_id, name)
    if started is not None:
        return f"run {started} ({name!r}) continues the campaign already: none started"
    config = getattr(run, "runtime_config", None)
    params = dict(getattr(config, "parameters", None) or {})
    new = client.run_pipeline(
        experiment_id=run.experiment_id,
        job_name=name,
        params=params,
        pipeline_id=pipeline_id,
        version_id=version_id,
        pipeline_root=getattr(config, "pipeline_root", None) or None,
        enable_caching=False,
        service_account=getattr(run, "service_account", None) or None,
    )
    return f"run {new.run_id} ({name!r}) started: it continues the campaign of run {run.run_id}"


def next_run_name(name: str) -> str:
    """'<name> (continued N)' after '<name> (continued N-1)'; '<name> (continued 1)' after a
    name with no counter."""
    matched = _COUNTER_RE.match(name)
    if matched:
        return f"{matched['base']} (continued {int(matched['n']) + 1})"
    return f"{name} (continued 1)"


def _started_already(client: Any, experiment_id: str, name: str) -> str | None:
    """The id of a run of the experiment named `name`: this follow-up ran before (a retried
    exit task) and started it. The newest runs only: a continuation is started seconds ago."""
    page = client.list_runs(
        experiment_id=experiment_id, page_size=_RECENT_RUNS, sort_by="created_at desc"
    )
    for listed in getattr(page, "runs", None) or []:
        if listed.display_name == name:
            return listed.run_id
    return None


@contextlib.contextmanager
def _refused_in_cluster() -> Iterator[None]:
    """401/403 in a pipeline pod: what to fix there (not a --token, as for the CLI)."""
    from kfp_server_api.exceptions import ApiException

    try:
        yield
    except ApiException as exc:
        if exc.status not in (401, 403):
            raise
        raise kfp_client.KubeflowError(
            f"Kubeflow Pipelines refused the request ({exc.status} {exc.reason}): the exit "
            'task\'s pod needs the label access-ml-pipeline: "true" (the PodDefault that '
            "projects a token for pipelines.kubeflow.org), and the run's service account the "
            "rights of ClusterRole kubeflow-pipelines-edit in the profile namespace"
        ) from None

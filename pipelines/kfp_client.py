"""The Kubeflow Pipelines API, as `cycleqd submit` and `cycleqd schedule` use it.

- **Connect** in the cluster with no settings (the kfp client's in-cluster defaults and the
  pod's service-account token), or to `--host`, with a bearer token from `--token` or
  `$KF_PIPELINES_TOKEN`, in the user's profile namespace of a multi-user Kubeflow.
- **The pipeline is uploaded once and versioned**: a version per distinct compiled package,
  named by its sha256, so the Pipelines page lists what ran; runs and recurring runs refer to
  a version instead of carrying the package inline.
- **One recurring run per name**: scheduling again replaces it; KFP's six-field cron is
  checked; one run at a time, no catch-up (a campaign admits one writer; missed firings
  would only queue behind it).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cycleqd.errors import CycleQDError

TOKEN_ENV = "KF_PIPELINES_TOKEN"
PIPELINE_NAME = "cycleqd"

# One cron field: numbers, names (JAN, MON), ranges, steps, lists, `*` and `?`.
_ITEM = r"(\*|\?|[0-9A-Za-z]+(-[0-9A-Za-z]+)?)(/[0-9]+)?"
_FIELD_RE = re.compile(rf"^{_ITEM}(,{_ITEM})*$")
_SECONDS_RE = re.compile(r"^([0-9]|[1-5][0-9])(,([0-9]|[1-5][0-9]))*$")


class KubeflowError(CycleQDError):
    """A request to Kubeflow cannot be made as given; the message says what to fix."""


def check_cron(expr: str) -> str:
    """KFP schedules with a six-field cron, seconds first (`0 0 2 * * *`: daily at 02:00:00).
    A five-field crontab line would silently shift every field by one: refused."""
    fields = expr.split()
    if len(fields) == 5:
        raise KubeflowError(
            f"cron {expr!r} has 5 fields; KFP's cron has 6, seconds first: '0 {expr}'"
        )
    if len(fields) != 6:
        raise KubeflowError(
            f"cron {expr!r}: KFP's cron has 6 fields (second minute hour day month weekday)"
        )
    bad = [f for f in fields if not _FIELD_RE.match(f)]
    if bad:
        raise KubeflowError(f"cron {expr!r}: invalid field(s) {bad}")
    if not _SECONDS_RE.match(fields[0]):
        raise KubeflowError(
            f"cron {expr!r}: the first field is the second (0-59); '{fields[0]}' would fire "
            "many times a minute"
        )
    return expr


@contextlib.contextmanager
def reported(host: str | None) -> Iterator[None]:
    """The kfp client's failures as one KubeflowError that says what to check."""
    from kfp_server_api.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    where = host or "the in-cluster address of the Kubeflow Pipelines API"
    try:
        yield
    except ApiException as exc:
        if exc.status in (401, 403):
            raise KubeflowError(
                f"Kubeflow Pipelines at {where} refused the request ({exc.status} {exc.reason}): "
                f"pass a token with --token or ${TOKEN_ENV}, and --namespace your profile "
                "namespace in a multi-user Kubeflow"
            ) from None
        body = str(exc.body or "").strip()[:300]
        raise KubeflowError(
            f"Kubeflow Pipelines at {where} answered {exc.status} {exc.reason}: {body}"
        ) from None
    except (HTTPError, OSError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise KubeflowError(
            f"cannot reach Kubeflow Pipelines at {where} ({type(reason).__name__}): check "
            "--host (from outside the cluster: kubectl -n kubeflow port-forward "
            "svc/ml-pipeline-ui 8080:80, then --host http://localhost:8080)"
        ) from None


def connect(host: str | None, namespace: str | None, token: str | None):
    """A kfp.Client: `host` None uses the client's in-cluster defaults (and the pod's
    service-account token); a token comes from `token` or $KF_PIPELINES_TOKEN."""
    import kfp

    return kfp.Client(
        host=host,
        namespace=namespace or "kubeflow",
        existing_token=token or os.environ.get(TOKEN_ENV) or None,
    )


@dataclass(frozen=True)
class PipelineVersion:
    pipeline_id: str
    version_id: str
    name: str
    uploaded: bool  # False: that version was there already


def pipeline_version(
    client: Any, package: str | Path, namespace: str | None, name: str = PIPELINE_NAME
) -> PipelineVersion:
    """The pipeline version of a compiled package: created the first time this package is
    seen, found again by its name (the package's sha256) after that."""
    digest = hashlib.sha256(Path(package).read_bytes()).hexdigest()[:12]
    version_name = f"{name}-{digest}"
    pipeline_id = client.get_pipeline_id(name)
    if pipeline_id is None:
        pipeline_id = client.upload_pipeline(
            str(package),
            pipeline_name=name,
            description="CycleQD: merge expert LLMs by quality-diversity search",
            namespace=namespace,
        ).pipeline_id
    found = _find_version(client, pipeline_id, version_name)
    if found is not None:
        return PipelineVersion(pipeline_id, found, version_name, uploaded=False)
    version = client.upload_pipeline_version(
        str(package),
        pipeline_version_name=version_name,
        pipeline_id=pipeline_id,
        description=f"sha256 {digest}... of the compiled pipeline",
    )
    return PipelineVersion(pipeline_id, version.pipeline_version_id, version_name, uploaded=True)


def _find_version(client: Any, pipeline_id: str, version_name: str) -> str | None:
    listed = _listed(client.list_pipeline_versions, "pipeline_versions", pipeline_id=pipeline_id)
    return next((v.pipeline_version_id for v in listed if v.display_name == version_name), None)


def _listed(list_page: Any, field: str, **query: Any) -> Iterator[Any]:
    """Every item of a paged kfp.Client listing (`list_pipeline_versions`, ...)."""
    token = ""
    while True:
        page = list_page(page_token=token, page_size=100, **query)
        yield from getattr(page, field) or []
        token = page.next_page_token
        if not token:
            return


def submit(
    client: Any,
    version: PipelineVersion,
    arguments: dict[str, Any],
    *,
    experiment: str,
    run_name: str,
    service_account: str,
    namespace: str | None,
) -> str:
    """Start one run of `version`; its run id."""
    experiment_id = client.create_experiment(experiment, namespace=namespace).experiment_id
    run = client.run_pipeline(
        experiment_id=experiment_id,
        job_name=run_name,
        params=arguments,
        pipeline_id=version.pipeline_id,
        version_id=version.version_id,
        enable_caching=False,
        service_account=service_account,
    )
    return run.run_id


def schedule(
    client: Any,
    version: PipelineVersion,
    arguments: dict[str, Any],
    *,
    experiment: str,
    name: str,
    cron: str,
    service_account: str,
    namespace: str | None,
) -> tuple[str, list[str]]:
    """The recurring run `name` of `version`, replacing any of that name in the experiment;
    (its id, the ids it replaced)."""
    check_cron(cron)
    experiment_id = client.create_experiment(experiment, namespace=namespace).experiment_id
    replaced = _recurring_runs_named(client, experiment_id, namespace, name)
    for recurring_run_id in replaced:
        client.delete_recurring_run(recurring_run_id)
    job = client.create_recurring_run(
        experiment_id=experiment_id,
        job_name=name,
        description=f"CycleQD campaign runs ({version.name})",
        cron_expression=cron,
        max_concurrency=1,
        no_catchup=True,
        params=arguments,
        pipeline_id=version.pipeline_id,
        version_id=version.version_id,
        enabled=True,
        enable_caching=False,
        service_account=service_account,
    )
    return job.recurring_run_id, replaced


def _recurring_runs_named(
    client: Any, experiment_id: str, namespace: str | None, name: str
) -> list[str]:
    listed = _listed(
        client.list_recurring_runs,
        "recurring_runs",
        experiment_id=experiment_id,
        namespace=namespace,
    )
    return [r.recurring_run_id for r in listed if r.display_name == name]

"""What cycleqd's MLflow trackers (the campaign's, fine-tuning's) write alike: the tag prefix,
MLflow's size limits, values flattened into params, a genome's recipe as params, data set
entities, and the HTTP settings every MLflow call runs under. mlflow is imported lazily."""

from __future__ import annotations

import contextlib
import json
import os
import time
import warnings
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from cycleqd.redact import redact_uri

if TYPE_CHECKING:
    from cycleqd.genome import Genome

T = "cycleqd."  # prefix of every tag cycleqd sets
EXTERNAL_TAG = "mlflow.model.isExternal"  # a LoggedModel whose weights live elsewhere
MAX_PARAM = 6000  # MLflow's limit on a param value
MAX_TAG = 8000  # and on a tag value


# What MLflow 3's UI reads: the experiment's kind (its runs view, not the GenAI view) and the
# run columns User and Source.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_DEVELOPMENT = "custom_model_development"
CHAMPION_ALIAS = "champion"  # the registered final model's latest version
# Where a Kubeflow run is shown: `<KFP UI>/#/runs/details/<run id>`, e.g.
# https://kubeflow.example.com/pipeline (set in the pods by the pipeline's compile options).
KFP_UI_ENV = "CYCLEQD_KFP_UI"
IMAGE_ENV = "CYCLEQD_IMAGE"  # the container image a task runs in (set by the pipeline)
COMMIT_ENV = "CYCLEQD_GIT_COMMIT"  # the source commit the image was built from


# The `cycleqd-mlflow-client` ConfigMap's tracking URI, as the pipeline maps it into the pods
# (under its own name: KFP's MLflow plugin may inject MLFLOW_TRACKING_URI beside it).
CLIENT_CONFIG_URI_ENV = "CYCLEQD_MLFLOW_TRACKING_URI"


def resolve_tracking_uri(given: str | None) -> str:
    """The MLflow tracking URI of a pipeline task: the run's parameter, else
    $MLFLOW_TRACKING_URI (injected by KFP's MLflow plugin), else the `cycleqd-mlflow-client`
    ConfigMap's; empty: no tracking. Credentials never travel this way: MLflow reads
    MLFLOW_TRACKING_USERNAME/PASSWORD/TOKEN from the environment (a Secret in the pods)."""
    return (
        given
        or os.environ.get("MLFLOW_TRACKING_URI", "")
        or os.environ.get(CLIENT_CONFIG_URI_ENV, "")
    )


def ensure_experiment(client, name: str, artifact_location: str | None = None) -> str:
    """The id of experiment `name`: created (or restored) where needed, marked as model
    development so that MLflow's UI opens its runs view."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(
                name,
                artifact_location=artifact_location,
                tags={EXPERIMENT_KIND_TAG: MODEL_DEVELOPMENT},
            )
        except Exception:  # created meanwhile by someone else
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        client.restore_experiment(experiment.experiment_id)
    if EXPERIMENT_KIND_TAG not in experiment.tags:  # made by KFP or by hand
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, MODEL_DEVELOPMENT)
    return experiment.experiment_id


def system_tags(source: str, kfp_run_id: str | None = None) -> dict[str, str]:
    """MLflow's system tags for a run, and the Kubeflow run (and its UI page) it belongs to."""
    import getpass

    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # a container user without a passwd entry
        user = str(os.getuid())
    tags = {"mlflow.user": user, "mlflow.source.type": "JOB", "mlflow.source.name": source}
    if os.environ.get(COMMIT_ENV):
        tags["mlflow.source.git.commit"] = os.environ[COMMIT_ENV]
    if os.environ.get(IMAGE_ENV):
        tags[f"{T}image"] = os.environ[IMAGE_ENV]
    if kfp_run_id:
        tags[f"{T}kfp_run_id"] = kfp_run_id
        ui = os.environ.get(KFP_UI_ENV, "").rstrip("/")
        if ui:
            tags[f"{T}kfp_run_url"] = f"{ui}/#/runs/details/{kfp_run_id}"
    return tags


def now_ms() -> int:
    return int(time.time() * 1000)


def clip(value: Any, limit: int = MAX_PARAM) -> str:
    """`value` as text of at most `limit` characters (MLflow refuses longer values)."""
    text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def flatten(data: Any, prefix: str = "") -> dict[str, str]:
    """Nested mappings and lists as dotted keys: {'skills.0.name': 'coding', ...}."""
    out: dict[str, str] = {}
    if isinstance(data, Mapping):
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}{key}."))
    elif isinstance(data, (list, tuple)):
        for i, value in enumerate(data):
            out.update(flatten(value, f"{prefix}{i}."))
    else:
        out[prefix[:-1]] = "" if data is None else str(data)
    return out


@contextlib.contextmanager
def http_settings(timeout: float, quiet_urls: bool = False) -> Iterator[None]:
    """Fail fast while the server is away: no client-side retry loops (the tracker retries on
    the next event), a bounded timeout. With `quiet_urls`, MLflow does not print "View run at
    <tracking URI>" lines (they would show the URI's credentials). Settings the user exported
    are left alone."""
    wanted = {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, int(timeout))),
    }
    if quiet_urls:
        wanted["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    added = [k for k in wanted if k not in os.environ]
    for key in added:
        os.environ[key] = wanted[key]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def genome_params(genome: Genome) -> dict[str, str]:
    """A child/final recipe as params: parents, merge weights, mutation."""
    params = {
        "genome_kind": genome.kind,
        "parents": ",".join(genome.parents),
        "merge_weights": json.dumps([round(float(w), 12) for w in genome.weights]),
    }
    for i, (parent, weight) in enumerate(zip(genome.parents, genome.weights, strict=True)):
        params[f"parent_{i}"] = parent
        params[f"weight_{i}"] = repr(float(weight))
    if genome.skill is not None:
        params["quality_skill"] = genome.skill
    if genome.generation is not None:
        params["generation"] = str(genome.generation)
    mutation = genome.mutation
    if mutation is not None:
        params["mutation.kind"] = mutation.kind
        params["mutation.seed"] = str(mutation.seed)
        params["mutation.scale"] = repr(float(mutation.scale))
        params["mutation.expert"] = mutation.expert or ""
    return params


def mlflow_dataset(name: str, digest: str, source: str):
    """An MLflow data set entity (name, digest, source) without reading the data."""
    from mlflow.data.meta_dataset import MetaDataset

    source = redact_uri(source)  # a download URL may carry a token in its userinfo
    try:
        from mlflow.data.dataset_source_registry import resolve_dataset_source

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dataset_source = resolve_dataset_source(source)
    except Exception:  # a source MLflow has no resolver for (a package, a registry name)
        from mlflow.entities import Dataset

        return Dataset(name, digest, "external", json.dumps({"uri": source}))
    return MetaDataset(source=dataset_source, name=name, digest=digest)._to_mlflow_entity()

"""MLflow tracking of a campaign: runs, lineage, elite maps, the registered final model.

A campaign reports four events through the `Tracker` protocol: `campaign_started`,
`generation_done` (generation 0 = the experts seeding the archives), `model_exported` (the
final merge) and `close`. `NullTracker` ignores them; `MLflowTracker` records them:

    campaign run                  params: the flattened config; tags: name, store URI
    |                             inputs: the skills' data sets; images: elite maps per step
    |-- base, expert-<skill>      one run each, tagged with the weights' source path, and a
    |                             LoggedModel each: where every lineage ends
    |-- generation-0000 ...       one run per generation: archive fill/best/QD score, elite
    |   |                         maps (artifacts elite_maps/<skill>.png)
    |   `-- g0003-<skill>-<id>    one run per child: score.<skill> metrics, the recipe
    |                             (parents, merge weights, mutation) as params, archives
    |                             entered, rejected flag; an elite also gets a LoggedModel
    `-- final-<id>                the final merge: LoggedModel, registered in the registry

Every model is an MLflow LoggedModel *without weights* (as `mlflow.create_external_model`
makes them): its tags point at the weights in the campaign store (`cycleqd.store_uri`, with
`cycleqd.sha256` where weights were written) or at the genome (`<campaign>/genomes/<id>`),
and name each parent's genome id, LoggedModel id and run id (`cycleqd.parent.<i>.*`), so a
person can click from the registered final model back through the elites to the experts and
the base. Runs also list their parents' models as inputs and their own model as output.

Runs are made with `MlflowClient` only, never with the fluent `mlflow.start_run`. Where a
Kubeflow task injects `MLFLOW_RUN_ID`, that run becomes the campaign run (`attach="campaign"`,
when the campaign has none yet) or the generation run (`attach="generation"`); KFP keeps its
own `mlflow.parentRunId` on it, and our runs nest below it by that tag. (With MLFLOW_RUN_ID set,
`mlflow.start_run(parent_run_id=...)` resumes the injected run instead of nesting: mlflow
issue 15713. Not using the fluent API avoids it.)

Tracking never stops or corrupts the search. Each hook copies what it needs from the live
objects at once and queues an event of small steps (`cycleqd.tracking.queue`); steps are
delivered in order and each is removed only once MLflow has taken it. When MLflow cannot be
reached, the event stays queued (bounded: the oldest generation events are dropped first) and
delivery resumes on the next hook or at `close()`; `missed()` lists what is not delivered. A
step MLflow rejects outright is skipped and reported as lost. On resume the campaign run, the
generation runs and every genome's run and model are found again by tag
(`cycleqd.campaign_id`, `cycleqd.key`, `cycleqd.genome_id`), so parents bred in earlier runs
are linked.

`tracking_uri=None` keeps everything in a local SQLite file beside the campaign:
`<run folder>/mlflow.db`, artifacts under `<run folder>/mlartifacts`; no server needed.
(Registering a `models:/<id>` source in such a local registry needs MLflow's global tracking
URI to name the same database: it is set for the duration of that one call.)

Weights URIs and sha256 of elites: a `ChildResult`'s `weights_uri`/`sha256` where it has
them; otherwise an elite bred off the experts' span (paper SVD mutation) is tagged
with `<campaign>/models/<id>` and no sha256, and every other elite is a recipe (genome URI).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import unquote, urlparse

from cycleqd.protocols import ChildResult, DatasetRef
from cycleqd.redact import install_log_redaction, redact_uri
from cycleqd.tracking.common import (
    CHAMPION_ALIAS,
    EXTERNAL_TAG,
    MAX_PARAM,
    MAX_TAG,
    T,
    clip,
    ensure_experiment,
    flatten,
    genome_params,
    http_settings,
    mlflow_dataset,
    now_ms,
    system_tags,
)
from cycleqd.tracking.queue import Missed, Rejected, RetryQueue, Step, error_kind

if TYPE_CHECKING:
    from cycleqd.archive import ArchiveSet
    from cycleqd.config import CampaignConfig
    from cycleqd.elite_maps import MapData
    from cycleqd.genome import Genome, GenomeBook

log = logging.getLogger(__name__)

Attach = Literal["campaign", "generation"]

_PARENT_RUN_TAG = "mlflow.parentRunId"
MODEL_VERSIONS_TAG = "mlflow.modelVersions"  # a LoggedModel's registered versions


# -- snapshots: what an event needs, copied out of the live campaign ---------------------------


@dataclass(frozen=True)
class _Child:
    genome_id: str
    genome: Genome
    generation: int
    skill: str
    scores: dict[str, float] | None
    entered: tuple[str, ...]
    weights_uri: str | None  # where full weights were written, if they were
    sha256: str | None


def _local_path(uri: str) -> Path | None:
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme == "" or (len(parsed.scheme) == 1 and uri[1:3] in (":\\", ":/")):
        return Path(uri)
    return None


def _quote(value: str) -> str:
    if "'" in value:
        raise Rejected(f"cannot search MLflow for a value with a quote: {value!r}")
    return f"'{value}'"


class MLflowTracker:
    """Records a campaign in MLflow; see the module doc for the layout.

    tracking_uri: an MLflow server (`http://...`) or store URI; None: a local SQLite file in
        `local_dir` (default: the folder holding a local campaign store).
    experiment: the experiment's name (None: the campaign's name).
    campaign_uri: where the campaign store is; identifies the campaign across runs.
    registry_name: the registered model of the final merge (None: the campaign's name).
    attach: what an injected MLFLOW_RUN_ID (a Kubeflow task's run) stands for.
    max_pending: events kept for delivery while MLflow is away; beyond, the oldest
        generation events are dropped (and reported by `missed()`).
    retry_interval: after a failed delivery, seconds during which new events are only queued.
    request_timeout: seconds an HTTP request to the server may take.
    elite_maps: log an elite map per archive every `elite_maps` generations (0: never).
    """

    def __init__(
        self,
        tracking_uri: str | None,
        experiment: str | None,
        campaign_uri: str,
        *,
        registry_name: str | None = None,
        local_dir: str | Path | None = None,
        attach: Attach = "campaign",
        max_pending: int = 1000,
        retry_interval: float = 5.0,
        request_timeout: float = 10.0,
        elite_maps: int = 1,
        source: str = "cycleqd",
        kfp_run_id: str | None = None,
    ):
        if attach not in ("campaign", "generation"):
            raise ValueError(f"attach must be 'campaign' or 'generation', got {attach!r}")
        self._queue = RetryQueue(max_pending, retry_interval, self._http_scope)
        self.campaign_uri = str(campaign_uri).rstrip("/")
        self.campaign_id = hashlib.sha256(self.campaign_uri.encode()).hexdigest()[:16]
        self._artifact_location: str | None = None
        if tracking_uri is None:
            folder = Path(local_dir) if local_dir is not None else self._default_local_dir()
            folder.mkdir(parents=True, exist_ok=True)
            folder = folder.resolve()
            tracking_uri = f"sqlite:///{folder / 'mlflow.db'}"
            self._artifact_location = (folder / "mlartifacts").as_uri()
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment
        self.registry_name = registry_name
        self.attach = attach
        self.request_timeout = request_timeout
        self.elite_maps_every = elite_maps
        self._system_tags = system_tags(source, kfp_run_id)
        self.host_run_id = os.environ.get("MLFLOW_RUN_ID") or None
        install_log_redaction()  # our log lines quote MLflow's errors, which name the URL

        self._client_obj = None

        self.campaign_name: str | None = None
        self.experiment_id: str | None = None
        self.campaign_run_id: str | None = None
        self._campaign_owned = False
        self._host_checked = False
        self._host: Any = None  # the injected run (mlflow Run) when it is usable
        self._host_used_for_generation = False
        self._existing: set[str] = set()  # runs made by an earlier process (found by tag)
        self._experiment_ids: list[str] = []
        self._runs: dict[str, str] = {}  # cycleqd.key -> run id
        self._genome_runs: dict[str, str] = {}  # genome id -> the run where it was made
        self._models: dict[str, str] = {}  # genome id -> LoggedModel id
        self._looked_up: set[str] = set()
        self._datasets: dict[str, DatasetRef] = {}
        self._skills: list[str] = []
        self._base_id: str | None = None

    def _default_local_dir(self) -> Path:
        path = _local_path(self.campaign_uri)
        if path is None:
            raise ValueError(
                f"tracking_uri=None keeps MLflow in a local SQLite file, but the campaign store "
                f"{self.campaign_uri!r} is not a local folder: pass local_dir= (or a tracking_uri)"
            )
        return path.parent

    # -- the protocol ------------------------------------------------------------------------

    def campaign_started(
        self,
        config: CampaignConfig,
        book: GenomeBook,
        resumed_from: int | None,
        datasets: Mapping[str, DatasetRef] | None = None,
    ) -> None:
        """The campaign is bound to its store (fresh, or resumed after `resumed_from`)."""
        try:
            self.campaign_name = config.name
            from cycleqd.archive import archive_names

            self._skills = archive_names(config)
            params = flatten(config.model_dump(mode="json"))
            identity = json.dumps(config.model_dump(mode="json", exclude={"generations"}))
            config_sha = hashlib.sha256(identity.encode()).hexdigest()[:16]
            base_id = book.base_id()
            sources = [(base_id, book[base_id])] + [
                (gid, book[gid]) for gid in book.expert_ids().values()
            ]
            self._datasets = {k: tuple(v) for k, v in (datasets or {}).items()}  # type: ignore[misc]
            label = f"campaign {config.name} started" + (
                f" (resumed after generation {resumed_from})" if resumed_from is not None else ""
            )
            steps = [
                ("campaign", "experiment", self._resolve_experiment),
                (
                    "campaign",
                    "campaign run",
                    functools.partial(
                        self._start_campaign_run, config.name, config_sha, resumed_from
                    ),
                ),
                ("campaign", "config params", functools.partial(self._log_config, params)),
                ("campaign", "data sets", self._log_datasets),
            ]
            for gid, genome in sources:
                steps.append(
                    (
                        f"source:{gid}",
                        f"{genome.kind} {gid}",
                        functools.partial(self._log_source, gid, genome, base_id),
                    )
                )
            self._queue.add(label, steps, droppable=False)
        except Exception:
            log.exception("tracking: could not record the campaign start (the search goes on)")

    def generation_done(
        self,
        generation: int,
        results: list[ChildResult],
        archives: ArchiveSet,
        book: GenomeBook,
    ) -> None:
        """A generation is committed: its children and the archives as they now stand."""
        try:
            from cycleqd.elite_maps import maps_of

            children = [self._snapshot_child(r, book) for r in results]
            every = self.elite_maps_every
            maps = maps_of(archives) if every and generation % every == 0 else None
            stats = self._archive_stats(archives)
            label = f"generation {generation} ({len(children)} models)"
            group = f"generation:{generation}"
            steps: list[Step] = [
                (
                    group,
                    "generation run",
                    functools.partial(self._start_generation_run, generation, stats),
                )
            ]
            for child in children:
                steps.append(
                    (
                        f"child:{child.genome_id}",
                        f"model {child.genome_id}",
                        functools.partial(self._log_child, child),
                    )
                )
            if maps:
                for skill, data in maps.items():
                    steps.append(
                        (
                            f"map:{generation}:{skill}",
                            f"elite map {skill}",
                            functools.partial(self._log_elite_map, generation, skill, data),
                        )
                    )
            steps.append(
                (group, "end generation run", functools.partial(self._end_generation, generation))
            )
            self._queue.add(label, steps, droppable=True)
        except Exception:
            log.exception(
                "tracking: could not record generation %s (the search goes on)", generation
            )

    def model_exported(
        self,
        genome_id: str,
        scores: dict[str, float] | None,
        uri: str,
        sha256: str,
        book: GenomeBook,
    ) -> None:
        """The final model's weights are written to `uri` (sha256 of the safetensors file)."""
        try:
            genome = book[genome_id]
            name = self.registry_name or self.campaign_name or "cycleqd"
            scores = dict(scores) if scores is not None else None
            steps = [
                (
                    "final",
                    f"final model {genome_id}",
                    functools.partial(self._log_final, genome_id, genome, scores, uri, sha256),
                ),
                (
                    "final",
                    f"register {genome_id} as {name}",
                    functools.partial(self._register, genome_id, name, uri, sha256),
                ),
            ]
            self._queue.add(f"final model {genome_id} exported", steps, droppable=False)
        except Exception:
            log.exception("tracking: could not record the exported model (the search goes on)")

    def close(self, status: str = "FINISHED") -> None:
        """End the campaign run (unless a Kubeflow task owns it) and deliver what is queued."""
        try:
            self._queue.add(
                "campaign closed",
                [("close", "end campaign run", functools.partial(self._end_campaign, status))],
                droppable=False,
                deliver=False,
            )
            self.flush()
        except Exception:
            log.exception("tracking: close failed")

    def flush(self) -> bool:
        """Deliver what is queued now; True when nothing is left."""
        self._queue.deliver(force=True)
        return self._queue.empty

    def missed(self) -> list[Missed]:
        """What MLflow has not received: queued events first (still to be delivered), then
        what was lost (dropped from a full queue, rejected by MLflow)."""
        return self._queue.missed()

    # -- the queue ---------------------------------------------------------------------------

    @property
    def max_pending(self) -> int:
        return self._queue.max_pending

    @property
    def retry_interval(self) -> float:
        return self._queue.retry_interval

    def _http_scope(self) -> contextlib.AbstractContextManager[None]:
        """What every delivery runs under: short timeouts; no URL printed where the tracking
        URI holds credentials."""
        quiet = redact_uri(self.tracking_uri) != self.tracking_uri
        return http_settings(self.request_timeout, quiet_urls=quiet)

    # -- MLflow access -----------------------------------------------------------------------

    @property
    def client(self):
        if self._client_obj is None:
            from mlflow import MlflowClient

            self._client_obj = MlflowClient(
                tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri
            )
            install_log_redaction()  # MLflow's and urllib3's loggers exist from here on
        return self._client_obj

    def _common_tags(self) -> dict[str, str]:
        tags = {
            **self._system_tags,
            f"{T}campaign_id": self.campaign_id,
            f"{T}campaign_uri": self.campaign_uri,
        }
        if self.campaign_name:
            tags[f"{T}campaign"] = self.campaign_name
        if self.campaign_run_id:
            tags[f"{T}campaign_run_id"] = self.campaign_run_id
        return tags

    def _filter(self, **tags: str) -> str:
        clauses = [f"tags.`{T}campaign_id` = {_quote(self.campaign_id)}"]
        clauses += [f"tags.`{T}{k}` = {_quote(v)}" for k, v in tags.items()]
        return " AND ".join(clauses)

    def _search_runs(self, filter_string: str, order_by: list[str] | None = None) -> list:
        found, token = [], None
        while True:
            page = self.client.search_runs(
                self._experiment_ids,
                filter_string,
                max_results=1000,
                order_by=order_by,
                page_token=token,
            )
            found.extend(page)
            token = page.token
            if not token:
                return found

    def _search_models(self, filter_string: str) -> list:
        found, token = [], None
        while True:
            page = self.client.search_logged_models(
                experiment_ids=self._experiment_ids,
                filter_string=filter_string,
                max_results=100,
                page_token=token,
            )
            found.extend(page)
            token = page.token
            if not token:
                return found

    def _ensure_run(
        self,
        key: str,
        name: str,
        tags: Mapping[str, str],
        parent_run_id: str | None,
    ) -> str:
        """The run under `key`: known (made here, or found when the campaign resumed), found
        by tag (when retrying: the failed call may have made it), or created, nested under
        `parent_run_id` by the mlflow.parentRunId tag."""
        if key in self._runs:
            return self._runs[key]
        if self._queue.retrying:
            existing = self._search_runs(self._filter(key=key), order_by=["attributes.start_time"])
            if existing:
                self._runs[key] = existing[0].info.run_id
                self._existing.add(existing[0].info.run_id)
                return self._runs[key]
        all_tags = {**self._common_tags(), **tags, f"{T}key": key}
        if parent_run_id:
            all_tags[_PARENT_RUN_TAG] = parent_run_id
        run = self.client.create_run(self.experiment_id, tags=all_tags, run_name=name)
        self._runs[key] = run.info.run_id
        return run.info.run_id

    def _ensure_model(
        self,
        gid: str,
        name: str,
        run_id: str,
        tags: Mapping[str, str],
        params: Mapping[str, str],
        model_type: str,
        *,
        with_mlmodel: bool = False,
    ) -> str:
        """The LoggedModel of genome `gid` (external: no weights), created READY once."""
        if gid in self._models:
            return self._models[gid]
        from mlflow.entities import LoggedModelStatus

        if self._queue.retrying:
            existing = self._search_models(self._filter(genome_id=gid))
            if existing:
                model = existing[0]
                self._models[gid] = model.model_id
                if model.status != LoggedModelStatus.READY:
                    self.client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
                return model.model_id
        all_tags = {
            **self._common_tags(),
            **tags,
            f"{T}genome_id": gid,
            f"{T}key": f"model/{gid}",
            EXTERNAL_TAG: "true",
        }
        model = self.client.create_logged_model(
            experiment_id=self.experiment_id,
            name=name,
            source_run_id=run_id,
            tags={k: clip(v, MAX_TAG) for k, v in all_tags.items()},
            params={k: clip(v, MAX_PARAM) for k, v in params.items()},
            model_type=model_type,
        )
        self._models[gid] = model.model_id
        self._genome_runs.setdefault(gid, run_id)
        if with_mlmodel:
            # An MLmodel file (no weights) like mlflow.create_external_model writes, so that
            # tools expecting one (registry, `models:/` downloads) find it.
            from mlflow.models.utils import get_external_mlflow_model_spec

            with tempfile.TemporaryDirectory() as tmp:
                get_external_mlflow_model_spec(model).save(os.path.join(tmp, "MLmodel"))
                self.client.log_model_artifacts(model.model_id, tmp)
        self.client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
        return model.model_id

    def _links(self, gid: str) -> tuple[str | None, str | None]:
        """(run id, LoggedModel id) of a genome, looked up by tag when not known here."""
        if gid not in self._models and gid not in self._looked_up:
            self._looked_up.add(gid)
            models = self._search_models(self._filter(genome_id=gid))
            if models:
                self._models[gid] = models[0].model_id
                if models[0].source_run_id:
                    self._genome_runs.setdefault(gid, models[0].source_run_id)
            if gid not in self._genome_runs:
                runs = self._search_runs(self._filter(genome_id=gid, origin="true"))
                if runs:
                    self._genome_runs[gid] = runs[0].info.run_id
        return self._genome_runs.get(gid), self._models.get(gid)

    def _parent_tags(self, genome: Genome) -> tuple[dict[str, str], list[str]]:
        """Tags naming each parent's genome, run and model; and the parents' model ids."""
        tags = {f"{T}parents": ",".join(genome.parents)}
        model_ids = []
        for i, parent in enumerate(genome.parents):
            run_id, model_id = self._links(parent)
            tags[f"{T}parent.{i}.genome_id"] = parent
            if run_id:
                tags[f"{T}parent.{i}.run_id"] = run_id
            if model_id:
                tags[f"{T}parent.{i}.model_id"] = model_id
                model_ids.append(model_id)
        return tags, model_ids

    def _base_tags(self) -> dict[str, str]:
        tags = {}
        base = self._base_id
        if base:
            tags[f"{T}base.genome_id"] = base
            run_id, model_id = self._links(base)
            if model_id:
                tags[f"{T}base.model_id"] = model_id
            if run_id:
                tags[f"{T}base.run_id"] = run_id
        return tags

    def _metrics(self, scores: Mapping[str, float], model_id: str | None = None) -> list:
        from mlflow.entities import Metric

        now = now_ms()
        metrics = []
        for skill, value in scores.items():
            value = float(value)
            if not math.isfinite(value):
                continue
            dataset = self._datasets.get(skill)
            metrics.append(
                Metric(
                    f"score.{skill}",
                    value,
                    now,
                    0,
                    model_id=model_id,
                    dataset_name=dataset[0] if dataset else None,
                    dataset_digest=dataset[1] if dataset else None,
                )
            )
        return metrics

    def _log_batch(self, run_id, *, params=None, tags=None, metrics=()) -> None:
        from mlflow.entities import Param, RunTag

        params = [Param(k, clip(v, MAX_PARAM)) for k, v in (params or {}).items()]
        tags = [RunTag(k, clip(v, MAX_TAG)) for k, v in (tags or {}).items()]
        metrics = list(metrics)
        for i in range(0, max(len(params), len(tags), len(metrics)), 100):
            self.client.log_batch(
                run_id,
                metrics=metrics[i : i + 100],
                params=params[i : i + 100],
                tags=tags[i : i + 100],
            )

    # -- steps: campaign ---------------------------------------------------------------------

    def _resolve_experiment(self) -> None:
        client = self.client
        if not self._host_checked:
            self._host_checked = True
            if self.host_run_id:
                try:
                    self._host = client.get_run(self.host_run_id)
                except Exception as exc:
                    if error_kind(exc) != "rejected":
                        self._host_checked = False
                        raise
                    log.warning(
                        "tracking: MLFLOW_RUN_ID=%s is not a run of %s; creating our own runs",
                        self.host_run_id,
                        redact_uri(self.tracking_uri),
                    )
        name = self.experiment_name or self.campaign_name or "cycleqd"
        experiment_id = ensure_experiment(client, name, self._artifact_location)
        self.experiment_id = experiment_id
        ids = [experiment_id]
        if self._host is not None and self._host.info.experiment_id not in ids:
            ids.append(self._host.info.experiment_id)
        self._experiment_ids = ids

    def _start_campaign_run(self, name: str, config_sha: str, resumed_from: int | None) -> None:
        client = self.client
        found = [
            r
            for r in self._search_runs(
                self._filter(role="campaign"), order_by=["attributes.start_time"]
            )
            if r.data.tags.get(f"{T}config_sha") == config_sha
        ]
        host = self._host
        tags = {
            **self._common_tags(),
            f"{T}role": "campaign",
            f"{T}key": "campaign",
            f"{T}config_sha": config_sha,
        }
        if found:
            run = found[0]
            self.campaign_run_id = run.info.run_id
            self.experiment_id = run.info.experiment_id
            self._campaign_owned = run.data.tags.get(f"{T}owner") == "cycleqd"
            self._prefetch()
            if self._campaign_owned and run.info.status != "RUNNING":
                client.update_run(run.info.run_id, status="RUNNING")
            if host is not None and host.info.run_id != run.info.run_id:
                # This Kubeflow task resumes a campaign whose run exists: link, don't replace.
                self._log_batch(
                    host.info.run_id,
                    tags={
                        **self._common_tags(),
                        f"{T}role": "session",
                        f"{T}resumed_from": "" if resumed_from is None else str(resumed_from),
                    },
                )
        elif host is not None and self.attach == "campaign":
            self.campaign_run_id = host.info.run_id
            self.experiment_id = host.info.experiment_id
            self._campaign_owned = False
            self._log_batch(
                host.info.run_id,
                tags={**tags, f"{T}owner": "host", f"{T}campaign_run_id": host.info.run_id},
            )
        else:
            run = client.create_run(
                self.experiment_id, tags={**tags, f"{T}owner": "cycleqd"}, run_name=name
            )
            self.campaign_run_id = run.info.run_id
            self._campaign_owned = True
            if host is not None:  # attach="generation": the task's run is linked to it
                self._log_batch(
                    host.info.run_id, tags={**self._common_tags(), f"{T}role": "session"}
                )
        self._runs["campaign"] = self.campaign_run_id
        if resumed_from is not None:
            self._log_batch(self.campaign_run_id, tags={f"{T}resumed_from": str(resumed_from)})

    def _prefetch(self) -> None:
        """A resumed campaign: learn its runs and models by tag, in a few paged searches."""
        for run in self._search_runs(self._filter()):
            self._existing.add(run.info.run_id)
            tags = run.data.tags
            key = tags.get(f"{T}key")
            if key and key not in self._runs:
                self._runs[key] = run.info.run_id
            if tags.get(f"{T}origin") == "true" and f"{T}genome_id" in tags:
                self._genome_runs.setdefault(tags[f"{T}genome_id"], run.info.run_id)
        for model in self._search_models(self._filter()):
            gid = model.tags.get(f"{T}genome_id")
            if gid:
                self._models.setdefault(gid, model.model_id)
                if model.source_run_id:
                    self._genome_runs.setdefault(gid, model.source_run_id)

    def _log_config(self, params: dict[str, str]) -> None:
        run = self.client.get_run(self.campaign_run_id)
        existing = run.data.params
        fresh = {k: v for k, v in params.items() if k not in existing}
        changed = {
            f"{T}config.{k}": v for k, v in params.items() if k in existing and existing[k] != v
        }
        self._log_batch(self.campaign_run_id, params=fresh, tags=changed)

    def _log_datasets(self) -> None:
        if not self._datasets:
            return
        from mlflow.entities import DatasetInput, InputTag

        inputs = [
            DatasetInput(mlflow_dataset(*ref), tags=[InputTag("mlflow.data.context", skill)])
            for skill, ref in sorted(self._datasets.items())
        ]
        self.client.log_inputs(self.campaign_run_id, datasets=inputs)

    def _log_source(self, gid: str, genome: Genome, base_id: str) -> None:
        """The base or an expert: its own run and model, tagged with where the weights are."""
        self._base_id = base_id
        kind = genome.kind
        name = "base" if kind == "base" else f"expert-{genome.skill}"
        tags = {
            f"{T}role": "source",
            f"{T}kind": kind,
            f"{T}genome_id": gid,
            f"{T}origin": "true",
            f"{T}source": genome.source or "",
            f"{T}store_uri": genome.source or "",
        }
        if genome.skill:
            tags[f"{T}skill"] = genome.skill
        trained = self._finetuned_model(gid) if kind == "expert" else None
        if kind == "expert":
            tags.update(self._base_tags())
        if trained is not None:  # the expert stage's run that made it
            tags[f"{T}finetune_model_id"] = trained.model_id
            tags[f"{T}finetune_run_id"] = trained.source_run_id or ""
        run_id = self._ensure_run(f"source/{gid}", name, tags, self.campaign_run_id)
        self._genome_runs[gid] = run_id
        params = {"genome_id": gid, "genome_kind": kind, "source": genome.source or ""}
        if genome.skill:
            params["skill"] = genome.skill
        model_id = self._ensure_model(gid, name, run_id, tags, params, f"cycleqd-{kind}")
        self._log_batch(run_id, params=params, tags={f"{T}model_id": model_id})
        self._link_models(run_id, model_id, 0, [trained.model_id] if trained else [])
        self.client.set_terminated(run_id, "FINISHED")

    def _finetuned_model(self, gid: str):
        """The LoggedModel that the experts stage's fine-tuning run logged for this expert
        (same experiment, same genome id), so that lineage goes on to its training run."""
        models = self.client.search_logged_models(
            experiment_ids=self._experiment_ids,
            filter_string=f"tags.`{T}genome_id` = {_quote(gid)} AND tags.`{T}kind` = 'expert'",
            max_results=20,
        )
        trained = [m for m in models if f"{T}campaign_id" not in m.tags]  # not our own
        return trained[0] if trained else None

    def _end_campaign(self, status: str) -> None:
        if self.campaign_run_id and self._campaign_owned:
            self.client.set_terminated(self.campaign_run_id, status)

    # -- steps: generations ------------------------------------------------------------------

    def _archive_stats(self, archives: ArchiveSet) -> dict[str, float]:
        stats = {}
        for skill in archives.names:
            archive = archives[skill]
            qualities = [e.quality for e in archive.cells.values()]
            stats[f"archive.{skill}.elites"] = float(len(qualities))
            stats[f"archive.{skill}.fill"] = float(archive.fill())
            stats[f"archive.{skill}.best"] = max(qualities) if qualities else float("nan")
            stats[f"archive.{skill}.qd_score"] = float(sum(qualities))
        return stats

    def _snapshot_child(self, result: ChildResult, book: GenomeBook) -> _Child:
        genome = book[result.genome_id]
        weights_uri, sha = result.weights_uri, result.sha256
        if weights_uri is None and genome.kind == "child" and result.entered:
            with contextlib.suppress(Exception):
                if book.linear_form(result.genome_id) is None:
                    # Off the experts' span: the campaign keeps the elite's weights.
                    weights_uri = f"{self.campaign_uri}/models/{result.genome_id}"
        return _Child(
            genome_id=result.genome_id,
            genome=genome,
            generation=int(result.generation),
            skill=result.skill,
            scores=dict(result.scores) if result.scores is not None else None,
            entered=tuple(result.entered),
            weights_uri=weights_uri,
            sha256=sha,
        )

    def _start_generation_run(self, generation: int, stats: dict[str, float]) -> None:
        from mlflow.entities import Metric

        key = f"generation/{generation}"
        skill = self._skills[generation % len(self._skills)] if self._skills else ""
        tags = {
            f"{T}role": "generation",
            f"{T}generation": str(generation),
            f"{T}quality_skill": skill if generation > 0 else "",
        }
        host = self._host
        if (
            key not in self._runs
            and host is not None
            and self.attach == "generation"
            and not self._host_used_for_generation
            and host.info.run_id != self.campaign_run_id
        ):
            self._host_used_for_generation = True
            extra = {**self._common_tags(), **tags, f"{T}key": key, f"{T}owner": "host"}
            if not host.data.tags.get(_PARENT_RUN_TAG):
                extra[_PARENT_RUN_TAG] = self.campaign_run_id
            self._log_batch(host.info.run_id, tags=extra)
            self._runs[key] = host.info.run_id
        name = f"generation-{generation:04d}" + ("-seed" if generation == 0 else "")
        run_id = self._ensure_run(key, name, {**tags, f"{T}owner": "cycleqd"}, self.campaign_run_id)
        now = now_ms()
        finite = {k: v for k, v in stats.items() if math.isfinite(v)}
        # No params here: a Kubeflow task's run (attach="generation") may hold its own.
        self._log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in finite.items()])
        # The campaign run charts the archives over generations.
        self._log_batch(
            self.campaign_run_id, metrics=[Metric(k, v, now, generation) for k, v in finite.items()]
        )

    def _log_child(self, child: _Child) -> None:
        """One model bred (or, in generation 0, one expert evaluated): run, recipe, scores;
        an elite also gets its LoggedModel."""
        gid, genome, generation = child.genome_id, child.genome, child.generation
        gen_run = self._runs[f"generation/{generation}"]
        seed = genome.kind in ("base", "expert")
        rejected = child.scores is None
        elite = bool(child.entered)
        genome_uri = f"{self.campaign_uri}/genomes/{gid}"
        tags = {
            f"{T}role": "seed" if seed else "child",
            f"{T}kind": genome.kind,
            f"{T}genome_id": gid,
            f"{T}generation": str(generation),
            f"{T}quality_skill": child.skill,
            f"{T}entered": ",".join(child.entered),
            f"{T}elite": str(elite).lower(),
            f"{T}rejected": str(rejected).lower(),
            f"{T}genome_uri": genome_uri,
        }
        if not seed:
            tags[f"{T}origin"] = "true"
        parent_tags, parent_models = self._parent_tags(genome)
        if genome.parents:
            tags.update(parent_tags)
        name = (
            f"seed-{child.skill}-{gid[:8]}"
            if seed
            else f"g{generation:04d}-{child.skill}-{gid[:8]}"
        )
        run_id = self._ensure_run(f"child/{generation}/{gid}", name, tags, gen_run)
        if not seed:
            self._genome_runs[gid] = run_id
        params = {"genome_id": gid, "generation": str(generation), "quality_skill": child.skill}
        if not seed:
            params.update(genome_params(genome))
        params["rejected"] = str(rejected).lower()
        params["entered"] = ",".join(child.entered) or "-"

        model_id = None
        if seed:
            _, model_id = self._links(gid)
        elif elite:
            store_uri = child.weights_uri or genome_uri
            model_tags = {
                **tags,
                f"{T}store_uri": store_uri,
                f"{T}weights": "stored" if child.weights_uri else "recipe",
                **self._base_tags(),
            }
            if child.sha256:
                model_tags[f"{T}sha256"] = child.sha256
            model_params = {**genome_params(genome), "genome": json.dumps(genome.to_dict())}
            model_id = self._ensure_model(
                gid,
                f"elite-g{generation:04d}-{gid[:8]}",
                run_id,
                model_tags,
                model_params,
                "cycleqd-elite",
            )
        extra_tags = {f"{T}model_id": model_id} if model_id else {}
        if child.weights_uri:
            extra_tags[f"{T}store_uri"] = child.weights_uri
        if child.sha256:
            extra_tags[f"{T}sha256"] = child.sha256
        self._log_batch(
            run_id,
            params=params,
            tags=extra_tags,
            metrics=self._metrics(child.scores or {}, model_id),
        )
        self._link_models(
            run_id,
            model_id if not seed else None,
            generation,
            [model_id] if seed and model_id else parent_models,
        )
        self.client.set_terminated(run_id, "FINISHED")

    def _link_models(self, run_id: str, output: str | None, step: int, inputs: Sequence[str]):
        from mlflow.entities import LoggedModelInput, LoggedModelOutput

        # A run made before (resumed campaign) or a retried step may hold the links already.
        again = run_id in self._existing or self._queue.retrying
        run = self.client.get_run(run_id) if again else None
        have_in = (
            {i.model_id for i in (run.inputs.model_inputs or [])} if run and run.inputs else set()
        )
        have_out = (
            {o.model_id for o in (run.outputs.model_outputs or [])}
            if run and run.outputs
            else set()
        )
        wanted_in = [m for m in dict.fromkeys(inputs) if m and m not in have_in]
        if wanted_in:
            self.client.log_inputs(run_id, models=[LoggedModelInput(m) for m in wanted_in])
        if output and output not in have_out:
            self.client.log_outputs(run_id, [LoggedModelOutput(output, step=step)])

    def _log_elite_map(self, generation: int, skill: str, data: MapData) -> None:
        from cycleqd.elite_maps import render, to_png, to_rgb

        pixels = to_rgb(render(data, generation))
        # On the campaign run with the generation as step: the UI's image slider.
        self.client.log_image(
            self.campaign_run_id, pixels, key=f"elite_map_{skill}", step=generation
        )
        # On the generation run as a plain PNG.
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{skill}.png"
            path.write_bytes(to_png(pixels))
            self.client.log_artifact(
                self._runs[f"generation/{generation}"], str(path), "elite_maps"
            )

    def _end_generation(self, generation: int) -> None:
        run_id = self._runs[f"generation/{generation}"]
        if self._host is None or run_id != self._host.info.run_id:
            self.client.set_terminated(run_id, "FINISHED")

    # -- steps: the final model --------------------------------------------------------------

    def _log_final(self, gid, genome, scores, uri, sha256) -> None:
        tags = {
            f"{T}role": "final",
            f"{T}kind": genome.kind,
            f"{T}genome_id": gid,
            f"{T}origin": "true",
            f"{T}genome_uri": f"{self.campaign_uri}/genomes/{gid}",
            f"{T}store_uri": uri,
            f"{T}sha256": sha256,
            f"{T}weights": "stored",
            f"{T}rejected": str(scores is None).lower(),
        }
        parent_tags, parent_models = self._parent_tags(genome)
        tags.update(parent_tags)
        name = f"final-{gid[:8]}"
        run_id = self._ensure_run(f"final/{gid}", name, tags, self.campaign_run_id)
        self._genome_runs[gid] = run_id
        params = genome_params(genome)
        model_id = self._ensure_model(
            gid,
            name,
            run_id,
            {**tags, **self._base_tags()},
            {**params, "genome": json.dumps(genome.to_dict())},
            "cycleqd-final",
            with_mlmodel=True,
        )
        self._log_batch(
            run_id,
            params=params,
            tags={f"{T}model_id": model_id},
            metrics=self._metrics(scores or {}, model_id),
        )
        self._link_models(run_id, model_id, 0, parent_models)
        self.client.set_terminated(run_id, "FINISHED")

    def _register(self, gid: str, name: str, uri: str, sha256: str) -> None:
        client = self.client
        model_id = self._models[gid]
        source = f"models:/{model_id}"
        try:
            client.create_registered_model(
                name,
                tags={
                    f"{T}campaign": self.campaign_name or "",
                    f"{T}campaign_uri": self.campaign_uri,
                },
                description=f"CycleQD final merges of campaign {self.campaign_name}",
            )
        except Exception as exc:
            if getattr(exc, "error_code", None) != "RESOURCE_ALREADY_EXISTS":
                raise
        versions = client.search_model_versions(f"name = {_quote(name)}")
        registered = next((v for v in versions if v.source == source), None)
        if registered is None:
            registered = self._create_version(gid, model_id, name, uri, sha256)
        # The LoggedModel's page lists its registered versions from this tag, which
        # `mlflow.register_model` writes and `create_model_version` does not.
        model = client.get_logged_model(model_id)
        listed = json.loads(model.tags.get(MODEL_VERSIONS_TAG, "[]"))
        entry = {"name": name, "version": str(registered.version)}
        if entry not in listed:
            client.set_logged_model_tags(
                model_id, {MODEL_VERSIONS_TAG: json.dumps([*listed, entry])}
            )
        # The latest final model is the one to serve: `models:/<name>@champion`.
        client.set_registered_model_alias(name, CHAMPION_ALIAS, registered.version)

    def _create_version(self, gid: str, model_id: str, name: str, uri: str, sha256: str):
        with self._registry_scope():
            return self.client.create_model_version(
                name,
                source=f"models:/{model_id}",
                run_id=self._genome_runs.get(gid),
                tags={
                    f"{T}genome_id": gid,
                    f"{T}model_id": model_id,
                    f"{T}store_uri": uri,
                    f"{T}sha256": sha256,
                    f"{T}campaign_uri": self.campaign_uri,
                },
                description=f"genome {gid}; weights at {uri} (sha256 {sha256})",
                model_id=model_id,
            )

    @contextlib.contextmanager
    def _registry_scope(self) -> Iterator[None]:
        """A database registry resolves `models:/<id>` through the *global* tracking URI
        (MLflow's SQLAlchemy registry store); point it at ours for the call. A server resolves
        it on its side: nothing to do."""
        scheme = urlparse(self.tracking_uri).scheme
        if scheme in ("http", "https", "databricks"):
            yield
            return
        from mlflow.tracking._tracking_service import utils as tracking_utils

        with tracking_utils._use_tracking_uri(self.tracking_uri):
            yield

"""MLflow tracking of one fine-tuning run (MlflowClient only, like `cycleqd.tracking`).

    run  finetune-<name>       params: the hyperparameters (flattened) and the sources
         |                     metrics: train_loss, learning_rate, grad_norm per step;
         |                              eval_loss, eval_token_accuracy, eval_exact_match at
         |                              step 0 (the base) and at the last step (the expert)
         |                     inputs: the training (and evaluation) data set with its digest
         `-> LoggedModel expert-<name>: external (no weights uploaded), tagged with the
             expert's store URI, sha256, genome id, base and data set digests

A restarted job finds its run again by tag (`cycleqd.key` = finetune/<name>/<fingerprint>)
and logs only the steps MLflow does not have yet, so the loss curve is one unbroken line.

Tracking never stops the training: every MLflow call that fails is logged as a warning and
listed by `missed()`.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping

from cycleqd.tracking import (
    EXTERNAL_TAG,
    MAX_TAG,
    T,
    clip,
    ensure_experiment,
    flatten,
    http_settings,
    mlflow_dataset,
    now_ms,
)

log = logging.getLogger(__name__)


class FinetuneTracker:
    """Records one expert's fine-tuning in MLflow; see the module doc."""

    def __init__(self, tracking_uri: str, experiment: str | None, name: str, fingerprint: str):
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment or "cycleqd-finetune"
        self.name = name
        self.fingerprint = fingerprint
        self.key = f"finetune/{name}/{fingerprint}"
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.model_id: str | None = None
        self._client = None
        self._logged_steps: set[int] = set()
        self._pending: list = []
        self._missed: list[str] = []

    @property
    def client(self):
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    def missed(self) -> list[str]:
        return list(self._missed)

    def _safe(self, what: str, fn, *args, **kwargs):
        try:
            with http_settings(10.0):
                return fn(*args, **kwargs)
        except Exception as exc:
            text = " ".join(str(exc).split())[:300]
            self._missed.append(f"{what}: {type(exc).__name__}: {text}")
            log.warning("tracking: %s failed (training goes on): %s", what, text)
            return None

    # -- the run -----------------------------------------------------------------------------

    def start(
        self,
        params: Mapping[str, object],
        tags: Mapping[str, str],
        datasets: list[tuple[str, str, str, int, str]],
    ) -> None:
        """Create (or find again) the run; `datasets`: (name, sha256, source, rows, context)."""
        self._safe("start run", self._start, params, tags, datasets)

    def _start(self, params, tags, datasets) -> None:
        client = self.client
        self.experiment_id = ensure_experiment(client, self.experiment_name)
        found = client.search_runs(
            [self.experiment_id],
            f"tags.`{T}key` = '{self.key}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        all_tags = {
            **tags,
            f"{T}key": self.key,
            f"{T}role": "finetune",
            f"{T}expert": self.name,
            f"{T}fingerprint": self.fingerprint,
        }
        if found:
            run = found[0]
            self.run_id = run.info.run_id
            if run.info.status != "RUNNING":
                client.update_run(self.run_id, status="RUNNING")
            for metric in ("train_loss",):
                for m in client.get_metric_history(self.run_id, metric):
                    self._logged_steps.add(int(m.step))
            fresh = {k: v for k, v in params.items() if k not in run.data.params}
        else:
            run = client.create_run(
                self.experiment_id, tags=all_tags, run_name=f"finetune-{self.name}"
            )
            self.run_id = run.info.run_id
            fresh = dict(params)
        from mlflow.entities import DatasetInput, InputTag, Param

        items = [Param(k, clip(v)) for k, v in fresh.items()]
        for i in range(0, len(items), 100):
            client.log_batch(self.run_id, params=items[i : i + 100])
        if datasets:
            inputs = [
                DatasetInput(
                    dataset_entity(name, digest, source, rows),
                    tags=[InputTag("mlflow.data.context", context)],
                )
                for name, digest, source, rows, context in datasets
            ]
            client.log_inputs(self.run_id, datasets=inputs)

    # -- metrics ---------------------------------------------------------------------------

    def log_step(self, step: int, loss: float, lr: float, grad_norm: float) -> None:
        """Queue one step's metrics (sent by `flush`)."""
        if self.run_id is None or step in self._logged_steps:
            return
        from mlflow.entities import Metric

        now = now_ms()

        for key, value in (("train_loss", loss), ("learning_rate", lr), ("grad_norm", grad_norm)):
            if math.isfinite(value):
                self._pending.append(Metric(key, float(value), now, step))
        self._logged_steps.add(step)

    def flush(self) -> None:
        if self.run_id is None or not self._pending:
            return
        pending, self._pending = self._pending, []
        for i in range(0, len(pending), 900):
            batch = pending[i : i + 900]
            self._safe("log metrics", self.client.log_batch, self.run_id, metrics=batch)

    def log_eval(
        self,
        metrics: Mapping[str, float],
        step: int,
        dataset: tuple[str, str] | None = None,
        model_id: str | None = None,
        prefix: str = "eval_",
    ) -> None:
        if self.run_id is None or not metrics:
            return
        from mlflow.entities import Metric

        now = now_ms()
        items = [
            Metric(
                f"{prefix}{k}",
                float(v),
                now,
                step,
                model_id=model_id,
                dataset_name=dataset[0] if dataset else None,
                dataset_digest=mlflow_digest(dataset[1]) if dataset else None,
            )
            for k, v in metrics.items()
            if k in ("loss", "token_accuracy", "exact_match") and math.isfinite(float(v))
        ]
        self._safe("log eval metrics", self.client.log_batch, self.run_id, metrics=items)

    # -- the expert ------------------------------------------------------------------------

    def log_expert(
        self,
        uri: str,
        sha256: str,
        genome_id: str,
        tags: Mapping[str, str],
        params: Mapping[str, object],
        step: int,
    ) -> str | None:
        """The expert as an external LoggedModel (no weights) pointing at the store."""
        if self.run_id is None:
            return None
        self.model_id = self._safe(
            "log expert model", self._log_expert, uri, sha256, genome_id, tags, params, step
        )
        return self.model_id

    def _log_expert(self, uri, sha256, genome_id, tags, params, step) -> str:
        from mlflow.entities import LoggedModelOutput, LoggedModelStatus

        client = self.client
        existing = client.search_logged_models(
            experiment_ids=[self.experiment_id],
            filter_string=f"tags.`{T}key` = 'model/{self.key}' AND tags.`{T}sha256` = '{sha256}'",
            max_results=1,
        )
        if existing:
            model_id = existing[0].model_id
        else:
            model = client.create_logged_model(
                experiment_id=self.experiment_id,
                name=f"expert-{self.name}",
                source_run_id=self.run_id,
                tags={
                    **{k: clip(v, MAX_TAG) for k, v in tags.items()},
                    f"{T}key": f"model/{self.key}",
                    f"{T}store_uri": uri,
                    f"{T}sha256": sha256,
                    f"{T}genome_id": genome_id,
                    f"{T}kind": "expert",
                    EXTERNAL_TAG: "true",
                },
                params={k: clip(v) for k, v in params.items()},
                model_type="cycleqd-expert",
            )
            model_id = model.model_id
            client.finalize_logged_model(model_id, LoggedModelStatus.READY)
            client.log_outputs(self.run_id, [LoggedModelOutput(model_id, step=step)])
        from mlflow.entities import RunTag

        client.log_batch(
            self.run_id,
            tags=[
                RunTag(f"{T}model_id", model_id),
                RunTag(f"{T}store_uri", uri),
                RunTag(f"{T}sha256", sha256),
                RunTag(f"{T}genome_id", genome_id),
            ],
        )
        return model_id

    def finish(self, status: str = "FINISHED") -> None:
        self.flush()
        if self.run_id is not None:
            self._safe("end run", self.client.set_terminated, self.run_id, status)


def mlflow_digest(sha256: str) -> str:
    """MLflow keeps at most 36 characters of a data set's digest: the sha256's first 32."""
    return sha256[:32]


def dataset_entity(name: str, sha256: str, source: str, rows: int):
    """A data set input: digest = the sha256's first 32 hex digits (MLflow's limit), the full
    sha256 and the row count in its profile."""
    from mlflow.entities import Dataset

    entity = mlflow_dataset(name, mlflow_digest(sha256), source)
    return Dataset(
        entity.name,
        entity.digest,
        entity.source_type,
        entity.source,
        entity.schema,
        json.dumps({"sha256": sha256, "num_rows": rows}),
    )


def hyperparameter_params(hyper: Mapping[str, object]) -> dict[str, str]:
    return flatten(dict(hyper))


__all__ = ["FinetuneTracker", "hyperparameter_params"]

"""`run_finetune(config)`: one expert, from a base and a chat data set to a published expert.

1. fetch the base (folder or store URI) and read the data sets; fingerprint the run (the
   hyperparameters, the base's weights sha256, the data set's digest, the tokenizer's files);
2. if the expert is already published with that fingerprint, return it (a retried pipeline
   task costs nothing);
3. train (LoRA or full), resuming from the newest complete checkpoint in the store;
4. merge the adapters into the base (`merge_and_unload`, float32), write `model.safetensors`
   under the base's names and dtypes, the task vector's SVD factors, and publish the folder
   with the genome record in its manifest;
5. track it all in MLflow when `tracking_uri` is set; delete the checkpoints.

The lead's CLI wires it as `cycleqd finetune CONFIG`; `FinetuneResult.to_json()` is what a
Kubeflow component writes as its output pointer.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cycleqd.finetune.config import FinetuneConfig, coerce_config
from cycleqd.finetune.data import ChatDataset, encode_dataset, load_chat_dataset
from cycleqd.finetune.expert import (
    WEIGHTS_FILE,
    PublishedExpert,
    _base_side_files,
    _uri_of,
    adapter_state,
    lora_modules,
    merge_lora,
    publish_expert,
    published_expert,
    state_getter,
    write_expert_weights,
    write_full_factors,
    write_lora_factors,
)
from cycleqd.finetune.factors import FACTORS_FILE
from cycleqd.finetune.sources import SourceError, fetch_model_folder, local_path
from cycleqd.finetune.tracking import FinetuneTracker, hyperparameter_params
from cycleqd.finetune.trainer import (
    FinetuneError,
    Trainer,
    TrainState,
    checkpoint_key,
    delete_checkpoint,
    list_checkpoints,
)
from cycleqd.objectstore import open_store
from cycleqd.tracking import T
from cycleqd.weights import SafetensorsFolder, sha256_file

log = logging.getLogger(__name__)

_TOKENIZER_FILES = ("tokenizer", "special_tokens_map", "chat_template", "vocab", "merges")


@dataclass
class FinetuneResult:
    """What a fine-tuning run produced (`to_json` for a pipeline's output pointer)."""

    name: str
    expert: PublishedExpert
    steps: int
    final_loss: float | None
    base_eval: dict | None
    expert_eval: dict | None
    resumed_from: int | None = None
    reused: bool = False  # already published with the same fingerprint: nothing trained
    losses: list[float] = field(default_factory=list)
    tokens_per_second: float = 0.0
    seconds: float = 0.0
    run_id: str | None = None
    model_id: str | None = None
    tracking_missed: list[str] = field(default_factory=list)

    @property
    def uri(self) -> str:
        return self.expert.uri

    @property
    def sha256(self) -> str:
        return self.expert.sha256

    @property
    def genome_id(self) -> str:
        return self.expert.genome_id

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "uri": self.uri,
            "store": self.expert.store_uri,
            "prefix": self.expert.prefix,
            "sha256": self.sha256,
            "genome_id": self.genome_id,
            "genome": self.expert.manifest.get("genome"),
            "steps": self.steps,
            "final_loss": self.final_loss,
            "base_eval": self.base_eval,
            "expert_eval": self.expert_eval,
            "resumed_from": self.resumed_from,
            "reused": self.reused,
            "tokens_per_second": self.tokens_per_second,
            "mlflow_run_id": self.run_id,
            "mlflow_model_id": self.model_id,
        }


def _tokenizer_dir(config: FinetuneConfig, base_dir: Path) -> Path:
    if config.tokenizer is None:
        return base_dir
    path = local_path(config.tokenizer)
    if path is None or not path.is_dir():
        raise SourceError(
            f"tokenizer {config.tokenizer}: not a local folder (tokenizer_config.json, "
            "tokenizer.json); leave it out to use the base's tokenizer"
        )
    return path


def _tokenizer_digest(folder: Path) -> str:
    files = sorted(
        p for p in folder.iterdir() if p.is_file() and p.name.startswith(_TOKENIZER_FILES)
    )
    text = "".join(f"{sha256_file(p)}  {p.name}\n" for p in files)
    return hashlib.sha256(text.encode()).hexdigest()


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as exc:
        raise FinetuneError(
            f"cannot load a tokenizer from {folder}: {exc}; set `tokenizer` to a folder with one"
        ) from None
    return tokenizer


def _dataset_record(ds: ChatDataset | None) -> dict | None:
    if ds is None:
        return None
    return {"uri": ds.source, "sha256": ds.digest, "rows": len(ds), "name": ds.name}


def _reused(config: FinetuneConfig, expert: PublishedExpert) -> FinetuneResult:
    training = expert.manifest.get("training") or {}
    evals = expert.manifest.get("eval") or {}
    return FinetuneResult(
        name=config.name,
        expert=expert,
        steps=int(training.get("steps", 0)),
        final_loss=training.get("final_loss"),
        base_eval=evals.get("base"),
        expert_eval=evals.get("expert"),
        reused=True,
    )


def run_finetune(
    config: FinetuneConfig | dict | str | Path,
    *,
    on_step: Callable[[TrainState], None] | None = None,
    on_checkpoint: Callable[[int, str], None] | None = None,
    work_dir: str | Path | None = None,
) -> FinetuneResult:
    """Fine-tune one expert as the config says (a FinetuneConfig, a mapping, or a YAML path).

    Rerunning the same config resumes from the last complete checkpoint, or returns the
    published expert when it is already there.
    """
    started = time.perf_counter()
    config = coerce_config(config)
    store = open_store(config.store)
    with tempfile.TemporaryDirectory(prefix="cycleqd-finetune-", dir=work_dir) as tmp:
        tmp = Path(tmp)
        base_dir, base_sha = fetch_model_folder(config.base, tmp / "base", what="base")
        tokenizer_dir = _tokenizer_dir(config, base_dir)
        train_ds = load_chat_dataset(config.data)
        eval_ds = load_chat_dataset(config.eval_data) if config.eval_data else None
        extra = {
            "base_sha256": base_sha,
            "data_sha256": train_ds.digest,
            "tokenizer_sha256": _tokenizer_digest(tokenizer_dir),
        }
        identity = {"hyperparameters": config.hyperparameters(), **extra}
        fingerprint = config.fingerprint(**extra)

        existing = published_expert(store, config.expert_prefix)
        if existing is not None and existing.manifest.get("fingerprint") == fingerprint:
            log.info("expert %s is already published with this configuration", existing.uri)
            return _reused(config, existing)

        tokenizer = load_tokenizer(tokenizer_dir)
        pad_id = tokenizer.pad_token_id
        if pad_id is None:
            pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        train = encode_dataset(tokenizer, train_ds, config.max_length)
        evals = encode_dataset(tokenizer, eval_ds, config.max_length) if eval_ds else None

        tracker = None
        if config.tracking_uri:
            tracker = FinetuneTracker(
                config.tracking_uri, config.experiment, config.name, fingerprint
            )
            datasets = [
                (train_ds.name, train_ds.digest, train_ds.source, len(train_ds), "training")
            ]
            if eval_ds is not None:
                datasets.append(
                    (eval_ds.name, eval_ds.digest, eval_ds.source, len(eval_ds), "evaluation")
                )
            params = {
                **hyperparameter_params(config.hyperparameters()),
                "name": config.name,
                "skill": config.skill or "",
                "base": _uri_of(config.base),
                "base_sha256": base_sha,
                "data": train_ds.source,
                "data_sha256": train_ds.digest,
                "train_rows": len(train.examples),
            }
            tags = {
                f"{T}base_uri": _uri_of(config.base),
                f"{T}base_sha256": base_sha,
                f"{T}dataset_digest": train_ds.digest,
            }
            if config.skill:
                tags[f"{T}skill"] = config.skill
            tracker.start(params, tags, datasets)

        def step_hook(state: TrainState) -> None:
            if tracker is not None:
                tracker.log_step(
                    state.step, state.losses[-1], state.learning_rates[-1], state.grad_norms[-1]
                )
                if state.step % config.log_every == 0:
                    tracker.flush()
            if on_step is not None:
                on_step(state)

        def checkpoint_hook(step: int, key: str) -> None:
            if tracker is not None:
                tracker.flush()
            if on_checkpoint is not None:
                on_checkpoint(step, key)

        trainer = Trainer(
            config,
            base_dir,
            pad_id,
            train.examples,
            evals.examples if evals else None,
            store=store,
            fingerprint=fingerprint,
            identity=identity,
            on_step=step_hook,
            on_checkpoint=checkpoint_hook,
        )
        try:
            outcome = trainer.run()
            if tracker is not None:
                tracker.flush()
                if outcome.state.base_eval:
                    eval_ref = (eval_ds.name, eval_ds.digest) if eval_ds else None
                    tracker.log_eval(outcome.state.base_eval, 0, eval_ref, prefix="base_eval_")
            expert = _build_and_publish(
                config,
                store,
                tmp,
                base_dir,
                trainer,
                outcome,
                base_sha,
                identity,
                fingerprint,
                train_ds,
                eval_ds,
                train,
            )
        except BaseException:
            if tracker is not None:
                tracker.finish("FAILED")
            raise

        model_id = None
        if tracker is not None:
            model_tags = {
                f"{T}base_uri": _uri_of(config.base),
                f"{T}base_sha256": base_sha,
                f"{T}dataset_digest": train_ds.digest,
                f"{T}method": config.method,
                f"{T}factors": f"{expert.uri}/{FACTORS_FILE}",
            }
            if config.skill:
                model_tags[f"{T}skill"] = config.skill
            model_id = tracker.log_expert(
                expert.uri,
                expert.sha256,
                expert.genome_id,
                model_tags,
                hyperparameter_params(config.hyperparameters()),
                outcome.state.step,
            )
            if outcome.expert_eval:
                eval_ref = (eval_ds.name, eval_ds.digest) if eval_ds else None
                tracker.log_eval(outcome.expert_eval, outcome.state.step, eval_ref, model_id)
            tracker.finish("FINISHED")

        if config.cleanup_checkpoints:
            for step in list_checkpoints(store, config.checkpoints):
                delete_checkpoint(store, checkpoint_key(config.checkpoints, step))

        state = outcome.state
        return FinetuneResult(
            name=config.name,
            expert=expert,
            steps=state.step,
            final_loss=state.losses[-1] if state.losses else None,
            base_eval=state.base_eval,
            expert_eval=outcome.expert_eval,
            resumed_from=outcome.resumed_from,
            losses=list(state.losses),
            tokens_per_second=outcome.run_tokens_per_second,
            seconds=time.perf_counter() - started,
            run_id=tracker.run_id if tracker else None,
            model_id=model_id,
            tracking_missed=tracker.missed() if tracker else [],
        )


def _build_and_publish(
    config,
    store,
    tmp,
    base_dir,
    trainer,
    outcome,
    base_sha,
    identity,
    fingerprint,
    train_ds,
    eval_ds,
    train,
):
    out = tmp / "expert"
    out.mkdir()
    base_folder = SafetensorsFolder(base_dir)
    device = trainer.device
    if config.method == "lora":
        lora = lora_modules(outcome.model)
        adapters = adapter_state(outcome.model)
        outcome.model = None  # free the training model before the float32 merge
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        task_vector = write_lora_factors(out / FACTORS_FILE, lora, base_folder)
        merged = merge_lora(base_dir, config, adapters, device)
        weights_sha = write_expert_weights(out / WEIGHTS_FILE, base_folder, state_getter(merged))
        del merged
    else:
        weights_sha = write_expert_weights(
            out / WEIGHTS_FILE, base_folder, state_getter(outcome.model)
        )
        outcome.model = None
        gc.collect()
        stored = SafetensorsFolder(out)
        task_vector = write_full_factors(
            out / FACTORS_FILE, base_folder, stored.get, config.full_svd_rank, device
        )
    files = {**_base_side_files(base_dir), WEIGHTS_FILE: out / WEIGHTS_FILE}
    files[FACTORS_FILE] = out / FACTORS_FILE
    state = outcome.state
    record = {
        "name": config.name,
        "skill": config.skill,
        "method": config.method,
        "fingerprint": fingerprint,
        "identity": identity,
        "base": {"uri": _uri_of(config.base), "sha256": base_sha},
        "dataset": _dataset_record(train_ds),
        "eval_dataset": _dataset_record(eval_ds),
        "hyperparameters": config.hyperparameters(),
        "training": {
            "steps": state.step,
            "final_loss": state.losses[-1] if state.losses else None,
            "tokens": state.tokens,
            "target_tokens": state.target_tokens,
            "seconds": round(state.seconds, 3),
            "device": trainer.device.type,
            "dtype": str(trainer.dtype).removeprefix("torch."),
            "rows": len(train.examples),
            "rows_truncated": train.truncated,
            "rows_dropped": train.dropped,
        },
        "eval": {"base": state.base_eval, "expert": outcome.expert_eval},
        "task_vector": task_vector,
    }
    expert = publish_expert(
        store, config.expert_prefix, files, weights_sha, skill=config.skill, record=record
    )
    return expert


__all__ = ["FinetuneResult", "load_tokenizer", "run_finetune"]

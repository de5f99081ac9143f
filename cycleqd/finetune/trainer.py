"""The training loop: AdamW, linear warmup and decay, gradient clipping, seeded data order, and
checkpoints in an object store from which a restarted job resumes exactly.

Data order: the examples form one stream, epoch after epoch, each epoch a permutation drawn
from (seed, epoch); optimizer step s takes stream positions [s*E, (s+1)*E) with
E = batch_size * gradient_accumulation, in `gradient_accumulation` micro-batches. The order
is a function of the step alone, so a resumed run needs no data-loader state.

Loss: the sum of the token cross-entropies over the assistant tokens (labels != -100) of the
step's micro-batches, divided by their count: accumulation is exactly a larger batch.

Checkpoints: every `checkpoint_every` steps (and after the last one) a unit under
`<checkpoint_prefix>/step-00000050/`: `trainable.safetensors` (the LoRA adapters, or every
weight for full fine-tuning), `optimizer.pt` (AdamW and scheduler state, the torch RNG
states), `state.json` (step, loss curve, base evaluation), and the manifest, written last by
`publish_model`. A run starts from the newest complete checkpoint whose fingerprint (the
hyperparameters, the base's and the data's sha256) is this run's; one made with other
settings is refused, naming what differs. Older checkpoints are deleted once a newer one is
complete (`keep_checkpoints`).

Precision: on a GPU the frozen base is held in bfloat16 (LoRA) and the forward pass runs
under bfloat16 autocast; trainable weights (the adapters, or all weights for full
fine-tuning) and the optimizer stay in float32. On the CPU everything is float32.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from cycleqd.errors import CycleQDError
from cycleqd.finetune.config import FinetuneConfig
from cycleqd.finetune.data import IGNORE_INDEX, Example
from cycleqd.objectstore import ObjectStore, model_is_complete, publish_model, read_manifest

log = logging.getLogger(__name__)

TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "state.json"
CHECKPOINT_KIND = "cycleqd-finetune-checkpoint"


class FinetuneError(CycleQDError):
    """Fine-tuning cannot start or go on; the message says what to change."""


class CheckpointMismatchError(FinetuneError):
    """Checkpoints under the prefix were made by another configuration, base or data set."""


# -- devices and precision -------------------------------------------------------------------


def resolve_device(config: FinetuneConfig) -> torch.device:
    if config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise FinetuneError("device: 'cuda' was asked for, but torch sees no CUDA GPU")
        return torch.device("cuda")
    return torch.device("cpu")


def resolve_dtype(config: FinetuneConfig, device: torch.device) -> torch.dtype:
    if config.dtype == "float32":
        return torch.float32
    if config.dtype == "bfloat16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


# -- schedule and data order -----------------------------------------------------------------


class LinearWarmupDecay:
    """LR factor of step s: (s+1)/(w+1) while s < w, then (T - s)/(T - w): no step at LR 0."""

    def __init__(self, warmup: int, total: int):
        self.warmup, self.total = int(warmup), int(total)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        return max(0.0, (self.total - step) / max(1, self.total - self.warmup))


def derived_seed(seed: int, what: str) -> int:
    digest = hashlib.sha256(f"{seed}:{what}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def total_steps(config: FinetuneConfig, n_examples: int) -> int:
    if config.max_steps is not None:
        return config.max_steps
    per_step = config.batch_size * config.gradient_accumulation
    return max(1, math.ceil(config.epochs * n_examples / per_step))


class DataOrder:
    """Which examples each optimizer step (and each of its micro-batches) uses."""

    def __init__(self, n: int, seed: int, batch_size: int, accumulation: int):
        self.n, self.seed = n, seed
        self.batch_size, self.accumulation = batch_size, accumulation
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            gen = torch.Generator().manual_seed(derived_seed(self.seed, f"epoch:{epoch}"))
            self._perms = {epoch: torch.randperm(self.n, generator=gen).tolist()}
        return self._perms[epoch]

    def step(self, step: int) -> list[list[int]]:
        per_step = self.batch_size * self.accumulation
        indices = [
            self._perm(k // self.n)[k % self.n]
            for k in range(step * per_step, (step + 1) * per_step)
        ]
        return [indices[i : i + self.batch_size] for i in range(0, per_step, self.batch_size)]


def collate(examples: list[Example], pad_id: int, device: torch.device):
    """Right-padded ids, attention mask and labels."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return ids.to(device), mask.to(device), labels.to(device)


def _autocast(device: torch.device, dtype: torch.dtype):
    if device.type == "cuda" and dtype != torch.float32:
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def token_losses(model, ids, mask, labels, device, dtype):
    """Per-token cross-entropy (float32) of the shifted labels, and the targets' mask."""
    with _autocast(device, dtype):
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    logits = logits[:, :-1].float()
    target = labels[:, 1:]
    losses = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        target.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(target.shape)
    return losses, logits, target


@torch.no_grad()
def evaluate(
    model,
    examples: list[Example],
    pad_id: int,
    batch_size: int = 8,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, float]:
    """Mean loss per assistant token, token accuracy (argmax under teacher forcing) and the
    share of rows whose assistant tokens are all predicted right."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    loss_sum, correct, targets, exact = 0.0, 0, 0, 0
    try:
        for start in range(0, len(examples), batch_size):
            batch = examples[start : start + batch_size]
            ids, mask, labels = collate(batch, pad_id, device)
            losses, logits, target = token_losses(model, ids, mask, labels, device, dtype)
            valid = target != IGNORE_INDEX
            right = (logits.argmax(-1) == target) & valid
            loss_sum += float(losses[valid].sum())
            correct += int(right.sum())
            targets += int(valid.sum())
            exact += int(((right | ~valid).all(dim=1)).sum())
    finally:
        model.train(was_training)
    return {
        "loss": loss_sum / max(1, targets),
        "token_accuracy": correct / max(1, targets),
        "exact_match": exact / max(1, len(examples)),
        "targets": float(targets),
        "rows": float(len(examples)),
    }


# -- the model -------------------------------------------------------------------------------


def _quiet_transformers() -> None:
    with contextlib.suppress(Exception):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def load_causal_lm(folder: str | Path, dtype: torch.dtype, device: torch.device):
    from transformers import AutoModelForCausalLM

    _quiet_transformers()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
    except (OSError, ValueError, KeyError) as exc:
        raise FinetuneError(f"cannot load the model in {folder}: {exc}") from None
    return model.to(device)


@contextlib.contextmanager
def quiet_peft():
    """peft calls a transformers API deprecated in 5.x; the warning is not ours to act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        yield


def wrap_lora(model, config: FinetuneConfig):
    from peft import get_peft_model

    with quiet_peft():
        return get_peft_model(model, lora_config(config), autocast_adapter_dtype=True)


def lora_config(config: FinetuneConfig):
    from peft import LoraConfig

    return LoraConfig(
        r=config.lora.rank,
        lora_alpha=config.lora.alpha,
        lora_dropout=config.lora.dropout,
        target_modules=list(config.lora.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def check_targets(model, targets) -> None:
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    missing = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names)]
    if missing:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise FinetuneError(
            f"lora.target_modules: {missing} match no linear layer of the base; its linear "
            f"layers are named {leaves}"
        )


def build_model(config: FinetuneConfig, base_dir: Path, device: torch.device, dtype):
    """The model to train: the base with LoRA adapters (float32), or the whole base in float32."""
    if config.method == "lora":
        model = load_causal_lm(base_dir, dtype, device)
        check_targets(model, config.lora.target_modules)
        torch.manual_seed(derived_seed(config.seed, "lora-init"))
        model = wrap_lora(model, config)
        for name, param in model.named_parameters():
            if param.requires_grad and param.dtype != torch.float32:
                param.data = param.data.float()
                log.debug("adapter %s cast to float32", name)
    else:
        model = load_causal_lm(base_dir, torch.float32, device)
        for param in model.parameters():
            param.requires_grad_(True)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def trainable_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def make_optimizer(config: FinetuneConfig, params: list[tuple[str, torch.nn.Parameter]]):
    decay = [p for n, p in params if p.ndim >= 2]
    rest = [p for n, p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}]
    if rest:
        groups.append({"params": rest, "weight_decay": 0.0})
    return torch.optim.AdamW(
        groups, lr=config.learning_rate, betas=tuple(config.adam_betas), eps=config.adam_eps
    )


# -- state and checkpoints -------------------------------------------------------------------


@dataclass
class TrainState:
    step: int = 0
    losses: list[float] = field(default_factory=list)  # mean assistant-token loss per step
    learning_rates: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    tokens: int = 0  # tokens run through the model (no padding)
    target_tokens: int = 0
    base_eval: dict | None = None
    seconds: float = 0.0  # training time, summed over the runs that made this state

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> TrainState:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


def checkpoint_key(prefix: str, step: int) -> str:
    return f"{prefix}/step-{step:08d}"


def list_checkpoints(store: ObjectStore, prefix: str) -> list[int]:
    """Steps of every checkpoint folder under the prefix (complete or not), ascending."""
    steps = set()
    for key in store.list(f"{prefix}/"):
        head = key[len(prefix) + 1 :].split("/", 1)[0]
        if head.startswith("step-") and head[5:].isdigit():
            steps.add(int(head[5:]))
    return sorted(steps)


def _diff(mine: dict, theirs: dict, path: str = "") -> list[str]:
    out = []
    for key in sorted(set(mine) | set(theirs)):
        a, b = mine.get(key), theirs.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(_diff(a, b, f"{path}{key}."))
        elif a != b:
            out.append(f"{path}{key}: {b!r} there, {a!r} now")
    return out


def latest_checkpoint(
    store: ObjectStore, prefix: str, fingerprint: str, identity: dict
) -> int | None:
    """The newest complete checkpoint's step; CheckpointMismatchError if it is another run's."""
    for step in reversed(list_checkpoints(store, prefix)):
        key = checkpoint_key(prefix, step)
        if not model_is_complete(store, key):
            continue  # a checkpoint cut short: an older one may be whole
        manifest = read_manifest(store, key) or {}
        if manifest.get("fingerprint") != fingerprint:
            changes = _diff(identity, manifest.get("identity") or {})
            raise CheckpointMismatchError(
                f"the checkpoint {store.uri.rstrip('/')}/{key} was made with other settings "
                f"({'; '.join(changes[:6]) or 'unknown'}). Resume with those settings, or "
                "delete the checkpoints (or set checkpoint_prefix) to start over"
            )
        return step
    return None


def save_checkpoint(
    store: ObjectStore,
    prefix: str,
    state: TrainState,
    params: list[tuple[str, torch.nn.Parameter]],
    optimizer,
    scheduler,
    fingerprint: str,
    identity: dict,
    keep: int,
) -> str:
    from safetensors.torch import save_file

    key = checkpoint_key(prefix, state.step)
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    with tempfile.TemporaryDirectory(prefix="cycleqd-ckpt-") as tmp:
        files = {
            TRAINABLE_FILE: Path(tmp) / TRAINABLE_FILE,
            OPTIMIZER_FILE: Path(tmp) / OPTIMIZER_FILE,
            STATE_FILE: Path(tmp) / STATE_FILE,
        }
        save_file(
            {n: p.detach().to("cpu").contiguous() for n, p in params},
            str(files[TRAINABLE_FILE]),
            metadata={"step": str(state.step)},
        )
        torch.save(
            {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng},
            files[OPTIMIZER_FILE],
        )
        files[STATE_FILE].write_text(json.dumps(state.to_json()))
        publish_model(
            store,
            key,
            files,
            {
                "kind": CHECKPOINT_KIND,
                "step": state.step,
                "fingerprint": fingerprint,
                "identity": identity,
            },
        )
    # The new one is whole: drop older ones beyond `keep` (manifest first: never half-visible).
    older = [s for s in list_checkpoints(store, prefix) if s < state.step]
    complete = 1
    for step in reversed(older):
        old = checkpoint_key(prefix, step)
        if complete < keep and model_is_complete(store, old):
            complete += 1
            continue
        delete_checkpoint(store, old)
    return key


def delete_checkpoint(store: ObjectStore, key: str) -> None:
    from cycleqd.weights import MANIFEST

    store.delete(f"{key}/{MANIFEST}")
    store.delete_prefix(f"{key}/")


def load_checkpoint(
    store: ObjectStore,
    key: str,
    params: list[tuple[str, torch.nn.Parameter]],
    optimizer,
    scheduler,
    device: torch.device,
) -> TrainState:
    from safetensors.torch import load as load_safetensors

    weights = load_safetensors(store.get_bytes(f"{key}/{TRAINABLE_FILE}"))
    names = [n for n, _ in params]
    if sorted(weights) != sorted(names):
        raise CheckpointMismatchError(
            f"{store.uri.rstrip('/')}/{key} holds other trainable weights than this model "
            f"({len(weights)} vs {len(names)}); delete it to start over"
        )
    with torch.no_grad():
        for name, param in params:
            param.copy_(weights[name].to(param.device, param.dtype))
    blob = torch.load(
        io.BytesIO(store.get_bytes(f"{key}/{OPTIMIZER_FILE}")),
        map_location="cpu",
        weights_only=True,
    )
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    torch.set_rng_state(blob["rng"]["cpu"])
    if "cuda" in blob["rng"] and device.type == "cuda":
        torch.cuda.set_rng_state_all(blob["rng"]["cuda"])
    return TrainState.from_json(json.loads(store.get_bytes(f"{key}/{STATE_FILE}")))


# -- the loop ------------------------------------------------------------------------------


StepCallback = Callable[[TrainState], None]


@dataclass
class TrainOutcome:
    model: object  # the trained model (peft-wrapped for LoRA), in eval mode
    state: TrainState
    total_steps: int
    resumed_from: int | None
    expert_eval: dict | None
    run_tokens_per_second: float  # this process's training throughput
    checkpoints: list[str] = field(default_factory=list)


class Trainer:
    """One fine-tuning run over encoded examples; see the module doc."""

    def __init__(
        self,
        config: FinetuneConfig,
        base_dir: Path,
        pad_id: int,
        train: list[Example],
        eval_examples: list[Example] | None = None,
        *,
        store: ObjectStore | None = None,
        fingerprint: str = "",
        identity: dict | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
        on_step: StepCallback | None = None,
        on_checkpoint: Callable[[int, str], None] | None = None,
        on_resume: Callable[[TrainState], None] | None = None,
    ):
        self.config = config
        self.base_dir = Path(base_dir)
        self.pad_id = pad_id
        self.train_examples = train
        self.eval_examples = eval_examples or None
        self.store = store
        self.fingerprint = fingerprint
        self.identity = identity or {}
        self.device = device or resolve_device(config)
        self.dtype = dtype or resolve_dtype(config, self.device)
        self.on_step, self.on_checkpoint, self.on_resume = on_step, on_checkpoint, on_resume
        self.total = total_steps(config, len(train))
        self.order = DataOrder(
            len(train), config.seed, config.batch_size, config.gradient_accumulation
        )

    def _evaluate(self, model) -> dict | None:
        if not self.eval_examples:
            return None
        return evaluate(
            model, self.eval_examples, self.pad_id, self.config.batch_size, self.device, self.dtype
        )

    def run(self) -> TrainOutcome:
        config = self.config
        model = build_model(config, self.base_dir, self.device, self.dtype)
        params = trainable_parameters(model)
        optimizer = make_optimizer(config, params)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, LinearWarmupDecay(config.warmup_steps, self.total)
        )
        prefix = config.checkpoints
        resumed_from = None
        if self.store is not None and config.checkpoint_every:
            resumed_from = latest_checkpoint(self.store, prefix, self.fingerprint, self.identity)
        if resumed_from is not None:
            state = load_checkpoint(
                self.store,
                checkpoint_key(prefix, resumed_from),
                params,
                optimizer,
                scheduler,
                self.device,
            )
            log.info("resumed from checkpoint step %d of %d", state.step, self.total)
            if self.on_resume:
                self.on_resume(state)
        else:
            state = TrainState(base_eval=self._evaluate(model))
            torch.manual_seed(derived_seed(config.seed, "train"))
        saved: list[str] = []
        run_tokens, run_seconds = 0, 0.0
        while state.step < self.total:
            started = time.perf_counter()
            loss, tokens, targets, norm = self._step(model, params, optimizer, state.step)
            lr = optimizer.param_groups[0]["lr"]
            scheduler.step()
            elapsed = time.perf_counter() - started
            state.step += 1
            state.losses.append(loss)
            state.learning_rates.append(lr)
            state.grad_norms.append(norm)
            state.tokens += tokens
            state.target_tokens += targets
            state.seconds += elapsed
            run_tokens += tokens
            run_seconds += elapsed
            if self.on_step:
                self.on_step(state)
            if (
                self.store is not None
                and config.checkpoint_every
                and (state.step % config.checkpoint_every == 0 or state.step == self.total)
            ):
                key = save_checkpoint(
                    self.store,
                    prefix,
                    state,
                    params,
                    optimizer,
                    scheduler,
                    self.fingerprint,
                    self.identity,
                    config.keep_checkpoints,
                )
                saved.append(key)
                if self.on_checkpoint:
                    self.on_checkpoint(state.step, key)
        model.eval()
        expert_eval = self._evaluate(model)
        return TrainOutcome(
            model=model,
            state=state,
            total_steps=self.total,
            resumed_from=resumed_from,
            expert_eval=expert_eval,
            run_tokens_per_second=run_tokens / run_seconds if run_seconds else 0.0,
            checkpoints=saved,
        )

    def _step(self, model, params, optimizer, step: int) -> tuple[float, int, int, float]:
        micro = [[self.train_examples[i] for i in mb] for mb in self.order.step(step)]
        targets = sum(e.n_targets for mb in micro for e in mb)
        tokens = sum(len(e.input_ids) for mb in micro for e in mb)
        optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        for batch in micro:
            ids, mask, labels = collate(batch, self.pad_id, self.device)
            losses, _, _ = token_losses(model, ids, mask, labels, self.device, self.dtype)
            loss = losses.sum()
            (loss / targets).backward()
            total += loss.detach()
        tensors = [p for _, p in params]
        if self.config.max_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(tensors, self.config.max_grad_norm)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in tensors if p.grad is not None])
        optimizer.step()
        return float(total) / targets, tokens, targets, float(norm)


__all__ = [
    "CheckpointMismatchError",
    "DataOrder",
    "FinetuneError",
    "LinearWarmupDecay",
    "TrainOutcome",
    "TrainState",
    "Trainer",
    "build_model",
    "evaluate",
    "latest_checkpoint",
    "list_checkpoints",
    "resolve_device",
    "resolve_dtype",
    "total_steps",
]

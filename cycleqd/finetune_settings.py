"""How an expert is fine-tuned: the hyperparameters shared by a fine-tuning config
(`cycleqd finetune`) and a campaign's expert spec (`models.experts.<skill>` as a mapping).

A leaf module (pydantic only): the campaign config validates where torch is not installed.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import Field, model_serializer, model_validator

from cycleqd.skills.registry import StrictModel

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# What decides the trained weights (besides the base and the data): the fingerprint hashes
# these, so a rerun with the same ones reuses a published expert.
HYPERPARAMETERS = (
    "method",
    "learning_rate",
    "weight_decay",
    "adam_betas",
    "adam_eps",
    "epochs",
    "max_steps",
    "batch_size",
    "gradient_accumulation",
    "max_length",
    "warmup_steps",
    "max_grad_norm",
    "seed",
)


class LoraSettings(StrictModel):
    """LoRA adapters: delta W = (alpha / rank) * B @ A on every target module."""

    rank: int = Field(default=16, ge=1, le=4096)
    alpha: float = Field(default=32.0, gt=0.0)
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    target_modules: tuple[str, ...] = Field(default=DEFAULT_TARGETS, min_length=1)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @model_validator(mode="after")
    def _targets_are_names(self) -> LoraSettings:
        bad = [t for t in self.target_modules if not t or not t.replace("_", "").isalnum()]
        if bad:
            raise ValueError(
                f"target_modules: {bad} are not module names (e.g. q_proj, v_proj, down_proj)"
            )
        if len(set(self.target_modules)) != len(self.target_modules):
            raise ValueError("target_modules: a module is named twice")
        return self


class TrainingSettings(StrictModel):
    """Supervised fine-tuning of one expert from the base: LoRA or full, the optimiser, the
    schedule (linear warmup, then linear decay to 0), checkpoints."""

    method: Literal["lora", "full"] = "lora"
    lora: LoraSettings = LoraSettings()
    learning_rate: float = Field(default=2e-4, gt=0.0)
    weight_decay: float = Field(default=0.0, ge=0.0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = Field(default=1e-8, gt=0.0)
    epochs: float = Field(default=1.0, gt=0.0)
    max_steps: int | None = Field(default=None, ge=1, description="wins over epochs")
    batch_size: int = Field(default=8, ge=1)
    gradient_accumulation: int = Field(default=1, ge=1)
    max_length: int = Field(default=2048, ge=2)
    warmup_steps: int = Field(default=0, ge=0)
    max_grad_norm: float | None = Field(default=1.0, gt=0.0)
    seed: int = Field(default=0, ge=0)
    gradient_checkpointing: bool = False  # less memory, ~30% more compute

    checkpoint_every: int = Field(default=100, ge=0, description="optimizer steps; 0: none")
    keep_checkpoints: int = Field(default=1, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    full_svd_rank: int | None = Field(default=None, ge=1)  # full FT: truncate stored factors

    @model_validator(mode="after")
    def _check(self) -> TrainingSettings:
        for beta in self.adam_betas:
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"adam_betas: each must be in [0, 1), got {list(self.adam_betas)}")
        if self.method == "full" and "lora" in self.model_fields_set:
            raise ValueError("lora: given, but method is 'full'; drop it or use method: lora")
        return self

    def hyperparameters(self) -> dict[str, Any]:
        """What decides the trained weights (besides the base and the data)."""
        data = self.model_dump(mode="json")
        out = {k: data[k] for k in HYPERPARAMETERS}
        if self.method == "lora":
            out["lora"] = data["lora"]
        return out

    def fingerprint(self, **identity: Any) -> str:
        """A digest of the hyperparameters plus what identifies the base and the data."""
        payload = {"hyperparameters": self.hyperparameters(), **identity}
        text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:24]

    def settings(self) -> dict[str, Any]:
        """These settings alone (a subclass's own fields left out), as a mapping."""
        return self.model_dump(include=set(TrainingSettings.model_fields))

    @model_serializer(mode="wrap")
    def _without_unused_lora(self, handler: Any) -> dict[str, Any]:
        """Full fine-tuning has no LoRA settings: dumped without them, so that the dump
        validates again (a `lora` beside `method: full` is refused as a likely mistake)."""
        data = handler(self)
        if self.method == "full":
            data.pop("lora", None)
        return data


def missing_targets(shapes: dict[str, tuple[int, ...]], targets: tuple[str, ...]) -> str | None:
    """Why LoRA `targets` do not fit a model whose tensors have these shapes (by name), or
    None: a target must be the last name of some linear layer (a 2-D `<path>.weight`). From
    the safetensors header alone, so it is checked before any GPU is requested."""
    leaves = sorted(
        {
            n.removesuffix(".weight").rsplit(".", 1)[-1]
            for n, s in shapes.items()
            if n.endswith(".weight") and len(s) == 2
        }
    )
    missing = [t for t in targets if t not in leaves]
    if not missing:
        return None
    return f"{missing} match no linear layer of the base; its linear layers are named {leaves}"


__all__ = [
    "DEFAULT_TARGETS",
    "HYPERPARAMETERS",
    "LoraSettings",
    "TrainingSettings",
    "missing_targets",
]

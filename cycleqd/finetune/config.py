"""The fine-tuning config: one typed document per expert, validated on load.

Every validation error names the field (as a dotted path) and what is allowed.

    name: coding-expert            # the expert's name: letters, digits, . _ -
    skill: coding                  # the skill it is an expert of (recorded in its genome)
    base: /models/llama-3-8b-instruct       # HF folder of safetensors, or s3://... / file://...
    data: s3://datasets/coding/train.jsonl  # chat JSONL: a file or a folder of *.jsonl
    eval_data: s3://datasets/coding/val.jsonl   # optional held-out set (loss/accuracy)
    store: s3://cycleqd/experts    # where the expert (and the checkpoints) go
    method: lora                   # lora | full
    lora: {rank: 16, alpha: 32, dropout: 0.05, target_modules: [q_proj, k_proj, v_proj, o_proj,
                                                                gate_proj, up_proj, down_proj]}
    learning_rate: 2.0e-4
    epochs: 3                      # or max_steps: 1000 (max_steps wins when both are given)
    batch_size: 8
    gradient_accumulation: 2
    max_length: 2048
    warmup_steps: 20
    seed: 0
    checkpoint_every: 100          # optimizer steps between checkpoints (0: none)
    tracking_uri: http://mlflow:5000   # optional
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cycleqd.config import read_yaml, validate
from cycleqd.errors import ConfigError

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class LoraSettings(_Strict):
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


class FinetuneConfig(_Strict):
    """Supervised fine-tuning of one expert (see the module doc for an example)."""

    name: str = Field(pattern=_NAME)
    skill: str | None = Field(default=None, pattern=r"^[a-z][a-z0-9_]{0,31}$")
    base: str = Field(min_length=1, description="base model: folder or store URI")
    tokenizer: str | None = Field(default=None, description="default: the base's tokenizer")
    data: str = Field(min_length=1, description="chat JSONL file/folder or store URI")
    eval_data: str | None = None
    store: str = Field(min_length=1, description="store URI for the expert and checkpoints")
    prefix: str | None = Field(default=None, description="default: experts/<name>")
    checkpoint_prefix: str | None = Field(default=None, description="default: checkpoints/<name>")

    method: Literal["lora", "full"] = "lora"
    lora: LoraSettings = LoraSettings()
    learning_rate: float = Field(default=2e-4, gt=0.0)
    weight_decay: float = Field(default=0.0, ge=0.0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = Field(default=1e-8, gt=0.0)
    epochs: float = Field(default=1.0, gt=0.0)
    max_steps: int | None = Field(default=None, ge=1)
    batch_size: int = Field(default=8, ge=1)
    gradient_accumulation: int = Field(default=1, ge=1)
    max_length: int = Field(default=2048, ge=2)
    warmup_steps: int = Field(default=0, ge=0)
    max_grad_norm: float | None = Field(default=1.0, gt=0.0)
    seed: int = Field(default=0, ge=0)
    gradient_checkpointing: bool = False  # less memory, ~30% more compute

    checkpoint_every: int = Field(default=100, ge=0)
    keep_checkpoints: int = Field(default=1, ge=1)
    cleanup_checkpoints: bool = True  # delete them once the expert is published
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    full_svd_rank: int | None = Field(default=None, ge=1)  # full FT: truncate stored factors

    tracking_uri: str | None = None
    experiment: str | None = None
    log_every: int = Field(default=10, ge=1)

    @model_validator(mode="after")
    def _check(self) -> FinetuneConfig:
        for beta in self.adam_betas:
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"adam_betas: each must be in [0, 1), got {list(self.adam_betas)}")
        if self.method == "full" and "lora" in self.model_fields_set:
            raise ValueError("lora: given, but method is 'full'; drop it or use method: lora")
        return self

    @property
    def expert_prefix(self) -> str:
        return (self.prefix or f"experts/{self.name}").strip("/")

    @property
    def checkpoints(self) -> str:
        return (self.checkpoint_prefix or f"checkpoints/{self.name}").strip("/")

    def hyperparameters(self) -> dict[str, Any]:
        """What decides the trained weights (besides the base and the data)."""
        keys = [
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
        ]
        data = self.model_dump(mode="json")
        out = {k: data[k] for k in keys}
        if self.method == "lora":
            out["lora"] = data["lora"]
        return out

    def fingerprint(self, **identity: Any) -> str:
        """A digest of the hyperparameters plus what identifies the base and the data."""
        payload = {"hyperparameters": self.hyperparameters(), **identity}
        text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:24]


def parse_finetune_config(data: Any, source: str = "fine-tuning config") -> FinetuneConfig:
    """Validate a mapping into a FinetuneConfig, or raise ConfigError listing every problem."""
    if isinstance(data, FinetuneConfig):
        return data
    return validate(FinetuneConfig, data, source)


def load_finetune_config(path: str | Path) -> FinetuneConfig:
    """A YAML (or JSON) file -> FinetuneConfig."""
    return parse_finetune_config(read_yaml(path, "fine-tuning config"), source=str(path))


def coerce_config(config: FinetuneConfig | dict | str | Path) -> FinetuneConfig:
    if isinstance(config, FinetuneConfig):
        return config
    if isinstance(config, dict):
        return parse_finetune_config(config)
    if isinstance(config, (str, Path)):
        return load_finetune_config(config)
    raise ConfigError(
        f"expected a FinetuneConfig, a mapping or a config file path, got {type(config).__name__}"
    )


__all__ = [
    "DEFAULT_TARGETS",
    "FinetuneConfig",
    "LoraSettings",
    "coerce_config",
    "load_finetune_config",
    "parse_finetune_config",
]

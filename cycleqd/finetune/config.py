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

from pathlib import Path
from typing import Any

from pydantic import Field

from cycleqd.config import read_yaml, validate
from cycleqd.errors import ConfigError
from cycleqd.finetune_settings import DEFAULT_TARGETS, LoraSettings, TrainingSettings

_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"


class FinetuneConfig(TrainingSettings):
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
    cleanup_checkpoints: bool = True  # delete them once the expert is published

    tracking_uri: str | None = None
    experiment: str | None = None
    log_every: int = Field(default=10, ge=1)

    @property
    def expert_prefix(self) -> str:
        return (self.prefix or f"experts/{self.name}").strip("/")

    @property
    def checkpoints(self) -> str:
        return (self.checkpoint_prefix or f"checkpoints/{self.name}").strip("/")


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

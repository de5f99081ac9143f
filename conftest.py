"""Shared fixtures: a tiny random Llama world built once per test session (no downloads)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

SHARED_DATA = Path(__file__).resolve().parent / ".." / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> dict:
    """Base + three experts (random low-rank task vectors) as safetensors folders."""
    from cycleqd import tiny

    return tiny.build_world(tmp_path_factory.mktemp("tiny-world"))


@pytest.fixture(scope="session")
def probe_evaluator(tiny_world):
    from cycleqd import tiny

    return tiny.ProbeEvaluator(tiny_world["experts"])

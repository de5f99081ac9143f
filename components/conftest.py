"""Fixtures of the component tests (each component's `test_component.py`).

A component is tested twice: its function called directly (`comp.python_func(...)`), with
local stand-ins for the output artifacts KFP would hand it, and as a task of its own through
kfp.local, a subprocess of this interpreter as in `cycleqd run`."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
import yaml
from kfp import dsl

ArtifactT = TypeVar("ArtifactT", bound=dsl.Artifact)


@pytest.fixture
def output_artifact(tmp_path: Path) -> Callable[[type[ArtifactT], str], ArtifactT]:
    """Makes an output artifact for a `python_func` call, as KFP's executor would: a
    `dsl.Metrics` logs into its `metadata`, a file artifact (`dsl.HTML`) writes to its
    `path`, here a file under the test's folder."""
    folder = tmp_path / "outputs"
    folder.mkdir()

    def make(kind: type[ArtifactT], name: str) -> ArtifactT:
        return kind(name=name, uri=str(folder / name), metadata={})

    return make


@pytest.fixture
def kfp_local(tmp_path: Path) -> Iterator[Path]:
    """kfp.local for one test: calling a component runs it as a task, a subprocess of this
    interpreter (the environment as it is: no container, no packages installed). Yields the
    pipeline root, where the tasks' outputs land."""
    from kfp import local
    from kfp.local import config

    root = tmp_path / "kfp-local"
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root))
    yield root
    config.LocalExecutionConfig.instance = None  # later tests start uninitialised, as kfp's own


@pytest.fixture
def probe_campaign(tiny_world: dict) -> Callable[..., str]:
    """A campaign of the probe world (`tiny_world`'s models) as the YAML a component takes:
    `generations` to reach, `population` children per generation, any other field
    overridden by keyword."""
    from cycleqd import probe_world

    def make(generations: int = 1, population: int = 3, **overrides: object) -> str:
        config = probe_world.default_config(tiny_world, generations=generations)
        return yaml.safe_dump({**config, "population": population, **overrides})

    return make

"""Every component documents its interface: KFP turns the docstring's `Args:` (inputs) and
`Returns:` (outputs, by name; `Output` is the return value) into the descriptions that the
Kubeflow UI shows beside each input and output. And every component has its tests."""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

import pytest
import yaml
from kfp import compiler

import cycleqd_kfp.components as package

FOLDER = Path(package.__path__[0])
COMPONENTS = sorted(m.name for m in pkgutil.iter_modules(package.__path__) if m.ispkg)


def test_the_components_are_the_pipelines_stages():
    assert COMPONENTS == [
        "breed",
        "commit",
        "evaluate",
        "export",
        "finetune",
        "plan",
        "preflight",
        "release",
        "seed",
        "start_evaluators",
    ]


@pytest.mark.parametrize("name", COMPONENTS)
def test_every_input_and_output_is_described_in_the_compiled_spec(name, tmp_path):
    component = getattr(importlib.import_module(f"cycleqd_kfp.components.{name}.component"), name)
    path = tmp_path / f"{name}.yaml"
    compiler.Compiler().compile(component, str(path))
    assert component.component_spec.description
    interface = yaml.safe_load(path.read_text())["components"][f"comp-{name.replace('_', '-')}"]
    described = {}
    for side in ("inputDefinitions", "outputDefinitions"):
        for kind in ("parameters", "artifacts"):
            for field, definition in interface.get(side, {}).get(kind, {}).items():
                described[f"{side}.{field}"] = bool(definition.get("description", "").strip())
    assert described and all(described.values()), described


@pytest.mark.parametrize("name", COMPONENTS)
def test_every_component_has_its_tests(name):
    assert (FOLDER / name / "test_component.py").is_file()

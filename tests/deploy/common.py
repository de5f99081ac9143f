"""Paths and helpers shared by the deployment checks (loaded by path: the tests run with
--import-mode=importlib, so tests/deploy is not on sys.path)."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import yaml

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "images"
MANIFESTS = ROOT / "manifests"
HERE = Path(__file__).resolve().parent


def load_module(name: str, path: Path) -> ModuleType:
    """Import a file by path (tests run with --import-mode=importlib: no sys.path entries)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def find_tool(name: str) -> str | None:
    candidate = Path(sys.executable).parent / name
    if candidate.is_file():
        return str(candidate)
    return shutil.which(name)


def kustomization_dirs() -> list[Path]:
    """Every folder under manifests/ with a kustomization (bases, components, overlays)."""
    return sorted(p.parent for p in MANIFESTS.rglob("kustomization.yaml"))


def overlay_dirs() -> list[Path]:
    return sorted(p for p in (MANIFESTS / "overlays").iterdir() if p.is_dir())


def kubectl_build(kubectl: str, folder: Path) -> list[dict]:
    proc = subprocess.run(
        [kubectl, "kustomize", str(folder)], capture_output=True, text=True, timeout=60
    )
    if proc.returncode != 0:
        raise AssertionError(f"kubectl kustomize {folder} failed:\n{proc.stderr}")
    return [d for d in yaml.safe_load_all(proc.stdout) if d is not None]


class KfpClientRecorder:
    """A stand-in's base for kfp.Client (no KFP API server runs here): every call of a method
    kfp.Client has is checked against kfp.Client's own signature and recorded in `calls`;
    `fail[name]` makes that method raise instead."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []
        self.fail: dict[str, Exception] = {}

    def __getattribute__(self, name: str):
        import inspect

        attribute = object.__getattribute__(self, name)
        real = getattr(__import__("kfp").Client, name, None)
        if real is None or not callable(attribute):
            return attribute

        def call(*args, **kwargs):
            inspect.signature(real).bind(None, *args, **kwargs)  # kfp.Client accepts it
            self.calls.append((name, kwargs))
            if name in self.fail:
                raise self.fail[name]
            return attribute(*args, **kwargs)

        return call

"""setup.cfg lists packages explicitly (the Kubeflow folders are mapped under cycleqd_kfp):
a package folder missing from the list would silently be left out of the wheel and images."""

from __future__ import annotations

import configparser
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MAPPED = {
    "components": "cycleqd_kfp.components",
    "pipelines": "cycleqd_kfp.pipelines",
    "images": "cycleqd_kfp.images",
}


def _listed() -> set[str]:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    return {line.strip() for line in config["options"]["packages"].splitlines() if line.strip()}


def _on_disk() -> set[str]:
    found = set()
    for top, name in [("cycleqd", "cycleqd"), *MAPPED.items()]:
        for init in (ROOT / top).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / top)
            found.add(".".join([name, *relative.parts]))
    return found


def test_every_package_folder_is_listed_in_setup_cfg():
    missing = _on_disk() - _listed()
    assert not missing, f"add to [options] packages in setup.cfg: {sorted(missing)}"


def test_every_listed_package_exists():
    stale = _listed() - _on_disk()
    assert not stale, f"setup.cfg lists packages that do not exist: {sorted(stale)}"

"""Campaign state in a local folder: config, genomes, archives per generation, elite weights.

Layout under the campaign root:
    config.yaml                       the campaign's config, fixed at creation
    generations/000012.json           archives + genomes after generation 12 (never rewritten)
    LATEST                            number of the last complete generation (written last)
    models/<genome id>/               elite weights breeding reads (+ manifest, written last)
    exports/<genome id>/              exported models (final merges)

Every file is written to a temporary name and renamed, so a crash leaves either the old
state or the new one, never half of it. (S3 behind the same interface: issue 3.)
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch

from cycleqd.errors import CycleQDError
from cycleqd.weights import MANIFEST, SafetensorsFolder, TensorSpec, write_safetensors


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(text)
    os.replace(tmp, path)


class LocalCampaignStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    # -- config and snapshots ------------------------------------------------------------------

    def write_config(self, yaml_text: str) -> None:
        _atomic_write(self.root / "config.yaml", yaml_text)

    def read_config_text(self) -> str | None:
        path = self.root / "config.yaml"
        return path.read_text() if path.exists() else None

    def latest_generation(self) -> int | None:
        path = self.root / "LATEST"
        if not path.exists():
            return None
        try:
            return int(path.read_text().strip())
        except ValueError:
            raise CycleQDError(f"{path} is corrupted: expected a generation number") from None

    def write_snapshot(self, generation: int, snapshot: dict) -> None:
        path = self.root / "generations" / f"{generation:06d}.json"
        _atomic_write(path, json.dumps(snapshot, indent=1, sort_keys=True))
        _atomic_write(self.root / "LATEST", f"{generation}\n")

    def read_snapshot(self, generation: int) -> dict:
        path = self.root / "generations" / f"{generation:06d}.json"
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CycleQDError(f"cannot read campaign snapshot {path}: {exc}") from None

    # -- weights -------------------------------------------------------------------------------

    def model_dir(self, genome_id: str, area: str = "models") -> Path:
        """`models` holds elites that breeding reads; `exports` holds final models."""
        return self.root / area / genome_id

    def has_model(self, genome_id: str, area: str = "models") -> bool:
        return (self.model_dir(genome_id, area) / MANIFEST).exists()

    def open_model(self, genome_id: str, area: str = "models") -> SafetensorsFolder | None:
        if not self.has_model(genome_id, area):
            return None
        return SafetensorsFolder(self.model_dir(genome_id, area))

    def write_model(
        self,
        genome_id: str,
        specs: dict[str, TensorSpec],
        tensors: Iterable[tuple[str, torch.Tensor]],
        extra_files: dict[str, str] | None = None,
        area: str = "models",
    ) -> str:
        """Stream a model into <area>/<id>/; visible (manifest) only once complete."""
        folder = self.model_dir(genome_id, area)
        if folder.exists():
            shutil.rmtree(folder)  # a leftover of a crashed write: no manifest, not visible
        folder.mkdir(parents=True)
        sha = write_safetensors(folder / "model.safetensors", specs, tensors, {"genome": genome_id})
        for name, text in (extra_files or {}).items():
            (folder / name).write_text(text)
        manifest = {"genome": genome_id, "files": {"model.safetensors": sha}}
        _atomic_write(folder / MANIFEST, json.dumps(manifest, indent=1))
        return sha

    def stored_models(self) -> list[str]:
        folder = self.root / "models"
        return sorted(p.name for p in folder.iterdir()) if folder.exists() else []

    def delete_model(self, genome_id: str) -> None:
        # The manifest goes first, so that a crash mid-delete leaves an invisible folder.
        folder = self.model_dir(genome_id)
        (folder / MANIFEST).unlink(missing_ok=True)
        shutil.rmtree(folder, ignore_errors=True)

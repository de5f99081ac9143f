"""Elite maps: one heatmap per archive, as in the CycleQD paper's figures.

In the archive of skill k the cell of an elite is the tuple of its bins on the other skills
(the BC axes) and its colour is its quality (its score on k). Two BC axes give a 2-D grid;
one BC axis (K = 2 skills) gives a strip; more than two are projected onto the first two by
taking the best quality over the remaining axes. Empty cells are NaN and drawn blank.

Rendering uses matplotlib's Agg canvas on a bare `Figure` (no pyplot, no global state, no
display), so it runs in any container. `map_data` copies what a map needs out of a live
archive, so that a map can be drawn later (the tracker does, when MLflow answers) from the
archive as it was.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cycleqd.archive import Archive, ArchiveSet


@dataclass(frozen=True)
class MapData:
    """What one elite map shows: a copy, independent of the live archive."""

    skill: str  # the quality skill of the archive
    bc_names: tuple[str, ...]  # the BC skills, in cell order
    bc_ranges: tuple[tuple[float, float], ...]  # (bc_min, bc_max) per BC axis
    grid: np.ndarray  # qualities, one axis per BC skill, NaN where empty

    @property
    def elites(self) -> int:
        return int(np.isfinite(self.grid).sum())

    @property
    def fill(self) -> float:
        return self.elites / self.grid.size if self.grid.size else 0.0

    @property
    def best(self) -> float:
        return float(np.nanmax(self.grid)) if self.elites else float("nan")

    @property
    def qd_score(self) -> float:
        """Sum of the elites' qualities (the usual QD score)."""
        return float(np.nansum(self.grid))


def map_data(archive: Archive) -> MapData:
    return MapData(
        skill=archive.skill,
        bc_names=tuple(s.name for s in archive.bc_skills),
        bc_ranges=tuple((float(s.bc_min), float(s.bc_max)) for s in archive.bc_skills),
        grid=archive.grid().copy(),
    )


def maps_of(archives: ArchiveSet) -> dict[str, MapData]:
    return {skill: map_data(archives[skill]) for skill in archives.skill_names}


def project_2d(grid: np.ndarray) -> np.ndarray:
    """The grid as (first BC axis, second BC axis); axes beyond the second are reduced by the
    best quality (NaN only where every cell along them is empty); one axis becomes (n, 1)."""
    if grid.ndim == 0:
        return grid.reshape(1, 1)
    if grid.ndim == 1:
        return grid.reshape(-1, 1)
    if grid.ndim == 2:
        return grid
    return np.fmax.reduce(grid, axis=tuple(range(2, grid.ndim)))


def render(
    data: MapData,
    generation: int | None = None,
    *,
    vmin: float = 0.0,
    vmax: float = 1.0,
    cmap: str = "viridis",
):
    """A matplotlib Figure of one archive's elite map."""
    from matplotlib.figure import Figure

    plane = project_2d(np.asarray(data.grid, dtype=float))
    fig = Figure(figsize=(5.2, 4.4), dpi=100)
    # Fixed axes (no layout engine): one draw per image, a few tens of milliseconds.
    ax = fig.add_axes((0.14, 0.12, 0.64, 0.74))
    cax = fig.add_axes((0.82, 0.12, 0.035, 0.74))
    colours = _colormap(cmap)
    x_lo, x_hi = data.bc_ranges[0] if data.bc_ranges else (0.0, 1.0)
    if len(data.bc_ranges) >= 2:
        y_lo, y_hi = data.bc_ranges[1]
        y_label = data.bc_names[1]
        if len(data.bc_names) > 2:
            y_label += f"  (best over {', '.join(data.bc_names[2:])})"
    else:
        y_lo, y_hi, y_label = 0.0, 1.0, ""
    image = ax.imshow(
        np.ma.masked_invalid(plane.T),
        origin="lower",
        aspect="auto",
        interpolation="nearest",
        extent=(x_lo, x_hi, y_lo, y_hi),
        cmap=colours,
        vmin=vmin,
        vmax=vmax,
    )
    ax.set_xlabel(data.bc_names[0] if data.bc_names else "")
    ax.set_ylabel(y_label)
    if len(data.bc_ranges) < 2:
        ax.set_yticks([])
    when = f", generation {generation}" if generation is not None else ""
    ax.set_title(
        f"archive {data.skill}{when}\n{data.elites} elites, fill {100 * data.fill:.1f}%, "
        f"best {data.best:.3f}",
        fontsize=10,
    )
    fig.colorbar(image, cax=cax, label=f"quality ({data.skill})")
    return fig


def _colormap(name: str):
    import matplotlib

    # Empty cells: a light grey, distinct from any quality.
    return matplotlib.colormaps[name].with_extremes(bad="#f2f2f2")


def to_rgb(fig) -> np.ndarray:
    """The figure's pixels (height, width, 3), uint8."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def to_png(fig_or_rgb) -> bytes:
    """PNG bytes of a figure, or of pixels from `to_rgb` (no second draw)."""
    buffer = io.BytesIO()
    if isinstance(fig_or_rgb, np.ndarray):
        from PIL import Image

        Image.fromarray(fig_or_rgb).save(buffer, format="PNG")
    else:
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        FigureCanvasAgg(fig_or_rgb).print_png(buffer)
    return buffer.getvalue()


def write_elite_maps(
    archives: ArchiveSet | Mapping[str, MapData],
    folder: str | Path,
    generation: int | None = None,
) -> list[Path]:
    """One PNG per archive in `folder` (`<skill>.png`, or `<skill>-g000012.png` with a
    generation); returns their paths."""
    maps = maps_of(archives) if isinstance(archives, ArchiveSet) else dict(archives)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for skill, data in maps.items():
        suffix = f"-g{generation:06d}" if generation is not None else ""
        path = folder / f"{skill}{suffix}.png"
        path.write_bytes(to_png(render(data, generation)))
        written.append(path)
    return written

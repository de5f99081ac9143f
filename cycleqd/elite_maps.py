"""Elite maps: one heatmap per archive, as in the CycleQD paper's figures.

In the archive of skill k the cell of an elite is the tuple of its bins on the other skills
(the BC axes) and its colour is its quality (its score on k). Two BC axes give a 2-D grid;
one BC axis (K = 2 skills) gives a strip; more than two are projected onto the first two by
taking the best quality over the remaining axes. Empty cells are NaN and drawn blank.

PNGs (MLflow, `cycleqd run`) are drawn with matplotlib's Agg canvas on a bare `Figure` (no
pyplot, no global state, no display), so they run in any container. The Kubeflow UI's maps,
drawn by every commit task, are SVG written here without matplotlib: importing it cost
0.6 s of a task that does 0.1 s of work. `map_data` copies what a map needs out of a live
archive, so that a map can be drawn later (the tracker does, when MLflow answers) from the
archive as it was.
"""

from __future__ import annotations

import html
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
    return {name: map_data(archives[name]) for name in archives.names}


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


# matplotlib's viridis at 0, 1/32, ..., 1: linear interpolation between these is within 3/255
# of its 256-entry table (a test checks), so the SVG maps need no matplotlib.
_VIRIDIS = np.array(
    [
        (68, 1, 84), (71, 13, 96), (72, 24, 106), (72, 35, 116), (71, 45, 123), (69, 55, 129),
        (66, 64, 134), (62, 73, 137), (59, 82, 139), (55, 91, 141), (51, 99, 141),
        (47, 107, 142), (44, 114, 142), (41, 122, 142), (38, 130, 142), (35, 137, 142),
        (33, 145, 140), (31, 152, 139), (31, 160, 136), (34, 167, 133), (40, 174, 128),
        (50, 182, 122), (63, 188, 115), (78, 195, 107), (94, 201, 98), (112, 207, 87),
        (132, 212, 75), (152, 216, 62), (173, 220, 48), (194, 223, 35), (216, 226, 25),
        (236, 229, 27), (253, 231, 37),
    ],
    dtype=float,
)  # fmt: skip
_EMPTY = "#f2f2f2"  # empty cells, as in the PNGs


def viridis(x: float) -> tuple[int, int, int]:
    """The colour of x in [0, 1] (clipped)."""
    position = min(max(x, 0.0), 1.0) * (len(_VIRIDIS) - 1)
    lo = min(int(position), len(_VIRIDIS) - 2)
    mix = _VIRIDIS[lo] + (position - lo) * (_VIRIDIS[lo + 1] - _VIRIDIS[lo])
    return tuple(round(c) for c in mix.tolist())


def _hex(rgb: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def to_svg(
    data: MapData, generation: int | None = None, *, vmin: float = 0.0, vmax: float = 1.0
) -> str:
    """One archive's elite map as an SVG element: the same picture as `render` (first BC axis
    across, second up, best over the others), each elite's scores in its tooltip."""
    plane = project_2d(np.asarray(data.grid, dtype=float))
    nx, ny = plane.shape
    cell = max(4, min(24, 360 // max(nx, ny)))
    left, top, width, height = 64, 46, nx * cell, ny * cell
    bar_x = left + width + 16
    names = [html.escape(n) for n in data.bc_names] or [""]
    ranges = list(data.bc_ranges) or [(0.0, 1.0)]
    if len(ranges) < 2:
        ranges.append((0.0, 1.0))
    y_label = names[1] if len(names) > 1 else ""
    if len(names) > 2:
        y_label += f" (best over {', '.join(names[2:])})"
    when = f", generation {generation}" if generation is not None else ""
    best = f"{data.best:.3f}" if data.elites else "-"
    skill = html.escape(data.skill)
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{bar_x + 44}" '
        f'height="{top + height + 44}" font-family="sans-serif" font-size="11">',
        f'<text x="{left}" y="14" font-size="12">archive {skill}{when}</text>',
        f'<text x="{left}" y="30">{data.elites} elites, fill {100 * data.fill:.1f}%, '
        f"best {best}</text>",
        f'<rect x="{left}" y="{top}" width="{width}" height="{height}" fill="{_EMPTY}" '
        'stroke="#999"/>',
    ]
    (x_lo, x_hi), (y_lo, y_hi) = ranges[0], ranges[1]
    dx, dy = (x_hi - x_lo) / nx, (y_hi - y_lo) / ny
    span = (vmax - vmin) or 1.0
    for i, j in zip(*np.nonzero(np.isfinite(plane)), strict=True):
        quality = float(plane[i, j])
        where = f"{names[0]} {x_lo + i * dx:.3f}-{x_lo + (i + 1) * dx:.3f}"
        if len(data.bc_names) > 1:
            where += f", {names[1]} {y_lo + j * dy:.3f}-{y_lo + (j + 1) * dy:.3f}"
        out.append(
            f'<rect x="{left + i * cell}" y="{top + (ny - 1 - j) * cell}" width="{cell}" '
            f'height="{cell}" fill="{_hex(viridis((quality - vmin) / span))}">'
            f"<title>{where}: {skill} {quality:.3f}</title></rect>"
        )
    bottom = top + height
    out += [
        f'<text x="{left}" y="{bottom + 14}">{x_lo:g}</text>',
        f'<text x="{left + width}" y="{bottom + 14}" text-anchor="end">{x_hi:g}</text>',
        f'<text x="{left + width / 2}" y="{bottom + 32}" text-anchor="middle">{names[0]}</text>',
    ]
    if len(data.bc_names) > 1:
        out += [
            f'<text x="{left - 4}" y="{bottom}" text-anchor="end">{y_lo:g}</text>',
            f'<text x="{left - 4}" y="{top + 10}" text-anchor="end">{y_hi:g}</text>',
            f'<text transform="translate({left - 36},{top + height / 2}) rotate(-90)" '
            f'text-anchor="middle">{y_label}</text>',
        ]
    stops = "".join(
        f'<stop offset="{k / (len(_VIRIDIS) - 1):.4f}" stop-color="{_hex(tuple(map(int, c)))}"/>'
        for k, c in enumerate(_VIRIDIS)
    )
    gradient = f"quality-{skill}"
    out += [
        f'<defs><linearGradient id="{gradient}" x1="0" y1="1" x2="0" y2="0">{stops}'
        "</linearGradient></defs>",
        f'<rect x="{bar_x}" y="{top}" width="12" height="{height}" fill="url(#{gradient})"/>',
        f'<text x="{bar_x + 16}" y="{bottom}">{vmin:g}</text>',
        f'<text x="{bar_x + 16}" y="{top + 10}">{vmax:g}</text>',
        f'<text transform="translate({bar_x + 34},{top + height / 2}) rotate(90)" '
        f'text-anchor="middle">quality ({skill})</text>',
        "</svg>",
    ]
    return "\n".join(out)

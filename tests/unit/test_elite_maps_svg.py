"""The Kubeflow UI's elite maps: SVG drawn without matplotlib, the same picture as the PNGs."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import numpy as np
import pytest

from cycleqd.elite_maps import MapData, to_svg, viridis

SVG = "{http://www.w3.org/2000/svg}"


def test_viridis_matches_matplotlibs_table():
    import matplotlib

    table = matplotlib.colormaps["viridis"]
    for k in range(256):
        expected = np.round(np.array(table(k)[:3]) * 255)
        assert np.abs(np.array(viridis(k / 255)) - expected).max() <= 3, k
    assert viridis(-1.0) == viridis(0.0) and viridis(2.0) == viridis(1.0)


def _cells(svg: str) -> list[ET.Element]:
    root = ET.fromstring(svg)
    return [r for r in root.iter(f"{SVG}rect") if r.find(f"{SVG}title") is not None]


def test_every_elite_is_a_cell_in_its_place_with_its_colour_and_scores():
    grid = np.full((15, 10), np.nan)
    grid[0, 0], grid[14, 9], grid[3, 7] = 0.25, 1.0, 0.5
    svg = to_svg(MapData("coding", ("db", "os"), ((0.0, 0.75), (0.0, 0.5)), grid), 12)
    cells = _cells(svg)
    assert len(cells) == 3
    by_title = {c.find(f"{SVG}title").text: c for c in cells}
    low = by_title["db 0.000-0.050, os 0.000-0.050: coding 0.250"]
    high = by_title["db 0.700-0.750, os 0.450-0.500: coding 1.000"]
    assert low.get("fill") == "#{:02x}{:02x}{:02x}".format(*viridis(0.25))
    assert high.get("fill") == "#fde725"
    # First BC axis across, second up: the last bins are right of and above the first ones.
    assert float(high.get("x")) > float(low.get("x")) and float(high.get("y")) < float(low.get("y"))
    assert "archive coding, generation 12" in svg and "3 elites, fill 2.0%, best 1.000" in svg


@pytest.mark.parametrize("shape", [(6,), (4, 4, 3)])
def test_one_axis_is_a_strip_and_more_than_two_take_the_best(shape):
    grid = np.full(shape, np.nan)
    grid[(1,) * len(shape)] = 0.4
    if len(shape) == 3:
        grid[1, 1, 2] = 0.9  # same cell on the first two axes: the best one is drawn
    names = ("db", "os", "net")[: len(shape)]
    svg = to_svg(MapData("coding", names, ((0.0, 1.0),) * len(shape), grid))
    (cell,) = _cells(svg)
    assert cell.find(f"{SVG}title").text.endswith(f"coding {0.9 if len(shape) == 3 else 0.4}00")
    assert ("best over net" in svg) == (len(shape) == 3)


def test_an_empty_archive_draws_an_empty_grid():
    svg = to_svg(MapData("os", ("coding", "db"), ((0, 1), (0, 1)), np.full((5, 5), np.nan)))
    assert _cells(svg) == [] and "0 elites, fill 0.0%, best -" in svg

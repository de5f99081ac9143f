"""bin_index pinned to the CycleQD paper's binning.

Paper / official code: bins = linspace(lo, hi, n + 1); bin = digitize(x, bins, right=True) - 1,
clipped to [0, n - 1]. With right=True, digitize returns i such that bins[i-1] < x <= bins[i],
so a value lying exactly on an inner edge belongs to the LOWER bin.

Every expectation below is written out by hand; none is recomputed with numpy.
"""

from __future__ import annotations

import pytest

from cycleqd.archive import bin_index

# A grid whose edges are exact binary fractions: linspace(0, 1, 5) = 0, .25, .5, .75, 1


@pytest.mark.parametrize(
    ("x", "expected"),
    [
        (0.0, 0),  # x == lo: digitize gives 0 (x <= bins[0]); 0 - 1 = -1, clipped to 0
        (0.1, 0),  # 0 < 0.1 <= 0.25 -> i = 1 -> bin 0
        (0.25, 0),  # exactly on the first inner edge -> lower bin
        (0.2500001, 1),  # just above it -> next bin
        (0.5, 1),  # on the middle edge -> lower bin (1, not 2)
        (0.5000001, 2),
        (0.75, 2),  # on the last inner edge -> lower bin
        (0.9, 3),
        (1.0, 3),  # x == hi: i = 4 -> bin 3 = n - 1
        (-0.3, 0),  # below lo: clipped to 0
        (-1e9, 0),
        (1.0000001, 3),  # above hi: digitize gives 5 -> 4, clipped to n - 1 = 3
        (42.0, 3),
    ],
)
def test_four_bins_on_unit_interval(x: float, expected: int) -> None:
    assert bin_index(x, 0.0, 1.0, 4) == expected


def test_returns_a_python_int() -> None:
    assert type(bin_index(0.3, 0.0, 1.0, 4)) is int


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_values_cannot_be_binned(value: float) -> None:
    # digitize would put them in an edge bin silently; a non-finite score is a bug upstream.
    with pytest.raises(ValueError, match="non-finite"):
        bin_index(value, 0.0, 1.0, 4)


def test_shifted_range() -> None:
    # linspace(2, 4, 5) = 2, 2.5, 3, 3.5, 4
    assert bin_index(2.0, 2.0, 4.0, 4) == 0
    assert bin_index(2.5, 2.0, 4.0, 4) == 0
    assert bin_index(2.6, 2.0, 4.0, 4) == 1
    assert bin_index(3.0, 2.0, 4.0, 4) == 1
    assert bin_index(3.9, 2.0, 4.0, 4) == 3
    assert bin_index(1.0, 2.0, 4.0, 4) == 0
    assert bin_index(5.0, 2.0, 4.0, 4) == 3


def test_single_bin_takes_everything() -> None:
    for x in (-1.0, 0.0, 0.5, 1.0, 2.0):
        assert bin_index(x, 0.0, 1.0, 1) == 0


# Paper default for coding (MBPP+): range [0, 0.75], 15 bins, width 0.75 / 15 = 0.05.
# Edges 0, .05, .10, ..., .75; bin k covers (0.05 k, 0.05 (k+1)] (bin 0 also holds x <= 0).
@pytest.mark.parametrize(
    ("x", "expected"),
    [
        (0.0, 0),
        (0.03, 0),
        (0.05, 0),  # on edge 1 -> lower bin
        (0.0500001, 1),  # just above edge 1
        (0.1, 1),  # on edge 2 -> bin 1
        (0.12, 2),  # 0.12 / 0.05 = 2.4 -> bin 2
        (0.35, 6),  # on edge 7 -> bin 6
        (0.376, 7),  # 7.52 -> bin 7
        (0.5, 9),  # on edge 10 -> bin 9
        (0.7, 13),  # on edge 14 -> bin 13
        (0.7000001, 14),
        (0.75, 14),  # == hi -> 14
        (0.764, 14),  # above hi -> clipped to 14
        (1.0, 14),
        (-0.01, 0),
    ],
)
def test_paper_coding_bins(x: float, expected: int) -> None:
    assert bin_index(x, 0.0, 0.75, 15) == expected


@pytest.mark.parametrize("k", range(1, 16))
def test_paper_coding_every_edge_goes_to_the_lower_bin(k: int) -> None:
    # edge k is k / 20 (= 0.05 k) and closes bin k - 1; a hair above it opens bin k
    # (clipped to 14 at the top edge).
    assert bin_index(k / 20, 0.0, 0.75, 15) == k - 1
    assert bin_index(k / 20 + 1e-7, 0.0, 0.75, 15) == min(k, 14)


# Paper default for DB and OS (AgentBench): range [0, 0.45], 15 bins, width 0.03.
@pytest.mark.parametrize(
    ("x", "expected"),
    [
        (0.0, 0),
        (0.03, 0),  # on edge 1
        (0.0300001, 1),
        (0.2, 6),  # 0.2 / 0.03 = 6.67 -> bin 6
        (0.21, 6),  # on edge 7 -> bin 6
        (0.2100001, 7),
        (0.3, 9),  # on edge 10 -> bin 9
        (0.31, 10),  # 10.33 -> bin 10
        (0.42, 13),  # on edge 14 -> bin 13
        (0.43, 14),
        (0.45, 14),
        (0.5, 14),  # above the range: clipped
        (-0.2, 0),
    ],
)
def test_paper_agentbench_bins(x: float, expected: int) -> None:
    assert bin_index(x, 0.0, 0.45, 15) == expected


@pytest.mark.parametrize("k", range(1, 16))
def test_paper_agentbench_every_edge_goes_to_the_lower_bin(k: int) -> None:
    # edge k is 0.03 k, written as a two-decimal literal (as a score k * 3 / 100 would be)
    edge = round(0.03 * k, 2)
    assert bin_index(edge, 0.0, 0.45, 15) == k - 1
    assert bin_index(edge + 1e-7, 0.0, 0.45, 15) == min(k, 14)

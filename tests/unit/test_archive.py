"""Archive and ArchiveSet pinned to CycleQD's MAP-Elites rules (paper section 3).

In the archive of skill k the quality is the score on k and the cell is the tuple of the bins
of the scores on every OTHER skill, in config order. A candidate enters a cell when it is empty
or when the candidate is strictly better; ties keep the incumbent.

Bins used below (see test_binning.py): coding [0, 0.75] width 0.05; db, os [0, 0.45] width 0.03.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from cycleqd.archive import Archive, ArchiveError, ArchiveSet, Elite
from cycleqd.config import SkillConfig

CODING = SkillConfig(name="coding", bc_min=0.0, bc_max=0.75, bins=15)
DB = SkillConfig(name="db", bc_min=0.0, bc_max=0.45, bins=15)
OS = SkillConfig(name="os", bc_min=0.0, bc_max=0.45, bins=15)

# coding 0.12 -> 0.12 / 0.05 = 2.4 -> bin 2
# db 0.20     -> 0.20 / 0.03 = 6.67 -> bin 6
# os 0.31     -> 0.31 / 0.03 = 10.33 -> bin 10
G1 = {"coding": 0.12, "db": 0.20, "os": 0.31}


def paper_set() -> ArchiveSet:
    return ArchiveSet([CODING, DB, OS])


def test_cell_is_the_other_skills_bins_in_config_order() -> None:
    archives = paper_set()
    assert [s.name for s in archives["coding"].bc_skills] == ["db", "os"]
    assert [s.name for s in archives["db"].bc_skills] == ["coding", "os"]
    assert [s.name for s in archives["os"].bc_skills] == ["coding", "db"]
    assert archives["coding"].cell_of(G1) == (6, 10)  # (db bin, os bin)
    assert archives["db"].cell_of(G1) == (2, 10)  # (coding bin, os bin)
    assert archives["os"].cell_of(G1) == (2, 6)  # (coding bin, db bin)


def test_config_order_not_alphabetical_order_fixes_the_axes() -> None:
    archives = ArchiveSet([OS, CODING, DB])
    assert archives.skill_names == ["os", "coding", "db"]
    assert archives["coding"].cell_of(G1) == (10, 6)  # (os bin, db bin)
    assert archives["db"].cell_of(G1) == (10, 2)  # (os bin, coding bin)
    assert archives["os"].cell_of(G1) == (2, 6)  # (coding bin, db bin)


def test_first_candidate_enters_every_empty_archive_with_its_quality() -> None:
    archives = paper_set()
    assert archives.offer("g1", G1) == ["coding", "db", "os"]
    assert archives["coding"].cells[(6, 10)] == Elite("g1", 0.12, G1, 0)
    assert archives["db"].cells[(2, 10)].quality == 0.20
    assert archives["os"].cells[(2, 6)].quality == 0.31
    assert archives.genome_ids() == {"g1"}


def test_strictly_better_replaces_equal_keeps_incumbent() -> None:
    archives = paper_set()
    archives.offer("g1", G1)
    # coding 0.13 is still bin 2 (2.6): same cells everywhere. Better on coding only; equal on
    # db and os, so the incumbent g1 stays there.
    assert archives.offer("g2", {"coding": 0.13, "db": 0.20, "os": 0.31}) == ["coding"]
    assert archives["coding"].cells[(6, 10)].genome_id == "g2"
    assert archives["db"].cells[(2, 10)].genome_id == "g1"
    assert archives["os"].cells[(2, 6)].genome_id == "g1"
    # an exact copy of g1's scores enters nowhere (ties keep the incumbent)
    assert archives.offer("g3", dict(G1)) == []
    # worse everywhere, same cells (coding 0.11 -> 2.2, db 0.19 -> 6.33, os 0.305 -> 10.17;
    # note os 0.30 would sit on edge 10 and fall into bin 9, a new cell): nowhere
    assert archives.offer("g4", {"coding": 0.11, "db": 0.19, "os": 0.305}) == []
    assert archives.genome_ids() == {"g1", "g2"}


def test_worse_candidate_enters_a_new_cell() -> None:
    archives = paper_set()
    archives.offer("g1", G1)
    # db 0.25 -> bin 8 (8.33). coding archive: cell (8, 10) new. db archive: same cell (2, 10),
    # 0.25 > 0.20 wins. os archive: cell (2, 8) new although os quality is equal.
    assert archives.offer("g5", {"coding": 0.12, "db": 0.25, "os": 0.31}) == [
        "coding",
        "db",
        "os",
    ]
    assert set(archives["coding"].cells) == {(6, 10), (8, 10)}
    assert set(archives["db"].cells) == {(2, 10)}
    assert archives["db"].cells[(2, 10)].genome_id == "g5"
    assert set(archives["os"].cells) == {(2, 6), (2, 8)}
    # a much worse model in an empty corner still enters where its cell is new
    # coding 0.0 -> bin 0, db 0.0 -> 0, os 0.44 -> 14
    assert archives.offer("g6", {"coding": 0.0, "db": 0.0, "os": 0.44}) == ["coding", "db", "os"]


def test_archive_offer_returns_bool() -> None:
    archive = Archive("coding", [DB, OS])
    assert archive.offer("a", G1) is True
    assert archive.offer("b", G1) is False
    assert archive.offer("c", {**G1, "coding": 0.5}) is True
    assert archive.cells[(6, 10)] == Elite("c", 0.5, {**G1, "coding": 0.5}, 0)


def test_stored_scores_are_a_float_copy() -> None:
    archives = paper_set()
    scores = {"coding": np.float32(0.5), "db": 0.0, "os": 0.0, "extra": 1}
    archives.offer("g", scores)
    scores["coding"] = 0.9
    elite = archives["coding"].cells[(0, 0)]
    assert elite.quality == pytest.approx(0.5)
    assert type(elite.quality) is float
    assert elite.scores["coding"] == pytest.approx(0.5)
    assert all(type(v) is float for v in elite.scores.values())


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("skill", ["coding", "db", "os"])
def test_non_finite_scores_enter_nowhere(bad: float, skill: str) -> None:
    archives = paper_set()
    archives.offer("g1", G1)
    before = archives.to_dict()
    # +inf on the quality skill would beat every incumbent; NaN/inf on a BC skill would be
    # silently binned into an edge cell. All must be rejected outright.
    assert archives.offer("bad", {**G1, skill: bad}) == []
    assert archives.to_dict() == before
    fresh = paper_set()
    assert fresh.offer("bad", {**G1, skill: bad}) == []
    assert all(not fresh[s].cells for s in fresh.skill_names)


def test_missing_skill_raises_and_names_it() -> None:
    archives = paper_set()
    with pytest.raises(ValueError, match=r"g9.*'os'"):
        archives.offer("g9", {"coding": 0.1, "db": 0.1})
    assert all(not archives[s].cells for s in archives.skill_names)
    with pytest.raises(KeyError):
        Archive("coding", [DB, OS]).offer("g9", {"coding": 0.1, "db": 0.1})


def _accepted(archive: Archive, gid: str, scores: dict[str, float]) -> bool:
    """Rejection may be signalled by False or by ValueError; either is fine."""
    try:
        return archive.offer(gid, scores)
    except ValueError:
        return False


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_single_archive_rejects_non_finite_quality(bad: float) -> None:
    archive = Archive("coding", [DB, OS])
    archive.offer("g1", {**G1, "db": 0.0})  # cell (0, 10)
    assert not _accepted(archive, "bad", {**G1, "coding": bad})  # empty cell (6, 10)
    assert not _accepted(archive, "bad2", {**G1, "db": 0.0, "coding": bad})  # over g1
    assert {e.genome_id for e in archive.cells.values()} == {"g1"}


def test_single_archive_rejects_non_finite_bc() -> None:
    archive = Archive("coding", [DB, OS])
    assert not _accepted(archive, "bad", {**G1, "db": math.nan})
    assert archive.cells == {}


def test_to_dict_layout_and_round_trip_through_json() -> None:
    archives = paper_set()
    archives.offer("g1", G1)
    archives.offer("g5", {"coding": 0.12, "db": 0.25, "os": 0.31})
    archives["coding"].cells[(6, 10)].sampled = 3
    data = archives.to_dict()
    assert list(data) == ["coding", "db", "os"]
    # entries are sorted by cell: (6, 10) < (8, 10)
    assert data["coding"] == [
        {"cell": [6, 10], "genome_id": "g1", "quality": 0.12, "scores": G1, "sampled": 3},
        {
            "cell": [8, 10],
            "genome_id": "g5",
            "quality": 0.12,
            "scores": {"coding": 0.12, "db": 0.25, "os": 0.31},
            "sampled": 0,
        },
    ]
    restored = paper_set()
    restored.load_dict(json.loads(json.dumps(data)))
    assert restored == archives
    assert set(restored["coding"].cells) == {(6, 10), (8, 10)}  # tuple keys again
    assert restored["coding"].cells[(6, 10)].sampled == 3
    assert restored["os"].cells[(2, 8)].genome_id == "g5"
    # the restored set behaves like the original: a tie still keeps the incumbent
    assert restored.offer("g3", dict(G1)) == []
    assert restored != paper_set()


def test_fill_is_occupied_over_all_cells() -> None:
    archives = paper_set()
    assert archives["coding"].fill() == 0.0
    archives.offer("g1", G1)
    archives.offer("g5", {"coding": 0.12, "db": 0.25, "os": 0.31})
    assert archives["coding"].fill() == pytest.approx(2 / 225)  # 15 x 15 cells
    assert archives["db"].fill() == pytest.approx(1 / 225)
    small = ArchiveSet(
        [
            SkillConfig(name="a", bins=4),
            SkillConfig(name="b", bins=3),
            SkillConfig(name="c", bins=2),
        ]
    )
    # archive a has 3 x 2 = 6 cells, archive c has 4 x 3 = 12
    small.offer("x", {"a": 0.1, "b": 0.1, "c": 0.1})
    small.offer("y", {"a": 0.1, "b": 0.9, "c": 0.1})
    small.offer("z", {"a": 0.1, "b": 0.9, "c": 0.9})
    assert small["a"].fill() == pytest.approx(3 / 6)
    assert small["c"].fill() == pytest.approx(2 / 12)


def test_grid_has_the_bc_shape_and_nan_where_empty() -> None:
    skills = [
        SkillConfig(name="a", bins=4),
        SkillConfig(name="b", bins=3),
        SkillConfig(name="c", bins=2),
    ]
    archives = ArchiveSet(skills)
    # b 0.5 -> bin 1 of 3 (1.5), c 0.9 -> bin 1 of 2
    archives.offer("x", {"a": 0.7, "b": 0.5, "c": 0.9})
    grid = archives["a"].grid()
    assert grid.shape == (3, 2)
    expected = np.array([[np.nan, np.nan], [np.nan, 0.7], [np.nan, np.nan]])
    np.testing.assert_array_equal(grid, expected)
    # archive c: axes (a: 4 bins, b: 3 bins); a 0.7 -> bin 2 (2.8)
    grid_c = archives["c"].grid()
    assert grid_c.shape == (4, 3)
    assert grid_c[2, 1] == 0.9
    assert int(np.isnan(grid_c).sum()) == 11


def _two_skill_archive() -> Archive:
    return Archive("a", [SkillConfig(name="b", bins=4)])


def test_best_is_the_highest_quality() -> None:
    archive = _two_skill_archive()
    archive.offer("low", {"a": 0.2, "b": 0.1})
    archive.offer("high", {"a": 0.9, "b": 0.6})
    archive.offer("mid", {"a": 0.5, "b": 0.9})
    assert archive.best().genome_id == "high"


@pytest.mark.parametrize("order", [("p", "q", "r"), ("r", "q", "p"), ("q", "r", "p")])
def test_best_ties_go_to_the_lowest_cell_whatever_the_insertion_order(
    order: tuple[str, ...],
) -> None:
    # p -> cell (3,), q -> cell (1,), r -> cell (2,); all quality 0.8; lowest cell is q's.
    scores = {
        "p": {"a": 0.8, "b": 0.9},
        "q": {"a": 0.8, "b": 0.4},
        "r": {"a": 0.8, "b": 0.6},
    }
    archive = _two_skill_archive()
    for gid in order:
        archive.offer(gid, scores[gid])
    assert archive.best().genome_id == "q"
    archive.offer("s", {"a": 0.1, "b": 0.0})  # worse, cell (0,) is lower but loses on quality
    assert archive.best().genome_id == "q"


# -- without the cycle: one archive, quality the mean of the skills ---------------------------


def mean_set() -> ArchiveSet:
    return ArchiveSet([CODING, DB, OS], objective="mean")


def test_without_the_cycle_one_archive_scores_the_mean_over_every_skills_bins() -> None:
    archives = mean_set()
    assert archives.names == ["mean"] and archives.skill_names == ["coding", "db", "os"]
    assert [s.name for s in archives["mean"].bc_skills] == ["coding", "db", "os"]
    assert archives["mean"].cell_of(G1) == (2, 6, 10)
    assert archives.offer("g1", G1) == ["mean"]
    assert archives["mean"].cells[(2, 6, 10)].quality == pytest.approx((0.12 + 0.20 + 0.31) / 3)
    # Better on the mean in the same cell replaces; better on one skill alone does not.
    assert archives.offer("g2", {"coding": 0.11, "db": 0.20, "os": 0.32}) == []
    assert archives.offer("g3", {"coding": 0.13, "db": 0.20, "os": 0.31}) == ["mean"]
    assert archives["mean"].cells[(2, 6, 10)].genome_id == "g3"
    assert [archives.bred_for(g) for g in range(3)] == ["mean"] * 3
    assert [paper_set().bred_for(g) for g in range(4)] == ["coding", "db", "os", "coding"]


def test_without_the_cycle_archives_round_trip_and_refuse_a_forged_quality() -> None:
    archives = mean_set()
    archives.offer("g1", G1)
    data = json.loads(json.dumps(archives.to_dict()))
    assert list(data) == ["mean"]
    again = mean_set()
    again.load_dict(data)
    assert again == archives
    data["mean"][0]["quality"] = 0.12  # coding's score, not the mean
    with pytest.raises(ArchiveError, match="quality is not its 'mean' score"):
        mean_set().load_dict(data)
    # A cycle's snapshot does not load into a campaign without the cycle, and back.
    with pytest.raises(ArchiveError, match="this campaign's archives are \\['mean'\\]"):
        mean_set().load_dict(paper_set().to_dict())
    with pytest.raises(ArchiveError, match="archives are named \\['mean'\\]"):
        paper_set().load_dict(archives.to_dict())

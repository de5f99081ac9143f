"""Parent selection pinned to CycleQD's elite sampling (paper section 3).

Per elite, the unnormalised weight is the product over its quality and every BC coordinate of
    a_lo + norm(v) * (a_hi - a_lo)        (paper; a_lo = 0.5, a_hi = 0.8)
    a_lo + norm(v) * a_hi                 (official code)
where norm is min-max normalisation over the archive's elites (all equal -> factor 1) and the BC
coordinates are the elite's cell indices. Probabilities are the weights over their sum.
"""

from __future__ import annotations

import numpy as np
import pytest

from cycleqd.archive import ArchiveSet, sample_parents, sampling_probabilities
from cycleqd.config import SkillConfig
from cycleqd.sampling import EliteOptions, UniformOptions

CODING = SkillConfig(name="coding", bc_min=0.0, bc_max=0.75, bins=15)
DB = SkillConfig(name="db", bc_min=0.0, bc_max=0.45, bins=15)
OS = SkillConfig(name="os", bc_min=0.0, bc_max=0.45, bins=15)

PAPER = EliteOptions()  # elite, paper formula, a_lo 0.5, a_hi 0.8
OFFICIAL = EliteOptions(formula="official")
UNIFORM = UniformOptions()

# Three elites of the coding archive (cell = (db bin, os bin), bin width 0.03):
#   A: coding 0.2, db 0.01 -> 0,  os 0.31 -> 10   cell (0, 10)
#   B: coding 0.6, db 0.19 -> 6,  os 0.02 -> 0    cell (6, 0)
#   C: coding 0.4, db 0.37 -> 12, os 0.16 -> 5    cell (12, 5)
# Sorted cells: A, B, C. Each elite is in a different cell in every archive, so all three
# enter all archives.
ELITES = {
    "A": {"coding": 0.2, "db": 0.01, "os": 0.31},
    "B": {"coding": 0.6, "db": 0.19, "os": 0.02},
    "C": {"coding": 0.4, "db": 0.37, "os": 0.16},
}

# Paper formula, 0.5 + 0.3 * norm:
#   quality 0.2, 0.6, 0.4  -> norm 0, 1, 0.5 -> 0.5, 0.8, 0.65
#   db cell 0, 6, 12       -> norm 0, .5, 1  -> 0.5, 0.65, 0.8
#   os cell 10, 0, 5       -> norm 1, 0, .5  -> 0.8, 0.5, 0.65
#   A = 0.5 * 0.5 * 0.8 = 0.2;  B = 0.8 * 0.65 * 0.5 = 0.26;  C = 0.65 * 0.8 * 0.65 = 0.338
#   sum 0.798
PAPER_P = [0.2 / 0.798, 0.26 / 0.798, 0.338 / 0.798]  # 0.25063, 0.32581, 0.42356
# Official formula, 0.5 + 0.8 * norm: norm 0 -> 0.5, 0.5 -> 0.9, 1 -> 1.3
#   A = 0.5 * 0.5 * 1.3 = 0.325;  B = 1.3 * 0.9 * 0.5 = 0.585;  C = 0.9 * 1.3 * 0.9 = 1.053
#   sum 1.963
OFFICIAL_P = [0.325 / 1.963, 0.585 / 1.963, 1.053 / 1.963]


def three_elites() -> ArchiveSet:
    archives = ArchiveSet([CODING, DB, OS])
    for gid, scores in ELITES.items():
        assert archives.offer(gid, scores) == ["coding", "db", "os"]
    return archives


def test_paper_formula_hand_computed() -> None:
    archive = three_elites()["coding"]
    cells, probs = sampling_probabilities(archive, PAPER)
    assert cells == [(0, 10), (6, 0), (12, 5)]
    assert [archive.cells[c].genome_id for c in cells] == ["A", "B", "C"]
    np.testing.assert_allclose(probs, PAPER_P, rtol=1e-12)
    np.testing.assert_allclose(probs, [0.2506266, 0.3258145, 0.4235589], atol=1e-7)
    assert probs.sum() == pytest.approx(1.0, abs=1e-12)


def test_official_formula_hand_computed() -> None:
    _, probs = sampling_probabilities(three_elites()["coding"], OFFICIAL)
    np.testing.assert_allclose(probs, OFFICIAL_P, rtol=1e-12)
    assert probs.sum() == pytest.approx(1.0, abs=1e-12)


def test_custom_bounds_enter_the_formula() -> None:
    # a_lo 0.1, a_hi 0.9 (paper): 0.1 + 0.8 * norm -> 0 -> 0.1, 0.5 -> 0.5, 1 -> 0.9
    #   A = 0.1 * 0.1 * 0.9 = 0.009;  B = 0.9 * 0.5 * 0.1 = 0.045;  C = 0.5 * 0.9 * 0.5 = 0.225
    #   sum 0.279
    _, probs = sampling_probabilities(three_elites()["coding"], EliteOptions(a_lo=0.1, a_hi=0.9))
    np.testing.assert_allclose(probs, [0.009 / 0.279, 0.045 / 0.279, 0.225 / 0.279], rtol=1e-12)


def test_other_archive_uses_its_own_quality_and_axes() -> None:
    # db archive: quality = db score 0.01, 0.19, 0.37 -> norm 0, .5, 1 -> 0.5, 0.65, 0.8
    # cell = (coding bin, os bin). coding 0.2, 0.6, 0.4 lie exactly on edges 4, 12, 8, so they
    # fall into the lower bins 3, 11, 7: cells A (3, 10), B (11, 0), C (7, 5); sorted A, C, B.
    # coding axis 3, 11, 7 -> norm 0, 1, .5 -> 0.5, 0.8, 0.65
    # os axis 10, 0, 5     -> norm 1, 0, .5 -> 0.8, 0.5, 0.65
    # A = 0.5 * 0.5 * 0.8 = 0.2; B = 0.65 * 0.8 * 0.5 = 0.26; C = 0.8 * 0.65 * 0.65 = 0.338
    archive = three_elites()["db"]
    cells, probs = sampling_probabilities(archive, PAPER)
    assert cells == [(3, 10), (7, 5), (11, 0)]
    assert [archive.cells[c].genome_id for c in cells] == ["A", "C", "B"]
    np.testing.assert_allclose(probs, [0.2 / 0.798, 0.338 / 0.798, 0.26 / 0.798], rtol=1e-12)


def test_all_equal_values_give_factor_one() -> None:
    # equal qualities (factor 1) and equal os bins (factor 1); db cells 0, 6, 12 -> 0.5, .65, .8
    archives = ArchiveSet([CODING, DB, OS])
    archives.offer("x", {"coding": 0.3, "db": 0.01, "os": 0.16})
    archives.offer("y", {"coding": 0.3, "db": 0.19, "os": 0.16})
    archives.offer("z", {"coding": 0.3, "db": 0.37, "os": 0.16})
    _, probs = sampling_probabilities(archives["coding"], PAPER)
    np.testing.assert_allclose(probs, [0.5 / 1.95, 0.65 / 1.95, 0.8 / 1.95], rtol=1e-12)


def test_single_elite_has_probability_one() -> None:
    archives = ArchiveSet([CODING, DB, OS])
    archives.offer("solo", ELITES["A"])
    for sampling in (PAPER, OFFICIAL, UNIFORM):
        cells, probs = sampling_probabilities(archives["coding"], sampling)
        assert cells == [(0, 10)]
        np.testing.assert_array_equal(probs, [1.0])


def test_uniform_ignores_quality_and_cells() -> None:
    _, probs = sampling_probabilities(three_elites()["coding"], UNIFORM)
    np.testing.assert_allclose(probs, [1 / 3, 1 / 3, 1 / 3], rtol=1e-15)


def test_empty_archive_has_no_probabilities() -> None:
    cells, probs = sampling_probabilities(ArchiveSet([CODING, DB, OS])["coding"], PAPER)
    assert cells == []
    assert probs.shape == (0,)


def test_sample_parents_returns_two_distinct_known_ids_and_counts_samples() -> None:
    archives = three_elites()
    rng = np.random.default_rng(0)
    for _ in range(200):
        first, second = sample_parents(archives, "coding", PAPER, rng)
        assert first != second
        assert {first, second} <= {"A", "B", "C"}
    assert sum(e.sampled for e in archives["coding"].cells.values()) == 400
    # other archives' counters are untouched
    assert all(e.sampled == 0 for e in archives["db"].cells.values())


def test_sample_parents_is_reproducible_for_a_seed() -> None:
    def draws(seed: int) -> list[tuple[str, str]]:
        archives = three_elites()
        rng = np.random.default_rng(seed)
        return [sample_parents(archives, "coding", PAPER, rng) for _ in range(50)]

    assert draws(123) == draws(123)
    assert draws(123) != draws(124)


def test_sample_parents_follows_the_probabilities() -> None:
    # The first parent is drawn with p; the second with p renormalised over the others
    # (sequential draw without replacement). Hence, with hand-computed p:
    #   P(first = i) = p_i
    #   P({i, j}) = p_i p_j / (1 - p_i) + p_j p_i / (1 - p_j)
    p = dict(zip("ABC", PAPER_P, strict=True))
    n = 20000
    archives = three_elites()
    rng = np.random.default_rng(2024)
    first_counts = dict.fromkeys("ABC", 0)
    pair_counts: dict[frozenset[str], int] = {}
    for _ in range(n):
        a, b = sample_parents(archives, "coding", PAPER, rng)
        first_counts[a] += 1
        pair = frozenset((a, b))
        pair_counts[pair] = pair_counts.get(pair, 0) + 1

    # chi-square with 2 degrees of freedom; 13.8 is the 0.1% critical value
    chi2 = sum((first_counts[k] - n * p[k]) ** 2 / (n * p[k]) for k in "ABC")
    assert chi2 < 13.8, (first_counts, chi2)

    pair_p = {
        frozenset((i, j)): p[i] * p[j] / (1 - p[i]) + p[j] * p[i] / (1 - p[j])
        for i, j in (("A", "B"), ("A", "C"), ("B", "C"))
    }
    assert sum(pair_p.values()) == pytest.approx(1.0)
    chi2_pairs = sum((pair_counts.get(k, 0) - n * v) ** 2 / (n * v) for k, v in pair_p.items())
    assert chi2_pairs < 13.8, (pair_counts, chi2_pairs)

    # and it is not uniform: C (p 0.42) is drawn first clearly more often than A (p 0.25)
    assert first_counts["C"] > first_counts["A"] * 1.4


def test_single_elite_archive_borrows_its_second_parent_uniformly() -> None:
    a = SkillConfig(name="a", bins=15)
    b = SkillConfig(name="b", bins=15)
    archives = ArchiveSet([a, b])
    # archive a's cell is the bin of b: all three have b = 0.5 -> bin 7 (7.5): one cell,
    # kept by "x" (quality 0.5; y 0.4 and z 0.1 are worse).
    # archive b's cell is the bin of a: 0.5 -> 7, 0.4 -> on edge 6 -> 5, 0.1 -> 1: three cells.
    assert archives.offer("x", {"a": 0.5, "b": 0.5}) == ["a", "b"]
    assert archives.offer("y", {"a": 0.4, "b": 0.5}) == ["b"]
    assert archives.offer("z", {"a": 0.1, "b": 0.5}) == ["b"]
    assert len(archives["a"].cells) == 1

    rng = np.random.default_rng(5)
    seconds = {"y": 0, "z": 0}
    for _ in range(2000):
        first, second = sample_parents(archives, "a", PAPER, rng)
        assert first == "x"
        seconds[second] += 1
    assert archives["a"].cells[(7,)].sampled == 2000
    # uniform over {y, z}: 1000 expected each, sd ~ 22
    assert 900 < seconds["y"] < 1100, seconds


def test_single_model_everywhere_is_an_error() -> None:
    archives = ArchiveSet([SkillConfig(name="a"), SkillConfig(name="b")])
    archives.offer("only", {"a": 0.5, "b": 0.5})
    with pytest.raises(ValueError, match="two distinct parents"):
        sample_parents(archives, "a", PAPER, np.random.default_rng(0))


def test_empty_archive_is_an_error() -> None:
    archives = ArchiveSet([CODING, DB, OS])
    with pytest.raises(ValueError, match=r"'coding' is empty"):
        sample_parents(archives, "coding", PAPER, np.random.default_rng(0))


def test_one_model_in_every_archive_borrows_an_expert_as_second_parent() -> None:
    """Experts that all score alike share every cell: only the first one is archived; the
    second parent then comes from the fallback (the experts), never the same model twice."""
    archives = ArchiveSet([CODING, DB, OS])
    for genome in ("A", "B", "C"):
        archives.offer(genome, {"coding": 0.0, "db": 0.0, "os": 0.0})
    assert archives.genome_ids() == {"A"}
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="one single model"):
        sample_parents(archives, "coding", PAPER, rng)
    pairs = {sample_parents(archives, "coding", PAPER, rng, ("A", "B", "C")) for _ in range(50)}
    assert pairs == {("A", "B"), ("A", "C")}

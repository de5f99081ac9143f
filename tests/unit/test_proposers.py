"""Proposers: the config's options for every child (`fixed`), or the official code's CMA-ES
per skill (`cma_es`): its config and its errors, its inputs and fitness pinned by hand, that
it learns from what it is told, and that a resumed campaign proposes exactly what an
uninterrupted one does (its state is the replayable fitness history in each snapshot)."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from cycleqd import probe_world
from cycleqd.archive import ArchiveSet
from cycleqd.campaign import Campaign, breed
from cycleqd.config import parse_config
from cycleqd.errors import ConfigError
from cycleqd.genome import GenomeBook
from cycleqd.proposers import (
    PROPOSERS,
    CmaEsOptions,
    cell_inputs,
    fitness,
    tuned_options,
)
from cycleqd.state import CampaignStore


def _config(world, **overrides):
    return parse_config({**probe_world.default_config(world, generations=6), **overrides})


CMA = {"kind": "cma_es", "popsize": 4}


def test_cma_es_options_and_their_errors(tiny_world, monkeypatch):
    config = _config(tiny_world, population=2, proposer=CMA)
    assert config.proposer == CmaEsOptions(popsize=4)
    assert _config(tiny_world).proposer.kind == "fixed"  # the paper's, by default
    with pytest.raises(ConfigError, match="popsize 4 is not a multiple of population 3"):
        _config(tiny_world, population=3, proposer=CMA)
    with pytest.raises(ConfigError, match=r"proposer.sigma: .*greater than 0"):
        _config(tiny_world, proposer={"kind": "cma_es", "sigma": 0})
    monkeypatch.setitem(sys.modules, "cma", None)  # as where `cma` is not installed
    with pytest.raises(ConfigError, match=r"`cma` package is not installed: pip install"):
        _config(tiny_world, proposer=CMA)


def test_inputs_and_fitness_are_the_official_codes(tiny_world):
    """Pinned by hand: 3 skills, 15 bins on [0, 1]; archive probe_a's cells are the bins of
    (probe_b, probe_c)."""
    config = _config(tiny_world)
    archive = ArchiveSet.for_config(config)["probe_a"]
    assert [s.bins for s in archive.bc_skills] == [15, 15]
    p1 = {"probe_a": 0.9, "probe_b": 0.25, "probe_c": 0.71}  # cell (3, 10): 3.75, 10.65
    p2 = {"probe_a": 0.1, "probe_b": 0.99, "probe_c": 0.0}  # cell (14, 0)
    assert cell_inputs(archive, [p1, p2]).tolist() == [3 / 15, 10 / 15, 14 / 15, 0.0]
    assert cell_inputs(archive, [p1, None]).tolist() == [3 / 15, 10 / 15, 0.0, 0.0]
    assert fitness(archive, p1) == pytest.approx(3 / 15 + 10 / 15 + 0.9)


def test_tuned_options_keep_a_standard_deviation_positive(tiny_world):
    config = _config(tiny_world)
    tuned = tuned_options(config.crossover, ("mu", "sigma"), [0.3, -0.02])
    assert (tuned.mu, tuned.sigma) == (0.3, 0.02)


def test_cma_es_proposes_from_the_parents_cells_and_learns(tiny_world):
    options = CmaEsOptions(popsize=4)
    proposer = PROPOSERS["cma_es"]
    inputs = np.array([0.2, 0.7, 0.9, 0.0])
    first = [proposer.propose(options, [], slot, inputs, 3) for slot in range(4)]
    assert all(v.shape == (3,) for v in first)
    assert not np.array_equal(first[0], first[1])  # one candidate per slot
    # Started at 0 with step size 0.01: small values, as the official code starts.
    assert np.abs(np.concatenate(first)).max() < 0.1
    assert np.array_equal(proposer.propose(options, [], 0, inputs, 3), first[0])  # replayed
    # Mid-batch, the batch's candidates stay those asked; after a full batch, new ones.
    assert np.array_equal(proposer.propose(options, [1.0, 0.5], 2, inputs, 3), first[2])
    told = proposer.propose(options, [1.0, 0.5, 0.2, 0.9], 0, inputs, 3)
    assert not np.array_equal(told, first[0])
    assert proposer.batch_slot(options, [1.0] * 6) == 2
    assert PROPOSERS["fixed"].propose(PROPOSERS["fixed"].options(), [], 0, inputs, 3) is None


def test_children_take_the_proposed_options(tiny_world):
    """With CMA-ES a child's merge weights and mutation scale are drawn with the proposed
    crossover and mutation options; with `fixed`, with the config's."""
    fixed = _config(tiny_world, population=2)
    cma = _config(tiny_world, population=2, proposer=CMA)
    book, archives = _seeded(tiny_world, fixed)
    plain = breed(fixed, book, archives, 1)
    tuned = breed(cma, book, archives, 1, {})
    assert [g.parents for g in plain] == [g.parents for g in tuned]  # sampling is untouched
    assert [g.mutation.scale for g in plain] == [fixed.mutation.rate] * 2
    assert all(g.mutation.scale != fixed.mutation.rate for g in tuned)
    assert [g.weights for g in plain] != [g.weights for g in tuned]


def _seeded(world, config):
    from cycleqd.genome import Genome

    book, archives = GenomeBook(), ArchiveSet.for_config(config)
    book.add(Genome(kind="base", source=str(world["base"])))
    rng = np.random.default_rng(0)
    for skill, folder in world["experts"].items():
        gid = book.add(Genome(kind="expert", source=str(folder), skill=skill))
        archives.offer(gid, {s: float(rng.random()) for s in config.skill_names})
    return book, archives


def test_a_resumed_cma_es_campaign_equals_an_uninterrupted_one(tiny_world, tmp_path):
    evaluator = probe_world.ProbeEvaluator(tiny_world["experts"])

    def run(store, generations):
        config = _config(tiny_world, population=2, generations=generations, proposer=CMA)
        with Campaign(config, CampaignStore(store), evaluator) as campaign:
            campaign.run()
            return campaign.learned, campaign.archives, campaign.book.to_list()

    whole = run(tmp_path / "whole", 8)
    run(tmp_path / "part", 3)
    resumed = run(tmp_path / "part", 8)
    assert resumed == whole
    learned = whole[0]
    assert sum(len(v) for v in learned.values()) == 16  # every child told, per skill
    snapshot = CampaignStore(tmp_path / "whole").read_snapshot(8)
    assert snapshot["learned"] == learned  # plain JSON: no pickled strategy in the store

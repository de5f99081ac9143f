"""Contract tests over every registered variant of the search's interchangeable parts
(`cycleqd.variants`): a variant added to a registry is tested here without a line of test
code. Each variant's own behaviour is pinned in its family's tests (test_operators.py,
test_sampling.py, test_genome.py, tests/integration/test_campaign.py)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import cycleqd.mutations
from cycleqd.archive import ArchiveSet
from cycleqd.config import VARIANT_FAMILIES, SkillConfig, parse_config
from cycleqd.crossovers import CROSSOVERS
from cycleqd.errors import ConfigError
from cycleqd.final_methods import FINAL_METHODS
from cycleqd.genome import Genome, GenomeBook
from cycleqd.materialize import Materializer
from cycleqd.mutations import MUTATIONS
from cycleqd.sampling import SAMPLING
from cycleqd.weights import SafetensorsFolder

MINIMAL = {
    "name": "variants",
    "skills": [{"name": "probe_a"}, {"name": "probe_b"}],
    "models": {"base": "/m/base", "experts": {"probe_a": "/m/a", "probe_b": "/m/b"}},
    "evaluation": {"scorer": "probe"},
}
EVERY_VARIANT = [(family, name) for family, r in VARIANT_FAMILIES.items() for name in r]


def _config(**entries) -> dict:
    return {**copy.deepcopy(MINIMAL), **entries}


@pytest.mark.parametrize(("family", "name"), EVERY_VARIANT)
def test_a_variant_named_in_the_config_gets_its_own_options(family: str, name: str) -> None:
    registry = VARIANT_FAMILIES[family]
    config = parse_config(_config(**{family: {registry.tag: name}}))
    options = getattr(config, family)
    assert type(options) is registry.options_of(name)
    assert getattr(options, registry.tag) == name
    # What the store keeps validates again to the same config.
    assert parse_config(config.model_dump(mode="json")) == config


def _foreign_options() -> list[tuple[str, str, str, str]]:
    """(family, variant, other variant, an option of the other that the variant lacks)."""
    cases = []
    for family, registry in VARIANT_FAMILIES.items():
        for name in registry:
            own = set(registry.options_of(name).model_fields)
            foreign = [
                (other, field)
                for other in registry
                for field in registry.options_of(other).model_fields
                if field not in own
            ]
            cases += [(family, name, *foreign[0])] if foreign else []
    return cases


@pytest.mark.parametrize(("family", "name", "other", "field"), _foreign_options())
def test_another_variants_option_is_an_error_that_says_whose(
    family: str, name: str, other: str, field: str
) -> None:
    registry = VARIANT_FAMILIES[family]
    with pytest.raises(ConfigError) as info:
        parse_config(_config(**{family: {registry.tag: name, field: 1}}))
    message = str(info.value)
    assert f"{family}.{field}: unknown field for {registry.tag} {name!r}" in message
    assert f"{other}: " in message  # names the variant that takes it


@pytest.mark.parametrize("family", VARIANT_FAMILIES)
def test_an_unknown_variant_lists_every_registered_one(family: str) -> None:
    registry = VARIANT_FAMILIES[family]
    with pytest.raises(ConfigError) as info:
        parse_config(_config(**{family: {registry.tag: "no-such-variant"}}))
    message = str(info.value)
    assert f"{family}.{registry.tag}: got 'no-such-variant'" in message
    for name in registry:
        assert repr(name) in message


# ------------------------------------------------------------------ mutations


def _book(world: dict) -> tuple[GenomeBook, dict[str, str]]:
    book = GenomeBook()
    book.add(Genome(kind="base", source=world["base"]))
    experts = {
        skill: book.add(Genome(kind="expert", source=folder, skill=skill))
        for skill, folder in sorted(world["experts"].items())
    }
    return book, experts


def _resolver(world: dict, book: GenomeBook):
    folders = {gid: book[gid].source for gid, genome in book.items() if genome.source}
    return lambda gid: SafetensorsFolder(folders[gid]) if gid in folders else None


@pytest.mark.parametrize("kind", list(MUTATIONS))
def test_every_mutation_round_trips_and_builds_the_same_weights_both_ways(
    kind: str, tiny_world: dict, monkeypatch
) -> None:
    """The record survives the store; the compact recipe (when the mutation keeps one) and
    the full build from the parents give the same weights; a rebuild gives the same bits."""
    book, experts = _book(tiny_world)
    first, second, *_ = experts.values()
    registry = cycleqd.mutations.MUTATIONS  # looked up here: a test may register more
    mutation = registry[kind].recipe(registry.options_of(kind)(), seed=1234, expert=first)
    child = Genome(kind="child", parents=(first, second), weights=(0.6, 0.4), mutation=mutation)
    assert Genome.from_dict(child.to_dict()) == child
    gid = book.add(child)
    resolve = _resolver(tiny_world, book)
    compact = book.linear_form(gid)
    built = dict(Materializer(book, resolve).tensors(gid))
    assert all(torch.isfinite(t).all() for t in built.values() if t.is_floating_point())
    assert built.keys() == set(SafetensorsFolder(tiny_world["base"]).names())
    rebuilt = dict(Materializer(book, resolve).tensors(gid))
    assert all(torch.equal(built[n], rebuilt[n]) for n in built)
    if compact is None:
        return  # no compact recipe: built from the parents above
    original = book.linear_form
    monkeypatch.setattr(book, "linear_form", lambda g: None if g == gid else original(g))
    from_parents = dict(Materializer(book, resolve).tensors(gid))
    for name, tensor in built.items():
        torch.testing.assert_close(from_parents[name], tensor, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", list(MUTATIONS))
def test_every_mutation_draws_only_from_its_seed(kind: str) -> None:
    options = MUTATIONS.options_of(kind)()
    a = MUTATIONS[kind].recipe(options, seed=7, expert="e")
    assert a == MUTATIONS[kind].recipe(options, seed=7, expert="e")
    assert a.kind == kind and a.seed == 7


# ------------------------------------------------------------------ crossover, sampling, final

SKILLS = [SkillConfig(name=n, bins=5) for n in ("a", "b", "c")]
ELITES = {
    "g1": {"a": 0.9, "b": 0.1, "c": 0.2},
    "g2": {"a": 0.3, "b": 0.8, "c": 0.1},
    "g3": {"a": 0.2, "b": 0.3, "c": 0.7},
    "g4": {"a": 0.6, "b": 0.5, "c": 0.5},
}


def _archives() -> ArchiveSet:
    archives = ArchiveSet(SKILLS)
    for gid, scores in ELITES.items():
        archives.offer(gid, scores)
    return archives


@pytest.mark.parametrize("method", list(CROSSOVERS))
def test_every_crossover_gives_one_finite_weight_per_parent_from_its_stream(method: str) -> None:
    options = CROSSOVERS.options_of(method)()
    for parents in (2, 3):
        weights = CROSSOVERS[method].weights(options, np.random.default_rng(5), parents)
        assert len(weights) == parents and all(np.isfinite(weights))
        assert weights == CROSSOVERS[method].weights(options, np.random.default_rng(5), parents)


@pytest.mark.parametrize("method", list(SAMPLING))
def test_every_sampling_is_a_distribution_over_the_archives_cells(method: str) -> None:
    options = SAMPLING.options_of(method)()
    for skill in ("a", "b", "c"):
        archive = _archives()[skill]
        cells, probs = SAMPLING[method].probabilities(archive, options)
        assert cells == sorted(archive.cells)
        assert len(probs) == len(cells) and (probs >= 0).all()
        assert probs.sum() == pytest.approx(1.0)
    cells, probs = SAMPLING[method].probabilities(ArchiveSet(SKILLS)["a"], options)
    assert cells == [] and len(probs) == 0


@pytest.mark.parametrize("method", list(FINAL_METHODS))
def test_every_final_method_merges_elites_of_the_archives(method: str) -> None:
    archives = _archives()
    genome = FINAL_METHODS[method].genome(archives, FINAL_METHODS.options_of(method)())
    assert genome.kind == "final"
    assert set(genome.parents) <= archives.genome_ids()
    assert sum(genome.weights) == pytest.approx(1.0)
    assert Genome.from_dict(genome.to_dict()) == genome

"""Genomes (recipes with content ids) and GenomeBook.linear_form.

Crossover is linear in the parents' task vectors, so a child of parents with linear forms
L_p and merge weights w_p has form sum_p w_p L_p (plus its own mutation term). The paper's SVD
mutation decomposes the child's own task vector, which leaves the experts' span: no form.
"""

from __future__ import annotations

import hashlib
import json

import pytest

from cycleqd.errors import CycleQDError, GenomeError
from cycleqd.genome import Genome, GenomeBook, LinearForm, Mutation

EXPERT_CODING = Genome(kind="expert", source="s3://bucket/experts/coding", skill="coding")
# canonical JSON (sorted keys, no spaces) of EXPERT_CODING.to_dict(), written out by hand:
EXPERT_CODING_JSON = (
    '{"generation":null,"kind":"expert","mutation":null,"parents":[],"skill":"coding",'
    '"source":"s3://bucket/experts/coding","weights":[]}'
)
CHILD = Genome(
    kind="child",
    parents=("aaaa", "bbbb"),
    weights=(0.25, 0.75),
    mutation=Mutation(kind="gaussian", seed=7, scale=0.001),
    skill="db",
    generation=3,
)
CHILD_JSON = (
    '{"generation":3,"kind":"child","mutation":{"expert":null,"kind":"gaussian","scale":0.001,'
    '"seed":7},"parents":["aaaa","bbbb"],"skill":"db","source":null,"weights":[0.25,0.75]}'
)


# ---------------------------------------------------------------- content id


def test_id_is_sha256_of_the_canonical_json_first_16_hex() -> None:
    assert EXPERT_CODING.id == hashlib.sha256(EXPERT_CODING_JSON.encode()).hexdigest()[:16]
    assert EXPERT_CODING.id == "eb6993f41e0317e5"
    assert CHILD.id == hashlib.sha256(CHILD_JSON.encode()).hexdigest()[:16]
    assert CHILD.id == "94e9f8a84987303a"


def test_id_is_stable_across_equal_instances() -> None:
    again = Genome(kind="expert", source="s3://bucket/experts/coding", skill="coding")
    assert again.id == EXPERT_CODING.id
    # int and float merge weights are the same recipe
    assert Genome(kind="child", parents=("p",), weights=(1,)).id == (
        Genome(kind="child", parents=("p",), weights=(1.0,)).id
    )


@pytest.mark.parametrize(
    "changed",
    [
        Genome(kind="final", parents=("aaaa", "bbbb"), weights=(0.25, 0.75),
               mutation=Mutation(kind="gaussian", seed=7, scale=0.001), skill="db",
               generation=3),
        Genome(kind="child", parents=("bbbb", "aaaa"), weights=(0.25, 0.75),
               mutation=Mutation(kind="gaussian", seed=7, scale=0.001), skill="db",
               generation=3),
        Genome(kind="child", parents=("aaaa", "cccc"), weights=(0.25, 0.75),
               mutation=Mutation(kind="gaussian", seed=7, scale=0.001), skill="db",
               generation=3),
        Genome(kind="child", parents=("aaaa", "bbbb"), weights=(0.75, 0.25),
               mutation=Mutation(kind="gaussian", seed=7, scale=0.001), skill="db",
               generation=3),
        Genome(kind="child", parents=("aaaa", "bbbb"), weights=(0.25, 0.7500001),
               mutation=Mutation(kind="gaussian", seed=7, scale=0.001), skill="db",
               generation=3),
        Genome(kind="child", parents=("aaaa", "bbbb"), weights=(0.25, 0.75),
               mutation=None, skill="db", generation=3),
        Genome(kind="child", parents=("aaaa", "bbbb"), weights=(0.25, 0.75),
               mutation=Mutation(kind="svd", seed=7, scale=0.001), skill="db",
               generation=3),
        Genome(kind="child", parents=("aaaa", "bbbb"), weights=(0.25, 0.75),
               mutation=Mutation(kind="gaussian", seed=8, scale=0.001), skill="db",
               generation=3),
        Genome(kind="child", parents=("aaaa", "bbbb"), weights=(0.25, 0.75),
               mutation=Mutation(kind="gaussian", seed=7, scale=0.002), skill="db",
               generation=3),
        Genome(kind="child", parents=("aaaa", "bbbb"), weights=(0.25, 0.75),
               mutation=Mutation(kind="gaussian", seed=7, scale=0.001, expert="e"),
               skill="db", generation=3),
        Genome(kind="child", parents=("aaaa", "bbbb"), weights=(0.25, 0.75),
               mutation=Mutation(kind="gaussian", seed=7, scale=0.001), skill="os",
               generation=3),
        Genome(kind="child", parents=("aaaa", "bbbb"), weights=(0.25, 0.75),
               mutation=Mutation(kind="gaussian", seed=7, scale=0.001), skill=None,
               generation=3),
        Genome(kind="child", parents=("aaaa", "bbbb"), weights=(0.25, 0.75),
               mutation=Mutation(kind="gaussian", seed=7, scale=0.001), skill="db",
               generation=4),
        Genome(kind="child", parents=("aaaa", "bbbb"), weights=(0.25, 0.75),
               mutation=Mutation(kind="gaussian", seed=7, scale=0.001), skill="db",
               generation=3, source="somewhere"),
    ],
    ids=[
        "kind", "parent-order", "parent", "weights-swapped", "weight-epsilon", "no-mutation",
        "mutation-kind", "mutation-seed", "mutation-scale", "mutation-expert", "skill",
        "skill-none", "generation", "source",
    ],
)  # fmt: skip
def test_id_changes_with_every_field(changed: Genome) -> None:
    assert changed.id != CHILD.id


def test_expert_id_changes_with_source_and_skill() -> None:
    assert Genome(kind="expert", source="s3://bucket/experts/db", skill="coding").id != (
        EXPERT_CODING.id
    )
    assert Genome(kind="expert", source="s3://bucket/experts/coding", skill="db").id != (
        EXPERT_CODING.id
    )
    assert Genome(kind="base", source="s3://bucket/experts/coding").id != EXPERT_CODING.id


# ---------------------------------------------------------------- records


def test_to_dict_layout() -> None:
    assert CHILD.to_dict() == {
        "kind": "child",
        "parents": ["aaaa", "bbbb"],
        "weights": [0.25, 0.75],
        "mutation": {"kind": "gaussian", "seed": 7, "scale": 0.001, "expert": None},
        "source": None,
        "skill": "db",
        "generation": 3,
    }


@pytest.mark.parametrize("genome", [EXPERT_CODING, CHILD], ids=["expert", "child"])
def test_round_trip_through_json(genome: Genome) -> None:
    restored = Genome.from_dict(json.loads(json.dumps(genome.to_dict())))
    assert restored == genome
    assert restored.id == genome.id


def test_malformed_records_raise_genome_error() -> None:
    with pytest.raises(GenomeError, match="malformed"):
        Genome.from_dict({"parents": []})  # no kind
    with pytest.raises(GenomeError, match="malformed"):
        Genome.from_dict({"kind": "child", "parents": ["a"], "weights": ["x"]})
    with pytest.raises(GenomeError, match="malformed"):
        Genome.from_dict(
            {"kind": "child", "parents": ["a"], "weights": [1.0], "mutation": {"kindd": "svd"}}
        )


def test_invalid_genomes_raise() -> None:
    with pytest.raises(GenomeError, match="source"):
        Genome(kind="expert", skill="coding")
    with pytest.raises(GenomeError, match="source"):
        Genome(kind="base", source="x", parents=("p",), weights=(1.0,))
    with pytest.raises(GenomeError, match="2 parents and 1 weights"):
        Genome(kind="child", parents=("a", "b"), weights=(1.0,))
    with pytest.raises(GenomeError):
        Genome(kind="child")
    assert issubclass(GenomeError, CycleQDError)


# ---------------------------------------------------------------- GenomeBook


def _book() -> tuple[GenomeBook, str, str, str, str]:
    book = GenomeBook()
    base = book.add(Genome(kind="base", source="s3://b/base"))
    e1 = book.add(Genome(kind="expert", source="s3://b/e1", skill="coding"))
    e2 = book.add(Genome(kind="expert", source="s3://b/e2", skill="db"))
    e3 = book.add(Genome(kind="expert", source="s3://b/e3", skill="os"))
    return book, base, e1, e2, e3


def _child(parents: tuple[str, ...], weights: tuple[float, ...], mutation=None) -> Genome:
    return Genome(kind="child", parents=parents, weights=weights, mutation=mutation)


def test_base_and_expert_forms_and_lookups() -> None:
    book, base, e1, e2, e3 = _book()
    assert book.linear_form(base) == LinearForm()
    assert book.linear_form(e1) == LinearForm({e1: 1.0})
    assert book.base_id() == base
    assert book.expert_ids() == {"coding": e1, "db": e2, "os": e3}
    assert len(book) == 4
    assert e2 in book
    assert book[e2].skill == "db"


def test_child_of_two_experts() -> None:
    book, _, e1, e2, _ = _book()
    child = book.add(_child((e1, e2), (0.3, 0.7)))
    form = book.linear_form(child)
    assert form is not None
    assert form.coeffs == pytest.approx({e1: 0.3, e2: 0.7})
    assert form.svd_terms == []
    assert form.noise_terms == []


def test_grandchildren_compose_linearly() -> None:
    book, _, e1, e2, e3 = _book()
    c1 = book.add(_child((e1, e2), (0.3, 0.7)))  # 0.3 e1 + 0.7 e2
    c2 = book.add(_child((e1, e3), (0.5, 0.5)))  # 0.5 e1 + 0.5 e3
    # g1 = 0.6 c1 + 0.4 e3 = 0.18 e1 + 0.42 e2 + 0.4 e3
    g1 = book.add(_child((c1, e3), (0.6, 0.4)))
    assert book.linear_form(g1).coeffs == pytest.approx({e1: 0.18, e2: 0.42, e3: 0.4})
    # g2 = 0.25 c1 + 0.75 c2 = (0.075 + 0.375) e1 + 0.175 e2 + 0.375 e3
    g2 = book.add(_child((c1, c2), (0.25, 0.75)))
    assert book.linear_form(g2).coeffs == pytest.approx({e1: 0.45, e2: 0.175, e3: 0.375})
    # great-grandchild = 0.5 g1 + 0.5 g2 = 0.315 e1 + 0.2975 e2 + 0.3875 e3
    gg = book.add(_child((g1, g2), (0.5, 0.5)))
    assert book.linear_form(gg).coeffs == pytest.approx({e1: 0.315, e2: 0.2975, e3: 0.3875})
    # merging with the base contributes nothing (its task vector is zero)
    book_base = book.base_id()
    with_base = book.add(_child((c1, book_base), (0.5, 0.5)))
    assert book.linear_form(with_base).coeffs == pytest.approx({e1: 0.15, e2: 0.35})


def test_mutations_add_terms_that_scale_with_descendants() -> None:
    book, _, e1, e2, e3 = _book()
    svd_e = Mutation(kind="svd_expert", seed=11, scale=0.1, expert=e1)
    gauss = Mutation(kind="gaussian", seed=22, scale=0.001)
    c1 = book.add(_child((e1, e2), (0.3, 0.7), svd_e))
    c2 = book.add(_child((e2, e3), (0.4, 0.6), gauss))
    f1 = book.linear_form(c1)
    assert f1.coeffs == pytest.approx({e1: 0.3, e2: 0.7})
    assert f1.svd_terms == [(e1, 11, 0.1, 1.0)]
    assert f1.noise_terms == []
    f2 = book.linear_form(c2)
    assert f2.svd_terms == []
    assert f2.noise_terms == [(22, 0.001, 1.0)]
    # g = 0.25 c1 + 0.75 c2, mutated again by Gaussian seed 33
    g = book.add(_child((c1, c2), (0.25, 0.75), Mutation(kind="gaussian", seed=33, scale=0.002)))
    form = book.linear_form(g)
    # e1: 0.25*0.3 = 0.075; e2: 0.25*0.7 + 0.75*0.4 = 0.475; e3: 0.75*0.6 = 0.45
    assert form.coeffs == pytest.approx({e1: 0.075, e2: 0.475, e3: 0.45})
    assert form.svd_terms == [(e1, 11, 0.1, pytest.approx(0.25))]
    assert form.noise_terms == [(22, 0.001, pytest.approx(0.75)), (33, 0.002, 1.0)]
    # the parents' cached forms were not modified by composing them
    assert book.linear_form(c1).svd_terms == [(e1, 11, 0.1, 1.0)]
    assert book.linear_form(c2).noise_terms == [(22, 0.001, 1.0)]
    assert book.linear_form(c1).coeffs == pytest.approx({e1: 0.3, e2: 0.7})


def test_none_mutation_adds_nothing() -> None:
    book, _, e1, e2, _ = _book()
    c = book.add(_child((e1, e2), (0.5, 0.5), Mutation(kind="none")))
    form = book.linear_form(c)
    assert form == LinearForm({e1: 0.5, e2: 0.5})


def test_paper_svd_mutation_has_no_linear_form_nor_do_descendants() -> None:
    book, _, e1, e2, e3 = _book()
    svd = book.add(_child((e1, e2), (0.5, 0.5), Mutation(kind="svd", seed=1, scale=1.5)))
    assert book.linear_form(svd) is None
    plain = book.add(_child((e2, e3), (0.5, 0.5)))
    child = book.add(_child((plain, svd), (0.5, 0.5)))
    assert book.linear_form(child) is None
    grandchild = book.add(_child((e1, child), (0.9, 0.1)))
    assert book.linear_form(grandchild) is None
    # an unrelated lineage keeps its form
    assert book.linear_form(plain) == LinearForm({e2: 0.5, e3: 0.5})


def test_unknown_parent_raises() -> None:
    book, _, e1, _, _ = _book()
    with pytest.raises(GenomeError, match="unknown parent deadbeef"):
        book.add(_child((e1, "deadbeef"), (0.5, 0.5)))
    with pytest.raises(GenomeError, match="unknown genome"):
        book["deadbeef"]


def test_ancestors_nearest_first_each_once() -> None:
    book, _, e1, e2, e3 = _book()
    c1 = book.add(_child((e1, e2), (0.3, 0.7)))
    c2 = book.add(_child((e1, e3), (0.5, 0.5)))
    g = book.add(_child((c1, c2), (0.5, 0.5)))
    assert book.ancestors(g) == [c1, c2, e1, e2, e3]
    assert book.ancestors(e1) == []


def test_to_list_load_list_round_trip() -> None:
    book, _, e1, e2, _ = _book()
    c1 = book.add(_child((e1, e2), (0.3, 0.7), Mutation(kind="gaussian", seed=2, scale=0.01)))
    records = json.loads(json.dumps(book.to_list()))
    assert [r["id"] for r in records] == list(dict(book.items()))
    restored = GenomeBook()
    restored.load_list(records)
    assert dict(restored.items()) == dict(book.items())
    assert restored.linear_form(c1) == book.linear_form(c1)


def test_load_list_detects_an_edited_record() -> None:
    book, _, e1, e2, _ = _book()
    book.add(_child((e1, e2), (0.3, 0.7)))
    records = json.loads(json.dumps(book.to_list()))
    records[-1]["weights"] = [0.7, 0.3]  # edited by hand, id left as it was
    with pytest.raises(GenomeError, match="does not match its content"):
        GenomeBook().load_list(records)


def test_load_list_requires_parents_first() -> None:
    book, _, e1, e2, _ = _book()
    book.add(_child((e1, e2), (0.3, 0.7)))
    records = list(reversed(book.to_list()))
    with pytest.raises(GenomeError, match="unknown parent"):
        GenomeBook().load_list(records)


@pytest.mark.parametrize(
    ("kind", "mutation"),
    [("chlid", None), ("child", {"kind": "svdd", "seed": 1, "scale": 1.5})],
    ids=["genome-kind", "mutation-kind"],
)
def test_unknown_kinds_are_rejected(kind: str, mutation: dict | None) -> None:
    book, _, e1, e2, _ = _book()
    record = {"kind": kind, "parents": [e1, e2], "weights": [0.5, 0.5], "mutation": mutation}
    with pytest.raises(GenomeError):
        book.load_list([record])

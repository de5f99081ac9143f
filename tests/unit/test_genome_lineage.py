"""What keeps long campaigns bounded: pruning the genome book, merging inherited terms."""

from __future__ import annotations

import pytest

from cycleqd.genome import Genome, GenomeBook, Mutation


def _book() -> tuple[GenomeBook, str, str, str]:
    book = GenomeBook()
    base = book.add(Genome(kind="base", source="/m/base"))
    e1 = book.add(Genome(kind="expert", source="/m/e1", skill="a"))
    e2 = book.add(Genome(kind="expert", source="/m/e2", skill="b"))
    return book, base, e1, e2


def _child(parents: tuple[str, str], seed: int, generation: int) -> Genome:
    return Genome(
        kind="child",
        parents=parents,
        weights=(0.5, 0.5),
        mutation=Mutation(kind="svd_expert", seed=seed, scale=0.1, expert="expert-a"),
        generation=generation,
    )


def test_pruned_keeps_sources_kept_genomes_and_their_ancestors_in_order() -> None:
    book, base, e1, e2 = _book()
    c1 = book.add(_child((e1, e2), 1, 1))
    dead = book.add(_child((e2, e1), 2, 2))
    c3 = book.add(_child((c1, e2), 3, 3))
    form = book.linear_form(c3)
    pruned = book.pruned({c3})
    assert [g for g, _ in pruned.items()] == [base, e1, e2, c1, c3]
    assert dead not in pruned
    assert pruned.linear_form(c3) == form  # the cached form travels along
    # A book loaded from the pruned records computes the same forms.
    again = GenomeBook()
    again.load_list(pruned.to_list())
    assert again.linear_form(c3) == form


def test_a_mutation_inherited_along_two_paths_is_one_term() -> None:
    """A diamond: both parents descend from the same mutated child. Its term must appear once
    with the summed coefficient; once per path, forms grow exponentially with depth."""
    book, _, e1, e2 = _book()
    top = book.add(_child((e1, e2), 7, 1))
    left = book.add(_child((top, e1), 8, 2))
    right = book.add(_child((top, e2), 9, 2))
    bottom = book.add(_child((left, right), 10, 3))
    terms = book.linear_form(bottom).svd_terms
    assert [t[1] for t in terms] == [7, 8, 9, 10]
    # top reaches bottom through left (0.5 * 0.5) and right (0.5 * 0.5).
    assert terms[0][3] == pytest.approx(0.5)
    # A long chain of such diamonds stays linear in the number of mutated ancestors.
    a, b = left, right
    for depth in range(20):
        a, b = (
            book.add(_child((a, b), 100 + depth, 4 + depth)),
            book.add(_child((b, a), 200 + depth, 4 + depth)),
        )
    assert len(book.linear_form(a).svd_terms) <= len(book)

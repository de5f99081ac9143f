"""Each mutation's record: what its config options become in a child's genome. The tensor
arithmetic is pinned in test_operators.py and tests/integration/test_campaign.py; the
contract every mutation keeps, in test_variants.py."""

from __future__ import annotations

import pytest

from cycleqd.errors import GenomeError
from cycleqd.genome import Mutation
from cycleqd.mutations import MUTATIONS


@pytest.mark.parametrize(
    ("options", "scale", "expert"),
    [
        ({"kind": "svd", "w_max": 1.2}, 1.2, None),
        ({"kind": "svd_expert", "rate": 0.3}, 0.3, "expert-id"),
        ({"kind": "gaussian", "sigma": 0.002}, 0.002, None),
        ({"kind": "none"}, 0.0, None),
    ],
)
def test_the_record_keeps_the_parameter_of_its_kind(options, scale, expert) -> None:
    method = MUTATIONS[options["kind"]]
    record = method.recipe(method.options(**options), seed=11, expert="expert-id")
    assert record == Mutation(kind=options["kind"], seed=11, scale=scale, expert=expert)


def test_an_svd_expert_record_must_name_its_expert() -> None:
    with pytest.raises(GenomeError, match="must name the expert"):
        Mutation(kind="svd_expert", seed=1, scale=0.1)


def test_an_unknown_kind_read_back_lists_the_kinds() -> None:
    with pytest.raises(GenomeError, match=r"unknown mutation kind 'dropout'.*'svd_expert'"):
        Mutation(kind="dropout")

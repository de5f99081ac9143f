"""docs/adding_a_variant.md stays true: its worked example (a DARE mutation and its test) runs
here against a copy of the mutation registry, and keeps the contract of every mutation."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import TypeAdapter, ValidationError

import cycleqd.mutations
from cycleqd.mutations import MUTATIONS

from . import test_variants as contract

DOC = Path(__file__).resolve().parents[2] / "docs" / "adding_a_variant.md"


@pytest.fixture
def with_dare(monkeypatch) -> dict:
    """The doc's class registered in a copy of MUTATIONS, which the engine then uses."""
    variant_code, test_code = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    registry = MUTATIONS.copy()
    monkeypatch.setattr(cycleqd.mutations, "MUTATIONS", registry)
    namespace = {**vars(cycleqd.mutations), "MUTATIONS": registry, "__name__": "doc_example"}
    for code in (variant_code, test_code):  # as in a module of their own: no inherited flags
        exec(compile(code, str(DOC), "exec", dont_inherit=True), namespace)
    return namespace


def test_the_worked_example_registers_a_mutation_with_its_own_options(with_dare) -> None:
    registry = cycleqd.mutations.MUTATIONS
    assert "dare" in registry and "dare" not in MUTATIONS  # the product's registry is untouched
    field = TypeAdapter(registry.config_type())
    assert field.validate_python({"kind": "dare", "p": 0.5}) == with_dare["DareOptions"](p=0.5)
    with pytest.raises(ValidationError, match="rate"):
        field.validate_python({"kind": "dare", "rate": 0.3})


def test_the_worked_examples_own_test_passes(with_dare) -> None:
    with_dare["test_dare_keeps_about_one_entry_in_ten_rescaled"]()


def test_the_worked_example_keeps_the_mutation_contract(with_dare, tiny_world, monkeypatch):
    contract.test_every_mutation_round_trips_and_builds_the_same_weights_both_ways(
        "dare", tiny_world, monkeypatch
    )

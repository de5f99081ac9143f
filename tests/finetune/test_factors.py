"""Task vector factors: exact low-rank factors of LoRA deltas, stored once, read lazily."""

from __future__ import annotations

import pytest
import torch

from cycleqd.finetune.factors import (
    FACTORS_FILE,
    FactorsNotFoundError,
    full_factors,
    load_task_vector_factors,
    lora_factors,
    write_factors,
)
from cycleqd.objectstore import LocalObjectStore, publish_model


@pytest.mark.parametrize(
    ("out", "cols", "rank"), [(64, 176, 8), (176, 64, 8), (32, 64, 4), (6, 5, 8), (48, 48, 1)]
)
def test_lora_factors_are_the_svd_of_scale_b_a(out, cols, rank):
    gen = torch.Generator().manual_seed(out * 1000 + cols + rank)
    a = torch.randn(rank, cols, generator=gen)
    b = torch.randn(out, rank, generator=gen)
    u, s, vh = lora_factors(a, b, scale=2.5)
    k = min(rank, out, cols)
    assert (u.shape, s.shape, vh.shape) == ((out, k), (k,), (k, cols))
    delta = 2.5 * b.double() @ a.double()
    assert torch.allclose((u.double() * s.double()) @ vh.double(), delta, atol=1e-5, rtol=1e-5)
    # A proper SVD: orthonormal columns / rows, singular values sorted, non-negative.
    eye = torch.eye(k)
    assert torch.allclose(u.T @ u, eye, atol=1e-5) and torch.allclose(vh @ vh.T, eye, atol=1e-5)
    assert torch.all(s[:-1] >= s[1:]) and torch.all(s >= 0)
    full = torch.linalg.svdvals(delta)
    assert torch.allclose(s.double(), full[:k], atol=1e-5, rtol=1e-5)


def test_zero_b_gives_zero_singular_values():
    u, s, vh = lora_factors(torch.randn(4, 10), torch.zeros(12, 4), scale=1.0)
    assert torch.count_nonzero(s) == 0 and torch.count_nonzero((u * s) @ vh) == 0


def test_full_factors_reproduce_and_truncate():
    delta = torch.randn(20, 30)
    u, s, vh = full_factors(delta)
    assert torch.allclose((u * s) @ vh, delta, atol=1e-5)
    u, s, vh = full_factors(delta, rank=3)
    assert (u.shape, s.shape, vh.shape) == ((20, 3), (3,), (3, 30))


def test_stored_factors_round_trip_through_a_store(tmp_path):
    deltas = {
        "layer.0.q_proj.weight": torch.randn(8, 6),
        "layer.1.q_proj.weight": torch.randn(8, 6),
    }
    plan = {name: ((8, 6), 6) for name in deltas}
    path = tmp_path / "out" / FACTORS_FILE
    write_factors(path, plan, lambda name: full_factors(deltas[name]), kind="full")
    (tmp_path / "out" / "config.json").write_text("{}")
    store = LocalObjectStore(tmp_path / "store")
    publish_model(
        store,
        "experts/x",
        {FACTORS_FILE: path, "config.json": tmp_path / "out" / "config.json"},
    )
    factors = load_task_vector_factors(store, "experts/x")
    assert sorted(factors) == sorted(deltas) and len(factors) == 2
    assert factors.kind == "full" and factors.metadata["rank"] == "6"
    for name, delta in deltas.items():
        assert torch.allclose(factors.delta(name), delta, atol=1e-5)
    with pytest.raises(KeyError):
        factors["missing.weight"]
    # By URI too.
    assert sorted(load_task_vector_factors(store.uri, "experts/x")) == sorted(deltas)


def test_missing_or_unpublished_factors_are_reported(tmp_path):
    store = LocalObjectStore(tmp_path)
    with pytest.raises(FactorsNotFoundError, match="no published expert there"):
        load_task_vector_factors(store, "experts/none")
    (tmp_path / "config.json").write_text("{}")
    publish_model(store, "experts/old", {"config.json": tmp_path / "config.json"})
    with pytest.raises(FactorsNotFoundError, match="published without task vector factors"):
        load_task_vector_factors(store, "experts/old")

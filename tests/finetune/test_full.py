"""Full fine-tuning: every weight trains, and the stored factors are the task vector's SVD."""

from __future__ import annotations

import pytest
import torch

from cycleqd.finetune import load_task_vector_factors, run_finetune
from cycleqd.objectstore import LocalObjectStore, read_manifest
from cycleqd.weights import SafetensorsFolder


@pytest.fixture(scope="module")
def full_expert(tmp_path_factory, lora_config):
    store = LocalObjectStore(tmp_path_factory.mktemp("full"))
    config = lora_config(store.root, method="full", learning_rate=2e-3, max_steps=20)
    del config["lora"]
    return store, run_finetune(config)


def test_full_fine_tuning_learns_and_changes_every_weight(full_expert, base_dir):
    store, result = full_expert
    print(f"\nfull fine-tuning, held-out: base {result.base_eval}\n  expert {result.expert_eval}")
    assert result.expert_eval["loss"] < result.base_eval["loss"] / 2
    base = SafetensorsFolder(base_dir)
    expert = SafetensorsFolder(store.root / result.expert.prefix)
    assert all(not torch.equal(base.get(n), expert.get(n)) for n in base.names())
    manifest = read_manifest(store, result.expert.prefix)
    assert manifest["method"] == "full" and "lora" not in manifest["hyperparameters"]


def test_full_factors_are_the_svd_of_the_task_vector(full_expert, base_dir):
    store, result = full_expert
    base = SafetensorsFolder(base_dir)
    expert = SafetensorsFolder(store.root / result.expert.prefix)
    factors = load_task_vector_factors(store, result.expert.prefix)
    assert factors.kind == "full"
    matrices = {n for n in base.names() if len(base.specs()[n].shape) == 2}
    assert set(factors) == matrices  # every matrix changed; norms (1-D) pass through
    assert len(matrices) == 2 * 7 + 2  # 7 projections per layer, embeddings, lm_head
    worst = 0.0
    for name in factors:
        u, s, vh = factors[name]
        tau = expert.get(name) - base.get(name)
        assert s.numel() == min(tau.shape)
        worst = max(worst, float(((u * s) @ vh - tau).abs().max()))
    print(f"\nmax |U diag(S) Vh - (expert - base)| = {worst:.2e}")
    assert worst < 1e-5

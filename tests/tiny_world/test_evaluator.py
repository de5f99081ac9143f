"""TinyWorldEvaluator end to end on a tiny random Llama; the trainer's basics."""

from __future__ import annotations

import pytest
import torch

from cycleqd.skills.tiny import FAMILIES, TinyWorldEvaluator
from cycleqd.skills.tiny.data import skill_examples
from cycleqd.skills.tiny.train import (
    ModelShape,
    TrainConfig,
    average_merge,
    encode,
    new_model,
    save_model,
    state_of,
    train,
    world_tokenizer,
)

SMALL = ModelShape(hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64)


@pytest.fixture(scope="module")
def tokenizer():
    return world_tokenizer()


@pytest.fixture(scope="module")
def model_folder(tokenizer, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-random")
    return save_model(new_model(tokenizer, SMALL, seed=0), tokenizer, folder)


def test_evaluator_scores_a_model_end_to_end(model_folder):
    evaluator = TinyWorldEvaluator(model_folder, n_samples=4, seed=0, max_new_tokens=12)
    state = state_of(model_folder)
    first = evaluator.evaluate("g1", state.items())
    assert set(first) == set(FAMILIES)
    assert all(0.0 <= v <= 1.0 for v in first.values())
    assert set(evaluator.last_results) == set(FAMILIES)
    assert all(len(r.samples) == 4 for r in evaluator.last_results.values())
    replies = {f: [s.detail["reply"] for s in r.samples] for f, r in evaluator.last_results.items()}
    # other weights in between, then the same weights again: the same replies and scores
    noisy = {k: v + 0.05 * torch.randn_like(v) for k, v in state.items()}
    evaluator.evaluate("g2", noisy.items())
    assert evaluator.evaluate("g1", state.items()) == first
    again = {f: [s.detail["reply"] for s in r.samples] for f, r in evaluator.last_results.items()}
    assert again == replies
    assert evaluator.last_genome == "g1"


def test_evaluator_refuses_partial_weights(model_folder):
    evaluator = TinyWorldEvaluator(model_folder, n_samples=1, seed=0, max_new_tokens=4)
    state = state_of(model_folder)
    partial = [(k, v) for k, v in state.items() if "lm_head" not in k]
    with pytest.raises(ValueError, match="not given"):
        evaluator.evaluate("bad", partial)


def test_encode_masks_the_prompt(tokenizer):
    example = skill_examples("tiny_code", 1)[0]
    ids, labels = encode(tokenizer, example)
    answer = [t for t in labels if t != -100]
    assert len(ids) == len(labels)
    assert tokenizer.decode(answer[:-1]) == example["messages"][-1]["content"]
    assert answer[-1] == tokenizer.convert_tokens_to_ids("<|eot_id|>")
    prompt = tokenizer.apply_chat_template(
        example["messages"][:1], tokenize=False, add_generation_prompt=True
    )
    assert tokenizer.decode(ids[: len(ids) - len(answer)]) == prompt


def test_training_lowers_the_loss_and_merges_average(tokenizer, tmp_path):
    model = new_model(tokenizer, SMALL, seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = train(
        model,
        tokenizer,
        skill_examples("tiny_sql", 64),
        TrainConfig(steps=12, lr=3e-3, batch_size=8, warmup=2),
    )
    assert stats.last_loss < stats.first_loss
    merged = average_merge(before, [model.state_dict(), before])
    name = "model.layers.0.mlp.up_proj.weight"
    want = before[name] + 0.5 * (model.state_dict()[name] - before[name])
    assert torch.allclose(merged[name], want, atol=1e-6)


def test_campaign_config_is_valid(model_folder):
    from cycleqd.config import parse_config
    from cycleqd.skills.tiny.train import campaign_config

    models = {"base": str(model_folder), "experts": {f: str(model_folder) for f in FAMILIES}}
    config = parse_config(campaign_config(models), source="tiny world")
    assert config.skill_names == list(FAMILIES)

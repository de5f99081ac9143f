"""Experts in the campaign config: a location or a fine-tuning spec, validated with errors that
name the field; a skill whose expert trains on its derived training part scores the other."""

from __future__ import annotations

import pytest

from cycleqd.config import ExpertTraining, parse_config
from cycleqd.errors import ConfigError
from cycleqd.experts import experts_to_train
from cycleqd.finetune_settings import missing_targets


def _config(experts: dict, skills=("coding", "db", "os"), **extra) -> dict:
    return {
        "name": "x",
        "skills": [{"name": s, **extra.get(s, {})} for s in skills],
        "models": {"base": "/models/base", "experts": experts},
    }


def _error(data: dict) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return str(info.value)


def test_an_expert_is_a_location_or_a_fine_tuning_spec():
    config = parse_config(
        _config({"coding": "s3://b/coding", "db": {"lora": {"rank": 8}}, "os": {}})
    )
    assert config.models.experts["coding"] == "s3://b/coding"
    assert isinstance(config.models.experts["db"], ExpertTraining)
    assert config.models.experts["db"].lora.rank == 8 and config.models.experts["os"].derived
    assert experts_to_train(config) == ["db", "os"]


def test_derived_training_means_the_skill_scores_its_evaluation_part():
    config = parse_config(
        _config(
            {"coding": {}, "db": {"data": "s3://b/db.jsonl"}, "os": "/e/os"},
            coding={"limit": 5},
        )
    )
    parts = {s.name: s.part for s in config.skills}
    # derived: evaluation part; own data or a given expert: unknown training, all tasks.
    assert parts == {"coding": "evaluation", "db": "all", "os": "all"}
    explicit = parse_config(_config({"coding": {}, "db": "/e", "os": "/e"}, coding={"part": "all"}))
    assert explicit.skills[0].part == "all"  # the user's word wins


def test_the_config_round_trips_through_its_yaml():
    data = _config({"coding": {"method": "full", "max_steps": 3}, "db": {}, "os": "/e/os"})
    config = parse_config(data)
    import yaml

    again = parse_config(yaml.safe_load(config.to_yaml()))
    assert again == config
    assert "lora" not in yaml.safe_load(config.to_yaml())["models"]["experts"]["coding"]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({"lorra": {}}, "models.experts.db.lorra: unknown field; allowed here: method, lora"),
        ({"lora": {"rank": 0}}, "models.experts.db.lora.rank: Input should be greater"),
        ({"lora": {"target_modules": ["q proj"]}}, "are not module names"),
        ({"method": "qlora"}, "models.experts.db.method: got 'qlora'; allowed: 'lora' or 'full'"),
        ({"method": "full", "lora": {"rank": 4}}, "lora: given, but method is 'full'"),
        ({"data": "s3://b/x.jsonl", "size": 10}, "size: only for data 'derived'"),
        ({"learning_rate": -1}, "models.experts.db.learning_rate: Input should be greater than 0"),
        (7, "models.experts.db: Input should be a valid dictionary"),
    ],
)
def test_spec_errors_name_the_field(spec, expected):
    assert expected in _error(_config({"coding": "/e", "db": spec, "os": "/e"}))


def test_a_spec_for_a_skill_that_is_not_in_the_campaign_is_refused():
    message = _error(_config({"coding": "/e", "db": "/e", "os": "/e", "tiny_sql": {}}))
    assert "models.experts: unknown skill(s) ['tiny_sql']" in message


def test_fine_tuned_experts_need_a_skill_with_a_training_set_and_real_scoring():
    from cycleqd.skills import registry

    assert all(registry.has_training_set(name) for name in registry.REGISTRY)
    data = _config(
        {"probe_a": {"data": "/d/chat.jsonl"}, "probe_b": "/e"}, skills=("probe_a", "probe_b")
    )
    data["evaluation"] = {"scorer": "probe"}
    assert "the probe scorer compares models with each expert's weights" in _error(data)


def test_lora_targets_are_checked_against_the_base_header():
    shapes = {
        "model.embed_tokens.weight": (10, 4),
        "model.layers.0.self_attn.q_proj.weight": (4, 4),
        "model.layers.0.input_layernorm.weight": (4,),
        "lm_head.weight": (10, 4),
    }
    assert missing_targets(shapes, ("q_proj",)) is None
    why = missing_targets(shapes, ("q_proj", "c_attn", "input_layernorm"))
    assert why.startswith("['c_attn', 'input_layernorm'] match no linear layer")
    assert "['embed_tokens', 'lm_head', 'q_proj']" in why

"""The fine-tuning config: typed, strict, and errors that name the field."""

from __future__ import annotations

import pytest

from cycleqd.errors import ConfigError
from cycleqd.finetune.config import (
    DEFAULT_TARGETS,
    FinetuneConfig,
    load_finetune_config,
    parse_finetune_config,
)

MINIMAL = {"name": "coding-expert", "base": "/models/base", "data": "d.jsonl", "store": "/s"}


def test_defaults_and_derived_prefixes():
    config = parse_finetune_config(MINIMAL)
    assert config.method == "lora"
    assert config.lora.target_modules == DEFAULT_TARGETS
    assert config.lora.scale == 2.0
    assert config.expert_prefix == "experts/coding-expert"
    assert config.checkpoints == "checkpoints/coding-expert"
    # The fingerprint follows the hyperparameters and the identity of base and data only.
    same = parse_finetune_config({**MINIMAL, "tracking_uri": "http://x", "checkpoint_every": 7})
    assert config.fingerprint(base_sha256="a") == same.fingerprint(base_sha256="a")
    assert config.fingerprint(base_sha256="a") != config.fingerprint(base_sha256="b")
    other = parse_finetune_config({**MINIMAL, "learning_rate": 1e-3})
    assert other.fingerprint(base_sha256="a") != config.fingerprint(base_sha256="a")


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"learning_rte": 1e-4}, "learning_rte: unknown field; allowed here: method, lora"),
        ({"lora": {"rnak": 4}}, "lora.rnak: unknown field; allowed here: rank, alpha"),
        ({"method": "qlora"}, "method: got 'qlora'; allowed: 'lora' or 'full'"),
        ({"learning_rate": -1}, "learning_rate: Input should be greater than 0"),
        ({"lora": {"rank": 0}}, "lora.rank: Input should be greater than or equal to 1"),
        ({"lora": {"dropout": 1.5}}, "lora.dropout: Input should be less than 1"),
        ({"lora": {"target_modules": ["q_proj", "q proj"]}}, "target_modules: \\['q proj'\\]"),
        ({"batch_size": "eight"}, "batch_size: Input should be a valid integer"),
        ({"adam_betas": [0.9, 1.5]}, "adam_betas: each must be in \\[0, 1\\)"),
        ({"name": "no spaces"}, "name: String should match pattern"),
        ({"method": "full", "lora": {"rank": 4}}, "lora: given, but method is 'full'"),
        ({"dtype": "float16"}, "dtype: got 'float16'; allowed: 'auto', 'float32' or 'bfloat16'"),
    ],
)
def test_errors_name_the_field(change, expected):
    with pytest.raises(ConfigError, match=expected):
        parse_finetune_config({**MINIMAL, **change})


def test_missing_fields_are_listed_together():
    with pytest.raises(ConfigError) as err:
        parse_finetune_config({"name": "x"})
    text = str(err.value)
    for field in ("base", "data", "store"):
        assert f"{field}: required field is missing" in text


def test_yaml_files(tmp_path):
    path = tmp_path / "ft.yaml"
    path.write_text(
        "name: db-expert\nskill: db\nbase: /m\ndata: s3://b/d.jsonl\nstore: s3://b/x\n"
        "method: full\nmax_steps: 10\n"
    )
    config = load_finetune_config(path)
    assert isinstance(config, FinetuneConfig) and config.method == "full"
    path.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_finetune_config(path)
    with pytest.raises(ConfigError, match="cannot read fine-tuning config"):
        load_finetune_config(tmp_path / "missing.yaml")
    path.write_text("- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping of fields, got list"):
        load_finetune_config(path)

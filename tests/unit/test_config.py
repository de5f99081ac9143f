"""Campaign config: a minimal config loads with the paper's defaults; every invalid config
raises ConfigError whose message names the field (dotted path) and what is allowed, with no
pydantic traceback text."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from cycleqd.config import CampaignConfig, load_config, parse_config
from cycleqd.errors import ConfigError, CycleQDError

MINIMAL = {
    "name": "demo",
    "skills": [
        {"name": "coding", "bc_max": 0.75},
        {"name": "db", "bc_max": 0.45},
        {"name": "os", "bc_max": 0.45},
    ],
    "models": {
        "base": "/models/base",
        "experts": {"coding": "/models/coding", "db": "/models/db", "os": "/models/os"},
    },
}

MINIMAL_YAML = """\
name: demo
skills:
  - {name: coding, bc_max: 0.75}
  - {name: db, bc_max: 0.45}
  - {name: os, bc_max: 0.45}
models:
  base: /models/base
  experts: {coding: /models/coding, db: /models/db, os: /models/os}
"""


def minimal() -> dict:
    return copy.deepcopy(MINIMAL)


def config_error(data: object) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    exc = info.value
    message = str(exc)
    # what the user sees is our message, not pydantic's
    for leak in ("pydantic", "validation error for", "errors.pydantic.dev", "Traceback", "[type="):
        assert leak not in message, message
    assert exc.__cause__ is None
    assert exc.__context__ is None or exc.__suppress_context__
    return message


def test_minimal_config_loads_from_yaml_with_paper_defaults(tmp_path: Path) -> None:
    path = tmp_path / "campaign.yaml"
    path.write_text(MINIMAL_YAML)
    config = load_config(path)
    assert isinstance(config, CampaignConfig)
    assert config.skill_names == ["coding", "db", "os"]
    assert config.skill("coding").bc_min == 0.0
    assert config.skill("coding").bc_max == 0.75
    assert config.skill("db").bc_max == 0.45
    assert [s.bins for s in config.skills] == [15, 15, 15]  # paper: 15 bins per BC
    assert config.sampling.method == "elite"
    assert config.sampling.formula == "paper"
    assert (config.sampling.a_lo, config.sampling.a_hi) == (0.5, 0.8)
    assert config.crossover.method == "linear"
    assert (config.crossover.mu, config.crossover.sigma) == (0.0, 0.01)
    assert config.mutation.kind == "svd"
    assert config.population == 1  # paper: one child per generation
    assert config.objective == "cycle"
    assert config.models.experts["os"] == "/models/os"
    assert parse_config(minimal()) == config
    with pytest.raises(KeyError):
        config.skill("math")


def test_to_yaml_round_trips(tmp_path: Path) -> None:
    config = parse_config(minimal())
    path = tmp_path / "again.yaml"
    path.write_text(config.to_yaml())
    assert load_config(path) == config
    coding = yaml.safe_load(config.to_yaml())["skills"][0]
    assert {k: coding[k] for k in ("name", "bc_min", "bc_max", "bins")} == {
        "name": "coding",
        "bc_min": 0.0,
        "bc_max": 0.75,
        "bins": 15,
    }
    # every option of the skill is stored with the campaign, defaults included
    assert coding["inputs"] == "base" and coding["max_new_tokens"] == 512


def test_unknown_skill_in_experts_names_the_allowed_skills() -> None:
    data = minimal()
    data["models"]["experts"]["sql"] = "/models/sql"
    message = config_error(data)
    assert "models.experts" in message
    assert "'sql'" in message
    assert "['coding', 'db', 'os']" in message


def test_missing_expert_names_the_skill() -> None:
    data = minimal()
    del data["models"]["experts"]["os"]
    message = config_error(data)
    assert "models.experts" in message
    assert "'os'" in message
    assert "one per skill" in message


def test_duplicate_skill_is_named() -> None:
    data = minimal()
    data["skills"].append({"name": "db"})
    message = config_error(data)
    assert "skills" in message
    assert "duplicated" in message
    assert "'db'" in message


def test_bad_mutation_kind_lists_the_allowed_kinds() -> None:
    data = minimal()
    data["mutation"] = {"kind": "svdd"}
    message = config_error(data)
    assert "mutation.kind" in message
    assert "'svdd'" in message
    for allowed in ("'svd'", "'svd_expert'", "'gaussian'", "'none'"):
        assert allowed in message


def test_objective_without_the_cycle_refuses_what_needs_a_quality_skill() -> None:
    data = minimal()
    data["objective"] = "mean"
    assert parse_config(data).objective == "mean"
    data["mutation"] = {"kind": "svd_expert"}
    message = config_error(data)
    assert "mutation 'svd_expert'" in message and "objective 'mean'" in message
    data = minimal()
    data["objective"] = "single"
    message = config_error(data)
    assert "objective" in message and "'cycle'" in message and "'mean'" in message


def test_bad_sampling_formula_lists_paper_and_official() -> None:
    data = minimal()
    data["sampling"] = {"formula": "offical"}
    message = config_error(data)
    assert "sampling.formula" in message
    assert "'paper'" in message
    assert "'official'" in message


def _with_typo(where: str) -> dict:
    data = minimal()
    if where == "top":
        data["mutaton"] = {"kind": "svd"}
    elif where == "nested":
        data["mutation"] = {"kindd": "svd"}
    else:
        data["skills"][0]["bc_maxx"] = 0.7
    return data


@pytest.mark.parametrize(
    ("where", "expected"),
    [("top", "mutaton"), ("nested", "mutation.kindd"), ("list", "skills.0.bc_maxx")],
)
def test_unknown_field_is_named_as_a_dotted_path(where: str, expected: str) -> None:
    message = config_error(_with_typo(where))
    assert f"{expected}: unknown field" in message
    assert "allowed here:" in message


def test_unknown_field_lists_the_allowed_fields() -> None:
    message = config_error(_with_typo("nested"))
    for allowed in ("kind", "w_max", "rate", "sigma"):
        assert allowed in message.split("unknown field", 1)[1]


@pytest.mark.parametrize(("lo", "hi"), [(0.75, 0.75), (0.8, 0.75)])
def test_bc_min_not_below_bc_max(lo: float, hi: float) -> None:
    data = minimal()
    data["skills"][0].update(bc_min=lo, bc_max=hi)
    message = config_error(data)
    assert "skills.0" in message
    assert f"bc_min ({lo}) must be smaller than bc_max ({hi})" in message


def test_sampling_bounds_must_be_ordered() -> None:
    data = minimal()
    data["sampling"] = {"a_lo": 0.9, "a_hi": 0.8}
    message = config_error(data)
    assert "sampling" in message
    assert "a_lo (0.9) must be smaller than a_hi (0.8)" in message


def test_every_problem_is_listed() -> None:
    data = minimal()
    data["mutation"] = {"kind": "svdd"}
    data["mutaton"] = {}
    data["skills"][1]["bins"] = 0
    message = config_error(data)
    assert "mutation.kind" in message
    assert "mutaton: unknown field" in message
    assert "skills.1.bins" in message
    assert "(got 0)" in message


def test_missing_required_field() -> None:
    data = minimal()
    del data["models"]
    assert "models: required field is missing" in config_error(data)


@pytest.mark.parametrize(
    ("data", "type_name"), [([1, 2], "list"), ("text", "str"), (None, "NoneType")]
)
def test_non_mapping_is_rejected(data: object, type_name: str) -> None:
    message = config_error(data)
    assert f"expected a mapping of fields, got {type_name}" in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("- a\n- b\n", "got list"),
        ("", "got NoneType"),
        ("just a string\n", "got str"),
        ("name: [unclosed\n", "is not valid YAML"),
    ],
)
def test_bad_yaml_files(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=expected) as info:
        load_config(path)
    assert str(path) in str(info.value)
    assert info.value.__cause__ is None


def test_unreadable_files(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=r"cannot read config .*nope\.yaml: No such file"):
        load_config(missing)
    with pytest.raises(ConfigError, match=r"cannot read config .*: Is a directory"):
        load_config(tmp_path)


def test_config_error_is_a_cycleqd_error() -> None:
    assert issubclass(ConfigError, CycleQDError)

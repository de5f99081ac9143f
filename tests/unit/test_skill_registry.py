"""The skills registry: every registered skill validates with its defaults and builds from the
real data sets; unknown skills and another skill's options are errors that list what exists;
subsets are the first N or a seeded draw that never changes."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from cycleqd.config import parse_config
from cycleqd.errors import ConfigError
from cycleqd.skills.registry import (
    DB_PASSWORD_ENV,
    REGISTRY,
    build_skill,
    database_url,
    owners_of,
)

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


def campaign(*skills: dict, **extra) -> dict:
    names = [s["name"] for s in skills]
    return {
        "name": "registry",
        "skills": list(skills),
        "models": {"base": "/m/base", "experts": {n: f"/m/{n}" for n in names}},
        **extra,
    }


def error_of(data: dict) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return str(info.value)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_registered_skill_validates_with_its_defaults(name):
    other = "tiny_sql" if name != "tiny_sql" else "tiny_code"
    config = parse_config(campaign({"name": name}, {"name": other}))
    entry = config.skill(name)
    assert isinstance(entry, REGISTRY[name].options)
    assert (entry.bc_min, entry.bc_max, entry.bins) == (0.0, 1.0, 15)
    # the stored config round-trips to the same typed entry
    assert parse_config(config.model_dump(mode="json")) == config


def test_unknown_skill_lists_the_registry():
    message = error_of(campaign({"name": "coding"}, {"name": "math"}))
    assert "unknown skill 'math'" in message
    for name in REGISTRY:
        assert name in message
    assert "scorer 'probe'" in message


@pytest.mark.parametrize(
    ("skill", "option", "owners"),
    [
        ("coding", "max_rounds", "db, os"),
        ("os", "subset", "db"),
        ("db", "inputs", "coding"),
        ("coding", "samples", "tiny_code, tiny_sql, tiny_shell"),
    ],
)
def test_another_skills_option_names_its_owners_and_what_is_allowed(skill, option, owners):
    entry = {"name": skill, option: 1}
    message = error_of(campaign(entry, {"name": "tiny_code"}))
    assert f"skills.0.{option}: unknown field ({option} is an option of: {owners})" in message
    allowed = message.split("allowed here: ")[1]
    assert "limit" in allowed and "bc_max" in allowed and option not in allowed.split(", ")
    assert owners_of(option) == owners.split(", ")


def test_a_misspelt_option_is_an_error_listing_the_skills_options():
    message = error_of(campaign({"name": "os", "limt": 3}, {"name": "db"}))
    assert "skills.0.limt: unknown field; allowed here:" in message
    assert "max_rounds" in message and "action_timeout_s" in message


def test_probe_scorer_takes_made_up_names_without_options():
    probe = {"evaluation": {"scorer": "probe"}}
    assert parse_config(campaign({"name": "a"}, {"name": "b"}, **probe)).skill_names == ["a", "b"]
    assert "a probe skill has no options" in error_of(
        campaign({"name": "a", "limit": 3}, {"name": "b"}, **probe)
    )
    assert "'coding' is a real skill" in error_of(
        campaign({"name": "coding"}, {"name": "b"}, **probe)
    )


def test_backend_options_belong_to_their_kind():
    vllm = {"evaluation": {"backend": {"kind": "vllm", "batch_size": 8}}}
    message = error_of(campaign({"name": "coding"}, {"name": "db"}, **vllm))
    assert "evaluation.backend.batch_size: unknown field" in message
    assert "tensor_parallel_size" in message
    message = error_of(
        campaign({"name": "coding"}, {"name": "db"}, evaluation={"backend": {"kind": "tgi"}})
    )
    assert "evaluation.backend: got 'tgi'; allowed: 'transformers', 'vllm'" in message
    cuda = {"evaluation": {"backend": {"device": "gpu"}}}
    assert "evaluation.backend.device" in error_of(campaign({"name": "os"}, {"name": "db"}, **cuda))


def test_database_password_never_in_the_config(monkeypatch):
    bad = {"name": "db", "url": "mysql://root:hunter2@db:3306"}
    message = error_of(campaign(bad, {"name": "os"}))
    assert DB_PASSWORD_ENV in message and "hunter2" not in message
    assert "mysql://" in error_of(campaign({"name": "db", "url": "postgres://x@h"}, {"name": "os"}))
    monkeypatch.setenv(DB_PASSWORD_ENV, "p@ss:word")
    assert database_url("mysql://agent@db:3307") == "mysql://agent:p%40ss%3Aword@db:3307"
    monkeypatch.delenv(DB_PASSWORD_ENV)
    assert database_url("mysql://agent@db:3307") == "mysql://agent@db:3307"


def test_seed_needs_a_limit():
    assert "set limit too" in error_of(campaign({"name": "coding", "seed": 3}, {"name": "db"}))


@pytest.fixture
def data_dir() -> Path:
    if not (DATA / "mbppplus.jsonl").exists():
        pytest.skip(f"the evaluation sets are not at {DATA} (see ../shared/data/README.md)")
    return DATA


def entries(data_dir: Path, **options) -> dict:
    config = parse_config(
        campaign(
            {"name": "coding", "data": str(data_dir), **options},
            {"name": "db", "data": str(data_dir), **options},
            {"name": "os", "data": str(data_dir), **options},
        )
    )
    return {s.name: s for s in config.skills}


def ids(skill) -> list[str]:
    items = getattr(skill, "tasks", None) or skill.samples
    return [getattr(t, "task_id", None) or t.sample_id for t in items]


def test_real_skills_build_from_the_data_first_n_or_a_seeded_subset(data_dir):
    first = {n: build_skill(e) for n, e in entries(data_dir, limit=3).items()}
    assert ids(first["coding"]) == ["Mbpp/2", "Mbpp/3", "Mbpp/4"]
    assert [len(ids(s)) for s in first.values()] == [3, 3, 3]
    drawn = {n: ids(build_skill(e)) for n, e in entries(data_dir, limit=4, seed=7).items()}
    again = {n: ids(build_skill(e)) for n, e in entries(data_dir, limit=4, seed=7).items()}
    other = {n: ids(build_skill(e)) for n, e in entries(data_dir, limit=4, seed=8).items()}
    assert drawn == again and drawn != other
    for name, chosen in drawn.items():  # drawn from the whole set, kept in its order
        everything = ids(build_skill(entries(data_dir)[name]))
        positions = [everything.index(i) for i in chosen]
        assert positions == sorted(positions) and len(set(chosen)) == 4
    assert first["coding"].sampling.max_new_tokens == 512
    assert first["db"].config.max_rounds == 5 and first["os"].max_rounds == 5


def test_unknown_task_ids_are_named(data_dir):
    config = parse_config(
        campaign({"name": "coding", "data": str(data_dir), "task_ids": ["Mbpp/2", "Mbpp/9999"]},
                 {"name": "db"})
    )  # fmt: skip
    with pytest.raises(ConfigError, match="Mbpp/9999"):
        build_skill(config.skill("coding"))


def test_a_missing_data_set_says_where_it_looked(tmp_path):
    config = parse_config(campaign({"name": "os", "data": str(tmp_path)}, {"name": "db"}))
    with pytest.raises(Exception, match=str(tmp_path)):
        build_skill(config.skill("os"))


def test_config_copies_are_independent():
    data = campaign({"name": "coding"}, {"name": "db"})
    before = copy.deepcopy(data)
    parse_config(data)
    assert data == before

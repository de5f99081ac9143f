"""The tiny world as a campaign's evaluation world: config, evaluator, `cycleqd run`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from cycleqd.cli import main
from cycleqd.config import parse_config
from cycleqd.errors import ConfigError
from cycleqd.evaluators import LazyEvaluator, build_evaluator
from cycleqd.skills.evaluator import SkillsEvaluator
from cycleqd.skills.tiny import FAMILIES, TinySkill
from cycleqd.skills.tiny.train import MINI_WORLD, build_world
from cycleqd.skills.tiny.train import campaign_config as tiny_campaign_config

MINI = MINI_WORLD


@pytest.fixture(scope="module")
def mini_world(tmp_path_factory) -> dict:
    import os

    parent, cwd = tmp_path_factory.mktemp("mini-world"), os.getcwd()
    os.chdir(parent)
    try:
        return build_world("world", MINI)  # relative, as `cycleqd run`'s default workdir
    finally:
        os.chdir(cwd)


def test_experts_trained_in_parallel_processes_equal_sequential_ones(tmp_path):
    import torch

    from cycleqd.skills.tiny.train import state_of

    saved = torch.get_num_threads()
    # One thread for everything, as each worker process uses: torch's reductions split by
    # thread, so a base trained on 2 threads differs from one trained on 1.
    torch.set_num_threads(1)
    try:
        sequential = build_world(tmp_path / "sequential", MINI)
        parallel = build_world(tmp_path / "parallel", MINI, workers=2)
    finally:
        torch.set_num_threads(saved)
    for family in FAMILIES:
        a = state_of(sequential["experts"][family])
        b = state_of(parallel["experts"][family])
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), family


def test_config_names_the_tiny_world(mini_world):
    config = parse_config(tiny_campaign_config(mini_world, samples=5))
    assert Path(config.models.base).is_absolute()  # usable from any working directory
    assert config.evaluation.scorer == "skills" and config.evaluation.backend.batch_size == 64
    assert [s.samples for s in config.skills] == [5, 5, 5]
    assert config.skill_names == list(FAMILIES)


def test_tiny_world_options_belong_to_tiny_skills(mini_world):
    data = tiny_campaign_config(mini_world)
    data["skills"][0]["name"] = "coding"  # keeps the tiny skill's `samples`
    data["models"]["experts"]["coding"] = data["models"]["experts"].pop("tiny_code")
    with pytest.raises(ConfigError, match=r"samples is an option of: tiny_code, tiny_sql"):
        parse_config(data)


def test_evaluator_is_built_on_first_use_and_is_deterministic(mini_world):
    from cycleqd.skills.tiny.train import state_of

    config = parse_config(tiny_campaign_config(mini_world, samples=3))
    evaluator = build_evaluator(config)
    assert isinstance(evaluator, LazyEvaluator) and evaluator._evaluator is None
    state = state_of(mini_world["experts"]["tiny_sql"])
    first = evaluator.evaluate("sql", state.items())
    assert isinstance(evaluator.evaluator, SkillsEvaluator)
    assert [type(s) for s in evaluator.evaluator.skills] == [TinySkill] * 3
    assert set(first) == set(FAMILIES) and all(0.0 <= v <= 1.0 for v in first.values())
    assert all(len(r.samples) == 3 for r in evaluator.evaluator.last_results.values())
    assert evaluator.evaluate("sql", state.items()) == first


def test_cycleqd_run_over_the_tiny_world_and_resume(mini_world, tmp_path, capsys):
    config = tiny_campaign_config(mini_world, name="mini", generations=2, samples=3)
    path = tmp_path / "campaign.yaml"
    path.write_text(yaml.safe_dump(config))
    workdir = tmp_path / "run"
    assert main(["run", "--config", str(path), "--workdir", str(workdir), "--no-tracking"]) == 0
    out = capsys.readouterr().out
    for label in ("expert tiny_code", "expert tiny_sql", "expert tiny_shell", "final ("):
        assert label in out
    args = ["run", "--config", str(path), "--workdir", str(workdir), "--no-tracking"]
    assert main([*args, "--generations", "3"]) == 0
    out = capsys.readouterr().out
    assert "resuming campaign 'mini' after generation 2" in out and "gen    3/3" in out


def test_default_run_reuses_the_world_in_its_workdir(mini_world, tmp_path, capsys):
    """`cycleqd run` without a config trains the world once; a complete world (its
    world.json, written last) is reused as it is."""
    workdir = tmp_path / "run"
    (workdir / "world").mkdir(parents=True)
    (workdir / "world" / "world.json").write_text(json.dumps(mini_world))
    args = ["run", "--workdir", str(workdir), "--generations", "1", "--no-tracking"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "building the tiny skill world" not in out
    assert "campaign 'tiny-world': 1 generations" in out


def test_base_training_threads_are_the_idle_cores(monkeypatch):
    from cycleqd.skills.tiny import train

    monkeypatch.setattr(train.os, "cpu_count", lambda: 2)
    for idle, threads in ((2.0, 2), (1.9, 2), (1.6, 1), (0.3, 1), (0.0, 1)):
        monkeypatch.setattr(train, "_idle_cores", lambda _s, idle=idle: idle)
        assert train.build_threads() == threads, idle


def test_idle_cores_are_measured_between_none_and_all():
    import os

    from cycleqd.skills.tiny.train import _idle_cores

    assert -0.01 <= _idle_cores(0.2) <= (os.cpu_count() or 1) + 0.01

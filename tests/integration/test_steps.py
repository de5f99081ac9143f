"""The stages Kubeflow runs one task at a time give the same campaign as the in-process loop."""

from __future__ import annotations

import pytest
import yaml

from cycleqd import probe_world, steps
from cycleqd.campaign import Campaign
from cycleqd.config import parse_config
from cycleqd.errors import ConfigError, CycleQDError
from cycleqd.state import CampaignLockedError, CampaignStore


def _yaml(world, **overrides) -> str:
    config = probe_world.default_config(world, generations=overrides.pop("generations", 4))
    config.update(overrides)
    return yaml.safe_dump(config)


def test_stagewise_campaign_equals_in_process_run(tiny_world, probe_evaluator, tmp_path):
    text = _yaml(tiny_world, population=2, mutation={"kind": "svd"})
    store = str(tmp_path / "staged")
    assert steps.preflight(text, store)["latest_generation"] == -1
    assert steps.seed(text, store, owner="run-1") == 0
    while children := steps.breed(text, store, owner="run-1"):
        assert len(children) == 2
        for gid in children:
            record = steps.evaluate(text, store, gid)
            assert steps.evaluate(text, store, gid) == record  # a retry reads it back
        summary = steps.commit(text, store, owner="run-1")
        assert summary["committed"]
    final = steps.export(text, store, owner="run-1")
    steps.release(store, "run-1")
    assert CampaignStore(store).read_lease() is None

    with Campaign(
        parse_config(yaml.safe_load(text)), CampaignStore(tmp_path / "whole"), probe_evaluator
    ) as whole:
        whole.run()
        staged = CampaignStore(store)
        snapshot = staged.read_snapshot(staged.latest_generation())
        assert snapshot["archives"] == whole.archives.to_dict()
        gid, scores = whole.finalize()
    assert final["genome_id"] == gid and final["scores"] == scores
    assert final["uri"].endswith(f"/exports/{gid}")


def test_commit_without_breeding_is_a_no_op_and_evaluate_checks_the_child(tiny_world, tmp_path):
    text = _yaml(tiny_world)
    store = str(tmp_path)
    steps.seed(text, store)
    assert steps.commit(text, store)["committed"] is False
    steps.breed(text, store)
    with pytest.raises(CycleQDError, match="not in generation 1"):
        steps.evaluate(text, store, "0123456789abcdef")
    with pytest.raises(CycleQDError, match="was never evaluated"):
        steps.commit(text, store)


def test_preflight_fails_fast_on_bad_setup(tiny_world, tmp_path):
    store = str(tmp_path)
    with pytest.raises(ConfigError, match=r"mutation\.kind"):
        steps.preflight(_yaml(tiny_world, mutation={"kind": "nope"}), store)
    steps.seed(_yaml(tiny_world), store)
    with pytest.raises(ConfigError, match="different config"):
        steps.preflight(_yaml(tiny_world, seed=7), store)
    held = CampaignStore(store, owner="run-a")
    held.acquire(settle=0)
    with pytest.raises(CampaignLockedError, match="being written by another run"):
        steps.preflight(_yaml(tiny_world), store, owner="run-b")
    assert steps.preflight(_yaml(tiny_world), store, owner="run-a")["latest_generation"] == 0
    with pytest.raises(CycleQDError, match=r"MLflow at http://127\.0\.0\.1:9 is not reachable"):
        steps.preflight(_yaml(tiny_world), store, "http://127.0.0.1:9", owner="run-a")

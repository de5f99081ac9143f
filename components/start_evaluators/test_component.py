import json
import os
import time
import urllib.request

import pytest
import yaml

from cycleqd.errors import CycleQDError
from cycleqd.skills.tiny.train import campaign_config
from cycleqd.warm_evaluators import registry_for
from cycleqd_kfp.components.release.component import release
from cycleqd_kfp.components.start_evaluators.component import start_evaluators


@pytest.fixture
def skills_campaign(mini_skill_world) -> str:
    return yaml.safe_dump(campaign_config(mini_skill_world, name="warm", generations=1))


def _wait_healthy(url: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"{url} never answered /health")


def _gone(pids: list[int], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = []
        for pid in pids:
            try:
                os.kill(pid, 0)
                os.waitpid(pid, os.WNOHANG)
                alive.append(pid)
            except (ProcessLookupError, ChildProcessError):
                pass
        if not alive:
            return True
        time.sleep(0.1)
    return False


def test_starts_local_evaluators_that_release_stops(skills_campaign, tmp_path):
    store = str(tmp_path / "campaign")
    started = json.loads(
        start_evaluators.python_func(
            campaign_config=skills_campaign,
            store_uri=store,
            run_owner="run-1",
            count=2,
            launcher="local",
        )
    )
    assert [e["name"] for e in started] == ["e0", "e1"]
    registry = registry_for(store, "run-1")
    assert registry.launcher == "local" and len(registry.token) >= 32
    for evaluator in started:
        _wait_healthy(evaluator["url"])
    release.python_func(store_uri=store, run_owner="run-1")
    assert registry_for(store, "run-1") is None
    assert _gone(registry.resources["pids"])


def test_a_probe_campaign_gets_a_clear_error(probe_campaign, tmp_path):
    with pytest.raises(CycleQDError, match="scorer 'probe' scores in the task"):
        start_evaluators.python_func(
            campaign_config=probe_campaign(),
            store_uri=str(tmp_path / "campaign"),
            run_owner="run-1",
            count=1,
            launcher="local",
        )


def test_starts_evaluators_as_a_kfp_task(kfp_local, skills_campaign, tmp_path):
    store = str(tmp_path / "campaign")
    task = start_evaluators(
        campaign_config=skills_campaign, store_uri=store, run_owner="run-2", count=1
    )
    (evaluator,) = json.loads(task.output)
    _wait_healthy(evaluator["url"])  # outlived its task, as a pod outlives the task
    registry = registry_for(store, "run-2")
    release(store_uri=store, run_owner="run-2")
    assert registry_for(store, "run-2") is None
    assert _gone(registry.resources["pids"])

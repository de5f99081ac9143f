"""A local run's warm evaluation server: evaluation tasks hand it their children and get the
same records they would compute themselves; without it (never started, gone, killed
mid-campaign) they evaluate in their own process and lose nothing."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import time

import pytest
import yaml

from cycleqd import evaluation_service, probe_world, steps
from cycleqd.errors import CycleQDError
from cycleqd.evaluation_service import SOCKET_ENV, evaluate_children
from cycleqd.evaluation_service import evaluation_service as service
from cycleqd.state import CampaignStore


def _campaign(world, generations: int = 2) -> str:
    return yaml.safe_dump(
        {**probe_world.default_config(world, generations=generations), "population": 3}
    )


def _run_generations(config: str, store: str, on_evaluated=None) -> list[dict]:
    """seed, then breed -> evaluate (one task per generation) -> commit, as the pipeline does."""
    steps.seed(config, store, owner="run")
    records = []
    while children := steps.breed(config, store, owner="run"):
        records += evaluate_children(config, store, children)
        if on_evaluated:
            on_evaluated()
        steps.commit(config, store, owner="run")
    return records


def _archives(store: str) -> dict:
    campaign = CampaignStore(store)
    return campaign.read_snapshot(campaign.latest_generation())["archives"]


def test_tasks_share_one_warm_evaluator_and_get_the_records_they_would_compute(
    tiny_world, tmp_path, monkeypatch
):
    monkeypatch.delenv(SOCKET_ENV, raising=False)
    config = _campaign(tiny_world, generations=3)
    alone = _run_generations(config, str(tmp_path / "alone"))
    with service(tmp_path / "server.log", warm_config=config) as server:
        assert server.running and os.environ[SOCKET_ENV] == server.path
        served = _run_generations(config, str(tmp_path / "served"))
        stats = server.stats()
    assert SOCKET_ENV not in os.environ  # the block's tasks only
    assert served == alone and _archives(str(tmp_path / "served")) == _archives(
        str(tmp_path / "alone")
    )
    # One model for the whole run: built once (by the warm-up), three tasks, nine children.
    assert stats["evaluators_built"] == 1
    assert stats["requests"] == 3 and stats["children"] == 9
    timings = stats["timings"]  # what benchmarks split a generation with
    assert timings["models"] == 9 and timings["evaluate_s"] > 0 and timings["materialize_s"] > 0
    assert timings["busy_s"] > timings["evaluate_s"] + timings["materialize_s"]
    assert server.process.poll() is not None, "the server stops with the block"
    assert not os.path.exists(server.path)


def test_campaign_errors_reach_the_task_as_they_would_in_process(tiny_world, tmp_path):
    config = _campaign(tiny_world)
    store = str(tmp_path / "campaign")
    steps.seed(config, store, owner="run")
    steps.breed(config, store, owner="run")
    with service(tmp_path / "server.log"), pytest.raises(CycleQDError, match="not in generation 1"):
        evaluate_children(config, store, ["feedface"])


def test_a_task_evaluates_itself_when_the_server_is_unreachable(
    tiny_world, tmp_path, monkeypatch, caplog, reliability
):
    config = _campaign(tiny_world, generations=1)
    expected = _run_generations(config, str(tmp_path / "alone"))
    monkeypatch.setenv(SOCKET_ENV, str(tmp_path / "no-such-socket"))
    with caplog.at_level(logging.WARNING, logger="cycleqd.evaluation_service"):
        assert _run_generations(config, str(tmp_path / "fallback")) == expected
    assert "unreachable" in caplog.text and "evaluating in this task" in caplog.text
    reliability.record(
        "Service faults",
        "a local run's evaluation server unreachable (its socket gone)",
        tried=1,
        survived=1,
        detail="a warning naming the socket; the task evaluated itself, same records",
    )


def test_server_killed_mid_campaign_loses_nothing(tiny_world, tmp_path, monkeypatch, reliability):
    config = _campaign(tiny_world, generations=3)
    expected = _run_generations(config, str(tmp_path / "alone"))
    store = str(tmp_path / "served")
    with service(tmp_path / "server.log") as server:
        steps.seed(config, store, owner="run")
        children = steps.breed(config, store, owner="run")
        records = evaluate_children(config, store, children)
        assert server.stats()["children"] == 3
        server.process.kill()
        server.process.wait()
        # The task is retried (say its reply was lost): it reads back what the server scored.
        with monkeypatch.context() as patch:
            patch.setattr(steps, "build_evaluator", lambda _config: NeverEvaluates())
            assert evaluate_children(config, store, children) == records
        steps.commit(config, store, owner="run")
        # The next generations' tasks find no server and evaluate themselves.
        while children := steps.breed(config, store, owner="run"):
            records += evaluate_children(config, store, children)
            steps.commit(config, store, owner="run")
    assert records == expected
    assert _archives(store) == _archives(str(tmp_path / "alone"))
    reliability.record(
        "Service faults",
        "a local run's evaluation server SIGKILLed after scoring a generation",
        tried=1,
        survived=1,
        detail="the retried task read the 3 children it had scored back from the store (none "
        "scored twice); the next generations' tasks evaluated themselves; every record and "
        "the archives equal a run without a server",
    )


class NeverEvaluates:
    def evaluate(self, genome_id, tensors):  # pragma: no cover - its call is the failure
        raise AssertionError(f"{genome_id} was scored twice")


def test_a_server_that_cannot_start_is_reported_and_left_out(
    tiny_world, tmp_path, monkeypatch, reliability
):
    monkeypatch.setattr(evaluation_service.sys, "executable", "/bin/false")
    monkeypatch.delenv(SOCKET_ENV, raising=False)
    with service(tmp_path / "server.log") as server:
        assert not server.running and SOCKET_ENV not in os.environ
        config = _campaign(tiny_world, generations=1)
        assert _run_generations(config, str(tmp_path / "campaign"))
    reliability.record(
        "Service faults",
        "a local run's evaluation server failing to start",
        tried=1,
        survived=1,
        detail="a warning naming the server's log; the socket is not named to the tasks, "
        "which evaluate themselves",
    )


def test_the_server_leaves_with_a_killed_driver(tmp_path):
    driver = textwrap.dedent(
        f"""
        import os, sys
        from pathlib import Path
        from cycleqd.evaluation_service import evaluation_service
        with evaluation_service(Path({str(tmp_path / "server.log")!r})) as server:
            print(server.process.pid, flush=True)
            os._exit(0)  # as if killed: no cleanup, the server is not told
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", driver], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    pid = int(out.split()[0])
    deadline = time.monotonic() + 10
    while _alive(pid):
        assert time.monotonic() < deadline, "the server outlived its driver"
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # An exited child of a dead parent is reaped by init; a zombie counts as gone.
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split(") ")[-1][0] != "Z"

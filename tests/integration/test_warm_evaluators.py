"""Warm evaluators as local processes (`cycleqd.evaluator_server`, the vLLM API subset the
evaluation tasks use): a child scored on one equals the same child scored in process, holds
keep two tasks off one engine, a wrong token is refused with a message, and a campaign run
through kfp.local with two evaluators, one killed mid-generation, ends with the archives of
an undisturbed run."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import yaml

from cycleqd import steps, warm_evaluators
from cycleqd.config import parse_config
from cycleqd.evaluator_pool import EvaluatorPool, EvaluatorRegistry, evaluate_with_pool
from cycleqd.experts import train_expert
from cycleqd.generate.server_backend import (
    EvaluatorRequestError,
    EvaluatorUnavailableError,
    ServerBackend,
)
from cycleqd.skills.tiny import FAMILIES
from cycleqd.skills.tiny.train import campaign_config
from cycleqd.state import CampaignStore


def _config(world: dict, generations: int = 1) -> dict:
    data = campaign_config(world, name="warm", generations=generations, samples=6, population=2)
    # One torch thread everywhere: the evaluators' processes and this one compute alike.
    data["evaluation"]["backend"].update(batch_size=4, threads=1)
    return data


@pytest.fixture(scope="module")
def trained_store(mini_skill_world, tmp_path_factory) -> tuple[dict, Path]:
    """A campaign store with the mini world's experts published (the experts stage, once)."""
    folder = tmp_path_factory.mktemp("warm") / "trained"
    config = parse_config(_config(mini_skill_world))
    for skill in FAMILIES:
        train_expert(config, str(folder), skill)
    # Campaigns given the published experts by location: every store's genome ids agree.
    data = _config(mini_skill_world)
    data["models"]["experts"] = {skill: str(folder / "experts" / skill) for skill in FAMILIES}
    return data, folder


def _copy(
    trained_store, tmp_path: Path, name: str, generations: int = 1, **overrides
) -> tuple[str, str]:
    data, _ = trained_store
    config = {**data, "generations": generations, **overrides}
    return yaml.safe_dump(config), str(tmp_path / name)


@pytest.fixture
def evaluators(trained_store, tmp_path, monkeypatch):
    """Start local evaluators for a run; stopped (and checked gone) after the test."""
    started: list[tuple[str, str]] = []

    def start(config_yaml: str, store_uri: str, owner: str, count: int) -> EvaluatorRegistry:
        warm_evaluators.start(config_yaml, store_uri, owner, count, launcher="local")
        started.append((store_uri, owner))
        return warm_evaluators.registry_for(store_uri, owner)

    monkeypatch.setenv("CYCLEQD_EVALUATOR_WAIT_S", "120")
    yield start
    for store_uri, owner in started:
        registry = warm_evaluators.registry_for(store_uri, owner)
        steps.release(store_uri, owner)
        assert warm_evaluators.registry_for(store_uri, owner) is None
        for pid in registry.resources["pids"] if registry else []:
            _wait_gone(pid)


def _wait_gone(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        with __import__("contextlib").suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.1)
    raise AssertionError(f"evaluator process {pid} still running")


def _replies(store: CampaignStore, children: list[str]) -> list[str]:
    """Every reply of the children's evaluations (their transcripts), in order."""
    return [
        sample["detail"]["reply"]
        for gid in children
        for skill in store.get_json(store.transcript_key(gid)).values()
        for sample in skill["samples"]
    ]


def _stats(registry: EvaluatorRegistry, name: str) -> dict:
    import json
    import urllib.request

    url = next(e["url"] for e in registry.evaluators if e["name"] == name)
    request = urllib.request.Request(
        f"{url}/stats", headers={"Authorization": f"Bearer {registry.token}"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def _breed(config_yaml: str, store_uri: str) -> list[str]:
    steps.seed(config_yaml, store_uri)
    return steps.breed(config_yaml, store_uri)


# svd_expert children are recipes the evaluator builds (a genome request naming the models by
# location); the paper's svd children leave the experts' span: built here, staged in the store.
@pytest.mark.parametrize("mutation", [{"kind": "svd_expert", "rate": 0.3}, {"kind": "svd"}])
def test_a_child_scored_on_a_warm_evaluator_equals_it_scored_in_process(
    trained_store, tmp_path, evaluators, mutation
):
    config_yaml, here = _copy(trained_store, tmp_path, "here", mutation=mutation)
    _, there = _copy(trained_store, tmp_path, "there", mutation=mutation)
    children = _breed(config_yaml, here)
    assert _breed(config_yaml, there) == children
    reference = steps.evaluate_many(config_yaml, here, children)
    registry = evaluators(config_yaml, there, "run-1", 1)
    remote = evaluate_with_pool(config_yaml, there, children, registry)
    assert [r["scores"] for r in remote] == [r["scores"] for r in reference]
    # The evaluator did the work: one swap per child, the skills' batches generated there.
    stats = _stats(registry, "e0")
    assert stats["swaps"] == len(children) and stats["batches"] >= len(children)
    # What the skills saw (every reply) is the same too: the batches are the in-process ones.
    replies = {side: _replies(CampaignStore(side), children) for side in (here, there)}
    assert replies[there] == replies[here]
    # Staged weights are gone once scored; elites' weights are published as in process.
    assert not CampaignStore(there).store.list("staging/")
    assert CampaignStore(there).stored_models() == CampaignStore(here).stored_models()
    # Scoring the group again reads the records back: nothing is scored twice.
    again = evaluate_with_pool(config_yaml, there, children, registry)
    assert again == remote


def test_holds_keep_two_tasks_off_one_evaluator(trained_store, tmp_path, evaluators):
    config_yaml, store_uri = _copy(trained_store, tmp_path, "holds")
    registry = evaluators(config_yaml, store_uri, "run-2", 1)
    store = CampaignStore(store_uri)
    first = EvaluatorPool(store, registry, holder="task-a", wait_s=60)
    second = EvaluatorPool(store, registry, holder="task-b", wait_s=1.0)
    with first.held() as (name, backend):
        assert name == "e0" and backend.healthy()
        with (
            pytest.raises(EvaluatorUnavailableError, match="no warm evaluator of run run-2"),
            second.held(),
        ):
            pass
    with second.held() as (name, _):  # given back: the other task may take it now
        assert name == "e0"
    # A hold whose task died expires.
    expired = EvaluatorPool(store, registry, holder="task-c", wait_s=60, ttl_s=0.5)
    assert expired._take("e0")
    assert not second._take("e0")
    time.sleep(0.6)
    assert second._take("e0")


def test_a_wrong_token_is_refused_with_what_to_do(trained_store, tmp_path, evaluators):
    config_yaml, store_uri = _copy(trained_store, tmp_path, "token")
    registry = evaluators(config_yaml, store_uri, "run-3", 1)
    pool = EvaluatorPool(CampaignStore(store_uri), registry, wait_s=60)
    with pool.held() as (_, backend):
        assert backend.post("/tokenize", {"messages": [{"role": "user", "content": "hi"}]})
        wrong = ServerBackend(backend.url, "not-the-token")
        with pytest.raises(EvaluatorRequestError, match="refused the token"):
            wrong.post("/v1/completions", {"prompt": [[1, 2]], "max_tokens": 1})


def test_an_evaluator_that_dies_mid_child_hands_it_to_another(
    trained_store, tmp_path, evaluators, monkeypatch
):
    config_yaml, here = _copy(trained_store, tmp_path, "here")
    _, there = _copy(trained_store, tmp_path, "there")
    children = _breed(config_yaml, here)
    _breed(config_yaml, there)
    reference = steps.evaluate_many(config_yaml, here, children)
    registry = evaluators(config_yaml, there, "run-4", 2)
    # The first swap request any evaluator receives kills that evaluator first.
    real_swap, killed = ServerBackend.swap, []

    def swap_then_die(self, request):
        if not killed:
            name = next(e["name"] for e in registry.evaluators if e["url"] == self.url)
            pid = registry.resources["pids"][registry.names().index(name)]
            os.killpg(pid, signal.SIGKILL)
            _wait_gone(pid)
            killed.append(name)
        return real_swap(self, request)

    monkeypatch.setattr(ServerBackend, "swap", swap_then_die)
    remote = evaluate_with_pool(config_yaml, there, children, registry)
    assert killed
    assert [r["scores"] for r in remote] == [r["scores"] for r in reference]


def _run_pipeline_with_killed_evaluator(config_yaml: str, store_uri: str, root: Path) -> list:
    """The pipeline through kfp.local with two warm evaluators; once the second generation
    holds an evaluator, that evaluator's process is killed. Returns the killed names."""
    from kfp import local

    from cycleqd_kfp.pipelines.cycleqd_pipeline import PipelineOptions, build_pipeline

    killed: list[str] = []
    stop = threading.Event()

    def kill_one_mid_generation() -> None:
        store = CampaignStore(store_uri)
        while not stop.is_set():
            if (store.latest_generation() or 0) >= 1:
                for key in store.store.list("runs/"):
                    if "/holds/" not in key:
                        continue
                    owner = key.split("/")[1]
                    registry = EvaluatorRegistry.load(store, owner)
                    name = key.rsplit("/", 1)[1].removesuffix(".json")
                    pid = registry.resources["pids"][registry.names().index(name)]
                    os.killpg(pid, signal.SIGKILL)
                    killed.append(name)
                    return
            time.sleep(0.05)

    watcher = threading.Thread(target=kill_one_mid_generation, daemon=True)
    watcher.start()
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root))
    pipeline = build_pipeline(
        PipelineOptions(
            generations_per_run=3,
            warm_evaluators=2,
            evaluator_launcher="local",
            model_cache_size="",
        )
    )
    try:
        pipeline(campaign_config=config_yaml, campaign_store_uri=store_uri, tracking_uri="")
    finally:
        stop.set()
        watcher.join(5)
    return killed


@pytest.mark.slow
def test_kfp_local_campaign_with_warm_evaluators_survives_one_killed_mid_generation(
    trained_store, tmp_path, monkeypatch, reliability
):
    generations = 3
    config_yaml, here = _copy(trained_store, tmp_path, "undisturbed", generations)
    _, there = _copy(trained_store, tmp_path, "killed", generations)
    monkeypatch.setenv("CYCLEQD_EVALUATOR_WAIT_S", "120")
    monkeypatch.setenv("CYCLEQD_DRIVER_PID", str(os.getpid()))  # evaluators leave with us
    started = time.perf_counter()
    killed = _run_pipeline_with_killed_evaluator(config_yaml, there, tmp_path / "kfp")
    seconds = time.perf_counter() - started
    steps.seed(config_yaml, here)
    for _ in range(generations):
        steps.evaluate_many(config_yaml, here, steps.breed(config_yaml, here))
        steps.commit(config_yaml, here)
    same = (
        CampaignStore(there).latest_generation() == generations
        and CampaignStore(there).read_snapshot(generations)["archives"]
        == CampaignStore(here).read_snapshot(generations)["archives"]
    )
    reliability.record(
        "Service faults",
        "a warm evaluator killed mid-generation (kfp.local, two local evaluators)",
        tried=len(killed),
        survived=len(killed) if same else 0,
        detail=f"{generations} generations in {seconds:.0f} s; archives equal an undisturbed run",
    )
    assert killed, "no evaluator was held during the second generation"
    theirs, ours = CampaignStore(there), CampaignStore(here)
    assert theirs.latest_generation() == ours.latest_generation() == generations
    assert (
        theirs.read_snapshot(generations)["archives"] == ours.read_snapshot(generations)["archives"]
    )
    # The exit handler deleted the run's evaluators and their registry.
    assert not [k for k in theirs.store.list("runs/") if k.endswith("evaluators.json")]


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_of_tasks_racing_for_one_evaluator_exactly_one_holds_it(kind, tmp_path, request):
    """Holds are a compare-and-swap on the store: on a local folder and on a real S3 server
    (SeaweedFS), six tasks at once, one winner per round."""
    import uuid

    from cycleqd.objectstore import LocalObjectStore

    from .test_objectstore import s3_store

    registry = EvaluatorRegistry("run-9", "local", "t", [{"name": "e0", "url": "http://x"}])
    for round_ in range(4):
        if kind == "local":
            objects = LocalObjectStore(tmp_path / f"store-{round_}")
        else:
            objects = s3_store(request.getfixturevalue("seaweed"), prefix=f"holds/{uuid.uuid4()}")
        barrier, won = threading.Barrier(6), []

        def take(holder: str, objects=objects, barrier=barrier, won=won) -> None:
            pool = EvaluatorPool(CampaignStore(objects), registry, holder=holder)
            barrier.wait()
            if pool._take("e0"):
                won.append(holder)

        threads = [threading.Thread(target=take, args=(f"task-{i}",)) for i in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(won) == 1, won


def test_the_local_server_generates_what_the_backend_does_in_process(tmp_path):
    """A random chat model (it rarely stops early: every reply has text to compare): the
    server's replies to a batch, through /tokenize and /v1/completions, are the in-process
    backend's, batch for batch."""
    import subprocess
    import sys

    from cycleqd.evaluator_launch.local import free_port
    from cycleqd.evaluator_server import TOKEN_ENV
    from cycleqd.generate.base import SamplingParams
    from cycleqd.generate.tiny_tokenizer import save_chat_model
    from cycleqd.generate.transformers_backend import TransformersBackend

    folder = save_chat_model(tmp_path / "model", hidden=64, heads=2)
    port, token = free_port(), "secret-token"
    command = [sys.executable, "-m", "cycleqd.evaluator_server", "--model", str(folder)]
    command += ["--port", str(port), "--batch-size", "4", "--threads", "1"]
    server = subprocess.Popen(command, env={**os.environ, TOKEN_ENV: token})
    try:
        backend = ServerBackend(f"http://127.0.0.1:{port}", token)
        deadline = time.monotonic() + 120
        while not backend.healthy():
            assert server.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        conversations = [
            [{"role": "user", "content": f"question {i} " * (i + 1)}] for i in range(6)
        ]
        params = SamplingParams(max_new_tokens=12)
        remote = backend.generate(conversations, params)
    finally:
        server.terminate()
        server.wait(10)
    import torch

    torch.set_num_threads(1)
    local = TransformersBackend.from_pretrained(folder, dtype="float32", batch_size=4)
    assert remote == local.generate(conversations, params)
    assert all(reply for reply in remote)

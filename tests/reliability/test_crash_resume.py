"""Crash anywhere, resume exactly: SIGKILL the pipeline's stages at random points, many times.

A tiny campaign (random Llama world, probe evaluator, the paper's SVD mutation so that elites
are uploaded as weights and collected again) runs through the stage functions that the
Kubeflow components call (`cycleqd.steps`: seed, breed, evaluate per child, commit, export),
in worker processes forked from `stage_worker.py`. Each worker is killed with SIGKILL at a
random point: before, in the middle of (temporary file written, never renamed) or after the
N-th mutation of the store (a put or delete: config, lease, pending children, evaluation
records, model files and manifests, snapshots, LATEST, garbage collection, the export), or
after a random delay (wherever it is: materialising, evaluating, writing safetensors). After
each kill the pipeline is run again, as a retried run (same owner) or a new run whose driver
died (new owner), until it completes. Then every snapshot, evaluation record, stored model
and the export must equal those of an uninterrupted run with the same seed.
"""

from __future__ import annotations

import collections
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cycleqd import probe_world
from cycleqd.objectstore import LocalObjectStore, model_is_complete

WORKER = Path(__file__).with_name("stage_worker.py")
GENERATIONS = 3
MIN_KILLS = 40
AREAS = ("generations", "LATEST", "pending", "evaluations", "models", "exports", "lease.json")
BUDGET_S = 150.0  # stop starting new campaigns after this long (the kills so far still count)


class ForkServer:
    """`stage_worker.py` in a subprocess: one job per call, answered with the exit status."""

    def __init__(self, tmp: Path):
        env = {**os.environ, "TMPDIR": str(tmp), "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
        env.pop("CYCLEQD_DRIVER_PID", None)
        tmp.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert json.loads(self.proc.stdout.readline()) == {"ready": True}

    def run(self, **job) -> dict:
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "the fork server died"
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def _config_text(world: dict) -> str:
    config = probe_world.default_config(world, name="crash", generations=GENERATIONS)
    config.update(population=2, mutation={"kind": "svd", "w_max": 1.5})
    config["evaluation"] = {"scorer": "probe", "probe_prompts": 16}
    return yaml.safe_dump(config)


def _state(root: Path) -> dict[str, bytes]:
    """Every object a reader may use: snapshots, LATEST, records, complete models, exports."""
    store = LocalObjectStore(root)
    # Not campaign state: the lease, preflight's probe, and a run's own bookkeeping (runs/:
    # its warm evaluators, holds, the generations it committed; its exit handler deletes it).
    keys = [k for k in store.list("") if not k.startswith(("lease.json", "preflight/", "runs/"))]
    out = {}
    for key in keys:
        area = key.split("/", 1)[0]
        if area in ("models", "exports"):
            prefix = "/".join(key.split("/")[:2])
            if not model_is_complete(store, prefix):
                continue  # an invisible leftover: no reader uses it
        out[key] = store.get_bytes(key)
    return out


def _log_lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def _where(lines: list[str]) -> tuple[str, str]:
    """(stage, point) of the kill recorded in a worker's log."""
    for line in reversed(lines):
        if line.startswith("kill "):
            _, stage, _n, op, key, phase = line.split(" ")
            area = key.split("/", 1)[0] if "/" in key else key
            return stage, f"{phase} {op} {area}"
    started = [line.split(" ", 1)[1] for line in lines if line.startswith("stage ")]
    return (started[-1] if started else "start"), "timer"


def _archive_entries(snapshot: bytes) -> set[tuple]:
    archives = json.loads(snapshot)["archives"]
    return {
        (skill, tuple(e["cell"]), e["genome_id"], e["quality"])
        for skill, entries in archives.items()
        for e in entries
    }


@pytest.mark.slow
def test_sigkill_anywhere_resumes_exactly(tiny_world, tmp_path, reliability):
    text = _config_text(tiny_world)
    server = ForkServer(tmp_path / "tmp")
    rng = random.Random(20250)
    started = time.monotonic()
    try:
        # The uninterrupted run with the same seed.
        log = tmp_path / "baseline.log"
        answer = server.run(
            config=text, store=str(tmp_path / "baseline"), owner="base", log=str(log)
        )
        lines = _log_lines(log)
        assert answer == {"exit": 0, "timer": False}, lines
        result = json.loads(next(line[7:] for line in lines if line.startswith("result ")))
        mutations = result["mutations"]
        expected = _state(tmp_path / "baseline")
        final_key = f"generations/{GENERATIONS:06d}.json"
        assert final_key in expected and expected["LATEST"] == f"{GENERATIONS}\n".encode()

        kills, resumed, lost, campaigns = 0, 0, 0, 0
        where: collections.Counter[tuple[str, str]] = collections.Counter()
        resumed_from: collections.Counter[int] = collections.Counter()
        while kills < MIN_KILLS or campaigns == 0:
            assert time.monotonic() - started < BUDGET_S * 2, "the kill campaign took too long"
            if kills >= MIN_KILLS // 4 and time.monotonic() - started > BUDGET_S:
                break
            campaigns += 1
            root = tmp_path / f"campaign-{campaigns}"
            owner = f"run-{campaigns}-0"
            for attempt in range(200):
                log = tmp_path / f"campaign-{campaigns}-{attempt}.log"
                draw = rng.random()
                if draw < 0.15:
                    plan = {"delay": rng.uniform(0.3, 4.0)}
                elif draw < 0.6:  # aim at one kind of object, so that every kind is hit
                    plan = {
                        "kill_area": rng.choice(AREAS),
                        "kill_at": rng.randint(1, 2),
                        "phase": rng.choice(["before", "torn", "after"]),
                    }
                else:
                    plan = {
                        "kill_at": rng.randint(1, max(2, mutations // 3)),
                        "phase": rng.choice(["before", "torn", "after"]),
                    }
                driver = attempt > 0 and rng.random() < 0.5
                if driver:  # a new run: the killed one was a local driver, now gone
                    owner = f"run-{campaigns}-{attempt}"
                answer = server.run(
                    config=text, store=str(root), owner=owner, log=str(log), driver=True, **plan
                )
                lines = _log_lines(log)
                if answer.get("exit") == 0:
                    break
                assert answer.get("signal") == 9, "\n".join(lines)  # killed, never an error
                kills += 1
                where[_where(lines)] += 1
                # What a rerun finds: LATEST names a complete generation, equal to the
                # uninterrupted run's.
                after = _state(root)
                if "LATEST" in after:
                    latest = int(after["LATEST"])
                    key = f"generations/{latest:06d}.json"
                    assert after[key] == expected[key]
                    resumed_from[latest] += 1
                resumed += 1
            else:
                pytest.fail("the campaign never completed")
            got = _state(root)
            lost += len(_archive_entries(expected[final_key]) - _archive_entries(got[final_key]))
            # Not only the archives: every snapshot, record, model and the export are the same.
            assert got.keys() == expected.keys()
            assert [k for k in got if got[k] != expected[k]] == []
    finally:
        server.close()

    stages = collections.Counter(stage for stage, _ in where.elements())
    assert {"seed", "breed", "evaluate", "commit", "export"} <= set(stages), stages
    assert kills >= MIN_KILLS // 4 and lost == 0
    points = ", ".join(
        f"{p}: {n}"
        for p, n in sorted(collections.Counter(point for _, point in where.elements()).items())
    )
    reliability.record(
        "Crash anywhere, resume exactly",
        "SIGKILL of the pipeline's stages (seed, breed, evaluate, commit, export) at random "
        "store writes, torn writes, deletes and random times",
        tried=kills,
        survived=resumed,
        lost=lost,
        detail=(
            f"{campaigns} tiny campaigns ({GENERATIONS} generations x 2 children, paper SVD "
            f"mutation: elites uploaded as weights), each rerun after every kill until complete, "
            f"then compared with an uninterrupted run: every snapshot, evaluation record, "
            f"stored model and the export byte-identical. Kills by stage: "
            + ", ".join(f"{s} {n}" for s, n in sorted(stages.items()))
            + f". Kill points: {points}. Reruns resumed after generation: "
            + ", ".join(f"{g}: {n}" for g, n in sorted(resumed_from.items()))
            + f"; {mutations} store mutations in a full run."
        ),
    )

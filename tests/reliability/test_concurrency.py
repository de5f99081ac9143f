"""Two runs on one campaign: the second is refused at once, naming the holder; the first
completes with the archives of an uninterrupted run. A recurring run that fires while the
previous one still runs is refused at preflight and at every writing stage, and harms nothing.
(tests/integration/test_campaign_store.py covers the lease itself: expiry, killed drivers.)"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cycleqd import probe_world, steps
from cycleqd.campaign import Campaign
from cycleqd.config import parse_config
from cycleqd.state import CampaignLockedError, CampaignStore

from .conftest import tree_digest

# A campaign run in its own process; `ready` appears once it holds the lease. After its first
# generation it waits (at most 2 minutes) for `hold` to appear: the second run surely meets it.
RUNNER = """
import json, sys, time
from pathlib import Path
from cycleqd import probe_world
from cycleqd.campaign import Campaign
from cycleqd.config import parse_config
from cycleqd.errors import CycleQDError
from cycleqd.state import CampaignStore

spec = json.loads(sys.argv[1])
config = parse_config(spec["config"])
evaluator = probe_world.ProbeEvaluator(spec["config"]["models"]["experts"])
try:
    with Campaign(config, CampaignStore(spec["store"]), evaluator) as campaign:
        Path(spec["ready"]).write_text("held")
        def hold(generation, results):
            deadline = time.monotonic() + 120
            while spec["hold"] and not Path(spec["hold"]).exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        campaign.run(hold)
except CycleQDError as exc:
    print(f"error: {exc}", file=sys.stderr)
    sys.exit(2)
"""


def _spawn(config: dict, store: Path, ready: Path, hold: Path | None) -> subprocess.Popen:
    spec = {"config": config, "store": str(store), "ready": str(ready), "hold": str(hold or "")}
    return subprocess.Popen(
        [sys.executable, "-c", RUNNER, json.dumps(spec)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )


@pytest.mark.slow
def test_second_process_is_refused_naming_the_holder_and_the_first_completes(
    tiny_world, probe_evaluator, tmp_path, reliability
):
    config = probe_world.default_config(tiny_world, generations=5)
    store = tmp_path / "campaign"
    first = _spawn(config, store, tmp_path / "first.ready", hold=tmp_path / "second.done")
    deadline = time.monotonic() + 120
    while not (tmp_path / "first.ready").exists():
        assert first.poll() is None, first.communicate()
        assert time.monotonic() < deadline, "the first run never took the lease"
        time.sleep(0.05)
    started = time.monotonic()
    second = _spawn(config, store, tmp_path / "second.ready", hold=None)
    _, err = second.communicate(timeout=120)
    refused_in = time.monotonic() - started  # mostly its start: importing torch, the evaluator
    (tmp_path / "second.done").write_text("done")
    _, err1 = first.communicate(timeout=300)

    behaved = {
        "second refused": second.returncode == 2 and not (tmp_path / "second.ready").exists(),
        "names the holder": f"host {socket.gethostname()}, pid {first.pid}" in err,
        "no traceback": "Traceback" not in err,
        "first completed": first.returncode == 0,
    }
    # The first run's campaign equals one nobody disturbed.
    with Campaign(parse_config(config), CampaignStore(tmp_path / "alone"), probe_evaluator) as c:
        c.run()
        alone = c.archives.to_dict()
    disturbed = CampaignStore(store)
    lost = 0
    if first.returncode == 0:
        latest = disturbed.latest_generation()
        archives = disturbed.read_snapshot(latest)["archives"]
        behaved["same archives"] = latest == 5 and archives == alone
        lost = sum(len(v) for v in alone.values()) - sum(
            1 for s, v in archives.items() for e in v if e in alone.get(s, [])
        )
    behaved["lease given back"] = disturbed.read_lease() is None
    reliability.record(
        "Concurrency",
        "two processes run one campaign at once",
        tried=len(behaved),
        survived=sum(behaved.values()),
        lost=lost,
        detail=f"second refused after {refused_in:.1f} s naming host and pid; first completed "
        "with the archives of an undisturbed run",
    )
    assert all(behaved.values()), (behaved, err, err1)


def test_recurring_run_fired_while_the_previous_runs_is_refused_and_harms_nothing(
    tiny_world, tmp_path, reliability
):
    text = yaml.safe_dump(probe_world.default_config(tiny_world, generations=3))
    store = str(tmp_path / "campaign")
    # Run 1 (a Kubeflow run: its tasks share its lease) has seeded and bred generation 1.
    steps.preflight(text, store, owner="run-1")
    steps.seed(text, store, owner="run-1")
    children = steps.breed(text, store, owner="run-1")
    before = tree_digest(Path(store), skip=())
    # Run 2 fires (the recurring schedule): every stage that writes is refused.
    attempts = {
        "preflight": lambda: steps.preflight(text, store, owner="run-2"),
        "seed": lambda: steps.seed(text, store, owner="run-2"),
        "breed": lambda: steps.breed(text, store, owner="run-2"),
        "commit": lambda: steps.commit(text, store, owner="run-2"),
        "export": lambda: steps.export(text, store, owner="run-2"),
    }
    refused = {}
    for name, attempt in attempts.items():
        try:
            attempt()
            refused[name] = False
        except CampaignLockedError as exc:
            refused[name] = "being written by another run (host" in str(exc)
    untouched = tree_digest(Path(store), skip=()) == before
    # Run 1 goes on as if nothing happened, to the end.
    for gid in children:
        steps.evaluate(text, store, gid)
    steps.commit(text, store, owner="run-1")
    while children := steps.breed(text, store, owner="run-1"):
        for gid in children:
            steps.evaluate(text, store, gid)
        steps.commit(text, store, owner="run-1")
    steps.export(text, store, owner="run-1")
    steps.release(store, "run-1")
    finished = CampaignStore(store).latest_generation() == 3
    # ...after which the recurring run may go on.
    resumed = steps.preflight(text, store, owner="run-2")["latest_generation"] == 3
    behaved = [*refused.values(), untouched, finished, resumed]
    reliability.record(
        "Concurrency",
        "a recurring run fires while the previous run still holds the campaign",
        tried=len(behaved),
        survived=sum(behaved),
        detail="preflight, seed, breed, commit and export of the second run refused naming the "
        "holder; the store unchanged; the first run finished; the next run then resumed",
    )
    assert all(behaved), (refused, untouched, finished, resumed)

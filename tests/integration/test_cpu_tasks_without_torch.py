"""The pipeline's CPU-only tasks (preflight, plan, breed, commit, release) never import torch:
each is a fresh process per generation (a pod on Kubeflow, a subprocess with kfp.local), and
importing torch alone costs about a second of it. Only the tasks that build or score models
need it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from cycleqd import probe_world, steps

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "safetensors", "transformers", "mlflow", "matplotlib")

# Runs the tasks' component functions as the KFP executor would, in a fresh interpreter, and
# prints which heavy modules they imported.
TASKS = """
import json, sys
from kfp import dsl
from cycleqd_kfp.components.breed.component import breed
from cycleqd_kfp.components.commit.component import commit
from cycleqd_kfp.components.plan.component import plan
from cycleqd_kfp.components.preflight.component import preflight
from cycleqd_kfp.components.release.component import release

task, config, store, out = sys.argv[1:5]
result = None
if task == "preflight+plan+breed":
    preflight.python_func(campaign_config=config, store_uri=store, tracking_uri="", run_owner="r")
    assert not plan.python_func(campaign_config=config, store_uri=store, stage="seed")
    result = breed.python_func(campaign_config=config, store_uri=store, run_owner="r", shards=2)
elif task == "commit+plan+release":
    result = json.loads(commit.python_func(
        campaign_config=config, store_uri=store, tracking_uri="", run_owner="r",
        archives=dsl.Metrics(name="archives", uri=out + "/archives", metadata={}),
        elite_maps=dsl.HTML(name="elite_maps", uri=out + "/maps.html", metadata={}),
    ))
    assert plan.python_func(campaign_config=config, store_uri=store, stage="export")
    release.python_func(store_uri=store, run_owner="r")
heavy = sorted({m.split(".")[0] for m in sys.modules} & set(sys.argv[5].split(",")))
print(json.dumps({"result": result, "imported": heavy}))
"""


def _run(task: str, config: str, store: str, out: Path) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", TASKS, task, config, store, str(out), ",".join(HEAVY)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_breed_and_commit_tasks_run_without_torch(tiny_world, tmp_path):
    config = yaml.safe_dump(
        {**probe_world.default_config(tiny_world, generations=1), "population": 3}
    )
    store = str(tmp_path / "campaign")
    steps.seed(config, store, owner="r")  # scores the experts: torch, in this process

    bred = _run("preflight+plan+breed", config, store, tmp_path)
    assert bred["imported"] == [], f"preflight/plan/breed imported {bred['imported']}"
    children = [gid for shard in bred["result"] for gid in shard.split(",")]
    assert len(children) == 3
    steps.evaluate_many(config, store, children)  # the evaluation task: torch, in this process

    committed = _run("commit+plan+release", config, store, tmp_path)
    # Its elite maps for the Kubeflow UI are SVG, drawn without matplotlib.
    assert committed["imported"] == [], f"commit/plan/release imported {committed['imported']}"
    maps = (tmp_path / "maps.html").read_text()
    assert maps.count("<svg") == len(probe_world.SKILLS) and "after generation 1" in maps
    assert committed["result"]["generation"] == 1 and committed["result"]["committed"]

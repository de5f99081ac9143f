"""The Kubeflow pipeline end to end through kfp.local, against a real SeaweedFS S3 store and a
real MLflow server; and a local run killed mid-campaign that resumes without losing anything."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import cycleqd_tests_mlflow_server as mlflow_server
import pytest
import yaml

from cycleqd import probe_world
from cycleqd.campaign import Campaign
from cycleqd.config import parse_config
from cycleqd.objectstore import S3ObjectStore
from cycleqd.state import CampaignStore

pytestmark = pytest.mark.slow


@pytest.fixture
def mlflow_on_s3(seaweed, tmp_path):
    server = mlflow_server.MLflowServer(
        tmp_path / "mlflow",
        f"sqlite:///{tmp_path / 'mlflow.db'}",
        artifacts_destination=f"s3://{seaweed.bucket}/mlartifacts-{uuid.uuid4().hex[:6]}",
        env=mlflow_server.s3_environment(seaweed),
    )
    server.start()
    yield server
    server.kill()


def test_pipeline_on_s3_and_mlflow(tiny_world, seaweed, mlflow_on_s3, tmp_path, monkeypatch):
    from kfp import local
    from mlflow import MlflowClient

    from cycleqd_kfp.pipelines.cycleqd_pipeline import PipelineOptions, build_pipeline

    # What the Kubernetes secret gives the pods, here given to kfp.local's subprocesses.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweed.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweed.secret_key)
    monkeypatch.setenv("CYCLEQD_S3_ENDPOINT", seaweed.endpoint)
    prefix = f"campaigns/{uuid.uuid4().hex[:8]}"
    store_uri = f"s3://{seaweed.bucket}/{prefix}"
    config = {
        **probe_world.default_config(tiny_world, generations=2, name="pipe"),
        "population": 2,
        "mutation": {"kind": "svd"},
    }
    # As from the Kubeflow UI: the config by URI (read with the store's credentials), its
    # target raised by the run's parameter.
    config_key = f"{prefix}-config.yaml"
    seaweed.client().put_object(
        Bucket=seaweed.bucket, Key=config_key, Body=yaml.safe_dump({**config, "generations": 1})
    )
    pipeline = build_pipeline(PipelineOptions(generations_per_run=2, parallelism=2))

    def run_pipeline(root: str) -> set[str]:
        """Runs the pipeline through kfp.local; returns the tasks that ran (kfp.local gives
        each task that runs a folder in the run's pipeline root, and a skipped one none)."""
        local.init(
            runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / root)
        )
        pipeline(
            campaign_config=f"s3://{seaweed.bucket}/{config_key}",
            campaign_store_uri=store_uri,
            tracking_uri=mlflow_on_s3.uri,
            search_generations=2,
        )
        return {task.name for task in (tmp_path / root).glob("*/*") if task.is_dir()}

    assert {"seed", "export"} <= run_pipeline("r")

    store = CampaignStore(
        S3ObjectStore(
            seaweed.bucket,
            prefix,
            seaweed.endpoint,
            access_key_id=seaweed.access_key,
            secret_access_key=seaweed.secret_key,
        )
    )
    assert store.latest_generation() == 2 and store.read_lease() is None
    snapshot = store.read_snapshot(2)
    children = [g for g in snapshot["genomes"] if g["kind"] == "child"]
    assert len(children) == 4
    keys = store.store.list("")
    for child in children:  # every child was evaluated once, its record kept
        assert f"evaluations/{child['id']}.json" in keys
    # Paper SVD elites are stored as weights, and only those.
    elites = {e["genome_id"] for cells in snapshot["archives"].values() for e in cells}
    assert set(store.stored_models()) == {c["id"] for c in children} & elites
    (final,) = store.stored_models("exports")
    assert f"exports/{final}/cycleqd-manifest.json" in keys
    # The same campaign in one process gives the same archives.
    with Campaign(
        parse_config(config),
        CampaignStore(tmp_path / "in-process"),
        probe_world.ProbeEvaluator(tiny_world["experts"]),
    ) as whole:
        whole.run()
        assert whole.archives.to_dict() == snapshot["archives"]

    # MLflow: the registered final model leads back to the experts and the base.
    client = MlflowClient(mlflow_on_s3.uri)
    (version,) = client.search_model_versions("name = 'pipe-final'")
    frontier, kinds = [version.source.removeprefix("models:/")], []
    seen = set()
    while frontier:
        model = client.get_logged_model(frontier.pop())
        if model.model_id in seen:
            continue
        seen.add(model.model_id)
        kinds.append(model.tags["cycleqd.kind"])
        frontier += [
            v
            for k, v in model.tags.items()
            if k.startswith("cycleqd.parent.") and k.endswith(".model_id")
        ]
        if model.tags["cycleqd.kind"] == "expert":
            frontier.append(model.tags["cycleqd.base.model_id"])
    assert kinds.count("base") == 1 and kinds.count("expert") == 3 and "final" in kinds
    artifacts = s3_server_objects(seaweed)
    assert any(k.endswith(".png") for k in artifacts), "elite maps in the S3 artifact store"

    # A rerun of the finished campaign plans on the CPU and starts no GPU task: the campaign
    # is seeded, no generation is left, and the final model is exported.
    ran = run_pipeline("rerun")
    assert not ran & {"seed", "evaluate", "export"}, sorted(ran)
    assert {"preflight", "plan", "release"} <= ran
    assert store.stored_models("exports") == [final] and store.read_lease() is None


def s3_server_objects(seaweed) -> list[str]:
    client = seaweed.client()
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=seaweed.bucket)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def test_killed_local_run_resumes_without_loss(tiny_world, tmp_path):
    config = {
        **probe_world.default_config(tiny_world, generations=4, name="killed"),
        "population": 1,
    }
    path = tmp_path / "campaign.yaml"
    path.write_text(yaml.safe_dump(config))
    workdir = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "cycleqd_kfp.pipelines.cli",
        "run",
        "--config",
        str(path),
        "--workdir",
        str(workdir),
        "--no-tracking",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    store = CampaignStore(workdir / "campaign")
    deadline = time.monotonic() + 400
    while (store.latest_generation() or 0) < 2:
        assert first.poll() is None, first.stdout.read()
        assert time.monotonic() < deadline, "the first run never reached generation 2"
        time.sleep(0.5)
    os.killpg(first.pid, signal.SIGKILL)  # the driver and every task it started
    first.wait()
    killed_at = store.latest_generation()
    assert store.read_lease() is not None  # the dead run's lease is still there...

    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout + second.stderr
    # ...and was taken over at once (its driver is gone); the run resumed where it stopped.
    assert f"resuming campaign 'killed' after generation {killed_at}" in second.stdout
    assert f"gen {killed_at:4d}/" not in second.stdout  # no generation done twice
    assert store.latest_generation() == 4
    assert "final (merge_best)" in second.stdout and "average of experts" in second.stdout
    assert sorted(p.name for p in (workdir / "elite-maps").iterdir()) == [
        f"{s}.png" for s in sorted(probe_world.SKILLS)
    ]
    with Campaign(
        parse_config(config),
        CampaignStore(tmp_path / "whole"),
        probe_world.ProbeEvaluator(tiny_world["experts"]),
    ) as whole:
        whole.run()
        assert whole.archives.to_dict() == store.read_snapshot(4)["archives"]
    assert json.loads(json.dumps(store.read_snapshot(4)))  # nothing half-written

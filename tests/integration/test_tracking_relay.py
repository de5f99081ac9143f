"""Tracking relayed through a local run's service: tasks hand their MLflow events over and
return without importing mlflow; MLflow ends up holding what tasks tracking on their own would
have written; a task whose service is gone tracks on its own and loses nothing."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import yaml
from mlflow import MlflowClient

from cycleqd import probe_world, steps
from cycleqd.evaluation_service import SOCKET_ENV
from cycleqd.evaluation_service import evaluation_service as service


def _config(world) -> str:
    return yaml.safe_dump(
        {**probe_world.default_config(world, generations=3), "name": "relay", "population": 2}
    )


def _campaign(config: str, store: str, tracking: str) -> None:
    """The pipeline's steps, each as its task would call it."""
    steps.preflight(config, store, tracking, owner="run")
    steps.seed(config, store, tracking, owner="run")
    while children := steps.breed(config, store, owner="run"):
        steps.evaluate_many(config, store, children)
        steps.commit(config, store, tracking, owner="run")
    steps.export(config, store, tracking, owner="run")


def _recorded(tracking: str) -> dict:
    """What MLflow holds of the campaign, by stable keys (ids differ between stores)."""
    client = MlflowClient(tracking)
    (experiment,) = [e for e in client.search_experiments() if e.name == "relay"]
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    models = client.search_logged_models([experiment.experiment_id])
    return {
        "runs": sorted(
            (
                r.data.tags.get("cycleqd.key", ""),
                r.info.status,
                tuple(sorted(r.data.metrics.items())),
            )
            for r in runs
        ),
        "models": sorted(
            (m.tags["cycleqd.genome_id"], tuple(sorted((x.key, x.value) for x in m.metrics or [])))
            for m in models
        ),
        "champion": client.get_model_version_by_alias("relay-final", "champion").tags[
            "cycleqd.genome_id"
        ],
    }


def test_relayed_events_record_what_tasks_tracking_on_their_own_record(
    tiny_world, tmp_path, monkeypatch
):
    monkeypatch.delenv(SOCKET_ENV, raising=False)
    config = _config(tiny_world)
    alone = f"sqlite:///{tmp_path / 'alone.db'}"
    _campaign(config, str(tmp_path / "alone"), alone)
    relayed = f"sqlite:///{tmp_path / 'relayed.db'}"
    with service(tmp_path / "server.log") as server:
        assert server.running
        _campaign(config, str(tmp_path / "relayed"), relayed)
    # Leaving the block had the server deliver everything before it stopped.
    assert _recorded(relayed) == _recorded(alone)


def test_a_commit_task_with_a_relay_never_imports_mlflow(tiny_world, tmp_path, monkeypatch):
    monkeypatch.delenv(SOCKET_ENV, raising=False)
    config = _config(tiny_world)
    store, tracking = str(tmp_path / "campaign"), f"sqlite:///{tmp_path / 'ml.db'}"
    (tmp_path / "config.yaml").write_text(config)
    task = textwrap.dedent(
        f"""
        import sys
        from cycleqd import steps
        config = open({str(tmp_path / "config.yaml")!r}).read()
        steps.commit(config, {store!r}, {tracking!r}, owner="run")
        print("mlflow imported:", "mlflow" in sys.modules)
        """
    )
    with service(tmp_path / "server.log"):
        steps.preflight(config, store, tracking, owner="run")
        steps.seed(config, store, tracking, owner="run")
        steps.evaluate_many(config, store, steps.breed(config, store, owner="run"))
        out = subprocess.run(
            [sys.executable, "-c", task], capture_output=True, text=True, check=True
        ).stdout
    assert "mlflow imported: False" in out
    client = MlflowClient(tracking)
    (experiment,) = [e for e in client.search_experiments() if e.name == "relay"]
    generations = client.search_runs(
        [experiment.experiment_id], "tags.`cycleqd.role` = 'generation'"
    )
    assert {r.data.tags["cycleqd.key"] for r in generations} == {"generation/0", "generation/1"}


def test_a_task_whose_service_is_gone_tracks_on_its_own(tiny_world, tmp_path, monkeypatch):
    config = _config(tiny_world)
    alone = f"sqlite:///{tmp_path / 'alone.db'}"
    monkeypatch.delenv(SOCKET_ENV, raising=False)
    _campaign(config, str(tmp_path / "alone"), alone)
    gone = f"sqlite:///{tmp_path / 'gone.db'}"
    monkeypatch.setenv(SOCKET_ENV, str(tmp_path / "no-such-socket"))
    _campaign(config, str(tmp_path / "gone"), gone)
    assert _recorded(gone) == _recorded(alone)

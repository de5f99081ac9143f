"""The command line as a user meets it: the embedded quick-start run, resume, inspect."""

from __future__ import annotations

import yaml

from cycleqd import probe_world
from cycleqd.cli import main


def test_embedded_quick_start_run(tmp_path, capsys):
    workdir = tmp_path / "run"
    assert main(["run", "--world", "probe", "--workdir", str(workdir), "--generations", "4"]) == 0
    out = capsys.readouterr().out
    assert "building the tiny probe world" in out
    for label in (
        "expert probe_a",
        "expert probe_b",
        "expert probe_c",
        "average of experts",
        "final (merge_best)",
    ):
        assert label in out
    exports = list((workdir / "campaign" / "exports").iterdir())
    assert len(exports) == 1 and (exports[0] / "cycleqd-manifest.json").exists()
    maps = sorted(p.name for p in (workdir / "elite-maps").iterdir())
    assert maps == [f"{s}.png" for s in sorted(probe_world.SKILLS)]
    assert all((workdir / "elite-maps" / m).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for m in maps)
    assert (workdir / "campaign" / "generations" / "000004.json").exists()
    # Tracked in the embedded MLflow store: one run per generation, the final model registered.
    assert "MLflow: sqlite:///" in out and "not delivered" not in out
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tiny")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    generations = {r.data.tags.get("cycleqd.generation") for r in runs}
    assert {"0", "1", "2", "3", "4"} <= generations
    (version,) = client.search_model_versions("name = 'tiny-final'")
    assert version.tags.get("cycleqd.model_id") or version.source.startswith("models:/")


def test_cli_run_and_resume(tiny_world, tmp_path, capsys):
    config = probe_world.default_config(tiny_world, generations=3)
    path = tmp_path / "campaign.yaml"
    path.write_text(yaml.safe_dump(config))
    workdir = str(tmp_path / "run")
    assert main(["run", "--config", str(path), "--workdir", workdir]) == 0
    out = capsys.readouterr().out
    assert "gen    3/3" in out and "final (merge_best)" in out and "average of experts" in out
    assert main(["run", "--config", str(path), "--workdir", workdir, "--generations", "5"]) == 0
    out = capsys.readouterr().out
    assert "resuming campaign 'tiny' after generation 3" in out
    assert "gen    4/5" in out and "gen    3/" not in out
    assert main(["inspect", f"{workdir}/campaign"]) == 0
    assert "last complete generation 5" in capsys.readouterr().out

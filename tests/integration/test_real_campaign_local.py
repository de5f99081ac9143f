"""A real campaign through the Kubeflow pipeline (kfp.local): SmolLM2-135M-Instruct as the base,
children scored on the real coding (MBPP+), db (DBBench on MariaDB) and os (AgentBench OS in
the sandbox) skills, the campaign in S3 (SeaweedFS), tracked in a real MLflow server; every
model's per-sample transcripts kept in the store and shown by `cycleqd inspect`.

The experts here are the base with small random low-rank changes (fine-tuned experts are the
experts stage's job): the point is the path, not the scores, which stay near 0 on db and os
(SmolLM2 does not follow their action formats)."""

from __future__ import annotations

import contextlib
import io
import uuid
from pathlib import Path

import cycleqd_tests_mlflow_server as mlflow_server
import pytest
import yaml

from cycleqd import cli
from cycleqd.objectstore import S3ObjectStore
from cycleqd.state import CampaignStore

pytestmark = pytest.mark.slow

SKILLS = ("coding", "db", "os")


@pytest.fixture(scope="module")
def smollm2_experts(smollm2, tmp_path_factory) -> dict[str, Path]:
    """Three 'experts': SmolLM2 plus a small random rank-4 change of every matrix."""
    from cycleqd import probe_world

    root = tmp_path_factory.mktemp("smollm2-experts")
    return {
        skill: probe_world.build_expert(smollm2, root / skill, seed=i + 1, strength=0.02)
        for i, skill in enumerate(SKILLS)
    }


def test_real_campaign_through_kfp_local_on_s3_mariadb_and_mlflow(
    real_skills_services, smollm2, smollm2_experts, seaweed, tmp_path, monkeypatch
):
    from kfp import local
    from mlflow import MlflowClient

    from cycleqd_kfp.pipelines.cycleqd_pipeline import PipelineOptions, build_pipeline

    # What the Kubernetes secret gives the pods, here given to kfp.local's subprocesses.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweed.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweed.secret_key)
    monkeypatch.setenv("CYCLEQD_S3_ENDPOINT", seaweed.endpoint)
    run = uuid.uuid4().hex[:8]
    # Few tasks, one round, short replies: SmolLM2 needs ~1 s per 300 prompt tokens on one
    # core here, and AgentBench's prompts are ~700 tokens without the one-shot example.
    common = {"data": str(real_skills_services), "limit": 1, "max_new_tokens": 48}
    config = {
        "name": "real-smollm2",
        "seed": 0,
        "generations": 2,
        "population": 1,
        "dtype": "float32",
        "skills": [
            {"name": "coding", "bc_max": 0.5, **common, "limit": 2},
            {"name": "db", "bc_max": 0.5, "max_rounds": 1, **common},
            {"name": "os", "bc_max": 0.5, "max_rounds": 1, "one_shot": False, **common},
        ],
        # Models in mounted folders (a PersistentVolumeClaim on a cluster); models on S3 are
        # covered by tests/integration/test_model_sources.py.
        "models": {
            "base": str(smollm2),
            "experts": {skill: str(folder) for skill, folder in smollm2_experts.items()},
        },
        "mutation": {"kind": "svd_expert", "rate": 0.3},
        "evaluation": {"backend": {"kind": "transformers", "device": "cpu", "batch_size": 8}},
    }
    server = mlflow_server.MLflowServer(tmp_path / "mlflow", f"sqlite:///{tmp_path / 'ml.db'}")
    server.start()
    try:
        store_uri = f"s3://{seaweed.bucket}/campaigns/{run}"
        local.init(
            runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root")
        )
        build_pipeline(PipelineOptions(generations_per_run=2, parallelism=1))(
            campaign_config=yaml.safe_dump(config),
            campaign_store_uri=store_uri,
            tracking_uri=server.uri,
        )
        runs = MlflowClient(server.uri).search_runs(
            [MlflowClient(server.uri).get_experiment_by_name("real-smollm2").experiment_id]
        )
    finally:
        server.kill()

    store = CampaignStore(
        S3ObjectStore(
            seaweed.bucket,
            f"campaigns/{run}",
            seaweed.endpoint,
            access_key_id=seaweed.access_key,
            secret_access_key=seaweed.secret_key,
        )
    )
    assert store.latest_generation() == 2 and store.read_lease() is None
    snapshot = store.read_snapshot(2)
    children = [r["id"] for g in (1, 2) for r in store.get_json(f"pending/{g:06d}.json")]
    experts = [g["id"] for g in snapshot["genomes"] if g["kind"] == "expert"]
    assert len(children) == 2 and len(experts) == 3
    for gid in children + experts:  # every scored model, on every skill, every sample
        kept = store.get_json(f"transcripts/{gid}.json")
        assert set(kept) == set(SKILLS), gid
        for skill, result in kept.items():
            samples = result["samples"]
            assert len(samples) == (2 if skill == "coding" else 1)
            assert all(s["detail"]["transcript"] for s in samples)
            assert skill != "db" or result["samples"][0]["detail"]["type"]
    for gid in children:
        assert set(store.get_json(f"evaluations/{gid}.json")["scores"]) == set(SKILLS)
    # A real chat model writes Python: its replies hold code blocks that the sandbox ran.
    coding = store.get_json(f"transcripts/{experts[0]}.json")["coding"]["samples"]
    assert any("def " in s["detail"]["reply"] for s in coding)
    assert runs, "the campaign is tracked in MLflow"

    shown = io.StringIO()
    with contextlib.redirect_stdout(shown):
        assert cli.main(["inspect", store_uri]) == 0
        assert cli.main(["inspect", store_uri, "--genome", children[-1], "--skill", "os"]) == 0
    text = shown.getvalue()
    assert f"{children[-1]}  coding=" in text and "[transcripts]" in text
    assert "== os: quality" in text and "[user]" in text and "[assistant]" in text

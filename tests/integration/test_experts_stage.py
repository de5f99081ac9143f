"""The experts stage: experts given as fine-tuning specs are trained from the base by the
stage (in process, and through kfp.local in `cycleqd run`), published in the campaign store,
seeded from there, never trained twice, and a killed run resumes bit for bit. The `finetune`
component on its own: components/finetune/test_component.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cycleqd.config import parse_config
from cycleqd.errors import CycleQDError
from cycleqd.experts import experts_to_train, train_expert
from cycleqd.finetune.expert import published_expert
from cycleqd.finetune.trainer import list_checkpoints
from cycleqd.objectstore import model_is_complete
from cycleqd.skills.tiny import FAMILIES
from cycleqd.skills.tiny.train import MINI_WORLD, TrainConfig, WorldConfig, build_base
from cycleqd.skills.tiny.train import campaign_config as tiny_campaign_config
from cycleqd.state import CampaignStore
from cycleqd.weights import MANIFEST

ROOT = Path(__file__).resolve().parents[2]

MINI = MINI_WORLD


def _config(world: dict, **overrides) -> dict:
    data = tiny_campaign_config(world, name="mini", generations=1, samples=3, population=1)
    return {**data, **overrides}


def test_the_stage_publishes_each_expert_once_and_the_campaign_seeds_from_it(
    mini_skill_world, tmp_path
):
    from cycleqd.campaign import Campaign
    from cycleqd.evaluators import build_evaluator

    config = parse_config(_config(mini_skill_world))
    store = CampaignStore(tmp_path / "campaign")
    assert experts_to_train(config) == list(FAMILIES)
    with (
        Campaign(config, store, build_evaluator(config)) as campaign,
        pytest.raises(CycleQDError, match=r"not published .* run the experts stage first"),
    ):
        campaign.seed()
    records = {s: train_expert(config, store.uri, s) for s in FAMILIES}
    for skill, record in records.items():
        assert record["steps"] == MINI.expert.steps and not record["reused"]
        expert = published_expert(store.store, store.expert_prefix(skill))
        assert expert.sha256 == record["sha256"]
        assert store.store.exists(store.training_set_key(skill))  # what it was trained on
        assert list_checkpoints(store.store, store.checkpoints_prefix(skill)) == []
    with Campaign(config, store, build_evaluator(config)) as campaign:
        # The campaign's expert genomes are the published ones (the manifests' records).
        assert campaign.book.expert_ids() == {s: r["genome_id"] for s, r in records.items()}
        campaign.seed()
        assert campaign.generation == 0
    again = train_expert(config, store.uri, "tiny_sql")
    assert again["reused"] and again["sha256"] == records["tiny_sql"]["sha256"]


def test_a_store_of_another_campaign_is_refused_before_training(mini_skill_world, tmp_path):
    store = tmp_path / "campaign"
    train_expert(parse_config(_config(mini_skill_world)), str(store), "tiny_code")
    other = _config(mini_skill_world)
    other["models"]["experts"]["tiny_code"]["learning_rate"] = 0.5
    with pytest.raises(CycleQDError, match="different config"):
        train_expert(parse_config(other), str(store), "tiny_code")


def _experts_cli(config_path: Path, workdir: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "cycleqd_kfp.pipelines.cli", "experts", "--config"]
    argv += [str(config_path), "--workdir", str(workdir), "--skill", "tiny_code", "--no-tracking"]
    return subprocess.Popen(
        argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


@pytest.mark.slow
def test_a_fine_tuning_task_killed_with_sigkill_and_rerun_publishes_the_same_bytes(
    tmp_path,
):
    """A bigger model than MINI (so that training takes seconds and the kill lands mid-run),
    killed after its first checkpoint; the rerun resumes and publishes exactly the expert
    of an uninterrupted run."""
    world = build_base(
        tmp_path / "world",
        WorldConfig(n_warmup=20, n_general_skill=5, base=TrainConfig(steps=4, batch_size=4)),
    )
    data = _config(world)
    data["models"]["experts"]["tiny_code"].update(max_steps=40, checkpoint_every=8, batch_size=8)
    path = tmp_path / "campaign.yaml"
    path.write_text(yaml.safe_dump(data))

    clean = _experts_cli(path, tmp_path / "clean")
    out, err = clean.communicate(timeout=600)
    assert clean.returncode == 0, err[-3000:]
    want = published_expert(
        CampaignStore(tmp_path / "clean" / "campaign").store, "experts/tiny_code"
    ).sha256

    killed = CampaignStore(tmp_path / "killed" / "campaign")
    job = _experts_cli(path, tmp_path / "killed")
    deadline = time.monotonic() + 300
    try:
        while not list_checkpoints(killed.store, "checkpoints/experts/tiny_code"):
            assert job.poll() is None, job.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no checkpoint in time"
            time.sleep(0.02)
        os.kill(job.pid, signal.SIGKILL)
    finally:
        if job.poll() is None:
            job.kill()
        job.communicate()
    assert job.returncode == -signal.SIGKILL
    assert not killed.store.exists(f"experts/tiny_code/{MANIFEST}")  # nothing half-published
    assert max(list_checkpoints(killed.store, "checkpoints/experts/tiny_code")) < 40

    rerun = _experts_cli(path, tmp_path / "killed")
    out, err = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, err[-3000:]
    assert "40 steps" in out
    assert published_expert(killed.store, "experts/tiny_code").sha256 == want  # bit for bit


@pytest.mark.slow
def test_cycleqd_run_shows_the_experts_stage_through_kfp_local(mini_skill_world, tmp_path):
    """The pipeline's experts stage (ParallelFor over preflight's list, the finetune
    component) through kfp.local for the tiny world, then the seed from what it published."""

    path = tmp_path / "campaign.yaml"
    path.write_text(yaml.safe_dump(_config(mini_skill_world, generations=0)))
    workdir = tmp_path / "run"
    args = ["run", "--config", str(path), "--workdir", str(workdir), "--no-tracking"]
    proc = subprocess.run(
        [sys.executable, "-m", "cycleqd_kfp.pipelines.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    for skill in FAMILIES:
        assert f"expert {skill}: published (full, {MINI.expert.steps} steps" in proc.stdout
    store = CampaignStore(workdir / "campaign")
    snapshot = store.read_snapshot(0)
    seeded = {g["skill"]: g["id"] for g in snapshot["genomes"] if g["kind"] == "expert"}
    for skill in FAMILIES:
        assert model_is_complete(store.store, store.expert_prefix(skill))
        assert seeded[skill] == published_expert(store.store, f"experts/{skill}").genome_id
    assert store.latest_generation() == 0


def test_bad_fine_tuning_specs_stop_the_run_before_any_training(
    mini_skill_world, tmp_path, capsys, reliability
):
    """Through `cycleqd run` (the pipeline's preflight, run first): data that is not chat
    JSONL, a conversation without an assistant turn, a LoRA target the base lacks, an expert
    spec for a skill the campaign does not have. One message each; nothing trained or
    published."""
    from cycleqd_kfp.pipelines.cli import main

    not_chat = tmp_path / "not-chat.jsonl"
    not_chat.write_text('{"text": "a plain text corpus line"}\n')
    no_answer = tmp_path / "no-answer.jsonl"
    no_answer.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    lora = {"method": "lora", "lora": {"rank": 4, "target_modules": ["c_attn"]}}
    cases = {
        "data not chat JSONL": ({"data": str(not_chat)}, 'expected an object with a "messages"'),
        "no assistant turn": ({"data": str(no_answer)}, "assistant"),
        "LoRA target the base lacks": (lora, "['c_attn'] match no linear layer of the base"),
        "spec for a skill not in the campaign": (None, "unknown skill(s) ['coding']"),
    }
    clear = {}
    for what, (change, expected) in cases.items():
        data = _config(mini_skill_world)
        tiny_sql = data["models"]["experts"]["tiny_sql"]
        if change is None:
            data["models"]["experts"]["coding"] = {"data": "derived"}
        else:
            data["models"]["experts"]["tiny_sql"] = {
                **{k: v for k, v in tiny_sql.items() if k not in ("size", "method")},
                **change,
            }
        path = tmp_path / f"{what}.yaml".replace(" ", "-")
        path.write_text(yaml.safe_dump(data))
        workdir = tmp_path / what.replace(" ", "-")
        code = main(["run", "--config", str(path), "--workdir", str(workdir), "--no-tracking"])
        err = capsys.readouterr().err
        store = workdir / "campaign"
        nothing = not (store / "experts").exists() and not (store / "training").exists()
        clear[what] = code == 2 and expected in err and "Traceback" not in err and nothing
        assert clear[what], (what, err)
    reliability.record(
        "Hostile inputs",
        "Bad expert fine-tuning specs, through `cycleqd run`",
        tried=len(clear),
        survived=sum(clear.values()),
        detail=", ".join(clear) + "; one message each before any training, nothing published",
    )


@pytest.mark.slow
def test_the_small_real_world_trains_a_lora_expert_on_a_derived_training_part(
    smollm2, real_skills_services, tmp_path, monkeypatch
):
    """SmolLM2-135M-Instruct, a LoRA expert on a few MBPP+ training-part conversations (the
    world's spec, cut short), published by the stage; the skill then scores only its
    evaluation part."""
    from cycleqd import smollm2_world
    from cycleqd.skills.split import part_of

    data = smollm2_world.campaign_config(smollm2, "cpu", data=str(real_skills_services))
    data["models"]["experts"]["coding"].update(size=4, max_steps=1, checkpoint_every=1)
    config = parse_config(data)
    assert {s.name: s.part for s in config.skills} == {
        n: "evaluation" for n in ("coding", "db", "os")
    }
    store = CampaignStore(tmp_path / "campaign")
    record = train_expert(config, store.uri, "coding")
    assert record["steps"] == 1 and record["genome"]["skill"] == "coding"
    rows = [
        json.loads(line) for line in store.store.get_bytes("training/coding.jsonl").splitlines()
    ]
    assert len(rows) == 4 and all(part_of("coding", r["id"]) == "training" for r in rows)
    manifest = published_expert(store.store, "experts/coding").manifest
    assert manifest["method"] == "lora" and manifest["training"]["steps"] == 1

    # `cycleqd run --world smollm2` builds this world's config (base: converted in its run
    # folder; here the test's converted copy).
    from argparse import Namespace

    from cycleqd.cli import prepare_config

    monkeypatch.setattr(smollm2_world, "base_model", lambda folder: smollm2)
    args = Namespace(config=None, world="smollm2", workdir=str(tmp_path / "run"), generations=1)
    world = prepare_config(args)
    assert world.models.base == str(smollm2) and world.generations == 1
    assert list(world.models.trained()) == ["coding", "db", "os"]


@pytest.mark.slow
def test_lineage_goes_from_the_campaigns_experts_to_their_fine_tuning_runs(
    mini_skill_world, tmp_path
):
    """In MLflow, a seeded expert's run takes the LoggedModel its fine-tuning run logged as
    input, and names that run: the lineage from the final model reaches the training."""
    from mlflow import MlflowClient

    from cycleqd import steps

    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    text = yaml.safe_dump(_config(mini_skill_world))
    store = str(tmp_path / "campaign")
    steps.preflight(text, store, tracking)
    records = {s: steps.train_expert(text, store, s, tracking) for s in FAMILIES}
    steps.seed(text, store, tracking)
    client = MlflowClient(tracking)
    (experiment,) = [e for e in client.search_experiments() if e.name == "mini"]
    for skill, record in records.items():
        (trained,) = [
            m
            for m in client.search_logged_models([experiment.experiment_id])
            if m.tags.get("cycleqd.genome_id") == record["genome_id"]
            and "cycleqd.campaign_id" not in m.tags  # the fine-tuning run's, not the campaign's
        ]
        (source,) = client.search_runs(
            [experiment.experiment_id],
            f"tags.`cycleqd.role` = 'source' AND tags.`cycleqd.skill` = '{skill}'",
        )
        assert source.data.tags["cycleqd.finetune_model_id"] == trained.model_id
        assert source.data.tags["cycleqd.finetune_run_id"] == trained.source_run_id
        assert client.get_run(trained.source_run_id).data.tags["cycleqd.role"] == "finetune"
        inputs = {i.model_id for i in client.get_run(source.info.run_id).inputs.model_inputs}
        assert trained.model_id in inputs

"""Checkpoints: a job killed mid-training resumes from its last complete checkpoint and ends
with exactly the weights of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from cycleqd.finetune import CheckpointMismatchError, run_finetune
from cycleqd.finetune.trainer import checkpoint_key, list_checkpoints
from cycleqd.objectstore import LocalObjectStore, model_is_complete, read_manifest
from cycleqd.weights import MANIFEST, SafetensorsFolder

PREFIX = "checkpoints/mapper"


class Crash(Exception):
    pass


def _same_weights(store_a, store_b, prefix="experts/mapper") -> None:
    a = SafetensorsFolder(store_a.root / prefix)
    b = SafetensorsFolder(store_b.root / prefix)
    assert a.names() == b.names()
    for name in a.names():
        assert torch.equal(a.get(name), b.get(name)), name


def test_resume_after_a_crash_skips_a_half_written_checkpoint(tmp_path, lora_config, trained_lora):
    """Crash in step 23 (checkpoints at 10 and 20, two kept); the step-20 checkpoint lost its
    manifest (as if the crash hit while it was written): the rerun resumes from step 10, and
    MLflow's loss curve has every step once."""
    store = LocalObjectStore(tmp_path / "store")
    tracking_uri = trained_lora["config"]["tracking_uri"]  # a SQLite store made already
    config = lora_config(
        store.root, keep_checkpoints=2, tracking_uri=tracking_uri, experiment="resume-tests"
    )

    def crash(state):
        if state.step == 23:
            raise Crash

    with pytest.raises(Crash):
        run_finetune(config, on_step=crash)
    assert list_checkpoints(store, PREFIX) == [10, 20]
    assert not store.exists(f"experts/mapper/{MANIFEST}")
    store.delete(f"{checkpoint_key(PREFIX, 20)}/{MANIFEST}")

    # Other settings must not pick up these checkpoints.
    with pytest.raises(CheckpointMismatchError, match=r"learning_rate: 0\.02 there, 0\.01 now"):
        run_finetune({**config, "learning_rate": 0.01})

    resumed = []
    result = run_finetune(config, on_checkpoint=lambda step, key: resumed.append(step))
    assert result.resumed_from == 10 and resumed == [20, 30, 40, 50]
    reference = trained_lora["result"]
    assert result.losses == reference.losses  # the curve is whole: steps 1-10 come from state
    assert result.sha256 == reference.sha256
    _same_weights(store, trained_lora["store"])
    assert list_checkpoints(store, PREFIX) == []

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    history = client.get_metric_history(result.run_id, "train_loss")
    assert [m.step for m in history] == list(range(1, 51))
    assert [m.value for m in history] == pytest.approx(result.losses)
    assert client.get_run(result.run_id).info.status == "FINISHED"


def test_checkpoints_are_units_with_the_manifest_last_and_old_ones_pruned(tmp_path, lora_config):
    store = LocalObjectStore(tmp_path)
    seen = []

    def look(step, key):
        assert model_is_complete(store, key)
        manifest = read_manifest(store, key)
        assert set(manifest["files"]) == {"trainable.safetensors", "optimizer.pt", "state.json"}
        assert manifest["step"] == step and manifest["identity"]["hyperparameters"]["seed"] == 0
        seen.append(list_checkpoints(store, PREFIX))

    run_finetune(
        lora_config(store.root, max_steps=30, cleanup_checkpoints=False), on_checkpoint=look
    )
    assert seen == [[10], [20], [30]]  # keep_checkpoints=1: the older one goes once the new is in
    state = json.loads(store.get_bytes(f"{checkpoint_key(PREFIX, 30)}/state.json"))
    assert state["step"] == 30 and len(state["losses"]) == 30 and state["base_eval"]["rows"] == 32


SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    import torch
    torch.set_num_threads(1)
    from cycleqd.finetune import run_finetune

    config = json.loads(sys.argv[1])
    pause = float(sys.argv[2])
    result = run_finetune(config, on_step=lambda state: time.sleep(pause))
    print("RESULT " + json.dumps(result.to_json()))
    """
)


def _launch(config: dict, pause: float) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", SCRIPT, json.dumps(config), str(pause)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


@pytest.mark.slow
def test_sigkill_after_a_checkpoint_then_rerun_equals_an_uninterrupted_run(
    tmp_path, lora_config, trained_lora
):
    store = LocalObjectStore(tmp_path / "store")
    config = lora_config(store.root)
    job = _launch(config, pause=0.05)  # slowed down so that the kill lands between checkpoints
    deadline = time.monotonic() + 240
    try:
        while not model_is_complete(store, checkpoint_key(PREFIX, 20)):
            assert job.poll() is None, job.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no checkpoint at step 20 in time"
            time.sleep(0.02)
        os.kill(job.pid, signal.SIGKILL)
    finally:
        if job.poll() is None:
            job.kill()
        job.communicate()
    assert job.returncode == -signal.SIGKILL
    assert not store.exists(f"experts/mapper/{MANIFEST}")
    assert max(list_checkpoints(store, PREFIX)) < 50

    rerun = _launch(config, pause=0.0)
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err[-3000:]
    result = json.loads(out.split("RESULT ", 1)[1])
    assert 20 <= result["resumed_from"] < 50
    print(f"\nkilled after the step-20 checkpoint; resumed from step {result['resumed_from']}")
    assert result["sha256"] == trained_lora["result"].sha256  # bit for bit
    _same_weights(store, trained_lora["store"])

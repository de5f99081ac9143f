"""A LoRA expert trained on the CPU: it learns what the base cannot, its task vector lives in
the LoRA target modules only, its stored factors reproduce it, and MLflow has the run."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from cycleqd.finetune import (
    encode_dataset,
    evaluate,
    load_chat_dataset,
    load_task_vector_factors,
    run_finetune,
)
from cycleqd.finetune.factors import FACTORS_FILE
from cycleqd.finetune.trainer import list_checkpoints
from cycleqd.genome import Genome
from cycleqd.objectstore import read_manifest
from cycleqd.weights import SafetensorsFolder, check_compatible, sha256_file

STEPS = 50
TARGETS = ("q_proj", "v_proj", "o_proj", "up_proj", "down_proj")  # as in conftest


@pytest.fixture(scope="module")
def trained(trained_lora):
    return trained_lora


def test_expert_beats_the_base_on_held_out_rows(trained, base_dir, tokenizer, mapping_data):
    result = trained["result"]
    base, expert = result.base_eval, result.expert_eval
    print(f"\nheld-out (32 rows): base {base}\n                    expert {expert}")
    assert result.steps == STEPS and len(result.losses) == STEPS
    assert result.losses[-1] < result.losses[0] / 3
    assert expert["loss"] < base["loss"] / 3
    assert base["token_accuracy"] < 0.1 and expert["token_accuracy"] > 0.6
    assert expert["exact_match"] >= 0.3 > base["exact_match"]

    # The published folder, loaded like any HF model, scores what training reported.
    from transformers import AutoModelForCausalLM

    folder = trained["store"].root / result.expert.prefix
    examples = encode_dataset(tokenizer, load_chat_dataset(mapping_data["eval"]), 2048).examples
    pad = tokenizer.pad_token_id
    merged = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    again = evaluate(merged, examples, pad)
    assert again["loss"] == pytest.approx(expert["loss"], abs=1e-4)
    assert again["token_accuracy"] == pytest.approx(expert["token_accuracy"])
    original = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    assert evaluate(original, examples, pad)["loss"] == pytest.approx(base["loss"], abs=1e-5)


def _task_vector(base_dir, folder) -> dict[str, torch.Tensor]:
    base, expert = SafetensorsFolder(base_dir), SafetensorsFolder(folder)
    check_compatible(base, {"expert": expert})
    return {n: expert.get(n).float() - base.get(n).float() for n in base.names()}


def test_task_vector_is_non_zero_only_in_the_lora_target_modules(trained, base_dir):
    result = trained["result"]
    tau = _task_vector(base_dir, trained["store"].root / result.expert.prefix)
    changed = {n for n, t in tau.items() if torch.count_nonzero(t)}
    targets = {n for n in tau if n.rsplit(".", 2)[-2] in TARGETS}
    assert len(targets) == 2 * len(TARGETS)  # two layers
    assert changed == targets
    # Untouched: embeddings, lm_head, norms, and the linear layers not targeted.
    assert "model.layers.0.self_attn.k_proj.weight" not in changed
    assert "model.layers.1.mlp.gate_proj.weight" not in changed


def test_stored_lora_factors_reproduce_the_task_vector(trained, base_dir):
    result = trained["result"]
    store = trained["store"]
    tau = _task_vector(base_dir, store.root / result.expert.prefix)
    factors = load_task_vector_factors(store, result.expert.prefix)
    assert factors.kind == "lora" and factors.metadata["rank"] == "8"
    assert set(factors) == {n for n, t in tau.items() if torch.count_nonzero(t)}
    worst = 0.0
    for name in factors:
        u, s, vh = factors[name]
        assert s.shape == (8,) and u.shape == (tau[name].shape[0], 8)
        worst = max(worst, float((u @ torch.diag(s) @ vh - tau[name]).abs().max()))
    print(f"\nmax |U diag(S) Vh - (expert - base)| = {worst:.2e}")
    assert worst < 1e-5


def test_manifest_holds_the_genome_record(trained, base_dir, mapping_data):
    result = trained["result"]
    manifest = read_manifest(trained["store"], result.expert.prefix)
    genome = Genome.from_dict(manifest["genome"])
    assert genome.kind == "expert" and genome.skill == "coding" and genome.source == result.uri
    assert manifest["genome_id"] == genome.id == result.genome_id
    assert manifest["base"] == {
        "uri": str(base_dir),
        "sha256": sha256_file(base_dir / "model.safetensors"),
    }
    assert (
        manifest["dataset"]["sha256"]
        == hashlib.sha256(mapping_data["train"].read_bytes()).hexdigest()
    )
    assert manifest["dataset"]["rows"] == 64
    assert manifest["eval_dataset"]["rows"] == 32
    hyper = manifest["hyperparameters"]
    assert (
        hyper["lora"]["rank"] == 8
        and hyper["learning_rate"] == 0.02
        and hyper["max_steps"] == STEPS
    )
    assert manifest["sha256"] == result.sha256 == manifest["files"]["model.safetensors"]
    assert manifest["task_vector"]["file"] == FACTORS_FILE and FACTORS_FILE in manifest["files"]
    assert {"config.json", "tokenizer.json", "chat_template.jinja"} <= set(manifest["files"])
    assert manifest["training"]["steps"] == STEPS and manifest["training"]["dtype"] == "float32"
    json.dumps(result.to_json())  # the pipeline's output pointer is plain JSON


def test_mlflow_has_params_loss_curve_data_set_and_the_expert_model(trained, mapping_data):
    from mlflow import MlflowClient

    result = trained["result"]
    assert result.tracking_missed == []
    client = MlflowClient(trained["config"]["tracking_uri"])
    run = client.get_run(result.run_id)
    params = run.data.params
    assert params["learning_rate"] == "0.02" and params["lora.rank"] == "8"
    assert params["lora.target_modules.0"] == "q_proj" and params["method"] == "lora"
    history = client.get_metric_history(result.run_id, "train_loss")
    assert [m.step for m in history] == list(range(1, STEPS + 1))
    assert [m.value for m in history] == pytest.approx(result.losses)
    sha = hashlib.sha256(mapping_data["train"].read_bytes()).hexdigest()
    sha_eval = hashlib.sha256(mapping_data["eval"].read_bytes()).hexdigest()
    inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
    assert inputs["training"].digest == sha[:32]
    assert json.loads(inputs["training"].profile)["sha256"] == sha
    assert "evaluation" in inputs

    model = client.get_logged_model(result.model_id)
    assert model.tags["cycleqd.store_uri"] == result.uri
    assert model.tags["cycleqd.sha256"] == result.sha256
    assert model.tags["cycleqd.genome_id"] == result.genome_id
    assert model.tags["mlflow.model.isExternal"] == "true"
    assert model.source_run_id == result.run_id
    assert client.list_logged_model_artifacts(result.model_id) == []  # no weights uploaded
    assert [o.model_id for o in run.outputs.model_outputs] == [result.model_id]
    expert_loss = client.get_metric_history(result.run_id, "eval_loss")
    assert [m.step for m in expert_loss] == [STEPS]
    assert expert_loss[0].value == pytest.approx(result.expert_eval["loss"])
    model_metrics = {m.key: m for m in client.get_logged_model(result.model_id).metrics or []}
    assert model_metrics["eval_loss"].value == pytest.approx(result.expert_eval["loss"])
    assert model_metrics["eval_loss"].dataset_digest == sha_eval[:32]
    assert run.info.status == "FINISHED"


def test_rerun_returns_the_published_expert_without_training(trained):
    store = trained["store"]
    assert list_checkpoints(store, "checkpoints/mapper") == []  # deleted once published
    again = run_finetune({**trained["config"], "tracking_uri": None})
    assert again.reused and again.steps == STEPS
    assert again.sha256 == trained["result"].sha256 and again.uri == trained["result"].uri

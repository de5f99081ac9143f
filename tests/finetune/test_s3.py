"""The whole stage against a real S3 server (SeaweedFS): base, data, checkpoints, the expert
and its factors all in a bucket."""

from __future__ import annotations

import uuid

import pytest
import torch

from cycleqd.finetune import (
    DatasetError,
    SourceError,
    import_expert,
    load_chat_dataset,
    load_task_vector_factors,
    run_finetune,
)
from cycleqd.objectstore import RemoteSafetensors, copy_folder_to_store, open_store, read_manifest


@pytest.fixture
def s3_env(seaweed, monkeypatch):
    monkeypatch.setenv("CYCLEQD_S3_ENDPOINT", seaweed.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweed.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweed.secret_key)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    return f"s3://{seaweed.bucket}/finetune-{uuid.uuid4().hex[:8]}"


def test_finetune_with_everything_in_s3(s3_env, base_dir, mapping_data, lora_config):
    root = s3_env
    store = open_store(root)
    copy_folder_to_store(base_dir, store, "models/base")
    store.put_file("data/train.jsonl", mapping_data["train"])
    store.put_file("data/eval/part-0.jsonl", mapping_data["eval"])
    config = lora_config(
        f"{root}/out",
        base=f"{root}/models/base",
        data=f"{root}/data/train.jsonl",
        eval_data=f"{root}/data/eval",
        max_steps=10,
        checkpoint_every=5,
    )
    result = run_finetune(config)
    assert result.uri == f"{root}/out/experts/mapper"
    assert result.expert_eval["loss"] < result.base_eval["loss"]
    out = open_store(f"{root}/out")
    manifest = read_manifest(out, "experts/mapper")
    assert manifest["base"]["uri"] == f"{root}/models/base"
    assert manifest["dataset"]["sha256"] == load_chat_dataset(mapping_data["train"]).digest
    assert out.list("checkpoints/") == []

    factors = load_task_vector_factors(out, "experts/mapper")
    assert factors.kind == "lora" and len(factors) == 10
    expert = RemoteSafetensors(out, "experts/mapper")
    base = RemoteSafetensors(store, "models/base")
    assert sorted(expert.names()) == sorted(base.names())  # the factors stay out of the folder
    for name in factors:
        tau = expert.get(name) - base.get(name)
        assert torch.allclose(factors.delta(name), tau, atol=1e-5)

    again = import_expert(result.uri, f"{root}/models/base", out, "imported/mapper")
    assert again.sha256 == result.sha256
    assert set(load_task_vector_factors(out, "imported/mapper")) == set(factors)
    with pytest.raises(SourceError, match=r"no \*\.safetensors files under it"):
        import_expert(f"{root}/data", f"{root}/models/base", out, "imported/x")
    with pytest.raises(DatasetError, match="no such object"):
        load_chat_dataset(f"{root}/data/missing.jsonl")

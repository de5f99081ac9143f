"""Streaming safetensors writer: a valid file, its sha256, whatever order tensors arrive in."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from cycleqd.errors import MissingTensorError
from cycleqd.weights import TensorSpec, sha256_file, write_safetensors

SPECS = {
    "a": TensorSpec((3, 4), torch.float32),
    "b": TensorSpec((0,), torch.float32),
    "c": TensorSpec((5,), torch.bfloat16),
}
TENSORS = {"a": torch.randn(3, 4), "b": torch.zeros(0), "c": torch.randn(5).bfloat16()}


@pytest.mark.parametrize("order", [["a", "b", "c"], ["c", "a", "b"], ["b", "c", "a"]])
def test_written_file_loads_and_hash_matches(tmp_path, order):
    path = tmp_path / "m.safetensors"
    sha = write_safetensors(path, SPECS, ((n, TENSORS[n]) for n in order), {"genome": "x"})
    assert sha == sha256_file(path)
    loaded = load_file(path)
    assert set(loaded) == set(SPECS)
    assert all(torch.equal(loaded[n], TENSORS[n]) for n in SPECS)


def test_missing_tensor_leaves_no_file(tmp_path):
    path = tmp_path / "m.safetensors"
    with pytest.raises(MissingTensorError, match=r"never produced: \['c'\]"):
        write_safetensors(path, SPECS, ((n, TENSORS[n]) for n in ["a", "b"]))
    assert list(tmp_path.iterdir()) == []

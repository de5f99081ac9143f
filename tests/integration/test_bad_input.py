"""Bad models and configs fail with errors that name the cause; nothing half-done remains."""

from __future__ import annotations

import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from cycleqd import tiny
from cycleqd.campaign import Campaign
from cycleqd.cli import main
from cycleqd.config import parse_config
from cycleqd.errors import MissingTensorError, ModelMismatchError, NonFiniteWeightsError
from cycleqd.state import CampaignStore


def _copy_expert(world: dict, skill: str, dest) -> str:
    shutil.copytree(world["experts"][skill], dest)
    return str(dest)


def _edit(folder: str, edit) -> None:
    path = f"{folder}/model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def _campaign_with(world, evaluator, root, skill, folder) -> Campaign:
    experts = dict(world["experts"], **{skill: folder})
    config = parse_config(tiny.default_config({"base": world["base"], "experts": experts}))
    return Campaign(config, CampaignStore(root / "campaign"), evaluator)


def _seed_with(world, evaluator, root, skill, folder) -> None:
    """Models are opened (and checked) where weights are first used: seeding, here."""
    _campaign_with(world, evaluator, root, skill, folder).seed()


def test_expert_with_other_shape(tiny_world, probe_evaluator, tmp_path):
    folder = _copy_expert(tiny_world, "probe_b", tmp_path / "bad")
    name = "model.layers.0.mlp.up_proj.weight"
    _edit(folder, lambda t: t.update({name: torch.zeros(8, 8)}))
    with pytest.raises(ModelMismatchError, match=r"expert 'probe_b'.*up_proj.*\[8, 8\]"):
        _seed_with(tiny_world, probe_evaluator, tmp_path, "probe_b", folder)


def test_expert_with_missing_tensor(tiny_world, probe_evaluator, tmp_path):
    folder = _copy_expert(tiny_world, "probe_c", tmp_path / "bad")
    _edit(folder, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(ModelMismatchError, match=r"probe_c.*missing \['lm_head.weight'\]"):
        _seed_with(tiny_world, probe_evaluator, tmp_path, "probe_c", folder)


def test_expert_of_another_architecture(tiny_world, probe_evaluator, tmp_path):
    other = tiny.build_base(tmp_path / "other", tiny.llama_config(hidden=32, intermediate=64))
    with pytest.raises(ModelMismatchError, match=r"hidden_size=32.*base has 64"):
        _seed_with(tiny_world, probe_evaluator, tmp_path, "probe_a", str(other))


def test_folder_without_weights(tiny_world, probe_evaluator, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingTensorError, match=r"no \*\.safetensors files"):
        _seed_with(tiny_world, probe_evaluator, tmp_path, "probe_a", str(tmp_path / "empty"))


def test_expert_with_nan_is_refused_at_seeding(tiny_world, probe_evaluator, tmp_path):
    folder = _copy_expert(tiny_world, "probe_a", tmp_path / "bad")
    name = "model.layers.1.self_attn.v_proj.weight"

    def poison(tensors):
        tensors[name][0, 0] = float("nan")

    _edit(folder, poison)
    campaign = _campaign_with(tiny_world, probe_evaluator, tmp_path, "probe_a", folder)
    with pytest.raises(NonFiniteWeightsError, match="v_proj"):
        campaign.seed()
    assert campaign.store.latest_generation() is None  # nothing half-seeded was committed


def test_cli_reports_config_errors_without_traceback(tmp_path, capsys):
    path = tmp_path / "campaign.yaml"
    config = tiny.default_config(
        {"base": "b", "experts": {"probe_a": "x", "probe_b": "y", "probe_c": "z", "chess": "w"}}
    )
    config["mutation"] = {"kind": "svdd"}
    path.write_text(yaml.safe_dump(config))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "mutation.kind: got 'svdd'; allowed: 'svd', 'svd_expert', 'gaussian' or 'none'" in err
    assert "Traceback" not in err


def test_cli_reports_unknown_skill(tmp_path, capsys):
    path = tmp_path / "campaign.yaml"
    config = tiny.default_config(
        {"base": "b", "experts": {"probe_a": "x", "probe_b": "y", "probe_c": "z", "chess": "w"}}
    )
    path.write_text(yaml.safe_dump(config))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "models.experts: unknown skill(s) ['chess']" in err
    assert "'probe_a', 'probe_b', 'probe_c'" in err

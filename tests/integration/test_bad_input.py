"""Bad models and configs fail with errors that name the cause; nothing half-done remains."""

from __future__ import annotations

import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from cycleqd import probe_world
from cycleqd.campaign import Campaign
from cycleqd.cli import main
from cycleqd.config import parse_config
from cycleqd.errors import MissingTensorError, ModelMismatchError, NonFiniteWeightsError
from cycleqd.state import CampaignStore

SHARED_DATA = __import__("pathlib").Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


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
    config = parse_config(probe_world.default_config({"base": world["base"], "experts": experts}))
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
    other = probe_world.build_base(
        tmp_path / "other", probe_world.llama_config(hidden=32, intermediate=64)
    )
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
    config = probe_world.default_config(
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
    config = probe_world.default_config(
        {"base": "b", "experts": {"probe_a": "x", "probe_b": "y", "probe_c": "z", "chess": "w"}}
    )
    path.write_text(yaml.safe_dump(config))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "models.experts: unknown skill(s) ['chess']" in err
    assert "'probe_a', 'probe_b', 'probe_c'" in err


# -- the real skills: what preflight refuses before anything is written ---------------------------


def _real_config(world: dict, **overrides) -> dict:
    names = ("coding", "db", "os")
    return {
        "name": "real",
        "skills": [{"name": n, "limit": 1} for n in names],
        "models": {
            "base": world["base"],
            "experts": dict(zip(names, world["experts"].values(), strict=True)),
        },
        **overrides,
    }


def _preflight_fails(config: dict, store, match: str) -> str:
    from cycleqd import steps
    from cycleqd.errors import CycleQDError

    with pytest.raises(CycleQDError, match=match) as info:
        steps.preflight(yaml.safe_dump(config), str(store))
    assert not store.exists() or not any(store.rglob("*")), "preflight wrote to the store"
    return str(info.value)


def test_vllm_where_vllm_is_not_installed(tiny_world, tmp_path, monkeypatch):
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here")
    monkeypatch.setenv("CYCLEQD_DATA", str(SHARED_DATA))
    config = _real_config(tiny_world, evaluation={"backend": {"kind": "vllm"}})
    message = _preflight_fails(config, tmp_path / "store", "vLLM is not installed here")
    assert "evaluator image" in message and "kind to 'transformers'" in message


def test_cpu_tools_image_leaves_the_backend_check_to_the_evaluator_image(
    tiny_world, tmp_path, monkeypatch
):
    """On a cluster preflight runs on the CPU tools image (no vLLM there by design): it checks
    the rest and the seed task, on the evaluator image, checks the backend."""
    from cycleqd import steps

    monkeypatch.setenv("CYCLEQD_RUNTIME", "cpu-tools")
    monkeypatch.setenv("CYCLEQD_DATA", str(SHARED_DATA))
    config = _real_config(tiny_world, evaluation={"backend": {"kind": "vllm"}})
    del config["skills"][1], config["models"]["experts"]["db"]  # no database server needed
    summary = steps.preflight(yaml.safe_dump(config), str(tmp_path / "store"))
    assert summary["latest_generation"] == -1


def test_cuda_where_torch_sees_no_gpu(tiny_world, tmp_path, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    monkeypatch.setenv("CYCLEQD_DATA", str(SHARED_DATA))
    config = _real_config(tiny_world, evaluation={"backend": {"device": "cuda"}})
    _preflight_fails(config, tmp_path / "store", r"device is 'cuda', but torch sees no GPU")


def test_missing_data_set_and_dead_database(tiny_world, tmp_path, monkeypatch):
    monkeypatch.delenv("CYCLEQD_DATA", raising=False)
    config = _real_config(tiny_world)
    _preflight_fails(config, tmp_path / "store", r"no data location given.*CYCLEQD_DATA")
    monkeypatch.setenv("CYCLEQD_DATA", str(SHARED_DATA))
    config["skills"][1]["url"] = "mysql://root@127.0.0.1:9"  # nothing listens there
    _preflight_fails(config, tmp_path / "store", r"skills.db.url: cannot use the database server")


def test_real_skills_refuse_to_run_without_a_sandbox(tiny_world, tmp_path, monkeypatch):
    """Model output never runs outside the sandbox: with none available, the evaluator is not
    built (preflight says how to get one) and nothing is generated."""
    from cycleqd.evaluators import build_evaluator
    from cycleqd.sandbox import SandboxUnavailableError

    monkeypatch.setenv("CYCLEQD_DATA", str(SHARED_DATA))
    monkeypatch.setenv("CYCLEQD_SANDBOX", "docker")
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")
    config = _real_config(tiny_world, skills=[{"name": "coding"}, {"name": "tiny_sql"}])
    config["models"]["experts"] = {"coding": tiny_world["experts"]["probe_a"],
                                   "tiny_sql": tiny_world["experts"]["probe_b"]}  # fmt: skip
    _preflight_fails(config, tmp_path / "store", "no Docker daemon is reachable")
    with pytest.raises(SandboxUnavailableError, match="Docker"):
        build_evaluator(parse_config(config)).evaluate("x", iter(()))


def test_real_campaign_bad_inputs_are_refused_before_any_write(
    tiny_world, tmp_path, monkeypatch, reliability
):
    """The user's entry points (`cycleqd validate`, preflight) on a real campaign's mistakes:
    one message naming what to fix each, no traceback, nothing in the store."""
    import importlib.util

    from cycleqd import steps
    from cycleqd.errors import CycleQDError

    monkeypatch.setenv("CYCLEQD_DATA", str(SHARED_DATA))
    cases = {
        "unknown skill": ({"skills": [{"name": "codng"}]}, "unknown skill 'codng'"),
        "another skill's option": (
            {"skills": [{"name": "coding", "max_rounds": 3}]},
            "max_rounds is an option of: db, os",
        ),
        "password in the config": (
            {"skills": [{"name": "db", "url": "mysql://root:pw@h:3306"}]},
            "CYCLEQD_DB_PASSWORD",
        ),
        "missing data set": ({"skills": [{"name": "os", "data": str(tmp_path)}]}, "does not exist"),
        "dead database": (
            {"skills": [{"name": "db", "url": "mysql://root@127.0.0.1:9"}]},
            "cannot use the database server",
        ),
        "unknown task id": (
            {"skills": [{"name": "coding", "task_ids": ["Mbpp/99999"]}]},
            "Mbpp/99999",
        ),
    }
    if importlib.util.find_spec("vllm") is None:
        cases["vllm not installed"] = (
            {"evaluation": {"backend": {"kind": "vllm"}}},
            "vLLM is not installed here",
        )
    clear = {}
    for what, (change, expected) in cases.items():
        config = _real_config(tiny_world)
        for entry in change.get("skills", []):  # replaces the skill of the same position
            index = {"coding": 0, "db": 1, "os": 2}.get(entry["name"], 0)
            config["skills"][index] = {"limit": 1, **entry}
            config["models"]["experts"] = {
                s["name"]: tiny_world["experts"]["probe_a"] for s in config["skills"]
            }
        config.update({k: v for k, v in change.items() if k != "skills"})
        store = tmp_path / what.replace(" ", "-")
        try:
            steps.preflight(yaml.safe_dump(config), str(store))
            clear[what] = False
        except CycleQDError as exc:
            nothing_written = not store.exists() or not any(store.rglob("*"))
            clear[what] = expected in str(exc) and "Traceback" not in str(exc) and nothing_written
    reliability.record(
        "Hostile inputs",
        "Real-campaign configs with a mistake, through preflight",
        tried=len(clear),
        survived=sum(clear.values()),
        detail=", ".join(clear) + "; each one message naming the fix, nothing written",
    )
    assert all(clear.values()), clear

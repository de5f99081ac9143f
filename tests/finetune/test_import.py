"""Importing experts trained elsewhere: full weights or a PEFT adapter, from a folder or a store
URI, checked against the base's architecture."""

from __future__ import annotations

import pytest
import torch

from cycleqd.errors import ModelMismatchError
from cycleqd.finetune import SourceError, import_expert, load_task_vector_factors
from cycleqd.genome import Genome
from cycleqd.objectstore import LocalObjectStore, read_manifest
from cycleqd.weights import SafetensorsFolder, sha256_file

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")

CHANGED = ("model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight")


def _load(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


@pytest.fixture(scope="module")
def outside_expert(tmp_path_factory, base_dir):
    """A full-weights expert made elsewhere: the base with two matrices and a norm changed."""
    model = _load(base_dir)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name in CHANGED:
            params[name].add_(torch.randn(params[name].shape, generator=gen) * 0.01)
        params["model.norm.weight"].mul_(1.1)
    folder = tmp_path_factory.mktemp("outside") / "expert"
    model.save_pretrained(folder)
    return folder


def _worst_error(factors, base_dir, folder) -> float:
    base, expert = SafetensorsFolder(base_dir), SafetensorsFolder(folder)
    worst = 0.0
    for name in factors:
        tau = expert.get(name).float() - base.get(name).float()
        worst = max(worst, float((factors.delta(name) - tau).abs().max()))
    return worst


def test_import_of_a_full_weights_folder(tmp_path, base_dir, outside_expert):
    store = LocalObjectStore(tmp_path)
    expert = import_expert(outside_expert, base_dir, store, "experts/db", skill="db")
    manifest = read_manifest(store, "experts/db")
    assert manifest["method"] == "import" and manifest["imported_from"] == str(outside_expert)
    assert manifest["base"]["sha256"] == sha256_file(base_dir / "model.safetensors")
    assert expert.sha256 == sha256_file(outside_expert / "model.safetensors")
    assert Genome.from_dict(manifest["genome"]) == Genome("expert", source=expert.uri, skill="db")
    assert {"config.json", "tokenizer.json", "model.safetensors"} <= set(manifest["files"])
    factors = load_task_vector_factors(store, "experts/db")
    assert set(factors) == set(CHANGED)  # the norm changed too, but mutations skip 1-D weights
    assert _worst_error(factors, base_dir, outside_expert) < 1e-5
    # Truncated factors keep the top singular values.
    import_expert(outside_expert, base_dir, store, "experts/db-r2", rank=2)
    small = load_task_vector_factors(store, "experts/db-r2")
    u, s, vh = small[CHANGED[0]]
    assert (u.shape[1], s.numel(), vh.shape[0]) == (2, 2, 2)
    assert torch.allclose(s, factors[CHANGED[0]][1][:2])


def test_import_of_a_peft_adapter_merges_it_and_keeps_exact_factors(tmp_path, base_dir):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        _load(base_dir), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    model.save_pretrained(tmp_path / "adapter")
    store = LocalObjectStore(tmp_path / "store")
    import_expert(tmp_path / "adapter", base_dir, store, "experts/os", skill="os")
    assert read_manifest(store, "experts/os")["method"] == "import-lora"
    factors = load_task_vector_factors(store, "experts/os")
    assert factors.kind == "lora" and len(factors) == 4
    assert all(factors[n][1].numel() == 4 for n in factors)
    assert _worst_error(factors, base_dir, store.root / "experts/os") < 1e-5
    merged = SafetensorsFolder(store.root / "experts/os")
    base = SafetensorsFolder(base_dir)
    changed = {n for n in base.names() if not torch.equal(base.get(n), merged.get(n))}
    assert changed == set(factors)


def test_import_from_a_store_uri(tmp_path, base_dir, trained_lora):
    source = trained_lora["result"].uri  # file:///.../experts/mapper
    store = LocalObjectStore(tmp_path)
    expert = import_expert(source, base_dir, store, "experts/again")
    assert expert.sha256 == trained_lora["result"].sha256
    factors = load_task_vector_factors(store, "experts/again")
    original = load_task_vector_factors(trained_lora["store"], "experts/mapper")
    assert factors.kind == "full" and set(factors) == set(original)
    for name in factors:  # a rank-8 delta: the SVD's tail is numerically zero
        assert torch.allclose(factors.delta(name), original.delta(name), atol=1e-5)


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        ({"hidden": 32, "intermediate": 88}, "config.json hidden_size=32 but the base has 64"),
        ({"layers": 3}, "config.json num_hidden_layers=3 but the base has 2"),
    ],
)
def test_an_expert_of_another_architecture_is_refused(tmp_path, base_dir, shape, expected):
    from cycleqd.generate.tiny_tokenizer import save_chat_model

    other = save_chat_model(tmp_path / "other", seed=1, **shape)
    with pytest.raises(ModelMismatchError, match=expected):
        import_expert(other, base_dir, LocalObjectStore(tmp_path / "s"), "experts/x")
    assert not (tmp_path / "s" / "experts").exists()


def test_an_adapter_for_another_base_is_refused(tmp_path, base_dir):
    from peft import LoraConfig, get_peft_model

    from cycleqd.generate.tiny_tokenizer import build_chat_model

    small = build_chat_model(seed=1, hidden=32, intermediate=88)[0]
    get_peft_model(small, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(
        tmp_path / "adapter"
    )
    with pytest.raises(ModelMismatchError, match="the LoRA adapter does not fit the base"):
        import_expert(tmp_path / "adapter", base_dir, LocalObjectStore(tmp_path / "s"), "e/x")


def test_unreachable_sources_give_clear_errors(tmp_path, base_dir, monkeypatch):
    store = LocalObjectStore(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SourceError, match=r"Hugging Face repo id.*HF_HUB_OFFLINE.*hf download"):
        import_expert("some-org/some-expert", base_dir, store, "experts/x")
    with pytest.raises(SourceError, match="no such folder"):
        import_expert(tmp_path / "missing", base_dir, store, "experts/x")
    with pytest.raises(SourceError, match="nothing-here: no such folder"):
        import_expert(f"{store.uri}/nothing-here", base_dir, store, "experts/x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match=r"no \*\.safetensors files"):
        import_expert(tmp_path / "empty", base_dir, store, "experts/x")

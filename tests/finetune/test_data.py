"""Chat data sets: reading, checking, digests, and labels on assistant tokens only."""

from __future__ import annotations

import copy
import hashlib
import json

import pytest

from cycleqd.finetune.data import (
    IGNORE_INDEX,
    DatasetError,
    encode_conversation,
    encode_dataset,
    load_chat_dataset,
)
from cycleqd.objectstore import LocalObjectStore

EOT = "<|eot_id|>"

CONVERSATIONS = [
    [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Add two numbers."},
        {"role": "assistant", "content": "def add(a, b):\n    return a + b"},
    ],
    [
        {"role": "user", "content": "List files"},
        {"role": "assistant", "content": "ls -la"},
        {"role": "user", "content": "Now count them, step by step."},
        {"role": "assistant", "content": "ls | wc -l  # ünïcödé ✓"},
        {"role": "user", "content": "thanks"},  # a trailing user turn: never learned
    ],
    [
        {"role": "user", "content": "SELECT?"},
        {"role": "assistant", "content": "  SELECT name FROM users;  "},  # the template trims
    ],
]


def _runs(ids, labels):
    """Maximal runs of labelled positions, as lists of token ids."""
    runs, current = [], []
    for token, label in zip(ids, labels, strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return runs


@pytest.mark.parametrize("conversation", CONVERSATIONS, ids=["system", "multi-turn", "trimmed"])
def test_labels_cover_exactly_the_assistant_turns(tokenizer, conversation):
    example = encode_conversation(tokenizer, conversation)
    whole = tokenizer.apply_chat_template(conversation, tokenize=False)
    assert tokenizer.decode(example.input_ids) == whole
    runs = _runs(example.input_ids, example.labels)
    replies = [m["content"].strip() for m in conversation if m["role"] == "assistant"]
    assert [tokenizer.decode(run) for run in runs] == [r + EOT for r in replies]
    # Everything else (headers, system, user turns, BOS) is masked.
    masked = [t for t, lab in zip(example.input_ids, example.labels, strict=True) if lab < 0]
    assert "assistant<|end_header_id|>" in tokenizer.decode(masked)
    for message in conversation:
        if message["role"] != "assistant":
            assert message["content"].strip() in tokenizer.decode(masked)


@pytest.mark.parametrize("conversation", CONVERSATIONS, ids=["system", "multi-turn", "trimmed"])
def test_prompt_tokens_are_what_a_generation_backend_feeds_the_model(tokenizer, conversation):
    """Before each assistant turn the tokens equal the tokenised prompt (template with the
    generation prompt, tokenised alone), as `TransformersBackend.encode` makes it; the
    whole-text tokenisation labelled by offsets learns the same text."""
    example = encode_conversation(tokenizer, conversation)
    first = next(i for i, m in enumerate(conversation) if m["role"] == "assistant")
    prompt = tokenizer.apply_chat_template(
        conversation[:first], tokenize=False, add_generation_prompt=True
    )
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert example.input_ids[: len(prompt_ids)] == prompt_ids
    assert example.labels[len(prompt_ids) - 1] == IGNORE_INDEX
    assert example.labels[len(prompt_ids)] == example.input_ids[len(prompt_ids)]

    by_offsets = encode_conversation(tokenizer, conversation, method="offsets")
    learned = [tokenizer.decode(r) for r in _runs(by_offsets.input_ids, by_offsets.labels)]
    assert learned == [tokenizer.decode(r) for r in _runs(example.input_ids, example.labels)]


def test_template_that_does_not_render_turns_in_order_is_refused(tokenizer):
    tok = copy.deepcopy(tokenizer)  # keep the session fixture untouched
    # Puts the number of messages first: a prefix of the conversation renders differently.
    tok.chat_template = "{{ messages|length }}" + tok.chat_template
    with pytest.raises(DatasetError, match="does not render turns in order"):
        encode_conversation(tok, CONVERSATIONS[0])
    tok.chat_template = None
    with pytest.raises(DatasetError, match="no chat template"):
        encode_conversation(tok, CONVERSATIONS[0])


def test_truncation_keeps_rows_with_an_assistant_token_and_drops_the_rest(tokenizer, tmp_path):
    long_user = {"role": "user", "content": "word " * 200}
    rows = [
        {"messages": CONVERSATIONS[2]},
        {"messages": [long_user, {"role": "assistant", "content": "late"}]},
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    encoded = encode_dataset(tokenizer, load_chat_dataset(path), max_length=64)
    assert (len(encoded.examples), encoded.truncated, encoded.dropped) == (1, 1, 1)
    assert all(len(e.input_ids) <= 64 for e in encoded.examples)
    with pytest.raises(DatasetError, match="no row keeps an assistant token within max_length=8"):
        encode_dataset(tokenizer, load_chat_dataset(path), max_length=8)


# -- bad input -----------------------------------------------------------------------------------


def _write(tmp_path, lines, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


GOOD = json.dumps({"messages": CONVERSATIONS[2]})


def test_row_without_an_assistant_turn_names_file_and_line(tmp_path):
    no_reply = json.dumps({"messages": [{"role": "user", "content": "hi"}]})
    path = _write(tmp_path, [GOOD, "", no_reply])
    with pytest.raises(DatasetError) as err:
        load_chat_dataset(path)
    message = str(err.value)
    assert f"{path}:3: no assistant turn (user)" in message
    assert '"role": "assistant"' in message


def test_malformed_jsonl_line_gives_its_line_number(tmp_path):
    path = _write(tmp_path, [GOOD, GOOD, '{"messages": [}', GOOD])
    with pytest.raises(DatasetError, match=rf"{path}:3: malformed JSON \(.* at column 15\)"):
        load_chat_dataset(path)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('["a list"]', 'expected an object with a "messages" list, got list'),
        ('{"conversation": []}', "got keys \\['conversation'\\]"),
        ('{"messages": [{"role": "user"}]}', "messages\\[0\\] must be an object with string"),
        ('{"messages": [{"role": "assistant", "content": 3}]}', "messages\\[0\\]"),
    ],
)
def test_malformed_rows_are_named(tmp_path, line, expected):
    path = _write(tmp_path, [GOOD, line])
    with pytest.raises(DatasetError, match=rf"data.jsonl:2: .*{expected}"):
        load_chat_dataset(path)


def test_empty_data_sets_are_refused(tmp_path):
    empty = _write(tmp_path, ["", "   "], "empty.jsonl")
    with pytest.raises(DatasetError, match="is empty: no rows in"):
        load_chat_dataset(empty)
    folder = tmp_path / "none"
    folder.mkdir()
    (folder / "readme.txt").write_text("no data here")
    with pytest.raises(DatasetError, match=r"holds no \*\.jsonl files"):
        load_chat_dataset(folder)
    with pytest.raises(DatasetError, match="no such file or folder"):
        load_chat_dataset(tmp_path / "missing.jsonl")


def test_not_utf8_is_reported_with_the_line(tmp_path):
    path = tmp_path / "bin.jsonl"
    path.write_bytes(GOOD.encode() + b"\n\xff\xfe\n")
    with pytest.raises(DatasetError, match=r"bin\.jsonl:2: not UTF-8"):
        load_chat_dataset(path)


# -- digests and sources -------------------------------------------------------------------------


def test_digest_of_one_file_is_its_sha256_and_a_folder_reads_in_sorted_order(tmp_path):
    one = _write(tmp_path, [GOOD, GOOD], "one.jsonl")
    ds = load_chat_dataset(one)
    assert ds.digest == hashlib.sha256(one.read_bytes()).hexdigest()
    assert len(ds) == 2 and ds.where == [(str(one), 1), (str(one), 2)]

    folder = tmp_path / "folder"
    second = json.dumps({"messages": CONVERSATIONS[0]})
    (folder / "sub").mkdir(parents=True)
    _write(folder / "sub", [second], "b.jsonl")
    _write(folder, [GOOD], "a.jsonl")
    ds = load_chat_dataset(folder)
    assert [w[0] for w in ds.where] == ["a.jsonl", "sub/b.jsonl"]
    assert ds.rows[1] == CONVERSATIONS[0]
    lines = "".join(f"{sha}  {name}\n" for name, sha in sorted(ds.files.items()))
    assert ds.digest == hashlib.sha256(lines.encode()).hexdigest()
    assert load_chat_dataset(folder).digest == ds.digest


def test_data_sets_are_read_from_a_store_uri(tmp_path):
    store = LocalObjectStore(tmp_path / "store")
    store.put_bytes("data/coding/train.jsonl", (GOOD + "\n" + GOOD + "\n").encode())
    store.put_bytes("data/coding/more/extra.jsonl", (GOOD + "\n").encode())
    uri = f"{store.uri}/data/coding"
    one = load_chat_dataset(f"{uri}/train.jsonl")
    assert len(one) == 2
    assert one.digest == hashlib.sha256((GOOD + "\n" + GOOD + "\n").encode()).hexdigest()
    assert len(load_chat_dataset(uri)) == 3
    with pytest.raises(DatasetError, match="no such"):
        load_chat_dataset(f"{uri}/missing.jsonl")

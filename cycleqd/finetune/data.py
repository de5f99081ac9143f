"""Chat data sets for supervised fine-tuning: JSONL rows of `{"messages": [...]}`.

A data set is a `.jsonl` file, a folder of them (every `*.jsonl` below it, in sorted order),
or the same in an object store (`s3://bucket/data/train.jsonl`, `s3://bucket/data/coding/`).
Every row must be an object with a `messages` list of `{"role": ..., "content": ...}` and at
least one assistant turn; errors name the file and the line.

Its digest (what MLflow and the expert's genome record) is the sha256 of the file's bytes
for one file, and for several the sha256 of `sha256  name` lines, one per file, sorted.

Only assistant tokens are learned. The assistant spans come from the chat template itself:
for the i-th message, an assistant turn, the conversation up to it rendered with the
generation prompt ends where the turn's text starts, and the conversation through it ends
where the turn (its end-of-turn token included) ends. Both renderings must be prefixes of
the whole conversation's rendering (they are for every template that renders turns in
order); a template where they are not is refused rather than guessed at.

Tokenising: the rendered text is cut at the span boundaries and each piece is tokenised on
its own ("segments"). The tokens before an assistant turn are then exactly what a generation
backend feeds the model as the prompt (`apply_chat_template(..., add_generation_prompt=True)`
tokenised alone): with GPT-2-style byte-level BPE, tokenising the whole conversation instead
splits the header's trailing "\n\n" differently than the prompt does, and the model would
learn to answer after a token sequence it never sees at inference. Where cutting changes the
text (SentencePiece tokenizers add a leading space to every piece), the whole text is
tokenised once and tokens are labelled by their character offsets ("offsets"; needs a fast
tokenizer).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cycleqd.errors import CycleQDError
from cycleqd.finetune.sources import local_path, split_uri
from cycleqd.objectstore import StoreError, StoreNotFoundError

IGNORE_INDEX = -100


class DatasetError(CycleQDError):
    """A data set is missing, empty or has a malformed row; the message says where."""


@dataclass(frozen=True)
class ChatDataset:
    """Rows of messages, with where each row came from (file, line) and the digest."""

    source: str
    digest: str
    rows: list[list[dict]]
    where: list[tuple[str, int]]
    files: dict[str, str] = field(default_factory=dict)  # relative name -> sha256

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def name(self) -> str:
        stem = self.source.rstrip("/").rsplit("/", 1)[-1]
        return stem.removesuffix(".jsonl") or "dataset"


@dataclass(frozen=True)
class Example:
    """One tokenised conversation: ids and labels (-100 outside assistant turns)."""

    input_ids: list[int]
    labels: list[int]

    @property
    def n_targets(self) -> int:
        # Position t predicts token t+1: the first token is never a target.
        return sum(1 for x in self.labels[1:] if x != IGNORE_INDEX)


# -- reading ---------------------------------------------------------------------------------


def _read_files(source: str | Path) -> list[tuple[str, bytes]]:
    """(name, bytes) of the JSONL files a source names, in sorted order."""
    local = local_path(source)
    if local is not None:
        if local.is_file():
            return [(str(local), local.read_bytes())]
        if local.is_dir():
            files = sorted(p for p in local.rglob("*.jsonl") if p.is_file())
            if not files:
                raise DatasetError(f"data set {source}: the folder holds no *.jsonl files")
            return [(p.relative_to(local).as_posix(), p.read_bytes()) for p in files]
        raise DatasetError(f"data set {source}: no such file or folder")
    try:
        store, key = split_uri(str(source))
        if key.endswith((".jsonl", ".json")):
            return [(str(source), store.get_bytes(key))]
        keys = [k for k in store.list(f"{key}/") if k.endswith(".jsonl")]
        if not keys:
            raise DatasetError(f"data set {source}: no *.jsonl objects under it")
        return [(k[len(key) + 1 :], store.get_bytes(k)) for k in keys]
    except StoreNotFoundError:
        raise DatasetError(f"data set {source}: no such object") from None
    except StoreError as exc:
        raise DatasetError(f"data set {source}: {exc}") from None


def _check_row(row: object, where: str) -> list[dict]:
    if not isinstance(row, dict) or not isinstance(row.get("messages"), list):
        got = type(row).__name__ if not isinstance(row, dict) else f"keys {sorted(row)}"
        raise DatasetError(
            f'{where}: expected an object with a "messages" list, got {got}; each line must be '
            '{"messages": [{"role": "user", "content": "..."}, '
            '{"role": "assistant", "content": "..."}]}'
        )
    messages = row["messages"]
    for i, message in enumerate(messages):
        if (
            not isinstance(message, dict)
            or not isinstance(message.get("role"), str)
            or not isinstance(message.get("content"), str)
        ):
            raise DatasetError(
                f'{where}: messages[{i}] must be an object with string "role" and "content", '
                f"got {json.dumps(message)[:120]}"
            )
    if not any(m["role"] == "assistant" for m in messages):
        roles = ", ".join(m["role"] for m in messages) or "no messages"
        raise DatasetError(
            f"{where}: no assistant turn ({roles}); every row needs at least one "
            '{"role": "assistant", "content": ...} message to learn from'
        )
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def parse_jsonl(data: bytes, name: str) -> list[tuple[int, list[dict]]]:
    """(line number, messages) of every non-blank line; DatasetError names the line."""
    rows = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        where = f"{name}:{number}"
        try:
            text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            raise DatasetError(f"{where}: not UTF-8 text ({exc.reason})") from None
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DatasetError(
                f"{where}: malformed JSON ({exc.msg} at column {exc.colno}); every line must be "
                "one JSON object"
            ) from None
        rows.append((number, _check_row(row, where)))
    return rows


def dataset_digest(files: dict[str, str]) -> str:
    if len(files) == 1:
        return next(iter(files.values()))
    text = "".join(f"{sha}  {name}\n" for name, sha in sorted(files.items()))
    return hashlib.sha256(text.encode()).hexdigest()


def load_chat_dataset(source: str | Path) -> ChatDataset:
    """Read and check a chat data set (file, folder, or store URI)."""
    files = _read_files(source)
    rows, where, shas = [], [], {}
    for name, data in files:
        shas[name] = hashlib.sha256(data).hexdigest()
        for number, messages in parse_jsonl(data, name):
            rows.append(messages)
            where.append((name, number))
    if not rows:
        raise DatasetError(
            f"data set {source} is empty: no rows in {', '.join(n for n, _ in files)}; "
            'each line must be {"messages": [...]} with an assistant turn'
        )
    return ChatDataset(str(source), dataset_digest(shas), rows, where, shas)


# -- tokenising with assistant-only labels ---------------------------------------------------


def _render(tokenizer, messages: Sequence[dict], generation_prompt: bool) -> str:
    text = tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=generation_prompt
    )
    if not isinstance(text, str):  # some versions return a list for batched input
        text = text[0]
    return text


def assistant_spans(tokenizer, messages: Sequence[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns.

    A span runs from where the turn's content starts (after the template's assistant header)
    to where the rendering through that turn ends (its end-of-turn token included).
    """
    if not getattr(tokenizer, "chat_template", None):
        raise DatasetError(
            "the tokenizer has no chat template; fine-tune from an instruct model's folder "
            "(tokenizer_config.json or chat_template.jinja) or set `tokenizer` in the config"
        )
    try:
        full = _render(tokenizer, messages, False)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = _render(tokenizer, messages[:i], True) if i else ""
            through = _render(tokenizer, messages[: i + 1], False)
            if not (full.startswith(before) and full.startswith(through)) or len(through) < len(
                before
            ):
                raise DatasetError(
                    f"the chat template does not render turns in order (messages[{i}]): the "
                    "conversation up to a turn is not a prefix of the whole; assistant tokens "
                    "cannot be found reliably with this template"
                )
            if i and not before:
                raise DatasetError(f"the chat template renders nothing before messages[{i}]")
            spans.append((len(before), len(through)))
    except DatasetError:
        raise
    except Exception as exc:  # the template itself raised (e.g. roles must alternate)
        raise DatasetError(f"the chat template cannot render this conversation: {exc}") from None
    return full, spans


def _labels_by_offsets(tokenizer, text, spans) -> tuple[list[int], list[int]]:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    labels = [IGNORE_INDEX] * len(ids)
    for t, (start, end) in enumerate(offsets):
        if end > start and any(end > a and start < b for a, b in spans):
            labels[t] = ids[t]
    return ids, labels


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def _labels_by_segments(tokenizer, text, spans) -> tuple[list[int], list[int]] | None:
    """Each piece between span boundaries tokenised alone; None where that changes the text."""
    ids: list[int] = []
    labels: list[int] = []
    cut = 0
    for a, b in spans:
        for piece, learn in ((text[cut:a], False), (text[a:b], True)):
            piece_ids = _encode(tokenizer, piece)
            ids.extend(piece_ids)
            labels.extend(piece_ids if learn else [IGNORE_INDEX] * len(piece_ids))
        cut = b
    tail = _encode(tokenizer, text[cut:])
    ids.extend(tail)
    labels.extend([IGNORE_INDEX] * len(tail))
    whole = tokenizer.decode(_encode(tokenizer, text), skip_special_tokens=False)
    if tokenizer.decode(ids, skip_special_tokens=False) != whole:
        return None
    return ids, labels


Method = Literal["auto", "segments", "offsets"]


def encode_conversation(
    tokenizer, messages: Sequence[dict], max_length: int | None = None, method: Method = "auto"
) -> Example:
    """Token ids and labels (assistant tokens only) of one conversation, cut at max_length.

    method: "segments" (pieces between turn boundaries tokenised alone), "offsets" (the whole
    text, labelled by character offsets), or "auto": segments where they keep the text.
    """
    text, spans = assistant_spans(tokenizer, messages)
    result = None
    if method in ("auto", "segments"):
        result = _labels_by_segments(tokenizer, text, spans)
        if result is None and method == "segments":
            raise DatasetError(
                "tokenising the conversation piece by piece changes its text with this "
                "tokenizer; use method='offsets'"
            )
    if result is None:
        if not getattr(tokenizer, "is_fast", False):
            raise DatasetError(
                "this tokenizer changes the text when a conversation is tokenised piece by "
                "piece, and has no character offsets (not a fast tokenizer): provide "
                "tokenizer.json"
            )
        result = _labels_by_offsets(tokenizer, text, spans)
    ids, labels = result
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    return Example(ids, labels)


@dataclass(frozen=True)
class EncodedDataset:
    examples: list[Example]
    truncated: int  # rows cut at max_length
    dropped: int  # rows left without an assistant token after the cut
    tokens: int

    @property
    def targets(self) -> int:
        return sum(e.n_targets for e in self.examples)


def encode_dataset(tokenizer, dataset: ChatDataset, max_length: int) -> EncodedDataset:
    examples, truncated, dropped = [], 0, 0
    for messages, (name, line) in zip(dataset.rows, dataset.where, strict=True):
        try:
            full = encode_conversation(tokenizer, messages)
        except DatasetError as exc:
            raise DatasetError(f"{name}:{line}: {exc}") from None
        example = Example(full.input_ids[:max_length], full.labels[:max_length])
        if len(full.input_ids) > max_length:
            truncated += 1
        if example.n_targets == 0:
            dropped += 1
            continue
        examples.append(example)
    if not examples:
        raise DatasetError(
            f"data set {dataset.source}: no row keeps an assistant token within max_length="
            f"{max_length}; raise max_length"
        )
    return EncodedDataset(examples, truncated, dropped, sum(len(e.input_ids) for e in examples))


__all__ = [
    "IGNORE_INDEX",
    "ChatDataset",
    "DatasetError",
    "EncodedDataset",
    "Example",
    "assistant_spans",
    "dataset_digest",
    "encode_conversation",
    "encode_dataset",
    "load_chat_dataset",
    "parse_jsonl",
]

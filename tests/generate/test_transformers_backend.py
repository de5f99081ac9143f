"""TransformersBackend: batched greedy decoding equals a plain `model.generate` loop, stop
strings are cut, and in-place weight swaps act exactly like a freshly built backend."""

from __future__ import annotations

import copy

import pytest
import torch

from cycleqd.generate.base import SamplingParams
from cycleqd.generate.transformers_backend import TransformersBackend, cut_at_stop

MAX_NEW = 40


def reference(model, tokenizer, conversations, max_new_tokens=MAX_NEW, eos=None):
    """The plain way: one prompt at a time, no padding, `model.generate`, greedy."""
    backend = TransformersBackend(model, tokenizer)  # only for its chat-template encoding
    eos = eos if eos is not None else [tokenizer.eos_token_id]
    replies = []
    for conv in conversations:
        ids = torch.tensor([backend.encode(conv)])
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=tokenizer.pad_token_id,
        )
        tokens = out[0, ids.shape[1] :].tolist()
        if tokens and tokens[-1] in eos:  # the end token is not part of the reply (as in vLLM)
            tokens = tokens[:-1]
        replies.append(tokenizer.decode(tokens, skip_special_tokens=True))
    return replies


@pytest.fixture(scope="module")
def expected(chat_model, tokenizer, conversations):
    return reference(chat_model, tokenizer, conversations)


def test_prompts_differ_in_length_and_replies_are_not_trivial(
    chat_model, tokenizer, conversations, expected
):
    backend = TransformersBackend(chat_model, tokenizer)
    lengths = {len(backend.encode(c)) for c in conversations}
    assert len(lengths) == len(conversations)  # every prompt has its own length
    assert len(set(expected)) >= len(expected) - 2  # replies differ (a few may coincide)
    assert all(len(r) > 20 for r in expected)


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_batched_greedy_equals_model_generate(
    chat_model, tokenizer, conversations, expected, batch_size
):
    backend = TransformersBackend(chat_model, tokenizer, batch_size=batch_size)
    replies = backend.generate(conversations, SamplingParams(max_new_tokens=MAX_NEW))
    assert replies == expected
    assert backend.stats.batches == -(-len(conversations) // batch_size)
    if batch_size > 1:  # sorted by length: far less padding than the worst case
        assert backend.stats.padded_prompt_tokens > backend.stats.prompt_tokens


def test_unbatched_calls_equal_model_generate(chat_model, tokenizer, conversations, expected):
    backend = TransformersBackend(chat_model, tokenizer, batch_size=8)
    params = SamplingParams(max_new_tokens=MAX_NEW)
    assert [backend.generate([c], params)[0] for c in conversations] == expected


def test_replies_come_back_in_input_order(chat_model, tokenizer, conversations, expected):
    backend = TransformersBackend(chat_model, tokenizer, batch_size=4)
    order = [5, 0, 10, 3, 7, 1, 9, 2, 8, 4, 6]
    replies = backend.generate([conversations[i] for i in order], SamplingParams(MAX_NEW))
    assert replies == [expected[i] for i in order]


def test_end_of_turn_token_stops_each_sequence_on_its_own(chat_model, tokenizer, conversations):
    """Declare a token the model often emits an end token: sequences end at different steps,
    leave the batch (and the KV cache), and the others still match `model.generate`."""
    plain = TransformersBackend(chat_model, tokenizer)
    ids = [t for c in conversations for t in _greedy_tokens(plain, c)]
    counts = torch.bincount(torch.tensor(ids))
    counts[tokenizer.eos_token_id] = 0
    stop_token = int(counts.argsort(descending=True)[3])  # common, but not everywhere first
    model = copy.deepcopy(chat_model)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, stop_token]
    expected = reference(model, tokenizer, conversations, eos=[tokenizer.eos_token_id, stop_token])
    lengths = [len(tokenizer.encode(r, add_special_tokens=False)) for r in expected]
    assert min(lengths) < max(lengths)  # some sequences end early, others go on

    backend = TransformersBackend(model, tokenizer, batch_size=8)
    assert backend.generate(conversations, SamplingParams(MAX_NEW)) == expected
    assert backend.stats.generated_tokens < len(conversations) * MAX_NEW


def _greedy_tokens(backend, conv):
    ids = torch.tensor([backend.encode(conv)])
    out = backend.model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW, do_sample=False
    )
    return out[0, ids.shape[1] :].tolist()


def test_stop_strings_are_cut_and_end_generation(chat_model, tokenizer, conversations, expected):
    # A stop string that spans two tokens: the end of one token's text + the start of the next.
    plain = TransformersBackend(chat_model, tokenizer)
    tokens = _greedy_tokens(plain, conversations[4])
    pieces = [tokenizer.decode([t]) for t in tokens]
    k = next(i for i in range(5, len(pieces) - 1) if pieces[i].strip() and pieces[i + 1].strip())
    spanning = pieces[k][-2:] + pieces[k + 1][:2]
    at = expected[4].index(spanning)
    for stops in [(spanning,), ("zzz-never", "\n   ", spanning)]:
        want = [cut_at_stop(r, stops) for r in expected]
        assert len(want[4]) <= at
        assert sum(w != r for w, r in zip(want, expected, strict=True)) >= 1
        for batch_size in (1, 3, 8):
            backend = TransformersBackend(chat_model, tokenizer, batch_size=batch_size)
            replies = backend.generate(conversations, SamplingParams(MAX_NEW, stop=stops))
            assert replies == want
            assert all(s not in r for r in replies for s in stops)
            # Sequences ended at their stop, not at max_new_tokens.
            assert backend.stats.generated_tokens < len(conversations) * MAX_NEW


def test_cut_at_stop_takes_the_earliest_stop():
    assert cut_at_stop("abc STOP def END", ("END", "STOP")) == "abc "
    assert cut_at_stop("abc", ("x",)) == "abc"
    assert cut_at_stop("abc", ("", "c")) == "ab"  # an empty stop string is ignored


def test_max_new_tokens(chat_model, tokenizer, conversations, expected):
    backend = TransformersBackend(chat_model, tokenizer, batch_size=4)
    short = backend.generate(conversations, SamplingParams(max_new_tokens=5))
    assert backend.stats.generated_tokens <= 5 * len(conversations)
    assert all(e.startswith(s) for s, e in zip(short, expected, strict=True))
    assert backend.generate(conversations[:2], SamplingParams(max_new_tokens=0)) == ["", ""]


def test_load_weights_swaps_like_a_fresh_backend(
    chat_model, other_chat_model, tokenizer, conversations, expected
):
    params = SamplingParams(max_new_tokens=MAX_NEW)
    fresh_other = TransformersBackend(other_chat_model, tokenizer, batch_size=3)
    other_expected = fresh_other.generate(conversations, params)
    assert other_expected != expected

    warm = TransformersBackend(copy.deepcopy(chat_model), tokenizer, batch_size=3)
    assert warm.generate(conversations, params) == expected
    n = warm.load_weights(other_chat_model.state_dict().items())
    assert n == len(other_chat_model.state_dict())
    assert warm.generate(conversations, params) == other_expected
    warm.load_weights(chat_model.state_dict().items())  # and back
    assert warm.generate(conversations, params) == expected


def test_load_weights_of_a_materialised_child(tmp_path, tokenizer, conversations):
    """The evaluator's path: a child genome built tensor by tensor into a warm model gives
    the same text as a backend loaded fresh from the child's weights on disk."""
    from cycleqd import probe_world
    from cycleqd.generate.tiny_tokenizer import save_chat_model
    from cycleqd.genome import Genome, GenomeBook, Mutation
    from cycleqd.materialize import Materializer
    from cycleqd.weights import SafetensorsFolder, write_safetensors

    base = save_chat_model(tmp_path / "base", tokenizer=tokenizer)
    experts = [
        probe_world.build_expert(base, tmp_path / f"expert{i}", seed=i + 1) for i in range(2)
    ]
    book = GenomeBook()
    folders = {book.add(Genome(kind="base", source=str(base))): base}
    ids = []
    for i, folder in enumerate(experts):
        gid = book.add(Genome(kind="expert", source=str(folder), skill=f"s{i}"))
        folders[gid] = folder
        ids.append(gid)
    child = book.add(
        Genome(
            kind="child",
            parents=tuple(ids),
            weights=(0.6, 0.4),
            mutation=Mutation("svd_expert", seed=3, scale=0.5, expert=ids[0]),
        )
    )
    opened = {gid: SafetensorsFolder(f) for gid, f in folders.items()}
    materializer = Materializer(book, opened.get)

    child_dir = tmp_path / "child"
    save_chat_model(child_dir, tokenizer=tokenizer)  # config + tokenizer; weights replaced next
    for file in child_dir.glob("*.safetensors"):
        file.unlink()
    write_safetensors(
        child_dir / "model.safetensors", materializer.specs(), materializer.tensors(child)
    )
    params = SamplingParams(max_new_tokens=24)
    fresh = TransformersBackend.from_pretrained(child_dir, "float32", "cpu").generate(
        conversations, params
    )

    warm = TransformersBackend.from_pretrained(base, "float32", "cpu", batch_size=4)
    before = warm.generate(conversations, params)
    warm.load_weights(materializer.tensors(child))
    assert warm.generate(conversations, params) == fresh
    assert fresh != before


def test_load_weights_rejects_what_does_not_fit(chat_model, tokenizer):
    backend = TransformersBackend(copy.deepcopy(chat_model), tokenizer)
    state = chat_model.state_dict()
    with pytest.raises(KeyError, match="no tensor"):
        backend.load_weights([("model.nope.weight", torch.zeros(1))])
    name = "model.norm.weight"
    with pytest.raises(ValueError, match="shape"):
        backend.load_weights([(name, torch.zeros(3))])
    with pytest.raises(ValueError, match="not given"):
        backend.load_weights([(name, state[name])])
    assert backend.load_weights([(name, state[name])], strict=False) == 1


def test_from_pretrained_matches_the_in_memory_model(
    tmp_path, chat_model, tokenizer, conversations, expected
):
    chat_model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    backend = TransformersBackend.from_pretrained(tmp_path / "m", "float32", "cpu", batch_size=8)
    assert backend.generate(conversations, SamplingParams(MAX_NEW)) == expected


def test_sampling_is_seeded(chat_model, tokenizer, conversations, expected):
    params = SamplingParams(max_new_tokens=MAX_NEW, temperature=1.0)
    first = TransformersBackend(chat_model, tokenizer, seed=7).generate(conversations, params)
    again = TransformersBackend(chat_model, tokenizer, seed=7).generate(conversations, params)
    other = TransformersBackend(chat_model, tokenizer, seed=8).generate(conversations, params)
    assert first == again
    assert first != other
    assert first != expected


def test_a_tokenizer_without_chat_template_is_refused(chat_model, tokenizer):
    bare = copy.deepcopy(tokenizer)
    bare.chat_template = None
    with pytest.raises(ValueError, match="chat template"):
        TransformersBackend(chat_model, bare)

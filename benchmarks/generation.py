"""Tokens per second of the transformers backend (batched) against a naive loop, same prompts.

Naive: what a first evaluator would write, one conversation at a time through
`model.generate` (KV-cached, greedy, no padding). Ours: `TransformersBackend.generate` on all
conversations at once, sorted by length and batched, at several batch sizes. Every variant
runs in this process on the same random Llama and the same prompts, and must produce the
same greedy text as the naive loop (checked, and shown in the table).

    PYTHONPATH=. .venv/bin/python benchmarks/generation.py           # ~5M params, < 2 min
    PYTHONPATH=. .venv/bin/python benchmarks/generation.py --quick   # smoke test
"""

from __future__ import annotations

import argparse
import os
import platform
import time

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch

from cycleqd.generate.base import SamplingParams
from cycleqd.generate.tiny_tokenizer import build_chat_model
from cycleqd.generate.transformers_backend import TransformersBackend

TOPICS = ("add two numbers", "is_prime", "SELECT name FROM users", "ls -la", "the fox")


def conversations(n: int) -> list[list[dict]]:
    """n conversations whose prompts range from ~20 to ~560 tokens."""
    out = []
    for i in range(n):
        words = "please explain " * ((i * 7) % 45)
        conv = [{"role": "system", "content": "You are a helpful assistant."}] if i % 2 else []
        conv.append({"role": "user", "content": f"Task {i}: {TOPICS[i % 5]}. {words}"})
        out.append(conv)
    return out


@torch.inference_mode()
def naive(model, tokenizer, backend, convs, max_new_tokens) -> tuple[list[str], int, float]:
    eos = sorted(backend.eos_ids)
    replies, generated = [], 0
    start = time.perf_counter()
    for conv in convs:
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
        if tokens and tokens[-1] in eos:
            tokens = tokens[:-1]
        generated += len(tokens)
        replies.append(tokenizer.decode(tokens, skip_special_tokens=True))
    return replies, generated, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, few prompts")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-sizes", default="1,8,16,32")
    parser.add_argument("--repeats", type=int, default=2, help="best of N (a shared CPU is noisy)")
    args = parser.parse_args()
    if args.quick:
        args.prompts, args.max_new_tokens, args.batch_sizes, args.repeats = 8, 16, "1,8", 1
        shape = {"hidden": 64, "layers": 2, "intermediate": 176, "heads": 4}
    else:
        shape = {"hidden": 256, "layers": 6, "intermediate": 688, "heads": 8}

    model, tokenizer = build_chat_model(seed=0, **shape)
    n_params = sum(p.numel() for p in model.parameters())
    convs = conversations(args.prompts)
    params = SamplingParams(max_new_tokens=args.max_new_tokens)
    probe = TransformersBackend(model, tokenizer)
    lengths = [len(probe.encode(c)) for c in convs]
    print(
        f"model: random Llama, {n_params / 1e6:.1f}M params, float32, CPU "
        f"({platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()})"
    )
    print(
        f"{len(convs)} conversations, prompt tokens {min(lengths)}-{max(lengths)}, "
        f"max_new_tokens {args.max_new_tokens}, greedy, best of {args.repeats} runs"
    )

    # Warm-up: first calls pay for lazy initialisation.
    naive(model, tokenizer, probe, convs[:2], 4)
    probe.generate(convs[:2], SamplingParams(max_new_tokens=4))

    runs = [naive(model, tokenizer, probe, convs, args.max_new_tokens) for _ in range(args.repeats)]
    reference, generated = runs[0][0], runs[0][1]
    seconds = min(run[2] for run in runs)
    rows = [("naive loop (model.generate, 1 prompt at a time)", seconds, generated, True)]
    for batch_size in (int(b) for b in args.batch_sizes.split(",")):
        backend = TransformersBackend(model, tokenizer, batch_size=batch_size)
        times, same = [], True
        for _ in range(args.repeats):
            same &= backend.generate(convs, params) == reference
            times.append(backend.stats.seconds)
        name = f"TransformersBackend batch_size={batch_size}"
        rows.append((name, min(times), backend.stats.generated_tokens, same))

    base_rate = rows[0][2] / rows[0][1]
    header = f"| {'variant':<50} | {'seconds':>7} | {'tokens':>6} | {'tokens/s':>8} | "
    header += f"{'vs naive':>8} | same text |"
    print()
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for name, secs, tokens, same in rows:
        rate = tokens / secs
        print(
            f"| {name:<50} | {secs:>7.2f} | {tokens:>6} | {rate:>8.0f} | "
            f"{rate / base_rate:>7.2f}x | {'yes' if same else 'NO':>9} |"
        )
    if not all(row[3] for row in rows):
        raise SystemExit("batched greedy text differs from the naive loop")


if __name__ == "__main__":
    main()

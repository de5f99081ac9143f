"""Training throughput (tokens/s) of LoRA against full fine-tuning, same model, same data.

The model is a random Llama of ~3.2M parameters (hidden 256, 4 layers, intermediate 688,
vocab 512: the tiny byte-level BPE tokenizer with Llama 3's chat template), the data a
synthetic chat set of ~130-token conversations. Every variant runs `cycleqd.finetune`'s own
training loop (`Trainer`: assistant-only loss, AdamW, warmup/decay, clipping; no checkpoints)
in this process on the same examples in the same order. Throughput counts every token run
through the model (prompt and reply, no padding) over the timed steps; the first `--warmup`
steps of each run are not timed. "grad+AdamW MB" is the float32 training state beyond the
model itself (a gradient and two moments per trainable weight). Variants run interleaved,
`--repeat` times, and the best run of each is reported (other processes share the CPU).

    PYTHONPATH=. .venv/bin/python benchmarks/finetune.py            # < 2 min on 2 cores
    PYTHONPATH=. .venv/bin/python benchmarks/finetune.py --quick    # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from cycleqd.finetune.config import parse_finetune_config
from cycleqd.finetune.data import ChatDataset, encode_dataset
from cycleqd.finetune.trainer import Trainer
from cycleqd.generate.tiny_tokenizer import build_chat_model, build_tokenizer

WORDS = (
    *("select", "name", "from", "users", "where", "age", "order", "by", "count", "group"),
    *("table", "join", "shell", "list", "files", "grep", "python", "function", "return"),
    *("value", "loop", "index", "error", "test", "class", "import", "print", "sort", "merge"),
)


def conversations(n: int, seed: int = 0) -> list[list[dict]]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        question = " ".join(rng.choice(WORDS) for _ in range(rng.randrange(12, 22)))
        answer = " ".join(rng.choice(WORDS) for _ in range(rng.randrange(10, 18)))
        rows.append(
            [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": f"Task {i}: {question}"},
                {"role": "assistant", "content": answer},
            ]
        )
    return rows


VARIANTS = {
    "full": {"method": "full"},
    "lora r16, 7 modules": {"method": "lora", "lora": {"rank": 16, "alpha": 32}},
    "lora r16, 7, dropout 0": {"method": "lora", "lora": {"rank": 16, "alpha": 32, "dropout": 0}},
    "lora r16, q+v": {
        "method": "lora",
        "lora": {"rank": 16, "alpha": 32, "target_modules": ["q_proj", "v_proj"]},
    },
}


def run_variant(name, overrides, base_dir, pad_id, examples, args) -> dict:
    config = parse_finetune_config(
        {
            "name": "bench",
            "base": str(base_dir),
            "data": "synthetic",
            "store": str(base_dir.parent / "unused"),
            "max_steps": args.warmup + args.steps,
            "batch_size": args.batch_size,
            "learning_rate": 1e-4 if overrides["method"] == "full" else 1e-3,
            "checkpoint_every": 0,
            "device": "cpu",
            **overrides,
        }
    )
    marks: list[tuple[float, int]] = []

    def on_step(state) -> None:
        marks.append((time.perf_counter(), state.tokens))

    trainer = Trainer(config, base_dir, pad_id, examples, on_step=on_step)
    start = time.perf_counter()
    outcome = trainer.run()
    total = time.perf_counter() - start
    (t0, tok0), (t1, tok1) = marks[args.warmup - 1], marks[-1]
    model = outcome.model
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "variant": name,
        "trainable": trainable,
        "tokens_per_s": (tok1 - tok0) / (t1 - t0),
        "s_per_step": (t1 - t0) / args.steps,
        "final_loss": outcome.state.losses[-1],
        "wall_s": total,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=688)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per run")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: on a shared machine more threads than free "
        "cores make every step many times slower)",
    )
    parser.add_argument("--quick", action="store_true", help="hidden 64, 2 layers: smoke test")
    parser.add_argument("--json", help="also write the measurements here")
    args = parser.parse_args()
    if args.quick:
        args.hidden, args.layers, args.intermediate = 64, 2, 176
        args.steps, args.warmup, args.repeat, args.rows = 3, 1, 1, 16
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    tokenizer = build_tokenizer()
    with tempfile.TemporaryDirectory(prefix="cycleqd-bench-ft-") as tmp:
        base_dir = Path(tmp) / "base"
        model, _ = build_chat_model(
            seed=0,
            tokenizer=tokenizer,
            hidden=args.hidden,
            layers=args.layers,
            intermediate=args.intermediate,
            heads=max(1, args.hidden // 64),
        )
        n_params = sum(p.numel() for p in model.parameters())
        model.save_pretrained(base_dir)
        tokenizer.save_pretrained(base_dir)
        del model
        rows = conversations(args.rows)
        dataset = ChatDataset(
            "synthetic", "-", rows, [("synthetic", i + 1) for i in range(len(rows))]
        )
        encoded = encode_dataset(tokenizer, dataset, max_length=512)
        print(
            f"model: {n_params / 1e6:.2f}M params (hidden {args.hidden}, {args.layers} layers, "
            f"intermediate {args.intermediate}, vocab {len(tokenizer)}); data: {len(rows)} rows, "
            f"{encoded.tokens / len(rows):.0f} tokens/row; batch {args.batch_size}; "
            f"{args.steps} timed + {args.warmup} warm-up steps per run, best of {args.repeat}; "
            f"torch {torch.__version__}, {args.threads} thread(s), "
            f"{platform.processor() or platform.machine()}",
            flush=True,
        )
        best: dict[str, dict] = {}
        for round_ in range(args.repeat):
            for name, overrides in VARIANTS.items():
                row = run_variant(
                    name, overrides, base_dir, tokenizer.pad_token_id, encoded.examples, args
                )
                print(
                    f"  round {round_ + 1}: {name:22s} {row['tokens_per_s']:8.0f} tokens/s",
                    flush=True,
                )
                if name not in best or row["tokens_per_s"] > best[name]["tokens_per_s"]:
                    best[name] = row

    full = best["full"]
    print()
    header = (
        f"| {'variant':22s} | {'trainable params':>20s} | grad+AdamW MB | tokens/s | s/step "
        "| vs full |"
    )
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for name, row in best.items():
        share = row["trainable"] / n_params
        print(
            f"| {name:22s} | {row['trainable']:>10,} ({share:7.2%}) "
            f"| {row['trainable'] * 12 / 2**20:13.1f} | {row['tokens_per_s']:8.0f} |"
            f" {row['s_per_step']:6.3f} | {row['tokens_per_s'] / full['tokens_per_s']:6.2f}x |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"params": n_params, "results": best}, indent=1))


if __name__ == "__main__":
    main()

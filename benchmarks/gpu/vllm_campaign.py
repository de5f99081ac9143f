"""A two-generation campaign with `evaluation.backend.kind: vllm` on a GPU, timed against the
same campaign on `transformers` (cuda) in the same run.

The skills are those that can run on the machine: the tiny world's `tiny_code`/`tiny_sql`
always; `coding` and `os` with `--data` where the sandbox starts; `db` with `--db-url`. The
model is `--model` (an HF folder with a chat template; its experts are the base plus small
random low-rank changes), or a random chat Llama built here. Prints a table, writes JSON.

    python benchmarks/gpu/vllm_campaign.py --out $OUT [--model DIR] [--data DIR] [--db-url URL]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def skills(args) -> list[dict]:
    chosen = [{"name": "tiny_code", "samples": 16}, {"name": "tiny_sql", "samples": 16}]
    if args.data:
        from cycleqd.sandbox import get_backend

        try:
            get_backend()
            common = {"data": args.data, "limit": args.tasks, "max_new_tokens": 256}
            chosen += [{"name": "coding", **common}, {"name": "os", "max_rounds": 3, **common}]
        except Exception as exc:  # no sandbox: these skills refuse to run, by design
            print(f"coding/os skipped: {exc}")
    if args.db_url:
        chosen.append({"name": "db", "url": args.db_url, "data": args.data, "limit": args.tasks})
    return chosen


def world(args, root: Path, names: list[str]) -> dict:
    from cycleqd import probe_world
    from cycleqd.generate.tiny_tokenizer import save_chat_model

    base = (
        Path(args.model)
        if args.model
        else save_chat_model(root / "base", hidden=512, heads=8, intermediate=1024, layers=4)
    )
    experts = {
        n: str(probe_world.build_expert(base, root / n, seed=i + 1, strength=0.02))
        for i, n in enumerate(names)
    }
    return {"base": str(base), "experts": experts}


def run(models: dict, chosen: list[dict], backend: dict, store: Path) -> dict:
    from cycleqd.campaign import Campaign
    from cycleqd.config import parse_config
    from cycleqd.evaluators import build_evaluator
    from cycleqd.state import CampaignStore

    config = parse_config(
        {
            "name": f"gpu-{backend['kind']}",
            "generations": 2,
            "population": 2,
            "dtype": "bfloat16",
            "skills": chosen,
            "models": models,
            "mutation": {"kind": "svd_expert", "rate": 0.2},
            "evaluation": {"backend": backend},
        }
    )
    started = time.perf_counter()
    evaluator = build_evaluator(config)
    with Campaign(config, CampaignStore(store), evaluator) as campaign:
        campaign.seed()
        load_s = time.perf_counter() - started
        generations = time.perf_counter()
        while campaign.generation < config.generations:
            campaign.step()
        children = config.generations * config.population
        per_child = (time.perf_counter() - generations) / children
        archives = campaign.archives.to_dict()
    return {
        "backend": backend,
        "engine_start_and_seed_s": round(load_s, 2),
        "seconds_per_child": round(per_child, 3),
        "timings": {k: round(v, 3) for k, v in campaign.timings.items()},
        "best": {s: max(e["quality"] for e in cells) for s, cells in archives.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--model")
    parser.add_argument("--data")
    parser.add_argument("--db-url")
    parser.add_argument("--tasks", type=int, default=8)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        chosen = skills(args)
        models = world(args, root, [s["name"] for s in chosen])
        results = [
            run(models, chosen, {"kind": "vllm", "gpu_memory_utilization": 0.5}, root / "v"),
            run(models, chosen, {"kind": "transformers", "device": "cuda"}, root / "t"),
        ]
    vllm, hf = results
    print(f"{'backend':<14}{'start+seed s':>14}{'s/child':>10}")
    for r in results:
        print(
            f"{r['backend']['kind']:<14}{r['engine_start_and_seed_s']:>14.1f}"
            f"{r['seconds_per_child']:>10.2f}"
        )
    print(f"vLLM per child: {hf['seconds_per_child'] / vllm['seconds_per_child']:.2f}x faster")
    (out / "vllm_campaign.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

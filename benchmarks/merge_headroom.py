"""What merging can gain in a tiny world, before any search: each expert's task vector scaled
(theta_base + a * tau_k, a from 1/3 to 1.5) scored on its own skill and on the others, every
pair of experts merged half and half, and the three experts' average, on held-out questions.

CycleQD's merges are convex (the crossover's weights are normalised, the final rule's are a
softmax): a child keeps a skill only as far as a fraction of its expert's task vector keeps
it, and beats an expert on its own skill only where scaling the task vector up (the SVD
mutation's w_max) helps. This table says whether a world leaves that room: the paper's
method can only work where a = 1/2 keeps most of a skill, or a > 1 adds to it.

    PYTHONPATH=. .venv/bin/python benchmarks/merge_headroom.py --world WORLD
    PYTHONPATH=. .venv/bin/python benchmarks/merge_headroom.py --world WORLD \\
        --experts /tmp/cycleqd-paper-tables/experts-60     # experts retrained by paper_tables.py
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

SCALES = (1 / 3, 1 / 2, 3 / 4, 1.0, 5 / 4, 3 / 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", required=True, help="a built tiny world (its world.json)")
    parser.add_argument("--experts", help="a campaign store whose experts/<skill>/ replace them")
    parser.add_argument("--holdout", type=int, default=96, help="held-out questions per skill")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--name", default="tiny")
    args = parser.parse_args()

    import torch

    from cycleqd.skills.tiny.skill import TinyWorldEvaluator
    from cycleqd.skills.tiny.train import average_merge, linear_merge, state_of
    from cycleqd.state import CampaignStore

    torch.set_num_threads(1)
    started = time.perf_counter()
    world = json.loads((Path(args.world) / "world.json").read_text())
    folders = dict(world["experts"])
    if args.experts:
        folders = {s: str(Path(args.experts) / CampaignStore.expert_prefix(s)) for s in folders}
    evaluator = TinyWorldEvaluator(world["base"], n_samples=args.holdout, seed=1001)
    base = state_of(world["base"])
    experts = {s: state_of(f) for s, f in folders.items()}
    skills = list(experts)

    def score(name: str, state: dict) -> dict[str, float]:
        return evaluator.evaluate(name, state.items())

    rows: dict[str, dict[str, float]] = {"base": score("base", base)}
    scaling: dict[str, dict[str, list[float]]] = {}
    for skill, expert in experts.items():
        own, others = [], []
        for a in SCALES:
            scores = score(f"{skill}x{a:.2f}", linear_merge(base, [expert], [a]))
            own.append(scores[skill])
            others.append(sum(v for s, v in scores.items() if s != skill) / (len(skills) - 1))
        scaling[skill] = {"own": own, "others": others}
    for a, b in itertools.combinations(skills, 2):
        rows[f"{a} + {b} (1/2 each)"] = score(
            f"{a}+{b}", linear_merge(base, [experts[a], experts[b]], [0.5, 0.5])
        )
    rows["average of the experts"] = score("average", average_merge(base, list(experts.values())))
    elapsed = time.perf_counter() - started

    result = {
        "world": args.world,
        "experts": args.experts,
        "scales": list(SCALES),
        "scaling": scaling,
        "merges": rows,
        "holdout": args.holdout,
        "seconds": round(elapsed, 1),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"merge_headroom-{args.name}.json").write_text(json.dumps(result, indent=1) + "\n")

    head = " | ".join(f"a={a:.2f}" for a in SCALES)
    print(f"| expert (own skill / others' mean) | {head} |")
    print("|---" * (len(SCALES) + 1) + "|")
    for skill, curve in scaling.items():
        cells = " | ".join(
            f"{o:.2f} / {x:.2f}" for o, x in zip(curve["own"], curve["others"], strict=True)
        )
        print(f"| {skill} | {cells} |")
    print("\n| model | " + " | ".join(skills) + " | mean |")
    print("|---" * (len(skills) + 2) + "|")
    for name, scores in rows.items():
        mean = sum(scores.values()) / len(scores)
        print(f"| {name} | " + " | ".join(f"{scores[s]:.3f}" for s in skills) + f" | {mean:.3f} |")
    print(f"\n{elapsed:.0f} s")


if __name__ == "__main__":
    main()

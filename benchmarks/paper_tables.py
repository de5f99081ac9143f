"""The paper's Table 1 and Table 2 for the tiny skill world, measured the way the paper
measures them: every model scored on held-out questions, 95% intervals by bootstrap over the
questions (and over the search seeds for CycleQD's rows), each search run with several seeds.

Table 1 (Kuroki et al., ICLR 2025; Llama-3-8B experts, mean of MBPP+, DBBench, OS): the base,
each expert, the experts' average merge, one model fine-tuned on all skills' training data,
CycleQD's final model by the paper's rule (softmax merge of each archive's best) and by the
archives' best generalist (`best_mean`).
Table 2 (the ablation, means): one objective without the cycle (one archive, quality the
mean of the skills: `objective: mean`), the cycle with no mutation and uniform sampling,
+ Gaussian mutation, + the paper's SVD mutation, + elite sampling (the paper's CycleQD),
+ CMA-ES (the official code's option).

Every search starts from the same world (`--world`, built by `python -m
cycleqd.skills.tiny.train DIR`, or built here under --work with `--world-config`); its experts
can be retrained with `--expert-steps` (fewer steps: experts further from their ceiling) and
`--expert-spec` (fine-tuning options over the world's, e.g. LoRA, for every expert or per
skill; the fine-tune-all model takes those given for every expert). The searches run in
`--workers` processes, one torch thread each.

    PYTHONPATH=. .venv/bin/python benchmarks/paper_tables.py --world WORLD --seeds 0 1 2
    PYTHONPATH=. .venv/bin/python benchmarks/paper_tables.py --quick     # a mini world, minutes
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from collections.abc import Collection
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

# Table 2's rows: the config changes each makes on top of the world's campaign config.
ABLATION = {
    "no cycle (single objective)": {
        "objective": "mean",
        "mutation": {"kind": "none"},
        "sampling": {"method": "uniform"},
    },
    "cycle (no mutation, uniform sampling)": {
        "mutation": {"kind": "none"},
        "sampling": {"method": "uniform"},
    },
    "+ Gaussian mutation": {
        "mutation": {"kind": "gaussian", "sigma": 0.001},
        "sampling": {"method": "uniform"},
    },
    "+ SVD mutation": {
        "mutation": {"kind": "svd", "w_max": 1.5},
        "sampling": {"method": "uniform"},
    },
    "+ elite sampling (CycleQD)": {"mutation": {"kind": "svd", "w_max": 1.5}},
    "+ CMA-ES": {"mutation": {"kind": "svd", "w_max": 1.5}, "proposer": {"kind": "cma_es"}},
    # Not the paper's: the official code's expert-SVD mutation, the tiny world's default.
    "expert-SVD mutation (tiny world default)": {"mutation": {"kind": "svd_expert", "rate": 0.3}},
}
DEFAULT_ROW = "expert-SVD mutation (tiny world default)"
CYCLEQD_ROW = "+ elite sampling (CycleQD)"
PAPER_TABLE1 = {
    "fine-tuned on all data": 47.0,
    "experts' average merge": 46.7,
    "CycleQD (merge of the best)": 52.4,
}
PAPER_TABLE2 = {
    "no cycle (single objective)": 47.6,
    "cycle (no mutation, uniform sampling)": 49.4,
    "+ Gaussian mutation": 48.5,
    "+ SVD mutation": 51.7,
    "+ elite sampling (CycleQD)": 52.4,
}


# -- scoring ------------------------------------------------------------------------------------


def held_out(config) -> list:
    """The config's skills on their held-out questions (`holdout_seed`), `holdout` of them."""
    return [s.model_copy(update={"seed": s.holdout_seed}) for s in config.skills]


def correct_by_skill(evaluator, name: str, tensors) -> dict[str, list[int]]:
    """Score a model; every held-out question's outcome (1 correct, 0 not) per skill."""
    evaluator.evaluate(name, tensors)
    samples = evaluator.samples(name)
    return {
        skill: [int(bool(s["correct"])) for s in result["samples"]]
        for skill, result in samples.items()
        if not result["reported"]
    }


def bootstrap(runs: list[dict[str, list[int]]], draws: int, seed: int = 0) -> dict[str, Any]:
    """Mean per skill and over skills, with 95% intervals: resampling the runs (seeds) and,
    within each, the questions of each skill."""
    rng = np.random.default_rng(seed)
    skills = list(runs[0])
    arrays = [{s: np.asarray(run[s], dtype=float) for s in skills} for run in runs]
    point = {s: float(np.mean([a[s].mean() for a in arrays])) for s in skills}
    point["mean"] = float(np.mean([point[s] for s in skills]))
    samples = {s: np.empty(draws) for s in [*skills, "mean"]}
    for b in range(draws):
        chosen = [arrays[i] for i in rng.integers(len(arrays), size=len(arrays))]
        for s in skills:
            samples[s][b] = np.mean(
                [a[s][rng.integers(a[s].size, size=a[s].size)].mean() for a in chosen]
            )
        samples["mean"][b] = np.mean([samples[s][b] for s in skills])
    return {
        s: {
            "mean": point[s],
            "low": float(np.percentile(samples[s], 2.5)),
            "high": float(np.percentile(samples[s], 97.5)),
        }
        for s in [*skills, "mean"]
    }


# -- the searches (one process each) ------------------------------------------------------------


def _campaign_config(world: dict, args: dict, overrides: dict, seed: int) -> dict:
    from cycleqd.skills.tiny.train import campaign_config

    data = campaign_config(
        world,
        name="paper-tables",
        generations=args["generations"],
        samples=args["samples"],
        population=args["population"],
    )
    data["seed"] = seed
    data["evaluation"]["backend"]["threads"] = 1
    for skill in data["skills"]:
        skill["holdout_seed"] = 1001
    data["final"] = {"method": "merge_best"}
    data.update(overrides)
    return data


def search(job: tuple) -> dict[str, Any]:
    """One campaign (row, seed); its final models by both rules, scored on held-out questions."""
    import torch

    from cycleqd.campaign import Campaign, final_genome
    from cycleqd.config import parse_config
    from cycleqd.evaluators import build_evaluator, skills_evaluator
    from cycleqd.state import CampaignStore

    torch.set_num_threads(1)
    world, args, row, overrides, seed, folder = job
    started = time.perf_counter()
    config = parse_config(_campaign_config(world, args, overrides, seed))
    holdout = skills_evaluator(config, skills=_sized(held_out(config), args["holdout"]))
    with Campaign(config, CampaignStore(folder), build_evaluator(config)) as campaign:
        campaign.run()
        searched_s = time.perf_counter() - started
        out = {"row": row, "seed": seed, "search_s": searched_s, "models": {}}
        for rule in ("merge_best", "best_mean"):
            gid = campaign.book.add(final_genome(campaign.archives, rule))
            tensors = campaign.materializer.tensors(gid)
            out["models"][rule] = correct_by_skill(holdout, f"{row}/{rule}", tensors)
        out["fill"] = {a: len(campaign.archives[a].cells) for a in campaign.archives.names}
    out["seconds"] = time.perf_counter() - started
    return out


def fixed_models(job: tuple) -> dict[str, Any]:
    """The rows that depend on no search seed: base, experts, average merge, fine-tune-all."""
    import torch

    from cycleqd.config import parse_config
    from cycleqd.evaluators import skills_evaluator
    from cycleqd.skills.tiny.train import average_merge, state_of

    torch.set_num_threads(1)
    world, args, all_data_model = job
    started = time.perf_counter()
    config = parse_config(_campaign_config(world, args, {}, 0))
    holdout = skills_evaluator(config, skills=_sized(held_out(config), args["holdout"]))
    base = state_of(world["base"])
    experts = {s: state_of(p) for s, p in world["experts"].items()}
    models = {"base": correct_by_skill(holdout, "base", base.items())}
    for skill, state in experts.items():
        models[f"expert {skill}"] = correct_by_skill(holdout, skill, state.items())
    average = average_merge(base, list(experts.values()))
    models["experts' average merge"] = correct_by_skill(holdout, "average", average.items())
    if all_data_model:
        state = state_of(all_data_model)
        models["fine-tuned on all data"] = correct_by_skill(holdout, "all", state.items())
    return {"models": models, "seconds": time.perf_counter() - started}


def _sized(skills: list, n: int | None) -> list:
    return [s.model_copy(update={"samples": n}) for s in skills] if n else skills


# -- the world ----------------------------------------------------------------------------------


def prepare_world(args: argparse.Namespace, work: Path) -> dict:
    """The base and experts (`--world`, or built here), experts retrained with
    --expert-steps, and the model fine-tuned on all skills' training data."""
    from cycleqd.skills.tiny.train import _config_from, build_world, expert_specs

    if args.world:
        world = json.loads((Path(args.world) / "world.json").read_text())
        root = Path(args.world)
    else:
        cfg = _config_from(json.loads(args.world_config))
        root = work / "world"
        if not (root / "world.json").exists():
            world = build_world(root, cfg, on_log=print, workers=args.workers)
        world = json.loads((root / "world.json").read_text())
    if args.expert_steps or args.expert_overrides:
        cfg = _config_from(
            {**json.loads(args.world_config), "expert": {"steps": args.expert_steps}}
            if args.expert_steps
            else json.loads(args.world_config)
        )
        specs = expert_specs(cfg)
        specs = {s: _with_spec(spec, args, s, specs) for s, spec in specs.items()}
        world = _retrained(world, specs, work / f"experts-{_experts_tag(args)}", args)
    if not args.experts_only:
        world["all_data"] = _fine_tuned_on_all(world, root, work, args)
    return world


def _with_spec(spec: dict, args, skill: str | None, skills: Collection[str]) -> dict:
    """`spec` with --expert-spec's options: the same for every expert, or per skill where the
    JSON is keyed by the world's skill names (the fine-tune-all model, `skill` None, takes no
    per-skill options)."""
    overrides = args.expert_overrides
    if overrides and set(overrides) <= set(skills):
        overrides = overrides.get(skill, {}) if skill else {}
    if overrides.get("data", "derived") != "derived":
        spec = {k: v for k, v in spec.items() if k != "size"}  # `size` cuts derived sets only
    return {**spec, **overrides}


def _experts_tag(args) -> str:
    """A folder name per expert recipe, so that runs with other experts never share one."""
    import hashlib

    tag = str(args.expert_steps or "world")
    if args.expert_overrides:
        tag += "-" + hashlib.sha256(args.expert_spec.encode()).hexdigest()[:8]
    return tag


def _retrained(world: dict, specs: dict, store: Path, args) -> dict:
    from cycleqd.config import parse_config
    from cycleqd.experts import train_expert
    from cycleqd.skills.tiny.train import campaign_config
    from cycleqd.state import CampaignStore

    config = campaign_config({"base": world["base"], "experts": specs}, name="experts")
    experts = {}
    for skill in specs:
        train_expert(parse_config(config), str(store), skill)
        experts[skill] = str(store / CampaignStore.expert_prefix(skill))
    return {
        **world,
        "experts": experts,
        "expert_steps": args.expert_steps,
        "expert_spec": args.expert_overrides,
    }


def _fine_tuned_on_all(world: dict, root: Path, work: Path, args) -> str | None:
    """One model fine-tuned on the three skills' derived training sets at once, with an
    expert's settings and as many steps as the three experts together (the same examples
    seen). None where the training sets are not found."""
    from cycleqd.config import parse_config
    from cycleqd.experts import train_expert
    from cycleqd.skills.tiny.train import campaign_config, expert_specs
    from cycleqd.state import CampaignStore

    sets = sorted((root / "experts-store" / "training").glob("*.jsonl"))
    if not sets:
        print(f"no derived training sets under {root}/experts-store/training: no all-data row")
        return None
    data = work / "all-skills.jsonl"
    with data.open("w") as out:
        for path in sets:
            out.write(path.read_text())
    from cycleqd.skills.tiny.train import _config_from

    cfg = _config_from(json.loads(args.world_config))
    specs = expert_specs(cfg)
    first = next(iter(specs))
    steps = (args.expert_steps or cfg.expert.steps) * len(specs)
    spec = {**_with_spec(specs[first], args, None, specs), "data": str(data), "max_steps": steps}
    spec.pop("size", None)
    config = campaign_config({"base": world["base"], "experts": {**specs, first: spec}}, "all")
    store = work / f"all-data-{_experts_tag(args)}"
    train_expert(parse_config(config), str(store), first)
    return str(store / CampaignStore.expert_prefix(first))


# -- report -------------------------------------------------------------------------------------


def tables(fixed: dict, searches: list[dict], draws: int) -> dict[str, dict]:
    table1 = {name: bootstrap([m], draws) for name, m in fixed["models"].items()}
    by_row: dict[str, dict[str, list]] = {}
    for result in searches:
        for rule, model in result["models"].items():
            by_row.setdefault(result["row"], {}).setdefault(rule, []).append(model)
    table2 = {row: bootstrap(rules["merge_best"], draws) for row, rules in by_row.items()}
    if CYCLEQD_ROW in by_row:
        table1["CycleQD (merge of the best)"] = table2[CYCLEQD_ROW]
        table1["CycleQD best generalist (best_mean)"] = bootstrap(
            by_row[CYCLEQD_ROW]["best_mean"], draws
        )
    if DEFAULT_ROW in by_row:
        table1["tiny world default: expert-SVD, best_mean"] = bootstrap(
            by_row[DEFAULT_ROW]["best_mean"], draws
        )
    return {"table1": table1, "table2": table2}


def markdown(table: dict[str, dict], paper: dict[str, float]) -> str:
    if not table:
        return "(no rows run)"
    skills = [s for s in next(iter(table.values())) if s != "mean"]
    head = "| model | " + " | ".join(skills) + " | mean [95% CI] | paper (mean) |"
    lines = [head, "|---" * (len(skills) + 3) + "|"]
    for name, row in table.items():
        cells = [f"{row[s]['mean']:.3f}" for s in skills]
        mean = (
            f"**{row['mean']['mean']:.3f}** [{row['mean']['low']:.3f}, {row['mean']['high']:.3f}]"
        )
        reference = f"{paper[name]:.1f}" if name in paper else ""
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {mean} | {reference} |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    titles = ("Table 1", "Table 2 (ablation)")
    for ax, key, title in zip(axes, ("table1", "table2"), titles, strict=True):
        rows = result[key]
        names = list(rows)
        if not names:
            ax.set_visible(False)
            continue
        means = [rows[n]["mean"]["mean"] for n in names]
        errors = [
            [m - rows[n]["mean"]["low"] for n, m in zip(names, means, strict=True)],
            [rows[n]["mean"]["high"] - m for n, m in zip(names, means, strict=True)],
        ]
        ax.bar(range(len(names)), means, yerr=errors, capsize=3, color="#4c72b0")
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
        ax.set_ylabel("mean over skills (held-out), 95% CI")
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", help="a built tiny world (its world.json)")
    parser.add_argument("--world-config", default="{}", help="WorldConfig overrides (JSON)")
    parser.add_argument("--expert-steps", type=int, default=0, help="retrain experts (0: no)")
    parser.add_argument(
        "--expert-spec",
        default="{}",
        help='fine-tuning options (JSON): {"method": "lora"} for all, or keyed by skill',
    )
    parser.add_argument(
        "--experts-only",
        action="store_true",
        help="retrain the experts, print where, and stop (for merge_headroom.py --experts)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--generations", type=int, default=12)
    parser.add_argument("--population", type=int, default=4)
    parser.add_argument("--samples", type=int, default=96, help="search questions per skill")
    parser.add_argument("--holdout", type=int, default=96, help="held-out questions per skill")
    parser.add_argument("--rows", nargs="*", default=list(ABLATION), help="Table 2 rows to run")
    parser.add_argument("--draws", type=int, default=2000, help="bootstrap draws")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--work", default="/tmp/cycleqd-paper-tables")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--name", default="tiny")
    parser.add_argument("--quick", action="store_true", help="a mini world, 2 seeds, 3 gens")
    args = parser.parse_args()
    try:
        args.expert_overrides = json.loads(args.expert_spec)
    except json.JSONDecodeError as exc:
        parser.error(f"--expert-spec is not JSON: {exc}")
    if args.quick:
        args.world_config = json.dumps(
            {
                "shape": {"hidden": 32, "layers": 1, "heads": 2, "kv_heads": 1, "intermediate": 64},
                "n_warmup": 20,
                "n_general_skill": 5,
                "n_skill": 40,
                "base": {"steps": 8, "batch_size": 8, "warmup": 2},
                "expert": {"steps": 4, "batch_size": 8, "warmup": 1},
            }
        )
        args.seeds, args.generations, args.population = [0, 1], 3, 2
        args.samples, args.holdout, args.draws, args.name = 6, 12, 200, "quick"
    started = time.perf_counter()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    world = prepare_world(args, work)
    world_s = time.perf_counter() - started
    if args.experts_only:
        store = Path(next(iter(world["experts"].values()))).parent.parent
        print(f"experts in {store} ({world_s / 60:.1f} min)")
        return
    settings = {k: getattr(args, k) for k in ("generations", "population", "samples", "holdout")}
    jobs = []
    for row in args.rows:
        for seed in args.seeds:
            folder = work / "searches" / f"{row.replace(' ', '_')}-{seed}"
            shutil.rmtree(folder, ignore_errors=True)
            jobs.append((world, settings, row, ABLATION[row], seed, str(folder)))
    with ProcessPoolExecutor(args.workers) as pool:
        fixed_future = pool.submit(fixed_models, (world, settings, world.get("all_data")))
        searches = list(pool.map(search, jobs))
        fixed = fixed_future.result()
    result = tables(fixed, searches, args.draws)
    elapsed = time.perf_counter() - started
    result["run"] = {
        "world": world.get("report", {}).get("config") or args.world,
        "expert_steps": args.expert_steps or None,
        "expert_spec": args.expert_overrides,
        "seeds": args.seeds,
        **settings,
        "world_s": round(world_s, 1),
        "search_s": [round(s["search_s"], 1) for s in searches],
        "total_s": round(elapsed, 1),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
        "workers": args.workers,
        "fill": {f"{s['row']}/{s['seed']}": s["fill"] for s in searches},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"paper_tables-{args.name}.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out / f"paper_tables-{args.name}.png")
    print("Table 1 (held-out questions)\n" + markdown(result["table1"], PAPER_TABLE1))
    print("\nTable 2 (held-out questions)\n" + markdown(result["table2"], PAPER_TABLE2))
    print(
        f"\n{len(searches)} searches ({len(args.rows)} rows x {len(args.seeds)} seeds), "
        f"{args.generations} generations of {args.population}; world {world_s:.0f} s; "
        f"{elapsed / 60:.1f} min in all with {args.workers} workers"
    )


if __name__ == "__main__":
    main()

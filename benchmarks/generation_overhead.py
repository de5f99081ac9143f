"""Where a generation's time goes: the tiny skill world through kfp.local, split into
orchestration, materialisation, generation + scoring, and archive update.

The same campaign (same seed, so the same children) runs three times:
(a) through the Kubeflow pipeline with `kfp.local` (every stage a subprocess), twice: with
    every evaluation task loading its own model (as pods on a cluster do), and with the tasks
    handing their children to one warm evaluation server (as `cycleqd run` does); the wall
    time of each generation is read from the store (the time between two committed
    snapshots);
(b) in one process with `Campaign`, whose `timings` split the work itself: breeding,
    materialisation (producing the child's tensors), evaluation (loading them into the warm
    model, generating, running the answers in the sandbox, scoring) and the archive update
    (insert + snapshot + garbage collection).
The warm server reports the same split for the evaluation it did within (a). Orchestration
is (a) minus that work (the server's where it did it, else (b)'s): process starts, imports,
opening the campaign, building the evaluator, the KFP launcher. The target of issue 8:
everything but generation and scoring under 20% of a generation.

    PYTHONPATH=. .venv/bin/python benchmarks/generation_overhead.py --world runs/tiny/world
    PYTHONPATH=. .venv/bin/python benchmarks/generation_overhead.py --world DIR --population 8

`--world` is a built tiny world (a folder with world.json: `cycleqd run` builds one in
runs/tiny/world; `python -m cycleqd.skills.tiny.train DIR` too).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import itertools
import json
import os
import platform
import re
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def campaign_config(world: Path, generations: int, population: int, samples: int):
    from cycleqd.config import parse_config
    from cycleqd.skills.tiny.train import campaign_config as tiny_config

    models = json.loads((world / "world.json").read_text())
    data = tiny_config(
        models, name="overhead", generations=generations, samples=samples, population=population
    )
    data["evaluation"]["threads"] = 1
    return parse_config(data)


def run_kfp_local(
    config, root: Path, parallelism: int = 1, warm_server: bool = True
) -> tuple[list[float], dict | None]:
    """Seconds per generation through kfp.local (from the committed snapshots' times), with
    the evaluation tasks handing their children to one warm evaluation server (as
    `cycleqd run` does) or each loading its own model (as pods on a cluster do); and the
    server's timings (seconds by part, over the whole run), None without a server."""
    from kfp import local

    from cycleqd.evaluation_service import evaluation_service
    from cycleqd.state import DRIVER_PID_ENV, CampaignStore
    from cycleqd_kfp.pipelines.cycleqd_pipeline import PipelineOptions, build_pipeline

    os.environ[DRIVER_PID_ENV] = str(os.getpid())
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root / "kfp"))
    options = PipelineOptions(generations_per_run=config.generations, parallelism=parallelism)
    pipeline = build_pipeline(options)
    store_uri = str(root / "campaign")
    root.mkdir(parents=True, exist_ok=True)
    log = root / "kfp-local.log"
    server, timings = None, None
    with contextlib.ExitStack() as stack, log.open("w") as out:
        if warm_server:
            server = stack.enter_context(
                evaluation_service(root / "evaluation-server.log", warm_config=config.to_yaml())
            )
            assert server.running, f"see {root / 'evaluation-server.log'}"
        saved = os.dup(1), os.dup(2)  # kfp.local prints every task's log: keep tables readable
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)
        try:
            pipeline(campaign_config=config.to_yaml(), campaign_store_uri=store_uri)
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
        if server is not None:
            timings = server.stats()["timings"]
    snapshots = root / "campaign" / "generations"
    store = CampaignStore(store_uri)
    assert store.latest_generation() == config.generations, f"see {log}"
    times = [(snapshots / f"{g:06d}.json").stat().st_mtime for g in range(config.generations + 1)]
    return [b - a for a, b in itertools.pairwise(times)], timings


_TASK_LINE = re.compile(  # kfp.local colours task names: "Task \x1b[96m'breed'\x1b[0m finished"
    r"^(\d\d:\d\d:\d\d\.\d+) - INFO - (?:Executing task|Task) [^'\n]*'([\w-]+)'"
    r"(?:\x1b\[[0-9;]*m)?( finished)?",
    re.M,
)


def task_seconds(log: Path) -> dict[str, list[float]]:
    """Seconds of every task kfp.local ran (from its log: start to finish, process start and
    exit included), by task ('breed-2' counts as 'breed')."""
    started: dict[str, float] = {}
    seconds: dict[str, list[float]] = {}
    for match in _TASK_LINE.finditer(log.read_text()):
        stamp, name, finished = match.groups()
        at = datetime.datetime.strptime(stamp, "%H:%M:%S.%f")
        at_s = at.hour * 3600 + at.minute * 60 + at.second + at.microsecond / 1e6
        if not finished:
            started[name] = at_s
        elif name in started:
            kind = re.sub(r"-\d+$", "", name)
            seconds.setdefault(kind, []).append((at_s - started.pop(name)) % 86400)
    return seconds


def run_in_process(config, root: Path) -> dict[str, float]:
    """The same generations in one process, split by `Campaign.timings`."""
    from cycleqd.campaign import Campaign
    from cycleqd.evaluators import build_evaluator
    from cycleqd.state import CampaignStore

    with Campaign(config, CampaignStore(root / "campaign"), build_evaluator(config)) as campaign:
        campaign.seed()
        campaign.evaluator.evaluate  # noqa: B018  (built; its model load is not a generation's)
        campaign.timings.clear()
        breeding = 0.0
        started = time.perf_counter()
        for _ in range(config.generations):
            tic = time.perf_counter()
            campaign.breed_next()
            breeding += time.perf_counter() - tic
            for gid in campaign.load_pending():
                campaign.evaluate_child(gid)
            campaign.commit_next()
        total = time.perf_counter() - started
        archives = campaign.archives.to_dict()
    timings = dict(campaign.timings)
    return {
        "total": total,
        "breed": breeding,
        "materialize_s": timings.get("materialize_s", 0.0),
        "evaluate_s": timings.get("evaluate_s", 0.0),
        "commit": timings.get("commit_s", 0.0),
        "models": timings.get("models", 0),
        "archives": archives,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=Path, required=True, help="a built tiny world folder")
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--population", type=int, default=4)
    parser.add_argument("--samples", type=int, default=96, help="questions per skill")
    parser.add_argument(
        "--parallelism",
        type=int,
        default=1,
        help="evaluation tasks per generation (kfp.local runs them one after the other); "
        "the population: one task per child, as before evaluation tasks took shards",
    )
    parser.add_argument("--workdir", type=Path, help="default: a temporary folder")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    config = campaign_config(args.world, args.generations, args.population, args.samples)
    root = args.workdir or Path(tempfile.mkdtemp(prefix="cycleqd-overhead-"))
    print(
        f"# generation overhead, {datetime.date.today()}, {platform.platform()}, "
        f"{os.cpu_count()} CPUs; {args.generations} generations x {args.population} children, "
        f"{args.samples} questions per skill, {args.parallelism} evaluation task(s) per generation"
    )
    from cycleqd.state import CampaignStore

    work = run_in_process(config, root / "in-process")
    modes = {"evaluator per task": False, "warm evaluation server": True}
    walls, served = {}, {}
    for mode, warm in modes.items():
        folder = root / ("kfp-warm" if warm else "kfp-per-task")
        walls[mode], served[mode] = run_kfp_local(
            config, folder, args.parallelism, warm_server=warm
        )
        snapshot = CampaignStore(folder / "campaign").read_snapshot(config.generations)
        assert snapshot["archives"] == work["archives"], f"{mode}: archives differ"
    g = args.generations
    # The evaluation's parts: measured in the kfp.local run itself where a server did it (its
    # timings); for tasks that evaluate themselves, from the in-process run of the same
    # children (the task processes report nothing back).
    parts: dict[str, dict[str, float]] = {}
    for mode in modes:
        source = served[mode] or work
        parts[mode] = {
            "generation + scoring (evaluator)": source["evaluate_s"] / g,
            "materialisation": source["materialize_s"] / g,
            "breeding": work["breed"] / g,
            "archive update (insert, snapshot, GC)": work["commit"] / g,
        }
    wall = {mode: sum(per) / g for mode, per in walls.items()}
    for mode in modes:
        parts[mode]["orchestration (kfp.local tasks, imports, model loads)"] = wall[mode] - sum(
            parts[mode].values()
        )
    print("\n| part of a generation (kfp.local) | " + " | ".join(modes) + " |")
    print("| --- |" + " ---: |" * len(modes))
    for name in parts["evaluator per task"]:
        cells = [f"{parts[m][name]:.3f} s ({parts[m][name] / wall[m]:.1%})" for m in modes]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("| **wall per generation** | " + " | ".join(f"**{wall[m]:.2f} s**" for m in modes) + " |")
    print(
        "(generation + scoring and materialisation: the warm server's own timings in its run; "
        "per task: the in-process run's, "
        f"{work['evaluate_s'] / g:.3f} s and {work['materialize_s'] / g:.3f} s per generation)"
    )
    in_process = work["total"] / g
    for mode in modes:
        overhead = 1 - parts[mode]["generation + scoring (evaluator)"] / wall[mode]
        print(
            f"\n{mode}: everything but generation and scoring {overhead:.1%} of a generation "
            f"(target < 20%); kfp.local / in-process = {wall[mode] / in_process:.2f}x; "
            f"per-generation walls {[round(t, 1) for t in walls[mode]]}"
        )
    print(
        f"in one process: {in_process:.2f} s per generation, everything but generation and "
        f"scoring {1 - work['evaluate_s'] / work['total']:.1%}"
    )
    ratio = wall["warm evaluation server"] / wall["evaluator per task"]
    print(f"warm server / per task: {ratio:.2f}x; archives identical to the in-process run: True")
    print("\n| task (kfp.local) | " + " | ".join(modes) + " |")
    print("| --- |" + " ---: |" * len(modes))
    tasks = {
        mode: task_seconds(root / ("kfp-warm" if warm else "kfp-per-task") / "kfp-local.log")
        for mode, warm in modes.items()
    }
    for kind in ("breed", "evaluate", "commit"):
        cells = []
        for mode in modes:
            runs = tasks[mode].get(kind, [])
            cells.append(f"{sum(runs) / len(runs):.2f} s x {len(runs)}" if runs else "-")
        print(f"| {kind} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

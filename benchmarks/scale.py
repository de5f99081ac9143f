"""Does a long campaign stay flat? Per-generation time and state size over 2,000 generations.

The campaign runs in process (`cycleqd.campaign.Campaign`) on a local store with a scripted
evaluator: scores are pseudo-random functions of the genome id (sha256), so no weights are
built (`Materializer.tensors` is lazy and the evaluator never iterates it) and what is left is
the campaign's own work: breeding, linear forms, the pending/evaluation records, the archive
insertion, the snapshot and the garbage collection. Every `every` generations it records the
mean wall time per generation over the last window, the latest snapshot's bytes, the whole
store's bytes and object count, the genomes a snapshot carries and the largest number of
mutation terms in an elite's linear form (what materialising that elite costs).

    PYTHONPATH=. .venv/bin/python benchmarks/scale.py                 # 2,000 generations
    PYTHONPATH=. .venv/bin/python benchmarks/scale.py --generations 500 --png out.png

The test `tests/reliability/test_scale.py` runs `measure` and asserts flatness.

Where the time goes (cProfile over 800 generations, full archives): about three quarters
serialising the snapshot (archives and genomes as JSON), a sixth copying the archives to breed
from, a few percent the store's writes; all of it bounded by the archives' size. What still
grows, slowly, is the elites' lineage: compact recipes (svd_expert, gaussian mutations) are
rebuilt from every ancestor's mutation seed, so the snapshot keeps the elites' ancestors
(~135 after 2,000 generations, about 11 KB per 1,000 generations at the end).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from cycleqd.protocols import EvaluatorBase  # noqa: E402  (cycleqd found through REPO)

DEFAULT_PNG = REPO / "benchmarks" / "results" / "scale.png"


class ScriptedEvaluator(EvaluatorBase):
    """Deterministic pseudo-scores from the genome id; never touches the tensors."""

    def __init__(self, skills: Iterable[str]):
        self.skills = list(skills)
        self.calls = 0

    def evaluate(self, genome_id: str, tensors) -> dict[str, float]:
        self.calls += 1
        scores = {}
        for skill in self.skills:
            digest = hashlib.sha256(f"{genome_id}/{skill}".encode()).digest()
            scores[skill] = int.from_bytes(digest[:8], "big") / 2**64
        return scores


@dataclass
class Point:
    generation: int
    ms_per_generation: float  # median wall time over the window that ends here
    cpu_ms_per_generation: float  # mean CPU time of this process over the window
    snapshot_bytes: int  # generations/<latest>.json
    store_bytes: int  # every object in the store
    store_objects: int
    snapshot_genomes: int  # genome records in the latest snapshot
    elites: int  # distinct genomes in the archives
    max_form_terms: int  # largest svd + noise term count of an elite's linear form


def _store_size(root: Path) -> tuple[int, int]:
    total, count = 0, 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            total += os.path.getsize(os.path.join(dirpath, name))
            count += 1
    return total, count


def measure(
    world: dict,
    store_root: Path,
    generations: int = 2000,
    every: int = 100,
    seed: int = 0,
    bins: int = 6,
) -> list[Point]:
    """Run a campaign of `generations` generations; a Point every `every` generations.

    `bins` per BC axis: 6 gives archives of 36 cells that fill within the first few hundred
    generations, so that most of the run is spent with full archives (the bounded state)."""
    from cycleqd import probe_world
    from cycleqd.campaign import Campaign
    from cycleqd.config import parse_config
    from cycleqd.state import CampaignStore

    config = probe_world.default_config(world, name="scale", generations=generations)
    config["seed"] = seed
    for skill in config["skills"]:
        skill["bins"] = bins
    config = parse_config(config)
    points: list[Point] = []
    with Campaign(
        config, CampaignStore(store_root), ScriptedEvaluator(config.skill_names)
    ) as campaign:
        campaign.seed()
        walls: list[float] = []
        cpu_start = time.process_time()
        while campaign.generation < generations:
            start = time.perf_counter()
            campaign.step()
            walls.append(time.perf_counter() - start)
            if campaign.generation % every:
                continue
            cpu = time.process_time() - cpu_start
            key = store_root / "generations" / f"{campaign.generation:06d}.json"
            snapshot = json.loads(key.read_bytes())
            store_bytes, store_objects = _store_size(store_root)
            elites = campaign.archives.genome_ids()
            terms = [campaign.book.linear_form(g) for g in elites]
            points.append(
                Point(
                    generation=campaign.generation,
                    ms_per_generation=1000 * statistics.median(walls),
                    cpu_ms_per_generation=1000 * cpu / len(walls),
                    snapshot_bytes=key.stat().st_size,
                    store_bytes=store_bytes,
                    store_objects=store_objects,
                    snapshot_genomes=len(snapshot["genomes"]),
                    elites=len(elites),
                    max_form_terms=max(
                        (len(f.svd_terms) + len(f.noise_terms) for f in terms if f), default=0
                    ),
                )
            )
            walls = []
            cpu_start = time.process_time()
    return points


def table(points: list[Point]) -> str:
    header = (
        "| gen | ms/gen (median) | CPU ms/gen | snapshot KB | store MB | objects | genomes | "
        "elites | terms |"
    )
    lines = [header, "|" + " ---: |" * 9]
    for p in points:
        lines.append(
            f"| {p.generation} | {p.ms_per_generation:.1f} | {p.cpu_ms_per_generation:.1f} | "
            f"{p.snapshot_bytes / 1e3:.1f} | "
            f"{p.store_bytes / 1e6:.2f} | {p.store_objects} | {p.snapshot_genomes} | "
            f"{p.elites} | {p.max_form_terms} |"
        )
    return "\n".join(lines)


def plot(points: list[Point], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gens = [p.generation for p in points]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(gens, [p.ms_per_generation for p in points], marker="o", label="wall (median)")
    axes[0].plot(gens, [p.cpu_ms_per_generation for p in points], marker="s", label="CPU (mean)")
    axes[0].set_title("time per generation (ms)")
    axes[0].legend()
    axes[1].plot(gens, [p.snapshot_bytes / 1e3 for p in points], marker="o", label="snapshot")
    axes[1].set_title("latest snapshot (KB)")
    axes[2].plot(gens, [p.store_bytes / 1e6 for p in points], marker="o", label="MB")
    axes[2].set_title("whole store (MB)")
    for ax in axes:
        ax.set_xlabel("generation")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    fig.suptitle("CycleQD campaign at scale: scripted evaluator, local store")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--generations", type=int, default=2000)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bins", type=int, default=6, help="bins per BC axis")
    parser.add_argument("--png", type=Path, default=DEFAULT_PNG)
    parser.add_argument("--json", type=Path, default=None, help="also write the points")
    args = parser.parse_args(argv)

    from cycleqd import probe_world

    with tempfile.TemporaryDirectory(prefix="cycleqd-scale-") as tmp:
        world = probe_world.build_world(Path(tmp) / "world")
        points = measure(
            world, Path(tmp) / "store", args.generations, args.every, args.seed, args.bins
        )
    print(table(points))
    plot(points, args.png)
    print(f"curve: {args.png}")
    if args.json:
        args.json.write_text(json.dumps([asdict(p) for p in points], indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

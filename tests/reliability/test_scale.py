"""Scale: 2,000 generations stay flat in time per generation and in snapshot size.

`benchmarks/scale.py` runs the campaign in process with a scripted evaluator (pseudo-scores
from the genome id; no weights are built) and measures every 100 generations. Once the
archives are (nearly) full, the state is bounded by the archives: the time per generation and
the snapshot must not grow with the number of generations. The whole store grows by a
constant amount per generation (the log of every child: pending/ recipes and evaluations/
scores; snapshots are pruned to the last 20 and every 100th), never faster.
"""

from __future__ import annotations

import importlib.util
import statistics
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
GENERATIONS = 2000
EVERY = 100


def _load_benchmark():
    name = "cycleqd_benchmarks_scale"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / "scale.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.mark.slow
def test_two_thousand_generations_stay_flat(tiny_world, reliability):
    bench = _load_benchmark()
    # tmpfs where there is one: the curve is about growth, not the disk's fsync latency.
    shm = Path("/dev/shm")
    where = shm if shm.is_dir() and shm.stat().st_mode & 0o002 else None
    with tempfile.TemporaryDirectory(prefix="cycleqd-scale-", dir=where) as tmp:
        points = bench.measure(tiny_world, Path(tmp) / "store", GENERATIONS, EVERY)
    bench.plot(points, bench.DEFAULT_PNG)
    assert [p.generation for p in points] == list(range(EVERY, GENERATIONS + 1, EVERY))

    # "Full": the first point with 90% of the elites the archives finally hold.
    final_elites = points[-1].elites
    fill = next(i for i, p in enumerate(points) if p.elites >= 0.9 * final_elites)
    after_fill = points[fill : fill + 3]
    last = [p for p in points if p.generation > GENERATIONS - 500]
    assert points[fill].generation <= GENERATIONS // 2, "the archives never filled"

    def median(values) -> float:
        return statistics.median(values)

    cpu_ratio = median(p.cpu_ms_per_generation for p in last) / median(
        p.cpu_ms_per_generation for p in after_fill
    )
    wall_ratio = median(p.ms_per_generation for p in last) / median(
        p.ms_per_generation for p in after_fill
    )
    snapshot_ratio = max(p.snapshot_bytes for p in last) / points[fill].snapshot_bytes
    last_growth = last[-1].snapshot_bytes / last[0].snapshot_bytes
    # Store growth per generation (the per-child log): constant, not accelerating.
    early = (points[fill + 2].store_bytes - points[fill].store_bytes) / (2 * EVERY)
    late = (last[-1].store_bytes - last[0].store_bytes) / (last[-1].generation - last[0].generation)
    objects_late = (last[-1].store_objects - last[0].store_objects) / (
        last[-1].generation - last[0].generation
    )

    by_gen = {p.generation: p for p in points}
    curve = "; ".join(
        f"gen {g}: {by_gen[g].ms_per_generation:.1f} ms/gen ({by_gen[g].cpu_ms_per_generation:.1f}"
        f" CPU), snapshot {by_gen[g].snapshot_bytes / 1e3:.0f} KB, store "
        f"{by_gen[g].store_bytes / 1e6:.1f} MB in {by_gen[g].store_objects} objects"
        for g in (100, 500, 1000, 2000)
        if g in by_gen
    )
    flat = cpu_ratio <= 2.0 and wall_ratio <= 2.5 and snapshot_ratio <= 1.6 and last_growth <= 1.1
    reliability.record(
        "Scale",
        f"{GENERATIONS} generations, scripted evaluator, local store (tmpfs)",
        tried=1,
        survived=int(flat and late <= 1.5 * early),
        lost=0,
        detail=(
            f"{curve}. Archives 90% full at generation {points[fill].generation} "
            f"({points[fill].elites} elites). Last 500 generations vs right after filling: "
            f"CPU time x{cpu_ratio:.2f}, wall time x{wall_ratio:.2f}, snapshot x"
            f"{snapshot_ratio:.2f} (x{last_growth:.2f} within the last 500: the elites' "
            f"lineage, {last[-1].snapshot_genomes - last[-1].elites} ancestors at the end); "
            f"store +{late:.0f} B and +{objects_late:.1f} objects per generation (the child "
            f"log), {early:.0f} B right after filling. Curve: benchmarks/results/scale.png, "
            "table: `python benchmarks/scale.py`."
        ),
    )
    print("\n" + bench.table(points))
    # A small factor: before the fix the time grew without bound (x2.5 from 100 to 600).
    assert cpu_ratio <= 2.0, bench.table(points)
    assert wall_ratio <= 2.5, bench.table(points)
    assert snapshot_ratio <= 1.6 and last_growth <= 1.1, bench.table(points)
    assert late <= 1.5 * early, bench.table(points)
    # Snapshots are pruned: the last 20 and every 100th generation's.
    assert all(p.store_objects < 3 * p.generation + 200 for p in points)

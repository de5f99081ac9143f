"""Where model-written code and shell commands run: isolated, bounded, thrown away.

    from cycleqd.sandbox import Limits, Sandbox, run_python

    with Sandbox.open(Limits(user="root", cwd="/")) as session:   # one episode
        session.run("useradd -m jack")
        result = session.run("ls /home", timeout=5)                # RunResult

    run_python("print(sum(range(10)))").stdout                      # b"45\\n"

Backends: `bwrap` (default; bubblewrap namespaces, no daemon) and `docker` (a container per
session, for hosts with a Docker daemon). Pick one with `backend=` or the environment variable
`CYCLEQD_SANDBOX` (bwrap | docker).
"""

from __future__ import annotations

import os

from cycleqd.sandbox.base import (
    GiB,
    KiB,
    Limits,
    MiB,
    RunResult,
    SandboxError,
    SandboxUnavailableError,
    Session,
)

__all__ = [
    "GiB",
    "KiB",
    "Limits",
    "MiB",
    "RunResult",
    "Sandbox",
    "SandboxError",
    "SandboxUnavailableError",
    "Session",
    "get_backend",
    "run_python",
]

BACKEND_ENV = "CYCLEQD_SANDBOX"


def get_backend(name: str | None = None, **options):
    """The named backend ('bwrap' | 'docker'), else $CYCLEQD_SANDBOX, else bwrap.

    Raises SandboxUnavailableError (saying what to install) when it cannot run here.
    """
    name = (name or os.environ.get(BACKEND_ENV) or "bwrap").lower()
    if name == "bwrap":
        from cycleqd.sandbox.bwrap import BwrapBackend

        cls = BwrapBackend
    elif name == "docker":
        from cycleqd.sandbox.docker_backend import DockerBackend

        cls = DockerBackend
    else:
        raise SandboxUnavailableError(f"unknown sandbox backend {name!r}: use bwrap or docker")
    reason = cls.available()
    if reason:
        raise SandboxUnavailableError(reason)
    return cls(**options)


class Sandbox:
    """Entry point: `Sandbox.open(limits)` starts a session (a context manager)."""

    @staticmethod
    def open(limits: Limits | None = None, *, backend=None) -> Session:
        if backend is None or isinstance(backend, str):
            backend = get_backend(backend)
        return backend.open(limits or Limits())


def run_python(
    code: str,
    stdin: bytes | str | None = None,
    limits: Limits | None = None,
    *,
    args: tuple[str, ...] = (),
    backend=None,
) -> RunResult:
    """Run a Python program once in a fresh sandbox (isolated mode: no site, no env)."""
    limits = limits or Limits()
    with Sandbox.open(limits, backend=backend) as session:
        return session.run(["python3", "-I", "-c", code, *args], stdin=stdin)

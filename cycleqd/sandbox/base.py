"""What every sandbox backend offers: limits in, a session of commands, results out.

A `Session` is one throwaway machine: one root file system, one set of processes, kept for
the commands of one episode (the OS skill runs init scripts, several bash turns and a checker
in the same session) and destroyed by `close()`. Every command gets the session's limits:
a wall-clock limit, a CPU-time limit, a memory limit, a process-count limit, an output cap,
no network and an environment that holds only PATH, HOME and LANG.
"""

from __future__ import annotations

import contextlib
import shlex
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from cycleqd.errors import CycleQDError

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

SANDBOX_UID = 1000  # "sandbox" user: the unprivileged identity commands run as by default
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

User = Literal["sandbox", "root"]


class SandboxError(CycleQDError):
    """The sandbox could not be set up or broke down; the message says what to check."""


class SandboxUnavailableError(SandboxError):
    """No sandbox backend can run on this host (missing tool, no daemon, namespaces off)."""


@dataclass(frozen=True)
class Limits:
    """Bounds for every command of a session.

    `cpu_time` and `memory` are per process (RLIMIT_CPU, RLIMIT_AS) in the bwrap backend, so
    the aggregate memory of a session is bounded by `nproc * memory`; the Docker backend also
    caps the container as a whole (cgroup `mem_limit`, `pids_limit`).
    """

    wall_time: float = 10.0  # seconds per command (default for `Session.run`)
    cpu_time: float = 10.0  # CPU seconds per process
    memory: int = 1 * GiB  # bytes of address space per process
    nproc: int = 64  # processes (and threads) of the command's user inside the sandbox
    output_bytes: int = 64 * KiB  # kept per stream (stdout, stderr); the rest is dropped
    disk: int = 256 * MiB  # writable storage of the whole session (tmpfs size)
    file_size: int = 128 * MiB  # largest file a command may write (RLIMIT_FSIZE)
    user: User = "sandbox"  # "root" inside the sandbox (OS skill) or the unprivileged uid
    cwd: str = "/work"  # working directory of commands (a fresh, empty, writable folder)

    def __post_init__(self) -> None:
        for name in ("wall_time", "cpu_time"):
            if not getattr(self, name) > 0:
                raise ValueError(f"Limits.{name} must be > 0 seconds, got {getattr(self, name)}")
        for name in ("memory", "nproc", "output_bytes", "disk", "file_size"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"Limits.{name} must be a positive integer")
        if self.user not in ("sandbox", "root"):
            raise ValueError(f"Limits.user must be 'sandbox' or 'root', got {self.user!r}")
        if not self.cwd.startswith("/"):
            raise ValueError(f"Limits.cwd must be an absolute path, got {self.cwd!r}")

    def with_(self, **changes) -> Limits:
        return replace(self, **changes)


@dataclass
class RunResult:
    """What one command did. `exit_code` is None when it was killed by a signal or lost."""

    exit_code: int | None
    stdout: bytes
    stderr: bytes
    timed_out: bool = False
    truncated: bool = False  # some output was dropped (over `Limits.output_bytes`)
    killed_reason: str | None = None  # timeout | cpu_time | file_size | output_limit |
    #                                   signal:<n> | sandbox_lost
    duration: float = 0.0
    detail: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out and self.killed_reason is None

    def text(self, stream: Literal["stdout", "stderr", "both"] = "stdout") -> str:
        data = self.stdout + self.stderr if stream == "both" else getattr(self, stream)
        return data.decode("utf-8", errors="replace")


Command = str | Sequence[str]


def to_argv(cmd: Command) -> list[str]:
    """A string is a bash script (`bash -c`); a sequence is an argv run as is."""
    if isinstance(cmd, str):
        return ["/bin/bash", "-c", cmd]
    argv = [str(a) for a in cmd]
    if not argv:
        raise ValueError("empty command")
    return argv


def describe(cmd: Command) -> str:
    return cmd if isinstance(cmd, str) else shlex.join(str(a) for a in cmd)


class Session(ABC):
    """One sandbox kept for several commands. Use as a context manager."""

    limits: Limits

    @abstractmethod
    def run(
        self,
        cmd: Command,
        *,
        stdin: bytes | str | None = None,
        timeout: float | None = None,
        user: User | None = None,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        background: Literal["kill", "keep"] = "kill",
    ) -> RunResult:
        """Run `cmd` and wait for it (at most `timeout` or `limits.wall_time` seconds).

        `env` adds variables to the minimal environment (PATH, HOME, LANG); nothing of the
        host's environment is ever passed on. `background="kill"` (default) kills every
        process the command left behind once it returns, and every process of the sandbox
        when it times out; `"keep"` lets background processes live on (a shell's `cmd &`, as
        the OS tasks' start scripts need) and kills only the command's process group on a
        timeout. A command that kills the sandbox itself gets a result with
        `killed_reason == "sandbox_lost"`, and the session is no longer `alive`.
        """

    @abstractmethod
    def write_file(self, path: str, data: bytes | str, *, mode: int = 0o644) -> None:
        """Put a file into the sandbox (owned by the session's default user)."""

    @property
    @abstractmethod
    def alive(self) -> bool: ...

    @abstractmethod
    def close(self) -> None:
        """Kill every process of the session and discard its file system. Idempotent."""

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # a forgotten session must not outlive its owner
        with contextlib.suppress(Exception):
            self.close()


class Backend(ABC):
    name: str

    @abstractmethod
    def open(self, limits: Limits | None = None) -> Session:
        """Start a fresh sandbox session."""

    @classmethod
    @abstractmethod
    def available(cls) -> str | None:
        """None when usable on this host, else the reason (with what to install)."""


def base_env(user: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {
        "PATH": DEFAULT_PATH,
        "HOME": "/root" if user == "root" else "/work",
        "LANG": "C.UTF-8",
    }
    if extra:
        for key, value in extra.items():
            if not key or "=" in key or "\0" in key or "\0" in str(value):
                raise ValueError(f"invalid environment variable {key!r}")
            env[str(key)] = str(value)
    return env

"""The default backend: bubblewrap namespaces, no daemon.

One session = one `bwrap` process tree in fresh user, mount, pid, net, ipc, uts and cgroup
namespaces (see `_launcher.py` for the user namespace and the capped tmpfs) running a small
agent (`_agent.py`) that executes the host's commands one at a time. Killing the session kills
bwrap's init, and with it every process of the pid namespace, whatever those processes did.

Requirements: the `bwrap` binary (`apt-get install bubblewrap`), Linux user namespaces (as
root, or unprivileged user namespaces enabled; container runtimes with a default seccomp
profile may forbid them), and python3 in the host's /usr/bin (the agent runs with the host's
system interpreter, read-only).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path

from cycleqd.sandbox import rootfs
from cycleqd.sandbox.base import (
    SANDBOX_UID,
    Backend,
    Command,
    Limits,
    MiB,
    RunResult,
    SandboxError,
    SandboxUnavailableError,
    Session,
    User,
    base_env,
    to_argv,
)

HEADER = struct.Struct(">Q")
_HERE = Path(__file__).resolve().parent
AGENT_SOURCE = (_HERE / "_agent.py").read_text()
LAUNCHER_SOURCE = (_HERE / "_launcher.py").read_text()

UID_BASE = int(os.environ.get("CYCLEQD_SANDBOX_UID_BASE", "100000"))
UID_COUNT = 65536
SANDBOX_PYTHON = "/usr/bin/python3"
STARTUP_TIMEOUT = 20.0
REPLY_GRACE = 10.0  # the agent must answer within timeout + this, or the sandbox is killed

# Capabilities sandbox root keeps *inside its user namespace* (Docker's default set).
ROOT_CAPS = (
    ("CAP_CHOWN", 0),
    ("CAP_DAC_OVERRIDE", 1),
    ("CAP_FOWNER", 3),
    ("CAP_FSETID", 4),
    ("CAP_KILL", 5),
    ("CAP_SETGID", 6),
    ("CAP_SETUID", 7),
    ("CAP_SETPCAP", 8),
    ("CAP_NET_BIND_SERVICE", 10),
    ("CAP_SYS_CHROOT", 18),
    ("CAP_AUDIT_WRITE", 29),
    ("CAP_SETFCAP", 31),
)

INSTALL_HINT = (
    "bubblewrap is not installed: run `apt-get install bubblewrap` (Debian/Ubuntu; "
    "`dnf install bubblewrap` on Fedora), or use the Docker backend "
    "(CYCLEQD_SANDBOX=docker) on a host with a Docker daemon"
)


class BwrapBackend(Backend):
    """`root`: where the sandbox's programs come from, read-only: the host (`/`, default) or
    an unpacked distribution tree (for example an Ubuntu image exported with `docker export`)
    holding usr/ (with usr/bin/python3) and etc/."""

    name = "bwrap"

    def __init__(
        self, bwrap: str | None = None, tmpdir: str | None = None, root: str = "/"
    ) -> None:
        self.bwrap = bwrap or shutil.which("bwrap") or ""
        self.tmpdir = tmpdir
        self.root = os.path.abspath(root)
        if not os.path.exists(os.path.join(self.root, SANDBOX_PYTHON.lstrip("/"))):
            raise SandboxUnavailableError(
                f"{os.path.join(self.root, SANDBOX_PYTHON.lstrip('/'))} is missing: the "
                "sandbox needs python3 in the root it runs programs from"
            )

    @classmethod
    def available(cls) -> str | None:
        if not shutil.which("bwrap"):
            return INSTALL_HINT
        if not os.path.exists(SANDBOX_PYTHON):
            return f"{SANDBOX_PYTHON} is missing: the sandbox runs the host's system python3"
        if sys.platform != "linux":
            return "the bwrap sandbox needs Linux namespaces"
        return None

    def open(self, limits: Limits | None = None) -> BwrapSession:
        if not self.bwrap or not os.path.exists(self.bwrap):
            raise SandboxUnavailableError(INSTALL_HINT)
        return BwrapSession(self.bwrap, limits or Limits(), tmpdir=self.tmpdir, root=self.root)


class BwrapSession(Session):
    def __init__(
        self, bwrap: str, limits: Limits, *, tmpdir: str | None = None, root: str = "/"
    ) -> None:
        self.limits = limits
        self.root = root
        # Started as host root, the sandbox has a full range of uids (root and an unprivileged
        # "sandbox" user, both unprivileged on the host). Started as another user, the
        # sandbox has one uid: that user, as sandbox root; "sandbox" commands then run as it.
        self.privileged = os.geteuid() == 0
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._closed = False
        self._dead_reason: str | None = None
        self._stderr = bytearray()
        self._dir = tempfile.mkdtemp(prefix="cycleqd-sbx-", dir=tmpdir)
        try:
            self._start(bwrap)
        except BaseException:
            self.close()
            raise

    def _uid_of(self, user: User) -> int:
        return SANDBOX_UID if user == "sandbox" and self.privileged else 0

    # -- start ----------------------------------------------------------------------------
    def _bwrap_argv(self, bwrap: str, staging: str) -> list[str]:
        lim = self.limits
        binds, _ = rootfs.usr_layout(self.root)
        argv = [
            bwrap,
            "--unshare-ipc",
            "--unshare-pid",
            "--unshare-net",
            "--unshare-uts",
            "--unshare-cgroup-try",
            "--die-with-parent",
            "--new-session",
            "--hostname",
            "sandbox",
            "--bind",
            staging,
            "/",
        ]
        for path in binds:
            argv += ["--ro-bind", os.path.join(self.root, path.lstrip("/")), path]
        for path in rootfs.unreadable_dirs(self.root):
            argv += ["--size", "4096", "--tmpfs", path, "--remount-ro", path]
        argv += [
            "--proc",
            "/proc",
            # host-root-only corner of procfs: an empty folder instead of "Permission denied"
            "--size",
            "4096",
            "--tmpfs",
            "/proc/tty",
            "--remount-ro",
            "/proc/tty",
            "--dev",
            "/dev",
            "--perms",
            "1777",
            "--size",
            str(min(lim.disk, 64 * MiB)),
            "--tmpfs",
            "/dev/shm",
            "--remount-ro",
            "/dev",
            "--chdir",
            lim.cwd,
            "--clearenv",
        ]
        for key, value in base_env("root").items():
            argv += ["--setenv", key, value]
        argv += ["--cap-drop", "ALL"]
        for cap, _ in ROOT_CAPS:
            argv += ["--cap-add", cap]
        keep = json.dumps([num for _, num in ROOT_CAPS])
        argv += ["--", SANDBOX_PYTHON, "-I", "-S", "-c", AGENT_SOURCE, keep]
        return argv

    def _start(self, bwrap: str) -> None:
        staging = os.path.join(self._dir, "root")
        os.mkdir(staging, 0o700)
        # sandbox root (an unprivileged host uid) must be able to reach the mount point
        os.chmod(self._dir, 0o711)
        privileged = self.privileged
        config = {
            "staging": staging,
            "size": int(self.limits.disk),
            "map": {"base": UID_BASE, "count": UID_COUNT} if privileged else None,
            "entries": rootfs.build_entries(
                sandbox_uid=SANDBOX_UID,
                with_sandbox_user=self.limits.user == "sandbox" and privileged,
                cwd=self.limits.cwd,
                root=self.root,
            ),
            "bwrap": self._bwrap_argv(bwrap, staging),
        }
        config_path = os.path.join(self._dir, "config.json")
        fd = os.open(config_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(config, f)
        self._proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", LAUNCHER_SOURCE, config_path],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={},  # nothing of the host's environment reaches any sandbox process
            cwd="/",
            start_new_session=True,
            close_fds=True,
        )
        threading.Thread(target=self._drain_stderr, daemon=True).start()
        try:
            hello = self._recv(time.monotonic() + STARTUP_TIMEOUT, 1 << 16)
        except SandboxError as exc:
            self._kill()
            detail = self._stderr_text() or str(exc)
            raise SandboxError(f"the bwrap sandbox did not start: {detail}") from None
        if not hello.get("ready"):
            self._kill()
            raise SandboxError(f"the bwrap sandbox did not start: {hello}")

    def _drain_stderr(self) -> None:
        assert self._proc is not None and self._proc.stderr is not None
        stream = self._proc.stderr
        while True:
            try:
                data = stream.read1(65536)
            except (OSError, ValueError):
                return
            if not data:
                return
            if len(self._stderr) < 16384:
                self._stderr += data[: 16384 - len(self._stderr)]

    def _stderr_text(self) -> str:
        time.sleep(0.05)
        return bytes(self._stderr).decode("utf-8", "replace").strip()

    # -- channel ----------------------------------------------------------------------------
    def _send(self, obj: dict) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        data = json.dumps(obj).encode()
        try:
            self._proc.stdin.write(HEADER.pack(len(data)) + data)
            self._proc.stdin.flush()
        except (BrokenPipeError, OSError, ValueError) as exc:
            raise SandboxError(f"the sandbox is gone ({exc})") from None

    def _read_exact(self, n: int, deadline: float) -> bytes:
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        chunks: list[bytes] = []
        while n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise SandboxError("the sandbox did not answer in time")
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                continue
            data = os.read(fd, min(n, 1 << 20))
            if not data:
                raise SandboxError("the sandbox closed its channel")
            chunks.append(data)
            n -= len(data)
        return b"".join(chunks)

    def _recv(self, deadline: float, max_bytes: int) -> dict:
        (n,) = HEADER.unpack(self._read_exact(HEADER.size, deadline))
        if n > max_bytes:
            raise SandboxError(f"the sandbox sent a {n}-byte reply (limit {max_bytes})")
        try:
            reply = json.loads(self._read_exact(n, deadline))
        except ValueError:
            raise SandboxError("the sandbox sent a malformed reply") from None
        if not isinstance(reply, dict):
            raise SandboxError("the sandbox sent a malformed reply")
        return reply

    # -- API --------------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return not self._closed and self._dead_reason is None

    def run(
        self,
        cmd: Command,
        *,
        stdin: bytes | str | None = None,
        timeout: float | None = None,
        user: User | None = None,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        background: str = "kill",
    ) -> RunResult:
        """See `Session.run`."""
        lim = self.limits
        timeout = float(timeout if timeout is not None else lim.wall_time)
        user = user or lim.user
        uid = self._uid_of(user)
        if isinstance(stdin, str):
            stdin = stdin.encode()
        req = {
            "op": "run",
            "argv": to_argv(cmd),
            "stdin": base64.b64encode(stdin).decode() if stdin else None,
            "timeout": timeout,
            "uid": uid,
            "gid": uid,
            "cwd": cwd or lim.cwd,
            "env": base_env(user, env) | ({"HOME": "/root"} if uid == 0 else {}),
            "kill": "all" if background == "kill" else "group",
            "limits": {
                "cpu": max(1, round(lim.cpu_time)),
                "mem": int(lim.memory),
                "fsize": int(lim.file_size),
                # sandbox root also counts the agent and bwrap's init
                "nproc": int(lim.nproc) + (4 if uid == 0 else 0),
                "out_cap": int(lim.output_bytes),
            },
        }
        max_reply = 2 * (4 * lim.output_bytes // 3 + 16) + (1 << 16)
        with self._lock:
            if self._closed:
                raise SandboxError("the sandbox session is closed")
            if self._dead_reason is not None:
                return _lost(self._dead_reason)
            start = time.monotonic()
            try:
                self._send(req)
                reply = self._recv(start + timeout + REPLY_GRACE, max_reply)
            except SandboxError as exc:
                self._dead_reason = str(exc)
                self._kill()
                return _lost(self._dead_reason, time.monotonic() - start)
        if "error" in reply:
            raise SandboxError(f"sandbox agent error: {reply['error']}")
        return RunResult(
            exit_code=reply["exit_code"],
            stdout=base64.b64decode(reply["stdout"]),
            stderr=base64.b64decode(reply["stderr"]),
            timed_out=bool(reply["timed_out"]),
            truncated=bool(reply["truncated"]),
            killed_reason=reply["killed_reason"],
            duration=float(reply["duration"]),
            detail={
                "stdout_bytes": reply.get("stdout_bytes"),
                "stderr_bytes": reply.get("stderr_bytes"),
                "cpu_time": reply.get("cpu_time"),
            },
        )

    def write_file(self, path: str, data: bytes | str, *, mode: int = 0o644) -> None:
        if isinstance(data, str):
            data = data.encode()
        uid = self._uid_of(self.limits.user)
        req = {
            "op": "put",
            "path": path,
            "data": base64.b64encode(data).decode(),
            "mode": mode,
            "uid": uid,
            "gid": uid,
        }
        with self._lock:
            if not self.alive:
                raise SandboxError(f"the sandbox session is not usable ({self._dead_reason})")
            try:
                self._send(req)
                reply = self._recv(time.monotonic() + 30, 1 << 16)
            except SandboxError as exc:
                self._dead_reason = str(exc)
                self._kill()
                raise
        if "error" in reply:
            raise SandboxError(f"cannot write {path} in the sandbox: {reply['error']}")

    def _sandbox_init(self) -> int | None:
        """Host pid of the pid namespace's init (bwrap's second process)."""
        assert self._proc is not None
        top = self._proc.pid
        outer = top if _comm(top) == "bwrap" else None
        if outer is None:
            outer = next((c for c in _children(top) if _comm(c) == "bwrap"), None)
        if outer is None:
            return None
        return next(iter(_children(outer)), None)

    def _kill(self) -> None:
        """Kill the namespace's init, which takes every process of the sandbox with it; bwrap
        and the launcher then exit by themselves and everything is reaped (no zombies left
        for a host init that may not reap them). SIGKILL to the group if that fails."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            init = self._sandbox_init()
            if init is not None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(init, signal.SIGKILL)
            try:
                proc.wait(timeout=5 if init is not None else 0.01)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                with contextlib.suppress(Exception):
                    proc.wait(timeout=10)
        for stream in (proc.stdin, proc.stdout):
            with contextlib.suppress(Exception):
                if stream is not None:
                    stream.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._kill()
        if getattr(self, "_dir", None):
            shutil.rmtree(self._dir, ignore_errors=True)


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
        except (OSError, ValueError):
            continue
    return out


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def _lost(reason: str, duration: float = 0.0) -> RunResult:
    return RunResult(
        exit_code=None,
        stdout=b"",
        stderr=f"sandbox lost: {reason}\n".encode(),
        killed_reason="sandbox_lost",
        duration=duration,
    )

"""The Docker backend: one container per session, for hosts that have a Docker daemon.

The container is started once per session (`sleep infinity` under docker-init) and every
command is a `docker exec` into it, so an episode's files, users and background processes
persist across its turns. Isolation comes from Docker: no network (`network_disabled`), all
capabilities dropped except what root needs for the OS tasks, `no-new-privileges`, cgroup
limits for the container as a whole (`mem_limit`, `pids_limit`) and per-process ulimits
(cpu, fsize, nproc). For the unprivileged user the root file system is read-only with a
size-capped tmpfs for /tmp and the working directory. The `docker` Python SDK is imported
lazily (`pip install docker`).
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Mapping

from cycleqd.sandbox.base import (
    SANDBOX_UID,
    Backend,
    Command,
    Limits,
    RunResult,
    SandboxError,
    SandboxUnavailableError,
    Session,
    User,
    base_env,
    to_argv,
)

IMAGE_ENV = "CYCLEQD_SANDBOX_IMAGE"
DEFAULT_IMAGE = "python:3.11-slim"
LABEL = {"created_by": "cycleqd-sandbox"}
ROOT_CAPS = [
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "NET_BIND_SERVICE",
    "SYS_CHROOT",
    "AUDIT_WRITE",
    "SETFCAP",
]
# Kill every process but docker-init (pid 1), its `sleep` child and this shell.
CLEANUP = (
    "keep=$(cat /proc/1/task/1/children 2>/dev/null); for d in /proc/[0-9]*; do p=${d#/proc/}; "
    'case " 1 $keep $$ " in *" $p "*) ;; *) kill -9 "$p" 2>/dev/null;; esac; done; true'
)


def _import_docker():
    try:
        import docker
    except ImportError:
        raise SandboxUnavailableError(
            "the Docker backend needs the docker SDK: pip install docker"
        ) from None
    return docker


class DockerBackend(Backend):
    name = "docker"

    def __init__(self, image: str | None = None, client=None) -> None:
        self.image = image or os.environ.get(IMAGE_ENV) or DEFAULT_IMAGE
        self._client = client

    @classmethod
    def available(cls) -> str | None:
        try:
            docker = _import_docker()
        except SandboxUnavailableError as exc:
            return str(exc)
        try:
            client = docker.from_env(timeout=5)
            client.ping()
            client.close()
        except Exception as exc:
            return f"no Docker daemon is reachable ({type(exc).__name__}: {exc})"
        return None

    @property
    def client(self):
        if self._client is None:
            docker = _import_docker()
            try:
                self._client = docker.from_env(timeout=60)
                self._client.ping()
            except Exception as exc:
                raise SandboxUnavailableError(f"no Docker daemon is reachable: {exc}") from None
        return self._client

    def open(self, limits: Limits | None = None) -> DockerSession:
        return DockerSession(self.client, self.image, limits or Limits())


class DockerSession(Session):
    def __init__(self, client, image: str, limits: Limits) -> None:
        docker = _import_docker()
        self.limits = limits
        self._client = client
        self._lock = threading.Lock()
        self._closed = False
        self._dead_reason: str | None = None
        root = limits.user == "root"
        cpu = max(1, round(limits.cpu_time))
        ulimits = [
            docker.types.Ulimit(name="cpu", soft=cpu, hard=cpu + 1),
            docker.types.Ulimit(name="fsize", soft=limits.file_size, hard=limits.file_size),
            docker.types.Ulimit(name="core", soft=0, hard=0),
        ]
        tmpfs = {"/tmp": f"rw,nosuid,nodev,size={limits.disk}"}
        if not root and limits.cwd not in ("/", "/tmp"):
            tmpfs[limits.cwd] = f"rw,nosuid,nodev,size={limits.disk},uid={SANDBOX_UID}"
        try:
            self._container = client.containers.run(
                image,
                command=["sleep", "infinity"],
                detach=True,
                init=True,
                network_disabled=True,
                mem_limit=int(limits.memory),
                memswap_limit=int(limits.memory),
                pids_limit=int(limits.nproc) + 8,
                read_only=not root,
                tmpfs=tmpfs,
                cap_drop=["ALL"],
                cap_add=ROOT_CAPS if root else [],
                security_opt=["no-new-privileges"],
                ulimits=ulimits,
                user="0:0" if root else f"{SANDBOX_UID}:{SANDBOX_UID}",
                working_dir=limits.cwd,
                environment={},
                hostname="sandbox",
                labels=LABEL,
                auto_remove=False,
            )
        except Exception as exc:
            raise SandboxError(f"cannot start a sandbox container from {image!r}: {exc}") from None

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
        lim = self.limits
        timeout = float(timeout if timeout is not None else lim.wall_time)
        user = user or lim.user
        if isinstance(stdin, str):
            stdin = stdin.encode()
        argv = ["timeout", "-s", "KILL", f"{timeout:.3f}", *to_argv(cmd)]
        with self._lock:
            if self._closed:
                raise SandboxError("the sandbox session is closed")
            if self._dead_reason:
                return _lost(self._dead_reason)
            start = time.monotonic()
            try:
                result = self._exec(argv, stdin, user, cwd or lim.cwd, env, timeout)
            except SandboxError as exc:
                self._dead_reason = str(exc)
                with contextlib.suppress(Exception):
                    self._container.kill()
                return _lost(self._dead_reason, time.monotonic() - start)
            if background == "kill" or result.timed_out:
                with contextlib.suppress(SandboxError):
                    self._exec(["sh", "-c", CLEANUP], None, "root", "/", None, 30)
        return result

    def _exec(self, argv, stdin, user, cwd, env, timeout) -> RunResult:
        api = self._client.api
        uid = 0 if user == "root" else SANDBOX_UID
        start = time.monotonic()
        try:
            exec_id = api.exec_create(
                self._container.id,
                argv,
                stdin=bool(stdin),
                user=f"{uid}:{uid}",
                workdir=cwd,
                environment=base_env(user, env),
            )["Id"]
            sock = api.exec_start(exec_id, socket=True)
        except Exception as exc:
            raise SandboxError(f"docker exec failed: {exc}") from None
        raw = getattr(sock, "_sock", sock)
        cap = self.limits.output_bytes
        bufs = {1: bytearray(), 2: bytearray()}
        totals = {1: 0, 2: 0}
        deadline = start + timeout + 5.0
        try:
            if stdin:
                raw.sendall(stdin)
            with contextlib.suppress(OSError):
                raw.shutdown(socket.SHUT_WR)
            pending = b""
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise SandboxError("the sandbox container did not answer in time")
                ready, _, _ = select.select([raw], [], [], left)
                if not ready:
                    continue
                data = raw.recv(1 << 16)
                if not data:
                    break
                pending += data
                while len(pending) >= 8:
                    stream, size = pending[0], struct.unpack(">I", pending[4:8])[0]
                    if len(pending) < 8 + size:
                        break
                    chunk, pending = pending[8 : 8 + size], pending[8 + size :]
                    key = 2 if stream == 2 else 1
                    totals[key] += len(chunk)
                    room = cap - len(bufs[key])
                    if room > 0:
                        bufs[key] += chunk[:room]
                if len(pending) > (1 << 22):
                    raise SandboxError("malformed output stream from docker exec")
        finally:
            with contextlib.suppress(Exception):
                raw.close()
        info = api.exec_inspect(exec_id)
        code = info.get("ExitCode")
        timed_out = code in (124, 137) and time.monotonic() - start >= timeout - 0.05
        reason = (
            "timeout" if timed_out else (f"signal:{code - 128}" if code and code > 128 else None)
        )
        return RunResult(
            exit_code=None if timed_out or reason else code,
            stdout=bytes(bufs[1]),
            stderr=bytes(bufs[2]),
            timed_out=timed_out,
            truncated=totals[1] > cap or totals[2] > cap,
            killed_reason=reason,
            duration=time.monotonic() - start,
            detail={"stdout_bytes": totals[1], "stderr_bytes": totals[2]},
        )

    def write_file(self, path: str, data: bytes | str, *, mode: int = 0o644) -> None:
        # through the shell, not put_archive: `docker cp` cannot write into tmpfs mounts
        if isinstance(data, str):
            data = data.encode()
        script = f'cat > "$1" && chmod {mode:o} "$1"'
        result = self.run(["sh", "-c", script, "sh", path], stdin=data, timeout=60)
        if result.exit_code != 0:
            raise SandboxError(f"cannot write {path} in the sandbox container: {result.stderr!r}")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        container = getattr(self, "_container", None)
        if container is not None:
            with contextlib.suppress(Exception):
                container.remove(force=True)


def _lost(reason: str, duration: float = 0.0) -> RunResult:
    return RunResult(
        exit_code=None,
        stdout=b"",
        stderr=f"sandbox lost: {reason}\n".encode(),
        killed_reason="sandbox_lost",
        duration=duration,
    )

"""The in-sandbox agent of the bwrap backend (stdlib only; runs as `python3 -I -S -c <this>`).

It lives for the whole session as root of the sandbox (never root of the host: the sandbox's
uids map to unprivileged host uids or to the caller) and runs one command at a time for the
host, which talks to it over stdin/stdout with length-prefixed JSON frames. For every command
it sets the resource limits, drops to the requested uid, reads stdout and stderr while the
command runs (keeping at most `out_cap` bytes of each and discarding the rest, never buffering
without bound), enforces the wall-clock limit by killing the command's process group (or every
process of the sandbox), and reports what happened.

The host never trusts this process for its own safety: it kills the whole sandbox (a pid
namespace, so every process in it) when a reply is late, malformed or too large.
"""

import base64
import errno
import json
import os
import resource
import selectors
import signal
import struct
import subprocess
import sys
import time

HEADER = struct.Struct(">Q")
MAX_REQUEST = 512 << 20
GRACE = 0.1  # seconds to collect output still in flight after the command exited
MAX_ORPHANS = 32


def _prctl_setup(keep_caps):
    """Shrink the capability bounding set to what sandbox root keeps. (The agent stays
    dumpable: it holds nothing the commands may not see, and a non-dumpable process makes
    `find /` in the sandbox report unreadable /proc entries.)"""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_name, pr_capbset_drop = 15, 24
        # not "python3" in `ps`/`pgrep` output: tasks count the sandbox's python processes
        libc.prctl(pr_set_name, ctypes.c_char_p(b"sandbox-agent"), 0, 0, 0)
        for cap in range(64):
            if cap not in keep_caps:
                libc.prctl(pr_capbset_drop, cap, 0, 0, 0)
    except Exception as exc:  # never fatal: the namespaces are the boundary
        sys.stderr.write(f"agent: prctl setup incomplete: {exc}\n")


def _read_exact(fd, n):
    chunks = []
    while n:
        try:
            data = os.read(fd, min(n, 1 << 20))
        except InterruptedError:
            continue
        if not data:
            return None
        chunks.append(data)
        n -= len(data)
    return b"".join(chunks)


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except InterruptedError:
            continue
        view = view[n:]


class Agent:
    def __init__(self):
        # Private copies of the channel; fds 0 and 1 become /dev/null for everything else.
        self.inp = os.dup(0)
        self.out = os.dup(1)
        devnull = os.open("/dev/null", os.O_RDWR)
        os.dup2(devnull, 0)
        os.dup2(devnull, 1)
        os.close(devnull)
        self.orphans = []  # read ends still held open by background processes

    # -- channel ---------------------------------------------------------------------------
    def send(self, obj):
        data = json.dumps(obj).encode()
        _write_all(self.out, HEADER.pack(len(data)) + data)

    def recv(self):
        head = _read_exact(self.inp, HEADER.size)
        if head is None:
            return None
        (n,) = HEADER.unpack(head)
        if n > MAX_REQUEST:
            raise ValueError("request too large")
        body = _read_exact(self.inp, n)
        if body is None:
            return None
        return json.loads(body)

    # -- main loop ---------------------------------------------------------------------------
    def serve(self):
        self.send({"ready": True, "pid": os.getpid(), "python": sys.version.split()[0]})
        while True:
            self._wait_for_request()
            req = self.recv()
            if req is None or req.get("op") == "exit":
                return
            try:
                op = req.get("op")
                if op == "run":
                    reply = self.run(req)
                elif op == "put":
                    reply = self.put(req)
                elif op == "ping":
                    reply = {"pong": True}
                else:
                    reply = {"error": f"unknown op {op!r}"}
            except Exception as exc:  # report, keep serving
                reply = {"error": f"{type(exc).__name__}: {exc}"}
            self.send(reply)

    def _wait_for_request(self):
        """Block until the host sends something, meanwhile draining (and discarding) output
        that background processes write to pipes of commands that already returned."""
        if not self.orphans:
            return
        sel = selectors.DefaultSelector()
        sel.register(self.inp, selectors.EVENT_READ)
        for fd in self.orphans:
            sel.register(fd, selectors.EVENT_READ)
        try:
            while True:
                for key, _ in sel.select():
                    if key.fd == self.inp:
                        return
                    try:
                        data = os.read(key.fd, 65536)
                    except OSError:
                        data = b""
                    if not data:
                        sel.unregister(key.fd)
                        os.close(key.fd)
                        self.orphans.remove(key.fd)
        finally:
            sel.close()

    def _orphan(self, fd):
        self.orphans.append(fd)
        while len(self.orphans) > MAX_ORPHANS:
            os.close(self.orphans.pop(0))

    # -- operations --------------------------------------------------------------------------
    def put(self, req):
        path = req["path"]
        data = base64.b64decode(req["data"])
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(path, flags, req.get("mode", 0o644))
        try:
            _write_all(fd, data)
            os.fchmod(fd, req.get("mode", 0o644))
            os.fchown(fd, req.get("uid", 0), req.get("gid", 0))
        finally:
            os.close(fd)
        return {"ok": True}

    def run(self, req):
        argv = req["argv"]
        uid, gid = int(req.get("uid", 0)), int(req.get("gid", 0))
        lim = req["limits"]
        timeout = float(req["timeout"])
        cap = int(lim["out_cap"])
        flood = max(64 * cap, 16 << 20)
        stdin_data = base64.b64decode(req["stdin"]) if req.get("stdin") else b""
        kill_all = req.get("kill") == "all"

        def preexec():
            os.setsid()
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            cpu = int(lim["cpu"])
            resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
            resource.setrlimit(resource.RLIMIT_AS, (lim["mem"], lim["mem"]))
            resource.setrlimit(resource.RLIMIT_FSIZE, (lim["fsize"], lim["fsize"]))
            resource.setrlimit(resource.RLIMIT_NPROC, (lim["nproc"], lim["nproc"]))
            nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
            if uid != 0:
                os.setgroups([])
                os.setresgid(gid, gid, gid)
                os.setresuid(uid, uid, uid)

        in_fd, child_in = os.pipe()[::-1]
        out_fd, child_out = os.pipe()
        err_fd, child_err = os.pipe()
        start = time.monotonic()
        try:
            try:
                proc = self._spawn(argv, child_in, child_out, child_err, preexec, req)
            except BlockingIOError:
                if not kill_all:
                    raise
                # the process table of the sandbox is full of left-overs: clear it, retry
                self._kill(0, True)
                proc = self._spawn(argv, child_in, child_out, child_err, preexec, req)
        except (OSError, subprocess.SubprocessError) as exc:
            for fd in (in_fd, out_fd, err_fd):
                os.close(fd)
            msg = f"sandbox: cannot start {argv[0]!r}: {exc}\n".encode()
            return self._reply(127, b"", msg, False, False, None, 0.0, 0, len(msg))
        finally:
            for fd in (child_in, child_out, child_err):
                os.close(fd)
        bufs = {out_fd: bytearray(), err_fd: bytearray()}
        totals = dict.fromkeys(bufs, 0)

        sel = selectors.DefaultSelector()
        for fd in (out_fd, err_fd):
            os.set_blocking(fd, False)
            sel.register(fd, selectors.EVENT_READ)
        in_view = memoryview(stdin_data)
        if in_view:
            os.set_blocking(in_fd, False)
            sel.register(in_fd, selectors.EVENT_WRITE)
        else:
            os.close(in_fd)
            in_fd = None
        try:
            pidfd = os.pidfd_open(proc.pid)
            sel.register(pidfd, selectors.EVENT_READ)
        except (AttributeError, OSError):
            pidfd = None

        deadline = start + timeout
        state = {"status": None, "usage": None}

        def reap(block):
            if state["status"] is not None:
                return True
            try:
                pid, status, usage = os.wait4(proc.pid, 0 if block else os.WNOHANG)
            except ChildProcessError:
                state["status"] = 0
                return True
            if pid == 0:
                return False
            state["status"], state["usage"] = status, usage
            return True

        exited_at = None
        timed_out = False
        reason = None
        open_reads = {out_fd, err_fd}
        while True:
            now = time.monotonic()
            if exited_at is None and pidfd is None and reap(False):
                exited_at = now
            if exited_at is not None and (not open_reads or kill_all or now - exited_at >= GRACE):
                break
            if exited_at is None and now >= deadline:
                timed_out = True
                reason = "timeout"
                break
            if exited_at is not None:
                wait = GRACE - (now - exited_at)
            else:
                wait = deadline - now
                if pidfd is None:
                    wait = min(wait, 0.02)
            for key, _ in sel.select(max(0.0, wait)):
                fd = key.fd
                if fd == pidfd:
                    sel.unregister(pidfd)
                    exited_at = time.monotonic()
                elif fd == in_fd:
                    try:
                        n = os.write(in_fd, in_view[: 1 << 16])
                        in_view = in_view[n:]
                    except BlockingIOError:
                        pass
                    except OSError:
                        in_view = in_view[:0]
                    if not in_view:
                        sel.unregister(in_fd)
                        os.close(in_fd)
                        in_fd = None
                elif fd in open_reads:
                    if not self._pull(fd, sel, open_reads, bufs, totals, cap):
                        continue
                    if totals[out_fd] + totals[err_fd] > flood and exited_at is None:
                        reason = "output_limit"
            if reason == "output_limit":
                break

        if exited_at is None:  # timeout or output flood: kill it
            self._kill(proc.pid, kill_all)
        elif kill_all:
            self._kill(proc.pid, True)
        reap(True)
        status, usage = state["status"], state["usage"]
        code = _exit_code(status) if status is not None else None
        proc.returncode = code if code is not None else -9
        cpu_used = (usage.ru_utime + usage.ru_stime) if usage is not None else 0.0
        duration = time.monotonic() - start
        # collect what is still buffered (writers are dead now, or detached in background)
        end = time.monotonic() + (GRACE if exited_at is None or kill_all else 0.0)
        while open_reads and time.monotonic() < end:
            ready = sel.select(max(0.0, end - time.monotonic()))
            if not ready:
                break
            for key, _ in ready:
                if key.fd in open_reads:
                    self._pull(key.fd, sel, open_reads, bufs, totals, cap)
        for fd in list(open_reads):
            sel.unregister(fd)
            self._orphan(fd)  # held open by background processes: drained later
        if in_fd is not None:
            sel.unregister(in_fd)
            os.close(in_fd)
        if pidfd is not None:
            if pidfd in sel.get_map():
                sel.unregister(pidfd)
            os.close(pidfd)
        sel.close()

        if reason is None and code is not None and code < 0:
            sig = -code
            if sig == signal.SIGXCPU or (
                sig == signal.SIGKILL and cpu_used >= float(lim["cpu"]) - 0.05
            ):
                reason = "cpu_time"
            elif sig == signal.SIGXFSZ:
                reason = "file_size"
            else:
                reason = f"signal:{sig}"
        exit_code = code if code is not None and code >= 0 else None
        return self._reply(
            exit_code,
            bytes(bufs[out_fd]),
            bytes(bufs[err_fd]),
            timed_out,
            totals[out_fd] > cap or totals[err_fd] > cap,
            reason,
            duration,
            totals[out_fd],
            totals[err_fd],
            cpu_used,
        )

    @staticmethod
    def _spawn(argv, child_in, child_out, child_err, preexec, req):
        return subprocess.Popen(
            argv,
            stdin=child_in,
            stdout=child_out,
            stderr=child_err,
            preexec_fn=preexec,
            cwd=req.get("cwd") or "/",
            env=req.get("env") or {},
            close_fds=True,
        )

    @staticmethod
    def _pull(fd, sel, open_reads, bufs, totals, cap):
        """Read what is available on fd; keep up to cap bytes; False when nothing came."""
        try:
            data = os.read(fd, 1 << 16)
        except BlockingIOError:
            return False
        except OSError:
            data = b""
        if not data:
            sel.unregister(fd)
            os.close(fd)
            open_reads.discard(fd)
            return False
        totals[fd] += len(data)
        room = cap - len(bufs[fd])
        if room > 0:
            bufs[fd] += data[:room]
        return True

    @staticmethod
    def _reply(code, out, err, timed_out, truncated, reason, duration, n_out, n_err, cpu=0.0):
        return {
            "exit_code": code,
            "stdout": base64.b64encode(out).decode(),
            "stderr": base64.b64encode(err).decode(),
            "timed_out": timed_out,
            "truncated": truncated,
            "killed_reason": reason,
            "duration": duration,
            "stdout_bytes": n_out,
            "stderr_bytes": n_err,
            "cpu_time": cpu,
        }

    @staticmethod
    def _kill(pgid, kill_all):
        """SIGKILL the command's process group until no live member is left; with kill_all,
        every process of the sandbox except the agent and the namespace's init."""
        me = os.getpid()
        for _ in range(400):
            try:
                if kill_all:
                    os.kill(-1, signal.SIGKILL)
                else:
                    os.killpg(pgid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            alive = [
                pid
                for pid, st, pg in _processes()
                if pid not in (1, me) and st not in (b"Z", b"X") and (kill_all or pg == pgid)
            ]
            if not alive:
                return
            time.sleep(0.005)


def _exit_code(status):
    """os.waitstatus_to_exitcode, also for the Python 3.8 of older distributions."""
    if os.WIFSIGNALED(status):
        return -os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def _processes():
    """(pid, state, pgrp) of every process visible in /proc (the sandbox's pid namespace)."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        out.append((int(name), fields[0], int(fields[2])))
    return out


def main():
    keep = json.loads(sys.argv[1]) if len(sys.argv) > 1 else []
    _prctl_setup(set(keep))
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    try:
        Agent().serve()
    except BrokenPipeError:
        pass
    except OSError as exc:
        if exc.errno != errno.EPIPE:
            raise


if __name__ == "__main__":
    main()

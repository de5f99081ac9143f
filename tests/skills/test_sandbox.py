"""The sandbox against hostile code: everything is contained, the host is unharmed, and the
evaluation goes on afterwards (a normal command runs after every attack).

The bwrap tests need `bwrap` (apt-get install bubblewrap) and user namespaces; the Docker
tests need a reachable Docker daemon. Each skips with the reason when its backend cannot run.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
import time
from pathlib import Path

import pytest

from cycleqd.sandbox import (
    Limits,
    MiB,
    Sandbox,
    SandboxError,
    SandboxUnavailableError,
    get_backend,
    run_python,
)
from cycleqd.sandbox.bwrap import UID_BASE, UID_COUNT, BwrapBackend

SECRET_NAME = "CYCLEQD_TEST_FAKE_SECRET"
SECRET_VALUE = "s3cr3t-canary-7f1d0c2a"


def _bwrap_skip_reason() -> str | None:
    reason = BwrapBackend.available()
    if reason:
        return reason
    try:
        with Sandbox.open(Limits(), backend="bwrap") as s:
            r = s.run("true")
            if r.exit_code != 0:
                return f"the bwrap sandbox cannot run commands here: {r}"
    except (SandboxError, SandboxUnavailableError) as exc:
        return f"the bwrap sandbox cannot start here: {exc}"
    return None


_BWRAP_SKIP = _bwrap_skip_reason()
needs_bwrap = pytest.mark.skipif(_BWRAP_SKIP is not None, reason=str(_BWRAP_SKIP))


@pytest.fixture
def canary(tmp_path: Path) -> Path:
    """A host file outside any sandbox; it must survive every attack unchanged."""
    path = tmp_path / "canary" / "canary.txt"
    path.parent.mkdir()
    path.write_text("alive\n")
    return path


@pytest.fixture
def secret_env(monkeypatch):
    monkeypatch.setenv(SECRET_NAME, SECRET_VALUE)
    return SECRET_VALUE


def _sandbox_uid_processes() -> list[int]:
    """Host processes running as one of the sandboxes' host uids (left-overs = a leak)."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            uid = os.stat(f"/proc/{name}").st_uid
        except OSError:
            continue
        if UID_BASE <= uid < UID_BASE + UID_COUNT:
            found.append(int(name))
    return found


@pytest.fixture
def no_leaks():
    """After the test, no process (not even a zombie) of a sandbox's host uid may remain."""
    before = set(_sandbox_uid_processes())
    yield
    deadline = time.monotonic() + 5
    while (left := set(_sandbox_uid_processes()) - before) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not left, f"processes outlived their sandbox: {sorted(left)}"


def _healthy(session) -> None:
    """The evaluation goes on: a normal command still works in this session."""
    r = session.run(["python3", "-c", "print(6 * 7)"], timeout=20)
    assert r.exit_code == 0, r
    assert r.stdout == b"42\n"


# -- basics ------------------------------------------------------------------------------------


@needs_bwrap
class TestBwrapBasics:
    def test_shell_string_argv_exit_code_and_stdin(self):
        with Sandbox.open(Limits()) as s:
            r = s.run("echo hello; echo oops >&2; exit 3")
            assert (r.exit_code, r.stdout, r.stderr) == (3, b"hello\n", b"oops\n")
            assert not r.timed_out and r.killed_reason is None
            r = s.run(["python3", "-c", "import sys; print(sys.stdin.read()[::-1])"], stdin="abc")
            assert r.stdout == b"cba\n"
            r = s.run(["/no/such/program"])
            assert r.exit_code == 127

    def test_identity_workdir_and_minimal_environment(self, secret_env):
        with Sandbox.open(Limits()) as s:
            r = s.run("id -u; pwd; env | sort")
            lines = r.text().splitlines()
            assert lines[0] == "1000"  # the unprivileged sandbox user (root host: full uid map)
            assert lines[1] == "/work"
            env = dict(line.split("=", 1) for line in lines[2:])
            # only what we set, plus what bash itself sets for every script
            assert set(env) <= {"PATH", "HOME", "LANG", "PWD", "SHLVL", "_"}
            assert SECRET_VALUE not in r.text()
        with Sandbox.open(Limits(user="root", cwd="/")) as s:
            assert s.run("id -u; pwd").text().split() == ["0", "/"]

    def test_session_keeps_files_and_background_processes(self):
        with Sandbox.open(Limits(user="root", cwd="/")) as s:
            assert s.run("echo data > /root/f && useradd -m jack").exit_code == 0
            assert s.run("cat /root/f; id -u jack; stat -c %U /home/jack").text().split() == [
                "data",
                "1000",
                "jack",
            ]
            s.run("sleep 30 &", background="keep")
            assert "sleep 30" in s.run("ps -eo args").text()
            s.run("true")  # default: leftovers of a command are killed when it returns
            assert "sleep 30" not in s.run("ps -eo args").text()

    def test_sessions_are_isolated_from_each_other(self):
        with Sandbox.open(Limits()) as a, Sandbox.open(Limits()) as b:
            a.run("echo mine > /work/x")
            assert b.run("cat /work/x").exit_code != 0
            assert "x" not in b.run("ls /work").text()

    def test_timeout_kills_and_session_continues(self):
        with Sandbox.open(Limits(wall_time=1.0)) as s:
            t0 = time.monotonic()
            r = s.run("echo started; sleep 30")
            assert r.timed_out and r.killed_reason == "timeout"
            assert r.stdout == b"started\n"
            assert time.monotonic() - t0 < 10
            _healthy(s)

    def test_output_is_truncated_while_reading(self):
        with Sandbox.open(Limits(output_bytes=1000)) as s:
            r = s.run("head -c 5000000 /dev/zero | tr '\\0' x; echo done >&2")
            assert r.truncated and len(r.stdout) == 1000 and r.stderr == b"done\n"
            assert r.detail["stdout_bytes"] == 5_000_000
            r = s.run("yes")  # endless output: cut off, not buffered
            assert r.killed_reason == "output_limit" and len(r.stdout) == 1000
            _healthy(s)

    def test_write_file_and_run_python(self):
        with Sandbox.open(Limits()) as s:
            s.write_file("/work/prog.py", "print('from file')\n")
            assert s.run("python3 prog.py").stdout == b"from file\n"
        assert run_python("print(sum(range(10)))").stdout == b"45\n"

    def test_closed_session_refuses_commands(self):
        s = Sandbox.open(Limits())
        s.close()
        s.close()  # idempotent
        assert not s.alive
        with pytest.raises(SandboxError):
            s.run("true")


# -- red team ----------------------------------------------------------------------------------

# name -> (user, command, check of the RunResult)
ATTACKS = {
    "fork_bomb_bash": ("sandbox", ":(){ :|:& };:", None),
    "fork_bomb_bash_root": ("root", ":(){ :|:& };:", None),
    "fork_bomb_python": (
        "sandbox",
        "python3 -c 'import os\nwhile True:\n  try: os.fork()\n  except OSError: pass'",
        lambda r: r.timed_out,
    ),
    "infinite_loop": ("sandbox", "python3 -c 'while True: pass'", lambda r: r.timed_out),
    "allocate_10_GB": (
        "sandbox",
        "python3 -c 'x = bytearray(10 * 1024**3); print(len(x))'",
        lambda r: r.exit_code != 0 and b"MemoryError" in r.stderr,
    ),
    "allocate_10_GB_root": (
        "root",
        "python3 -c 'x = bytearray(10 * 1024**3); print(len(x))'",
        lambda r: r.exit_code != 0 and b"MemoryError" in r.stderr,
    ),
    "fill_the_disk": (
        "root",
        "for i in 1 2 3 4; do dd if=/dev/zero of=/root/big$i bs=1M count=100; done; df -k /",
        lambda r: r.exit_code == 0 and b"No space left" in r.stderr + r.stdout,
    ),
    "nested_namespace_mount": (
        "root",
        "unshare -rm sh -c 'mount -t tmpfs x /mnt && echo MOUNTED'; "
        "mount -t tmpfs x /mnt && echo MOUNTED; mount -o remount,rw /usr/bin && echo RW",
        lambda r: b"MOUNTED" not in r.stdout and b"RW" not in r.stdout,
    ),
    "huge_file": (
        "sandbox",
        "dd if=/dev/zero of=/work/big bs=1M count=200",
        lambda r: r.exit_code != 0 or r.killed_reason == "file_size",
    ),
}


@needs_bwrap
@pytest.mark.parametrize("name", list(ATTACKS))
def test_resource_attacks_are_contained(name, canary, no_leaks):
    user, command, check = ATTACKS[name]
    limits = Limits(user=user, cwd="/work" if user == "sandbox" else "/", wall_time=4.0)
    limits = limits.with_(cpu_time=4.0, nproc=32, memory=1 << 30, disk=256 * MiB)
    t0 = time.monotonic()
    with Sandbox.open(limits) as s:
        r = s.run(command)
        assert time.monotonic() - t0 < 30, "the attack was not stopped in time"
        if check is not None:
            assert check(r), r
        _healthy(s)
        # nothing of the attack is left running inside the sandbox
        left = s.run("ps -e -o pid= | wc -l").text().strip()
        assert int(left) < 8, s.run("ps -ef").text()
    assert canary.read_text() == "alive\n"


@needs_bwrap
@pytest.mark.skipif(os.geteuid() != 0, reason="counts the sandbox's host uids (root host)")
def test_fork_bomb_is_bounded_by_the_process_limit(no_leaks):
    """RLIMIT_NPROC counts the sandbox's own processes (its user namespace, an unprivileged
    host uid), so even a bomb started by sandbox root stays below the limit: counted from
    the host while the bomb keeps trying."""
    nproc = 40
    before = len(os.listdir("/proc"))
    baseline = set(_sandbox_uid_processes())
    with Sandbox.open(Limits(user="root", cwd="/", wall_time=3.0, nproc=nproc)) as s:
        s.run(":(){ :|:& };:", background="keep")  # returns; the bomb goes on
        peak = 0
        for _ in range(20):
            peak = max(peak, len(set(_sandbox_uid_processes()) - baseline))
            time.sleep(0.1)
        assert 10 < peak <= nproc + 4  # + the agent and bwrap's init, same uid
        assert len(os.listdir("/proc")) < before + nproc + 20
        r = s.run("echo recovered")  # clears the left-overs, then runs
        assert r.stdout == b"recovered\n", r
        _healthy(s)


@needs_bwrap
def test_cpu_time_limit():
    with Sandbox.open(Limits(wall_time=30.0, cpu_time=1.0)) as s:
        r = s.run(["python3", "-c", "while True: pass"])
        assert r.killed_reason == "cpu_time", r
        assert r.duration < 10
        _healthy(s)


@needs_bwrap
@pytest.mark.parametrize("user", ["sandbox", "root"])
def test_host_secrets_and_files_are_invisible(user, canary, secret_env, no_leaks):
    from cycleqd.sandbox.rootfs import GROUPS, PASSWD

    ubuntu_base = {line.split(":")[0] for line in (PASSWD + GROUPS).splitlines()}
    host_accounts = Path("/etc/passwd").read_text() + Path("/etc/group").read_text()
    host_only = [
        line.split(":")[0]
        for line in host_accounts.splitlines()
        if line and line.split(":")[0] not in ubuntu_base
    ]
    cwd = "/work" if user == "sandbox" else "/"
    with Sandbox.open(Limits(user=user, cwd=cwd)) as s:
        # /etc/shadow: no host account, no password hash
        r = s.run("cat /etc/shadow")
        if user == "sandbox":
            assert r.exit_code != 0 and b"Permission denied" in r.stderr
        else:
            assert all(":*:" in line for line in r.text().splitlines())
        text = s.run("cat /etc/passwd /etc/shadow /etc/group 2>/dev/null").text()
        leaked = [name for name in host_only if f"\n{name}:" in "\n" + text]
        expected_new = {"sandbox"}  # the one user the sandbox adds
        assert set(leaked) <= expected_new, leaked
        # the process environment of every process in the sandbox
        r = s.run("env; cat /proc/[0-9]*/environ 2>/dev/null | tr '\\0' '\\n'")
        assert SECRET_VALUE not in r.text() and SECRET_NAME not in r.text()
        # host paths: the project, /work of the host, the canary, /root and /home contents
        for path in (str(Path(__file__).resolve()), str(canary), "/work/main", "/root/.pyenv"):
            r = s.run(["ls", "-d", path])
            assert r.exit_code != 0, path
        assert s.run("ls /home").text().strip() == ""
        # host processes are not visible: the sandbox has its own pid namespace
        pids = s.run("ls /proc | grep -E '^[0-9]+$' | wc -l").text().strip()
        assert int(pids) < 10
        _healthy(s)
    assert canary.read_text() == "alive\n"


@needs_bwrap
def test_no_network(canary, no_leaks):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(5)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    accepted: list = []

    def accept():
        with contextlib.suppress(OSError):
            accepted.append(server.accept())

    thread = threading.Thread(target=accept)
    thread.start()
    code = (
        "import socket, sys\n"
        f"for host, port in [('127.0.0.1', {port}), ('1.1.1.1', 80), ('8.8.8.8', 53)]:\n"
        "    s = socket.socket(); s.settimeout(3)\n"
        "    try:\n"
        "        s.connect((host, port)); print('CONNECTED', host)\n"
        "    except OSError as e:\n"
        "        print('blocked', host, type(e).__name__)\n"
        "try:\n"
        "    socket.getaddrinfo('pypi.org', 443); print('RESOLVED')\n"
        "except OSError as e:\n"
        "    print('no dns', type(e).__name__)\n"
    )
    try:
        with Sandbox.open(Limits()) as s:
            r = s.run(["python3", "-c", code], timeout=20)
            assert b"CONNECTED" not in r.stdout and b"RESOLVED" not in r.stdout, r
            assert r.stdout.count(b"blocked") == 3
            _healthy(s)
    finally:
        thread.join()
        server.close()
    assert accepted == [], "a sandboxed program reached a socket of the host"


@needs_bwrap
def test_writing_outside_the_sandbox_and_rm_rf(canary, no_leaks):
    # the unprivileged user cannot write outside its work dir and /tmp
    with Sandbox.open(Limits()) as s:
        r = s.run(
            f"echo pwned > {canary}; echo x > /etc/passwd; echo x > /usr/bin/x; "
            "echo x > /x; rm -rf --no-preserve-root / 2>/dev/null; ls /usr/bin | wc -l"
        )
        assert int(r.text().split()[-1]) > 50  # /usr is still there for this sandbox
        _healthy(s)
    # sandbox root can wreck its own session, never the host
    with Sandbox.open(Limits(user="root", cwd="/")) as s:
        s.run(f"mkdir -p {canary.parent} && echo pwned > {canary}")
        s.run("rm -rf --no-preserve-root / 2>/dev/null", timeout=60)
        r = s.run("echo still-here")
        assert r.exit_code != 0 or r.killed_reason  # its /bin is gone: the session is wrecked
    assert canary.read_text() == "alive\n"
    assert Path("/usr/bin/env").exists() and Path("/etc/passwd").read_text()
    with Sandbox.open(Limits()) as s:  # the next episode gets a fresh machine
        _healthy(s)


@needs_bwrap
def test_killing_the_agent_loses_only_that_session(canary, no_leaks):
    with Sandbox.open(Limits(user="root", cwd="/")) as s:
        r = s.run("kill -9 -1; sleep 5")
        assert r.killed_reason == "sandbox_lost" and not s.alive
        assert s.run("true").killed_reason == "sandbox_lost"
    with Sandbox.open(Limits()) as s:
        _healthy(s)
    assert canary.read_text() == "alive\n"


def test_unknown_backend_and_missing_bwrap_say_what_to_do(monkeypatch):
    with pytest.raises(SandboxUnavailableError, match="bwrap or docker"):
        get_backend("chroot")
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(SandboxUnavailableError, match="apt-get install bubblewrap"):
        get_backend("bwrap")


def test_limits_are_validated():
    with pytest.raises(ValueError, match="wall_time"):
        Limits(wall_time=0)
    with pytest.raises(ValueError, match="user"):
        Limits(user="admin")  # type: ignore[arg-type]


# -- Docker ------------------------------------------------------------------------------------


def _docker_skip_reason() -> str | None:
    from cycleqd.sandbox.docker_backend import DockerBackend

    reason = DockerBackend.available()
    return f"Docker backend not testable here: {reason}" if reason else None


_DOCKER_SKIP = _docker_skip_reason()
needs_docker = pytest.mark.skipif(_DOCKER_SKIP is not None, reason=str(_DOCKER_SKIP))


@needs_docker
def test_docker_session_basics_and_attacks(canary, secret_env):
    with Sandbox.open(Limits(wall_time=3.0, nproc=32), backend="docker") as s:
        r = s.run("echo hi; id -u; env")
        assert r.stdout.startswith(b"hi\n1000\n") and SECRET_VALUE.encode() not in r.stdout
        s.run("echo kept > /work/f")
        assert s.run("cat /work/f").stdout == b"kept\n"
        assert s.run("python3 -c 'while True: pass'").timed_out
        assert s.run(":(){ :|:& };:").exit_code is not None or True
        r = s.run("python3 -c \"import socket; socket.create_connection(('1.1.1.1', 80), 3)\"")
        assert r.exit_code != 0
        assert s.run("echo again").stdout == b"again\n"
    assert canary.read_text() == "alive\n"


class _FakeDockerAPI:
    """Just enough of docker.APIClient to drive DockerSession without a daemon."""

    def __init__(self, frames: list[tuple[int, bytes]], exit_code: int):
        self.frames, self.exit_code, self.calls = frames, exit_code, []

    def exec_create(self, container, cmd, **kw):
        self.calls.append((cmd, kw))
        return {"Id": "exec1"}

    def exec_start(self, exec_id, socket=False):
        ours, theirs = _socketpair()

        def feed():
            for stream, data in self.frames:
                theirs.sendall(struct.pack(">BxxxI", stream, len(data)) + data)
            theirs.close()

        threading.Thread(target=feed, daemon=True).start()
        return ours

    def exec_inspect(self, exec_id):
        return {"ExitCode": self.exit_code}


def _socketpair():
    return socket.socketpair()


def test_docker_session_demultiplexes_and_caps_output_without_a_daemon():
    pytest.importorskip("docker")
    from cycleqd.sandbox.docker_backend import DockerSession

    api = _FakeDockerAPI([(1, b"out" * 10), (2, b"err"), (1, b"more")], exit_code=3)
    session = DockerSession.__new__(DockerSession)
    session.limits = Limits(output_bytes=16)
    session._client = type("C", (), {"api": api})()
    session._lock = threading.Lock()
    session._closed = False
    session._dead_reason = None
    session._container = type("K", (), {"id": "c1", "kill": lambda self: None})()
    r = session.run(["echo"], timeout=5, background="keep")
    assert (r.exit_code, r.stdout, r.stderr, r.truncated) == (3, b"outoutoutoutouto", b"err", True)
    cmd, kw = api.calls[0]
    assert cmd[:3] == ["timeout", "-s", "KILL"] and kw["environment"]["HOME"] == "/work"
    assert set(kw["environment"]) == {"PATH", "HOME", "LANG"}

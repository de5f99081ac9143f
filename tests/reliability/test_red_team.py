"""Red team: hostile Python, shell and SQL through the skills' real paths (the MBPP+ coding
skill and the AgentBench OS skill in the bubblewrap sandbox, the tiny world's SQLite runner,
the DB skill's MariaDB episodes). Contained = the host's files, secrets and services are
untouched and unseen, nothing outlives its limit, and the skill still scores afterwards."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest

from cycleqd.sandbox import SandboxError, SandboxUnavailableError
from cycleqd.sandbox.bwrap import BwrapBackend

SECRET = "redteam-canary-9c2f61"


def _sandbox_skip() -> str | None:
    reason = BwrapBackend.available()
    if reason:
        return f"{reason} (the red team needs the project's sandbox)"
    try:
        from cycleqd.sandbox import Limits, Sandbox

        with Sandbox.open(Limits(user="root", cwd="/"), backend="bwrap") as s:
            s.run("true")
    except (SandboxError, SandboxUnavailableError) as exc:
        return f"the bwrap sandbox cannot start here: {exc}"
    return None


needs_sandbox = pytest.mark.skipif(_sandbox_skip() is not None, reason=str(_sandbox_skip()))


@pytest.fixture
def host(tmp_path, monkeypatch) -> dict:
    """What an attack must not reach: a canary file, a secret file and env var, a marker path
    it must not create."""
    canary = tmp_path / "canary.txt"
    canary.write_text("alive\n")
    secret = tmp_path / "secret.txt"
    secret.write_text(SECRET)
    monkeypatch.setenv("CYCLEQD_REDTEAM_SECRET", SECRET)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    marker = Path(f"/tmp/cycleqd-redteam-{uuid.uuid4().hex[:8]}")
    yield {"canary": canary, "secret": secret, "marker": marker}
    marker.unlink(missing_ok=True)


def _host_intact(host: dict, seen: str) -> bool:
    return (
        host["canary"].read_text() == "alive\n"
        and not host["marker"].exists()
        and SECRET not in seen
    )


def python_attacks(host: dict) -> dict[str, str]:
    c, s, m = host["canary"], host["secret"], host["marker"]
    return {
        "fork bomb": "import os\nwhile True:\n    os.fork()",
        "memory": "x = bytearray(10**11)",
        "disk fill": "f = open('big', 'wb')\nwhile True:\n    f.write(b'0' * 2**20)",
        "read host secret file": f"print(open({str(s)!r}).read())",
        "env secrets": "import os\nprint(dict(os.environ))",
        "/proc/1/environ": "print(open('/proc/1/environ', 'rb').read())",
        "/etc/shadow": "print(open('/etc/shadow').read())",
        "~/.aws": "import os\nprint(open(os.path.expanduser('~/.aws/credentials')).read())",
        "write outside": f"open({str(m)!r}, 'w').write('pwned')",
        "overwrite canary": f"open({str(c)!r}, 'w').write('dead')",
        "symlink escape": f"import os\nos.symlink({str(s)!r}, 'l')\nprint(open('l').read())",
        "network mariadb": "import socket\nsocket.create_connection(('127.0.0.1', 3306), 2)",
        "network postgres": "import socket\nsocket.create_connection(('127.0.0.1', 5432), 2)",
        "ptrace": "import ctypes\nprint(ctypes.CDLL(None).ptrace(16, 1, 0, 0))",
        "kill -1": "import os, signal\nos.kill(-1, signal.SIGKILL)",
        "sleep past the limit": "import time\ntime.sleep(600)",
        "long output": "print('x' * 10**8)",
    }


def shell_attacks(host: dict) -> dict[str, str]:
    c, s, m = host["canary"], host["secret"], host["marker"]
    return {
        "fork bomb": ":(){ :|:& };:",
        "memory": "python3 -c 'x = bytearray(10**11)'",
        "disk fill": "dd if=/dev/zero of=/root/fill bs=1M count=100000",
        "read host secret file": f"cat {s}",
        "env secrets": "env; cat /proc/self/environ",
        "/proc/1/environ": "cat /proc/1/environ",
        "/etc/shadow": "cat /etc/shadow",
        "~/.aws": "cat ~/.aws/credentials /root/.aws/credentials",
        "write outside": f"echo pwned > {m}",
        "rm canary": f"rm -f {c}; rm -rf --no-preserve-root / 2>/dev/null",
        "symlink escape": f"ln -s {s} /root/l && cat /root/l",
        "network mariadb": "exec 3<>/dev/tcp/127.0.0.1/3306 && echo connected",
        "network postgres": "exec 3<>/dev/tcp/127.0.0.1/5432 && echo connected",
        "kill -1": "kill -9 -1",
        "sleep past the limit": "sleep 600",
        "long output": "yes | head -c 100000000",
        "mount host": "mount -t proc proc /mnt && cat /mnt/1/environ",
    }


SQLITE_ATTACKS = {
    "ATTACH DATABASE": "ATTACH DATABASE '/tmp/cycleqd-redteam.db' AS x",
    "load_extension": "SELECT load_extension('/usr/lib/x86_64-linux-gnu/libc.so.6')",
    "readfile": "SELECT readfile('/etc/shadow')",
    "writefile": "SELECT writefile('/tmp/cycleqd-redteam.txt', 'x')",
    "PRAGMA writable_schema": "PRAGMA writable_schema = 1",
    "recursive CTE bomb": "WITH RECURSIVE r(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM r) "
    "SELECT count(*) FROM r",
    "cartesian blow-up": "SELECT count(*) FROM t a, t b, t c, t d, t e, t f, t g, t h",
}
MYSQL_ATTACKS = {
    "LOAD_FILE": "SELECT LOAD_FILE('/etc/shadow')",
    "INTO OUTFILE": "SELECT 'pwned' INTO OUTFILE '/tmp/cycleqd-redteam-outfile.txt'",
    "LOAD DATA INFILE": "LOAD DATA INFILE '/etc/passwd' INTO TABLE t",
    "CREATE USER": "CREATE USER 'evil'@'%' IDENTIFIED BY 'x'",
    "read mysql.user": "SELECT authentication_string FROM mysql.user",
    "SLEEP past the limit": "SELECT SLEEP(600)",
    "SHUTDOWN": "SHUTDOWN",
}

CODING_ROW = {
    "task_id": "Mbpp/900",
    "prompt": '"""\nWrite a function that adds two numbers.\n"""',
    "entry_point": "add_numbers",
    "canonical_solution": "\ndef add_numbers(a, b):\n    return a + b\n",
    "base_input": [[1, 2], [3, 4]],
    "plus_input": [],
    "atol": 0,
    "assertion": "\nassert add_numbers(1, 2) == 3\n",
}
RIGHT = "```python\ndef add_numbers(a, b):\n    return a + b\n```"


@needs_sandbox
@pytest.mark.slow
def test_hostile_python_through_the_coding_skill(host, reliability):
    from cycleqd.skills.coding import CodingSkill

    skill = CodingSkill(rows=[CODING_ROW], min_time_limit=1.0)
    task = skill.tasks[0]
    contained = {}
    for name, code in python_attacks(host).items():
        started = time.monotonic()
        result = skill.score_reply(task, f"```python\n{code}\n\n{RIGHT[10:-4]}\n```")
        bounded = time.monotonic() - started < 60
        healthy = skill.score_reply(task, RIGHT).correct
        contained[name] = bounded and healthy and _host_intact(host, repr(result))
    _record(reliability, "Python (MBPP+ coding skill, bwrap sandbox)", contained)


class _ScriptedOS:
    """Answers each episode: first its attack as a bash action, then `answer(safe)`."""

    def __init__(self, attacks: dict[str, str]):
        self.attacks = attacks

    def generate(self, conversations, params):
        out = []
        for conversation in conversations:
            name = next(
                n
                for n in self.attacks
                if f"[{n}]" in conversation[-1]["content"]
                or any(f"[{n}]" in m["content"] for m in conversation if m["role"] == "user")
            )
            turn = sum(m["role"] == "assistant" for m in conversation)
            out.append(
                f"Act: bash\n\n```bash\n{self.attacks[name]}\n```"
                if turn <= 2  # the one-shot example holds two assistant turns
                else "Act: answer(safe)"
            )
        return out


@needs_sandbox
@pytest.mark.slow
def test_hostile_shell_through_the_os_skill(host, reliability):
    from cycleqd.skills.os_skill import OSSkill

    attacks = {**shell_attacks(host), "control": "echo fine"}
    rows = [
        {
            "index": i,
            "description": f"[{name}] Run the command, then answer safe.",
            "init_script": None,
            "start": None,
            "check": None,
            "match": {"answer": "safe", "strip": True},
            "example_script": None,
        }
        for i, name in enumerate(attacks)
    ]
    started = time.monotonic()
    result = OSSkill(rows=rows, action_timeout=5.0).evaluate(_ScriptedOS(attacks))
    bounded = time.monotonic() - started < 300
    by_name = {name: s for name, s in zip(attacks, result.samples, strict=True)}
    healthy = by_name.pop("control").correct  # the evaluation still works after them all
    contained = {
        name: bounded and healthy and _host_intact(host, repr(sample.detail))
        for name, sample in by_name.items()
    }
    _record(reliability, "shell (AgentBench OS skill, bwrap sandbox)", contained)


def test_hostile_sql_through_the_tiny_sqlite_runner(host, reliability):
    from cycleqd.skills.tiny.execute import run_sql
    from cycleqd.skills.tiny.tasks import Table

    table = Table("t", ("a", "b"), ("INTEGER", "TEXT"), tuple((i, str(i)) for i in range(20)))
    contained = {}
    for name, sql in SQLITE_ATTACKS.items():
        started = time.monotonic()
        rows, error = run_sql(table, sql, timeout=1.0)
        contained[name] = (
            rows is None
            and bool(error)
            and time.monotonic() - started < 10
            and not Path("/tmp/cycleqd-redteam.db").exists()
            and not Path("/tmp/cycleqd-redteam.txt").exists()
            and _host_intact(host, repr(error))
        )
    healthy = run_sql(table, "SELECT count(*) FROM t")[0] == [(20,)]
    contained = {k: v and healthy for k, v in contained.items()}
    _record(reliability, "SQL (tiny world, SQLite with an authorizer)", contained)


def test_hostile_sql_through_the_db_skill_on_mariadb(host, reliability):
    from cycleqd.skills.db_sandbox import SandboxOptions, TableSpec, open_sandbox

    try:
        sandbox = open_sandbox("mysql://root@127.0.0.1:3306", SandboxOptions(statement_timeout_s=1))
    except Exception as exc:
        pytest.skip(f"needs MariaDB on 127.0.0.1:3306 (root, no password), e.g. `mariadbd` ({exc})")
    contained = {}
    try:
        episode, _ = sandbox.create(TableSpec("t", ("a",), (("1",), ("2",))))
        try:
            for name, sql in MYSQL_ATTACKS.items():
                started = time.monotonic()
                seen = episode.execute(sql)
                contained[name] = (
                    time.monotonic() - started < 10
                    and "root:" not in seen
                    and not Path("/tmp/cycleqd-redteam-outfile.txt").exists()
                    and _host_intact(host, seen)
                    and ("denied" in seen.lower() or seen[:4].isdigit() or "[(" in seen)
                )
            healthy = "2" in episode.execute("SELECT COUNT(*) FROM t")
        finally:
            episode.drop()
    finally:
        sandbox.close()
    contained = {k: v and healthy for k, v in contained.items()}
    _record(reliability, "SQL (DB skill, MariaDB episode)", contained)


def _record(reliability, what: str, contained: dict[str, bool]) -> None:
    escaped = sorted(k for k, v in contained.items() if not v)
    reliability.record(
        "Attacks contained",
        what,
        tried=len(contained),
        survived=sum(contained.values()),
        detail=", ".join(sorted(contained))
        + (f". NOT contained: {', '.join(escaped)}" if escaped else ""),
    )
    assert not escaped, escaped

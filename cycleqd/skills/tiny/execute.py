"""Where the tiny world's answers run, and the checks every answer passes first.

Python expressions and shell commands run in batches through `_harness.py`, inside the
project's sandbox (`cycleqd.sandbox`, bubblewrap) when it is usable, else in a
resource-limited subprocess (empty environment, a temporary working folder, address-space,
CPU, file-size and core limits, its own session, killed on timeout). `open_executor` is the one
adapter between this module and the sandbox package.

SQL runs in process: a fresh in-memory SQLite database per answer, holding the sample's table,
read only (an authorizer allows SELECT, reads and harmless functions; ATTACH, PRAGMA, writes,
recursive CTEs and load_extension are denied), with a progress handler as a time limit and
length limits.

Before anything runs, a static check (`check_code`, `check_shell`) rejects answers outside the
tiny world's grammar: dunder names in Python (`__import__`), shell commands outside a list of
text tools, paths with ``/`` or ``..``, ``$``, backquotes, ``;``, ``&``, ``>``. The checks are
applied whatever the backend, so a model scores the same in the sandbox and in the fallback, and
they keep the fallback (which has no file-system isolation) from ever running ``rm -rf /``.
"""

from __future__ import annotations

import ast
import contextlib
import json
import logging
import os
import secrets
import shlex
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cycleqd.skills.tiny.tasks import Table, create_table

log = logging.getLogger(__name__)

HARNESS_SOURCE = (Path(__file__).resolve().parent / "_harness.py").read_text()
MAX_ANSWER_CHARS = 300
SHELL_COMMANDS = frozenset(
    {"grep", "wc", "sort", "head", "tail", "cut", "uniq", "tr", "cat", "tac", "rev", "nl",
     "paste", "echo", "ls", "printf", "fold", "expand"}
)  # fmt: skip
SHELL_OPERATORS = frozenset({"|", "<"})


# ---------------------------------------------------------------------------- static checks


def check_code(expr: str) -> str | None:
    """None when `expr` may run, else why not."""
    if len(expr) > MAX_ANSWER_CHARS:
        return "answer too long"
    try:
        tree = ast.parse(expr, mode="eval")
    except (SyntaxError, ValueError) as exc:
        return f"not a Python expression: {exc.__class__.__name__}"
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Name):
            names.append(node.id)
        elif isinstance(node, ast.Attribute):
            names.append(node.attr)
        elif isinstance(node, ast.keyword) and node.arg:
            names.append(node.arg)
        if any("__" in n for n in names):
            return "dunder names are not allowed"
    return None


def check_shell(cmd: str) -> str | None:
    """None when `cmd` is a pipeline of allowed text tools over relative files, else why not."""
    if len(cmd) > MAX_ANSWER_CHARS:
        return "answer too long"
    bad = [c for c in ("$", "`", "/", "\n", "\r", "\0", ";", "&", ">") if c in cmd]
    if bad:
        return f"forbidden characters {bad}"
    try:
        lexer = shlex.shlex(cmd, posix=True, punctuation_chars="|<>&;()")
        lexer.whitespace_split = True
        tokens = list(lexer)
    except ValueError as exc:
        return f"cannot parse the command: {exc}"
    if not tokens:
        return "empty command"
    expect_command, expect_file = True, False
    for token in tokens:
        operator = bool(token) and all(c in "|<>&;()" for c in token)
        if operator:
            if token not in SHELL_OPERATORS or expect_command or expect_file:
                return f"operator {token!r} not allowed here"
            expect_command, expect_file = token == "|", token == "<"
            continue
        if ".." in token or token.startswith("~"):
            return f"path {token!r} leaves the working folder"
        if expect_command:
            if token not in SHELL_COMMANDS:
                return f"command {token!r} is not one of the allowed text tools"
            expect_command = False
        expect_file = False
    if expect_command or expect_file:
        return "incomplete pipeline"
    return None


# -------------------------------------------------------------------------------------- sql

_SQL_ALLOWED = {getattr(sqlite3, n) for n in ("SQLITE_SELECT", "SQLITE_READ", "SQLITE_FUNCTION")}
_SQL_DENIED_FUNCTIONS = {"load_extension", "readfile", "writefile", "fts3_tokenizer", "edit",
                         "randomblob", "zeroblob", "random"}  # fmt: skip


def _sql_authorizer(action: int, arg1: Any, arg2: Any, dbname: Any, source: Any) -> int:
    if action not in _SQL_ALLOWED:
        return sqlite3.SQLITE_DENY
    if action == sqlite3.SQLITE_FUNCTION and str(arg2).lower() in _SQL_DENIED_FUNCTIONS:
        return sqlite3.SQLITE_DENY
    if dbname not in (None, "main"):
        return sqlite3.SQLITE_DENY
    return sqlite3.SQLITE_OK


def run_sql(
    table: Table, query: str, timeout: float = 1.0, max_rows: int = 1000
) -> tuple[list[tuple] | None, str | None]:
    """(rows, None) or (None, error) for one query on a fresh read-only copy of `table`."""
    if len(query) > MAX_ANSWER_CHARS:
        return None, "answer too long"
    conn = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
    try:
        create_table(conn, table)
        conn.set_authorizer(_sql_authorizer)
        for name, value in (
            ("SQLITE_LIMIT_ATTACHED", 0),
            ("SQLITE_LIMIT_LENGTH", 100_000),
            ("SQLITE_LIMIT_SQL_LENGTH", 10_000),
            ("SQLITE_LIMIT_COMPOUND_SELECT", 8),
        ):
            if hasattr(sqlite3, name):
                conn.setlimit(getattr(sqlite3, name), value)
        deadline = time.monotonic() + timeout
        conn.set_progress_handler(lambda: int(time.monotonic() > deadline), 1000)
        try:
            cursor = conn.execute(query)
            rows = cursor.fetchmany(max_rows + 1)
        except (sqlite3.Error, ValueError, OverflowError, MemoryError) as exc:
            if time.monotonic() > deadline:
                return None, "timeout"
            return None, f"{exc.__class__.__name__}: {exc}"[:300]
        if len(rows) > max_rows:
            return None, f"more than {max_rows} rows"
        return [tuple(r) for r in rows], None
    finally:
        conn.close()


def rows_equal(got: Sequence[Sequence[Any]], want: Sequence[Sequence[Any]], ordered: bool) -> bool:
    """Result rows compared cell by cell (numbers to 1e-9), in order or as multisets."""
    if len(got) != len(want):
        return False
    if not ordered:
        key = repr
        got, want = sorted(got, key=key), sorted(want, key=key)
    return all(_row_equal(a, b) for a, b in zip(got, want, strict=True))


def _row_equal(a: Sequence[Any], b: Sequence[Any]) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        numbers = (int, float)
        if isinstance(x, numbers) and isinstance(y, numbers):
            if abs(float(x) - float(y)) > 1e-9 * max(1.0, abs(float(y))):
                return False
        elif type(x) is not type(y) or x != y:
            return False
    return True


# ------------------------------------------------------------------------------ executors


class SubprocessRunner:
    """Fallback when no sandbox is usable: a limited child process, nothing of our env."""

    kind = "subprocess"

    def __init__(self, memory: int = 1 << 30, file_size: int = 8 << 20, cpu: int = 600) -> None:
        # Applied by the harness to itself before it runs anything (no preexec_fn: this
        # process may have threads); every answer's process inherits them.
        self.rlimits = {"as": int(memory), "fsize": int(file_size), "cpu": int(cpu)}

    def run(self, argv: list[str], stdin: bytes, timeout: float) -> tuple[bytes, str | None]:
        with tempfile.TemporaryDirectory(prefix="cycleqd-tiny-") as cwd:
            proc = subprocess.Popen(
                [sys.executable if argv[0] == "python3" else argv[0], *argv[1:]],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=cwd,
                env={"TMPDIR": cwd},
                start_new_session=True,
                close_fds=True,
            )
            try:
                out, err = proc.communicate(stdin, timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(OSError):
                    os.killpg(proc.pid, signal.SIGKILL)
                try:
                    out, _ = proc.communicate(timeout=5)
                except subprocess.TimeoutExpired:  # a process outside the group holds a pipe
                    proc.kill()
                    out = b""
                return out, "timeout"
            finally:
                with contextlib.suppress(OSError):
                    os.killpg(proc.pid, signal.SIGKILL)
            if proc.returncode != 0:
                return out, f"exit {proc.returncode}: {err[-300:].decode('utf-8', 'replace')}"
            return out, None

    def close(self) -> None:
        pass


class SandboxRunner:
    """Runs the harness in one `cycleqd.sandbox` session, reopened if a command killed it."""

    def __init__(self, backend: Any, limits: Any) -> None:
        self.backend, self.limits = backend, limits
        self.kind = f"sandbox:{getattr(backend, 'name', type(backend).__name__)}"
        self.session = backend.open(limits)

    def run(self, argv: list[str], stdin: bytes, timeout: float) -> tuple[bytes, str | None]:
        if self.session is not None and not self.session.alive:
            self.session.close()
            self.session = None
        if self.session is None:
            self.session = self.backend.open(self.limits)
        # A failure to open a session is the host's problem and raises; a session that an
        # answer broke is the answer's problem: its items fail (and are retried one by one).
        try:
            result = self.session.run(argv, stdin=stdin, timeout=timeout)
        except Exception as exc:
            self.session.close()
            self.session = None
            return b"", f"sandbox error: {exc}"
        if result.timed_out or result.killed_reason or result.exit_code != 0:
            why = result.killed_reason or f"exit {result.exit_code}"
            return result.stdout, f"{why}: {result.text('stderr')[-300:]}"
        return result.stdout, None

    def close(self) -> None:
        if self.session is not None:
            self.session.close()
            self.session = None


class TinyExecutor:
    """Runs batches of Python expressions or shell jobs; one result dict per item, in order.

    A batch runs in one harness call; if that call fails as a whole (a hostile answer killed
    the harness, the batch ran out of time), its items are rerun one by one, so one bad answer
    costs only itself.
    """

    def __init__(self, runner: Any, item_timeout: float = 2.0, cap: int = 16384) -> None:
        self.runner, self.item_timeout, self.cap = runner, item_timeout, cap

    @property
    def kind(self) -> str:
        return self.runner.kind

    def run_code(self, items: Sequence[str | dict[str, Any]]) -> list[dict[str, Any]]:
        """items: expressions, or ``{"expr": str, "vars": {name: value}}`` (JSON values)."""
        return self._batch("code", list(items))

    def run_shell(self, jobs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """jobs: ``{"files": [(name, text), ...], "cmd": str}``."""
        return self._batch("shell", [{"files": list(j["files"]), "cmd": j["cmd"]} for j in jobs])

    def _batch(self, mode: str, items: list[Any]) -> list[dict[str, Any]]:
        if not items:
            return []
        results, error = self._call(mode, items)
        if results is not None:
            return results
        if len(items) == 1:
            return [{"ok": False, "error": error}]
        log.info(
            "tiny %s batch failed (%s); rerunning its %d items one by one", mode, error, len(items)
        )
        return [self._batch(mode, [item])[0] for item in items]

    def _call(self, mode: str, items: list[Any]) -> tuple[list[dict[str, Any]] | None, str | None]:
        nonce = secrets.token_hex(8)
        request = {
            "mode": mode,
            "items": items,
            "timeout": self.item_timeout,
            "cap": self.cap,
            "nonce": nonce,
            "rlimits": getattr(self.runner, "rlimits", None),
        }
        timeout = len(items) * (self.item_timeout + 0.5) + 10.0
        argv = ["python3", "-I", "-S", "-c", HARNESS_SOURCE]
        out, error = self.runner.run(argv, json.dumps(request).encode(), timeout)
        for line in reversed(out.decode("utf-8", "replace").splitlines()):
            if line.startswith(nonce):
                try:
                    results = json.loads(line[len(nonce) :])["results"]
                except (ValueError, KeyError, TypeError):
                    break
                if isinstance(results, list) and len(results) == len(items):
                    return [r if isinstance(r, dict) else {"ok": False} for r in results], None
                break
        return None, error or "the harness gave no result"

    def close(self) -> None:
        self.runner.close()

    def __enter__(self) -> TinyExecutor:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def open_executor(
    kind: str = "auto", item_timeout: float = 2.0, sandbox_backend: Any = None
) -> TinyExecutor:
    """An executor over the project's sandbox ("sandbox"), a limited subprocess
    ("subprocess"), or the sandbox when it can start here and the subprocess otherwise
    ("auto", the default). `sandbox_backend`: a `cycleqd.sandbox` backend or its name."""
    if kind not in ("auto", "sandbox", "subprocess"):
        raise ValueError(f"executor kind must be auto, sandbox or subprocess, got {kind!r}")
    if kind == "subprocess":
        return TinyExecutor(SubprocessRunner(), item_timeout)
    try:
        runner = _sandbox_runner(sandbox_backend, item_timeout)
    except Exception as exc:
        if kind == "sandbox":
            raise
        _warn_fallback(exc)
        return TinyExecutor(SubprocessRunner(), item_timeout)
    return TinyExecutor(runner, item_timeout)


def _sandbox_runner(backend: Any, item_timeout: float) -> SandboxRunner:
    from cycleqd.sandbox import Limits, MiB, get_backend

    if backend is None or isinstance(backend, str):
        backend = get_backend(backend)
    limits = Limits(
        wall_time=600.0,
        cpu_time=60.0,
        memory=1024 * MiB,
        nproc=64,
        output_bytes=16 * MiB,
        disk=64 * MiB,
        file_size=8 * MiB,
    )
    return SandboxRunner(backend, limits)


_warned: set[str] = set()


def _warn_fallback(exc: BaseException) -> None:
    text = str(exc)
    if text not in _warned:
        _warned.add(text)
        log.warning(
            "the sandbox is not usable here (%s); tiny-world answers run in a limited "
            "subprocess instead (no file-system isolation: answers are checked statically "
            "first)",
            text,
        )

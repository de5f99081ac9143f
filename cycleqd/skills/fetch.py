"""`cycleqd data fetch`: download the real skills' evaluation sets from their sources.

    cycleqd data fetch --output /data/cycleqd            # all three sets into a folder
    cycleqd data fetch --output s3://bucket/datasets     # or into an object store
    cycleqd data fetch --only os --source-url os=file:///mnt/usb/samples.pkl

Each set is downloaded from its original source (pinned to a commit or a release), converted
to the JSON-lines form the loader expects (`cycleqd.skills.data`), and checked against the
published sha256 (`KNOWN_SHA256`) *before* anything is written: a mismatch leaves no file.
Files already at the destination with the right checksum are skipped unless `--force`.

The AgentBench OS set is published as a Python pickle. It is read by `SafeUnpickler`, which
resolves no global except two inert stand-ins for the record classes the file is made of, so
a hostile pickle cannot run code: anything else is refused.
"""

from __future__ import annotations

import argparse
import gzip
import http.client
import io
import json
import os
import pickle
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from cycleqd.errors import CycleQDError
from cycleqd.skills.data import (
    AGENTBENCH_OS,
    DATA_ENV,
    DBBENCH_DEV,
    KNOWN_SHA256,
    MBPP_PLUS,
    DataError,
    sha256_hex,
)

# The CycleQD repository at the commit its data files were published with.
_CYCLEQD_COMMIT = "e5ccb24b054b9b3167425ea56630b81ceb6189a2"
_CYCLEQD_RAW = f"https://raw.githubusercontent.com/SakanaAI/CycleQD/{_CYCLEQD_COMMIT}"
_CYCLEQD_GH = f"https://github.com/SakanaAI/CycleQD/raw/{_CYCLEQD_COMMIT}"
_DB_PATH = "evaluation/fishfarm/data/db/data_dbbench_standard_dev.jsonl"
_OS_PATH = "evaluation/fishfarm/data/os_interaction/configs/samples.pkl"

MAX_DOWNLOAD = 256 << 20  # the sets are 0.2-3 MB; a bigger answer is not one of them
TIMEOUT_S = 30.0
ATTEMPTS = 3  # per URL: transient failures (5xx, 429, resets, timeouts) are retried
USER_AGENT = "cycleqd-data-fetch/1"


class FetchError(DataError):
    """A set could not be downloaded, converted or verified; the message says what to do."""


class UnsafePickleError(FetchError):
    """The pickle asks for something other than plain data and the known record classes."""


# -- the sets ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataSet:
    name: str  # what --only and --source-url call it
    filename: str  # in the destination; its sha256 is KNOWN_SHA256[filename]
    urls: tuple[str, ...]  # tried in order until one gives the published bytes
    convert: Callable[[bytes], bytes]
    source: str  # for the table and the errors

    @property
    def sha256(self) -> str:
        return KNOWN_SHA256[self.filename]


def _json_rows(data: bytes, where: str) -> list:
    """The rows of a JSON-lines document (gzip or not); split on '\\n' only, as JSON allows
    other line separators inside strings."""
    if data[:2] == b"\x1f\x8b":
        try:  # read at most MAX_DOWNLOAD + 1 bytes: a gzip bomb stops there
            with gzip.GzipFile(fileobj=io.BytesIO(data)) as f:
                data = f.read(MAX_DOWNLOAD + 1)
        except (OSError, EOFError) as exc:
            raise FetchError(f"{where}: not a valid gzip file ({exc})") from None
        if len(data) > MAX_DOWNLOAD:
            raise FetchError(f"{where}: unpacks to more than {MAX_DOWNLOAD >> 20} MiB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FetchError(f"{where}: not UTF-8 text ({exc})") from None
    rows = []
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError as exc:
            raise FetchError(f"{where}:{lineno}: not valid JSON ({exc})") from None
    return rows


def convert_mbppplus(data: bytes) -> bytes:
    """EvalPlus writes one `json.dumps(row)` per line, each ending in a newline."""
    return "".join(json.dumps(r) + "\n" for r in _json_rows(data, "MbppPlus.jsonl")).encode()


def convert_dbbench(data: bytes) -> bytes:
    """The DBBench dev file as published: rows joined by newlines, none after the last."""
    rows = _json_rows(data, "data_dbbench_standard_dev.jsonl")
    return "\n".join(json.dumps(r) for r in rows).encode()


def convert_os(data: bytes) -> bytes:
    """samples.pkl (unpickled safely) -> one JSON row per sample, newline-terminated."""
    rows = os_rows(safe_loads(data))
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


DATASETS: dict[str, DataSet] = {
    d.name: d
    for d in (
        DataSet(
            "mbppplus",
            MBPP_PLUS,
            (
                # What EvalPlus itself downloaded once MbppPlus.jsonl (v0.1.0, 399 tasks) left
                # its repository in commit 1bd5f4c; then the later release repository.
                "https://github.com/ganler/release/releases/download/humanevalplus/"
                "MbppPlus-v0.1.0.jsonl.gz",
                "https://github.com/evalplus/mbppplus_release/releases/download/v0.1.0/"
                "MbppPlus.jsonl.gz",
            ),
            convert_mbppplus,
            "EvalPlus MBPP+ v0.1.0 (MbppPlus.jsonl as of evalplus 1bd5f4c^)",
        ),
        DataSet(
            "dbbench",
            DBBENCH_DEV,
            (f"{_CYCLEQD_RAW}/{_DB_PATH}", f"{_CYCLEQD_GH}/{_DB_PATH}"),
            convert_dbbench,
            f"SakanaAI/CycleQD@{_CYCLEQD_COMMIT[:7]} {_DB_PATH}",
        ),
        DataSet(
            "os",
            AGENTBENCH_OS,
            (f"{_CYCLEQD_RAW}/{_OS_PATH}", f"{_CYCLEQD_GH}/{_OS_PATH}"),
            convert_os,
            f"SakanaAI/CycleQD@{_CYCLEQD_COMMIT[:7]} {_OS_PATH} (pickle, read safely)",
        ),
    )
}


# -- the pickle, read without running anything -----------------------------------------------------

# The record classes samples.pkl is made of (fishfarm, CycleQD's evaluation harness): a
# dataclass OSInteractionSample(problem, index, config) whose config is
# {"file", "index", "config": JudgeConfig}, and AgentBench's JudgeConfig (image, init_script,
# start, description, check, match, example_script; scripts are (language, code) tuples).
_RECORD_MODULE = "fishfarm.tasks.os_interaction"
_RECORD_CLASSES = ("OSInteractionSample", "JudgeConfig")


class _Record:
    """An inert stand-in for one allowed class: it only keeps the state dict pickle gives it."""

    kind = ""

    def __init__(self) -> None:  # REDUCE with arguments fails: records take none
        self.fields: dict = {}

    def __setstate__(self, state: object) -> None:
        # Protocol 2+: (dict, slots) when the class has __slots__; we accept plain dicts.
        if isinstance(state, tuple) and len(state) == 2 and state[1] is None:
            state = state[0]
        if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            raise UnsafePickleError(
                f"{self.kind}: its state is a {type(state).__name__}, not a dict of fields"
            )
        self.fields = dict(state)

    def get(self, name: str) -> object:
        # A field the object never set keeps its class default: None for every field here.
        return self.__dict__.get("fields", {}).get(name)


_STAND_INS: dict[str, type[_Record]] = {
    name: type(name, (_Record,), {"kind": name, "__module__": __name__}) for name in _RECORD_CLASSES
}


class _ObjectBase:
    """What `builtins.object` resolves to: only valid as copyreg._reconstructor's base."""

    __slots__ = ()  # so that BUILD cannot set attributes on the shared sentinel

    def __call__(self, *args: object) -> object:
        raise UnsafePickleError("the pickle calls object(): refused")


_OBJECT_BASE = _ObjectBase()


def _reconstructor(cls: object, base: object, state: object) -> _Record:
    """copyreg._reconstructor (protocols 0-1) for the stand-ins only."""
    if not (isinstance(cls, type) and issubclass(cls, _Record)) or base is not _OBJECT_BASE:
        raise UnsafePickleError("copyreg._reconstructor with a class that is not allowed")
    if state is not None:
        raise UnsafePickleError(f"{cls.__name__}: unexpected constructor state")
    return cls()


class SafeUnpickler(pickle.Unpickler):
    """Plain containers, str, bytes, numbers, bool, None and the two record stand-ins.

    Every global is refused except the record classes (resolved to `_Record` stand-ins, never
    imported) and copyreg._reconstructor/object, which protocol 0-1 pickles use to build them.
    """

    def find_class(self, module: str, name: str) -> object:
        if module == _RECORD_MODULE and name in _STAND_INS:
            return _STAND_INS[name]
        if (module, name) in (("copyreg", "_reconstructor"), ("copy_reg", "_reconstructor")):
            return _reconstructor
        if (module, name) in (("builtins", "object"), ("__builtin__", "object")):
            return _OBJECT_BASE
        raise UnsafePickleError(
            f"the pickle asks for {module}.{name}, which is not plain data: refused (only "
            f"lists, dicts, tuples, strings, numbers and {_RECORD_MODULE}."
            f"{{{','.join(_RECORD_CLASSES)}}} are allowed); the file is not the published "
            "samples.pkl"
        )

    def persistent_load(self, pid: object) -> object:
        raise UnsafePickleError("the pickle uses persistent ids: refused")


def safe_loads(data: bytes) -> object:
    """Unpickle `data` with SafeUnpickler; any failure is an UnsafePickleError/FetchError."""
    try:
        return SafeUnpickler(io.BytesIO(data)).load()
    except FetchError:
        raise
    except RecursionError:
        raise UnsafePickleError("the pickle nests too deeply: refused") from None
    except Exception as exc:  # malformed pickles raise anything from KeyError to TypeError
        raise FetchError(f"cannot read the pickle: {type(exc).__name__}: {exc}") from None


OS_KEYS = (
    "index",
    "source_file",
    "description",
    "image",
    "init_script",
    "start",
    "check",
    "match",
    "example_script",
)


def _script(value: object, where: str) -> dict | None:
    """AgentBench's (language, code) -> {"language", "code"}; None stays None."""
    if value is None:
        return None
    if isinstance(value, dict) and set(value) == {"language", "code"}:
        value = (value["language"], value["code"])
    if (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(isinstance(v, str) for v in value)
    ):
        return {"language": value[0], "code": value[1]}
    raise FetchError(f"{where}: expected a (language, code) script, got {type(value).__name__}")


def _scripts(value: object, where: str, *, nulls: bool = False) -> list | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)):
        raise FetchError(f"{where}: expected a list of scripts, got {type(value).__name__}")
    return [
        None if (nulls and v is None) else _script(v, f"{where}[{i}]") for i, v in enumerate(value)
    ]


def _plain(value: object, where: str, depth: int = 0) -> object:
    """JSON-ready copy of plain data (the `match` dict); refuses anything else."""
    if depth > 20:
        raise FetchError(f"{where}: nested too deeply")
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v, where, depth + 1) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _plain(v, where, depth + 1) for k, v in value.items()}
    raise FetchError(f"{where}: unexpected {type(value).__name__}")


def _str_or_none(value: object, where: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise FetchError(f"{where}: expected a string, got {type(value).__name__}")


def os_rows(samples: object) -> list[dict]:
    """The AgentBench OS rows, in the shared file's key order.

    Accepts the published form (a list of OSInteractionSample records) and a list of rows
    already in this shape (plain dicts with exactly OS_KEYS).
    """
    if not isinstance(samples, (list, tuple)):
        raise FetchError(f"samples.pkl: expected a list of samples, got {type(samples).__name__}")
    rows = []
    for i, sample in enumerate(samples):
        where = f"samples.pkl[{i}]"
        if isinstance(sample, dict):
            if set(sample) != set(OS_KEYS):
                raise FetchError(f"{where}: a row needs exactly the keys {', '.join(OS_KEYS)}")
            index, source_file = sample["index"], sample["source_file"]
            get = sample.get
        elif isinstance(sample, _STAND_INS["OSInteractionSample"]):
            pair = sample.get("config")
            if not isinstance(pair, dict) or not isinstance(
                pair.get("config"), _STAND_INS["JudgeConfig"]
            ):
                raise FetchError(f"{where}.config: expected {{'file', 'index', 'config'}}")
            index, source_file, get = sample.get("index"), pair.get("file"), pair["config"].get
        else:
            raise FetchError(f"{where}: unexpected {type(sample).__name__}")
        if not isinstance(index, int) or isinstance(index, bool):
            raise FetchError(f"{where}.index: expected an integer")
        match = get("match")
        if match is not None and not isinstance(match, dict):
            raise FetchError(f"{where}.match: expected a dict")
        rows.append(
            {
                "index": index,
                "source_file": _str_or_none(source_file, f"{where}.source_file"),
                "description": _str_or_none(get("description"), f"{where}.description"),
                "image": _str_or_none(get("image"), f"{where}.image"),
                "init_script": _scripts(get("init_script"), f"{where}.init_script"),
                "start": _script(get("start"), f"{where}.start"),
                "check": _scripts(get("check"), f"{where}.check", nulls=True),
                "match": _plain(match, f"{where}.match"),
                "example_script": _script(get("example_script"), f"{where}.example_script"),
            }
        )
    return rows


# -- download ------------------------------------------------------------------------------------


class _Unreachable(Exception):
    """One URL failed; `transient` says whether trying it again may help."""

    def __init__(self, message: str, transient: bool) -> None:
        super().__init__(message)
        self.transient = transient


def _get_once(url: str, timeout: float, limit: int) -> bytes:
    scheme = urlparse(url).scheme.lower()
    if scheme not in ("https", "http", "file"):
        raise _Unreachable(
            f"unsupported URL scheme {scheme!r} (use https://, http://, file://)", False
        )
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            data = response.read(limit + 1)
    except urllib.error.HTTPError as exc:
        transient = exc.code >= 500 or exc.code in (408, 429)
        raise _Unreachable(f"HTTP {exc.code} {exc.reason}", transient) from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        transient = not isinstance(reason, FileNotFoundError)
        raise _Unreachable(f"{reason}", transient) from None
    except TimeoutError:
        raise _Unreachable(f"timed out after {timeout:g} s", True) from None
    except http.client.HTTPException as exc:  # e.g. IncompleteRead: the connection dropped
        raise _Unreachable(f"{type(exc).__name__}: {exc}", True) from None
    except (ConnectionError, OSError) as exc:
        raise _Unreachable(f"{type(exc).__name__}: {exc}", True) from None
    if len(data) > limit:
        raise _Unreachable(f"larger than {limit >> 20} MiB: not the data set", False)
    return data


def download(
    url: str, *, timeout: float = TIMEOUT_S, attempts: int = ATTEMPTS, limit: int = MAX_DOWNLOAD
) -> bytes:
    """The bytes at `url`, retried with backoff while the failure looks transient."""
    for attempt in range(1, attempts + 1):
        try:
            return _get_once(url, timeout, limit)
        except _Unreachable as exc:
            if not exc.transient or attempt == attempts:
                raise
            time.sleep(min(0.5 * 2 ** (attempt - 1), 4.0))
    raise AssertionError("unreachable")  # pragma: no cover


# -- destination -----------------------------------------------------------------------------------


def default_output() -> str:
    """$CYCLEQD_DATA, else a per-user cache folder (never inside the repository)."""
    env = os.environ.get(DATA_ENV)
    if env:
        return env
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(cache) / "cycleqd" / "data")


def _present_sha(store, filename: str) -> str | None:
    """sha256 of the file already at the destination (read back, not trusted), or None."""
    from cycleqd.objectstore import StoreNotFoundError

    try:
        return sha256_hex(store.get_bytes(filename, verify=False))
    except StoreNotFoundError:
        return None


@dataclass
class Outcome:
    name: str
    filename: str
    action: str  # fetched | replaced | present | FAILED
    sha256: str = ""
    url: str = ""
    errors: list[str] = field(default_factory=list)


def fetch_one(
    dataset: DataSet,
    store,
    *,
    urls: Iterable[str] | None = None,
    force: bool = False,
    timeout: float = TIMEOUT_S,
    attempts: int = ATTEMPTS,
) -> Outcome:
    """Download, convert, verify, then write one set; never writes unverified bytes."""
    present = _present_sha(store, dataset.filename)
    if present == dataset.sha256 and not force:
        return Outcome(dataset.name, dataset.filename, "present", present)
    errors = []
    for url in urls or dataset.urls:
        try:
            raw = download(url, timeout=timeout, attempts=attempts)
        except _Unreachable as exc:
            errors.append(f"{url}: cannot download ({exc})")
            continue
        try:
            data = dataset.convert(raw)
        except FetchError as exc:
            errors.append(f"{url}: {exc}")
            continue
        got = sha256_hex(data)
        if got != dataset.sha256:
            errors.append(
                f"{url}: sha256 mismatch for {dataset.filename}: expected {dataset.sha256}, "
                f"got {got} (a different version or a tampered file; nothing written)"
            )
            continue
        sha = store.put_bytes(dataset.filename, data)  # temp file + rename / S3 with sha256
        action = "replaced" if present not in (None, got) else "fetched"
        return Outcome(dataset.name, dataset.filename, action, sha, url)
    return Outcome(dataset.name, dataset.filename, "FAILED", errors=errors)


# -- the command -----------------------------------------------------------------------------------


def _parse_only(value: str | None) -> list[str]:
    if not value:
        return list(DATASETS)
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in DATASETS]
    if unknown or not names:
        raise FetchError(
            f"--only {value!r}: unknown set(s) {', '.join(unknown) or '(none)'}; "
            f"choose from {','.join(DATASETS)}"
        )
    return list(dict.fromkeys(names))


def _parse_sources(values: list[str] | None) -> dict[str, list[str]]:
    sources: dict[str, list[str]] = {}
    for value in values or []:
        name, sep, url = value.partition("=")
        name, url = name.strip(), url.strip()
        if not sep or name not in DATASETS or not url:
            raise FetchError(
                f"--source-url {value!r}: use NAME=URL with NAME one of {','.join(DATASETS)}"
            )
        if "://" not in url:  # a local path: read it as a file:// URL
            url = Path(url).expanduser().absolute().as_uri()
        sources.setdefault(name, []).append(url)
    return sources


def add_fetch_command(data_sub) -> None:
    fetch = data_sub.add_parser(
        "fetch",
        help="download the evaluation sets, checksummed",
        description=__doc__.split("\n\n")[0],
    )
    fetch.add_argument(
        "--output",
        help=f"folder or s3://bucket/prefix (default: ${DATA_ENV}, else ~/.cache/cycleqd/data)",
    )
    fetch.add_argument(
        "--only", metavar="NAMES", help=f"comma-separated subset of {','.join(DATASETS)}"
    )
    fetch.add_argument("--force", action="store_true", help="download even if present and valid")
    fetch.add_argument(
        "--source-url",
        action="append",
        metavar="NAME=URL",
        help="download NAME from URL (https://, http://, file:// or a path) instead of its "
        "source; repeatable",
    )
    fetch.add_argument("--timeout", type=float, default=TIMEOUT_S, help="seconds per request")
    fetch.set_defaults(handler=run_fetch)


def run_fetch(args: argparse.Namespace) -> int:
    from cycleqd.objectstore import open_store

    names = _parse_only(getattr(args, "only", None))
    sources = _parse_sources(getattr(args, "source_url", None))
    extra = set(sources) - set(names)
    if extra:
        raise FetchError(f"--source-url names {', '.join(sorted(extra))}, not selected by --only")
    output = getattr(args, "output", None) or default_output()
    try:
        store = open_store(output)
    except CycleQDError as exc:
        raise FetchError(f"cannot open the destination {output}: {exc}") from None
    outcomes = []
    for name in names:
        try:
            outcome = fetch_one(
                DATASETS[name],
                store,
                urls=sources.get(name),
                force=getattr(args, "force", False),
                timeout=getattr(args, "timeout", TIMEOUT_S),
            )
        except CycleQDError as exc:  # the destination failed (store unreachable, denied, ...)
            outcome = Outcome(name, DATASETS[name].filename, "FAILED", errors=[str(exc)])
        outcomes.append(outcome)
    _print_table(outcomes, store.uri)
    failed = [o for o in outcomes if o.action == "FAILED"]
    if failed:
        lines = [f"{o.name} ({o.filename}):\n  " + "\n  ".join(o.errors) for o in failed]
        raise FetchError(
            f"{len(failed)} of {len(outcomes)} data set(s) not fetched:\n"
            + "\n".join(lines)
            + "\nWithout network access to these URLs: pass --source-url NAME=URL (a mirror, or "
            "file:///path of a copy), or copy the files from a machine that has them into "
            f"{store.uri} (they are checked against their published sha256 when loaded)"
        )
    if not (os.environ.get(DATA_ENV)):
        print(f"use them with: export {DATA_ENV}={output}")
    return 0


def _print_table(outcomes: list[Outcome], where: str) -> None:
    print(f"data sets in {where}:")
    header = f"{'set':<9} {'file':<30} {'action':<9} {'sha256':<14} source"
    print(header)
    print("-" * len(header))
    for o in outcomes:
        sha = o.sha256[:12] + ".." if o.sha256 else "-"
        source = o.url or ("(already there, checksum ok)" if o.action == "present" else "-")
        print(f"{o.name:<9} {o.filename:<30} {o.action:<9} {sha:<14} {source}")
    sys.stdout.flush()

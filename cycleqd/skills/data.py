"""Evaluation data sets: located in a folder, a file or an object store, checked by sha256.

    rows = load_jsonl("/data/cycleqd", "mbppplus.jsonl")      # folder + name
    rows = load_jsonl("/data/cycleqd/agentbench_os.jsonl")     # a file
    rows = load_jsonl("s3://bucket/datasets", "mbppplus.jsonl")  # via cycleqd.objectstore

Every file whose name is in `KNOWN_SHA256` is verified against the checksum published with
the data (see the data README); a mismatch raises DataIntegrityError rather than evaluating
on the wrong data. Unknown files can be checked with `sha256=`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from urllib.parse import unquote, urlparse

from cycleqd.errors import CycleQDError

DATA_ENV = "CYCLEQD_DATA"

MBPP_PLUS = "mbppplus.jsonl"
DBBENCH_DEV = "agentbench_dbbench_dev.jsonl"
AGENTBENCH_OS = "agentbench_os.jsonl"

KNOWN_SHA256 = {
    MBPP_PLUS: "08405a4e8764a4941cfe0945d25a956355a0454f364ea902c4020a44e7057973",
    DBBENCH_DEV: "1065651d07b63693435a60460e6a6bfc3cc0512df2d8252f7fff3c93a12284bc",
    AGENTBENCH_OS: "7a4f87a36564cf23790db918f6fbff27fd0f3e5c17c6a6a6aaf40c4db8fea422",
}
KNOWN_ROWS = {MBPP_PLUS: 399, DBBENCH_DEV: 360, AGENTBENCH_OS: 170}


class DataError(CycleQDError):
    """A data set is missing or unreadable; the message says where it was looked for."""


class DataIntegrityError(DataError):
    """A data file's bytes do not match its published sha256."""


def _is_uri(location: str) -> bool:
    return "://" in location


def default_location() -> str | None:
    """The folder named by $CYCLEQD_DATA, if set."""
    return os.environ.get(DATA_ENV) or None


def resolve(location: str | Path | None, name: str | None = None) -> str:
    """The file to read: `location` itself, or `location/name` when it is a folder/prefix."""
    if location is None:
        location = default_location()
        if location is None:
            raise DataError(
                f"no data location given: pass a folder, a file or an s3:// URI, or set "
                f"${DATA_ENV} to the folder holding {name or 'the data files'}"
            )
    location = str(location)
    if _is_uri(location) and not location.startswith("file://"):
        if name and not location.rstrip("/").endswith(name):
            return location.rstrip("/") + "/" + name
        return location
    path = Path(unquote(urlparse(location).path)) if location.startswith("file://") else None
    path = path or Path(location).expanduser()
    if path.is_dir():
        if not name:
            raise DataError(f"{path} is a folder: say which file to load from it")
        path = path / name
    return str(path)


def read_bytes(location: str) -> bytes:
    """The bytes at a local path, a file:// URI or an object-store URI (s3://...)."""
    if _is_uri(location) and not location.startswith("file://"):
        return _read_from_store(location)
    path = Path(unquote(urlparse(location).path)) if location.startswith("file://") else None
    path = path or Path(location)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise DataError(
            f"data file {path} does not exist (set ${DATA_ENV} or pass the data folder)"
        ) from None
    except OSError as exc:
        raise DataError(f"cannot read data file {path}: {exc}") from None


def _read_from_store(uri: str) -> bytes:
    """Hook for remote data: `s3://bucket/prefix/file.jsonl` through cycleqd.objectstore.

    The object store owns endpoints, credentials and retries; this only splits the URI into
    the store (everything up to the last '/') and the key (the file name).
    """
    try:
        from cycleqd.objectstore import open_store
    except ImportError as exc:  # pragma: no cover - the object store ships with the library
        raise DataError(f"cannot read {uri}: no object store support ({exc})") from None
    prefix, _, key = uri.rstrip("/").rpartition("/")
    if not key or prefix.endswith(":/"):
        raise DataError(f"{uri} names no file: use s3://bucket/prefix/file.jsonl")
    try:
        return open_store(prefix).get_bytes(key)
    except CycleQDError as exc:
        raise DataError(f"cannot read {uri}: {exc}") from None


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def load_jsonl(
    location: str | Path | None,
    name: str | None = None,
    *,
    sha256: str | None = None,
    verify: bool = True,
) -> list[dict]:
    """Rows of a JSON-lines file, after checking its sha256 (known files always are)."""
    where = resolve(location, name)
    data = read_bytes(where)
    basename = where.rstrip("/").rsplit("/", 1)[-1]
    expected = sha256 or KNOWN_SHA256.get(basename)
    if verify and expected:
        actual = sha256_hex(data)
        if actual != expected:
            raise DataIntegrityError(
                f"{where}: sha256 {actual} does not match the published {expected}; "
                "the file is corrupt or a different version: fetch it again"
            )
    rows = []
    for lineno, line in enumerate(data.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise DataError(f"{where}:{lineno}: not valid JSON ({exc})") from None
        if not isinstance(row, dict):
            raise DataError(f"{where}:{lineno}: expected a JSON object per line")
        rows.append(row)
    return rows

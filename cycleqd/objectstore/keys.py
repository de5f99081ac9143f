"""Store keys: the check that a key is a plain relative path below the store's root (no way
out of a prefix, within S3's limits), and the temporary-file names that no key may take."""

from __future__ import annotations

import re
import uuid
from pathlib import Path

from cycleqd.objectstore.errors import InvalidKeyError

# Marks a file being written (renamed onto its key once complete); listings skip it.
TMP_MARK = ".cycleqd-tmp-"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# S3 keys are at most 1024 bytes; a folder entry at most 255, less the temporary suffix.
MAX_KEY_BYTES = 1024
MAX_SEGMENT_BYTES = 200


def check_key(key: str, *, what: str = "key") -> str:
    """Return `key` if it is a plain relative '/'-separated path, else raise InvalidKeyError."""
    if not isinstance(key, str):
        raise InvalidKeyError(f"store {what} must be a string, got {type(key).__name__}")
    problem = None
    if not key:
        problem = "it is empty"
    elif _CONTROL.search(key):
        problem = "it contains control characters"
    elif "\\" in key:
        problem = "it contains a backslash; use '/' between segments"
    elif key.startswith("/"):
        problem = "it is absolute; keys are relative to the store's root"
    elif not _encodable(key):
        problem = "it is not valid Unicode text (a lone surrogate)"
    elif len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        problem = f"it is longer than {MAX_KEY_BYTES} bytes (S3's limit)"
    else:
        for segment in key.split("/"):
            if len(segment.encode("utf-8", "surrogatepass")) > MAX_SEGMENT_BYTES:
                problem = f"a segment is longer than {MAX_SEGMENT_BYTES} bytes"
            elif segment == "":
                problem = "it has an empty segment ('//' or a trailing '/')"
            elif segment in (".", ".."):
                problem = "'.' and '..' segments are not allowed (they could leave the prefix)"
            elif TMP_MARK in segment:
                problem = f"{TMP_MARK!r} is reserved for temporary files"
            if problem:
                break
    if problem:
        shown = repr(key) if len(key) <= 120 else repr(key[:120]) + f"... ({len(key)} chars)"
        raise InvalidKeyError(f"invalid store {what} {shown}: {problem}")
    return key


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_prefix(prefix: str) -> str:
    """A listing prefix: empty, or a key, optionally ending in '/'."""
    if prefix == "":
        return prefix
    check_key(prefix[:-1] if prefix.endswith("/") else prefix, what="prefix")
    return prefix


def temp_sibling(path: Path) -> Path:
    """A temporary file beside `path`, to write into before renaming it onto `path`."""
    return path.with_name(f".{path.name}{TMP_MARK}{uuid.uuid4().hex[:12]}")

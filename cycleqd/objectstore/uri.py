"""Opening a store by URI: `s3://bucket/prefix`, `file:///path` or a plain folder path."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlparse

from cycleqd.objectstore.base import ObjectStore
from cycleqd.objectstore.credentials import SECRET_DIR_ENV
from cycleqd.objectstore.errors import StoreError
from cycleqd.objectstore.local import LocalObjectStore
from cycleqd.objectstore.s3 import S3ObjectStore
from cycleqd.redact import redact_uri


def open_store(uri: str | Path, **s3_options) -> ObjectStore:
    """`s3://bucket/prefix`, `file:///abs/path` or a plain path -> a store."""
    if isinstance(uri, Path):
        return LocalObjectStore(uri)
    if not isinstance(uri, str) or not uri.strip():
        shown = redact_uri(uri) if isinstance(uri, str) else repr(uri)
        raise StoreError(f"invalid store URI {shown!r}: use s3://bucket/prefix or a folder path")
    uri = uri.strip()
    if "://" not in uri:
        return LocalObjectStore(uri)
    shown = redact_uri(uri)  # error messages never repeat credentials put in the URI
    parsed = urlparse(uri)
    scheme = parsed.scheme.lower()
    if "@" in parsed.netloc:
        raise StoreError(
            f"invalid store URI {shown!r}: credentials do not belong in the URI (it is logged "
            "and tracked); set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or mount the S3 secret "
            f"and set {SECRET_DIR_ENV}"
        )
    if scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise StoreError(f"invalid store URI {shown!r}: use file:///absolute/path")
        return LocalObjectStore(unquote(parsed.path))
    if scheme == "s3":
        if not parsed.netloc:
            raise StoreError(f"invalid store URI {shown!r}: no bucket; use s3://bucket/prefix")
        return S3ObjectStore(parsed.netloc, unquote(parsed.path).strip("/"), **s3_options)
    raise StoreError(
        f"unsupported store URI {shown!r}: use s3://bucket/prefix, file:///path or a folder path"
    )

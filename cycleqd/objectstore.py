"""One object-store interface over a local folder and S3 (boto3).

Keys are relative, '/'-separated paths below the store's root (a folder, or a bucket and a
prefix). Every object carries the sha256 of its bytes (S3: object metadata `sha256`; local
folder: the extended attribute `user.cycleqd.sha256` where the file system has them), and
`get_bytes`/`get_file` verify it.

A model folder becomes visible only once all of its files are stored: `publish_model`
uploads the files first and writes `cycleqd-manifest.json` (sha256 and size of every file)
last; `model_is_complete` is true only when that manifest exists and names files that are
there. `RemoteSafetensors` reads safetensors files tensor by tensor with ranged GETs, behind
the same names/specs/get interface as `cycleqd.weights.SafetensorsFolder`.

URIs: `open_store("s3://bucket/prefix")` (endpoint from `CYCLEQD_S3_ENDPOINT` or
`AWS_ENDPOINT_URL`; credentials from the AWS environment variables or from a mounted
Kubernetes secret folder named by `CYCLEQD_S3_SECRET_DIR`), `open_store("file:///path")`
or `open_store("/path")`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlparse

from cycleqd.errors import CycleQDError, MissingTensorError
from cycleqd.redact import install_log_redaction, redact_text, redact_uri, register_secret
from cycleqd.weights import MANIFEST, TensorSpec, code_dtypes, sha256_file

if TYPE_CHECKING:
    import torch

SECRET_DIR_ENV = "CYCLEQD_S3_SECRET_DIR"
ENDPOINT_ENVS = ("CYCLEQD_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
SHA256_META = "sha256"
_XATTR = "user.cycleqd.sha256"
_TMP_MARK = ".cycleqd-tmp-"
_CHUNK = 1 << 22
MiB = 1 << 20

ProgressCallback = Callable[[int], None]


# -- errors --------------------------------------------------------------------------------------


class StoreError(CycleQDError):
    """The object store failed; the message says what to check.

    `transient` is true where trying again later may succeed (endpoint away, 5xx, throttling).
    """

    transient = False


class InvalidKeyError(StoreError, ValueError):
    """A key is not a plain relative path below the store's root."""


class StoreNotFoundError(StoreError):
    """No object under that key."""


class StoreRangeError(StoreError):
    """A byte range starts at or beyond the end of the object."""


class StoreIntegrityError(StoreError):
    """An object's bytes do not match the sha256 recorded when it was written."""


class StoreAuthError(StoreError):
    """The S3 service rejected the credentials (or they are missing)."""


class StoreBucketMissingError(StoreError):
    """The bucket does not exist at the endpoint."""


class StoreUnreachableError(StoreError):
    """The S3 endpoint cannot be reached (refused, timed out, DNS)."""

    transient = True


# -- keys ----------------------------------------------------------------------------------------

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
            elif _TMP_MARK in segment:
                problem = f"{_TMP_MARK!r} is reserved for temporary files"
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


# -- the interface -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ObjectInfo:
    size: int
    sha256: str | None  # recorded when the object was written; None if written by another tool


class ObjectStore(ABC):
    """Objects under relative keys. Writes of one key are atomic: readers see old or new."""

    @property
    @abstractmethod
    def uri(self) -> str: ...

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> str:
        """Store `data` under `key`; returns its sha256."""

    @abstractmethod
    def get_bytes(self, key: str, verify: bool = True) -> bytes:
        """The object's bytes; with `verify`, check them against the recorded sha256."""

    @abstractmethod
    def stat(self, key: str) -> ObjectInfo:
        """Size and recorded sha256; StoreNotFoundError if there is no such object."""

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Sorted keys that start with `prefix` (a plain string prefix, as in S3)."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object; no error if it does not exist."""

    @abstractmethod
    def put_file(self, key: str, path: str | Path, progress: ProgressCallback | None = None) -> str:
        """Upload a local file (S3: multipart, parts in parallel); returns its sha256."""

    @abstractmethod
    def get_file(self, key: str, path: str | Path, verify: bool = True) -> str:
        """Download to a local file (written atomically); returns its sha256."""

    @abstractmethod
    def get_range(self, key: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of the object (fewer if it ends before `end`)."""

    def exists(self, key: str) -> bool:
        try:
            self.stat(key)
        except StoreNotFoundError:
            return False
        return True

    def size(self, key: str) -> int:
        return self.stat(key).size

    def delete_prefix(self, prefix: str) -> int:
        """Delete every key under `prefix` (which must name a folder: end with '/')."""
        if not prefix.endswith("/"):
            raise InvalidKeyError(f"delete_prefix({prefix!r}): the prefix must end with '/'")
        keys = self.list(prefix)
        for key in keys:
            self.delete(key)
        return len(keys)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"


def _check_range(start: int, end: int) -> None:
    if not (isinstance(start, int) and isinstance(end, int)) or start < 0 or end < start:
        raise StoreError(f"invalid byte range [{start}, {end}): need 0 <= start <= end")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _integrity_error(where: str, recorded: str, actual: str) -> StoreIntegrityError:
    return StoreIntegrityError(
        f"{where} is corrupted: its bytes have sha256 {actual[:16]}..., but {recorded[:16]}... "
        "was recorded when it was written; rewrite it from its source (or delete it)"
    )


# -- local folder --------------------------------------------------------------------------------


class LocalObjectStore(ObjectStore):
    """Objects as files under `root`; every write goes to a temporary file, then os.replace."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().absolute()
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(f"{self.root} is not a folder; a local store needs a folder")

    @property
    def uri(self) -> str:
        return self.root.as_uri()

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*check_key(key).split("/"))

    def _where(self, key: str) -> str:
        return str(self.root.joinpath(*key.split("/")))

    def _write(self, key: str, fill: Callable[[object], str]) -> str:
        """Write through `fill(file) -> sha256` into a temp file, then rename onto the key."""
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise StoreError(
                f"cannot store {key!r} in {self.uri}: a part of its folder path is an object "
                "(a local store cannot hold both 'a' and 'a/b')"
            ) from None
        if path.is_dir():
            raise StoreError(f"{path} is a folder; cannot store an object under key {key!r}")
        tmp = path.with_name(f".{path.name}{_TMP_MARK}{uuid.uuid4().hex[:12]}")
        try:
            with tmp.open("wb") as f:
                sha = fill(f)
                f.flush()
                os.fsync(f.fileno())
            _set_xattr(tmp, sha)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return sha

    def put_bytes(self, key: str, data: bytes) -> str:
        data = bytes(data)

        def fill(f) -> str:
            f.write(data)
            return _sha256(data)

        return self._write(key, fill)

    def put_file(self, key: str, path: str | Path, progress: ProgressCallback | None = None) -> str:
        source = Path(path)
        if not source.is_file():
            raise StoreError(f"cannot upload {source}: no such file")

        def fill(f) -> str:
            digest = hashlib.sha256()
            with source.open("rb") as src:
                while block := src.read(_CHUNK):
                    digest.update(block)
                    f.write(block)
                    if progress:
                        progress(len(block))
            return digest.hexdigest()

        return self._write(key, fill)

    def _open(self, key: str):
        path = self._path(key)
        try:
            return path.open("rb")
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise StoreNotFoundError(f"no object {key!r} in {self.uri}") from None

    def get_bytes(self, key: str, verify: bool = True) -> bytes:
        with self._open(key) as f:
            data = f.read()
            recorded = _get_xattr(f.fileno()) if verify else None
        if recorded is not None and _sha256(data) != recorded:
            raise _integrity_error(self._where(key), recorded, _sha256(data))
        return data

    def get_file(self, key: str, path: str | Path, verify: bool = True) -> str:
        dest = Path(path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}{_TMP_MARK}{uuid.uuid4().hex[:12]}")
        digest = hashlib.sha256()
        try:
            with self._open(key) as src, tmp.open("wb") as out:
                recorded = _get_xattr(src.fileno())
                while block := src.read(_CHUNK):
                    digest.update(block)
                    out.write(block)
            if verify and recorded is not None and digest.hexdigest() != recorded:
                raise _integrity_error(self._where(key), recorded, digest.hexdigest())
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        return digest.hexdigest()

    def stat(self, key: str) -> ObjectInfo:
        with self._open(key) as f:
            return ObjectInfo(os.fstat(f.fileno()).st_size, _get_xattr(f.fileno()))

    def get_range(self, key: str, start: int, end: int) -> bytes:
        _check_range(start, end)
        with self._open(key) as f:
            f.seek(start)
            return f.read(end - start)

    def list(self, prefix: str = "") -> list[str]:
        check_prefix(prefix)
        # Walk only the deepest folder the prefix names.
        folder = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        top = self.root.joinpath(*folder.split("/")) if folder else self.root
        keys = []
        if top.is_dir():
            for dirpath, _dirs, files in os.walk(top):
                rel = Path(dirpath).relative_to(self.root).as_posix()
                for name in files:
                    if _TMP_MARK in name:
                        continue
                    key = name if rel == "." else f"{rel}/{name}"
                    if key.startswith(prefix):
                        keys.append(key)
        return sorted(keys)

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink()
        except (FileNotFoundError, NotADirectoryError):
            return
        except IsADirectoryError:
            raise StoreError(f"{path} is a folder, not an object") from None
        # Remove folders left empty, up to (not including) the root.
        parent = path.parent
        while parent != self.root and self.root in parent.parents:
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent


def _set_xattr(path: Path, sha: str) -> None:
    # No xattrs on macOS/Windows and some file systems: the object is then not verified.
    with contextlib.suppress(AttributeError, OSError):
        os.setxattr(path, _XATTR, sha.encode())


def _get_xattr(fd: int) -> str | None:
    try:
        return os.getxattr(fd, _XATTR).decode()
    except (AttributeError, OSError, UnicodeDecodeError):  # none recorded, or no xattrs here
        return None


# -- S3 ------------------------------------------------------------------------------------------

_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
_AUTH_CODES = {
    "SignatureDoesNotMatch",
    "InvalidAccessKeyId",
    "InvalidToken",
    "ExpiredToken",
    "TokenRefreshRequired",
    "AccessDenied",
    "AuthorizationHeaderMalformed",
    "InvalidSecurity",
    "403",
    "Forbidden",
}
# Worth another try (NoSuchUpload: a multipart upload lost when the service restarted).
_TRANSIENT_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "ServiceUnavailable",
    "InternalError",
    "NoSuchUpload",
}


def endpoint_from_env() -> str | None:
    for name in ENDPOINT_ENVS:
        value = os.environ.get(name, "").strip()
        if value:
            return value
    return None


@dataclass(frozen=True)
class _Credentials:
    access_key_id: str | None
    secret_access_key: str | None = None
    session_token: str | None = None
    source: str = "the default AWS credential chain"

    def __repr__(self) -> str:  # never show the secret
        return f"_Credentials(access_key_id={self.access_key_id!r}, source={self.source!r})"


def _resolve_credentials(
    access_key_id: str | None, secret_access_key: str | None, session_token: str | None
) -> _Credentials:
    if access_key_id or secret_access_key:
        if not (access_key_id and secret_access_key):
            raise StoreAuthError(
                "S3 credentials: give both an access key id and a secret access key"
            )
        return _Credentials(access_key_id, secret_access_key, session_token, "arguments")
    secret_dir = os.environ.get(SECRET_DIR_ENV, "").strip()
    if secret_dir:
        folder = Path(secret_dir)
        values = {}
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
            try:
                values[name] = (folder / name).read_text().strip() or None
            except FileNotFoundError:
                values[name] = None
            except OSError as exc:
                raise StoreAuthError(
                    f"cannot read {folder / name} ({SECRET_DIR_ENV}={secret_dir}): "
                    f"{exc.strerror}; check that the S3 secret is mounted there"
                ) from None
        missing = [n for n in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") if not values[n]]
        if missing:
            raise StoreAuthError(
                f"{SECRET_DIR_ENV}={secret_dir} has no {' or '.join(missing)} file; the "
                "Kubernetes secret must hold keys AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            )
        return _Credentials(
            values["AWS_ACCESS_KEY_ID"],
            values["AWS_SECRET_ACCESS_KEY"],
            values["AWS_SESSION_TOKEN"],
            f"the secret folder {SECRET_DIR_ENV}={secret_dir}",
        )
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        return _Credentials(None, source="AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY")
    return _Credentials(None)


class S3ObjectStore(ObjectStore):
    """Objects in an S3 bucket under a prefix (AWS, MinIO, SeaweedFS: path-style addressing).

    Requests are retried by botocore ('standard' mode: transient errors, throttling, 5xx,
    connection errors) with exponential backoff; a whole upload is retried up to
    `upload_attempts` times when the endpoint goes away during it (a restarting gateway).
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str | None = None,
        *,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        session_token: str | None = None,
        max_attempts: int = 5,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
        part_size: int = 64 * MiB,
        multipart_threshold: int | None = None,
        max_concurrency: int = 8,
        upload_attempts: int = 3,
    ):
        import boto3
        from botocore.config import Config

        if not isinstance(bucket, str) or not _BUCKET_RE.match(bucket) or ".." in bucket:
            raise StoreError(
                f"invalid S3 bucket name {bucket!r}: 3-63 lowercase letters, digits, '.' or '-'"
            )
        self.bucket = bucket
        prefix = (prefix or "").strip("/")
        self.prefix = check_key(prefix, what="prefix") if prefix else ""
        self.endpoint_url = endpoint_url or endpoint_from_env()
        self.region = (
            region
            or os.environ.get("AWS_REGION")
            or os.environ.get("AWS_DEFAULT_REGION")
            or "us-east-1"
        )
        self.part_size = max(int(part_size), 5 * MiB)  # the S3 minimum part size
        self.multipart_threshold = int(multipart_threshold or self.part_size)
        self.max_concurrency = max(1, int(max_concurrency))
        self.upload_attempts = max(1, int(upload_attempts))
        self._creds = _resolve_credentials(access_key_id, secret_access_key, session_token)
        creds = self._creds  # masked in every message and log line from here on
        for value in (creds.access_key_id, creds.secret_access_key, creds.session_token):
            register_secret(value)
        config = Config(
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            retries={"mode": "standard", "max_attempts": max(1, int(max_attempts))},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_pool_connections=max(10, 2 * self.max_concurrency),
            # Checksums beyond Content-MD5 are not supported by every S3-compatible service.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        session = boto3.session.Session()
        self._client = session.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            aws_access_key_id=self._creds.access_key_id,
            aws_secret_access_key=self._creds.secret_access_key,
            aws_session_token=self._creds.session_token,
            config=config,
        )
        # botocore logs headers (key id, session token) and the endpoint URL at DEBUG.
        install_log_redaction()
        self._read_timeout = read_timeout
        self._bucket_checked = False
        self._lock = threading.Lock()

    # -- naming and errors -----------------------------------------------------------------------

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    @property
    def endpoint(self) -> str:
        """The endpoint as shown in messages: without any userinfo (credentials)."""
        return redact_uri(self.endpoint_url or self._client.meta.endpoint_url)

    def __repr__(self) -> str:
        return f"S3ObjectStore({self.uri!r}, endpoint={self.endpoint!r})"

    def _full(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _translate(self, exc: BaseException, key: str | None, action: str) -> StoreError:
        from botocore.exceptions import (
            ClientError,
            HTTPClientError,
            NoCredentialsError,
            PartialCredentialsError,
            ReadTimeoutError,
        )
        from botocore.exceptions import ConnectionError as BotoConnectionError

        if isinstance(exc, StoreError):
            return exc
        where = f"{self.uri}/{key}" if key else self.uri
        if type(exc).__name__ == "S3UploadFailedError" and isinstance(exc.__context__, Exception):
            exc = exc.__context__  # boto3 wraps the ClientError of an upload in a string
        if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
            return StoreAuthError(
                f"no S3 credentials to {action} {where}: set AWS_ACCESS_KEY_ID and "
                f"AWS_SECRET_ACCESS_KEY, or mount the S3 secret and set {SECRET_DIR_ENV}"
            )
        if isinstance(exc, ReadTimeoutError):
            return StoreUnreachableError(
                f"cannot reach S3 endpoint {self.endpoint} to {action} {where}: no answer "
                f"within the read timeout ({self._read_timeout:g} s); check that the S3 service "
                "is running and healthy"
            )
        if isinstance(exc, (BotoConnectionError, HTTPClientError)):
            return StoreUnreachableError(
                f"cannot reach S3 endpoint {self.endpoint} to {action} {where} "
                f"({type(exc).__name__}); check CYCLEQD_S3_ENDPOINT/AWS_ENDPOINT_URL and that "
                "the S3 service is running and reachable from here"
            )
        if isinstance(exc, ClientError):
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in _AUTH_CODES or status == 403:
                return StoreAuthError(
                    f"S3 at {self.endpoint} refused to {action} {where} ({code or status}): "
                    "check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or the secret (credentials "
                    f"from {self._creds.source}), and that this identity may use bucket "
                    f"{self.bucket!r}"
                )
            if code == "NoSuchBucket":
                return self._bucket_missing()
            if code in ("NoSuchKey", "404", "NotFound") or status == 404:
                return StoreNotFoundError(f"no object {where}")
            if code == "InvalidRange" or status == 416:
                return StoreRangeError(f"cannot {action} {where}: the byte range is beyond its end")
            error = StoreError(
                f"S3 at {self.endpoint} failed to {action} {where}: {code or status} "
                f"{error.get('Message', '')}".rstrip()
            )
            error.transient = (
                isinstance(status, int) and status >= 500
            ) or code in _TRANSIENT_CODES
            return error
        return StoreError(f"cannot {action} {where}: {type(exc).__name__}: {redact_text(exc)}")

    def _bucket_missing(self) -> StoreBucketMissingError:
        return StoreBucketMissingError(
            f"bucket {self.bucket!r} does not exist at {self.endpoint}; create it (for example "
            f"`aws s3 mb s3://{self.bucket} --endpoint-url {self.endpoint}`) or fix the store URI"
        )

    def _ensure_bucket(self) -> None:
        """Check once that the bucket exists (some services create buckets on first write)."""
        if self._bucket_checked:
            return
        from botocore.exceptions import ClientError

        with self._lock:
            if self._bucket_checked:
                return
            try:
                self._client.head_bucket(Bucket=self.bucket)
            except ClientError as exc:
                status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                code = str(exc.response.get("Error", {}).get("Code", ""))
                if status == 404 or code in ("NoSuchBucket", "404", "NotFound"):
                    raise self._bucket_missing() from None
                if status != 403:  # 403: maybe no s3:ListBucket; the request itself will tell
                    raise self._translate(exc, None, "open") from None
            except Exception as exc:
                raise self._translate(exc, None, "open") from None
            self._bucket_checked = True

    def _call(self, action: str, key: str | None, fn: Callable[[], object]):
        self._ensure_bucket()
        try:
            return fn()
        except Exception as exc:
            raise self._translate(exc, key, action) from None

    def _read_body(self, action: str, key: str, **kwargs) -> tuple[bytes, dict]:
        """GET and read the body. botocore retries the request itself; a body cut off
        mid-stream (which botocore does not retry) is requested again, 3 tries in all."""
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import HTTPClientError

        full = self._full(key)

        def get() -> tuple[bytes, dict]:
            for attempt in range(3):
                response = self._client.get_object(Bucket=self.bucket, Key=full, **kwargs)
                try:
                    return response["Body"].read(), response
                except (BotoConnectionError, HTTPClientError):
                    if attempt == 2:
                        raise
                    time.sleep(0.2 * 2**attempt)
            raise AssertionError("unreachable")

        return self._call(action, key, get)

    # -- operations ------------------------------------------------------------------------------

    def put_bytes(self, key: str, data: bytes) -> str:
        data = bytes(data)
        sha = _sha256(data)
        full = self._full(key)
        self._call(
            "write",
            key,
            lambda: self._client.put_object(
                Bucket=self.bucket, Key=full, Body=data, Metadata={SHA256_META: sha}
            ),
        )
        return sha

    def get_bytes(self, key: str, verify: bool = True) -> bytes:
        data, response = self._read_body("read", key)
        recorded = (response.get("Metadata") or {}).get(SHA256_META)
        if verify and recorded and _sha256(data) != recorded:
            raise _integrity_error(f"s3://{self.bucket}/{self._full(key)}", recorded, _sha256(data))
        return data

    def stat(self, key: str) -> ObjectInfo:
        full = self._full(key)
        head = self._call(
            "inspect", key, lambda: self._client.head_object(Bucket=self.bucket, Key=full)
        )
        return ObjectInfo(int(head["ContentLength"]), (head.get("Metadata") or {}).get(SHA256_META))

    def get_range(self, key: str, start: int, end: int) -> bytes:
        _check_range(start, end)
        if start == end:
            return b""
        try:
            data, _ = self._read_body("read a range of", key, Range=f"bytes={start}-{end - 1}")
        except StoreRangeError:  # starts at or past the end: nothing there
            return b""
        return data

    def list(self, prefix: str = "") -> list[str]:
        check_prefix(prefix)
        base = f"{self.prefix}/" if self.prefix else ""

        def run() -> list[str]:
            keys = []
            paginator = self._client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=base + prefix):
                for item in page.get("Contents", []):
                    if not item["Key"].endswith("/"):  # folder markers of other tools
                        keys.append(item["Key"][len(base) :])
            return keys

        return sorted(self._call("list", prefix or None, run))

    def delete(self, key: str) -> None:
        full = self._full(key)
        self._call("delete", key, lambda: self._client.delete_object(Bucket=self.bucket, Key=full))

    def _transfer_config(self):
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(
            multipart_threshold=self.multipart_threshold,
            multipart_chunksize=self.part_size,
            max_concurrency=self.max_concurrency,
            use_threads=True,
            preferred_transfer_client="classic",
        )

    def put_file(self, key: str, path: str | Path, progress: ProgressCallback | None = None) -> str:
        source = Path(path)
        if not source.is_file():
            raise StoreError(f"cannot upload {source}: no such file")
        full = self._full(key)
        sha, size = sha256_file(source), source.stat().st_size
        config = self._transfer_config()

        def upload() -> None:
            self._client.upload_file(
                str(source),
                self.bucket,
                full,
                ExtraArgs={"Metadata": {SHA256_META: sha}},
                Callback=progress,
                Config=config,
            )

        # s3transfer gives up a whole multipart upload when one part fails for good (the
        # endpoint restarting, say); try the whole upload again then, with a longer backoff.
        for attempt in range(self.upload_attempts):
            try:
                self._call("upload to", key, upload)
                break
            except StoreError as exc:
                if not exc.transient or attempt == self.upload_attempts - 1:
                    raise
                time.sleep(min(8.0, 1.0 * 2**attempt))
        info = self.stat(key)
        if info.size != size or info.sha256 != sha:
            raise StoreIntegrityError(
                f"upload of {source} to s3://{self.bucket}/{full} did not stick: the stored "
                f"object has {info.size} bytes and sha256 {info.sha256}, expected {size} "
                f"bytes and {sha}; upload it again"
            )
        return sha

    def get_file(self, key: str, path: str | Path, verify: bool = True) -> str:
        dest = Path(path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}{_TMP_MARK}{uuid.uuid4().hex[:12]}")
        full = self._full(key)
        info = self.stat(key)
        try:
            self._call(
                "download",
                key,
                lambda: self._client.download_file(
                    self.bucket, full, str(tmp), Config=self._transfer_config()
                ),
            )
            sha = sha256_file(tmp)
            if verify and info.sha256 and sha != info.sha256:
                raise _integrity_error(f"s3://{self.bucket}/{full}", info.sha256, sha)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        return sha


# -- opening by URI ------------------------------------------------------------------------------


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


# -- model folders: visible only when complete ---------------------------------------------------


def publish_model(
    store: ObjectStore,
    prefix: str,
    files: Mapping[str, str | Path],
    metadata: Mapping[str, object] | None = None,
    progress: ProgressCallback | None = None,
) -> dict:
    """Upload a model folder; it becomes visible (manifest written) only once all files are in.

    An existing manifest is removed first, so that re-publishing over a model never leaves
    the old manifest vouching for a mixture of old and new files. Returns the manifest.
    """
    prefix = check_key(prefix.strip("/"), what="model prefix")
    if not files:
        raise StoreError(f"publish_model({prefix!r}): no files to publish")
    for name, path in files.items():
        check_key(name, what="file name")
        if name == MANIFEST:
            raise StoreError(f"publish_model: {MANIFEST} is written by publish_model itself")
        if not Path(path).is_file():
            raise StoreError(f"publish_model({prefix!r}): {name} -> {path} is not a file")
    try:
        json.dumps(dict(metadata or {}))
    except (TypeError, ValueError) as exc:
        raise StoreError(f"publish_model({prefix!r}): metadata is not JSON: {exc}") from None
    store.delete(f"{prefix}/{MANIFEST}")  # invisible from here until the new manifest is in
    for key in store.list(f"{prefix}/"):
        if key[len(prefix) + 1 :] not in files:
            store.delete(key)  # a leftover of an earlier version of this folder
    shas, sizes = {}, {}
    for name in sorted(files):
        path = Path(files[name])
        sizes[name] = path.stat().st_size
        shas[name] = store.put_file(f"{prefix}/{name}", path, progress=progress)
    manifest = {**(metadata or {}), "files": shas, "sizes": sizes}
    store.put_bytes(f"{prefix}/{MANIFEST}", json.dumps(manifest, indent=1).encode())
    return manifest


def read_manifest(store: ObjectStore, prefix: str) -> dict | None:
    """The model folder's manifest; None if the folder is not (yet) published or the manifest
    is unreadable (corrupted: the folder counts as unpublished and is published again)."""
    prefix = check_key(prefix.strip("/"), what="model prefix")
    try:
        manifest = json.loads(store.get_bytes(f"{prefix}/{MANIFEST}"))
    except StoreNotFoundError:
        return None
    except (StoreIntegrityError, ValueError, RecursionError):
        return None
    return manifest if isinstance(manifest, dict) else None


def model_is_complete(store: ObjectStore, prefix: str) -> bool:
    """True when the manifest exists and every file it names is there with its size and sha."""
    manifest = read_manifest(store, prefix)
    if manifest is None or not isinstance(manifest.get("files"), dict) or not manifest["files"]:
        return False
    prefix = prefix.strip("/")
    sizes = manifest.get("sizes") or {}
    if not isinstance(sizes, dict):
        return False
    for name, sha in manifest["files"].items():
        if not isinstance(sha, str):
            return False
        try:
            info = store.stat(f"{prefix}/{name}")
        except (StoreNotFoundError, InvalidKeyError):
            return False
        if name in sizes and info.size != sizes[name]:
            return False
        if info.sha256 is not None and info.sha256 != sha:
            return False
    return True


# -- safetensors read with ranged GETs -----------------------------------------------------------


@functools.cache
def _remote_dtypes() -> dict[str, torch.dtype]:
    """Every safetensors dtype code this torch can read (imports torch)."""
    import torch

    dtypes = dict(code_dtypes())
    for code, attr in (
        ("I8", "int8"),
        ("I16", "int16"),
        ("U16", "uint16"),
        ("U32", "uint32"),
        ("U64", "uint64"),
        ("F8_E4M3", "float8_e4m3fn"),
        ("F8_E5M2", "float8_e5m2"),
    ):
        if hasattr(torch, attr):
            dtypes.setdefault(code, getattr(torch, attr))
    return dtypes


_MAX_HEADER = 100 * MiB  # the safetensors format's own limit


class RemoteSafetensors:
    """A safetensors file (key ending in .safetensors) or a model folder (every *.safetensors
    directly under the key) in a store, read tensor by tensor with ranged GETs.

    Each file's header costs one ranged GET (two if it is larger than `header_probe`); each
    tensor then costs one. Same interface as `cycleqd.weights.SafetensorsFolder`.
    """

    def __init__(self, store: ObjectStore, key: str, header_probe: int = 1 * MiB):
        self.store = store
        key = check_key(key.strip("/"))
        self.folder = f"{store.uri.rstrip('/')}/{key}"
        if key.endswith(".safetensors"):
            files, self._dir = [key], key.rsplit("/", 1)[0] if "/" in key else ""
        else:
            files = [
                k
                for k in store.list(f"{key}/")
                if k.endswith(".safetensors") and "/" not in k[len(key) + 1 :]
            ]
            self._dir = key
        if not files:
            raise MissingTensorError(
                f"{self.folder}: no *.safetensors files; point at a model folder saved with "
                "save_pretrained(safe_serialization=True)"
            )
        self._where: dict[str, tuple[str, int, int]] = {}
        self._specs: dict[str, TensorSpec] = {}
        self._metadata: dict[str, dict] = {}
        for file in files:
            self._read_header(file, header_probe)
        self._cache: dict[str, torch.Tensor] = {}
        self._cache_lock = threading.Lock()

    def _read_header(self, file: str, probe: int) -> None:
        where = f"{self.store.uri.rstrip('/')}/{file}"
        head = self.store.get_range(file, 0, max(probe, 8))
        if len(head) < 8:
            raise MissingTensorError(f"{where}: not a safetensors file (only {len(head)} bytes)")
        size = int.from_bytes(head[:8], "little")
        if size > _MAX_HEADER:
            raise MissingTensorError(f"{where}: not a safetensors file (header of {size} bytes)")
        raw = head[8 : 8 + size]
        if len(raw) < size:
            raw += self.store.get_range(file, len(head), 8 + size)
        if len(raw) < size:
            raise MissingTensorError(f"{where}: truncated safetensors header")
        try:
            header = json.loads(raw)
        except (ValueError, RecursionError):
            raise MissingTensorError(f"{where}: not a safetensors file (bad header)") from None
        if not isinstance(header, dict):
            raise MissingTensorError(f"{where}: not a safetensors file (bad header)")
        start = 8 + size
        for name, info in header.items():
            try:
                if name == "__metadata__":
                    self._metadata[file] = {str(k): str(v) for k, v in dict(info or {}).items()}
                    continue
                dtype = _remote_dtypes().get(info["dtype"])
                if dtype is None:
                    raise MissingTensorError(f"{where}: tensor {name!r} has unsupported dtype")
                spec = TensorSpec(tuple(info["shape"]), dtype)
                begin, end = info["data_offsets"]
                numbers = (*spec.shape, begin, end)
                valid = all(type(d) is int and d >= 0 for d in numbers)
                if not valid or end - begin != spec.nbytes:
                    raise MissingTensorError(f"{where}: tensor {name!r} has inconsistent offsets")
            except (KeyError, TypeError, ValueError, OverflowError):
                raise MissingTensorError(
                    f"{where}: not a safetensors file (bad entry for tensor {str(name)[:80]!r})"
                ) from None
            self._specs[name] = spec
            self._where[name] = (file, start + begin, start + end)

    def names(self) -> list[str]:
        return sorted(self._specs)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: spec.shape for name, spec in self._specs.items()}

    def specs(self) -> dict[str, TensorSpec]:
        return dict(self._specs)

    def metadata(self) -> dict[str, str]:
        merged: dict[str, str] = {}
        for meta in self._metadata.values():
            merged.update(meta)
        return merged

    def _fetch(self, name: str) -> torch.Tensor:
        where = self._where.get(name)
        if where is None:
            raise MissingTensorError(f"{self.folder}: tensor {name!r} is missing")
        file, begin, end = where
        spec = self._specs[name]
        import torch

        if begin == end:
            return torch.empty(spec.shape, dtype=spec.dtype)
        data = self.store.get_range(file, begin, end)
        if len(data) != end - begin:
            raise MissingTensorError(
                f"{self.folder}: tensor {name!r} is cut off ({len(data)} of {end - begin} bytes)"
            )
        return torch.frombuffer(bytearray(data), dtype=spec.dtype).reshape(spec.shape)

    def get(self, name: str) -> torch.Tensor:
        """The tensor (a prefetched one is handed over and dropped from the cache)."""
        with self._cache_lock:
            tensor = self._cache.pop(name, None)
        return tensor if tensor is not None else self._fetch(name)

    def prefetch(self, names: Iterable[str], max_workers: int = 8) -> dict[str, torch.Tensor]:
        """Fetch several tensors in parallel; they are kept until `get` takes them."""
        names = [n for n in dict.fromkeys(names) if n not in self._cache]
        for name in names:
            if name not in self._where:
                raise MissingTensorError(f"{self.folder}: tensor {name!r} is missing")
        with ThreadPoolExecutor(max_workers=max(1, max_workers)) as pool:
            fetched = dict(zip(names, pool.map(self._fetch, names), strict=True))
        with self._cache_lock:
            self._cache.update(fetched)
            return dict(fetched)

    def config(self) -> dict:
        key = f"{self._dir}/config.json" if self._dir else "config.json"
        try:
            return json.loads(self.store.get_bytes(key))
        except StoreNotFoundError:
            return {}


def copy_folder_to_store(folder: str | Path, store: ObjectStore, prefix: str, **kwargs) -> dict:
    """Publish every file directly inside a local model folder (convenience for publish_model)."""
    folder = Path(folder)
    files = {p.name: p for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}
    return publish_model(store, prefix, files, **kwargs)


__all__ = [
    "InvalidKeyError",
    "LocalObjectStore",
    "ObjectInfo",
    "ObjectStore",
    "RemoteSafetensors",
    "S3ObjectStore",
    "StoreAuthError",
    "StoreBucketMissingError",
    "StoreError",
    "StoreIntegrityError",
    "StoreNotFoundError",
    "StoreRangeError",
    "StoreUnreachableError",
    "check_key",
    "copy_folder_to_store",
    "model_is_complete",
    "open_store",
    "publish_model",
    "read_manifest",
]

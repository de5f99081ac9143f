"""A store in an S3 bucket under a prefix (boto3; AWS, MinIO, SeaweedFS), with botocore's
errors translated into `StoreError`s that say what to check, and retries where they help."""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

from cycleqd.objectstore.base import (
    MiB,
    ObjectInfo,
    ObjectStore,
    ProgressCallback,
    check_range,
    integrity_error,
    sha256_of,
)
from cycleqd.objectstore.credentials import (
    SECRET_DIR_ENV,
    endpoint_from_env,
    resolve_credentials,
)
from cycleqd.objectstore.errors import (
    StoreAuthError,
    StoreBucketMissingError,
    StoreError,
    StoreIntegrityError,
    StoreNotFoundError,
    StorePreconditionError,
    StoreRangeError,
    StoreUnreachableError,
)
from cycleqd.objectstore.keys import check_key, check_prefix, temp_sibling
from cycleqd.redact import install_log_redaction, redact_text, redact_uri, register_secret
from cycleqd.weights import sha256_file

SHA256_META = "sha256"  # the object metadata entry holding the sha256 of its bytes

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
        self._creds = resolve_credentials(access_key_id, secret_access_key, session_token)
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
        self._conditional: bool | None = None  # conditional PUTs honoured? (probed once)
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
            # 409: AWS's answer to two conditional writes of one key at once.
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or status == 412:
                return StorePreconditionError(
                    f"{where} changed since it was read (another writer got there first)"
                )
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
        sha = sha256_of(data)
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
        if verify and recorded and sha256_of(data) != recorded:
            raise integrity_error(
                f"s3://{self.bucket}/{self._full(key)}", recorded, sha256_of(data)
            )
        return data

    def stat(self, key: str) -> ObjectInfo:
        full = self._full(key)
        head = self._call(
            "inspect", key, lambda: self._client.head_object(Bucket=self.bucket, Key=full)
        )
        return ObjectInfo(int(head["ContentLength"]), (head.get("Metadata") or {}).get(SHA256_META))

    def get_range(self, key: str, start: int, end: int) -> bytes:
        check_range(start, end)
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

    # -- compare-and-swap: S3 conditional writes (If-None-Match / If-Match on the ETag) ---------

    def conditional_writes(self) -> bool:
        """Whether the service honours conditional PUTs (AWS S3 since 2024, SeaweedFS 4.x and
        recent MinIO do; others ignore the headers, which would make `put_if` a plain write).
        Probed once: a second create-if-absent of one probe object must be refused."""
        if self._conditional is None:
            probe = f"preflight/conditional-{os.urandom(8).hex()}"
            try:
                self.put_if(probe, b"1", None)
                try:
                    self.put_if(probe, b"2", None)
                    self._conditional = False  # the condition was ignored
                except StorePreconditionError:
                    self._conditional = True
            except StoreError as exc:
                if isinstance(exc, (StoreAuthError, StoreBucketMissingError)) or exc.transient:
                    raise
                self._conditional = False  # the headers were refused (501, 400, ...)
            finally:
                self.delete(probe)
        return self._conditional

    def get_versioned(self, key: str) -> tuple[bytes, str]:
        data, response = self._read_body("read", key)
        return data, response["ETag"]

    def put_if(self, key: str, data: bytes, version: str | None) -> str:
        data = bytes(data)
        full = self._full(key)
        condition = {"IfNoneMatch": "*"} if version is None else {"IfMatch": version}
        response = self._call(
            "write",
            key,
            lambda: self._client.put_object(
                Bucket=self.bucket,
                Key=full,
                Body=data,
                Metadata={SHA256_META: sha256_of(data)},
                **condition,
            ),
        )
        return response["ETag"]

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
        tmp = temp_sibling(dest)
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
                raise integrity_error(f"s3://{self.bucket}/{full}", info.sha256, sha)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        return sha

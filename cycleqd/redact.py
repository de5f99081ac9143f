"""Keep credentials out of logs, error messages, MLflow tags and the store.

`redact_uri(uri)` hides the userinfo of a URL (`http://user:pw@host` -> `http://***@host`);
use it wherever a URI a person typed is logged, tagged or put in an error message.
`redact_text(text)` does that for every URL in free text, hides the AWS signing material
botocore logs at DEBUG (`Credential=<key id>/...`, `x-amz-security-token`), HTTP Basic/Bearer
values, and the values of the credential environment variables and of secrets registered with
`register_secret` (credentials read from a mounted secret folder, say).

`install_log_redaction()` puts a `RedactingFilter` on the loggers that can carry credentials:
botocore (request headers, the endpoint with its userinfo, the canonical request with the
session token), urllib3, MLflow (its errors name the tracking URL) and ours. A logger's filter
sees only records logged to that very logger, so the filter goes on every existing logger of
those packages; it is installed again (idempotently) when a store or tracker is opened, after
their libraries are imported.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from urllib.parse import urlsplit, urlunsplit

MASK = "***"
# Environment variables whose values are credentials (AWS, MLflow, the MinIO client's).
SECRET_ENVS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
)
# Shorter values would be masked inside unrelated words ("us", "true").
MIN_SECRET_LEN = 6
LOGGER_PREFIXES = ("botocore", "boto3", "s3transfer", "urllib3", "requests", "mlflow", "cycleqd")

# `scheme:/` too: a URI turned into a path (Path('s3://u:pw@b')) loses one slash.
_URL_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://?)[^/\s@?#'\"<>]+@")
_PATTERNS = (
    # AWS SigV4: the access key id in the Authorization header and presigned URLs.
    (re.compile(r"(Credential=)[^/\s,'\"&%]+", re.IGNORECASE), r"\1" + MASK),
    # The session token header / query parameter, in any of botocore's renderings.
    (
        re.compile(r"(x-amz-security-token['\"]?\s*[:=]\s*b?['\"]?)[^\s'\",&}]+", re.IGNORECASE),
        r"\1" + MASK,
    ),
    (re.compile(r"\b(Basic|Bearer)\s+[A-Za-z0-9+/=._~\-]{6,}"), r"\1 " + MASK),
)

_registered: set[str] = set()
_lock = threading.Lock()


def register_secret(value: str | None) -> None:
    """Mask this value wherever `redact_text` sees it (a credential not in the environment)."""
    if value and len(value) >= MIN_SECRET_LEN:
        with _lock:
            _registered.add(value)


def _secrets() -> list[str]:
    values = {os.environ.get(name, "") for name in SECRET_ENVS} | _registered
    # Longest first: a secret containing another is masked whole.
    return sorted((v for v in values if len(v) >= MIN_SECRET_LEN), key=len, reverse=True)


def redact_uri(uri: object) -> str:
    """The URI with its userinfo (user name and password) replaced by '***'."""
    text = "" if uri is None else str(uri)
    try:
        parts = urlsplit(text)
    except ValueError:  # not parseable as a URL: mask like free text
        return redact_text(text)
    if "@" in parts.netloc:
        parts = parts._replace(netloc=f"{MASK}@{parts.netloc.rpartition('@')[2]}")
        text = urlunsplit(parts)
    return redact_text(text)


def redact_text(text: object) -> str:
    """Free text with URL userinfo, AWS signing material and known secret values masked."""
    text = "" if text is None else str(text)
    text = _URL_USERINFO.sub(lambda m: m.group("scheme") + MASK + "@", text)
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    for secret in _secrets():
        if secret in text:
            text = text.replace(secret, MASK)
    return text


class RedactingFilter(logging.Filter):
    """Masks credentials in a record's message and exception text before any handler sees it."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: leave it to logging's own error handling
            return True
        clean = redact_text(message)
        if clean != message:
            record.msg, record.args = clean, ()
        if record.exc_info and not record.exc_text:
            # Formatters reuse exc_text when it is set: the traceback is shown masked.
            record.exc_text = redact_text(logging.Formatter().formatException(record.exc_info))
        if record.stack_info:
            record.stack_info = redact_text(record.stack_info)
        return True


_FILTER = RedactingFilter()


def install_log_redaction(prefixes: tuple[str, ...] = LOGGER_PREFIXES) -> None:
    """Put the redacting filter on every existing logger of those packages (and their roots)."""
    names = set(prefixes)
    names.update(
        name
        for name in list(logging.root.manager.loggerDict)
        if any(name == p or name.startswith(p + ".") for p in prefixes)
    )
    for name in names:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)


__all__ = [
    "MASK",
    "RedactingFilter",
    "install_log_redaction",
    "redact_text",
    "redact_uri",
    "register_secret",
]

"""Where an S3 store's endpoint and credentials come from: arguments, a mounted Kubernetes
secret folder (`CYCLEQD_S3_SECRET_DIR`), the AWS environment variables, or boto3's chain."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cycleqd.objectstore.errors import StoreAuthError

SECRET_DIR_ENV = "CYCLEQD_S3_SECRET_DIR"
ENDPOINT_ENVS = ("CYCLEQD_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


def endpoint_from_env() -> str | None:
    """The S3 endpoint the environment names (the first of `ENDPOINT_ENVS` set), or None."""
    for name in ENDPOINT_ENVS:
        value = os.environ.get(name, "").strip()
        if value:
            return value
    return None


@dataclass(frozen=True)
class Credentials:
    """Credentials for boto3 and where they came from (named in authentication errors);
    `access_key_id=None` leaves them to boto3's own chain."""

    access_key_id: str | None
    secret_access_key: str | None = None
    session_token: str | None = None
    source: str = "the default AWS credential chain"

    def __repr__(self) -> str:  # never show the secret
        return f"Credentials(access_key_id={self.access_key_id!r}, source={self.source!r})"


def resolve_credentials(
    access_key_id: str | None, secret_access_key: str | None, session_token: str | None
) -> Credentials:
    """Arguments first, then the secret folder named by `SECRET_DIR_ENV`, then the AWS
    environment variables (read by boto3 itself), then boto3's default chain."""
    if access_key_id or secret_access_key:
        if not (access_key_id and secret_access_key):
            raise StoreAuthError(
                "S3 credentials: give both an access key id and a secret access key"
            )
        return Credentials(access_key_id, secret_access_key, session_token, "arguments")
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
        return Credentials(
            values["AWS_ACCESS_KEY_ID"],
            values["AWS_SECRET_ACCESS_KEY"],
            values["AWS_SESSION_TOKEN"],
            f"the secret folder {SECRET_DIR_ENV}={secret_dir}",
        )
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        return Credentials(None, source="AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY")
    return Credentials(None)

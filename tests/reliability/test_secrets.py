"""Credentials never leak: not into logs, stdout/stderr, error messages, MLflow, the campaign
store or the compiled pipeline.

Recognisable sentinel credentials are put everywhere a user may put them: the AWS environment
(key id, secret, session token), MLflow's (password, token), the userinfo of the tracking URI
and of the S3 endpoint URL. A small campaign then runs through `cycleqd.steps` against a real
SeaweedFS (which accepts the sentinel keys) and a real MLflow server, with every logger at
DEBUG (botocore logs request headers there); errors are provoked with the sentinels in play;
the pipeline is compiled. Then every captured log line, output, error message, MLflow
param/tag/metric/model/registry entry and artifact, the MLflow database file, every object in
the bucket and the compiled YAML are searched for the sentinels, their base64 and URL-encoded
forms. Each search counts as one place checked; a place is clean when nothing is found.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import socket
import sys
import uuid
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import quote

import cycleqd_tests_mlflow_server as mlflow_server
import cycleqd_tests_s3_server as s3_server
import pytest
import yaml

from cycleqd import probe_world, steps
from cycleqd.redact import MASK, RedactingFilter, redact_text, redact_uri, register_secret

SECTION = "Secrets"


# Sentinels: unique per session, recognisable ("SENTINEL"), long enough to be masked.
_RUN = uuid.uuid4().hex[:8].upper()
ACCESS_KEY = f"SENTINELAKID{_RUN}"
SECRET_KEY = f"SENTINEL-secret-{_RUN}-aws"
SESSION_TOKEN = f"SENTINEL-token-{_RUN}-aws"
MLFLOW_PASSWORD = f"SENTINEL-mlflowpw-{_RUN}"
MLFLOW_TOKEN = f"SENTINEL-mlflowtoken-{_RUN}"
URI_PASSWORD = f"SENTINEL-uripw-{_RUN}"
ENDPOINT_PASSWORD = f"SENTINEL-endpointpw-{_RUN}"
WRONG_SECRET = f"SENTINEL-wrongsecret-{_RUN}"
SENTINELS = (
    ACCESS_KEY,
    SECRET_KEY,
    SESSION_TOKEN,
    MLFLOW_PASSWORD,
    MLFLOW_TOKEN,
    URI_PASSWORD,
    ENDPOINT_PASSWORD,
    WRONG_SECRET,
)


def _b64_forms(secret: str) -> set[str]:
    """The base64 of the secret at each of the three byte alignments it can have inside a
    longer encoded string (an HTTP Basic header `user:password`, say), less the edge groups
    the neighbouring bytes change."""
    forms = set()
    raw = secret.encode()
    for pad in range(3):
        encoded = base64.b64encode(b"\0" * pad + raw + b"\0\0\0").decode()
        forms.add(encoded[4 if pad else 0 : -8])
    return {f for f in forms if len(f) >= 12}


NEEDLES = sorted(
    {"sentinel"}  # any raw sentinel, any case
    | {n for s in SENTINELS for n in _b64_forms(s)}
    | {n for s in SENTINELS for n in _b64_forms(f"cycleqd:{s}")}
    | {quote(s, safe="") for s in SENTINELS}
)


class Scan:
    """Counts the places searched and collects the leaks found."""

    def __init__(self) -> None:
        self.checked = 0
        self.leaks: list[str] = []

    def check(self, where: str, content: object) -> None:
        self.checked += 1
        if isinstance(content, (bytes, bytearray)):
            text = bytes(content).decode("latin-1")
        else:
            text = "" if content is None else str(content)
        lower = text.lower()
        for needle in NEEDLES:
            at = lower.find(needle.lower())
            if at >= 0:
                context = text[max(0, at - 60) : at + 60].replace("\n", " ")
                self.leaks.append(f"{where}: {needle!r} in ...{context}...")
                return

    def check_all(self, where: str, items: Iterable[object]) -> None:
        for i, item in enumerate(items):
            self.check(f"{where}[{i}]", item)

    @property
    def clean(self) -> int:
        return self.checked - len(self.leaks)

    def report(self) -> str:
        return "\n".join(self.leaks[:20])


def _log_texts(caplog) -> list[str]:
    """Every captured record as a handler would write it (message and traceback)."""
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    return [formatter.format(record) for record in caplog.records]


def _dead_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: connections are refused


# -- services ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sentinel_s3(tmp_path_factory):
    """SeaweedFS whose one identity is the sentinel key pair."""
    weed = s3_server.find_weed()
    if weed is None:
        pytest.skip(f"SeaweedFS `weed` binary not found: {s3_server.INSTALL_HINT}")
    server = s3_server.SeaweedS3(weed, tmp_path_factory.mktemp("secrets-s3"))
    server.access_key, server.secret_key = ACCESS_KEY, SECRET_KEY
    identity = {"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}
    actions = ["Admin", "Read", "Write", "List", "Tagging"]
    server.config_path.write_text(
        json.dumps(
            {
                "identities": [
                    {"name": "cycleqd-test", "credentials": [identity], "actions": actions}
                ]
            }
        )
    )
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture(scope="module")
def sentinel_mlflow(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("secrets-mlflow")
    server = mlflow_server.MLflowServer(workdir, f"sqlite:///{workdir / 'mlflow.db'}")
    try:
        server.start()
    except RuntimeError as exc:
        pytest.skip(f"cannot start an MLflow server (pip install mlflow): {exc}")
    try:
        yield server
    finally:
        server.kill()


def _with_userinfo(url: str, password: str) -> str:
    return url.replace("://", f"://cycleqd:{password}@", 1)


@pytest.fixture
def sentinel_env(monkeypatch, sentinel_s3):
    """The sentinels where users put credentials: the AWS and MLflow environment, the endpoint's
    userinfo. (No session token: SeaweedFS's static identities refuse any; it gets its own
    error case below.)"""
    for name in list(os.environ):
        if name.startswith(("AWS_", "MLFLOW_", "CYCLEQD_S3")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv(
        "CYCLEQD_S3_ENDPOINT", _with_userinfo(sentinel_s3.endpoint, ENDPOINT_PASSWORD)
    )
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "cycleqd")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", MLFLOW_PASSWORD)
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", MLFLOW_TOKEN)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def _config_yaml(world, generations: int = 2) -> str:
    config = probe_world.default_config(
        world, name=f"secrets-{_RUN.lower()}", generations=generations
    )
    config["population"] = 2
    return yaml.safe_dump(config)


# -- the unit: redaction itself ------------------------------------------------------------------


def test_redaction_masks_userinfo_signing_material_and_known_secrets(monkeypatch):
    assert redact_uri("http://user:pw@host:5000/x?y=1") == f"http://{MASK}@host:5000/x?y=1"
    assert redact_uri("https://token@host") == f"https://{MASK}@host"
    assert redact_uri("s3://bucket/prefix") == "s3://bucket/prefix"
    assert redact_uri("/a/b@c") == "/a/b@c"
    assert redact_uri(None) == ""
    text = "API request to http://u:p4ss@127.0.0.1:9/api failed; and https://x@y/z"
    assert (
        redact_text(text)
        == f"API request to http://{MASK}@127.0.0.1:9/api failed; and https://{MASK}@y/z"
    )
    signed = "Authorization: b'AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20250101/us-east-1/s3'"
    assert "AKIDEXAMPLE" not in redact_text(signed)
    for header in (
        "x-amz-security-token:TOKENVALUE123",
        "'X-Amz-Security-Token': b'TOKENVALUE123'",
        "?X-Amz-Security-Token=TOKENVALUE123&x=1",
        "Authorization: Bearer TOKENVALUE123",
    ):
        assert "TOKENVALUE123" not in redact_text(header), header
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "env-secret-value")
    register_secret("registered-secret-value")
    register_secret("ab")  # too short to mask safely: ignored
    masked = redact_text("env-secret-value registered-secret-value ab")
    assert masked == f"{MASK} {MASK} ab"

    record = logging.LogRecord(
        "botocore.endpoint", logging.DEBUG, __file__, 1, "to %s", ("http://u:pw@h",), None
    )
    try:
        raise RuntimeError("http://u:pw@h refused")
    except RuntimeError:
        record.exc_info = sys.exc_info()
    assert RedactingFilter().filter(record)
    assert "pw" not in record.getMessage() and ":pw@" not in record.exc_text


# -- a campaign with the sentinels everywhere ----------------------------------------------------


@pytest.mark.slow
def test_campaign_on_s3_and_mlflow_leaks_no_credential(
    tiny_world, sentinel_s3, sentinel_mlflow, sentinel_env, caplog, capfd, reliability
):
    caplog.set_level(logging.DEBUG)  # every logger: botocore logs headers at DEBUG
    text = _config_yaml(tiny_world, generations=1)
    store_uri = f"s3://{sentinel_s3.bucket}/secrets-{_RUN.lower()}"
    tracking_uri = _with_userinfo(sentinel_mlflow.uri, URI_PASSWORD)
    owner = "run-secrets"
    outputs: list[object] = []

    outputs.append(steps.preflight(text, store_uri, tracking_uri, owner))
    outputs.append(steps.seed(text, store_uri, tracking_uri, owner))
    while children := steps.breed(text, store_uri, owner):
        outputs.append(children)
        outputs.append(steps.evaluate_many(text, store_uri, children))
        summary = steps.commit(text, store_uri, tracking_uri, owner)
        assert summary["committed"] and not summary["tracking_missed"], summary
        outputs.append(summary)
    final = steps.export(text, store_uri, tracking_uri, owner)
    assert not final["tracking_missed"], final
    outputs.append(final)
    steps.release(store_uri, owner)
    outputs.append(steps.elite_maps_html(text, store_uri))

    scan = Scan()
    scan.check_all("step output", (json.dumps(o) if not isinstance(o, str) else o for o in outputs))
    logs = _log_texts(caplog)
    assert any(r.name.startswith("botocore") for r in caplog.records), "no botocore DEBUG seen"
    scan.check_all("log record", logs)
    out, err = capfd.readouterr()
    scan.check("stdout", out)
    scan.check("stderr", err)
    places = {"step outputs": len(outputs), "log records": len(logs), "stdout/stderr": 2}

    before = scan.checked
    _scan_mlflow(scan, sentinel_mlflow)
    places["MLflow entries, artifacts, database, server log"] = scan.checked - before
    before = scan.checked
    _scan_bucket(scan, sentinel_s3)
    places["store objects"] = scan.checked - before

    reliability.record(
        SECTION,
        "A campaign (preflight, seed, a generation of 2 children, export) on S3 + an MLflow "
        "server with "
        "sentinel credentials in the AWS/MLflow environment and in the tracking URI's and S3 "
        "endpoint's userinfo; all loggers at DEBUG",
        tried=scan.checked,
        survived=scan.clean,
        detail="places searched for the sentinels (raw, base64, URL-encoded): "
        + ", ".join(f"{n} {k}" for k, n in places.items()),
    )
    assert not scan.leaks, scan.report()


def _scan_mlflow(scan: Scan, server) -> None:
    """Every experiment, run (params, tags, metric keys), logged model, registered model and
    version through the API; then the artifact folder, the database file and the server log."""
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    client = MlflowClient(server.uri)
    experiments = client.search_experiments(view_type=ViewType.ALL)
    assert experiments
    for experiment in experiments:
        scan.check(f"experiment {experiment.name}", [experiment.name, experiment.tags])
        ids = [experiment.experiment_id]
        runs = client.search_runs(ids, max_results=5000, run_view_type=ViewType.ALL)
        for run in runs:
            where = f"run {run.info.run_name}"
            scan.check_all(f"{where} param", (f"{k}={v}" for k, v in run.data.params.items()))
            scan.check_all(f"{where} tag", (f"{k}={v}" for k, v in run.data.tags.items()))
            scan.check_all(f"{where} metric", run.data.metrics)
            inputs = run.inputs.dataset_inputs if run.inputs else []
            scan.check_all(f"{where} input", (str(d.dataset) for d in inputs or []))
        for model in client.search_logged_models(experiment_ids=ids, max_results=1000):
            where = f"logged model {model.name}"
            scan.check_all(f"{where} param", (f"{k}={v}" for k, v in model.params.items()))
            scan.check_all(f"{where} tag", (f"{k}={v}" for k, v in model.tags.items()))
    for registered in client.search_registered_models():
        scan.check(f"registered model {registered.name}", [registered.tags, registered.description])
        for version in client.search_model_versions(f"name = '{registered.name}'"):
            scan.check(
                f"model version {registered.name}/{version.version}",
                [version.source, version.tags, version.description, version.run_link],
            )
    artifacts = Path(server.artifacts_destination)
    files = sorted(p for p in artifacts.rglob("*") if p.is_file())
    assert files, "the campaign logged no artifacts"
    for path in files:
        scan.check(f"artifact {path.relative_to(artifacts)}", path.read_bytes())
    # The catch-all: whatever the API shows or not, the backend database itself.
    scan.check(
        "MLflow database file", Path(server.backend_uri.removeprefix("sqlite:///")).read_bytes()
    )
    scan.check("MLflow server log", server.log_path.read_bytes())


def _scan_bucket(scan: Scan, server) -> None:
    client = server.client()
    keys = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=server.bucket):
        keys += [item["Key"] for item in page.get("Contents", [])]
    assert any(k.endswith("LATEST") for k in keys), keys[:20]
    for key in keys:
        response = client.get_object(Bucket=server.bucket, Key=key)
        scan.check(f"object {key}", [key, response.get("Metadata"), response["Body"].read()])


# -- errors with the sentinels in play ------------------------------------------------------------


def _error_cases(world, server, tmp_path: Path):
    """(name, callable that must raise): each with a sentinel where the failure could echo it."""
    from cycleqd.objectstore import S3ObjectStore, open_store

    text = _config_yaml(world)
    good_endpoint = _with_userinfo(server.endpoint, ENDPOINT_PASSWORD)
    dead_endpoint = _with_userinfo(f"http://127.0.0.1:{_dead_port()}", ENDPOINT_PASSWORD)
    dead_mlflow = _with_userinfo(f"http://127.0.0.1:{_dead_port()}", URI_PASSWORD)
    fast = {"max_attempts": 1, "connect_timeout": 2, "read_timeout": 5}

    def s3(bucket=server.bucket, endpoint=good_endpoint, **creds):
        creds = {"access_key_id": ACCESS_KEY, "secret_access_key": SECRET_KEY, **creds}
        return S3ObjectStore(bucket, f"errors-{_RUN.lower()}", endpoint, **creds, **fast)

    def unreachable_tracker():
        # The tracker never raises into the search: what MLflow did not get is in missed().
        with steps.open_campaign(text, str(tmp_path / "tracked"), tracking_uri=dead_mlflow) as c:
            c.seed()
        raise RuntimeError("; ".join(str(m) for m in c.tracker.missed()) or "nothing missed")

    return [
        ("wrong secret key", lambda: s3(secret_access_key=WRONG_SECRET).put_bytes("k", b"x")),
        ("session token refused", lambda: s3(session_token=SESSION_TOKEN).put_bytes("k", b"x")),
        ("dead S3 endpoint with userinfo", lambda: s3(endpoint=dead_endpoint).get_bytes("k")),
        ("missing bucket", lambda: s3(bucket=f"missing-{_RUN.lower()}").put_bytes("k", b"x")),
        ("missing object", lambda: s3().get_bytes(f"nothing-{_RUN}")),
        (
            "store URI with credentials",
            lambda: open_store(f"s3://{ACCESS_KEY}:{SECRET_KEY}@{server.bucket}/p"),
        ),
        (
            "preflight: MLflow unreachable, password in its URI",
            lambda: steps.preflight(text, str(tmp_path / "pf"), dead_mlflow),
        ),
        (
            "preflight: store URI with credentials",
            lambda: steps.preflight(text, f"s3://u:{SECRET_KEY}@{server.bucket}/p"),
        ),
        (
            "config naming a tracking URI with userinfo",
            lambda: steps.load_config_text(
                text + f"tracking_uri: {dead_mlflow}\nendpoint: {good_endpoint}\n"
            ),
        ),
        ("tracker: MLflow unreachable, password in its URI", unreachable_tracker),
    ]


def test_errors_with_sentinels_in_play_do_not_repeat_them(
    tiny_world, sentinel_s3, sentinel_env, caplog, capfd, tmp_path, reliability
):
    caplog.set_level(logging.DEBUG)
    scan = Scan()
    messages = []
    for name, provoke in _error_cases(tiny_world, sentinel_s3, tmp_path):
        with pytest.raises(Exception) as caught:  # any error: its text is what matters
            provoke()
        exc = caught.value
        messages.append((name, f"{type(exc).__name__}: {exc}"))
        scan.check(f"error: {name}", f"{exc!s} {exc!r} {exc.__cause__!s}")
    errors = scan.checked
    logs = _log_texts(caplog)
    scan.check_all("log record", logs)
    out, err = capfd.readouterr()
    scan.check("stdout", out)
    scan.check("stderr", err)
    reliability.record(
        SECTION,
        "Errors provoked with sentinel credentials in play: wrong secret, refused session "
        "token, dead endpoint and MLflow with passwords in their URIs, missing bucket/object, "
        "credentials in store/model URIs and in a config",
        tried=scan.checked,
        survived=scan.clean,
        detail=f"{errors} error messages (str, repr, cause), {len(logs)} log records, "
        "stdout/stderr searched",
    )
    assert not scan.leaks, scan.report() + "\n" + "\n".join(f"{n}: {m}" for n, m in messages)
    # The errors still say what to fix.
    shown = dict(messages)
    assert "refused" in shown["wrong secret key"]
    assert f"{MASK}@127.0.0.1" in shown["dead S3 endpoint with userinfo"]
    assert "credentials do not belong in the URI" in shown["store URI with credentials"]
    assert (
        f"MLflow at http://{MASK}@127.0.0.1"
        in shown["preflight: MLflow unreachable, password in its URI"]
    )


# -- the compiled pipeline and the submit/schedule arguments --------------------------------------


def test_compiled_pipeline_and_submit_arguments_hold_no_credential(
    tiny_world, sentinel_env, monkeypatch, capfd, tmp_path, reliability
):
    from cycleqd_kfp.pipelines import cli as kfp_cli
    from cycleqd_kfp.pipelines.cycleqd_pipeline import compile_pipeline

    monkeypatch.setenv("AWS_SESSION_TOKEN", SESSION_TOKEN)
    monkeypatch.setenv(
        "AWS_ENDPOINT_URL", _with_userinfo("http://s3.example:9000", ENDPOINT_PASSWORD)
    )
    scan = Scan()
    compiled = compile_pipeline(tmp_path / "direct.yaml")
    scan.check("compile_pipeline YAML", compiled.read_text())
    assert kfp_cli.main(["compile", "--output", str(tmp_path / "cli.yaml")]) == 0
    scan.check("`cycleqd compile` YAML", (tmp_path / "cli.yaml").read_text())
    # The S3 secret reaches the pods by name, never by value.
    assert "cycleqd-s3" in compiled.read_text()

    config = tmp_path / "campaign.yaml"
    config.write_text(_config_yaml(tiny_world))
    args = argparse.Namespace(
        config=str(config),
        store="s3://bucket/campaign",
        tracking_uri="http://mlflow.kubeflow:5000",
        generations_per_run=2,
        parallelism=2,
        s3_secret="cycleqd-s3",
        models_pvc="",
        models_mount_path="/models",
        model_cache_size="100Gi",
        kfp_ui_url="",
    )
    arguments = kfp_cli._arguments(args)
    scan.check_all("submit/schedule run parameter", (f"{k}={v}" for k, v in arguments.items()))
    scan.check("submit/schedule package", Path(kfp_cli._package(args, tmp_path)).read_text())
    out, err = capfd.readouterr()
    scan.check("stdout", out)
    scan.check("stderr", err)
    reliability.record(
        SECTION,
        "Pipeline compiled (library and `cycleqd compile`) and submit/schedule arguments built "
        "with sentinel AWS/MLflow credentials and an endpoint with userinfo in the environment",
        tried=scan.checked,
        survived=scan.clean,
        detail="compiled YAML x3, run parameters, stdout/stderr",
    )
    assert not scan.leaks, scan.report()


def test_model_path_with_credentials_is_not_echoed(tiny_world, sentinel_env, tmp_path):
    text = _config_yaml(tiny_world).replace(
        str(tiny_world["base"]), f"s3://u:{URI_PASSWORD}@bucket/base"
    )
    with pytest.raises(Exception) as caught:  # any error: its text is what matters
        steps.preflight(text, str(tmp_path / "store"))
    scan = Scan()
    scan.check("error: credentials in a model path", f"{caught.value!s} {caught.value!r}")
    assert not scan.leaks, scan.report()


# -- the CLI --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_run_on_s3_prints_no_credential(
    tiny_world, sentinel_s3, sentinel_mlflow, sentinel_env, caplog, capfd, tmp_path, reliability
):
    from cycleqd_kfp.pipelines import cli as kfp_cli

    caplog.set_level(logging.DEBUG)
    store_uri = f"s3://{sentinel_s3.bucket}/cli-{_RUN.lower()}"
    tracking_uri = _with_userinfo(sentinel_mlflow.uri, URI_PASSWORD)
    config = tmp_path / "campaign.yaml"  # the probe world, built once for the session
    config.write_text(_config_yaml(tiny_world, generations=0))  # seed + export: enough
    code = kfp_cli.main(
        [
            "run",
            "--engine",
            "in-process",
            "--config",
            str(config),
            "--workdir",
            str(tmp_path / "cli"),
            "--store",
            store_uri,
            "--tracking-uri",
            tracking_uri,
        ]
    )
    out, err = capfd.readouterr()
    assert code == 0, err
    scan = Scan()
    scan.check("`cycleqd run` stdout", out)
    scan.check("`cycleqd run` stderr", err)
    logs = _log_texts(caplog)
    scan.check_all("log record", logs)
    reliability.record(
        SECTION,
        "`cycleqd run --engine in-process` (probe world) on S3 with a tracking URI holding a "
        "password",
        tried=scan.checked,
        survived=scan.clean,
        detail=f"stdout, stderr, {len(logs)} log records searched",
    )
    assert not scan.leaks, scan.report()

"""`cycleqd submit` and `cycleqd schedule` against the kfp client's API, with a recording
stand-in for the client: no Kubeflow Pipelines API server runs on this machine. What is
checked is what a real server would be asked: the pipeline uploaded once and versioned, runs
and recurring runs referring to that version, one recurring run per name, the cron, the
token and the namespace."""

from __future__ import annotations

from types import SimpleNamespace

import cycleqd_tests_deploy_common as common
import pytest
import yaml

from cycleqd.probe_world import default_config
from cycleqd_kfp.pipelines import cli, kfp_client


class RecordingKfpClient(common.KfpClientRecorder):
    """The kfp.Client methods the commands call, with a server's state: pipelines, their
    versions, recurring runs. Every call is checked against kfp.Client's own signature."""

    def __init__(self) -> None:
        super().__init__()
        self.pipelines: dict[str, str] = {}
        self.versions: dict[str, list[SimpleNamespace]] = {}
        self.recurring: dict[str, SimpleNamespace] = {}

    def get_pipeline_id(self, name):
        return self.pipelines.get(name)

    def upload_pipeline(self, pipeline_package_path, pipeline_name=None, **_):
        pipeline_id = f"p-{len(self.pipelines)}"
        self.pipelines[pipeline_name] = pipeline_id
        self.versions[pipeline_id] = [_version(pipeline_name, f"{pipeline_id}-v0")]
        return SimpleNamespace(pipeline_id=pipeline_id)

    def upload_pipeline_version(self, pipeline_package_path, pipeline_version_name, **kwargs):
        versions = self.versions[kwargs["pipeline_id"]]
        versions.append(_version(pipeline_version_name, f"v{len(versions)}"))
        return versions[-1]

    def list_pipeline_versions(self, pipeline_id, page_token="", page_size=10, **_):
        return SimpleNamespace(pipeline_versions=self.versions[pipeline_id], next_page_token="")

    def create_experiment(self, name, description=None, namespace=None):
        return SimpleNamespace(experiment_id=f"exp-{name}-{namespace}")

    def run_pipeline(self, experiment_id, job_name, **kwargs):
        return SimpleNamespace(run_id=f"run-{len(self.calls)}")

    def list_recurring_runs(self, page_token="", page_size=10, **kwargs):
        runs = list(self.recurring.values())
        return SimpleNamespace(recurring_runs=runs, next_page_token="")

    def delete_recurring_run(self, recurring_run_id):
        del self.recurring[recurring_run_id]

    def create_recurring_run(self, experiment_id, job_name, **kwargs):
        run_id = f"rr-{len(self.calls)}"
        self.recurring[run_id] = SimpleNamespace(display_name=job_name, recurring_run_id=run_id)
        return self.recurring[run_id]

    def named(self, name: str) -> list[dict]:
        return [kwargs for called, kwargs in self.calls if called == name]


def _version(name: str, version_id: str) -> SimpleNamespace:
    return SimpleNamespace(display_name=name, pipeline_version_id=version_id)


@pytest.fixture
def kubeflow(monkeypatch, tmp_path, tiny_world):
    """The commands' arguments and the stand-in client they connect to."""
    client = RecordingKfpClient()
    connected = []

    def connect(host, namespace, token):
        connected.append((host, namespace, token))
        return client

    monkeypatch.setattr(kfp_client, "connect", connect)
    config = tmp_path / "campaign.yaml"
    config.write_text(yaml.safe_dump(default_config(tiny_world)))
    common_args = ["--config", str(config), "--store", "s3://bucket/campaigns/tiny"]
    return SimpleNamespace(client=client, connected=connected, args=common_args)


def test_submit_uploads_the_pipeline_once_and_runs_its_version_without_a_kubeflow_api_server(
    kubeflow, capsys
):
    assert cli.main(["submit", *kubeflow.args, "--namespace", "team-a"]) == 0
    assert cli.main(["submit", *kubeflow.args, "--namespace", "team-a"]) == 0
    client = kubeflow.client
    assert len(client.named("upload_pipeline")) == 1
    assert len(client.named("upload_pipeline_version")) == 1  # the same package: one version
    runs = client.named("run_pipeline")
    assert len(runs) == 2
    version = client.versions["p-0"][-1]
    assert version.display_name.startswith("cycleqd-")
    for run in runs:
        assert run["version_id"] == version.pipeline_version_id
        assert run["pipeline_id"] == "p-0" and "pipeline_package_path" not in run
        assert run["service_account"] == "cycleqd-pipeline"
        assert run["params"]["campaign_store_uri"] == "s3://bucket/campaigns/tiny"
    assert kubeflow.connected[0] == (None, "team-a", None)  # in-cluster defaults
    out = capsys.readouterr().out
    assert "(uploaded)" in out and "(already there)" in out


def test_schedule_replaces_the_recurring_run_of_its_name_without_a_kubeflow_api_server(kubeflow):
    args = ["schedule", *kubeflow.args, "--cron", "0 0 2 * * *"]
    assert cli.main(args) == 0
    assert cli.main([*args[:-1], "0 30 3 * * *"]) == 0
    client = kubeflow.client
    assert len(client.recurring) == 1  # replaced, not added
    assert len(client.named("delete_recurring_run")) == 1
    created = client.named("create_recurring_run")[-1]
    assert created["cron_expression"] == "0 30 3 * * *"
    assert created["max_concurrency"] == 1 and created["no_catchup"] is True
    assert created["enable_caching"] is False
    assert created["version_id"] == client.versions["p-0"][-1].pipeline_version_id


@pytest.mark.parametrize(
    ("cron", "message"),
    [
        ("0 2 * * *", "5 fields"),
        ("* 0 2 * * *", "second"),
        ("0 0 2 * *  * *", "6 fields"),
        ("0 0 2 * * $", "invalid field"),
    ],
)
def test_a_wrong_cron_is_one_message_and_nothing_is_sent(kubeflow, capsys, cron, message):
    assert cli.main(["schedule", *kubeflow.args, "--cron", cron]) != 0
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert kubeflow.client.calls == []


def test_cron_forms_kfp_accepts():
    for cron in ("0 0 2 * * *", "0 */30 * * * *", "0 0 3 * * MON-FRI", "30 15 1,13 * * ?"):
        assert kfp_client.check_cron(cron) == cron


def test_the_token_comes_from_the_flag_or_the_environment(monkeypatch):
    import kfp

    made = []
    monkeypatch.setattr(kfp, "Client", lambda **kwargs: made.append(kwargs))
    monkeypatch.setenv(kfp_client.TOKEN_ENV, "from-env")
    kfp_client.connect("https://kubeflow.example.com/pipeline", "team-a", None)
    kfp_client.connect(None, None, "from-flag")
    assert made[0]["existing_token"] == "from-env" and made[0]["namespace"] == "team-a"
    assert made[1]["existing_token"] == "from-flag" and made[1]["host"] is None


def test_the_runs_service_account_is_the_one_the_manifests_create(kubeflow):
    from cycleqd import cli as core

    service_account = yaml.safe_load(
        (common.MANIFESTS / "base" / "pipeline-serviceaccount.yaml").read_text()
    )
    parser = core.build_parser(extend=cli._add_commands)
    for command in (["submit"], ["schedule", "--cron", "0 0 2 * * *"]):
        args = parser.parse_args([*command, *kubeflow.args])
        assert args.service_account == service_account["metadata"]["name"]


def test_a_dead_endpoint_is_one_message(tmp_path, tiny_world, capsys):
    """The real kfp client, pointed at a port where nothing listens."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    config = tmp_path / "campaign.yaml"
    config.write_text(yaml.safe_dump(default_config(tiny_world)))
    argv = ["submit", "--host", f"http://127.0.0.1:{port}", "--config", str(config)]
    assert cli.main([*argv, "--store", "s3://bucket/c"]) != 0
    err = capsys.readouterr().err
    assert f"cannot reach Kubeflow Pipelines at http://127.0.0.1:{port}" in err
    assert "Traceback" not in err

"""A run's follow-up (`pipelines/continuation.py`) against the kfp client's API, with a
recording stand-in for the client: no Kubeflow Pipelines API server runs on this machine.
What is checked is what a real server would be asked: a recurring run disabled once the
campaign is done, the next one-off run started with the same version, experiment, parameters
and service account, none started without progress, and every failure one message."""

from __future__ import annotations

import cycleqd_tests_deploy_common as common
import pytest
from kfp_server_api import (
    V2beta1ListRunsResponse,
    V2beta1PipelineVersionReference,
    V2beta1Run,
    V2beta1RuntimeConfig,
)
from kfp_server_api.exceptions import ApiException

from cycleqd_kfp.pipelines import continuation

PARAMS = {
    "campaign_config": "s3://bucket/campaigns/tiny/campaign.yaml",
    "campaign_store_uri": "s3://bucket/campaigns/tiny",
    "search_generations": 12,
}


class RecordingKfpClient(common.KfpClientRecorder):
    """The kfp.Client methods a follow-up calls, with a server's runs. Every call is checked
    against kfp.Client's own signature; `fail` makes a method raise instead."""

    def __init__(self, *runs: V2beta1Run) -> None:
        super().__init__()
        self.runs = {run.run_id: run for run in runs}
        self.disabled: list[str] = []

    def get_run(self, run_id):
        if run_id not in self.runs:
            raise ApiException(status=404, reason="Not Found")
        return self.runs[run_id]

    def disable_recurring_run(self, recurring_run_id):
        self.disabled.append(recurring_run_id)
        return {}

    def list_runs(self, page_token="", page_size=10, sort_by="", experiment_id=None, **_):
        mine = [r for r in self.runs.values() if r.experiment_id == experiment_id]
        return V2beta1ListRunsResponse(runs=mine[::-1][:page_size], next_page_token="")

    def run_pipeline(self, experiment_id, job_name, params=None, **kwargs):
        run_id = f"run-{len(self.runs)}"
        self.runs[run_id] = _run(
            run_id,
            display_name=job_name,
            experiment_id=experiment_id,
            params=params,
            pipeline_id=kwargs.get("pipeline_id"),
            version_id=kwargs.get("version_id"),
            service_account=kwargs.get("service_account"),
        )
        return self.runs[run_id]

    def named(self, name: str) -> list[dict]:
        return [kwargs for called, kwargs in self.calls if called == name]


def _run(
    run_id: str,
    *,
    display_name: str = "cycleqd tiny",
    experiment_id: str = "exp-1",
    params: dict | None = None,
    pipeline_id: str | None = "p-0",
    version_id: str | None = "v3",
    service_account: str | None = "cycleqd-pipeline",
    recurring_run_id: str | None = None,
) -> V2beta1Run:
    """A run as the API answers it (the kfp_server_api model)."""
    reference = None
    if version_id:
        reference = V2beta1PipelineVersionReference(
            pipeline_id=pipeline_id, pipeline_version_id=version_id
        )
    return V2beta1Run(
        run_id=run_id,
        display_name=display_name,
        experiment_id=experiment_id,
        pipeline_version_reference=reference,
        runtime_config=V2beta1RuntimeConfig(parameters=dict(PARAMS if params is None else params)),
        service_account=service_account,
        recurring_run_id=recurring_run_id,
    )


def test_a_recurring_run_is_disabled_once_the_campaign_is_done_recorded_no_api_server():
    client = RecordingKfpClient(_run("r-7", recurring_run_id="rr-1"))
    message = continuation.follow_up(
        client, "r-7", campaign_done=True, progressed=True, continue_runs=True
    )
    assert message == "recurring run rr-1 disabled: campaign reached its target"
    assert client.disabled == ["rr-1"]
    assert client.named("run_pipeline") == []


def test_a_recurring_run_not_done_leaves_the_next_to_its_schedule_recorded_no_api_server():
    client = RecordingKfpClient(_run("r-7", recurring_run_id="rr-1"))
    message = continuation.follow_up(
        client, "r-7", campaign_done=False, progressed=True, continue_runs=True
    )
    assert "recurring run rr-1" in message and "schedule starts the next" in message
    assert [name for name, _ in client.calls] == ["get_run"]


def test_a_one_off_run_not_done_starts_the_same_run_again_recorded_no_api_server():
    client = RecordingKfpClient(_run("r-1", display_name="tiny campaign (continued 3)"))
    message = continuation.follow_up(
        client, "r-1", campaign_done=False, progressed=True, continue_runs=True
    )
    (started,) = client.named("run_pipeline")
    assert started == {
        "experiment_id": "exp-1",
        "job_name": "tiny campaign (continued 4)",
        "params": PARAMS,
        "pipeline_id": "p-0",
        "version_id": "v3",
        "pipeline_root": None,
        "enable_caching": False,
        "service_account": "cycleqd-pipeline",
    }
    assert "pipeline_package_path" not in started  # the version, never the package inline
    new_id = next(r for r in client.runs if r != "r-1")
    assert message.startswith(f"run {new_id} ('tiny campaign (continued 4)') started")

    # ... and that run, ending in turn, starts the next.
    continuation.follow_up(client, new_id, campaign_done=False, progressed=True, continue_runs=True)
    assert client.named("run_pipeline")[-1]["job_name"] == "tiny campaign (continued 5)"
    assert client.named("run_pipeline")[-1]["params"] == PARAMS


def test_run_names_count_the_continuations():
    assert continuation.next_run_name("cycleqd") == "cycleqd (continued 1)"
    assert continuation.next_run_name("cycleqd (continued 9)") == "cycleqd (continued 10)"
    assert continuation.next_run_name("a (continued x)") == "a (continued x) (continued 1)"


def test_a_retried_follow_up_starts_no_second_run_recorded_no_api_server():
    client = RecordingKfpClient(_run("r-1"))
    first = continuation.follow_up(client, "r-1", False, True, True)
    second = continuation.follow_up(client, "r-1", False, True, True)
    assert len(client.named("run_pipeline")) == 1
    assert "started" in first and "already" in second and "none started" in second


def test_a_one_off_run_done_starts_nothing_recorded_no_api_server():
    client = RecordingKfpClient(_run("r-1"))
    message = continuation.follow_up(
        client, "r-1", campaign_done=True, progressed=True, continue_runs=True
    )
    assert "campaign reached its target: no further run" in message
    assert client.named("run_pipeline") == [] and client.disabled == []


def test_a_run_without_progress_starts_no_other_recorded_no_api_server():
    client = RecordingKfpClient(_run("r-1"))
    message = continuation.follow_up(
        client, "r-1", campaign_done=False, progressed=False, continue_runs=True
    )
    assert "committed no generation" in message and "no further run" in message
    assert client.calls == []  # nothing to ask: no run could result


def test_continue_runs_off_starts_nothing_recorded_no_api_server():
    client = RecordingKfpClient(_run("r-1"))
    message = continuation.follow_up(
        client, "r-1", campaign_done=False, progressed=True, continue_runs=False
    )
    assert "continue_runs off" in message
    assert client.calls == []


@pytest.mark.parametrize(
    ("method", "error", "expected"),
    [
        ("get_run", ApiException(status=500, reason="Internal Server Error"), "answered 500"),
        ("run_pipeline", ApiException(status=400, reason="Bad Request"), "answered 400"),
        ("get_run", ApiException(status=403, reason="Forbidden"), "access-ml-pipeline"),
        ("list_runs", ConnectionRefusedError(111, "refused"), "cannot reach"),
        ("get_run", ValueError("unexpected answer"), "ValueError: unexpected answer"),
    ],
)
def test_an_api_failure_is_one_message_never_an_exception_recorded_no_api_server(
    method, error, expected
):
    client = RecordingKfpClient(_run("r-1"))
    client.fail[method] = error
    message = continuation.follow_up(
        client, "r-1", campaign_done=False, progressed=True, continue_runs=True
    )
    assert message.startswith("follow-up failed: ") and expected in message
    assert "Traceback" not in message


def test_a_disable_that_fails_is_one_message_recorded_no_api_server():
    client = RecordingKfpClient(_run("r-7", recurring_run_id="rr-1"))
    client.fail["disable_recurring_run"] = ApiException(status=403, reason="Forbidden")
    message = continuation.follow_up(client, "r-7", True, True, True)
    assert message.startswith("follow-up failed: ") and "kubeflow-pipelines-edit" in message


def test_a_run_sent_as_a_package_cannot_be_continued_recorded_no_api_server():
    client = RecordingKfpClient(_run("r-1", version_id=None))
    message = continuation.follow_up(client, "r-1", False, True, True)
    assert message.startswith("follow-up failed: ") and "no pipeline version" in message
    assert client.named("run_pipeline") == []


def test_in_cluster_client_names_the_host_and_hands_over_the_token(monkeypatch, tmp_path):
    import kfp

    made = []
    monkeypatch.setattr(kfp, "Client", lambda **kwargs: made.append(kwargs))
    monkeypatch.delenv("KF_PIPELINES_TOKEN", raising=False)
    monkeypatch.delenv(continuation.ENDPOINT_ENV, raising=False)
    token = tmp_path / "token"
    token.write_text("projected-sa-token\n")
    monkeypatch.setenv(continuation.SA_TOKEN_PATH_ENV, str(token))
    continuation.in_cluster_client()
    monkeypatch.setenv(continuation.ENDPOINT_ENV, "http://ml-pipeline.kf.svc:8888")
    monkeypatch.setenv(continuation.SA_TOKEN_PATH_ENV, str(tmp_path / "absent"))
    continuation.in_cluster_client()
    assert made[0]["host"] == "http://ml-pipeline.kubeflow.svc.cluster.local:8888"
    assert made[0]["existing_token"] == "projected-sa-token"
    assert made[1]["host"] == "http://ml-pipeline.kf.svc:8888"
    assert made[1]["existing_token"] is None  # single-user KFP: no token to send


def test_a_client_that_cannot_be_made_is_a_failed_follow_up(monkeypatch):
    """The real kfp client, pointed at a port where nothing listens: made inside the
    follow-up, its failure is the follow-up's message."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    monkeypatch.setenv(continuation.ENDPOINT_ENV, f"http://127.0.0.1:{port}")
    monkeypatch.setenv(continuation.SA_TOKEN_PATH_ENV, "/nonexistent/token")
    message = continuation.follow_up(
        continuation.in_cluster_client, "r-1", True, True, continue_runs=True
    )
    assert message.startswith("follow-up failed: cannot reach Kubeflow Pipelines")
    assert f"127.0.0.1:{port}" in message

"""manifests/examples: the recurring run (cron, max concurrency 1, no catch-up, the pipeline's
service account) is what the kfp client is asked for, with the compiled pipeline's parameters."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import cycleqd_tests_deploy_common as common
import pytest
import yaml

EXAMPLES = common.MANIFESTS / "examples"
SPEC = EXAMPLES / "recurring-run.yaml"


@pytest.fixture(scope="module")
def rr():
    return common.load_module("cycleqd_tests_recurring_run", EXAMPLES / "recurring_run.py")


@pytest.fixture()
def package(tmp_path):
    """A stand-in compiled pipeline (the script only passes its path on)."""
    path = tmp_path / "pipeline.yaml"
    path.write_text("pipelineInfo: {name: cycleqd}\n")
    return path


def _spec_with(tmp_path, package, **changes):
    spec = yaml.safe_load(SPEC.read_text())
    spec["pipeline_package"] = str(package)
    spec["parameter_files"] = {"campaign_config": str(EXAMPLES / "campaign.example.yaml")}
    spec.update(changes)
    path = tmp_path / "recurring-run.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_the_example_schedules_one_run_at_a_time_without_catch_up(rr):
    spec = rr.load_spec(SPEC)
    assert spec["max_concurrency"] == 1
    assert spec["no_catchup"] is True
    assert spec["enable_caching"] is False
    assert rr.check_cron(spec["cron"]) and len(spec["cron"].split()) == 6
    service_account = yaml.safe_load(
        (common.MANIFESTS / "base" / "pipeline-serviceaccount.yaml").read_text()
    )
    assert spec["service_account"] == service_account["metadata"]["name"]


def test_the_parameters_are_the_compiled_pipelines(rr):
    spec = rr.load_spec(SPEC)
    package = (SPEC.parent / spec["pipeline_package"]).resolve()
    if not package.is_file():
        pytest.skip(f"{package} is not compiled yet (`cycleqd compile`)")
    compiled = next(d for d in yaml.safe_load_all(package.read_text()) if d and "root" in d)
    declared = compiled["root"]["inputDefinitions"]["parameters"]
    given = set(spec["parameters"]) | set(spec["parameter_files"])
    assert given <= set(declared), f"unknown pipeline parameters: {given - set(declared)}"
    required = {n for n, p in declared.items() if not p.get("isOptional")}
    assert required <= given, f"the recurring run must set {required - given}"


def test_the_example_campaign_is_a_valid_config():
    from cycleqd.config import parse_config

    config = parse_config(yaml.safe_load((EXAMPLES / "campaign.example.yaml").read_text()))
    assert config.name == "my-campaign"


@pytest.mark.parametrize(
    ("cron", "message"),
    [
        ("0 2 * * *", "5 fields"),
        ("* 0 2 * * *", "second"),
        ("0 0 2 * *  * *", "6 fields"),
        ("0 0 2 * * $", "invalid field"),
    ],
)
def test_cron_mistakes_are_refused(rr, cron, message):
    with pytest.raises(rr.SpecError, match=message):
        rr.check_cron(cron)


def test_cron_forms_kfp_accepts(rr):
    for cron in ("0 0 2 * * *", "0 */30 * * * *", "0 0 3 * * MON-FRI", "30 15 1,13 * * ?"):
        assert rr.check_cron(cron) == cron


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"max_concurrency": 2}, "max_concurrency must be 1"),
        ({"no_catchup": "yes"}, "true or false"),
        ({"schedule": "daily"}, "unknown field"),
        ({"service_account": ""}, "missing service_account"),
        ({"parameters": {"campaign_config": "x"}}, "both set"),
    ],
)
def test_spec_mistakes_are_refused(rr, tmp_path, package, changes, message):
    with pytest.raises(rr.SpecError, match=message):
        rr.load_spec(_spec_with(tmp_path, package, **changes))


class FakeClient:
    """Records the kfp.Client calls the script makes."""

    def __init__(self, existing=()):
        self.calls = []
        self.pages = [
            SimpleNamespace(
                recurring_runs=[
                    SimpleNamespace(display_name=name, recurring_run_id=f"id-{name}-{i}")
                    for i, name in enumerate(existing)
                ],
                next_page_token="",
            )
        ]

    def create_experiment(self, name, namespace=None):
        self.calls.append(("create_experiment", name, namespace))
        return SimpleNamespace(experiment_id="exp-1")

    def list_recurring_runs(self, **kwargs):
        self.calls.append(("list_recurring_runs", kwargs))
        return self.pages.pop(0)

    def delete_recurring_run(self, recurring_run_id):
        self.calls.append(("delete_recurring_run", recurring_run_id))

    def create_recurring_run(self, **kwargs):
        self.calls.append(("create_recurring_run", kwargs))
        return SimpleNamespace(recurring_run_id="rr-1")


def test_create_sends_the_schedule_and_the_package(rr, tmp_path, package):
    path = _spec_with(tmp_path, package, namespace="team-a")
    spec = rr.load_spec(path)
    client = FakeClient()
    run = rr.create(client, spec, path.parent)
    assert run.recurring_run_id == "rr-1"
    assert client.calls[0] == ("create_experiment", "cycleqd", "team-a")
    (_, kwargs) = client.calls[-1]
    assert kwargs["experiment_id"] == "exp-1"
    assert kwargs["cron_expression"] == spec["cron"]
    assert kwargs["max_concurrency"] == 1 and kwargs["no_catchup"] is True
    assert kwargs["service_account"] == "cycleqd-pipeline"
    assert kwargs["enable_caching"] is False
    assert kwargs["pipeline_package_path"] == str(package)
    assert kwargs["params"]["campaign_config"].startswith("# An example campaign")
    assert kwargs["params"]["campaign_store_uri"].startswith("s3://")


def test_an_existing_run_is_kept_unless_replaced(rr, tmp_path, package):
    path = _spec_with(tmp_path, package)
    spec = rr.load_spec(path)
    assert spec["namespace"] is None  # standalone KFP takes no namespace
    with pytest.raises(rr.SpecError, match="--replace"):
        rr.create(FakeClient(existing=[spec["name"]]), spec, path.parent)
    client = FakeClient(existing=[spec["name"], "other"])
    rr.create(client, spec, path.parent, replace=True)
    assert ("delete_recurring_run", f"id-{spec['name']}-0") in client.calls
    assert not [c for c in client.calls if c[0] == "delete_recurring_run" and "other" in c[1]]


def test_a_missing_package_says_to_compile(rr, tmp_path, package):
    path = _spec_with(tmp_path, package, pipeline_package=str(tmp_path / "nope.yaml"))
    with pytest.raises(rr.SpecError, match="cycleqd compile"):
        rr.recurring_run_arguments(rr.load_spec(path), path.parent)


def test_the_arguments_fit_the_kfp_client(rr, tmp_path, package):
    kfp = pytest.importorskip("kfp", reason="kfp is not installed")
    import inspect

    path = _spec_with(tmp_path, package)
    arguments = rr.recurring_run_arguments(rr.load_spec(path), path.parent)
    inspect.signature(kfp.Client.create_recurring_run).bind(None, experiment_id="x", **arguments)
    inspect.signature(kfp.Client.list_recurring_runs).bind(
        None, experiment_id="x", namespace=None, page_size=100, page_token=""
    )


def test_dry_run_prints_the_request(tmp_path, package):
    path = _spec_with(tmp_path, package)
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "recurring_run.py"), "--spec", str(path), "--dry-run"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    printed = yaml.safe_load(proc.stdout)
    assert printed["max_concurrency"] == 1 and printed["no_catchup"] is True
    assert printed["params"]["campaign_config"].endswith("characters>")

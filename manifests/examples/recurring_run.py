"""Create the CycleQD recurring run that recurring-run.yaml describes, with the kfp client.

    python manifests/examples/recurring_run.py --host http://localhost:8080
    python manifests/examples/recurring_run.py --host ... --replace   # delete a run of the same
                                                                    # name in the experiment first
    python manifests/examples/recurring_run.py --dry-run              # print what would be sent

`--host`: the KFP API (standalone KFP on kind: `kubectl -n kubeflow port-forward
svc/ml-pipeline-ui 8080:80`). In multi-user Kubeflow pass a token with `--token` (or the
environment variable KFP_TOKEN); see the kfp client's authentication docs for cookie-based
setups.

What it sends: `kfp.Client.create_recurring_run` with a cron schedule (KFP's six-field cron,
seconds first), max_concurrency 1, no_catchup true, caching off, the pipeline's service account,
and the compiled pipeline package; each run continues the campaign in its store. Needs `kfp`
(2.17) and PyYAML; nothing else of this repository.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Any

import yaml

SPEC = Path(__file__).resolve().with_name("recurring-run.yaml")
TOKEN_ENV = "KFP_TOKEN"

REQUIRED = ("name", "experiment", "pipeline_package", "cron", "service_account")
OPTIONAL = (
    "namespace",
    "description",
    "max_concurrency",
    "no_catchup",
    "enabled",
    "enable_caching",
    "parameters",
    "parameter_files",
)
# One cron field: numbers, names (JAN, MON), ranges, steps, lists, `*` and `?`.
_ITEM = r"(\*|\?|[0-9A-Za-z]+(-[0-9A-Za-z]+)?)(/[0-9]+)?"
_FIELD_RE = re.compile(rf"^{_ITEM}(,{_ITEM})*$")
_SECONDS_RE = re.compile(r"^([0-9]|[1-5][0-9])(,([0-9]|[1-5][0-9]))*$|^\*/[1-9][0-9]?$")


class SpecError(ValueError):
    """recurring-run.yaml is invalid; the message says what to fix."""


def check_cron(expr: str) -> str:
    """KFP schedules with a six-field cron, seconds first (`0 0 2 * * *`: daily at 02:00:00).
    A five-field crontab line would silently shift every field by one: refuse it."""
    if not isinstance(expr, str):
        raise SpecError(f"cron: expected a string, got {expr!r}")
    fields = expr.split()
    if len(fields) == 5:
        raise SpecError(f"cron {expr!r} has 5 fields; KFP's cron has 6, seconds first: '0 {expr}'")
    if len(fields) != 6:
        raise SpecError(
            f"cron {expr!r}: KFP's cron has 6 fields (second minute hour day month weekday)"
        )
    bad = [f for f in fields if not _FIELD_RE.match(f)]
    if bad:
        raise SpecError(f"cron {expr!r}: invalid field(s) {bad}")
    if not _SECONDS_RE.match(fields[0]):
        raise SpecError(
            f"cron {expr!r}: the first field is the second (0-59); '{fields[0]}' would fire "
            "many times a minute"
        )
    return expr


def load_spec(path: str | Path = SPEC) -> dict[str, Any]:
    """The recurring run's description, validated."""
    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise SpecError(f"cannot read {path}: {exc.strerror}") from None
    if not isinstance(spec, dict):
        raise SpecError(f"{path}: expected a mapping")
    missing = [k for k in REQUIRED if not spec.get(k)]
    if missing:
        raise SpecError(f"{path}: missing {', '.join(missing)}")
    unknown = sorted(set(spec) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        raise SpecError(f"{path}: unknown field(s) {unknown}; allowed: {REQUIRED + OPTIONAL}")
    check_cron(spec["cron"])
    spec.setdefault("max_concurrency", 1)
    spec.setdefault("no_catchup", True)
    spec.setdefault("enabled", True)
    spec.setdefault("enable_caching", False)
    spec["namespace"] = spec.get("namespace") or None  # None: single-user (standalone) KFP
    if spec["max_concurrency"] != 1:
        raise SpecError(
            "max_concurrency must be 1: a campaign admits one writer, a second concurrent run "
            "would only wait for the lease and fail"
        )
    for key in ("no_catchup", "enabled", "enable_caching"):
        if not isinstance(spec[key], bool):
            raise SpecError(f"{key}: expected true or false, got {spec[key]!r}")
    for key in ("parameters", "parameter_files"):
        value = spec.get(key) or {}
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise SpecError(f"{key}: expected a mapping of parameter names")
        spec[key] = value
    both = sorted(set(spec["parameters"]) & set(spec["parameter_files"]))
    if both:
        raise SpecError(f"parameters and parameter_files both set {both}")
    return spec


def recurring_run_arguments(spec: dict[str, Any], base_dir: str | Path) -> dict[str, Any]:
    """Keyword arguments of `kfp.Client.create_recurring_run` (all but experiment_id)."""
    base_dir = Path(base_dir)
    package = (base_dir / spec["pipeline_package"]).resolve()
    if not package.is_file():
        raise SpecError(
            f"pipeline_package {package} does not exist: compile the pipeline first "
            "(`cycleqd compile`)"
        )
    params = {k: v for k, v in spec["parameters"].items()}
    for name, relative in spec["parameter_files"].items():
        path = (base_dir / relative).resolve()
        try:
            params[name] = path.read_text()
        except OSError as exc:
            raise SpecError(f"parameter_files.{name}: cannot read {path}: {exc.strerror}") from None
    return {
        "job_name": spec["name"],
        "description": spec.get("description"),
        "cron_expression": spec["cron"],
        "max_concurrency": spec["max_concurrency"],
        "no_catchup": spec["no_catchup"],
        "enabled": spec["enabled"],
        "enable_caching": spec["enable_caching"],
        "service_account": spec["service_account"],
        "pipeline_package_path": str(package),
        "params": params,
    }


def _existing(client: Any, experiment_id: str, namespace: str | None, name: str) -> list[str]:
    ids, token = [], ""
    while True:
        page = client.list_recurring_runs(
            experiment_id=experiment_id, namespace=namespace, page_size=100, page_token=token
        )
        for run in page.recurring_runs or []:
            if run.display_name == name:
                ids.append(run.recurring_run_id)
        token = page.next_page_token
        if not token:
            return ids


def create(client: Any, spec: dict[str, Any], base_dir: str | Path, *, replace: bool = False):
    """Create the recurring run through `client` (a kfp.Client); returns what KFP returned."""
    arguments = recurring_run_arguments(spec, base_dir)
    experiment = client.create_experiment(spec["experiment"], namespace=spec["namespace"])
    existing = _existing(client, experiment.experiment_id, spec["namespace"], spec["name"])
    if existing and not replace:
        raise SpecError(
            f"a recurring run named {spec['name']!r} already exists in experiment "
            f"{spec['experiment']!r} ({', '.join(existing)}); pass --replace to recreate it"
        )
    for recurring_run_id in existing:
        client.delete_recurring_run(recurring_run_id)
    return client.create_recurring_run(experiment_id=experiment.experiment_id, **arguments)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", default=str(SPEC), help="the recurring run's YAML description")
    parser.add_argument("--host", help="the KFP API endpoint, e.g. http://localhost:8080")
    parser.add_argument("--namespace", help="override the spec's namespace")
    parser.add_argument("--token", help=f"bearer token (default: ${TOKEN_ENV})")
    parser.add_argument("--replace", action="store_true", help="delete a run of the same name")
    parser.add_argument("--dry-run", action="store_true", help="print the request, send nothing")
    args = parser.parse_args(argv)
    try:
        spec = load_spec(args.spec)
        if args.namespace:
            spec["namespace"] = args.namespace
        base_dir = Path(args.spec).resolve().parent
        if args.dry_run:
            arguments = recurring_run_arguments(spec, base_dir)
            arguments["params"] = {
                k: (v if len(str(v)) <= 80 else f"<{len(str(v))} characters>")
                for k, v in arguments["params"].items()
            }
            print(
                yaml.safe_dump(
                    {"experiment": spec["experiment"], "namespace": spec["namespace"], **arguments},
                    sort_keys=False,
                )
            )
            return 0
        if not args.host:
            parser.error("--host is required (or use --dry-run)")
        import kfp

        client = kfp.Client(
            host=args.host,
            namespace=spec["namespace"],
            existing_token=args.token or os.environ.get(TOKEN_ENV) or None,
        )
        run = create(client, spec, base_dir, replace=args.replace)
    except SpecError as exc:
        print(f"recurring_run.py: {exc}", file=sys.stderr)
        return 1
    print(f"created recurring run {run.recurring_run_id} ({spec['name']}, cron {spec['cron']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

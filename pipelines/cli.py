"""`cycleqd` with the Kubeflow commands: run (through kfp.local by default), compile, submit,
schedule. The core commands come from `cycleqd.cli`; this module only adds the wiring."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import threading
import time
from pathlib import Path

from cycleqd import cli as core
from cycleqd.errors import CycleQDError
from cycleqd.redact import redact_uri


def _options(args: argparse.Namespace):
    from cycleqd_kfp.pipelines.cycleqd_pipeline import PipelineOptions

    return PipelineOptions(
        generations_per_run=args.generations_per_run,
        parallelism=args.parallelism,
        s3_secret=args.s3_secret,
        models_pvc=args.models_pvc,
        models_mount_path=args.models_mount_path,
        model_cache_size=args.model_cache_size,
        kfp_ui_url=args.kfp_ui_url,
        warm_evaluators=getattr(args, "warm_evaluators", 0),
    )


def _run(args: argparse.Namespace) -> int:
    if args.engine == "in-process":
        return core._run(args)
    return _run_local(args)


def _run_local(args: argparse.Namespace) -> int:
    """The whole pipeline through kfp.local on this machine: every stage a subprocess, the
    generations unrolled as in the cluster, state in the campaign store."""
    from kfp import local

    from cycleqd import steps
    from cycleqd.campaign import Campaign
    from cycleqd.evaluation_service import evaluation_service
    from cycleqd.evaluators import build_evaluator
    from cycleqd.experts import THREADS_ENV
    from cycleqd.state import DRIVER_PID_ENV, CampaignStore
    from cycleqd_kfp.pipelines.cycleqd_pipeline import PipelineOptions, build_pipeline

    workdir = Path(args.workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    config = core.prepare_config(args)
    warm = args.warm_evaluators
    if warm:
        from cycleqd.evaluator_pool import require_skills_scorer

        require_skills_scorer(config, "--warm-evaluators", "leave the flag out")
    store_uri = args.store or str(workdir / "campaign")
    tracking_uri = "" if args.no_tracking else (args.tracking_uri or core.local_mlflow_uri(workdir))
    # The pipeline's preflight, here first: a mistake is one message, not a task's traceback
    # in kfp.local's log, and nothing (no expert) is trained or written.
    steps.preflight(config.to_yaml(), store_uri, tracking_uri)
    latest = CampaignStore(store_uri).latest_generation()
    remaining = max(config.generations - max(latest or 0, 0), 0)
    if latest is not None:
        print(f"resuming campaign {config.name!r} after generation {latest}")
    elif config.models.trained():
        print(
            f"experts stage: fine-tuning {', '.join(config.models.trained())} from the base "
            "(published experts are reused)",
            flush=True,
        )
    print(
        f"running {remaining} generation(s) through kfp.local (each stage a subprocess) ...",
        flush=True,
    )
    os.environ[DRIVER_PID_ENV] = str(os.getpid())  # a killed run's lease dies with it
    started = time.perf_counter()
    local.init(
        runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(workdir / "kfp-local")
    )
    # No model cache volume: kfp.local would point the tasks at the pods' cache path; here
    # s3:// models are copied into this user's cache (cycleqd.model_sources.cache_root).
    # Experts side by side, one process per core with one torch thread each.
    cores = os.cpu_count() or 1
    side_by_side = max(1, min(cores, len(config.models.trained())))
    os.environ.setdefault(THREADS_ENV, str(max(1, cores // side_by_side)))
    options = PipelineOptions(
        generations_per_run=remaining,
        parallelism=1,
        finetune_parallelism=side_by_side,
        model_cache_size="",
        warm_evaluators=warm,
        evaluator_launcher="local",
    )
    pipeline = build_pipeline(options)
    log_path = workdir / "kfp-local.log"
    print(f"task logs: {log_path}", flush=True)
    if warm:
        from cycleqd.evaluator_launch.local import LOGS_ENV

        os.environ[LOGS_ENV] = str(workdir / "evaluators")
        print(f"{warm} warm evaluator(s), local processes; logs: {workdir / 'evaluators'}")
    with contextlib.ExitStack() as stack:
        if not args.evaluator_per_task:  # model loaded once, not once per evaluation task
            # With warm evaluators the server only relays MLflow events: it loads no model.
            stack.enter_context(
                evaluation_service(
                    workdir / "evaluation-server.log",
                    warm_config=None if warm else config.to_yaml(),
                )
            )
        stack.enter_context(_progress(CampaignStore(store_uri), config))
        stack.enter_context(_output_to(log_path))
        pipeline(
            campaign_config=config.to_yaml(),
            campaign_store_uri=store_uri,
            tracking_uri=tracking_uri,
        )
    elapsed = time.perf_counter() - started

    store = CampaignStore(store_uri)
    with Campaign(config, store, build_evaluator(config)) as campaign:
        final_id, final_scores = campaign.finalize()
        print(
            f"\ncampaign {config.name!r}: {campaign.generation} generations "
            f"({campaign.generation - max(latest or 0, 0)} this run, {elapsed:.1f} s)"
        )
        core.print_summary(campaign, final_id, final_scores)
        core.save_elite_maps(campaign, workdir)
    print(f"final model: {store.model_uri(final_id, 'exports')}")
    if tracking_uri:
        print(f"MLflow: {redact_uri(tracking_uri)}")
    return 0


@contextlib.contextmanager
def _output_to(path: Path):
    """Send this process's and its subprocesses' output (kfp.local's task logs) to a file."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with path.open("a") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


@contextlib.contextmanager
def _progress(store, config):
    """Print each generation as the pipeline commits it (read from the store)."""
    terminal = os.fdopen(os.dup(1), "w", buffering=1)
    done = threading.Event()
    last = store.latest_generation()

    def report(generation: int) -> None:
        snapshot = store.read_snapshot(generation)
        children = [g for g in snapshot["genomes"] if g.get("generation") == generation]
        best = "  ".join(
            f"{skill} best {max((e['quality'] for e in cells), default=0):.3f}"
            for skill, cells in snapshot["archives"].items()
        )
        fill = sum(len(cells) for cells in snapshot["archives"].values())
        terminal.write(
            f"gen {generation:4d}/{config.generations}  {len(children)} child(ren)  "
            f"{fill} elites  {best}\n"
        )

    experts = {skill: False for skill in config.models.trained()}

    def report_experts() -> None:
        from cycleqd.finetune.expert import published_expert

        for skill, seen in experts.items():
            expert = None if seen else published_expert(store.store, store.expert_prefix(skill))
            if expert is not None:
                experts[skill] = True
                manifest = expert.manifest
                steps = (manifest.get("training") or {}).get("steps", "?")
                terminal.write(
                    f"expert {skill}: published ({manifest.get('method', '?')}, {steps} steps, "
                    f"sha256 {str(manifest.get('sha256', ''))[:12]})\n"
                )

    def catch_up() -> None:
        nonlocal last
        try:
            report_experts()
            latest = store.latest_generation()
            while latest is not None and (last is None or latest > last):
                last = 0 if last is None else last + 1
                report(last)
        except CycleQDError:
            pass  # a snapshot being written: the next look will see it

    def watch() -> None:
        while not done.wait(1.0):
            catch_up()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        catch_up()
        terminal.close()


def _compile(args: argparse.Namespace) -> int:
    from cycleqd_kfp.pipelines.cycleqd_pipeline import compile_pipeline

    path = compile_pipeline(args.output, _options(args))
    print(f"compiled {path}")
    return 0


# Config URIs a run's pods can read themselves; any other location is this machine's.
SHARED_CONFIG_SCHEMES = ("s3", "http", "https")


def _arguments(args: argparse.Namespace) -> dict[str, str | int]:
    from urllib.parse import urlparse

    from cycleqd.config import config_location, load_config_text

    generations = getattr(args, "search_generations", 0)
    config = load_config_text(args.config, generations)  # fail here, not in the cluster
    location = config_location(args.config)
    # A shared config file goes by reference (every run, each firing of a schedule, reads
    # it); a file of this machine goes inline.
    shared = location is not None and urlparse(location).scheme in SHARED_CONFIG_SCHEMES
    return {
        "campaign_config": location if shared else config.to_yaml(),
        "campaign_store_uri": args.store,
        "tracking_uri": args.tracking_uri or "",
        "search_generations": generations,
        "continue_until_done": bool(getattr(args, "continue_until_done", False)),
    }


def _package(args: argparse.Namespace, folder: Path) -> str:
    """The pipeline compiled with these options, in `folder`."""
    from cycleqd_kfp.pipelines.cycleqd_pipeline import compile_pipeline

    return str(compile_pipeline(folder / "cycleqd_pipeline.yaml", _options(args)))


def _pipeline_version(args: argparse.Namespace):
    """Connect, and the version of the pipeline compiled with these options (uploaded once)."""
    import tempfile

    from cycleqd_kfp.pipelines import kfp_client

    with tempfile.TemporaryDirectory() as tmp, kfp_client.reported(args.host):
        client = kfp_client.connect(args.host, args.namespace, args.token)
        package = _package(args, Path(tmp))
        version = kfp_client.pipeline_version(client, package, args.namespace)
    state = "uploaded" if version.uploaded else "already there"
    print(f"pipeline version {version.name} ({state})")
    return client, version


def _submit(args: argparse.Namespace) -> int:
    from cycleqd_kfp.pipelines import kfp_client

    arguments = _arguments(args)
    client, version = _pipeline_version(args)
    with kfp_client.reported(args.host):
        run_id = kfp_client.submit(
            client,
            version,
            arguments,
            experiment=args.experiment,
            run_name=args.run_name,
            service_account=args.service_account,
            namespace=args.namespace,
        )
    print(f"submitted run {run_id}")
    return 0


def _schedule(args: argparse.Namespace) -> int:
    """A recurring run: each firing continues the campaign; max concurrency 1, no catch-up,
    so a firing never overlaps the previous run (the campaign's lease refuses it anyway)."""
    from cycleqd_kfp.pipelines import kfp_client

    kfp_client.check_cron(args.cron)  # before anything is uploaded
    arguments = _arguments(args)
    client, version = _pipeline_version(args)
    with kfp_client.reported(args.host):
        job_id, replaced = kfp_client.schedule(
            client,
            version,
            arguments,
            experiment=args.experiment,
            name=args.run_name,
            cron=args.cron,
            service_account=args.service_account,
            namespace=args.namespace,
        )
    note = f", replacing {', '.join(replaced)}" if replaced else ""
    print(f"scheduled recurring run {job_id} ({args.cron}){note}")
    return 0


def _add_commands(sub) -> None:
    run = sub.choices["run"]
    run.add_argument(
        "--engine",
        choices=["kfp-local", "in-process"],
        default="kfp-local",
        help="kfp-local: the pipeline through kfp.local (default); in-process: one Python loop",
    )
    run.add_argument(
        "--evaluator-per-task",
        action="store_true",
        help="kfp-local: every evaluation task loads its own model, as pods do on a cluster "
        "(default: one warm evaluation server serves them all)",
    )
    run.add_argument(
        "--warm-evaluators",
        type=int,
        default=0,
        metavar="N",
        help="kfp-local: N warm evaluators as local processes (the vLLM server API a "
        "cluster run uses), children dealt among them; default 0: one evaluation server",
    )
    run.set_defaults(handler=_run)

    def pipeline_options(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--generations-per-run",
            type=int,
            default=4,
            help="generation sub-pipelines unrolled per run",
        )
        parser.add_argument(
            "--parallelism", type=int, default=4, help="children evaluated at once (GPUs)"
        )
        parser.add_argument(
            "--s3-secret", default="cycleqd-s3", help="Kubernetes secret with the S3 credentials"
        )
        parser.add_argument(
            "--models-pvc",
            default="",
            help="PersistentVolumeClaim holding the base and experts, mounted into the tasks "
            "that read weights (preflight, seed, evaluate, export); the config names them by "
            "path under --models-mount-path. Default: none (models on s3://)",
        )
        parser.add_argument(
            "--models-mount-path",
            default="/models",
            help="where --models-pvc is mounted (default /models)",
        )
        parser.add_argument(
            "--model-cache-size",
            default="100Gi",
            help="emptyDir for each pod's copies of s3:// models (seed, evaluate, export); "
            "'' for none (default 100Gi)",
        )
        parser.add_argument(
            "--warm-evaluators",
            type=int,
            default=0,
            metavar="N",
            help="start N warm evaluators per run (vllm serve pods, a GPU each) that score "
            "every generation's children with in-place weight swaps; evaluation tasks then "
            "run on the CPU (default 0: an engine per evaluation task)",
        )
        parser.add_argument(
            "--kfp-ui-url",
            default="",
            help="the Kubeflow UI's address (e.g. https://kubeflow.example.com/pipeline): "
            "MLflow runs link to their Kubeflow run's page (default: no link)",
        )

    compile_ = sub.add_parser("compile", help="compile the Kubeflow pipeline to YAML")
    compile_.add_argument("--output", default="pipelines/cycleqd_pipeline.yaml")
    pipeline_options(compile_)
    compile_.set_defaults(handler=_compile)

    for name, handler, text in (
        ("submit", _submit, "start one run on a KFP cluster"),
        ("schedule", _schedule, "create a recurring run"),
    ):
        parser = sub.add_parser(name, help=text)
        parser.add_argument(
            "--host",
            default=None,
            help="KFP API endpoint (default: the kfp client's in-cluster address, with the "
            "pod's service-account token)",
        )
        parser.add_argument(
            "--namespace",
            default=None,
            help="your profile namespace in a multi-user Kubeflow (default: kubeflow)",
        )
        parser.add_argument(
            "--token", default=None, help="bearer token (default: $KF_PIPELINES_TOKEN)"
        )
        parser.add_argument(
            "--config",
            required=True,
            help="campaign config: a file here (sent inline), or the s3:// or https:// URI "
            "of one (sent as it is: every run reads it)",
        )
        parser.add_argument(
            "--search-generations",
            type=int,
            default=0,
            help="generations to reach (default 0: the config's `generations`)",
        )
        parser.add_argument("--store", required=True, help="campaign store: s3://bucket/prefix")
        parser.add_argument("--tracking-uri", default="", help="MLflow tracking URI")
        parser.add_argument("--experiment", default="cycleqd")
        parser.add_argument("--run-name", default="cycleqd")
        parser.add_argument(
            "--service-account",
            default="cycleqd-pipeline",
            help="the runs' service account (manifests/ creates it)",
        )
        pipeline_options(parser)
        if name == "submit":
            parser.add_argument(
                "--continue-until-done",
                action="store_true",
                help="when the run ends before the campaign's target, its exit handler starts "
                "the next run (same version and parameters), until the target",
            )
        if name == "schedule":
            parser.add_argument(
                "--cron",
                required=True,
                help="KFP's six-field cron, seconds first (daily at 02:00: '0 0 2 * * *'); a "
                "recurring run of the same --run-name is replaced",
            )
        parser.set_defaults(handler=handler)


def main(argv: list[str] | None = None) -> int:
    try:
        return core.main(argv, extend=_add_commands)
    except CycleQDError as exc:  # pragma: no cover - core.main already reports these
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

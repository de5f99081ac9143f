"""The compiled pipeline: committed and current, loadable, GPU and secrets where they belong,
and runnable end to end on the CPU through kfp.local."""

from __future__ import annotations

import yaml

from cycleqd_kfp.pipelines.cycleqd_pipeline import (
    COMPILED,
    S3_ENV,
    PipelineOptions,
    compile_pipeline,
)


def _documents(path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_committed_yaml_matches_the_source(tmp_path):
    fresh = compile_pipeline(tmp_path / "fresh.yaml")
    assert fresh.read_text() == COMPILED.read_text(), (
        "pipelines/cycleqd_pipeline.yaml is stale: run `cycleqd compile` and commit it"
    )


def test_compiled_yaml_loads_back_with_documented_parameters():
    from kfp import components

    loaded = components.load_component_from_file(str(COMPILED))
    assert set(loaded.component_spec.inputs) == {
        "campaign_config",
        "campaign_store_uri",
        "tracking_uri",
        "search_generations",
        "continue_until_done",
    }
    # What the Kubeflow UI shows beside each parameter when a run is created (the loader
    # above does not read descriptions back: the compiled spec's root holds them).
    spec, _ = _documents(COMPILED)
    parameters = spec["root"]["inputDefinitions"]["parameters"]
    assert set(parameters) == set(loaded.component_spec.inputs)
    assert all(p["description"].strip() for p in parameters.values())
    # A run started from the UI with the required fields only: the rest have defaults.
    required = {name for name, p in parameters.items() if not p.get("isOptional")}
    assert required == {"campaign_config", "campaign_store_uri"}
    assert parameters["search_generations"]["parameterType"] == "NUMBER_INTEGER"
    assert parameters["search_generations"]["defaultValue"] == 0


def test_generations_to_reach_reach_every_task_that_reads_the_target():
    spec, _ = _documents(COMPILED)
    fed = {
        _task(f"exec-{task}")
        for component in spec["components"].values()
        for task, wiring in component.get("dag", {}).get("tasks", {}).items()
        if "search_generations" in wiring.get("inputs", {}).get("parameters", {})
    }
    assert {"preflight", "seed", "breed", "commit", "export"} <= fed


def _executor(spec: dict, task: str) -> dict:
    executor = spec["deploymentSpec"]["executors"][f"exec-{task}"]["container"]
    return executor


def test_evaluation_runs_on_a_gpu_with_shared_memory_and_tolerations():
    spec, platform = _documents(COMPILED)
    container = _executor(spec, "evaluate")
    assert container["resources"]["accelerator"]["resourceType"] == "nvidia.com/gpu"
    assert container["resources"]["accelerator"]["resourceCount"] == "1"
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-evaluate"]
    assert k8s["emptyDirMounts"][0]["mountPath"] == "/dev/shm"
    assert k8s["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert "evaluator" in container["image"]


def test_experts_are_fine_tuned_on_the_trainer_image_with_a_gpu_before_seeding():
    spec, platform = _documents(COMPILED)
    container = _executor(spec, "finetune")
    assert "cycleqd-trainer" in container["image"]
    assert container["resources"]["accelerator"]["resourceType"] == "nvidia.com/gpu"
    assert container["resources"]["accelerator"]["resourceCount"] == "1"
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-finetune"]
    assert k8s["tolerations"][0]["key"] == "nvidia.com/gpu"
    dag = spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]
    (name,) = [n for n, t in dag.items() if "preflight" in str(t.get("parameterIterator"))]
    loop = dag[name]
    # One fine-tuning task per skill that preflight lists, then the seed.
    assert loop["dependentTasks"] == ["preflight"]
    items = loop["parameterIterator"]["items"]["inputParameter"]
    assert items == "pipelinechannel--preflight-Output"
    assert dag["cycleqd-seed"]["dependentTasks"] == [name]
    body = spec["components"][loop["componentRef"]["name"]]["dag"]["tasks"]["finetune"]
    assert body["retryPolicy"]["maxRetryCount"] == PipelineOptions().finetune_retries


def test_credentials_come_from_a_kubernetes_secret_never_the_yaml():
    _, platform = _documents(COMPILED)
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for name in (
        "exec-breed",
        "exec-evaluate",
        "exec-commit",
        "exec-seed",
        "exec-export",
        "exec-preflight",
        "exec-finetune",
        "exec-release",
        "exec-plan",
    ):
        (secret,) = [
            s
            for s in executors[name]["secretAsEnv"]
            if s["secretNameParameter"]["runtimeValue"]["constant"] == "cycleqd-s3"
        ]
        assert {m["envVar"] for m in secret["keyToEnv"]} == set(S3_ENV)
    text = COMPILED.read_text()
    for leaked in ("aws_secret_access_key=", "AKIA", "password"):
        assert leaked not in text


def test_generations_are_unrolled_and_stateful_tasks_never_cached():
    spec, _ = _documents(COMPILED)
    dag = spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]
    generations = [t for t in dag if t.startswith("cycleqd-generation")]
    assert len(generations) == PipelineOptions().generations_per_run
    for component in spec["components"].values():
        for task in component.get("dag", {}).get("tasks", {}).values():
            assert not task.get("cachingOptions", {}).get("enableCache", False)


# The pipeline's end-to-end runs through kfp.local (real S3 and MLflow, a killed run that
# resumes) are in tests/integration/test_pipeline_local.py.


WEIGHT_TASKS = {"preflight", "finetune", "seed", "evaluate", "export"}
OTHER_TASKS = {"plan", "breed", "commit", "release"}
GPU_TASKS = {"finetune", "seed", "evaluate", "export"}


def _task(executor: str) -> str:
    """exec-evaluate-3 (the third unrolled generation's) -> evaluate."""
    return executor.removeprefix("exec-").rstrip("0123456789").rstrip("-")


def test_models_volume_is_mounted_only_where_weights_are_read(tmp_path):
    compiled = compile_pipeline(
        tmp_path / "pvc.yaml", PipelineOptions(models_pvc="models", models_mount_path="/m")
    )
    spec, platform = _documents(compiled)
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert {_task(name) for name in executors} == WEIGHT_TASKS | OTHER_TASKS
    for name, config in executors.items():
        mounts = config.get("pvcMount", [])
        if _task(name) in WEIGHT_TASKS:
            (mount,) = mounts
            assert mount["mountPath"] == "/m"
            assert mount["pvcNameParameter"]["runtimeValue"]["constant"] == "models"
        else:
            assert mounts == [], f"{name} mounts the models' volume but reads no weights"
    # The model cache: where weights are copied (not preflight, which reads headers only).
    for name, config in executors.items():
        caches = [m for m in config.get("emptyDirMounts", []) if m["volumeName"] == "model-cache"]
        env = spec["deploymentSpec"]["executors"][name]["container"].get("env", [])
        cache_env = [e for e in env if e["name"] == "CYCLEQD_MODEL_CACHE"]
        if _task(name) in WEIGHT_TASKS - {"preflight", "finetune"}:  # finetune fetches its own
            assert caches[0]["sizeLimit"] == "100Gi"
            assert cache_env == [{"name": "CYCLEQD_MODEL_CACHE", "value": caches[0]["mountPath"]}]
        else:
            assert caches == [] and cache_env == [], name


def test_no_models_volume_by_default():
    _, platform = _documents(COMPILED)
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert all("pvcMount" not in config for config in executors.values())


def test_compile_flags_set_the_models_volume(tmp_path, capsys):
    from cycleqd_kfp.pipelines.cli import main

    out = tmp_path / "p.yaml"
    argv = ["compile", "--output", str(out), "--models-pvc", "llms", "--models-mount-path", "/m"]
    assert main([*argv, "--model-cache-size", "20Gi"]) == 0
    _, platform = _documents(out)
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    (mount,) = executors["exec-seed"]["pvcMount"]
    assert mount["mountPath"] == "/m"
    assert mount["pvcNameParameter"]["runtimeValue"]["constant"] == "llms"
    cache = executors["exec-seed"]["emptyDirMounts"][-1]
    assert (cache["volumeName"], cache["sizeLimit"]) == ("model-cache", "20Gi")


def test_database_password_only_where_skills_are_scored():
    """The db skill's password (secret cycleqd-db, optional) reaches preflight, finetune (a
    derived training set replays SQL), seed, evaluate and export, never the tasks that score
    nothing."""
    _, platform = _documents(COMPILED)
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for name, config in executors.items():
        secrets = [s for s in config.get("secretAsEnv", []) if s.get("secretName") == "cycleqd-db"]
        if _task(name) in WEIGHT_TASKS:
            (secret,) = secrets
            assert secret["optional"] is True
            assert secret["keyToEnv"] == [
                {"secretKey": "CYCLEQD_DB_PASSWORD", "envVar": "CYCLEQD_DB_PASSWORD"}
            ]
        else:
            assert secrets == [], name


TRACKING_TASKS = {"preflight", "finetune", "seed", "commit", "export"}


def test_the_tasks_that_track_find_mlflow_and_its_credentials_by_name_only():
    """MLflow's address from the cycleqd-mlflow-client ConfigMap and its credentials from the
    cycleqd-mlflow-auth Secret (both optional), in the tasks that record to MLflow only; the
    image each runs in, for the runs' tags. Never a parameter or a value in the YAML."""
    _, platform = _documents(COMPILED)
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    spec, _ = _documents(COMPILED)
    for name, config in executors.items():
        auth = [
            s for s in config.get("secretAsEnv", []) if s.get("secretName") == "cycleqd-mlflow-auth"
        ]
        client = [
            c
            for c in config.get("configMapAsEnv", [])
            if c.get("configMapName") == "cycleqd-mlflow-client"
        ]
        if _task(name) in TRACKING_TASKS:
            assert len(auth) == 1 and auth[0]["optional"] is True, name
            assert {k["envVar"] for k in auth[0]["keyToEnv"]} == {
                "MLFLOW_TRACKING_USERNAME",
                "MLFLOW_TRACKING_PASSWORD",
                "MLFLOW_TRACKING_TOKEN",
            }
            assert len(client) == 1 and client[0]["optional"] is True, name
            container = spec["deploymentSpec"]["executors"][name]["container"]
            env = {e["name"]: e["value"] for e in container.get("env", [])}
            assert env["CYCLEQD_IMAGE"] == container["image"]
        else:
            assert auth == [] and client == [], name


def test_every_task_has_a_deadline_of_its_stage():
    """A hung pod is stopped (activeDeadlineSeconds) instead of holding its node or GPU."""
    options = PipelineOptions()
    deadlines = {
        "preflight": options.preflight_timeout_s,
        "finetune": options.finetune_timeout_s,
        "plan": options.plan_timeout_s,
        "seed": options.seed_timeout_s,
        "breed": options.breed_timeout_s,
        "evaluate": options.evaluation_timeout_s,
        "commit": options.commit_timeout_s,
        "export": options.export_timeout_s,
        "release": options.release_timeout_s,
    }
    spec, platform = _documents(COMPILED)
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert set(executors) == set(spec["deploymentSpec"]["executors"])  # every task's pod
    for name, config in executors.items():
        assert int(config["activeDeadlineSeconds"]) == deadlines[_task(name)] > 0, name


def test_only_the_tasks_that_use_a_gpu_request_one_and_the_others_request_little():
    options = PipelineOptions()
    spec, platform = _documents(COMPILED)
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for name, executor in spec["deploymentSpec"]["executors"].items():
        resources = executor["container"].get("resources", {})
        if _task(name) in GPU_TASKS:
            assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu", name
            continue
        assert "accelerator" not in resources, f"{name} reads no weights but asks for a GPU"
        assert "tolerations" not in k8s[name], name
        assert resources["resourceCpuRequest"] == options.cpu_task_cpu_request, name
        assert resources["resourceMemoryRequest"] == options.cpu_task_memory_request, name


def _gated_stage(spec: dict, stage: str) -> dict:
    """The sub-pipeline that runs `stage` only if `plan` says it has work to do."""
    dag = spec["components"][f"comp-cycleqd-{stage}"]["dag"]["tasks"]
    assert dag["plan"]["inputs"]["parameters"]["stage"]["runtimeValue"]["constant"] == stage
    (condition,) = [t for t in dag.values() if "triggerPolicy" in t]
    assert condition["triggerPolicy"]["condition"] == (
        "inputs.parameter_values['pipelinechannel--plan-Output'] == true"
    )
    assert condition["dependentTasks"] == ["plan"]
    gated = spec["components"][condition["componentRef"]["name"]]["dag"]["tasks"]
    assert set(gated) == {stage}
    return spec["components"]["comp-exit-handler-1"]["dag"]["tasks"][f"cycleqd-{stage}"]


def test_seed_and_export_start_a_gpu_only_when_planned_on_the_cpu():
    """Seed only while the campaign is not seeded; export only once the last generation of
    the run is committed, and only while its final model has no export."""
    spec, _ = _documents(COMPILED)
    _gated_stage(spec, "seed")
    exporting = _gated_stage(spec, "export")
    dag = spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]
    assert dag["cycleqd-generation"]["dependentTasks"] == ["cycleqd-seed"]
    last = f"cycleqd-generation-{PipelineOptions().generations_per_run}"
    assert exporting["dependentTasks"] == [last]


def test_the_kubeflow_ui_address_reaches_the_tracking_tasks(tmp_path):
    from cycleqd_kfp.pipelines import cli

    url = "https://kubeflow.example.com/pipeline"
    path = tmp_path / "p.yaml"
    assert cli.main(["compile", "--output", str(path), "--kfp-ui-url", url]) == 0
    spec, _ = _documents(path)
    for name, executor in spec["deploymentSpec"]["executors"].items():
        env = {e["name"]: e["value"] for e in executor["container"].get("env", [])}
        assert env.get("CYCLEQD_KFP_UI") == (url if _task(name) in TRACKING_TASKS else None), name


def _warm_spec(tmp_path, warm: int = 3) -> tuple[dict, dict]:
    compiled = compile_pipeline(tmp_path / "warm.yaml", PipelineOptions(warm_evaluators=warm))
    return _documents(compiled)


def test_with_warm_evaluators_a_run_starts_them_once_and_scores_on_the_cpu(tmp_path):
    """One task starts the run's evaluators (on the CPU, after preflight, with a deadline);
    the evaluation tasks, one per evaluator, ask for no GPU but the evaluation's CPU and
    memory; every GPU a run uses is then in the evaluators (and seed, export, fine-tuning)."""
    options = PipelineOptions(warm_evaluators=3)
    spec, platform = _warm_spec(tmp_path)
    executors = spec["deploymentSpec"]["executors"]
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert set(k8s) == set(executors)  # every task has its deadline
    start = executors["exec-start-evaluators"]["container"]
    assert "accelerator" not in start.get("resources", {})
    assert int(k8s["exec-start-evaluators"]["activeDeadlineSeconds"]) == (
        options.evaluator_start_timeout_s
    )
    evaluations = [name for name in executors if _task(name) == "evaluate"]
    assert evaluations
    for name in evaluations:
        resources = executors[name]["container"]["resources"]
        assert "accelerator" not in resources, name
        assert resources["resourceCpuRequest"] == options.evaluation_cpu
        assert resources["resourceMemoryRequest"] == options.evaluation_memory
        assert "tolerations" not in k8s[name]
    dag = spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]
    started = dag["start-evaluators"]
    assert started["dependentTasks"] == ["preflight"]
    arguments = started["inputs"]["parameters"]
    assert arguments["count"]["runtimeValue"]["constant"] == 3
    settings = yaml.safe_load(arguments["settings_json"]["runtimeValue"]["constant"])
    assert settings["gpus"] == options.gpus_per_evaluation
    assert settings["memory"] == options.evaluation_memory
    assert settings["s3_secret"] == options.s3_secret
    # Every generation waits for the evaluators to exist; its children go to 3 groups.
    for name, task in dag.items():
        if name.startswith("cycleqd-generation"):
            assert "start-evaluators" in task["dependentTasks"], name
    generation = spec["components"]["comp-cycleqd-generation"]["dag"]["tasks"]
    assert generation["breed"]["inputs"]["parameters"]["shards"]["runtimeValue"]["constant"] == 3
    loop = spec["components"]["comp-for-loop-1"]["dag"]["tasks"]["evaluate"]
    run_owner = loop["inputs"]["parameters"]["run_owner"]
    assert run_owner["componentInputParameter"] == "pipelinechannel--run_owner"


def test_without_warm_evaluators_nothing_starts_them():
    spec, _ = _documents(COMPILED)
    assert "exec-start-evaluators" not in spec["deploymentSpec"]["executors"]


def test_the_exit_handler_releases_with_the_target_and_may_reach_the_kfp_api():
    """The exit task knows the target (to disable a finished schedule, or continue a one-off
    run) and carries the label of Kubeflow's PodDefault that gives it a KFP API token."""
    spec, platform = _documents(COMPILED)
    release = spec["root"]["dag"]["tasks"]["release"]
    arguments = release["inputs"]["parameters"]
    for name in ("campaign_config", "search_generations", "continue_until_done"):
        assert arguments[name]["componentInputParameter"] == name
    labels = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-release"]
    assert labels["podMetadata"]["labels"] == {"access-ml-pipeline": "true"}

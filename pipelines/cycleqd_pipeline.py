"""The CycleQD pipeline: preflight -> experts -> seed -> N unrolled generations -> export.

The experts stage fine-tunes, in parallel over skills, every expert that the config gives as
a fine-tuning spec (`models.experts.<skill>: {data: derived, method: lora, ...}`) on the
trainer image and publishes it in the campaign store; the seed task then reads the experts
from there. Skills whose expert is given by location skip it; a rerun never retrains a
published expert.

KFP v2 has no while loop, so each run unrolls `generations_per_run` generation sub-pipelines
at compile time; every generation picks up from the campaign's last committed generation in
the store, and does nothing once the campaign's target is reached. A recurring run therefore
continues the search where the previous run stopped, and a retried run never redoes a
committed generation. Caching is off for every stateful task: a cached breed or commit would
replay stale archive state.

The run's parameters are described in the `cycleqd` pipeline's docstring, from which KFP
takes the descriptions the Kubeflow UI shows beside them.

GPUs only where they are used: fine-tuning, seed, evaluation and export run on GPU nodes; the
other tasks (preflight, plan, breed, commit, release) get small CPU requests and no accelerator.
Seed and export are each a sub-pipeline whose CPU `plan` task reads the store and starts the
GPU task (`dsl.If`) only if it has work to do: seed while the campaign is not seeded, export
(planned after the run's last commit) while the final model of the last committed archives has
no complete export. They are sub-pipelines because KFP lets no task wait on a task inside a
condition from outside it. Every task's pod has a deadline of its stage (PipelineOptions), so
that a hung pod does not hold its GPU.

Models (the config's `models.base` and `models.experts`) are s3:// URIs, read with the same
secret as the store and copied once per pod into an emptyDir cache, or paths in a
PersistentVolumeClaim mounted at compile time (`PipelineOptions.models_pvc`). Only the tasks
that read weights get them: preflight (headers only), seed, evaluate, export.
"""

# No `from __future__ import annotations` here: KFP reads the pipelines' annotations as types.

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kfp import compiler, dsl, kubernetes

from cycleqd.model_sources import CACHE_ENV as MODEL_CACHE_ENV
from cycleqd.skills.registry import DB_PASSWORD_ENV
from cycleqd.tracking.common import CLIENT_CONFIG_URI_ENV, IMAGE_ENV, KFP_UI_ENV
from cycleqd_kfp.components.breed.component import breed
from cycleqd_kfp.components.commit.component import commit
from cycleqd_kfp.components.evaluate.component import evaluate
from cycleqd_kfp.components.export.component import export
from cycleqd_kfp.components.finetune.component import finetune
from cycleqd_kfp.components.plan.component import plan
from cycleqd_kfp.components.preflight.component import preflight
from cycleqd_kfp.components.release.component import release
from cycleqd_kfp.components.seed.component import seed
from cycleqd_kfp.components.start_evaluators.component import start_evaluators

COMPILED = Path(__file__).with_name("cycleqd_pipeline.yaml")
S3_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_REGION")
MODEL_CACHE_PATH = "/var/cache/cycleqd/models"


@dataclass(frozen=True)
class PipelineOptions:
    """Compile-time settings: KFP fixes loop bounds and resources when compiling."""

    generations_per_run: int = 4
    # Evaluation tasks per generation, run at once: the number of GPUs to use. The children
    # of a generation are dealt among them, each task keeping one warm engine for its share.
    parallelism: int = 4
    # Warm evaluators (docs/warm_evaluators.md): this many engines (`vllm serve` pods, one per
    # `gpus_per_evaluation` GPUs; local processes under kfp.local) started once per run and
    # kept for all its generations; each scores children one after another with in-place
    # weight swaps. The generation's children are then dealt to as many evaluation tasks,
    # CPU pods that hold an evaluator per child and run the skills' checkers. 0: none; every
    # evaluation task starts its own engine on its own GPU.
    warm_evaluators: int = 0
    evaluator_launcher: str = "auto"  # kubernetes inside a pod, local processes elsewhere
    evaluator_start_timeout_s: int = 10 * 60  # creates the objects; engines warm up later
    s3_secret: str = "cycleqd-s3"
    gpu_resource: str = "nvidia.com/gpu"
    gpus_per_evaluation: int = 1
    evaluation_memory: str = "64G"
    evaluation_cpu: str = "8"
    shared_memory: str = "16Gi"
    evaluation_retries: int = 2
    # The experts stage: one fine-tuning task per skill to train, on the trainer image, at
    # most `finetune_parallelism` at once (0: `parallelism`).
    finetune_parallelism: int = 0
    gpus_per_finetune: int = 1
    finetune_memory: str = "64G"
    finetune_cpu: str = "8"
    finetune_retries: int = 2
    # A PersistentVolumeClaim holding the base and experts, mounted at `models_mount_path` in
    # the tasks that read weights (preflight, seed, evaluate, export) and in no other; the
    # config then names them by path (models.base: /models/llama-3-8b). Empty: no volume
    # (models on s3://). Not read-only: kfp-kubernetes 2.17's PvcMount has no readOnly field
    # (mount_path, sub_path, the claim only). Nothing in these tasks writes there (models are
    # opened for reading; the model cache is its own volume); to have Kubernetes enforce it,
    # bind the claim to a PersistentVolume whose source is read-only (nfs/csi `readOnly`).
    models_pvc: str = ""
    models_mount_path: str = "/models"
    # Room for this pod's copies of s3:// models (an emptyDir at MODEL_CACHE_PATH, named by
    # $CYCLEQD_MODEL_CACHE) in seed, evaluate and export: base + experts, plus their task
    # vectors' factors (four 8B models in bfloat16: 64 GB). Empty: no cache volume (copies
    # go to the container's own disk).
    model_cache_size: str = "100Gi"
    # The `db` skill's database password ($CYCLEQD_DB_PASSWORD, key of the same name), for
    # the tasks that score skills (preflight checks the server): never part of the config.
    db_secret: str = "cycleqd-db"
    # What the tasks without a GPU (preflight, plan, breed, commit, release) ask the scheduler
    # for: they move JSON and read model headers, never weights, so they fit on any node.
    cpu_task_cpu_request: str = "500m"
    cpu_task_memory_request: str = "2Gi"  # Python with MLflow and the skills' checkers loaded
    # Each task's pod is stopped after this long (its activeDeadlineSeconds; a retried task
    # gets it again per attempt), so that a hung pod never holds its node, or GPU, for good.
    # Sized for an 8B model on one GPU, with room for slow model copies from S3.
    preflight_timeout_s: int = 30 * 60  # model headers, data sets, services: minutes at most
    # One LoRA fine-tuning of an 8B expert; a retry resumes from its checkpoints.
    finetune_timeout_s: int = 24 * 60 * 60
    plan_timeout_s: int = 10 * 60  # reads the last snapshot and one manifest
    # Copies base and experts (~64 GB from S3) and scores every expert on every skill.
    seed_timeout_s: int = 4 * 60 * 60
    breed_timeout_s: int = 30 * 60  # recipes only: no weights are read
    # One task's share of a generation's children, each materialised and scored on every
    # skill (minutes per child for an 8B with vLLM), after the models' copy into the cache.
    evaluation_timeout_s: int = 6 * 60 * 60
    commit_timeout_s: int = 30 * 60  # a snapshot, garbage collection, MLflow, elite maps
    # Materialises, scores and uploads the final model (16 GB of weights for an 8B).
    export_timeout_s: int = 3 * 60 * 60
    # Stops the warm evaluators, deletes the lease, and starts the next run or disables a
    # finished schedule (a few API calls each).
    release_timeout_s: int = 10 * 60
    # MLflow, for the tasks that track (preflight, finetune, seed, commit, export), where the
    # run's `tracking_uri` is empty and KFP's MLflow plugin injects none: the tracking URI
    # from this ConfigMap (manifests/base/mlflow-client-configmap.yaml), credentials (basic
    # auth or a token, as MLflow reads them) from this Secret; both optional, never parameters.
    mlflow_client_config_map: str = "cycleqd-mlflow-client"
    mlflow_auth_secret: str = "cycleqd-mlflow-auth"
    # The Kubeflow UI's address (e.g. https://kubeflow.example.com/pipeline): MLflow runs then
    # link to their Kubeflow run's page. Empty: no link.
    kfp_ui_url: str = ""


def _with_s3_secret(
    task: dsl.PipelineTask, options: PipelineOptions, timeout_s: int
) -> dsl.PipelineTask:
    """Every task: the store's credentials, no caching (tasks are stateful), a deadline."""
    kubernetes.use_secret_as_env(
        task,
        secret_name=options.s3_secret,
        secret_key_to_env={k: k for k in S3_ENV},
        optional=True,
    )
    kubernetes.set_timeout(task, timeout_s)
    return task.set_caching_options(False)


MLFLOW_AUTH_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")


def _tracks(task: dsl.PipelineTask, options: PipelineOptions) -> dsl.PipelineTask:
    """A task that records to MLflow: where to (a ConfigMap), as whom (a Secret), from which
    image, and the Kubeflow UI's address for the runs' links."""
    kubernetes.use_config_map_as_env(
        task,
        config_map_name=options.mlflow_client_config_map,
        config_map_key_to_env={"MLFLOW_TRACKING_URI": CLIENT_CONFIG_URI_ENV},
        optional=True,
    )
    kubernetes.use_secret_as_env(
        task,
        secret_name=options.mlflow_auth_secret,
        secret_key_to_env={k: k for k in MLFLOW_AUTH_ENV},
        optional=True,
    )
    task.set_env_variable(IMAGE_ENV, task.component_spec.implementation.container.image)
    if options.kfp_ui_url:
        task.set_env_variable(KFP_UI_ENV, options.kfp_ui_url)
    return task


def _on_cpu(task: dsl.PipelineTask, options: PipelineOptions, timeout_s: int) -> dsl.PipelineTask:
    """A task without a GPU: small requests, so that it is scheduled next to anything."""
    task.set_cpu_request(options.cpu_task_cpu_request)
    task.set_memory_request(options.cpu_task_memory_request)
    return _with_s3_secret(task, options, timeout_s)


def _on_gpu(
    task: dsl.PipelineTask, options: PipelineOptions, timeout_s: int, training: bool = False
) -> dsl.PipelineTask:
    """A task on a GPU node: the evaluation resources, or (`training`) the fine-tuning ones."""
    task.set_accelerator_type(options.gpu_resource)
    if training:
        task.set_accelerator_limit(options.gpus_per_finetune)
        task.set_memory_limit(options.finetune_memory).set_cpu_limit(options.finetune_cpu)
    else:
        task.set_accelerator_limit(options.gpus_per_evaluation)
        task.set_memory_limit(options.evaluation_memory).set_cpu_limit(options.evaluation_cpu)
    # vLLM and torch workers share tensors through /dev/shm; the default 64 MiB is too small.
    kubernetes.empty_dir_mount(
        task,
        volume_name="dshm",
        mount_path="/dev/shm",
        medium="Memory",
        size_limit=options.shared_memory,
    )
    kubernetes.add_toleration(
        task, key=options.gpu_resource, operator="Exists", effect="NoSchedule"
    )
    return _with_s3_secret(task, options, timeout_s)


def _reads_models(
    task: dsl.PipelineTask, options: PipelineOptions, copies: bool = True
) -> dsl.PipelineTask:
    """A task that reads the base and experts and scores skills: the models' volume if there
    is one, (`copies`: it reads weights, not only headers) the cache for s3:// models' copies,
    and the database password of the `db` skill (optional: campaigns without it)."""
    kubernetes.use_secret_as_env(
        task,
        secret_name=options.db_secret,
        secret_key_to_env={DB_PASSWORD_ENV: DB_PASSWORD_ENV},
        optional=True,
    )
    if options.models_pvc:
        # No read-only flag exists here (see PipelineOptions.models_pvc).
        kubernetes.mount_pvc(
            task, pvc_name=options.models_pvc, mount_path=options.models_mount_path
        )
    if copies and options.model_cache_size:
        kubernetes.empty_dir_mount(
            task,
            volume_name="model-cache",
            mount_path=MODEL_CACHE_PATH,
            size_limit=options.model_cache_size,
        )
        task.set_env_variable(MODEL_CACHE_ENV, MODEL_CACHE_PATH)
    return task


def _on_cpu_with_evaluators(
    task: dsl.PipelineTask, options: PipelineOptions, timeout_s: int
) -> dsl.PipelineTask:
    """An evaluation task whose engine is a warm evaluator: no GPU, but the evaluation's CPU
    and memory (it runs the skills' checkers, and materialises children off the experts'
    span to stage them for the evaluator)."""
    task.set_cpu_request(options.evaluation_cpu).set_memory_request(options.evaluation_memory)
    return _with_s3_secret(task, options, timeout_s)


def evaluator_settings_json(options: PipelineOptions) -> str:
    """The Kubernetes launcher's settings for the run's evaluators: the evaluation tasks'
    GPU, memory, secrets and volumes, now in the evaluator pods."""
    from cycleqd.evaluator_launch.kubernetes import KubernetesEvaluatorSettings

    return KubernetesEvaluatorSettings(
        s3_secret=options.s3_secret,
        gpu_resource=options.gpu_resource,
        gpus=options.gpus_per_evaluation,
        cpu=options.evaluation_cpu,
        memory=options.evaluation_memory,
        shared_memory=options.shared_memory,
        model_cache_size=options.model_cache_size or "100Gi",
        models_pvc=options.models_pvc or None,
        models_mount_path=options.models_mount_path,
        tolerations=({"key": options.gpu_resource, "operator": "Exists", "effect": "NoSchedule"},),
    ).to_json()


def build_pipeline(options: PipelineOptions = PipelineOptions()):
    warm = options.warm_evaluators > 0
    # The evaluation tasks of a generation: one per warm evaluator, or one per GPU.
    evaluation_tasks = options.warm_evaluators if warm else options.parallelism

    def only_if_planned(
        stage: str, component: Callable[..., dsl.PipelineTask], timeout_s: int, display_name: str
    ):
        """A sub-pipeline that asks `plan` on the CPU whether the GPU stage `stage` has work
        to do and runs its task (`component`) only then. A sub-pipeline because the next
        stage waits on it: KFP lets no task wait on one inside a condition from outside it."""

        @dsl.pipeline(
            name=f"cycleqd-{stage}", description=f"{stage.capitalize()}, if it has work to do."
        )
        def planned_stage(
            campaign_config: str,
            campaign_store_uri: str,
            tracking_uri: str,
            run_owner: str,
            search_generations: int,
        ):
            """Plan on the CPU, then run the stage's GPU task only if it has work to do.

            Args:
                campaign_config: The campaign config: YAML, one-line JSON or a file's URI.
                campaign_store_uri: The campaign store: s3://bucket/prefix.
                tracking_uri: MLflow tracking URI; empty: no tracking.
                run_owner: The run's id, the owner of the campaign's lease.
                search_generations: Generations to reach; 0: the config's `generations`.
            """
            needed = _on_cpu(
                plan(campaign_config=campaign_config, store_uri=campaign_store_uri, stage=stage),
                options,
                options.plan_timeout_s,
            ).set_display_name(f"plan {stage}")
            with dsl.If(needed.output == True, name=f"{stage} has work"):  # noqa: E712
                task = component(
                    campaign_config=campaign_config,
                    store_uri=campaign_store_uri,
                    tracking_uri=tracking_uri,
                    run_owner=run_owner,
                    search_generations=search_generations,
                )
                _tracks(_reads_models(_on_gpu(task, options, timeout_s), options), options)
                task.set_display_name(display_name)

        return planned_stage

    seed_unless_seeded = only_if_planned(
        "seed", seed, options.seed_timeout_s, "seed archives with experts"
    )
    export_unless_exported = only_if_planned(
        "export", export, options.export_timeout_s, "export final model"
    )

    @dsl.pipeline(name="cycleqd-generation", description="Breed, evaluate, commit one generation.")
    def generation(
        campaign_config: str,
        campaign_store_uri: str,
        tracking_uri: str,
        run_owner: str,
        search_generations: int,
    ):
        """One generation: breed, evaluate the children in parallel, commit the archives.

        Args:
            campaign_config: The campaign config: YAML, one-line JSON or a file's URI.
            campaign_store_uri: The campaign store: s3://bucket/prefix.
            tracking_uri: MLflow tracking URI; empty: no tracking.
            run_owner: The run's id, the owner of the campaign's lease.
            search_generations: Generations to reach; 0: the config's `generations`.
        """
        bred = _on_cpu(
            breed(
                campaign_config=campaign_config,
                store_uri=campaign_store_uri,
                run_owner=run_owner,
                shards=evaluation_tasks,
                search_generations=search_generations,
            ),
            options,
            options.breed_timeout_s,
        ).set_display_name("breed")
        with dsl.ParallelFor(bred.output, parallelism=evaluation_tasks) as genome_ids:
            scoring = evaluate(
                campaign_config=campaign_config,
                store_uri=campaign_store_uri,
                genome_ids=genome_ids,
                run_owner=run_owner,
            )
            placed = (
                _on_cpu_with_evaluators(scoring, options, options.evaluation_timeout_s)
                if warm
                else _on_gpu(scoring, options, options.evaluation_timeout_s)
            )
            scored = _reads_models(placed, options).set_display_name("evaluate children")
            scored.set_retry(
                num_retries=options.evaluation_retries, backoff_duration="30s", backoff_factor=2
            )
        _tracks(
            _on_cpu(
                commit(
                    campaign_config=campaign_config,
                    store_uri=campaign_store_uri,
                    tracking_uri=tracking_uri,
                    run_owner=run_owner,
                    search_generations=search_generations,
                ),
                options,
                options.commit_timeout_s,
            ),
            options,
        ).set_display_name("commit archives").after(scored)

    @dsl.pipeline(
        name="cycleqd",
        description="CycleQD: merge expert LLMs by quality-diversity search over model weights.",
    )
    def cycleqd(
        campaign_config: str,
        campaign_store_uri: str,
        tracking_uri: str = "",
        search_generations: int = 0,
        continue_until_done: bool = False,
    ):
        """Preflight, experts, seed, the unrolled generations, export (see the module doc).

        Args:
            campaign_config: The campaign config (see the README's "Configuration"), fixed
                per campaign: one-line JSON, a YAML document (the UI's one-line field drops
                its line breaks), or the URI of a config file: s3://bucket/key (read with the
                campaign store's credentials), https://..., or a path in the task's pod.
            campaign_store_uri: Where the campaign lives: s3://bucket/prefix (credentials
                from the Kubernetes secret named at compile time, never in this YAML).
            tracking_uri: MLflow tracking URI; empty: no tracking.
            search_generations: Generations to reach (the campaign's target, counted from
                its start, not from this run's); 0: the config's `generations`. The one
                setting a later run of a campaign may change.
            continue_until_done: When this run ends before the campaign's target, start the
                next run (same pipeline version and parameters) from its exit handler, and
                so on until the target; a run that made no progress starts none. Runs of a
                recurring run need not: their schedule is disabled once the target is
                reached.
        """
        run_owner = dsl.PIPELINE_JOB_ID_PLACEHOLDER
        give_back = _on_cpu(
            release(
                store_uri=campaign_store_uri,
                run_owner=run_owner,
                campaign_config=campaign_config,
                search_generations=search_generations,
                continue_until_done=continue_until_done,
            ),
            options,
            options.release_timeout_s,
        ).set_display_name("release campaign")
        # Kubeflow's PodDefault `access-ml-pipeline` gives the pod a token for the KFP API: the
        # follow-up disables a finished recurring run or starts the next run.
        kubernetes.add_pod_label(give_back, "access-ml-pipeline", "true")
        with dsl.ExitHandler(give_back, name="campaign"):
            checked = _reads_models(
                _on_cpu(
                    preflight(
                        campaign_config=campaign_config,
                        store_uri=campaign_store_uri,
                        tracking_uri=tracking_uri,
                        run_owner=run_owner,
                        search_generations=search_generations,
                    ),
                    options,
                    options.preflight_timeout_s,
                ),
                options,
                copies=False,  # headers and config.json only
            ).set_display_name("preflight")
            _tracks(checked, options)  # checks that MLflow answers
            with dsl.ParallelFor(
                checked.output,
                parallelism=options.finetune_parallelism or options.parallelism,
            ) as skill:
                trained = _reads_models(
                    _on_gpu(
                        finetune(
                            campaign_config=campaign_config,
                            store_uri=campaign_store_uri,
                            skill=skill,
                            tracking_uri=tracking_uri,
                        ),
                        options,
                        options.finetune_timeout_s,
                        training=True,
                    ),
                    options,
                    copies=False,  # run_finetune fetches the base itself
                ).set_display_name("fine-tune expert")
                _tracks(trained, options)
                trained.set_retry(
                    num_retries=options.finetune_retries, backoff_duration="60s", backoff_factor=2
                )
            stage_arguments = {
                "campaign_config": campaign_config,
                "campaign_store_uri": campaign_store_uri,
                "tracking_uri": tracking_uri,
                "run_owner": run_owner,
                "search_generations": search_generations,
            }
            previous = (
                seed_unless_seeded(**stage_arguments)
                .set_display_name("seed unless seeded")
                .set_caching_options(False)
                .after(trained)
            )
            started = None
            if warm:  # engines warm up while the experts train and the archives are seeded
                started = _on_cpu(
                    start_evaluators(
                        campaign_config=campaign_config,
                        store_uri=campaign_store_uri,
                        run_owner=run_owner,
                        count=options.warm_evaluators,
                        launcher=options.evaluator_launcher,
                        settings_json=evaluator_settings_json(options),
                    ),
                    options,
                    options.evaluator_start_timeout_s,
                ).set_display_name("start warm evaluators")
                started.after(checked)
            for index in range(options.generations_per_run):
                previous = (
                    generation(**stage_arguments)
                    .set_display_name(f"generation +{index + 1}")
                    .set_caching_options(False)
                    .after(previous)
                )
                if started is not None:
                    previous.after(started)
            # Planned after the last commit: the final model is the last archives'.
            (
                export_unless_exported(**stage_arguments)
                .set_display_name("export unless exported")
                .set_caching_options(False)
                .after(previous)
            )

    return cycleqd


def compile_pipeline(path: str | Path = COMPILED, options: PipelineOptions = PipelineOptions()):
    compiler.Compiler().compile(build_pipeline(options), str(path))
    return Path(path)

"""A run's warm GPU evaluators on Kubernetes: `vllm serve` pods started by a pipeline task.

`KubernetesLauncher.start` creates, in the namespace of the pod it runs in (a Kubeflow
Pipelines task, that is an Argo Workflow pod), four objects named `cycleqd-eval-<10 hex>`
after the run (its owner id):

  Secret         the evaluators' bearer token (key `token`)
  NetworkPolicy  ingress to the evaluator pods on their port only from the pods of the same
                 Argo Workflow (created before the pods, so that they are never open)
  Service        headless: one DNS name per evaluator pod
  StatefulSet    `spec.count` pods, each a stock vLLM OpenAI-compatible server with the
                 project's worker extension (in-place weight swaps over /collective_rpc)

Each object carries an ownerReference to the Argo Workflow that owns the task's pod, so that
Kubernetes' garbage collector deletes the evaluators with the workflow even if the exit
handler that calls `stop` never runs. A retried task (same owner) finds the objects there
(409 Conflict on create) and replaces them with what it would have created: an unchanged
StatefulSet keeps its warm pods; nothing is ever doubled.

What vLLM does with the flags and endpoints used here (checked against vLLM 0.11 - 0.16 and
its main branch; the evaluator image pins its own vLLM, see images/images.yaml):
  * `--worker-extension-cls` is `ParallelConfig.worker_extension_cls`: the class is mixed into
    every GPU worker "for use in collective_rpc calls" (vllm/config/parallel.py).
  * With VLLM_SERVER_DEV_MODE=1 the server adds development endpoints, among them
    POST /collective_rpc, body {"method": str, "args": [...], "kwargs": {...},
    "timeout": float | null}, answering {"results": [one per worker]}
    (vllm/entrypoints/serve/dev/rpc/api_router.py), and POST /reset_prefix_cache.
  * `--api-key` (or the VLLM_API_KEY environment variable, which is how the token is passed
    here) authenticates only the guarded path prefixes: /v1 up to vLLM 0.16
    (AuthenticationMiddleware in vllm/entrypoints/openai/api_server.py, "authentication is
    skipped [when] the request path doesn't start with /v1"), then ("/v1", "/v2",
    "/inference", "/cohere"). /collective_rpc, /reset_prefix_cache and /tokenize are NOT
    authenticated by those versions (https://docs.vllm.ai/en/stable/usage/security/,
    "API Key Authentication Limitations"; vllm-project/vllm#18892, #29922). Whoever reaches
    the port can load other weights into the engine or call any worker method: the
    NetworkPolicy, not the token, is what keeps the development endpoints private. (Newer
    vLLM derives the guarded set from its route table and guards them too; the callers send
    the token on every request, so both behave the same for them.)
  * The token goes in as VLLM_API_KEY from the Secret, not as `--api-key $(VAR)`: vLLM logs
    its non-default command-line arguments at startup, the API key in clear text until
    vllm-project/vllm#52523, and the command line shows in `ps`.
  * An s3:// model needs `--load-format runai_streamer`; for an S3-compatible store,
    AWS_ENDPOINT_URL, RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING=0 and
    AWS_EC2_METADATA_DISABLED=true (docs.vllm.ai, "Loading models with Run:ai Model
    Streamer").
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from cycleqd.errors import CycleQDError
from cycleqd.evaluator_launch.base import EvaluatorLauncher, EvaluatorSpec
from cycleqd.generate.server_backend import SERVED_MODEL

log = logging.getLogger(__name__)

# = cycleqd.generate.vllm_worker.WORKER_EXTENSION (not imported: that module imports torch;
# tests/deploy/test_evaluator_launcher.py checks that both agree).
WORKER_EXTENSION = "cycleqd.generate.vllm_worker.WeightSwapExtension"

NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
MODEL_CACHE_DIR = "/var/cache/cycleqd/models"
MODEL_CACHE_ENV = "CYCLEQD_MODEL_CACHE"  # = cycleqd.model_sources.CACHE_ENV
TOKEN_KEY = "token"
TOKEN_ENV = "VLLM_API_KEY"  # vLLM's own name for --api-key's value
ROLE_FILE = "manifests/base/pipeline-role.yaml"

PART_OF_LABEL = "app.kubernetes.io/part-of"
COMPONENT_LABEL = "app.kubernetes.io/component"
INSTANCE_LABEL = "app.kubernetes.io/instance"
RUN_LABEL = "cycleqd.ai/run"
TOKEN_HASH_ANNOTATION = "cycleqd.ai/token-sha256"
WORKFLOW_LABEL = "workflows.argoproj.io/workflow"  # Argo puts it on every pod of a workflow
WORKFLOW_API = ("argoproj.io", "v1alpha1", "workflows")

# kind -> (API object, method suffix, resource as RBAC and error messages name it)
_KINDS = {
    "Secret": ("core", "secret", "secrets"),
    "NetworkPolicy": ("networking", "network_policy", "networkpolicies.networking.k8s.io"),
    "Service": ("core", "service", "services"),
    "StatefulSet": ("apps", "stateful_set", "statefulsets.apps"),
}
# Created in this order (the policy before the pods it guards), deleted in the reverse one.
CREATE_ORDER = ("Secret", "NetworkPolicy", "Service", "StatefulSet")

_LABEL_VALUE = re.compile(r"^(?:[A-Za-z0-9](?:[-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")
_TOLERATION_KEYS = {"key", "operator", "value", "effect", "tolerationSeconds"}


class EvaluatorLaunchError(CycleQDError):
    """The run's evaluators could not be created or deleted; the message says what to fix."""


class EvaluatorPermissionError(EvaluatorLaunchError):
    """The run's service account lacks a Kubernetes permission (403 Forbidden)."""


class KubernetesSettingsError(EvaluatorLaunchError):
    """The Kubernetes evaluator settings are invalid."""


# -- settings -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class KubernetesEvaluatorSettings:
    """Where and how the evaluator pods run. Compiled into the pipeline as a JSON string
    (`to_json`), read back by the task (`from_json`)."""

    image: str | None = None  # None: images.yaml's `evaluator` image (image_for)
    namespace: str | None = None  # None: the namespace of the pod this runs in
    s3_secret: str = "cycleqd-s3"  # AWS_* credentials; "" when the models are on a volume
    gpu_resource: str = "nvidia.com/gpu"
    gpus: int | None = None  # per evaluator; None: the spec's tensor_parallel_size
    cpu: str = "4"  # request (no CPU limit: throttling a GPU server's scheduler costs GPU time)
    memory: str = "32Gi"  # request and limit
    shared_memory: str = "8Gi"  # /dev/shm (tmpfs, counted against the memory limit)
    model_cache_size: str = "100Gi"  # $CYCLEQD_MODEL_CACHE: the experts the swaps read
    models_pvc: str | None = None  # a claim holding the models, mounted read-only
    models_mount_path: str = "/models"
    service_account: str | None = None  # None: the namespace's default (no API token mounted)
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: tuple[dict[str, Any], ...] = ()  # as in a pod spec: key, operator, effect...
    port: int = 8000
    cluster_domain: str = "cluster.local"
    startup_timeout_s: int = 1200  # first load: image pull aside, S3 stream + CUDA graphs
    termination_grace_period_s: int = 15

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.port, int) or not 1 <= self.port <= 65535:
            problems.append(f"port must be an integer in 1..65535, got {self.port!r}")
        if self.gpus is not None and (not isinstance(self.gpus, int) or self.gpus < 0):
            problems.append(f"gpus must be a non-negative integer or null, got {self.gpus!r}")
        for name in ("startup_timeout_s", "termination_grace_period_s"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                problems.append(f"{name} must be a non-negative integer, got {value!r}")
        for name in ("gpu_resource", "cpu", "memory", "models_mount_path", "cluster_domain"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                problems.append(f"{name} must be a non-empty string")
        if not isinstance(self.node_selector, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in self.node_selector.items()
        ):
            problems.append("node_selector must map label names to label values (strings)")
        for toleration in self.tolerations:
            unknown = set(toleration) - _TOLERATION_KEYS if isinstance(toleration, dict) else {0}
            if unknown:
                problems.append(
                    f"toleration {toleration!r}: only {', '.join(sorted(_TOLERATION_KEYS))}"
                )
        if problems:
            raise KubernetesSettingsError(
                "invalid Kubernetes evaluator settings: " + "; ".join(problems)
            )

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | dict[str, Any] | None) -> KubernetesEvaluatorSettings:
        """Settings from `to_json`'s string (or its dict); empty: the defaults."""
        if text is None or text == "":
            return cls()
        try:
            data = json.loads(text) if isinstance(text, str) else dict(text)
        except (TypeError, ValueError) as exc:
            raise KubernetesSettingsError(
                f"the Kubernetes evaluator settings are not JSON: {exc}"
            ) from None
        if not isinstance(data, dict):
            raise KubernetesSettingsError("the Kubernetes evaluator settings must be an object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise KubernetesSettingsError(
                f"unknown Kubernetes evaluator settings {unknown}; "
                f"known: {', '.join(sorted(known))}"
            )
        if "tolerations" in data:
            data["tolerations"] = tuple(data["tolerations"] or ())
        if data.get("node_selector") is None:
            data.pop("node_selector", None)
        return cls(**data)


# -- names --------------------------------------------------------------------------------------


def resource_name(owner: str) -> str:
    """`cycleqd-eval-<10 hex>`: a DNS-1035 label short enough for a StatefulSet's pods."""
    return "cycleqd-eval-" + hashlib.sha256(owner.encode()).hexdigest()[:10]


def run_label(owner: str) -> str:
    """The owner as a label value: itself where it is one, else a cleaned, shortened form
    with a hash suffix that keeps distinct owners distinct."""
    if _LABEL_VALUE.match(owner) and owner:
        return owner
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "-", owner)[:52].strip("-_.")
    digest = hashlib.sha256(owner.encode()).hexdigest()[:10]
    return f"{cleaned}-{digest}" if cleaned else digest


def evaluator_urls(name: str, namespace: str, count: int, port: int, domain: str) -> list[dict]:
    """Each StatefulSet pod's stable DNS name through the headless Service of the same name."""
    return [
        {"name": f"e{i}", "url": f"http://{name}-{i}.{name}.{namespace}.svc.{domain}:{port}"}
        for i in range(count)
    ]


# -- the launcher -------------------------------------------------------------------------------


class KubernetesLauncher(EvaluatorLauncher):
    """Starts and stops a run's evaluators with the official `kubernetes` client.

    The four API objects (CoreV1Api, AppsV1Api, NetworkingV1Api, CustomObjectsApi) can be
    given; those that are not are built on first use from the pod's in-cluster service
    account. `pod_name` names the pod this runs in (default: $KFP_POD_NAME, set by KFP's
    driver, else $HOSTNAME, which is the pod's name).
    """

    kind = "kubernetes"

    def __init__(
        self,
        settings: KubernetesEvaluatorSettings | None = None,
        *,
        core: Any = None,
        apps: Any = None,
        networking: Any = None,
        custom: Any = None,
        namespace: str | None = None,
        pod_name: str | None = None,
        namespace_file: str | os.PathLike = NAMESPACE_FILE,
    ) -> None:
        self.settings = settings or KubernetesEvaluatorSettings()
        self._apis = {"core": core, "apps": apps, "networking": networking, "custom": custom}
        self._namespace = namespace or self.settings.namespace
        self._pod_name = pod_name
        self._namespace_file = Path(namespace_file)

    # -- EvaluatorLauncher ------------------------------------------------------------------

    def start(self, spec: EvaluatorSpec, token: str) -> dict[str, Any]:
        if spec.count < 1:
            raise EvaluatorLaunchError(f"a run needs at least one evaluator, got {spec.count}")
        if not token:
            raise EvaluatorLaunchError("the evaluators need a non-empty bearer token")
        namespace = self.namespace()
        name = resource_name(spec.owner)
        workflow = self._workflow(namespace)
        owner_refs = _owner_references(workflow)
        selector = {
            PART_OF_LABEL: "cycleqd",
            COMPONENT_LABEL: "evaluator",
            INSTANCE_LABEL: name,
        }
        labels = {**selector, RUN_LABEL: run_label(spec.owner)}
        if workflow and workflow.get("name"):
            ingress_from = {WORKFLOW_LABEL: workflow["name"]}
        else:
            # Fail closed: without the workflow's name, only pods that carry this run's label
            # (other orchestrators can label their tasks so) reach the evaluators; never the
            # whole namespace, whose other pods have no business with the dev endpoints.
            ingress_from = {RUN_LABEL: labels[RUN_LABEL]}
            log.warning(
                "the task's Argo workflow is unknown (see above): the evaluators accept "
                "connections only from pods labelled %s=%s",
                RUN_LABEL,
                labels[RUN_LABEL],
            )
        bodies = {
            "Secret": self.secret(name, namespace, labels, owner_refs, token),
            "NetworkPolicy": self.network_policy(
                name, namespace, labels, owner_refs, selector, ingress_from
            ),
            "Service": self.service(name, namespace, labels, owner_refs, selector),
            "StatefulSet": self.stateful_set(
                spec, name, namespace, labels, owner_refs, selector, token
            ),
        }
        for kind in CREATE_ORDER:
            self._apply(kind, bodies[kind], namespace)
        log.info(
            "started %d evaluator(s) %s in namespace %s (owner: %s)",
            spec.count,
            name,
            namespace,
            f"workflow {workflow['name']}" if owner_refs else "none",
        )
        return {
            "evaluators": evaluator_urls(
                name, namespace, spec.count, self.settings.port, self.settings.cluster_domain
            ),
            "resources": {
                "namespace": namespace,
                "name": name,
                "kinds": list(CREATE_ORDER),
                "workflow": (workflow or {}).get("name"),
                "ingress_from": ingress_from,
            },
        }

    def stop(self, registry: dict[str, Any]) -> None:
        launcher = registry.get("launcher", self.kind)
        if launcher != self.kind:
            raise EvaluatorLaunchError(
                f"these evaluators were started by the {launcher!r} launcher, not by Kubernetes"
            )
        resources = registry.get("resources") or {}
        name = resources.get("name") or (
            resource_name(registry["owner"]) if registry.get("owner") else None
        )
        if not name:
            raise EvaluatorLaunchError(
                "the evaluator registry names neither its resources nor its owner: nothing to stop"
            )
        namespace = resources.get("namespace") or self.namespace()
        kinds = [k for k in reversed(CREATE_ORDER) if k in resources.get("kinds", CREATE_ORDER)]
        for kind in kinds:
            api_name, suffix, resource = _KINDS[kind]
            method = getattr(self._api(api_name), f"delete_namespaced_{suffix}")
            # Foreground for the StatefulSet: it stays visible until its pods are gone, so a
            # start right after a stop never adopts pods that are shutting down.
            policy = "Foreground" if kind == "StatefulSet" else "Background"
            status, _ = self._request(
                "delete",
                resource,
                namespace,
                method,
                name=name,
                namespace=namespace,
                propagation_policy=policy,
            )
            if status == 404:
                log.info("%s %s/%s was already gone", kind, namespace, name)
            elif status == 409:
                log.info("%s %s/%s is already being deleted", kind, namespace, name)
        log.info("stopped the evaluators %s in namespace %s", name, namespace)

    # -- objects ----------------------------------------------------------------------------

    def namespace(self) -> str:
        if self._namespace:
            return self._namespace
        try:
            namespace = self._namespace_file.read_text().strip()
        except OSError:
            namespace = ""
        if not namespace:
            raise EvaluatorLaunchError(
                f"cannot tell which Kubernetes namespace to start the evaluators in: "
                f"{self._namespace_file} is missing (not running in a pod?); set `namespace` "
                "in the Kubernetes evaluator settings"
            )
        self._namespace = namespace
        return namespace

    def image(self) -> str:
        if self.settings.image:
            return self.settings.image
        from cycleqd_kfp.images.images import image_for

        return image_for("evaluator")

    @staticmethod
    def _meta(name, namespace, labels, owner_refs, annotations=None):
        from kubernetes import client

        return client.V1ObjectMeta(
            name=name,
            namespace=namespace,
            labels=dict(labels),
            annotations=annotations,
            owner_references=owner_refs or None,
        )

    def secret(self, name, namespace, labels, owner_refs, token: str):
        from kubernetes import client

        return client.V1Secret(
            api_version="v1",
            kind="Secret",
            metadata=self._meta(name, namespace, labels, owner_refs),
            type="Opaque",
            data={TOKEN_KEY: base64.b64encode(token.encode()).decode()},
        )

    def service(self, name, namespace, labels, owner_refs, selector):
        from kubernetes import client

        port = self.settings.port
        return client.V1Service(
            api_version="v1",
            kind="Service",
            metadata=self._meta(name, namespace, labels, owner_refs),
            spec=client.V1ServiceSpec(
                cluster_ip="None",  # headless: DNS names <pod>.<service>, no proxying
                selector=dict(selector),
                # The names resolve as soon as the pods have addresses: the evaluation tasks
                # wait for /health themselves, and a pod that turns unready mid-run stays
                # addressable (its callers see why it fails instead of a DNS error).
                publish_not_ready_addresses=True,
                ports=[
                    client.V1ServicePort(name="http", port=port, target_port=port, protocol="TCP")
                ],
            ),
        )

    def network_policy(self, name, namespace, labels, owner_refs, selector, ingress_from):
        from kubernetes import client

        # Traffic from the node itself (the kubelet's probes) is always allowed by
        # NetworkPolicy semantics; everything else must come from `ingress_from` pods.
        return client.V1NetworkPolicy(
            api_version="networking.k8s.io/v1",
            kind="NetworkPolicy",
            metadata=self._meta(name, namespace, labels, owner_refs),
            spec=client.V1NetworkPolicySpec(
                pod_selector=client.V1LabelSelector(match_labels=dict(selector)),
                policy_types=["Ingress"],
                ingress=[
                    client.V1NetworkPolicyIngressRule(
                        _from=[
                            client.V1NetworkPolicyPeer(
                                pod_selector=client.V1LabelSelector(match_labels=dict(ingress_from))
                            )
                        ],
                        ports=[client.V1NetworkPolicyPort(port=self.settings.port, protocol="TCP")],
                    )
                ],
            ),
        )

    def command(self, spec: EvaluatorSpec) -> list[str]:
        """`vllm serve` for one evaluator (the token arrives as $VLLM_API_KEY, see above)."""
        command = [
            "vllm",
            "serve",
            spec.base_location,
            "--served-model-name",
            SERVED_MODEL,
            "--host",
            "0.0.0.0",
            "--port",
            str(self.settings.port),
            "--dtype",
            spec.dtype,
            "--seed",
            str(spec.seed),
            "--gpu-memory-utilization",
            str(spec.gpu_memory_utilization),
            "--tensor-parallel-size",
            str(spec.tensor_parallel_size),
            "--worker-extension-cls",
            WORKER_EXTENSION,
        ]
        if spec.max_model_len:
            command += ["--max-model-len", str(spec.max_model_len)]
        if spec.base_location.startswith("s3://"):
            command += ["--load-format", "runai_streamer"]
        return command + list(spec.extra_args)

    def env(self, name: str) -> list:
        from kubernetes import client

        def from_secret(var, secret, key, optional=False):
            return client.V1EnvVar(
                name=var,
                value_from=client.V1EnvVarSource(
                    secret_key_ref=client.V1SecretKeySelector(
                        name=secret, key=key, optional=True if optional else None
                    )
                ),
            )

        env = [
            client.V1EnvVar(name="VLLM_SERVER_DEV_MODE", value="1"),  # /collective_rpc etc.
            from_secret(TOKEN_ENV, name, TOKEN_KEY),
            client.V1EnvVar(name=MODEL_CACHE_ENV, value=MODEL_CACHE_DIR),
        ]
        if self.settings.s3_secret:
            secret = self.settings.s3_secret
            env += [
                from_secret("AWS_ACCESS_KEY_ID", secret, "AWS_ACCESS_KEY_ID"),
                from_secret("AWS_SECRET_ACCESS_KEY", secret, "AWS_SECRET_ACCESS_KEY"),
                from_secret("AWS_ENDPOINT_URL", secret, "AWS_ENDPOINT_URL", optional=True),
                from_secret("AWS_REGION", secret, "AWS_REGION", optional=True),
                # Run:ai streamer on an S3-compatible store: path-style URLs, no EC2 metadata.
                client.V1EnvVar(name="RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING", value="0"),
                client.V1EnvVar(name="AWS_EC2_METADATA_DISABLED", value="true"),
            ]
        return env

    def stateful_set(self, spec, name, namespace, labels, owner_refs, selector, token: str):
        from kubernetes import client

        settings = self.settings
        gpus = spec.tensor_parallel_size if settings.gpus is None else settings.gpus
        requests = {"cpu": settings.cpu, "memory": settings.memory}
        limits = {"memory": settings.memory}
        if gpus:
            requests[settings.gpu_resource] = str(gpus)
            limits[settings.gpu_resource] = str(gpus)
        mounts = [
            client.V1VolumeMount(name="dshm", mount_path="/dev/shm"),
            client.V1VolumeMount(name="model-cache", mount_path=MODEL_CACHE_DIR),
        ]
        volumes = [
            # vLLM's workers (tensor parallel, NCCL) share memory through /dev/shm, which a
            # container otherwise gets at 64 MiB.
            client.V1Volume(
                name="dshm",
                empty_dir=client.V1EmptyDirVolumeSource(
                    medium="Memory", size_limit=settings.shared_memory
                ),
            ),
            client.V1Volume(
                name="model-cache",
                empty_dir=client.V1EmptyDirVolumeSource(size_limit=settings.model_cache_size),
            ),
        ]
        if settings.models_pvc:
            mounts.append(
                client.V1VolumeMount(
                    name="models", mount_path=settings.models_mount_path, read_only=True
                )
            )
            volumes.append(
                client.V1Volume(
                    name="models",
                    persistent_volume_claim=client.V1PersistentVolumeClaimVolumeSource(
                        claim_name=settings.models_pvc, read_only=True
                    ),
                )
            )

        def health(period, failures, timeout=5):
            return client.V1Probe(
                http_get=client.V1HTTPGetAction(path="/health", port=settings.port),
                period_seconds=period,
                timeout_seconds=timeout,
                failure_threshold=failures,
            )

        container = client.V1Container(
            name="vllm",
            image=self.image(),
            image_pull_policy="IfNotPresent",
            command=self.command(spec),
            env=self.env(name),
            ports=[
                client.V1ContainerPort(name="http", container_port=settings.port, protocol="TCP")
            ],
            resources=client.V1ResourceRequirements(requests=requests, limits=limits),
            volume_mounts=mounts,
            # Until the first load is done (S3 stream, profiling, CUDA graphs): up to
            # startup_timeout_s before the kubelet gives up and restarts the container.
            startup_probe=health(10, max(1, math.ceil(settings.startup_timeout_s / 10))),
            readiness_probe=health(10, 3),
            # A dead engine makes the API server exit or answer 503: restart it. Generous,
            # because a swap keeps the engine busy.
            liveness_probe=health(30, 5, timeout=10),
            security_context=client.V1SecurityContext(
                allow_privilege_escalation=False,
                capabilities=client.V1Capabilities(drop=["ALL"]),
            ),
        )
        tolerations = [
            client.V1Toleration(
                key=t.get("key"),
                operator=t.get("operator"),
                value=t.get("value"),
                effect=t.get("effect"),
                toleration_seconds=t.get("tolerationSeconds"),
            )
            for t in settings.tolerations
        ]
        pod = client.V1PodSpec(
            containers=[container],
            volumes=volumes,
            termination_grace_period_seconds=settings.termination_grace_period_s,
            # The evaluators never call the Kubernetes API: no token in the pods.
            automount_service_account_token=False,
            service_account_name=settings.service_account or None,
            # No Docker-link variables: vLLM reads VLLM_* variables, and a Service named
            # vllm-... in the namespace would inject some (vLLM's docs warn about it).
            enable_service_links=False,
            node_selector=dict(settings.node_selector) or None,
            tolerations=tolerations or None,
            security_context=client.V1PodSecurityContext(
                run_as_non_root=True,
                seccomp_profile=client.V1SeccompProfile(type="RuntimeDefault"),
            ),
        )
        annotations = {
            # A new token (a task retried with another one) must restart the pods, which read
            # it at start: the template changes with it. A hash of a random token tells
            # nothing about it.
            TOKEN_HASH_ANNOTATION: hashlib.sha256(token.encode()).hexdigest()[:16],
            # Like KFP's own pods in an Istio-injected profile namespace: no sidecar, plain
            # HTTP from the task pods (which have none either).
            "sidecar.istio.io/inject": "false",
        }
        return client.V1StatefulSet(
            api_version="apps/v1",
            kind="StatefulSet",
            metadata=self._meta(name, namespace, labels, owner_refs),
            spec=client.V1StatefulSetSpec(
                replicas=spec.count,
                service_name=name,
                pod_management_policy="Parallel",  # all evaluators start at once
                selector=client.V1LabelSelector(match_labels=dict(selector)),
                template=client.V1PodTemplateSpec(
                    metadata=client.V1ObjectMeta(labels=dict(labels), annotations=annotations),
                    spec=pod,
                ),
            ),
        )

    # -- the task's workflow ---------------------------------------------------------------

    def _workflow(self, namespace: str) -> dict[str, str] | None:
        """{"name", "uid"} of the Argo Workflow that owns this pod (uid None where unknown),
        or None; every failure is logged, none is fatal (the objects are then created
        without an owner and with the fail-closed NetworkPolicy)."""
        pod_name = self._pod_name or os.environ.get("KFP_POD_NAME") or os.environ.get("HOSTNAME")
        if not pod_name:
            log.warning("no pod name (KFP_POD_NAME, HOSTNAME): cannot find the task's workflow")
            return None
        core = self._api("core")
        status, pod = self._request(
            "get",
            "pods",
            namespace,
            core.read_namespaced_pod,
            name=pod_name,
            namespace=namespace,
            fatal=False,
        )
        if pod is None:
            log.warning(
                "cannot read this task's pod %s/%s (HTTP %s): the evaluators get no owner "
                "reference (delete them with `stop` if the run's exit handler does not)",
                namespace,
                pod_name,
                status,
            )
            return None
        metadata = pod.metadata
        labels = metadata.labels or {}
        for ref in metadata.owner_references or []:
            if ref.kind == "Workflow" and ref.api_version.startswith("argoproj.io/"):
                return {"name": ref.name, "uid": ref.uid}
        name = labels.get(WORKFLOW_LABEL)
        if not name:
            log.warning("pod %s/%s belongs to no Argo workflow", namespace, pod_name)
            return None
        group, version, plural = WORKFLOW_API
        status, workflow = self._request(
            "get",
            f"{plural}.{group}",
            namespace,
            self._api("custom").get_namespaced_custom_object,
            group=group,
            version=version,
            namespace=namespace,
            plural=plural,
            name=name,
            fatal=False,
        )
        uid = ((workflow or {}).get("metadata") or {}).get("uid")
        if not uid:
            log.warning(
                "cannot read workflow %s/%s (HTTP %s): the evaluators get no owner reference",
                namespace,
                name,
                status,
            )
        return {"name": name, "uid": uid}

    # -- API calls --------------------------------------------------------------------------

    def _api(self, which: str):
        if self._apis[which] is None:
            from kubernetes import client, config

            if not getattr(self, "_configured", False):
                try:
                    config.load_incluster_config()
                except config.ConfigException as exc:
                    raise EvaluatorLaunchError(
                        f"cannot talk to Kubernetes: {exc}. The Kubernetes launcher runs in a "
                        "pipeline pod with a service account; elsewhere use the local launcher"
                    ) from None
                self._configured = True
            self._apis[which] = {
                "core": client.CoreV1Api,
                "apps": client.AppsV1Api,
                "networking": client.NetworkingV1Api,
                "custom": client.CustomObjectsApi,
            }[which]()
        return self._apis[which]

    def _apply(self, kind: str, body, namespace: str) -> None:
        """Create; if it exists (a retried task), replace it with `body`; if it vanished in
        between, create again."""
        api_name, suffix, resource = _KINDS[kind]
        api = self._api(api_name)
        name = body.metadata.name
        create = getattr(api, f"create_namespaced_{suffix}")
        replace = getattr(api, f"replace_namespaced_{suffix}")
        for _ in range(3):
            status, _ = self._request(
                "create", resource, namespace, create, namespace=namespace, body=body
            )
            if status is None:
                return
            if status == 404:
                raise EvaluatorLaunchError(
                    f"cannot create {kind} {name}: namespace {namespace!r} does not exist"
                )
            # 409: created by an earlier attempt of this task: make it what this one wants.
            status, current = self._request(
                "update", resource, namespace, replace, name=name, namespace=namespace, body=body
            )
            if status is None:
                if _being_deleted(current):
                    raise EvaluatorLaunchError(
                        f"{kind} {namespace}/{name} is being deleted (a stop of this run's "
                        "evaluators is under way): retry the task in a minute"
                    )
                log.info("%s %s/%s existed: replaced", kind, namespace, name)
                return
        raise EvaluatorLaunchError(
            f"{kind} {namespace}/{name} keeps appearing and vanishing: is another task "
            "starting and stopping this run's evaluators at the same time?"
        )

    def _request(self, verb, resource, where, method, *, fatal=True, **kwargs):
        """(None, result) on success; (404 or 409, None) for those two; any other failure
        raises an EvaluatorLaunchError that says what to fix (or, not `fatal`, returns
        (status, None))."""
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            return None, method(**kwargs)
        except ApiException as exc:
            if exc.status in (404, 409) or not fatal:
                return exc.status, None
            raise _api_error(exc, verb, resource, where) from None
        except (HTTPError, OSError) as exc:
            if not fatal:
                return None, None
            raise EvaluatorLaunchError(
                f"cannot reach the Kubernetes API server to {verb} {resource} in namespace "
                f"{where}: {exc}"
            ) from None


def _owner_references(workflow: dict[str, str] | None) -> list:
    if not workflow or not workflow.get("uid"):
        return []
    from kubernetes import client

    # Not `controller` (Argo's controller does not manage these) and no blockOwnerDeletion
    # (that would need update rights on workflows/finalizers): the garbage collector deletes
    # the evaluators once the Workflow object is deleted (KFP's TTL or a user).
    return [
        client.V1OwnerReference(
            api_version="argoproj.io/v1alpha1",
            kind="Workflow",
            name=workflow["name"],
            uid=workflow["uid"],
        )
    ]


def _being_deleted(obj) -> bool:
    metadata = getattr(obj, "metadata", None)
    if metadata is None and isinstance(obj, dict):
        return bool((obj.get("metadata") or {}).get("deletionTimestamp"))
    return bool(getattr(metadata, "deletion_timestamp", None))


def _server_message(exc) -> str:
    try:
        return json.loads(exc.body).get("message") or exc.reason or ""
    except (TypeError, ValueError, AttributeError):
        return exc.reason or ""


def _api_error(exc, verb: str, resource: str, namespace: str) -> EvaluatorLaunchError:
    message = _server_message(exc)
    if exc.status == 403 and "quota" in message.lower():
        return EvaluatorLaunchError(
            f"a ResourceQuota of namespace {namespace} refused to {verb} {resource}: {message}. "
            "Raise the quota or give the run fewer evaluators"
        )
    if exc.status == 403:
        return EvaluatorPermissionError(
            f"Kubernetes refused to {verb} {resource} in namespace {namespace}: the run's "
            f"service account may not `{verb}` `{resource}` ({message}). {ROLE_FILE} grants it "
            "to the role cycleqd-pipeline: apply the manifests to this namespace (kubectl "
            "apply -k manifests/overlays/<yours>) and run the pipeline with the service "
            "account cycleqd-pipeline"
        )
    if exc.status == 401:
        return EvaluatorLaunchError(
            f"Kubernetes did not accept this pod's service account token ({message}): is the "
            "token mounted (automountServiceAccountToken)?"
        )
    if exc.status == 422:
        return EvaluatorLaunchError(
            f"Kubernetes rejected the evaluators' {resource} as invalid: {message}. Check the "
            "Kubernetes evaluator settings (quantities such as memory: 32Gi, names, labels)"
        )
    return EvaluatorLaunchError(
        f"Kubernetes failed to {verb} {resource} in namespace {namespace}: HTTP "
        f"{exc.status} {message}"
    )

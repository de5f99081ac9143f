"""The Kubernetes launcher of a run's warm evaluators, against recording stand-ins for the
`kubernetes` client's API objects: no Kubernetes API server runs on this machine. Every call
is checked against the real client class (its signature, and the real method's own checks of
keyword and required arguments, run with a transport that sends nothing), and what a server
would store is kept as the JSON the real client would send. What is checked: the four objects
(names, labels, the vLLM command, the token from the Secret, the dev-mode switch, GPUs,
probes, the NetworkPolicy from the task's own workflow, owner references), that they are
valid objects of their kinds, a retried start (409), stop (404 is fine), a 403's message, and
that the RBAC role grants every call the launcher makes."""

from __future__ import annotations

import inspect
import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from cycleqd.evaluator_launch.base import EvaluatorSpec
from cycleqd.evaluator_launch.kubernetes import (
    WORKER_EXTENSION,
    EvaluatorLaunchError,
    EvaluatorPermissionError,
    KubernetesEvaluatorSettings,
    KubernetesLauncher,
    KubernetesSettingsError,
    resource_name,
    run_label,
)
from cycleqd.generate.server_backend import SERVED_MODEL

ROOT = Path(__file__).resolve().parents[2]
NAMESPACE = "team-a"
WORKFLOW = {"name": "cycleqd-run-x7k2p", "uid": "6f1c3c7e-0000-4000-8000-00000000wf01"}
POD = "cycleqd-run-x7k2p-system-container-impl-1234567890"
KINDS = {  # kind -> (typed model, method suffix)
    "Secret": ("V1Secret", "secret"),
    "Service": ("V1Service", "service"),
    "StatefulSet": ("V1StatefulSet", "stateful_set"),
    "NetworkPolicy": ("V1NetworkPolicy", "network_policy"),
}
SERIALIZE = client.ApiClient().sanitize_for_serialization


# -- the stand-ins ------------------------------------------------------------------------------


class _NoNetwork(client.ApiClient):
    """The real client's transport, minus the network: what would be sent is serialised
    (as the real client does) and nothing is returned."""

    def call_api(self, resource_path, method, path_params=None, query_params=None,
                 header_params=None, body=None, *args, **kwargs):  # fmt: skip
        self.sanitize_for_serialization(body)


class Cluster:
    """A namespace's state as an API server keeps it: objects by (kind, namespace, name) as
    the JSON sent, the task's pod, its workflow; methods told to answer 403."""

    def __init__(self, pod: client.V1Pod | None, workflows: dict | None = None) -> None:
        self.objects: dict[tuple[str, str, str], dict] = {}
        self.calls: list[tuple[str, str, dict]] = []  # (API class, method, arguments)
        self.pods = {POD: pod} if pod is not None else {}
        self.workflows = workflows or {}
        self.forbidden: set[str] = set()

    def apis(self) -> dict:
        return {
            "core": RecordingCore(self),
            "apps": RecordingApps(self),
            "networking": RecordingNetworking(self),
            "custom": RecordingCustom(self),
        }

    def named(self, method: str) -> list[dict]:
        return [arguments for _, called, arguments in self.calls if called == method]

    def get(self, kind: str) -> dict:
        return self.objects[(kind, NAMESPACE, resource_name("run-1"))]

    # what the server does
    def create(self, kind, namespace, body):
        doc = SERIALIZE(body)
        key = (kind, namespace, doc["metadata"]["name"])
        if key in self.objects:
            raise _api_exception(409, "AlreadyExists", f"{kind} {key[2]} already exists")
        assert doc["metadata"].get("namespace") in (None, namespace)
        self.objects[key] = doc
        return body

    def replace(self, kind, name, namespace, body):
        if (kind, namespace, name) not in self.objects:
            raise _api_exception(404, "NotFound", f"{kind} {name} not found")
        doc = SERIALIZE(body)
        assert doc["metadata"]["name"] == name
        self.objects[(kind, namespace, name)] = doc
        return body

    def delete(self, kind, name, namespace):
        if self.objects.pop((kind, namespace, name), None) is None:
            raise _api_exception(404, "NotFound", f"{kind} {name} not found")
        return client.V1Status(status="Success")


def _api_exception(status: int, reason: str, message: str) -> ApiException:
    exc = ApiException(status=status, reason=reason)
    exc.body = json.dumps({"kind": "Status", "message": message, "code": status})
    return exc


class _Recording:
    """Calls are bound to the real class's signature and run through the real method (with
    `_NoNetwork`): an argument the real client would refuse fails the test."""

    real: type

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster

    def __getattribute__(self, name: str):
        attribute = object.__getattribute__(self, name)
        real_cls = object.__getattribute__(self, "real")
        real = getattr(real_cls, name, None)
        if name.startswith("_") or real is None or not callable(attribute):
            return attribute
        cluster = object.__getattribute__(self, "cluster")

        def call(*args, **kwargs):
            inspect.signature(real).bind(None, *args, **kwargs)
            getattr(real_cls(api_client=_NoNetwork()), name)(*args, **kwargs)
            cluster.calls.append((real_cls.__name__, name, kwargs))
            if name in cluster.forbidden:
                raise _api_exception(
                    403,
                    "Forbidden",
                    f'User "system:serviceaccount:{NAMESPACE}:cycleqd-pipeline" cannot '
                    f"{name.split('_')[0]} this resource",
                )
            return attribute(*args, **kwargs)

        return call


def _crud(kind: str):
    suffix = KINDS[kind][1]

    def create(self, namespace, body, **kwargs):
        return self.cluster.create(kind, namespace, body)

    def replace(self, name, namespace, body, **kwargs):
        return self.cluster.replace(kind, name, namespace, body)

    def delete(self, name, namespace, **kwargs):
        return self.cluster.delete(kind, name, namespace)

    return {
        f"create_namespaced_{suffix}": create,
        f"replace_namespaced_{suffix}": replace,
        f"delete_namespaced_{suffix}": delete,
    }


class RecordingCore(_Recording):
    real = client.CoreV1Api

    def read_namespaced_pod(self, name, namespace, **kwargs):
        if name not in self.cluster.pods:
            raise _api_exception(404, "NotFound", f"pod {name} not found")
        return self.cluster.pods[name]


class RecordingApps(_Recording):
    real = client.AppsV1Api


class RecordingNetworking(_Recording):
    real = client.NetworkingV1Api


class RecordingCustom(_Recording):
    real = client.CustomObjectsApi

    def get_namespaced_custom_object(self, group, version, namespace, plural, name, **kwargs):
        assert (group, version, plural) == ("argoproj.io", "v1alpha1", "workflows")
        if name not in self.cluster.workflows:
            raise _api_exception(404, "NotFound", f"workflow {name} not found")
        return self.cluster.workflows[name]


for _cls, _kinds in (
    (RecordingCore, ("Secret", "Service")),
    (RecordingApps, ("StatefulSet",)),
    (RecordingNetworking, ("NetworkPolicy",)),
):
    for _kind in _kinds:
        for _name, _method in _crud(_kind).items():
            setattr(_cls, _name, _method)


def argo_pod(owner_ref: bool = True, label: bool = True) -> client.V1Pod:
    """The task's pod as Argo creates it: labelled with its workflow, owned by it."""
    refs = [
        client.V1OwnerReference(
            api_version="argoproj.io/v1alpha1",
            kind="Workflow",
            name=WORKFLOW["name"],
            uid=WORKFLOW["uid"],
            controller=True,
            block_owner_deletion=True,
        )
    ]
    return client.V1Pod(
        metadata=client.V1ObjectMeta(
            name=POD,
            namespace=NAMESPACE,
            labels={"workflows.argoproj.io/workflow": WORKFLOW["name"]} if label else {},
            owner_references=refs if owner_ref else None,
        )
    )


SPEC = EvaluatorSpec(
    owner="run-1",
    count=3,
    base_location="s3://models/base/Llama-3-8B-Instruct",
    max_model_len=8192,
    seed=7,
)


def launcher_for(cluster: Cluster, settings=None, **kwargs) -> KubernetesLauncher:
    return KubernetesLauncher(
        settings or KubernetesEvaluatorSettings(image="registry.example/evaluator:1"),
        **cluster.apis(),
        namespace=kwargs.pop("namespace", NAMESPACE),
        pod_name=kwargs.pop("pod_name", POD),
        **kwargs,
    )


@pytest.fixture
def cluster() -> Cluster:
    return Cluster(argo_pod())


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container["env"]}


def _flag(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


# -- what start creates -------------------------------------------------------------------------


def test_start_creates_the_four_objects_recorded_no_api_server(cluster):
    registry = launcher_for(cluster).start(SPEC, "s3cret-token")
    name = resource_name("run-1")
    assert name.startswith("cycleqd-eval-") and len(name) == len("cycleqd-eval-") + 10
    assert sorted(k for k, _, _ in cluster.objects) == sorted(KINDS)
    assert {n for _, _, n in cluster.objects} == {name}
    assert [m for _, m, _ in cluster.calls if m.startswith("create")] == [
        "create_namespaced_secret",
        "create_namespaced_network_policy",  # before the pods it guards
        "create_namespaced_service",
        "create_namespaced_stateful_set",
    ]
    for (kind, _, _), doc in cluster.objects.items():
        labels = doc["metadata"]["labels"]
        assert labels["app.kubernetes.io/part-of"] == "cycleqd", kind
        assert labels["app.kubernetes.io/component"] == "evaluator", kind
        assert labels["cycleqd.ai/run"] == "run-1", kind
        assert doc["metadata"]["namespace"] == NAMESPACE
        # Kubernetes' garbage collector deletes them with the run's workflow.
        assert doc["metadata"]["ownerReferences"] == [
            {
                "apiVersion": "argoproj.io/v1alpha1",
                "kind": "Workflow",
                "name": WORKFLOW["name"],
                "uid": WORKFLOW["uid"],
            }
        ], kind
    assert registry == {
        "evaluators": [
            {"name": f"e{i}", "url": f"http://{name}-{i}.{name}.{NAMESPACE}.svc.cluster.local:8000"}
            for i in range(3)
        ],
        "resources": {
            "namespace": NAMESPACE,
            "name": name,
            "kinds": ["Secret", "NetworkPolicy", "Service", "StatefulSet"],
            "workflow": WORKFLOW["name"],
            "ingress_from": {"workflows.argoproj.io/workflow": WORKFLOW["name"]},
        },
    }
    json.dumps(registry)  # the registry is stored as JSON


def test_the_secret_holds_the_token(cluster):
    launcher_for(cluster).start(SPEC, "s3cret-token")
    secret = cluster.get("Secret")
    assert secret["type"] == "Opaque"
    import base64

    assert base64.b64decode(secret["data"]["token"]).decode() == "s3cret-token"


def test_the_statefulset_runs_vllm_serve_with_the_worker_extension(cluster):
    launcher_for(cluster).start(SPEC, "s3cret-token")
    sts = cluster.get("StatefulSet")
    name = resource_name("run-1")
    assert sts["spec"]["replicas"] == 3
    assert sts["spec"]["podManagementPolicy"] == "Parallel"
    assert sts["spec"]["serviceName"] == name
    selector = sts["spec"]["selector"]["matchLabels"]
    template = sts["spec"]["template"]
    assert selector.items() <= template["metadata"]["labels"].items()
    pod = template["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "registry.example/evaluator:1"
    command = container["command"]
    assert command[:3] == ["vllm", "serve", SPEC.base_location]
    assert _flag(command, "--worker-extension-cls") == WORKER_EXTENSION
    assert _flag(command, "--served-model-name") == SERVED_MODEL
    assert _flag(command, "--port") == "8000"
    assert _flag(command, "--dtype") == "bfloat16"
    assert _flag(command, "--seed") == "7"
    assert _flag(command, "--max-model-len") == "8192"
    assert _flag(command, "--gpu-memory-utilization") == "0.85"
    assert _flag(command, "--tensor-parallel-size") == "1"
    assert _flag(command, "--load-format") == "runai_streamer"  # an s3:// model
    # The token: from the Secret, as vLLM's VLLM_API_KEY (never on the command line, which
    # vLLM logs at startup and `ps` shows).
    assert "--api-key" not in command and "s3cret-token" not in json.dumps(sts)
    env = _env(container)
    assert env["VLLM_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": name, "key": "token"}
    assert env["VLLM_SERVER_DEV_MODE"]["value"] == "1"  # /collective_rpc, /reset_prefix_cache
    assert env["CYCLEQD_MODEL_CACHE"]["value"] == "/var/cache/cycleqd/models"
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env[key]["valueFrom"]["secretKeyRef"] == {"name": "cycleqd-s3", "key": key}
    for key in ("AWS_ENDPOINT_URL", "AWS_REGION"):
        assert env[key]["valueFrom"]["secretKeyRef"] == {
            "name": "cycleqd-s3",
            "key": key,
            "optional": True,
        }
    assert env["RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING"]["value"] == "0"
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts == {"dshm": "/dev/shm", "model-cache": "/var/cache/cycleqd/models"}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Gi"}
    assert volumes["model-cache"]["emptyDir"] == {"sizeLimit": "100Gi"}


def test_gpus_probes_and_pod_settings(cluster):
    spec = EvaluatorSpec(owner="run-1", count=1, base_location="s3://m/b", tensor_parallel_size=2)
    launcher_for(cluster).start(spec, "t")
    pod = cluster.get("StatefulSet")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    resources = container["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == "2"  # tensor_parallel_size by default
    assert resources["requests"]["nvidia.com/gpu"] == "2"
    assert resources["requests"]["cpu"] == "4" and resources["limits"]["memory"] == "32Gi"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": 8000}, probe
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 20 * 60
    assert container["ports"] == [{"containerPort": 8000, "name": "http", "protocol": "TCP"}]
    assert pod["terminationGracePeriodSeconds"] <= 30
    assert pod["automountServiceAccountToken"] is False
    assert pod["enableServiceLinks"] is False
    assert container["securityContext"]["allowPrivilegeEscalation"] is False


def test_settings_change_gpus_resources_image_and_volumes(cluster):
    settings = KubernetesEvaluatorSettings(
        image="mirror.example/cycleqd-evaluator:0.1.0",
        gpu_resource="amd.com/gpu",
        gpus=1,
        cpu="8",
        memory="64Gi",
        shared_memory="16Gi",
        models_pvc="models",
        models_mount_path="/models",
        s3_secret="",
        node_selector={"gpu": "h100"},
        tolerations=({"key": "gpu", "operator": "Exists", "effect": "NoSchedule"},),
        service_account="evaluator",
    )
    spec = EvaluatorSpec(owner="run-1", count=2, base_location="/models/base")
    launcher_for(cluster, settings).start(spec, "t")
    pod = cluster.get("StatefulSet")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "mirror.example/cycleqd-evaluator:0.1.0"
    assert container["resources"]["limits"] == {"amd.com/gpu": "1", "memory": "64Gi"}
    assert "--load-format" not in container["command"]  # a path, not s3://
    assert not {k for k in _env(container) if k.startswith(("AWS_", "RUNAI_"))}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["models"] == {"name": "models", "mountPath": "/models", "readOnly": True}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["models"]["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}
    assert volumes["dshm"]["emptyDir"]["sizeLimit"] == "16Gi"
    assert pod["nodeSelector"] == {"gpu": "h100"}
    assert pod["tolerations"] == [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["serviceAccountName"] == "evaluator"


def test_the_service_is_headless_and_selects_the_run_evaluators(cluster):
    launcher_for(cluster).start(SPEC, "t")
    service = cluster.get("Service")["spec"]
    sts = cluster.get("StatefulSet")["spec"]
    assert service["clusterIP"] == "None"
    assert service["ports"] == [
        {"name": "http", "port": 8000, "protocol": "TCP", "targetPort": 8000}
    ]
    assert service["selector"] == sts["selector"]["matchLabels"]


def test_the_network_policy_admits_only_the_task_workflow_pods(cluster):
    launcher_for(cluster).start(SPEC, "t")
    policy = cluster.get("NetworkPolicy")["spec"]
    sts = cluster.get("StatefulSet")["spec"]
    assert policy["podSelector"]["matchLabels"] == sts["selector"]["matchLabels"]
    assert policy["policyTypes"] == ["Ingress"]
    assert policy["ingress"] == [
        {
            "from": [
                {
                    "podSelector": {
                        "matchLabels": {"workflows.argoproj.io/workflow": WORKFLOW["name"]}
                    }
                }
            ],
            "ports": [{"port": 8000, "protocol": "TCP"}],
        }
    ]
    assert cluster.named("read_namespaced_pod") == [{"name": POD, "namespace": NAMESPACE}]


def test_the_workflow_uid_is_read_from_the_workflow_when_the_pod_has_no_owner_reference():
    cluster = Cluster(
        argo_pod(owner_ref=False),
        workflows={WORKFLOW["name"]: {"metadata": {"name": WORKFLOW["name"], "uid": "wf-uid-2"}}},
    )
    launcher_for(cluster).start(SPEC, "t")
    assert cluster.get("Secret")["metadata"]["ownerReferences"][0]["uid"] == "wf-uid-2"
    assert len(cluster.named("get_namespaced_custom_object")) == 1


@pytest.mark.parametrize("case", ["pod unreadable", "not an Argo pod", "no pod name"])
def test_without_the_workflow_no_owner_and_the_policy_fails_closed(case, caplog, monkeypatch):
    cluster = Cluster(argo_pod(owner_ref=False, label=False))
    pod_name = POD
    if case == "pod unreadable":
        cluster.forbidden.add("read_namespaced_pod")
    elif case == "no pod name":
        pod_name = None
        monkeypatch.delenv("KFP_POD_NAME", raising=False)
        monkeypatch.delenv("HOSTNAME", raising=False)
    caplog.set_level(logging.WARNING)
    registry = launcher_for(cluster, pod_name=pod_name).start(SPEC, "t")
    for (kind, _, _), doc in cluster.objects.items():
        assert "ownerReferences" not in doc["metadata"], kind
    (rule,) = cluster.get("NetworkPolicy")["spec"]["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": {"cycleqd.ai/run": "run-1"}}}]
    assert registry["resources"]["workflow"] is None
    assert "cycleqd.ai/run=run-1" in caplog.text


def test_the_pod_name_comes_from_kfp_or_the_hostname(cluster, monkeypatch):
    monkeypatch.setenv("KFP_POD_NAME", POD)
    monkeypatch.setenv("HOSTNAME", "something-else")
    launcher_for(cluster, pod_name=None).start(SPEC, "t")
    assert cluster.named("read_namespaced_pod")[0]["name"] == POD


# -- the objects are valid objects of their kinds -----------------------------------------------


def test_each_object_round_trips_through_its_typed_model(cluster):
    launcher_for(cluster).start(SPEC, "t")
    api = client.ApiClient()
    for (kind, _, _), doc in cluster.objects.items():
        assert doc["kind"] == kind and doc["apiVersion"]
        model = api.deserialize(SimpleNamespace(data=json.dumps(doc)), KINDS[kind][0])
        assert type(model).__name__ == KINDS[kind][0]
        assert api.sanitize_for_serialization(model) == doc, kind


def test_each_object_validates_against_the_kubernetes_schema(cluster, kubernetes_validate):
    launcher_for(cluster).start(SPEC, "t")
    for (kind, _, _), doc in cluster.objects.items():
        for version in ("1.30.0", "1.37.0"):
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{kind} is not valid Kubernetes {version}: {exc.message}")


# -- idempotence, stop, errors ------------------------------------------------------------------


def test_a_second_start_replaces_never_doubles_recorded_no_api_server(cluster):
    launcher = launcher_for(cluster)
    first = launcher.start(SPEC, "t")
    before = {k: json.dumps(v, sort_keys=True) for k, v in cluster.objects.items()}
    second = launcher.start(SPEC, "t")  # a retried task: every create answers 409
    assert first == second
    assert len(cluster.objects) == 4
    assert len([m for _, m, _ in cluster.calls if m.startswith("create")]) == 8
    replaced = [m for _, m, _ in cluster.calls if m.startswith("replace")]
    assert sorted(replaced) == sorted(f"replace_namespaced_{s}" for _, s in KINDS.values())
    after = {k: json.dumps(v, sort_keys=True) for k, v in cluster.objects.items()}
    assert after == before  # the same template: the warm pods stay

    launcher.start(SPEC, "another-token")  # a retry with a new token restarts the pods
    annotation = "cycleqd.ai/token-sha256"
    old = json.loads(before[("StatefulSet", NAMESPACE, resource_name("run-1"))])
    new = cluster.get("StatefulSet")
    assert (
        old["spec"]["template"]["metadata"]["annotations"][annotation]
        != (new["spec"]["template"]["metadata"]["annotations"][annotation])
    )


def test_stop_deletes_the_four_objects_and_tolerates_404_recorded_no_api_server(cluster):
    launcher = launcher_for(cluster)
    registry = {
        "owner": "run-1",
        "launcher": "kubernetes",
        "token": "t",
        **launcher.start(SPEC, "t"),
    }
    launcher.stop(registry)
    assert cluster.objects == {}
    deletes = [(m, a) for _, m, a in cluster.calls if m.startswith("delete")]
    assert [m for m, _ in deletes] == [
        "delete_namespaced_stateful_set",
        "delete_namespaced_service",
        "delete_namespaced_network_policy",
        "delete_namespaced_secret",
    ]
    name = resource_name("run-1")
    assert all(a["name"] == name and a["namespace"] == NAMESPACE for _, a in deletes)
    assert deletes[0][1]["propagation_policy"] == "Foreground"
    # Already gone (the workflow's garbage collection, a second exit handler): no error.
    launcher.stop(registry)
    KubernetesLauncher(**cluster.apis(), namespace="elsewhere").stop(registry)  # its namespace
    assert cluster.calls[-1][2]["namespace"] == NAMESPACE


def test_stop_refuses_another_launcher_registry(cluster):
    with pytest.raises(EvaluatorLaunchError, match="'local' launcher"):
        launcher_for(cluster).stop({"owner": "run-1", "launcher": "local", "resources": {}})


@pytest.mark.parametrize(
    ("method", "verb", "resource"),
    [
        ("create_namespaced_stateful_set", "create", "statefulsets.apps"),
        ("create_namespaced_network_policy", "create", "networkpolicies.networking.k8s.io"),
        ("create_namespaced_secret", "create", "secrets"),
    ],
)
def test_a_403_names_the_missing_permission_and_the_role(cluster, method, verb, resource):
    cluster.forbidden.add(method)
    with pytest.raises(EvaluatorPermissionError) as caught:
        launcher_for(cluster).start(SPEC, "t")
    message = str(caught.value)
    assert f"may not `{verb}` `{resource}`" in message
    assert "manifests/base/pipeline-role.yaml" in message
    assert "cycleqd-pipeline" in message and "cannot" in message  # the server's own words


def test_a_403_on_replace_names_the_update_verb(cluster):
    launcher = launcher_for(cluster)
    launcher.start(SPEC, "t")
    cluster.forbidden.add("replace_namespaced_service")
    with pytest.raises(EvaluatorPermissionError, match=r"may not `update` `services`"):
        launcher.start(SPEC, "t")


def test_a_403_on_delete_is_an_error(cluster):
    launcher = launcher_for(cluster)
    registry = launcher.start(SPEC, "t")
    cluster.forbidden.add("delete_namespaced_secret")
    with pytest.raises(EvaluatorPermissionError, match=r"may not `delete` `secrets`"):
        launcher.stop({"owner": "run-1", **registry})


def test_the_pipeline_role_grants_every_call_the_launcher_makes(cluster):
    launcher = launcher_for(cluster)
    cluster.pods[POD] = argo_pod(owner_ref=False)
    cluster.workflows[WORKFLOW["name"]] = {"metadata": {"uid": "u"}}
    registry = launcher.start(SPEC, "t")
    launcher.start(SPEC, "t")  # the replace path
    launcher.stop({"owner": "run-1", **registry})
    role = yaml.safe_load((ROOT / "manifests" / "base" / "pipeline-role.yaml").read_text())
    granted = {
        (group, resource, verb)
        for rule in role["rules"]
        if not rule.get("resourceNames")
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    verbs = {
        "create": "create",
        "replace": "update",
        "delete": "delete",
        "read": "get",
        "get": "get",
    }
    groups = {"CoreV1Api": "", "AppsV1Api": "apps", "NetworkingV1Api": "networking.k8s.io"}
    plural = {
        "secret": "secrets",
        "service": "services",
        "stateful_set": "statefulsets",
        "network_policy": "networkpolicies",
        "pod": "pods",
    }
    needed = set()
    for api, method, arguments in cluster.calls:
        verb = verbs[method.split("_")[0]]
        if api == "CustomObjectsApi":
            needed.add((arguments["group"], arguments["plural"], verb))
        else:
            suffix = method.split("_namespaced_")[1]
            needed.add((groups[api], plural[suffix], verb))
    assert needed <= granted, f"missing from pipeline-role.yaml: {sorted(needed - granted)}"
    # and nothing that reads secrets back
    assert not {g for g in granted if g[1] == "secrets" and g[2] in ("get", "list", "watch")}


def test_outside_a_cluster_is_one_message_no_api_server(monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    launcher = KubernetesLauncher(KubernetesEvaluatorSettings(image="x/y:1"), namespace="ns")
    with pytest.raises(EvaluatorLaunchError, match="cannot talk to Kubernetes"):
        launcher.start(SPEC, "t")


def test_the_namespace_is_the_pod_own(tmp_path, cluster):
    file = tmp_path / "namespace"
    file.write_text("team-b\n")
    launcher = KubernetesLauncher(**cluster.apis(), namespace_file=file)
    assert launcher.namespace() == "team-b"
    missing = KubernetesLauncher(**cluster.apis(), namespace_file=tmp_path / "none")
    with pytest.raises(EvaluatorLaunchError, match="set `namespace`"):
        missing.namespace()
    assert KubernetesLauncher(KubernetesEvaluatorSettings(namespace="team-c")).namespace() == (
        "team-c"
    )


def test_the_default_image_is_the_evaluator_image():
    from cycleqd_kfp.images.images import image_for

    assert KubernetesLauncher().image() == image_for("evaluator")


def test_the_worker_extension_is_the_project_one():
    from cycleqd.generate.vllm_worker import WORKER_EXTENSION as REAL

    assert WORKER_EXTENSION == REAL


# -- settings and names -------------------------------------------------------------------------


def test_settings_round_trip_through_json():
    settings = KubernetesEvaluatorSettings(
        gpus=2,
        node_selector={"a": "b"},
        tolerations=({"key": "gpu", "operator": "Exists"},),
        models_pvc="models",
    )
    text = settings.to_json()
    assert isinstance(text, str) and json.loads(text)["gpus"] == 2
    assert KubernetesEvaluatorSettings.from_json(text) == settings
    assert KubernetesEvaluatorSettings.from_json("") == KubernetesEvaluatorSettings()
    assert KubernetesEvaluatorSettings.from_json(KubernetesEvaluatorSettings().to_json()) == (
        KubernetesEvaluatorSettings()
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"gpu": 1}', "unknown Kubernetes evaluator settings ['gpu']"),
        ('{"port": 0}', "port must be"),
        ('{"gpus": -1}', "gpus must be"),
        ('{"tolerations": [{"keys": "x"}]}', "toleration"),
        ("not json", "not JSON"),
    ],
)
def test_wrong_settings_are_one_message(text, message):
    with pytest.raises(KubernetesSettingsError, match=message.replace("[", r"\[")):
        KubernetesEvaluatorSettings.from_json(text)


def test_names_and_labels_are_valid_for_kubernetes():
    assert resource_name("run-1") == resource_name("run-1") != resource_name("run-2")
    assert run_label("8f2c-run") == "8f2c-run"
    odd = run_label("campaigns/tiny run#3" + "x" * 80)
    assert len(odd) <= 63 and odd[0].isalnum() and odd[-1].isalnum()
    assert run_label("a/b") != run_label("a_b")

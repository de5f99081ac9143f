"""Who starts and stops a run's warm evaluators: Kubernetes (`vllm serve` pods) on a
cluster, local processes elsewhere. See `base` for the registry both write."""

from __future__ import annotations

import os

from cycleqd.evaluator_launch.base import EvaluatorLauncher, EvaluatorSpec


def in_cluster() -> bool:
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST"))


def launcher_for(kind: str, settings_json: str = "") -> EvaluatorLauncher:
    """`kind`: "kubernetes", "local", or "auto" (Kubernetes inside a pod, else local)."""
    if kind == "auto":
        kind = "kubernetes" if in_cluster() else "local"
    if kind == "kubernetes":
        from cycleqd.evaluator_launch.kubernetes import (
            KubernetesEvaluatorSettings,
            KubernetesLauncher,
        )

        settings = (
            KubernetesEvaluatorSettings.from_json(settings_json)
            if settings_json
            else KubernetesEvaluatorSettings()
        )
        return KubernetesLauncher(settings)
    if kind == "local":
        from cycleqd.evaluator_launch.local import LocalProcessLauncher

        return LocalProcessLauncher()
    raise ValueError(f"unknown evaluator launcher {kind!r}: kubernetes, local or auto")


__all__ = ["EvaluatorLauncher", "EvaluatorSpec", "in_cluster", "launcher_for"]

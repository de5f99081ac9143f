"""What starts and stops a run's warm evaluators, whoever runs them (Kubernetes, local
processes).

A run's evaluators are described by a registry (JSON, kept in the campaign store under
`CampaignStore.evaluators_key(owner)`):

    {"owner": "<run id>", "launcher": "kubernetes" | "local",
     "token": "<bearer token the evaluators require>",
     "evaluators": [{"name": "e0", "url": "http://host:port"}, ...],
     "resources": {...}}          # what the launcher needs to stop them again

Every evaluator speaks the same HTTP API, a subset of vLLM's OpenAI-compatible server:
GET /health, POST /v1/chat/completions, and its development endpoints POST /collective_rpc
(the `swap_weights` method of `cycleqd.generate.vllm_worker.WeightSwapExtension`) and POST
/reset_prefix_cache. `start` returns at once; the evaluation tasks wait for /health.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class EvaluatorSpec:
    """What every evaluator of a run serves: the campaign's base model, warm, with weight
    swaps; `count` of them (one per GPU)."""

    owner: str  # the run's id: names and labels of what is created
    count: int
    base_location: str  # the config's models.base: s3:// URI or a path in the evaluator
    dtype: str = "bfloat16"
    seed: int = 0
    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.85
    tensor_parallel_size: int = 1
    extra_args: tuple[str, ...] = field(default_factory=tuple)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class EvaluatorLauncher(ABC):
    """Creates a run's evaluators and deletes them; both idempotent."""

    kind: str

    @abstractmethod
    def start(self, spec: EvaluatorSpec, token: str) -> dict[str, Any]:
        """Create the evaluators (returns at once, before they are ready): the registry's
        `evaluators` and `resources` entries. Starting a run's evaluators twice (a retried
        task) replaces or reuses what the first attempt created, never doubles it."""

    @abstractmethod
    def stop(self, registry: dict[str, Any]) -> None:
        """Delete what `start` created; what is already gone is no error."""

"""One evaluator for any list of skills: a campaign's `Evaluator` over one warm chat backend.

Each child's weights go into the backend in place, then every skill runs its samples against
it (single-turn or multi-turn; each skill batches its open conversations per `generate` call).
The scores are the skills' qualities; every sample's details (reply, transcript, error,
checker output) of the last scored genome are kept for the campaign to store.

A backend takes new weights one of two ways, named by its `weights_from` attribute:
- "tensors" (transformers): `load_weights((name, tensor) ...)`, and `weight_buffers()` so that
  the campaign materialises children straight into the model;
- "requests" (vLLM): `swap(request)` with a small JSON recipe (`vllm_worker.genome_request`)
  that each GPU worker turns into weights itself; no tensor crosses a process boundary.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable, Sequence
from typing import Any

from cycleqd.protocols import EvaluatorBase
from cycleqd.skills.base import SkillResult

log = logging.getLogger(__name__)


class SkillsEvaluator(EvaluatorBase):
    """`skills` give the scores; `reports` (e.g. HumanEval retention) are scored beside them
    and kept with the transcripts, never a score an archive sees."""

    def __init__(self, backend: Any, skills: Sequence[Any], reports: Sequence[Any] = ()) -> None:
        names = [s.name for s in (*skills, *reports)]
        if len(set(names)) != len(names):
            raise ValueError(f"skills scored twice: {names}")
        self.backend = backend
        self.skills = list(skills)
        self.reports = list(reports)
        self.last_genome: str | None = None
        self.last_results: dict[str, SkillResult] = {}
        self.last_seconds: dict[str, float] = {}

    @property
    def skill_names(self) -> list[str]:
        return [s.name for s in self.skills]

    @property
    def takes_requests(self) -> bool:  # type: ignore[override]
        """Whether children arrive as swap requests (vLLM) rather than tensors."""
        return getattr(self.backend, "weights_from", "tensors") == "requests"

    @property
    def reads_locations(self) -> bool:  # type: ignore[override]
        """Whether the backend's model is in another process or pod (a warm evaluator)."""
        return bool(getattr(self.backend, "reads_locations", False))

    def weight_buffers(self) -> dict[str, Any] | None:
        """The warm model's tensors, where the backend holds them in this process."""
        return None if self.takes_requests else self.backend.weight_buffers()

    def evaluate(self, genome_id: str, tensors: Iterable[tuple[str, Any]]) -> dict[str, float]:
        self.backend.load_weights(tensors)
        return self.evaluate_loaded(genome_id)

    def evaluate_request(self, genome_id: str, request: dict) -> dict[str, float]:
        """Swap a genome in by recipe (`vllm_worker` request), then score it."""
        self.backend.swap(request)
        return self.evaluate_loaded(genome_id)

    def evaluate_loaded(self, genome_id: str = "current") -> dict[str, float]:
        """Score the weights the backend holds now on every skill."""
        results: dict[str, SkillResult] = {}
        seconds: dict[str, float] = {}
        self.last_genome = None  # nothing half-scored is ever reported as this genome's
        for skill in (*self.skills, *self.reports):
            started = time.perf_counter()
            results[skill.name] = skill.evaluate(self.backend)
            seconds[skill.name] = time.perf_counter() - started
            log.info(
                "%s: %s %.3f (%d samples, %.1f s)",
                genome_id[:12],
                skill.name,
                results[skill.name].quality,
                len(results[skill.name].samples),
                seconds[skill.name],
            )
        self.last_genome, self.last_results, self.last_seconds = genome_id, results, seconds
        return {s.name: results[s.name].quality for s in self.skills}

    def samples(self, genome_id: str) -> dict[str, Any] | None:
        """Per skill: every sample of `genome_id`'s evaluation (id, correct, details) and the
        skill's own metrics; None unless it is the genome scored last."""
        if genome_id != self.last_genome:
            return None
        reported = {r.name for r in self.reports}
        return {
            name: {
                "quality": result.quality,
                "reported": name in reported,
                "seconds": round(self.last_seconds.get(name, 0.0), 3),
                "metrics": dict(getattr(result, "metrics", {}) or {}),
                "samples": [_jsonable(dataclasses.asdict(s)) for s in result.samples],
            }
            for name, result in self.last_results.items()
        }


def _jsonable(value: Any) -> Any:
    """Sample details as JSON: tuples become lists, anything else unknown its repr."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return repr(value)

"""Builds the evaluator a campaign config asks for.

Evaluators are built lazily: every pipeline stage opens the campaign, but only evaluation
tasks score models, so the breeding and archive-update tasks never load a model (nor import
torch)."""

from __future__ import annotations

from collections.abc import Callable

from cycleqd.campaign import Evaluator, Tensors
from cycleqd.config import CampaignConfig


class LazyEvaluator:
    """Builds the real evaluator on the first `evaluate` call."""

    def __init__(self, build: Callable[[], Evaluator]) -> None:
        self._build = build
        self._evaluator: Evaluator | None = None

    @property
    def evaluator(self) -> Evaluator:
        if self._evaluator is None:
            self._evaluator = self._build()
        return self._evaluator

    def evaluate(self, genome_id: str, tensors: Tensors) -> dict[str, float]:
        return self.evaluator.evaluate(genome_id, tensors)

    def weight_buffers(self):
        """The real evaluator's model tensors, where it offers them (see `Campaign`)."""
        offer = getattr(self.evaluator, "weight_buffers", None)
        return offer() if offer is not None else None


def build_evaluator(config: CampaignConfig) -> Evaluator:
    evaluation = config.evaluation
    if evaluation.world == "probe":
        return LazyEvaluator(lambda: _probe_evaluator(config))
    if evaluation.world == "tiny":
        return LazyEvaluator(lambda: _tiny_world_evaluator(config))
    raise NotImplementedError(evaluation.world)  # unreachable: the config is validated


def _probe_evaluator(config: CampaignConfig) -> Evaluator:
    from cycleqd.tiny import ProbeEvaluator

    experts = dict(config.models.experts)
    return ProbeEvaluator(experts, n_prompts=config.evaluation.probe_prompts)


def _tiny_world_evaluator(config: CampaignConfig) -> Evaluator:
    import torch

    from cycleqd.skills.tiny.skill import TinyWorldEvaluator

    evaluation = config.evaluation
    if evaluation.threads:
        torch.set_num_threads(evaluation.threads)
    # The base folder carries the world's tokenizer; the weights are swapped per genome.
    return TinyWorldEvaluator(
        config.models.base,
        n_samples=evaluation.samples,
        seed=evaluation.seed,
        level=evaluation.level,
        families=config.skill_names,
    )

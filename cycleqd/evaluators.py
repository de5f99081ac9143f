"""Builds the evaluator a campaign config asks for."""

from __future__ import annotations

from cycleqd.campaign import Evaluator
from cycleqd.config import CampaignConfig


def build_evaluator(config: CampaignConfig) -> Evaluator:
    if config.evaluation.world == "probe":
        from cycleqd.tiny import ProbeEvaluator

        return ProbeEvaluator(
            dict(config.models.experts), n_prompts=config.evaluation.probe_prompts
        )
    raise NotImplementedError(config.evaluation.world)  # unreachable: the config is validated

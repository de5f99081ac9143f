"""Builds the evaluator a campaign config asks for.

Evaluators are built lazily: every pipeline stage opens the campaign, but only evaluation
tasks score models, so the breeding and archive-update tasks never load a model (nor import
torch)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from cycleqd.config import CampaignConfig
from cycleqd.protocols import Evaluator, EvaluatorBase, Tensors, as_evaluator

if TYPE_CHECKING:
    import torch


class LazyEvaluator(EvaluatorBase):
    """Builds the real evaluator on first use."""

    def __init__(self, build: Callable[[], Evaluator]) -> None:
        self._build = build
        self._evaluator: EvaluatorBase | None = None

    @property
    def evaluator(self) -> EvaluatorBase:
        if self._evaluator is None:
            self._evaluator = as_evaluator(self._build())
        return self._evaluator

    def evaluate(self, genome_id: str, tensors: Tensors) -> dict[str, float]:
        return self.evaluator.evaluate(genome_id, tensors)

    def weight_buffers(self) -> Mapping[str, torch.Tensor] | None:
        """The real evaluator's model tensors, where it offers them (see `Campaign`)."""
        return self.evaluator.weight_buffers()

    @property
    def takes_requests(self) -> bool:  # type: ignore[override]
        return self.evaluator.takes_requests

    @property
    def reads_locations(self) -> bool:  # type: ignore[override]
        return self.evaluator.reads_locations

    def evaluate_request(self, genome_id: str, request: dict) -> dict[str, float]:
        return self.evaluator.evaluate_request(genome_id, request)

    def warm(self) -> None:
        self.evaluator.warm()

    def samples(self, genome_id: str) -> dict[str, Any] | None:
        if self._evaluator is None:  # nothing scored yet: no model is loaded to say so
            return None
        return self._evaluator.samples(genome_id)


def build_evaluator(config: CampaignConfig) -> LazyEvaluator:
    if config.evaluation.scorer == "probe":
        return LazyEvaluator(lambda: _probe_evaluator(config))
    return LazyEvaluator(lambda: skills_evaluator(config))


def _probe_evaluator(config: CampaignConfig) -> Evaluator:
    from cycleqd.probe_world import ProbeEvaluator

    experts = {skill: str(base_folder(p)) for skill, p in config.models.experts.items()}
    return ProbeEvaluator(experts, n_prompts=config.evaluation.probe_prompts)


def check_skills_can_run(config: CampaignConfig) -> None:
    """Fail fast, before any model is loaded, where the backend or the sandbox that the
    skills need cannot run here (what to install is in the message)."""
    from cycleqd.generate.factory import check_backend

    check_backend(config.evaluation.backend)
    _check_sandbox(config)


def _check_sandbox(config: CampaignConfig) -> None:
    from cycleqd.skills.registry import REGISTRY

    sandboxed = [s for s in config.skills if s.name in REGISTRY and REGISTRY[s.name].needs_sandbox]
    if sandboxed or config.evaluation.humaneval:
        from cycleqd.sandbox import get_backend

        get_backend()  # raises SandboxUnavailableError saying how to get one; never falls back


def preflight_evaluation(config: CampaignConfig) -> None:
    """What preflight checks of the scoring, before anything is written: every skill's data
    set (read and sha256-checked) and options, the database server the `db` skill talks to,
    and, where evaluation runs in this environment (not the CPU tools image, whose tasks
    never generate), the backend and the sandbox."""
    from cycleqd.generate.factory import evaluates_here

    if config.evaluation.scorer != "skills":
        return
    from cycleqd.skills.registry import build_skill, check_database

    for entry in config.skills:
        build_skill(entry)
        if entry.name == "db":
            check_database(entry)
    if evaluates_here():
        check_skills_can_run(config)


def skills_evaluator(config: CampaignConfig, skills=None, backend=None):
    """The campaign's skills over one warm backend loaded with the base model (children's
    weights are swapped in per evaluation). `skills`: entries to use instead of the config's
    (e.g. the same skills on held-out questions). `backend`: one that is already warm (a warm
    evaluator's `ServerBackend`); the config's is built otherwise."""
    from cycleqd.generate.factory import build_backend
    from cycleqd.skills.evaluator import SkillsEvaluator
    from cycleqd.skills.registry import build_skill

    if backend is None:
        check_skills_can_run(config)
    else:
        _check_sandbox(config)
    built = [build_skill(entry) for entry in (skills or config.skills)]
    if backend is None:
        backend = build_backend(
            config.evaluation.backend,
            str(base_folder(config.models.base)),
            config.dtype,
            seed=config.seed,
        )
    reports = []
    if config.evaluation.humaneval:
        from cycleqd.generate.retention import HumanEvalReport

        reports.append(HumanEvalReport(config.evaluation.humaneval))
    return SkillsEvaluator(backend, built, reports)


def base_folder(location: str):
    """A local folder for a model location (a path, or an s3:// URI copied once per pod)."""
    from cycleqd.model_sources import local_folder

    return local_folder(location)

"""Skills turn a model (behind a ChatBackend) into a quality in [0, 1] plus per-sample details."""

from cycleqd.skills.base import SampleResult, Skill, SkillResult

__all__ = ["SampleResult", "Skill", "SkillResult"]

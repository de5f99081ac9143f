"""What every skill returns, and the protocol the campaign's evaluator calls."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from cycleqd.generate.base import ChatBackend


@dataclass
class SampleResult:
    sample_id: str
    correct: bool
    detail: dict[str, Any] = field(default_factory=dict)  # transcript, error, checker output


@dataclass
class SkillResult:
    skill: str
    samples: list[SampleResult]

    @property
    def quality(self) -> float:
        return sum(s.correct for s in self.samples) / len(self.samples) if self.samples else 0.0


class Skill(Protocol):
    name: str

    def evaluate(self, backend: ChatBackend) -> SkillResult:
        """Run every sample of the skill's data set against the backend (greedy)."""
        ...

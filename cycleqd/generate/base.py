"""The one interface every generation backend implements, and that skills call.

Multi-turn skills call `generate` round by round with all of their still-open episodes at
once, so that a backend can batch them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypedDict


class Message(TypedDict):
    role: str  # "system" | "user" | "assistant"
    content: str


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 512
    temperature: float = 0.0  # 0 = greedy: the same model gives the same text
    stop: tuple[str, ...] = field(default_factory=tuple)


class ChatBackend(Protocol):
    def generate(
        self, conversations: Sequence[Sequence[Message]], params: SamplingParams
    ) -> list[str]:
        """One assistant reply per conversation, in order; stop strings are cut off."""
        ...

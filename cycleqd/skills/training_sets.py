"""Training sets derived from each skill's own data, in the skill's exact prompt and action format.

    ts = training_set(CodingSkillConfig(name="coding", data="/data/cycleqd"), size=None)
    ts.write_jsonl("coding.jsonl")          # {"messages": [...], "id": "Mbpp/2"} per line

Every row is a conversation that the skill itself produced and scored correct: the messages are
the ones the skill sends a model when it is scored (system/user turns, observations), and the
assistant turns are replies that the skill's own parser reads and its own checker accepts. The
episodes are *replayed*: the skill's `evaluate` runs over a backend (`_Replay`) that answers
each conversation with the task's reference solution, so prompts, observations (sandbox output,
database results) and scoring come from the same code as in a campaign, byte for byte.

The real skills (coding, db, os) use only the *training* part of the fixed hash split
(`cycleqd.skills.split`): scoring them with `part: evaluation` never shows a model a task it was
trained on. Their options apply as in scoring (`data`, coding's `inputs`/`time_factor`, db's
`url`/`max_rounds`/`statement_timeout_s`, os's `one_shot`/`max_rounds`/`action_timeout_s`);
the options that pick scored tasks (`part`, `limit`, `seed`, `task_ids`, `indices`, `subset`)
do not. `size` keeps the first `size` accepted rows in data-set order (the tasks are replayed in
chunks until that many are accepted); None keeps all.

- coding (MBPP+): system + user prompt as `CodingSkill.conversations()` builds it; assistant =
  the canonical solution in a ```python block. Kept when `CodingSkill.score_reply` (sandboxed,
  on the `inputs` option's inputs, against the canonical solution's own outputs) says correct.
  Rejected: "reference failed" (the canonical solution fails in the sandbox, so no task can be
  scored), "checker failed".
- db (DBBench): AgentBench's prompt (instructions, "Ok.", question); assistant = an
  ``Action: Operation`` with the sample's reference SQL (`DBSample.reference_sql`: the query
  rows' ``sql.query``; the INSERT/UPDATE rows' reference statement is their ``label[0]``, which
  the db skill documents as the statement that reproduces ``answer_md5``); user = the episode's
  raw MySQL result; assistant = ``Action: Answer`` with ``Final Answer: [...]``, the values of
  the result's rows (``["none"]`` when a query finds no row, as DBBench's labels write it; a
  mutation's result is ``[]``, so is its answer: AgentBench scores a mutation by the table's
  hash, and the answer "can be anything"). Kept when the db skill scores
  the episode correct (the label for queries, the table's md5 for mutations). Rejected: "no
  reference", "table setup failed" (the sample's table cannot be built as AgentBench builds it),
  "reference SQL failed" (the SQL gives a MySQL error), "result truncated" (over the 800
  characters a model is shown), "result unreadable", "replay mismatch" (ran, but the checker
  says wrong). Needs the database server of the `url` option.
- os (AgentBench OS): the skill's prompt (with its one-shot example when `one_shot`), the
  task's problem; assistant = ``Act: bash`` with the task's ``example_script``; user = the
  skill's observation of its output in the task's own sandbox episode (init and start scripts
  first); assistant = ``Act: answer(<output, stripped>)``, or ``Act: finish`` when the output is
  empty (the operation tasks). Kept when the skill's checker (match / check scripts, run in the
  same sandbox) passes. Rejected: "no reference" (no example script: all the `match` tasks),
  "example not bash", "example not expressible" (the skill's action parser would not read the
  script back), "output truncated", "multi-line output" (an answer action holds one line),
  "answer not expressible", "sandbox error", "checker failed".
- tiny_code / tiny_sql / tiny_shell: exactly the tiny world's expert fine-tuning set
  (`cycleqd.skills.tiny.data.skill_examples(family, 4000, seed=0, level)`, as
  `cycleqd.skills.tiny.train._train_expert` draws it: the generator's *train* split, disjoint
  from every evaluation question by construction); `size` replaces the 4000; the options'
  `level` is used. Ids are the samples' ids (``tiny_code-<n>-<template>``).

Note that the prompts hold assistant turns that are not the task's solution (db's "Ok.", os's
one-shot example): they are part of the skill's prompt, and a trainer that learns every
assistant turn learns them too.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cycleqd.errors import CycleQDError
from cycleqd.generate.base import Message, SamplingParams

TINY_FAMILIES = ("tiny_code", "tiny_sql", "tiny_shell")
TINY_SIZE = 4000  # WorldConfig.n_skill: examples per tiny expert
TINY_SEED = 0  # WorldConfig.seed: the seed the tiny experts' sets are drawn with

# The fixed text around the reference solutions (the skills read only the action part).
CODING_REPLY = "```python\n{code}\n```"
DB_OPERATION = "I will run this SQL statement on the table.\nAction: Operation\n```sql\n{sql}\n```"
DB_QUERY_ANSWER = "The result of the query answers the question.\nAction: Answer\nFinal Answer: {}"
DB_MUTATION_ANSWER = "The table has been changed as asked.\nAction: Answer\nFinal Answer: {}"
NO_ROWS = "none"
OS_BASH = (
    "Think: I will run a script that does what the task asks.\n\nAct: bash\n\n```bash\n{}\n```"
)
OS_ANSWER = "Think: The output of the script is the answer.\n\nAct: answer({})"
OS_FINISH = "Think: The script has done what the task asks.\n\nAct: finish"

Row = dict[str, Any]
Outcome = tuple[Row | None, str | None]  # (the row, or None and why it was rejected)


@dataclass
class TrainingSet:
    skill: str
    rows: list[dict]  # {"messages": [{"role":..., "content":...}, ...], "id": task id}
    candidates: int  # tasks of the training part considered
    rejected: dict[str, int] = field(default_factory=dict)  # reason -> count
    seconds: float = 0.0

    @property
    def kept(self) -> int:
        return len(self.rows)

    def stats(self) -> dict[str, Any]:
        """The counts, for a log or a report (no rows)."""
        return {
            "skill": self.skill,
            "kept": self.kept,
            "candidates": self.candidates,
            "rejected": dict(self.rejected),
            "seconds": round(self.seconds, 3),
        }

    def summary(self) -> str:
        why = ", ".join(f"{n} {reason}" for reason, n in sorted(self.rejected.items()))
        return (
            f"{self.skill}: kept {self.kept} of {self.candidates} candidates"
            f"{f'; rejected: {why}' if why else ''} ({self.seconds:.1f} s)"
        )

    def jsonl(self) -> bytes:
        """The rows as chat JSONL (`{"messages": [...], "id": ...}` per line)."""
        return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in self.rows).encode()

    def write_jsonl(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.jsonl())
        return path


def training_set(options: Any, size: int | None = None) -> TrainingSet:
    """The training set of the skill that `options` (a registry options entry) configures."""
    if size is not None and size < 1:
        raise CycleQDError(f"size must be at least 1 (or None for all), got {size}")
    started = time.monotonic()
    name = options.name
    if name in TINY_FAMILIES:
        rows, candidates, rejected = _tiny(options, size)
    elif name in _REAL:
        candidates_of, replay = _REAL[name]
        rows, candidates, rejected = _collect(candidates_of(options), size, replay, options)
    else:
        raise CycleQDError(f"skill {name!r} has no training set")
    return TrainingSet(name, rows, candidates, dict(rejected), time.monotonic() - started)


# ------------------------------------------------------------------------------- plumbing


def _collect(
    candidates: Sequence[Any],
    size: int | None,
    replay: Callable[[Any, Sequence[Any]], list[Outcome]],
    options: Any,
) -> tuple[list[Row], int, Counter]:
    """Replay the candidates in data-set order, in chunks, until `size` rows are accepted.
    Counts stop at the candidate that completes `size`: kept + rejected == candidates."""
    rows: list[Row] = []
    rejected: Counter = Counter()
    considered = 0
    position = 0
    while position < len(candidates) and (size is None or len(rows) < size):
        if size is None:
            chunk = candidates[position:]
        else:
            need = size - len(rows)
            chunk = candidates[position : position + need + max(2, need // 4)]
        position += len(chunk)
        for row, reason in replay(options, chunk):
            if size is not None and len(rows) >= size:
                break
            considered += 1
            if row is not None:
                rows.append(row)
            else:
                rejected[reason or "rejected"] += 1
    return rows, considered, rejected


class _Replay:
    """A ChatBackend that plays each conversation's reference solution: `policies[key]` gives
    the reply for the conversation whose message `key_at` holds `key`, at its `turn`-th reply
    (0 for the first; the `prefix` assistant turns of the skill's own prompt do not count)."""

    def __init__(
        self, policies: dict[str, Callable[[int, Sequence[Message]], str]], key_at: int, prefix: int
    ) -> None:
        self.policies, self.key_at, self.prefix = policies, key_at, prefix

    def generate(
        self, conversations: Sequence[Sequence[Message]], params: SamplingParams
    ) -> list[str]:
        replies = []
        for conv in conversations:
            turn = sum(m["role"] == "assistant" for m in conv) - self.prefix
            replies.append(self.policies[conv[self.key_at]["content"]](turn, conv))
        return replies


def _unique_batches(items: Sequence[Any], key: Callable[[Any], str]) -> list[list[Any]]:
    """Items split into batches in which no two share a key (the replay tells conversations
    apart by their problem text; a few tasks share one)."""
    batches: list[tuple[set[str], list[Any]]] = []
    for item in items:
        k = key(item)
        for seen, batch in batches:
            if k not in seen:
                seen.add(k)
                batch.append(item)
                break
        else:
            batches.append(({k}, [item]))
    return [batch for _, batch in batches]


def _message(role: str, content: str) -> Message:
    return {"role": role, "content": content}


# ----------------------------------------------------------------------------------- tiny


def _tiny(options: Any, size: int | None) -> tuple[list[Row], int, Counter]:
    from cycleqd.skills.tiny.tasks import generate

    n = TINY_SIZE if size is None else size
    # What skill_examples(family, n, seed, level) returns, with each sample's id kept.
    samples = generate(options.name, n, seed=TINY_SEED, split="train", level=options.level)
    return [{**s.chat(), "id": s.sample_id} for s in samples], n, Counter()


# --------------------------------------------------------------------------------- coding


def _coding_candidates(options: Any) -> list[dict]:
    from cycleqd.skills.data import MBPP_PLUS, load_jsonl
    from cycleqd.skills.split import coding_task_id, select

    return select("coding", load_jsonl(options.data, MBPP_PLUS), coding_task_id, "training")


def coding_reply(canonical_solution: str) -> str:
    return CODING_REPLY.format(code=canonical_solution.strip("\n"))


def _coding_replay(options: Any, rows: Sequence[dict]) -> list[Outcome]:
    from cycleqd.skills.registry import coding_skill

    outcomes: dict[int, Outcome] = {}
    runnable = []
    for i, row in enumerate(rows):
        if str(row.get("canonical_solution") or "").strip():
            runnable.append(i)
        else:
            outcomes[i] = (None, "no reference")
    if runnable:
        skill = coding_skill(options, [rows[i] for i in runnable])
        replies = [coding_reply(t.canonical_solution) for t in skill.tasks]
        result = skill.score(replies)
        for i, conv, reply, sample in zip(
            runnable, skill.conversations(), replies, result.samples, strict=True
        ):
            if sample.correct:
                messages = [*conv, _message("assistant", reply)]
                outcomes[i] = ({"messages": messages, "id": sample.sample_id}, None)
            elif str(sample.detail.get("error", "")).startswith("reference unavailable"):
                outcomes[i] = (None, "reference failed")
            else:
                outcomes[i] = (None, "checker failed")
    return [outcomes[i] for i in range(len(rows))]


# ------------------------------------------------------------------------------------- db


def _db_candidates(options: Any) -> list[Any]:
    from cycleqd.skills.data import DBBENCH_DEV, load_jsonl
    from cycleqd.skills.db import load_dbbench
    from cycleqd.skills.split import select

    samples = load_dbbench(load_jsonl(options.data, DBBENCH_DEV))
    return select("db", samples, lambda s: s.sample_id, "training")


def result_values(observation: str) -> tuple[list[str] | None, str | None]:
    """The values of a DBBench observation's rows, flattened, as strings (a Decimal as its
    digits); or None and why not (an error, a truncated or an unreadable result)."""
    from cycleqd.skills.db_sandbox import TRUNCATED

    if observation.endswith(TRUNCATED):
        return None, "result truncated"
    try:
        tree = ast.parse(observation, mode="eval")
    except SyntaxError:
        return None, "reference SQL failed"
    if not isinstance(tree.body, ast.List):
        return None, "reference SQL failed"

    class _Decimals(ast.NodeTransformer):
        def visit_Call(self, node: ast.Call) -> ast.AST:
            if (
                isinstance(node.func, ast.Name)
                and node.func.id == "Decimal"
                and len(node.args) == 1
                and not node.keywords
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
            ):
                return ast.copy_location(ast.Constant(node.args[0].value), node)
            return node

    try:
        rows = ast.literal_eval(_Decimals().visit(tree).body)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return None, "result unreadable"  # e.g. datetime values
    if not all(isinstance(row, tuple) for row in rows):
        return None, "result unreadable"
    values = []
    for row in rows:
        for v in row:
            if not isinstance(v, str | int | float) and v is not None:
                return None, "result unreadable"
            values.append(str(v))
    return values, None


def _db_replay(options: Any, samples: Sequence[Any]) -> list[Outcome]:
    from cycleqd.skills.db import DBSkill, SandboxUnavailable
    from cycleqd.skills.registry import check_database, db_config

    outcomes: dict[str, Outcome] = {}
    runnable = []
    for s in samples:
        if (s.reference_sql or "").strip():
            runnable.append(s)
        else:
            outcomes[s.sample_id] = (None, "no reference")
    if runnable:
        try:
            check_database(options)
        except CycleQDError as exc:
            raise CycleQDError(
                f"the db training set replays each reference SQL on a MySQL/MariaDB server "
                f"(e.g. `mariadbd`, or `docker run -e MARIADB_ALLOW_EMPTY_ROOT_PASSWORD=1 -p "
                f"3306:3306 mariadb`; the skill's url option names it): {exc}"
            ) from None
        config = dataclasses.replace(db_config(options), subset="all", limit=None)
        for batch in _unique_batches(runnable, lambda s: s.question):
            reasons: dict[str, str] = {}
            policies = {s.question: _db_policy(s, reasons) for s in batch}
            skill = DBSkill(batch, config)
            try:
                result = skill.evaluate(_Replay(policies, key_at=2, prefix=1))
            except SandboxUnavailable as exc:
                raise CycleQDError(f"the database server failed during the replay: {exc}") from None
            for s, sample in zip(batch, result.samples, strict=True):
                detail = sample.detail
                if detail.get("setup_errors"):
                    outcomes[s.sample_id] = (None, "table setup failed")
                elif s.sample_id in reasons:
                    outcomes[s.sample_id] = (None, reasons[s.sample_id])
                elif not sample.correct or detail.get("status") != "answered":
                    outcomes[s.sample_id] = (None, "replay mismatch")
                else:
                    messages = DBSkill.initial_messages(s)[:2] + list(detail["transcript"])
                    outcomes[s.sample_id] = ({"messages": messages, "id": s.sample_id}, None)
    return [outcomes[s.sample_id] for s in samples]


def _db_policy(sample: Any, reasons: dict[str, str]) -> Callable[[int, Sequence[Message]], str]:
    sql = sample.reference_sql.strip().replace("\n", " ")  # "Your SQL should be in one line."
    template = DB_MUTATION_ANSWER if sample.is_mutation else DB_QUERY_ANSWER

    def reply(turn: int, conv: Sequence[Message]) -> str:
        if turn == 0:
            return DB_OPERATION.format(sql=sql)
        values, why = result_values(conv[-1]["content"]) if turn == 1 else (None, "replay")
        if values is None:
            reasons[sample.sample_id] = why or "replay mismatch"
            values = []
        elif not values and not sample.is_mutation:
            values = [NO_ROWS]  # DBBench's label of a question whose query finds nothing
        return template.format(json.dumps(values, ensure_ascii=False))

    return reply


# ------------------------------------------------------------------------------------- os


def _os_candidates(options: Any) -> list[dict]:
    from cycleqd.skills.data import AGENTBENCH_OS, load_jsonl
    from cycleqd.skills.split import os_task_id, select

    return select("os", load_jsonl(options.data, AGENTBENCH_OS), os_task_id, "training")


def _os_replay(options: Any, rows: Sequence[dict]) -> list[Outcome]:
    from cycleqd.skills.os_skill import ONE_SHOT, OSTask, initial_messages, parse_action
    from cycleqd.skills.registry import os_skill
    from cycleqd.skills.split import os_task_id

    outcomes: dict[str, Outcome] = {}
    runnable: list[dict] = []
    for row in rows:
        task = OSTask.from_row(row)
        tid = os_task_id(row)
        example = task.example_script
        if example is None or not example.code.strip():
            outcomes[tid] = (None, "no reference")
        elif example.language != "bash":
            outcomes[tid] = (None, "example not bash")
        elif parse_action(OS_BASH.format(_script(example))).content != _script(example):
            outcomes[tid] = (None, "example not expressible")
        else:
            runnable.append(row)
    opening = initial_messages("", options.one_shot)
    key_at = len(opening) - 1  # the message that states the task's problem
    assistants_before = sum(m["role"] == "assistant" for m in opening)
    shown_from = len(ONE_SHOT) if options.one_shot else 0  # where the skill's transcript starts

    def problem(description: str) -> str:
        return initial_messages(description, options.one_shot)[-1]["content"]

    for batch in _unique_batches(runnable, lambda r: problem(str(r["description"]))):
        reasons: dict[str, str] = {}
        skill = os_skill(options, batch)
        policies = {problem(t.description): _os_policy(t, os_task_id(r), reasons)
                    for t, r in zip(skill.tasks, batch, strict=True)}  # fmt: skip
        result = skill.evaluate(_Replay(policies, key_at=key_at, prefix=assistants_before))
        for task, row, sample in zip(skill.tasks, batch, result.samples, strict=True):
            tid = os_task_id(row)
            detail = sample.detail
            if tid in reasons:
                outcomes[tid] = (None, reasons[tid])
            elif detail.get("error"):
                outcomes[tid] = (None, "sandbox error")
            elif not sample.correct:
                outcomes[tid] = (None, "checker failed")
            else:
                head = initial_messages(task.description, options.one_shot)[:shown_from]
                messages = head + list(detail["transcript"])
                outcomes[tid] = ({"messages": messages, "id": tid}, None)
    return [outcomes[os_task_id(row)] for row in rows]


def _script(example: Any) -> str:
    return example.code.strip("\n")


def _os_policy(task: Any, tid: str, reasons: dict[str, str]) -> Callable:
    from cycleqd.skills.os_skill import EMPTY_OUTPUT, OUTPUT_PREFIX, TRUNCATED, parse_action

    def reject(why: str) -> str:
        reasons.setdefault(tid, why)
        return OS_FINISH

    def reply(turn: int, conv: Sequence[Message]) -> str:
        if turn == 0:
            return OS_BASH.format(_script(task.example_script))
        if turn > 1:
            return reject("replay mismatch")
        observation = conv[-1]["content"]
        if observation == EMPTY_OUTPUT:
            return OS_FINISH  # an operation: nothing to answer
        if observation.endswith(TRUNCATED) or not observation.startswith(OUTPUT_PREFIX):
            return reject("output truncated")
        answer = observation[len(OUTPUT_PREFIX) :].strip()
        if not answer:
            return OS_FINISH
        if "\n" in answer or "\r" in answer:
            return reject("multi-line output")
        text = OS_ANSWER.format(answer)
        action = parse_action(text)
        if action.kind != "answer" or action.content != answer:
            return reject("answer not expressible")
        return text

    return reply


_REAL: dict[str, tuple[Callable[[Any], Sequence[Any]], Callable[[Any, Sequence[Any]], list]]] = {
    "coding": (_coding_candidates, _coding_replay),
    "db": (_db_candidates, _db_replay),
    "os": (_os_candidates, _os_replay),
}

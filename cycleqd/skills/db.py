"""The database skill: AgentBench DBBench, multi-turn, scored as AgentBench and CycleQD score it.

Protocol (AgentBench's `dbbench` task, as run by CycleQD's `fishfarm` evaluator):

- The conversation starts with AgentBench's instructions as a *user* message, an assistant
  ``Ok.``, then ``description + "\\n" + add_description`` (the question, the table's name and
  headers). There is no system message.
- Every round, all open episodes go to the backend in one `generate` call (greedy, 512 new
  tokens). A reply whose first ``Action: <x>`` line says ``Operation`` must hold a
  ```` ```sql\\n...\\n``` ```` block: its text (stripped, newlines turned into spaces) runs in the
  episode's own database and the raw result comes back as the next user message (see
  `db_sandbox`: the repr of the fetched rows, or the error, cut at 800 characters). An Operation
  without a ``sql`` block ends the episode with no answer. Any other reply ends the episode: its
  answer is the rest of the line after ``\\nFinal Answer:`` (empty if there is none, a failure).
  At most `max_rounds` (5) statements run; the reply after the fifth is final.
- Scoring. Queries (types other, counting, comparison, ranking, aggregation-*): AgentBench's
  comparison, exactly: the answer text is parsed as a Python literal (AgentBench calls `eval`;
  `ast.literal_eval` accepts the same lists, tuples and strings without running code) and turned
  into a list (a bare string becomes its characters, a bare number or anything unparsable becomes
  ``[text]``); if the answer and the label both have one element they match when their `float`s
  are equal (no tolerance: ``"12"``, ``"12.0"`` and ``12`` match; ``12.0001`` does not), else when
  the strings are equal; otherwise the answer and the label must be equal as sets (order and
  duplicates ignored, no type coercion). INSERT/UPDATE/DELETE: after the episode (whatever its
  status) the table is hashed with AgentBench's SQL, ``select md5(group_concat(rowhash order by
  rowhash)) from (select substring(md5(concat_ws(',', <columns>)), 1, 5) as rowhash from <t>)``,
  and the result's repr (``[('<hex>',)]``) must equal the sample's ``answer_md5``.
- Quality = CycleQD's ``overall_cat_accuracy``: correct samples / samples, pooled over AgentBench's
  SELECT (every non-mutation type), INSERT and UPDATE categories, i.e. plain accuracy. The
  per-type accuracies (``<type>_accuracy``, with SELECT covering all query types) are in
  `DBSkillResult.metrics`.
- Tables are built as AgentBench builds them: every column ``TEXT`` whatever its declared type,
  every value inserted as ``str(value)``. Its quirks are kept: in the dev set, samples 13 and 14
  declare a column twice (CREATE TABLE fails: the episode has no table) and samples 17 and 77
  have ragged rows (the INSERT fails: the table is empty); `SampleResult.detail["setup_errors"]`
  says so.

The data's own limits (measured by replaying each sample's reference SQL on MariaDB 10.11, see
tests/skills/test_db_skill.py): every INSERT and 117 of 120 UPDATEs reproduce ``answer_md5``
(sample 225's hash matches no state of its table; 278 and 295 need ``sql_mode=""``: their
UPDATEs compare TEXT with numbers, which MySQL 8's default strict mode, kept here, rejects), but
only about a quarter of the reference SELECTs return the label (most use double quotes or
brackets for names, or lost the blanks between words), so a perfect model cannot be measured by
replaying them; answering the labels themselves scores every query.

Departures from AgentBench, all deliberate: each episode gets its own database and account
(AgentBench named the database after the table, so that samples sharing a table name clobbered
each other: the 19 dev samples that the official CycleQD code leaves out, `CYCLEQD_EXCLUDED`, are
exactly such samples; ``subset="cycleqd"`` reproduces that selection), statements are bounded in
time, and a block with several statements runs only its first (AgentBench's server ran them all
and showed "Commands out of sync"; with ``multi_statements="agentbench"`` the model sees that same
error and the first statement's data changes are rolled back, as they were there). Error messages
name the episode's database ``cycleqd_<random>`` where AgentBench's named the table.
"""

from __future__ import annotations

import ast
import json
import logging
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cycleqd.generate.base import ChatBackend, Message, SamplingParams
from cycleqd.skills.base import SampleResult, SkillResult
from cycleqd.skills.db_sandbox import (
    Episode,
    MultiStatements,
    SandboxOptions,
    SandboxUnavailable,
    TableSpec,
    open_sandbox,
)

log = logging.getLogger(__name__)

# AgentBench DBBench's instructions (THUDM/AgentBench, src/server/tasks/dbbench), verbatim; CycleQD
# sends the same text.
INSTRUCTIONS = (
    "\n"
    "I will ask you a question, then you should help me operate a MySQL database with SQL to "
    "answer the question.\n"
    "You have to explain the problem and your solution to me and write down your thoughts.\n"
    "After thinking and explaining thoroughly, every round you can choose to operate or to "
    "answer.\n"
    "your operation should be like this:\n"
    "Action: Operation\n"
    "```sql\n"
    "SELECT * FROM table WHERE condition;\n"
    "```\n"
    "You MUST put SQL in markdown format without any other comments. Your SQL should be in one "
    "line.\n"
    "Every time you can only execute one SQL statement. I will only execute the statement in "
    "the first SQL code block. Every time you write a SQL, I will execute it for you and give "
    "you the output.\n"
    "If you are done operating, and you want to commit your final answer, then write down:\n"
    "Action: Answer\n"
    'Final Answer: ["ANSWER1", "ANSWER2", ...]\n'
    "DO NOT write this pattern unless you are sure about your answer. I expect an accurate and "
    "correct answer.\n"
    "Your answer should be accurate. Your answer must be exactly the same as the correct "
    "answer.\n"
    "If the question is about modifying the database, then after done operation, your answer "
    "field can be anything.\n"
    "If your response cannot match any pattern I mentioned earlier, you will be judged as FAIL "
    "immediately.\n"
    "Your input will be raw MySQL response, you have to deal with it by yourself.\n"
)
MUTATION_TYPES = ("INSERT", "DELETE", "UPDATE")
# AgentBench's metric categories, in its order; "SELECT" covers every type but INSERT and UPDATE.
METRIC_TYPES = (
    "other",
    "counting",
    "comparison",
    "ranking",
    "aggregation-SUM",
    "aggregation-MIN",
    "aggregation-MAX",
    "aggregation-AVG",
    "SELECT",
    "INSERT",
    "UPDATE",
)
# Dev-set rows that SakanaAI/CycleQD's tasks/agentbench_db.py does not evaluate (its `_task_ids`
# skip them): all of them share their table name with other samples.
CYCLEQD_EXCLUDED = (96, 115, 144, 159, 177, 204, 212, 232, 261, 270, 291, 295, 296, 307, 323,
                    338, 341, 348, 358)  # fmt: skip

_ACTION = re.compile(r"Action: (.*?)\n")
_SQL_BLOCK = re.compile(r"```sql\n([\s\S]*?)\n```")
_FINAL_ANSWER = re.compile(r"\nFinal Answer:(.*)")


# ------------------------------------------------------------------------------------ data


@dataclass(frozen=True)
class DBSample:
    index: int
    description: str
    add_description: str
    type: str  # the first element of the row's `type`
    table: TableSpec
    label: tuple[str, ...] | None  # queries: the expected answer values
    answer_md5: str | None  # mutations: the expected table hash, as AgentBench renders it
    reference_sql: str | None  # queries: sql.query; mutations: label[0]

    @property
    def sample_id(self) -> str:
        return str(self.index)

    @property
    def is_mutation(self) -> bool:
        return self.type in MUTATION_TYPES

    @property
    def question(self) -> str:
        return self.description + "\n" + self.add_description


def parse_sample(index: int, raw: Mapping[str, Any]) -> DBSample:
    """One row of AgentBench's dbbench jsonl; errors name the row and the field."""
    where = f"dbbench row {index}"
    try:
        table = raw["table"]
        info = table["table_info"]
        spec = TableSpec(
            name=str(table["table_name"]),
            columns=tuple(str(c["name"]) for c in info["columns"]),
            rows=tuple(tuple(row) for row in info["rows"]),
        )
        typ = str(raw["type"][0])
        description, add_description = str(raw["description"]), str(raw["add_description"])
    except (KeyError, IndexError, TypeError) as exc:
        raise ValueError(
            f"{where}: expected description, add_description, type[0] and "
            f"table.{{table_name, table_info.columns[].name, table_info.rows}}: {exc!r}"
        ) from exc
    label = raw.get("label")
    if typ in MUTATION_TYPES:
        if not isinstance(raw.get("answer_md5"), str):
            raise ValueError(f"{where}: a {typ} sample needs answer_md5 (the table hash)")
        ref = label[0] if isinstance(label, list) and label else None
        return DBSample(index, description, add_description, typ, spec, None, raw["answer_md5"],
                        ref)  # fmt: skip
    if not isinstance(label, list):
        raise ValueError(f"{where}: a {typ} query needs label, a list of answer values")
    sql = raw.get("sql")
    ref = sql.get("query") if isinstance(sql, dict) else None
    return DBSample(index, description, add_description, typ, spec,
                    tuple(str(v) for v in label), None, ref)  # fmt: skip


def load_dbbench(source: str | Path | Iterable[Mapping[str, Any]]) -> list[DBSample]:
    """Samples from a jsonl file (AgentBench's format) or from already parsed rows."""
    if isinstance(source, str | Path):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"DBBench data not found: {path}")
        with path.open(encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    else:
        rows = list(source)
    return [parse_sample(i, row) for i, row in enumerate(rows)]


# --------------------------------------------------------------------------------- scoring


def agentbench_match(answer: str, label: Sequence[str]) -> bool:
    """AgentBench's query comparison (see the module docstring), `eval` made safe."""
    try:
        ans = list(ast.literal_eval(answer.lstrip(" \t")))
    except Exception:
        ans = [answer]
    cor = list(label)
    if len(ans) == 1 and len(cor) == 1:
        try:
            return float(ans[0]) == float(cor[0])
        except (ValueError, TypeError, OverflowError):
            return bool(ans[0] == cor[0])
    try:
        return set(ans) == set(cor)
    except TypeError:  # unhashable elements
        return False


def agentbench_metrics(results: Sequence[tuple[str, bool]]) -> dict[str, float]:
    """(type, correct) per sample -> AgentBench's per-type accuracies, CycleQD's
    overall_cat_accuracy, and counts. A type with no sample scores 0 (AgentBench)."""
    metrics: dict[str, float] = {}
    pooled: list[bool] = []
    for typ in METRIC_TYPES:
        if typ == "SELECT":
            hits = [ok for t, ok in results if t not in ("INSERT", "UPDATE")]
        else:
            hits = [ok for t, ok in results if t == typ]
        metrics[f"{typ}_accuracy"] = sum(hits) / len(hits) if hits else 0.0
        metrics[f"{typ}_count"] = float(len(hits))
        if typ in ("SELECT", "INSERT", "UPDATE"):
            pooled.extend(hits)
    metrics["overall_cat_accuracy"] = sum(pooled) / len(pooled) if pooled else 0.0
    return metrics


# ----------------------------------------------------------------------------------- skill


@dataclass(frozen=True)
class DBConfig:
    url: str = "mysql://root@127.0.0.1:3306"  # or sqlite:// for a tiny embedded world
    max_rounds: int = 5
    max_new_tokens: int = 512
    statement_timeout_s: float = 5.0
    connect_timeout_s: float = 10.0
    result_chars: int = 800
    workers: int = 4  # threads that set up databases and run statements
    multi_statements: MultiStatements = "agentbench"
    sql_mode: str | None = None  # None: MySQL 8's default (AgentBench's server)
    subset: Literal["all", "cycleqd"] = "all"
    limit: int | None = None  # evaluate only the first `limit` samples (after `subset`)

    def __post_init__(self) -> None:
        if self.max_rounds < 0:
            raise ValueError(f"max_rounds must be >= 0 (AgentBench: 5), got {self.max_rounds}")
        if self.max_new_tokens < 1 or self.workers < 1:
            raise ValueError("max_new_tokens and workers must be >= 1")
        if self.subset not in ("all", "cycleqd"):
            raise ValueError(f"subset must be 'all' or 'cycleqd', got {self.subset!r}")
        if self.limit is not None and self.limit < 0:
            raise ValueError(f"limit must be >= 0 or None, got {self.limit}")
        self.sandbox_options()  # validates the rest

    def sandbox_options(self) -> SandboxOptions:
        extra = {} if self.sql_mode is None else {"sql_mode": self.sql_mode}
        return SandboxOptions(
            statement_timeout_s=self.statement_timeout_s,
            connect_timeout_s=self.connect_timeout_s,
            result_chars=self.result_chars,
            multi_statements=self.multi_statements,
            **extra,
        )


@dataclass
class DBSkillResult(SkillResult):
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class _Run:
    sample: DBSample
    messages: list[Message]
    db: Episode | None = None
    setup_errors: list[str] = field(default_factory=list)
    sql: list[str] = field(default_factory=list)
    pending_sql: str | None = None
    rounds: int = 0
    status: str = ""
    answer: str = ""


class DBSkill:
    """AgentBench DBBench against a ChatBackend; one fresh database per sample."""

    def __init__(
        self, samples: Sequence[DBSample], config: DBConfig | None = None, name: str = "db"
    ) -> None:
        self.name = name
        self.config = config or DBConfig()
        picked = list(samples)
        if self.config.subset == "cycleqd":
            excluded = set(CYCLEQD_EXCLUDED)
            picked = [s for s in picked if s.index not in excluded]
        if self.config.limit is not None:
            picked = picked[: self.config.limit]
        self.samples = picked

    @classmethod
    def from_jsonl(cls, path: str | Path, config: DBConfig | None = None, name: str = "db"):
        return cls(load_dbbench(path), config, name)

    @staticmethod
    def initial_messages(sample: DBSample) -> list[Message]:
        return [
            {"role": "user", "content": INSTRUCTIONS},
            {"role": "assistant", "content": "Ok."},
            {"role": "user", "content": sample.question},
        ]

    def evaluate(self, backend: ChatBackend) -> DBSkillResult:
        """Run every sample; raises `SandboxUnavailable` when the database server fails (rather
        than scoring the model 0), and drops every database it made in any case."""
        cfg = self.config
        started = time.monotonic()
        params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=0.0)
        runs = [_Run(s, self.initial_messages(s)) for s in self.samples]
        sandbox = open_sandbox(cfg.url, cfg.sandbox_options())
        pool = ThreadPoolExecutor(max_workers=cfg.workers, thread_name_prefix="cycleqd-db")
        try:
            created = _map(pool, sandbox.create, [r.sample.table for r in runs])
            for run, outcome in zip(runs, created, strict=True):
                if not isinstance(outcome, BaseException):
                    run.db, run.setup_errors = outcome
            _raise_first(created)
            open_runs = list(runs)
            rounds = 0
            while open_runs and rounds <= cfg.max_rounds:
                replies = backend.generate([r.messages for r in open_runs], params)
                if len(replies) != len(open_runs):
                    raise RuntimeError(
                        f"backend returned {len(replies)} replies for {len(open_runs)} "
                        "conversations"
                    )
                executing: list[_Run] = []
                for run, reply in zip(open_runs, replies, strict=True):
                    reply = reply if isinstance(reply, str) else ""
                    run.messages.append({"role": "assistant", "content": reply})
                    if self._step(run, reply, rounds):
                        executing.append(run)
                observations = _map(pool, _execute_pending, executing)
                _raise_first(observations, SandboxUnavailable)
                for run, obs in zip(executing, observations, strict=True):
                    # AgentBench shows any exception's text as the result, too.
                    text = str(obs) if isinstance(obs, BaseException) else obs
                    run.messages.append({"role": "user", "content": text or ""})
                    run.rounds += 1
                open_runs = executing
                rounds += 1
            _raise_first(_map(pool, _finish, runs))
        finally:
            for run in runs:
                if run.db is not None:
                    try:
                        run.db.drop()
                    except Exception as exc:  # keep dropping the others
                        log.warning("could not drop a DBBench database: %s", exc)
            pool.shutdown(wait=True)
            sandbox.close()
        return self._result(runs, time.monotonic() - started)

    def _step(self, run: _Run, reply: str, rounds: int) -> bool:
        """Advance one episode by one reply; True when it has SQL to run."""
        action = _ACTION.search(reply)
        if action and action.group(1) == "Operation" and rounds < self.config.max_rounds:
            block = _SQL_BLOCK.search(reply)
            if block is None:
                run.status = "no_sql_block"
                return False
            run.pending_sql = block.group(1).strip().replace("\n", " ")
            run.sql.append(run.pending_sql)
            return True
        found = _FINAL_ANSWER.search(reply)
        run.answer = found.group(1) if found else ""
        if found:
            run.status = "answered"
        elif rounds >= self.config.max_rounds:
            run.status = "round_limit"
        else:
            run.status = "no_answer"
        return False

    def _result(self, runs: Sequence[_Run], seconds: float) -> DBSkillResult:
        samples: list[SampleResult] = []
        for run in runs:
            s = run.sample
            if s.is_mutation:
                correct = run.answer == s.answer_md5
            else:
                correct = agentbench_match(run.answer, s.label or ())
            detail: dict[str, Any] = {
                "type": s.type,
                "status": run.status,
                "rounds": run.rounds,
                "answer": run.answer,
                "expected": s.answer_md5 if s.is_mutation else list(s.label or ()),
                "sql": run.sql,
                "transcript": run.messages[2:],
            }
            if run.setup_errors:
                detail["setup_errors"] = run.setup_errors
            samples.append(SampleResult(s.sample_id, bool(correct), detail))
        metrics = agentbench_metrics(
            [(r.sample.type, sr.correct) for r, sr in zip(runs, samples, strict=True)]
        )
        metrics["average_rounds"] = sum(r.rounds for r in runs) / len(runs) if runs else 0.0
        metrics["seconds"] = seconds
        statuses = Counter(r.status for r in runs)
        for status, n in statuses.items():
            metrics[f"status_{status}"] = float(n)
        return DBSkillResult(self.name, samples, metrics)


def _execute_pending(run: _Run) -> str:
    assert run.db is not None and run.pending_sql is not None
    return run.db.execute(run.pending_sql)


def _finish(run: _Run) -> None:
    """Hash a mutation sample's table (AgentBench does it whatever the episode's status), then
    drop the episode's database."""
    if run.db is None:
        return
    try:
        if run.sample.is_mutation:
            run.answer = run.db.table_md5()
    finally:
        db, run.db = run.db, None
        db.drop()


def _map(pool: ThreadPoolExecutor, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
    """fn over items in the pool; an exception is returned in its item's place, so that one
    failing episode stops no other."""

    def call(arg: Any) -> Any:
        try:
            return fn(arg)
        except Exception as exc:
            return exc

    return list(pool.map(call, items))


def _raise_first(outcomes: Sequence[Any], kind: type[BaseException] = BaseException) -> None:
    for outcome in outcomes:
        if isinstance(outcome, kind):
            raise outcome

"""The fixed training/evaluation split of the real skills, the `part` option, and the training
sets derived from each skill's own data (`cycleqd.skills.training_sets`).

The derived sets are built by the skills themselves, on the real data: coding and os need the
bubblewrap sandbox, db a MySQL-compatible server (CYCLEQD_TEST_MYSQL_URL, default
mysql://root@127.0.0.1:3306); those tests skip, saying how to provide them, where they are
missing. Sizes are kept small; `cycleqd data training-set SKILL --output F` builds a full set.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from cycleqd.errors import CycleQDError
from cycleqd.finetune.data import load_chat_dataset
from cycleqd.skills.data import AGENTBENCH_OS, DBBENCH_DEV, MBPP_PLUS, load_jsonl
from cycleqd.skills.registry import (
    REGISTRY,
    CodingSkillConfig,
    DBSkillConfig,
    OSSkillConfig,
    TinySkillConfig,
    build_skill,
    has_training_set,
)
from cycleqd.skills.split import TRAINING_FRACTION, part_of
from cycleqd.skills.training_sets import TrainingSet, result_values, training_set

from .services import HOW_TO_MYSQL, MYSQL_URL, sandbox_skip

DATA = (Path(__file__).resolve().parents[2] / ".." / "shared" / "data").resolve()
FILES = {"coding": MBPP_PLUS, "db": DBBENCH_DEV, "os": AGENTBENCH_OS}

needs_data = pytest.mark.skipif(
    not all((DATA / f).exists() for f in FILES.values()),
    reason=f"the real evaluation sets are not at {DATA} (see the data README)",
)


_SANDBOX_SKIP = sandbox_skip(user="root", cwd="/")
needs_sandbox = pytest.mark.skipif(_SANDBOX_SKIP is not None, reason=str(_SANDBOX_SKIP))


@pytest.fixture(scope="module")
def mysql_url() -> str:
    try:
        import pymysql  # noqa: F401

        from cycleqd.skills.db_sandbox import open_sandbox

        open_sandbox(MYSQL_URL).close()
    except Exception as exc:
        pytest.skip(f"{HOW_TO_MYSQL} ({exc})")
    return MYSQL_URL


def _ids(skill: str) -> list[str]:
    rows = load_jsonl(DATA, FILES[skill])
    if skill == "coding":
        return [r["task_id"] for r in rows]
    if skill == "os":
        return [str(r["index"]) for r in rows]
    return [str(i) for i in range(len(rows))]  # db: the row's position (DBSample.sample_id)


def _expected_part(skill: str, task_id: str) -> str:
    """The split, computed here from its definition."""
    digest = hashlib.sha256(f"{skill}/{task_id}".encode()).digest()
    return "training" if int.from_bytes(digest[:8], "big") < 2**63 else "evaluation"


# ------------------------------------------------------------------------------ the split


def test_split_is_pinned() -> None:
    assert TRAINING_FRACTION == 0.5
    pinned = {
        ("coding", "Mbpp/2"): "training",
        ("coding", "Mbpp/3"): "evaluation",
        ("coding", "Mbpp/4"): "training",
        ("coding", "Mbpp/6"): "evaluation",
        ("db", "0"): "evaluation",
        ("db", "1"): "training",
        ("os", "0"): "training",
        ("os", "1"): "evaluation",
    }
    for (skill, task_id), part in pinned.items():
        assert part_of(skill, task_id) == part == _expected_part(skill, task_id)
    # The skill's name is part of the key: the same id may fall on different sides.
    assert {part_of(s, "1") for s in ("coding", "db", "os")} == {"training", "evaluation"}


@needs_data
@pytest.mark.parametrize("skill", ["coding", "db", "os"])
def test_parts_are_disjoint_and_cover_the_data(skill: str) -> None:
    ids = _ids(skill)
    assert len(set(ids)) == len(ids)  # the ids are ids
    training = {i for i in ids if part_of(skill, i) == "training"}
    evaluation = {i for i in ids if part_of(skill, i) == "evaluation"}
    assert not training & evaluation
    assert training | evaluation == set(ids)
    assert all(part_of(skill, i) == _expected_part(skill, i) for i in ids)
    print(f"{skill}: {len(training)} training, {len(evaluation)} evaluation")
    assert 0.35 < len(training) / len(ids) < 0.65


# ---------------------------------------------------------------------------- part option


def _loaded_ids(options) -> list[str]:
    skill = build_skill(options)  # reads the data only: no sandbox, no database
    if options.name == "coding":
        return [t.task_id for t in skill.tasks]
    if options.name == "os":
        return [str(t.index) for t in skill.tasks]
    return [s.sample_id for s in skill.samples]


@needs_data
@pytest.mark.parametrize(
    "options_class, name",
    [(CodingSkillConfig, "coding"), (DBSkillConfig, "db"), (OSSkillConfig, "os")],
)
def test_part_option_selects_before_limit_and_seed(options_class, name: str) -> None:
    every = _loaded_ids(options_class(name=name, data=str(DATA)))
    assert every == _ids(name)  # the default, "all", changes nothing
    evaluation = _loaded_ids(options_class(name=name, data=str(DATA), part="evaluation"))
    training = _loaded_ids(options_class(name=name, data=str(DATA), part="training"))
    assert evaluation == [i for i in every if part_of(name, i) == "evaluation"]
    assert training == [i for i in every if part_of(name, i) == "training"]
    # limit and seed pick among the part's tasks: 20 evaluation-part tasks
    first = _loaded_ids(options_class(name=name, data=str(DATA), part="evaluation", limit=20))
    assert first == evaluation[:20]
    drawn = _loaded_ids(
        options_class(name=name, data=str(DATA), part="evaluation", limit=20, seed=3)
    )
    assert len(drawn) == 20 and set(drawn) <= set(evaluation)


@needs_data
def test_part_option_with_task_selections() -> None:
    from cycleqd.errors import ConfigError

    train_id = next(i for i in _ids("coding") if part_of("coding", i) == "training")
    eval_id = next(i for i in _ids("coding") if part_of("coding", i) == "evaluation")
    options = CodingSkillConfig(name="coding", data=str(DATA), part="evaluation")
    picked = options.model_copy(update={"task_ids": [eval_id]})
    assert _loaded_ids(picked) == [eval_id]
    with pytest.raises(ConfigError, match="in the evaluation part"):
        build_skill(options.model_copy(update={"task_ids": [train_id, eval_id]}))

    os_train = [int(i) for i in _ids("os") if part_of("os", i) == "training"][:3]
    os_options = OSSkillConfig(name="os", data=str(DATA), part="evaluation", indices=os_train)
    assert _loaded_ids(os_options) == []
    db_options = DBSkillConfig(name="db", data=str(DATA), part="evaluation", subset="cycleqd")
    from cycleqd.skills.db import CYCLEQD_EXCLUDED

    loaded = _loaded_ids(db_options)
    assert loaded and not {str(i) for i in CYCLEQD_EXCLUDED} & set(loaded)
    assert all(part_of("db", i) == "evaluation" for i in loaded)


def test_part_option_is_validated() -> None:
    with pytest.raises(ValueError, match="part"):
        CodingSkillConfig(name="coding", part="test")
    assert "part" not in TinySkillConfig.model_fields  # the tiny world splits by construction


def test_every_registered_skill_has_a_training_set() -> None:
    assert all(has_training_set(name) for name in REGISTRY)
    assert not has_training_set("no_such_skill")


# ---------------------------------------------------------------------- derived sets: tiny


def test_tiny_training_set_is_the_worlds_expert_set(tmp_path: Path) -> None:
    from cycleqd.skills.tiny.data import skill_examples
    from cycleqd.skills.tiny.tasks import split_of
    from cycleqd.skills.training_sets import TINY_SEED, TINY_SIZE

    options = TinySkillConfig(name="tiny_sql", level=3)
    ts = REGISTRY["tiny_sql"].training_set(options, 60)
    assert isinstance(ts, TrainingSet) and ts.skill == "tiny_sql"
    assert [{"messages": r["messages"]} for r in ts.rows] == skill_examples(
        "tiny_sql", 60, TINY_SEED, 3
    )
    assert ts.candidates == ts.kept == 60 and ts.rejected == {}
    assert ts.stats() == {**ts.stats(), "skill": "tiny_sql", "kept": 60, "rejected": {}}
    assert len({r["id"] for r in ts.rows}) == 60
    assert all(split_of(r["messages"][0]["content"]) == "train" for r in ts.rows)
    _check_chat_jsonl(ts, tmp_path)
    # What the tiny world's experts train on: WorldConfig's n_skill examples, its seed.
    from cycleqd.skills.tiny.train import WorldConfig

    assert (TINY_SIZE, TINY_SEED) == (WorldConfig().n_skill, WorldConfig().seed) == (4000, 0)


# --------------------------------------------------------------------- derived sets: real


def _check_chat_jsonl(ts: TrainingSet, tmp_path: Path) -> None:
    path = ts.write_jsonl(tmp_path / f"{ts.skill}.jsonl")
    dataset = load_chat_dataset(path)
    assert len(dataset) == ts.kept
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["id"] for line in lines] == [r["id"] for r in ts.rows]
    for row in ts.rows:
        assert row["messages"][-1]["role"] == "assistant"
        assert all(set(m) == {"role", "content"} for m in row["messages"])


def _check_counts(ts: TrainingSet, size: int | None) -> None:
    print(ts.summary())
    assert ts.kept + sum(ts.rejected.values()) == ts.candidates
    assert ts.kept > 0 and ts.seconds > 0
    if size is not None:
        assert ts.kept <= size
    ids = [r["id"] for r in ts.rows]
    assert len(set(ids)) == len(ids)
    assert all(part_of(ts.skill, i) == "training" for i in ids)


@needs_data
@needs_sandbox
def test_coding_training_set(tmp_path: Path) -> None:
    from cycleqd.skills.coding import MbppTask, extract_code

    options = CodingSkillConfig(name="coding", data=str(DATA), part="evaluation", limit=3)
    ts = training_set(options, size=4)  # part/limit pick scored tasks: not the training rows
    _check_counts(ts, 4)
    _check_chat_jsonl(ts, tmp_path)
    assert ts.kept == 4 and ts.rejected == {}  # the first training-part solutions all pass
    rows = {r["task_id"]: r for r in load_jsonl(DATA, MBPP_PLUS)}
    skill = build_skill(
        CodingSkillConfig(name="coding", data=str(DATA), task_ids=[r["id"] for r in ts.rows])
    )
    for row, prompt in zip(ts.rows, skill.conversations(), strict=True):
        assert row["messages"][:-1] == prompt  # the skill's own system and user turns
        task = MbppTask.from_row(rows[row["id"]])
        assert extract_code(row["messages"][-1]["content"]) == task.canonical_solution.strip("\n")


@needs_data
def test_db_training_set(tmp_path: Path, mysql_url: str) -> None:
    from cycleqd.skills.db import DBSkill, load_dbbench

    options = DBSkillConfig(name="db", data=str(DATA), url=mysql_url)
    ts = training_set(options, size=20)
    _check_counts(ts, 20)
    _check_chat_jsonl(ts, tmp_path)
    assert ts.kept == 20
    samples = {s.sample_id: s for s in load_dbbench(load_jsonl(DATA, DBBENCH_DEV))}
    kinds = set()
    for row in ts.rows:
        sample = samples[row["id"]]
        kinds.add(sample.is_mutation)
        messages = row["messages"]
        assert messages[:3] == DBSkill.initial_messages(sample)
        assert [m["role"] for m in messages[3:]] == ["assistant", "user", "assistant"]
        assert "Action: Operation\n```sql\n" in messages[3]["content"]
        assert "\nFinal Answer: " in messages[5]["content"]
        if sample.is_mutation:
            assert messages[4]["content"] == "[]"
        else:
            values, why = result_values(messages[4]["content"])
            answer = json.loads(messages[5]["content"].split("\nFinal Answer: ")[1])
            assert why is None and answer == (values or ["none"])
    assert kinds == {True, False}  # queries and INSERT/UPDATE rows both
    # Rows without a usable reference are counted, not kept.
    assert set(ts.rejected) <= {
        "no reference",
        "table setup failed",
        "reference SQL failed",
        "result truncated",
        "result unreadable",
        "replay mismatch",
    }


def test_db_training_set_without_a_server_says_how_to_get_one() -> None:
    pytest.importorskip("pymysql")
    if not (DATA / DBBENCH_DEV).exists():
        pytest.skip(f"the DBBench set is not at {DATA}")
    options = DBSkillConfig(name="db", data=str(DATA), url="mysql://root@127.0.0.1:1")
    with pytest.raises(CycleQDError, match=r"MySQL/MariaDB server.*mariadb"):
        training_set(options, size=1)


@needs_data
@needs_sandbox
@pytest.mark.parametrize("one_shot", [True, False])
def test_os_training_set(tmp_path: Path, one_shot: bool) -> None:
    from cycleqd.skills.os_skill import (
        OUTPUT_PREFIX,
        OSTask,
        initial_messages,
        parse_action,
    )

    options = OSSkillConfig(name="os", data=str(DATA), one_shot=one_shot)
    ts = training_set(options, size=3)
    _check_counts(ts, 3)
    _check_chat_jsonl(ts, tmp_path)
    tasks = {str(r["index"]): OSTask.from_row(r) for r in load_jsonl(DATA, AGENTBENCH_OS)}
    for row in ts.rows:
        task = tasks[row["id"]]
        opening = initial_messages(task.description, one_shot)
        messages = row["messages"]
        assert messages[: len(opening)] == opening
        bash, observation, answer = messages[len(opening) :]
        assert parse_action(bash["content"]).content == task.example_script.code.strip("\n")
        assert observation["role"] == "user" and observation["content"].startswith(OUTPUT_PREFIX)
        action = parse_action(answer["content"])
        assert action.kind == "answer"
        assert action.content == observation["content"][len(OUTPUT_PREFIX) :].strip()


def test_result_values() -> None:
    assert result_values("[('a',), (Decimal('1.50'), 3)]") == (["a", "1.50", "3"], None)
    assert result_values("[]") == ([], None)
    assert result_values("[(-2.5, None)]") == (["-2.5", "None"], None)
    assert result_values("1054 (42S22): Unknown column 'x' in 'field list'")[1] == (
        "reference SQL failed"
    )
    assert result_values("[('a',), ('b[TRUNCATED]")[1] == "result truncated"
    assert result_values("[(datetime.date(2020, 1, 1),)]")[1] == "result unreadable"


# ---------------------------------------------------------------------------------- CLI


def test_cli_writes_a_training_set(tmp_path: Path, capsys) -> None:
    from cycleqd.cli import main

    out = tmp_path / "sets" / "tiny_shell.jsonl"
    assert main(["data", "training-set", "tiny_shell", "--output", str(out), "--size", "25"]) == 0
    printed = capsys.readouterr().out
    assert "kept 25 of 25" in printed
    assert len(load_chat_dataset(out)) == 25
    assert all("id" in json.loads(line) for line in out.read_text().splitlines())
    # a wrong option is an error message, not a traceback
    assert main(["data", "training-set", "tiny_code", "--output", str(out), "--data", "x"]) == 2
    assert main(["data", "training-set", "coding", "--output", str(out), "--set", "inputs=x"]) == 2
    assert "inputs" in capsys.readouterr().err

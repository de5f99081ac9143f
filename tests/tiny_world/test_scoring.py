"""Scoring by execution: references score 1, wrong and malformed replies 0, hostile replies 0
and contained (scripted backends, both executors)."""

from __future__ import annotations

import time

import pytest

from cycleqd.skills.tiny import FAMILIES, TinySkill, extract_answer
from cycleqd.skills.tiny.execute import check_code, check_shell, run_sql

FENCE = {"tiny_code": "python", "tiny_sql": "sql", "tiny_shell": "bash"}


@pytest.mark.parametrize("family", FAMILIES)
def test_reference_answers_score_one(family, executor, scripted):
    skill = TinySkill(family, 96, seed=11, level=3)
    backend = scripted(skill, lambda i, q: skill.samples[i].answer)
    result = skill.evaluate(backend, executor=executor)
    failed = [(s.sample_id, s.detail) for s in result.samples if not s.correct]
    assert not failed, failed[:3]
    assert result.quality == 1.0 and result.skill == family
    assert backend.calls == 1  # one generate call for the whole set


@pytest.mark.parametrize("family", FAMILIES)
def test_fenced_and_chatty_replies_are_read(family, executor, scripted):
    skill = TinySkill(family, 12, seed=2, level=1)

    def reply(i, q):
        answer = skill.samples[i].answer
        if i % 3 == 0:
            return f"Here you go:\n```{FENCE[family]}\n{answer}\n```\nDone."
        if i % 3 == 1:
            return f"\n  {answer};  \nsome trailing words" if family == "tiny_sql" else answer
        return f"```\n{answer}"  # an unclosed fence (cut by max_new_tokens)

    result = skill.evaluate(scripted(skill, reply), executor=executor)
    assert result.quality == 1.0, [s.detail for s in result.samples if not s.correct][:2]


WRONG = {
    "tiny_code": ["'nope'", "None", "[]", "1 +", "print(", "x", "len()"],
    "tiny_sql": ["SELECT 'nope'", "SELECT * FROM nowhere", "SELEC name", "SELECT"],
    "tiny_shell": ["echo nope", "grep", "sort nofile.txt", "wc -l <", "foo | bar"],
}
MALFORMED = ["", "   \n\n ", "```\n```", "I do not know.", None, 42, "```python"]


@pytest.mark.parametrize("family", FAMILIES)
def test_wrong_and_malformed_replies_score_zero(family, executor, scripted):
    skill = TinySkill(family, 24, seed=5)
    replies = WRONG[family] + MALFORMED
    backend = scripted(skill, lambda i, q: replies[i % len(replies)])
    result = skill.evaluate(backend, executor=executor)
    assert result.quality == 0.0, [s.detail for s in result.samples if s.correct]
    assert all(
        (not s.correct and s.detail.get("error")) or "got" in s.detail for s in result.samples
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_another_samples_answer_mostly_scores_zero(family, executor, scripted):
    skill = TinySkill(family, 40, seed=9)
    n = len(skill.samples)
    backend = scripted(skill, lambda i, q: skill.samples[(i + 1) % n].answer)
    assert skill.evaluate(backend, executor=executor).quality < 0.2


HOSTILE = {
    "tiny_code": [
        "__import__('os').system('touch {canary}')",
        "().__class__.__bases__[0].__subclasses__()",
        "open('{canary}', 'w')",
        "eval(\"__import__('os')\")",
        "exec('import os')",
        "[0] * 10 ** 10",  # memory bomb
        "sum(1 for _ in range(10 ** 15))",  # infinite loop
        "list(range(10 ** 10))",  # eats memory
        "9 ** 9 ** 9",  # one long C-level computation
        "exit()",
    ],
    "tiny_sql": [
        "ATTACH DATABASE '{canary}' AS x",
        "PRAGMA writable_schema = 1",
        "SELECT load_extension('libc.so.6')",
        "DROP TABLE {table}",
        "DELETE FROM {table}",
        "INSERT INTO {table} VALUES (1, 2, 3)",
        "CREATE TABLE x (a)",
        "SELECT 1; DROP TABLE {table}",
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT COUNT(*) FROM c",
        "SELECT COUNT(*) FROM {table} a, {table} b, {table} c, {table} d, {table} e, "
        "{table} f, {table} g, {table} h, {table} i, {table} j, {table} k",
        "SELECT zeroblob(1000000000)",
        "VACUUM INTO '{canary}'",
    ],
    "tiny_shell": [
        "rm -rf /",
        "rm -rf ~",
        "cat /etc/passwd",
        "cat ../../../etc/passwd",
        ":(){ :|:& };:",
        "while true; do :; done",
        "yes",
        "sleep 100",
        "grep -c x a.txt; rm -rf {canary}",
        "$(rm -rf {canary})",
        "echo `id`",
        "touch {canary}",
        "sort a.txt > out.txt",
        "sleep 100 &",
    ],
}


@pytest.mark.parametrize("family", FAMILIES)
def test_hostile_replies_score_zero_and_are_contained(family, executor, scripted, tmp_path):
    canary = tmp_path / "canary.txt"
    canary.write_text("alive")
    skill = TinySkill(family, len(HOSTILE[family]), seed=3)

    def reply(i, q):
        table = skill.samples[i].table.name if skill.samples[i].table else "t"
        return HOSTILE[family][i].replace("{canary}", str(canary)).replace("{table}", table)

    started = time.monotonic()
    result = skill.evaluate(scripted(skill, reply), executor=executor)
    assert result.quality == 0.0, [s.detail for s in result.samples if s.correct]
    assert time.monotonic() - started < 30
    assert canary.read_text() == "alive"
    assert list(tmp_path.iterdir()) == [canary]


def test_the_static_checks():
    assert check_code("sorted([3, 1])[-2]") is None
    assert check_code("[x * x for x in [1, 2]]") is None
    assert "dunder" in check_code("().__class__")
    assert "dunder" in check_code("__import__('os')")
    assert "not a Python expression" in check_code("import os")
    assert "not a Python expression" in check_code("x = 1")
    assert check_shell("grep -c kiwi a.txt") is None
    assert check_shell("sort -u a.txt | wc -l") is None
    assert check_shell("tr a-z A-Z < a.txt") is None
    assert check_shell("cut -d, -f2 data.csv") is None
    for bad in (
        "rm -rf x",
        "cat /etc/passwd",
        "cat ../x",
        "echo $HOME",
        "ls; rm x",
        "sort a > b",
        "sleep 1 &",
        "grep x a.txt &&  rm x",
        "| wc",
        "wc -l <",
        "X=1 grep x a",
        "echo 'unbalanced",
    ):
        assert check_shell(bad), bad


def test_sql_runs_read_only_and_bounded():
    skill = TinySkill("tiny_sql", 1, seed=0)
    table = skill.samples[0].table
    rows, error = run_sql(table, f"SELECT COUNT(*) FROM {table.name}")
    assert error is None and rows == [(len(table.rows),)]
    started = time.monotonic()
    rows, error = run_sql(
        table,
        "WITH c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT COUNT(*) FROM c",
        timeout=0.3,
    )
    assert rows is None and error
    assert time.monotonic() - started < 5
    for sql in ("PRAGMA table_info(t)", f"UPDATE {table.name} SET {table.columns[1]} = 0"):
        rows, error = run_sql(table, sql)
        assert rows is None and "not authorized" in error


def test_extract_answer():
    assert extract_answer("max([1, 2])") == "max([1, 2])"
    assert extract_answer("\n\n  max([1, 2])  \nmore") == "max([1, 2])"
    assert extract_answer("text\n```python\nmax([1])\n```") == "max([1])"
    assert extract_answer("```sql\nSELECT 1;\n```") == "SELECT 1"
    assert extract_answer("```bash\n") is None
    assert extract_answer("") is None
    assert extract_answer(None) is None


def test_a_backend_that_miscounts_is_an_error(scripted):
    skill = TinySkill("tiny_sql", 4, seed=0)

    class Short:
        def generate(self, conversations, params):
            return ["SELECT 1"]

    with pytest.raises(RuntimeError, match="replies"):
        skill.evaluate(Short())


def test_batches(scripted, executor):
    skill = TinySkill("tiny_code", 10, seed=0, batch_size=4)
    backend = scripted(skill, lambda i, q: skill.samples[i].answer)
    assert skill.evaluate(backend, executor=executor).quality == 1.0
    assert backend.calls == 3

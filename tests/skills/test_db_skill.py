"""The database skill (AgentBench DBBench): protocol, scoring, sandbox, and the real dev set.

Tests marked `mysql` need a MySQL-compatible server: they use CYCLEQD_TEST_MYSQL_URL (default
mysql://root@127.0.0.1:3306, an account that may create databases and users) and skip, saying so,
where there is none. The same scripted-model tests also run on the embedded SQLite backend.
"""

from __future__ import annotations

import datetime
import decimal
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from cycleqd.generate.base import Message, SamplingParams
from cycleqd.skills.base import SkillResult
from cycleqd.skills.db import (
    CYCLEQD_EXCLUDED,
    INSTRUCTIONS,
    DBConfig,
    DBSkill,
    DBSkillResult,
    agentbench_match,
    agentbench_metrics,
    load_dbbench,
    parse_sample,
)
from cycleqd.skills.db_sandbox import (
    OUT_OF_SYNC,
    TIMEOUT_MESSAGE,
    TRUNCATED,
    TableSpec,
    agentbench_md5_of_rows,
    open_sandbox,
    read_rows,
    split_first_statement,
)

from .services import HOW_TO_MYSQL, MYSQL_URL

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
DEV_SET = DATA / "agentbench_dbbench_dev.jsonl"


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def mysql_url() -> str:
    try:
        import pymysql  # noqa: F401

        sandbox = open_sandbox(MYSQL_URL)
    except Exception as exc:
        pytest.skip(f"{HOW_TO_MYSQL} ({exc})")
    sandbox.close()
    return MYSQL_URL


@pytest.fixture(params=["sqlite", "mysql"])
def url(request) -> str:
    if request.param == "sqlite":
        return "sqlite://"
    return request.getfixturevalue("mysql_url")


def admin_cursor(url: str):
    import pymysql

    from cycleqd.skills.db_sandbox import _parse_mysql_url

    conn = pymysql.connect(**_parse_mysql_url(url), autocommit=True)
    return conn, conn.cursor()


Reply = str | Callable[[Sequence[Message], dict], str]


class Scripted:
    """A ChatBackend that answers each conversation (told apart by its question) with the next
    of its fixed replies; records every `generate` call."""

    def __init__(self, scripts: dict[str, Sequence[Reply]]) -> None:
        self.scripts = scripts
        self.calls: list[int] = []
        self.state: dict[str, Any] = {}

    def generate(self, conversations: Sequence[Sequence[Message]], params: SamplingParams):
        assert params.temperature == 0.0
        self.calls.append(len(conversations))
        out = []
        for conv in conversations:
            script = self.scripts[conv[2]["content"]]
            turn = sum(m["role"] == "assistant" for m in conv) - 1  # the first is "Ok."
            reply = script[turn] if turn < len(script) else ""
            out.append(reply(conv, self.state) if callable(reply) else reply)
        return out


def op(sql: str) -> str:
    return f"I will look at the table.\nAction: Operation\n```sql\n{sql}\n```\n"


def answer(values: Any) -> str:
    return f"The answer is clear.\nAction: Answer\nFinal Answer: {values}"


MEDALS = TableSpec(
    "Medal Table",
    ("Nation", "Gold", "Silver"),
    (("Kenya", "3", "1"), ("Norway", "2", "4"), ("Chile", "0", "1")),
)


def raw_sample(description: str, typ: str, table: TableSpec = MEDALS, **extra) -> dict:
    return {
        "description": description,
        "add_description": (
            f"The name of this table is {table.name}, and the headers of this table are "
            f"{','.join(table.columns)}."
        ),
        "type": [typ],
        "table": {
            "table_name": table.name,
            "table_info": {
                "columns": [{"name": c, "type": "TEXT"} for c in table.columns],
                "rows": [list(r) for r in table.rows],
            },
        },
        **extra,
    }


def query(description: str, label: list[str], typ: str = "other", **kw) -> dict:
    return raw_sample(description, typ, label=label, **kw)


def mutation(description: str, typ: str, final_rows, sql: str, table=MEDALS) -> dict:
    return raw_sample(
        description, typ, table, label=[sql], answer_md5=agentbench_md5_of_rows(final_rows)
    )


def run_skill(url: str, rows: list[dict], scripts: dict[str, Sequence[Reply]], **cfg):
    samples = [parse_sample(i, r) for i, r in enumerate(rows)]
    backend = Scripted({s.question: scripts[s.description] for s in samples})
    config = DBConfig(url=url, **{"statement_timeout_s": 2.0, **cfg})
    result = DBSkill(samples, config).evaluate(backend)
    return result, backend


def by_id(result: SkillResult) -> dict[str, Any]:
    return {s.sample_id: s for s in result.samples}


# ------------------------------------------------------------------- scripted models


def test_correct_replies_score_one(url):
    rows = [
        query("How many gold medals did Kenya win?", ["3"], "aggregation-SUM"),
        query("Which nations won silver?", ["Kenya", "Norway", "Chile"]),
        mutation(
            "Give Chile one gold medal.",
            "UPDATE",
            [("Kenya", "3", "1"), ("Norway", "2", "4"), ("Chile", "1", "1")],
            "UPDATE `Medal Table` SET Gold = '1' WHERE Nation = 'Chile'",
        ),
        mutation(
            "Add Peru with no medals.",
            "INSERT",
            [*MEDALS.rows, ("Peru", "0", "0")],
            "INSERT INTO `Medal Table` VALUES ('Peru', '0', '0')",
        ),
    ]
    scripts = {
        rows[0]["description"]: [
            op("SELECT SUM(Gold) FROM `Medal Table` WHERE Nation = 'Kenya';"),
            answer('["3.0"]'),  # AgentBench compares a single value as a float
        ],
        rows[1]["description"]: [
            op("SELECT Nation FROM `Medal Table` WHERE Silver > 0"),
            answer('["Norway", "Chile", "Kenya"]'),  # and several values as a set
        ],
        rows[2]["description"]: [
            op("UPDATE `Medal Table` SET Gold = '1' WHERE Nation = 'Chile'"),
            answer("[]"),
        ],
        rows[3]["description"]: [
            op("INSERT INTO `Medal Table` (Nation, Gold, Silver) VALUES ('Peru', '0', '0');"),
            "Done.\nAction: Answer\nFinal Answer: none",
        ],
    }
    result, backend = run_skill(url, rows, scripts)
    assert isinstance(result, DBSkillResult) and result.skill == "db"
    assert [s.correct for s in result.samples] == [True] * 4, [s.detail for s in result.samples]
    assert result.quality == 1.0
    assert result.metrics["overall_cat_accuracy"] == 1.0
    assert result.metrics["UPDATE_accuracy"] == result.metrics["INSERT_accuracy"] == 1.0
    assert backend.calls == [4, 4]  # every open episode of a round in one generate call
    first = result.samples[0].detail
    assert first["status"] == "answered" and first["rounds"] == 1
    sums = {"sqlite://": "[(3,)]"}  # SUM over TEXT: MySQL gives a DOUBLE, SQLite an integer
    assert first["transcript"][2] == {"role": "user", "content": sums.get(url, "[(3.0,)]")}
    assert result.samples[2].detail["transcript"][2]["content"] == "[]"  # no result set


def test_prompt_is_agentbench(url):
    rows = [query("How many gold medals did Kenya win?", ["3"])]
    seen: list[Sequence[Message]] = []

    def capture(conv, state):
        seen.append([dict(m) for m in conv])
        return answer('["3"]')

    result, _ = run_skill(url, rows, {rows[0]["description"]: [capture]})
    assert result.quality == 1.0
    (conv,) = seen
    assert [m["role"] for m in conv] == ["user", "assistant", "user"]
    assert conv[0]["content"] == INSTRUCTIONS and conv[1]["content"] == "Ok."
    assert conv[2]["content"] == rows[0]["description"] + "\n" + rows[0]["add_description"]
    assert "Action: Operation\n```sql\n" in INSTRUCTIONS
    assert 'Final Answer: ["ANSWER1", "ANSWER2", ...]' in INSTRUCTIONS


def test_wrong_replies_score_zero(url):
    rows = [
        query("How many gold medals did Kenya win?", ["3"], "counting"),
        query("Which nations won silver?", ["Kenya", "Norway", "Chile"]),
        mutation(
            "Give Chile one gold medal.",
            "UPDATE",
            [("Kenya", "3", "1"), ("Norway", "2", "4"), ("Chile", "1", "1")],
            "UPDATE `Medal Table` SET Gold = '1' WHERE Nation = 'Chile'",
        ),
        mutation(
            "Add Peru with no medals.",
            "INSERT",
            [*MEDALS.rows, ("Peru", "0", "0")],
            "INSERT INTO `Medal Table` VALUES ('Peru', '0', '0')",
        ),
    ]
    scripts = {
        rows[0]["description"]: [answer('["3.01"]')],  # no numeric tolerance
        rows[1]["description"]: [answer('["Kenya", "Norway"]')],
        rows[2]["description"]: [
            op("UPDATE `Medal Table` SET Gold = '2' WHERE Nation = 'Chile'"),
            answer("[]"),
        ],
        rows[3]["description"]: [
            op("INSERT INTO `Medal Table` VALUES ('Peru', '0', '1')"),
            answer("[]"),
        ],
    }
    result, _ = run_skill(url, rows, scripts)
    assert [s.correct for s in result.samples] == [False] * 4
    assert result.quality == 0.0
    assert result.metrics["SELECT_accuracy"] == 0.0


def test_malformed_replies_fail_and_never_crash(url):
    descriptions = [
        "no action at all",
        "operation without a sql block",
        "bad sql then silence",
        "endless operations",
        "empty and None replies",
        "unparsable final answer",
        "action without a newline",
        "a mutation that answers garbage",
        "huge reply",
    ]
    rows = [query(d, ["3"]) for d in descriptions[:7]]
    rows.append(
        mutation(
            descriptions[7],
            "DELETE",
            [r for r in MEDALS.rows if r[0] != "Chile"],
            "DELETE FROM `Medal Table` WHERE Nation = 'Chile'",
        )
    )
    rows.append(query(descriptions[8], ["3"]))
    scripts: dict[str, list[Any]] = {
        descriptions[0]: ["I think the answer is 3."],
        descriptions[1]: ["Action: Operation\nSELECT Gold FROM `Medal Table`"],
        descriptions[2]: [op("SELEC Gold FROM nowhere"), "Hmm, an error."],
        descriptions[3]: [op("SELECT 1")] * 10,
        descriptions[4]: [lambda conv, state: None],
        descriptions[5]: [answer("[3")],  # parsed as the text " [3", not 3
        descriptions[6]: ["Action: Answer"],
        descriptions[7]: ["```sql\nDELETE FROM `Medal Table` WHERE Nation = 'Chile'\n```"],
        descriptions[8]: ["Action: Operation\n```sql\n" + "SELECT 1 " * 50_000 + "\n```\n"],
    }
    result, backend = run_skill(url, rows, scripts)
    got = {s.detail["status"]: s for s in result.samples}
    assert not any(s.correct for s in result.samples)
    status = [s.detail["status"] for s in result.samples]
    assert status == [
        "no_answer",
        "no_sql_block",
        "no_answer",
        "round_limit",
        "no_answer",
        "answered",
        "no_answer",
        "no_answer",
        "no_answer",
    ]
    bad_sql = result.samples[2].detail["transcript"][2]["content"]
    assert "syntax" in bad_sql  # the error is shown to the model as the result
    endless = result.samples[3].detail
    assert endless["rounds"] == 5 and len(endless["sql"]) == 5  # AgentBench: at most 5 SQL
    assert backend.calls == [9, 3, 1, 1, 1, 1]  # 6 replies at most per episode
    assert got["round_limit"].detail["answer"] == ""


def test_multi_statement_blocks(url):
    table = TableSpec("t", ("a",), (("1",), ("2",)))
    rows = [
        mutation(
            "agentbench mode",
            "UPDATE",
            [("1",), ("2",)],
            "UPDATE t SET a = '9'",
            table=table,
        )
    ]
    script = {
        "agentbench mode": [
            op("UPDATE t SET a = '9'; SELECT * FROM t"),
            op("SELECT * FROM t; DROP TABLE t"),
            op("SELECT 'a;b' AS `c;d`; -- a comment is a second statement"),
            op("SELECT * FROM t;"),
            answer("[]"),
        ]
    }
    result, _ = run_skill(url, rows, script)
    detail = result.samples[0].detail
    observations = [m["content"] for m in detail["transcript"][2::2]]
    assert observations[:3] == [OUT_OF_SYNC] * 3
    assert observations[3] == "[('1',), ('2',)]"  # the UPDATE was rolled back, no DROP ran
    assert result.samples[0].correct  # the table is unchanged

    rows[0]["description"] = "first mode"
    script = {"first mode": [op("UPDATE t SET a = '9'; DROP TABLE t"), answer("[]")]}
    result, _ = run_skill(url, rows, script, multi_statements="first")
    assert result.samples[0].detail["transcript"][2]["content"] == "[]"
    assert not result.samples[0].correct  # the UPDATE ran and was committed


def test_setup_quirks_are_kept(url):
    dup = TableSpec("dup", ("Score", "Score"), (("1", "2"),))
    ragged = TableSpec("ragged", ("a", "b"), (("1", "2"), ("3",)))
    rows = [
        query("duplicate column", ["1"], table=dup),
        query("ragged rows", ["2"], "counting", table=ragged),
    ]
    scripts = {
        "duplicate column": [op("SELECT * FROM dup"), answer('["1"]')],
        "ragged rows": [op("SELECT COUNT(*) FROM ragged"), answer('["0"]')],
    }
    result, _ = run_skill(url, rows, scripts)
    dup_detail, ragged_detail = (s.detail for s in result.samples)
    assert dup_detail["setup_errors"] and ragged_detail["setup_errors"]
    assert "dup" in dup_detail["transcript"][2]["content"]  # no such table, shown as the result
    assert ragged_detail["transcript"][2]["content"] == "[(0,)]"  # created, left empty
    assert result.samples[0].correct is True  # "1" vs ["1"]: the model answered the label
    assert result.samples[1].correct is False


def test_subset_limit_and_config_errors():
    rows = [query(f"q{i}", ["1"]) for i in range(400)]
    samples = [parse_sample(i, r) for i, r in enumerate(rows)]
    assert len(DBSkill(samples, DBConfig(subset="cycleqd")).samples) == 400 - len(CYCLEQD_EXCLUDED)
    assert [s.index for s in DBSkill(samples, DBConfig(limit=3)).samples] == [0, 1, 2]
    with pytest.raises(ValueError, match="subset"):
        DBConfig(subset="most")
    with pytest.raises(ValueError, match="statement_timeout_s"):
        DBConfig(statement_timeout_s=0)
    with pytest.raises(ValueError, match="multi_statements"):
        DBConfig(multi_statements="all")
    with pytest.raises(ValueError, match="sql_mode"):
        DBConfig(sql_mode="ANSI'; DROP")
    with pytest.raises(ValueError, match="url"):
        DBSkill(samples[:1], DBConfig(url="postgres://x")).evaluate(Scripted({}))
    with pytest.raises(ValueError, match="answer_md5"):
        parse_sample(0, raw_sample("x", "UPDATE", label=["UPDATE t SET a=1"]))
    with pytest.raises(ValueError, match="row 7"):
        parse_sample(7, {"description": "x"})


# ---------------------------------------------------------------------------- pure parts


@pytest.mark.parametrize(
    ("text", "label", "expected"),
    [
        (' ["3"]', ["3"], True),
        (" [3]", ["3.0"], True),  # single values compare as floats
        (" 3", ["3.0"], True),  # not a list: the whole text, as a float
        (" ['3.0001']", ["3"], False),  # no tolerance
        (' ["a", "b"]', ["b", "a"], True),  # several values: sets
        (' ["a", "a", "b"]', ["b", "a"], True),
        (' ["a", "b"]', ["a", "b", "c"], False),
        (" [1, 2]", ["1", "2"], False),  # no coercion between several values
        (' "ab"', ["a", "b"], True),  # AgentBench's list(eval("'ab'")) quirk
        (" Kenya", ["Kenya"], False),  # the leading blank stays (AgentBench)
        ("Kenya", ["Kenya"], True),
        (' ["x"]', [], False),
        (" [[1]]", ["1"], False),
        (" [[1], [2]]", ["1", "2"], False),  # unhashable: no match, no crash
        (" __import__('os').system('echo hacked')", ["0"], False),  # never evaluated
        (" [1e999]", ["inf"], True),
        (" " + "[" * 10_000, ["1"], False),
    ],
)
def test_agentbench_match(text, label, expected):
    assert agentbench_match(text, label) is expected


def test_agentbench_metrics():
    m = agentbench_metrics(
        [
            ("counting", True),
            ("other", False),
            ("INSERT", True),
            ("UPDATE", False),
            ("DELETE", True),
        ]
    )
    assert m["counting_accuracy"] == 1.0 and m["other_accuracy"] == 0.0
    assert m["SELECT_accuracy"] == 2 / 3  # every type but INSERT and UPDATE, DELETE included
    assert m["ranking_accuracy"] == 0.0 and m["ranking_count"] == 0
    assert m["overall_cat_accuracy"] == 3 / 5  # CycleQD: pooled over SELECT, INSERT, UPDATE


@pytest.mark.parametrize(
    ("sql", "first", "rest"),
    [
        ("SELECT 1", "SELECT 1", ""),
        ("SELECT 1; SELECT 2", "SELECT 1", " SELECT 2"),
        ("SELECT ';'; x", "SELECT ';'", " x"),
        ('SELECT "a\\";b"; x', 'SELECT "a\\";b"', " x"),
        ("SELECT 'it''s;'; x", "SELECT 'it''s;'", " x"),
        ("SELECT `a;``b`; x", "SELECT `a;``b`", " x"),
        ("SELECT 1 /* ; */; x", "SELECT 1 /* ; */", " x"),
        ("SELECT 1 -- ; x", "SELECT 1 -- ; x", ""),
        ("SELECT 1 --; x", "SELECT 1 --", " x"),  # `--` needs a blank after it
        ("SELECT 1 # ; x", "SELECT 1 # ; x", ""),
        ("SELECT 'open; x", "SELECT 'open; x", ""),
    ],
)
def test_split_first_statement(sql, first, rest):
    assert split_first_statement(sql) == (first, rest)


class ListCursor:
    def __init__(self, rows):
        self.rows = list(rows)
        self.read = 0
        self.exhausted = False

    def fetchone(self):
        if self.read >= len(self.rows):
            self.exhausted = True
            return None
        self.read += 1
        return self.rows[self.read - 1]


@pytest.mark.parametrize("n", [0, 1, 5, 60, 61, 62, 63, 64, 65, 200, 10_000])
def test_read_rows_is_agentbench_truncation(n):
    rows = [(i, "x" * (i % 7), None) for i in range(n)]
    full = str(rows)
    expected = full if len(full) <= 800 else full[:800] + TRUNCATED
    cursor = ListCursor(rows)
    text, complete = read_rows(cursor, 800)
    assert text == expected
    assert cursor.read <= 80  # rows are read only as far as they are shown
    assert complete == cursor.exhausted


def test_md5_in_python_equals_agentbench_sql(mysql_url):
    table = TableSpec(
        "hash me", ("a", "b", "c"), (("1", None, "x"), ("é–ü", "2", ""), ("1", None, "x"))
    )
    sandbox = open_sandbox(mysql_url)
    try:
        episode, warnings = sandbox.create(table)
        try:
            assert not warnings
            assert episode.table_md5() == agentbench_md5_of_rows(table.rows)
            assert episode.execute("DELETE FROM `hash me`") == "[]"
            assert episode.table_md5() == "[(None,)]" == agentbench_md5_of_rows([])
            many = ", ".join(f"('{i}', '{i}', '{i}')" for i in range(300))
            assert episode.execute(f"INSERT INTO `hash me` VALUES {many}") == "[]"
            rows = [(str(i), str(i), str(i)) for i in range(300)]
            assert episode.table_md5() == agentbench_md5_of_rows(rows)  # group_concat cut
        finally:
            episode.drop()
    finally:
        sandbox.close()


# ---------------------------------------------------------------------------- hostile SQL

HOSTILE = [
    ("DROP DATABASE mysql", "denied"),
    ("SELECT LOAD_FILE('/etc/passwd')", "[(None,)]"),
    ("SELECT SLEEP(100)", "slow"),
    ("CREATE USER evil IDENTIFIED BY 'x'", "denied"),
    ("SELECT * FROM mysql.user", "denied"),
    ("SELECT 'x' INTO OUTFILE '/tmp/cycleqd-evil.txt'", "denied"),
    ("GRANT ALL PRIVILEGES ON *.* TO CURRENT_USER()", "error"),
    ("SET GLOBAL max_connections = 1", "denied"),
    ("LOAD DATA LOCAL INFILE '/etc/passwd' INTO TABLE `Medal Table`", "error"),
    ("SET STATEMENT max_statement_time = 0 FOR SELECT SLEEP(100)", "slow"),
    ("SELECT COUNT(*) FROM `Medal Table` a, `Medal Table` b, `Medal Table` c, `Medal Table` d, "
     "`Medal Table` e, `Medal Table` f, `Medal Table` g, `Medal Table` h, `Medal Table` i, "
     "`Medal Table` j, `Medal Table` k, `Medal Table` l, `Medal Table` m, `Medal Table` n, "
     "`Medal Table` o, `Medal Table` p, `Medal Table` q, `Medal Table` r", "slow"),
    ("SELECT * FROM `Medal Table` a, `Medal Table` b, `Medal Table` c, `Medal Table` d, "
     "`Medal Table` e, `Medal Table` f, `Medal Table` g, `Medal Table` h, `Medal Table` i, "
     "`Medal Table` j, `Medal Table` k, `Medal Table` l, `Medal Table` m, `Medal Table` n",
     TRUNCATED),
    ("WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT COUNT(*) FROM r",
     "bounded"),  # by the server's recursion limit or the time limit
    ("SELECT BENCHMARK(10000000000, MD5('x'))", "slow"),
    ("SHOW DATABASES", "own"),
]  # fmt: skip


@pytest.mark.slow
def test_hostile_sql_is_contained(mysql_url):
    """Every statement fails, times out or is cut short; the evaluation goes on; the server, the
    other episodes and this machine's files are untouched; everything is dropped afterwards."""
    per_episode = 5
    chunks = [HOSTILE[i : i + per_episode] for i in range(0, len(HOSTILE), per_episode)]
    rows = [query("victim", ["3"])]
    scripts: dict[str, list[Any]] = {
        "victim": [op("SELECT DATABASE()"), op("SELECT DATABASE()"), answer('["3"]')]
    }

    def read_victim(conv, state):
        db = state.get("victim_db", "cycleqd_missing")
        return op(f"SELECT * FROM `{db}`.`Medal Table`")

    def spy(conv, state):  # the victim's round-0 result names its database
        return op("SELECT DATABASE()")

    for k, chunk in enumerate(chunks):
        rows.append(query(f"attacker {k}", ["3"]))
        scripts[f"attacker {k}"] = [op(sql) for sql, _ in chunk] + [answer('["3"]')]
    rows.append(query("spy", ["3"]))
    scripts["spy"] = [spy, read_victim, answer('["3"]')]

    samples = [parse_sample(i, r) for i, r in enumerate(rows)]
    backend = Scripted({s.question: scripts[s.description] for s in samples})
    original = backend.generate

    def generate(conversations, params):  # learn the victim's database name between rounds
        for conv in conversations:
            if conv[2]["content"].startswith("victim") and len(conv) > 4:
                backend.state["victim_db"] = conv[4]["content"].split("'")[1]
        return original(conversations, params)

    backend.generate = generate  # type: ignore[method-assign]
    started = time.monotonic()
    config = DBConfig(url=mysql_url, statement_timeout_s=1.0, workers=4)
    result = DBSkill(samples, config).evaluate(backend)
    elapsed = time.monotonic() - started

    details = by_id(result)
    victim_db = backend.state["victim_db"]
    assert victim_db.startswith("cycleqd_")
    spy_obs = details[str(len(rows) - 1)].detail["transcript"][4]["content"]
    assert "denied" in spy_obs.lower(), spy_obs  # another episode's database is out of reach
    assert details["0"].correct  # the victim was not disturbed

    for k, chunk in enumerate(chunks):
        transcript = details[str(k + 1)].detail["transcript"]
        for j, (sql, expect) in enumerate(chunk):
            obs = transcript[2 + 2 * j]["content"]
            if expect == "denied":
                assert "denied" in obs.lower(), (sql, obs)
            elif expect == "error":
                assert obs[:4].isdigit() or "not allowed" in obs.lower(), (sql, obs)
            elif expect == "slow":
                # An interrupted SLEEP() returns 1 and BENCHMARK() 0 rather than an error.
                bounded = obs in (TIMEOUT_MESSAGE, "[(1,)]", "[(0,)]") or "interrupted" in obs
                assert bounded, (sql, obs)
            elif expect == "bounded":
                assert obs, (sql, obs)
            elif expect == "own":
                assert "information_schema" in obs and obs.count("cycleqd_") == 1, obs
                assert "'mysql'" not in obs
            else:
                assert obs.endswith(expect), (sql, obs)
            assert "root:" not in obs  # /etc/passwd never shows
    # Six slow statements, each bounded by the 1 s limit (+2 s for the watchdog), 4 in parallel.
    assert elapsed < 30, elapsed

    conn, cur = admin_cursor(mysql_url)
    cur.execute("SHOW DATABASES LIKE 'mysql'")
    assert cur.fetchall()
    cur.execute(
        "SELECT COUNT(*) FROM mysql.user WHERE User IN ('evil', %s)",
        ("cqd_" + victim_db[len("cycleqd_") :],),
    )
    assert cur.fetchone() == (0,)  # no user was added, the episode's user is gone
    cur.execute("SHOW DATABASES LIKE %s", (victim_db,))
    assert cur.fetchall() == ()
    cur.execute("SELECT @@GLOBAL.max_connections > 1")
    assert cur.fetchone() == (1,)
    conn.close()
    assert not Path("/tmp/cycleqd-evil.txt").exists()


def test_databases_are_dropped_when_the_backend_fails(mysql_url):
    rows = [query("first", ["1"]), query("second", ["1"])]

    class Exploding(Scripted):
        def generate(self, conversations, params):
            if self.calls:
                for conv in conversations:
                    self.state.setdefault("dbs", []).append(conv[4]["content"].split("'")[1])
                raise RuntimeError("the GPU caught fire")
            return super().generate(conversations, params)

    samples = [parse_sample(i, r) for i, r in enumerate(rows)]
    backend = Exploding({s.question: [op("SELECT DATABASE()")] for s in samples})
    with pytest.raises(RuntimeError, match="caught fire"):
        DBSkill(samples, DBConfig(url=mysql_url)).evaluate(backend)
    dbs = backend.state["dbs"]
    assert len(dbs) == 2
    conn, cur = admin_cursor(mysql_url)
    for db in dbs:
        cur.execute("SHOW DATABASES LIKE %s", (db,))
        assert cur.fetchall() == ()
        cur.execute("SELECT COUNT(*) FROM mysql.user WHERE User = %s", ("cqd_" + db[8:],))
        assert cur.fetchone() == (0,)
    conn.close()


def test_unreachable_server_says_how_to_fix():
    from cycleqd.skills.db_sandbox import SandboxUnavailable

    pytest.importorskip("pymysql", reason=HOW_TO_MYSQL)
    rows = [query("q", ["1"])]
    samples = [parse_sample(0, r) for r in rows]
    config = DBConfig(url="mysql://root@127.0.0.1:1", connect_timeout_s=2)
    with pytest.raises(SandboxUnavailable, match="Start one"):
        DBSkill(samples, config).evaluate(Scripted({}))


# ------------------------------------------------------------------------ the real dev set


def _dev_set():
    if not DEV_SET.is_file():
        pytest.skip(f"the DBBench dev set is not at {DEV_SET} (shared/data, beside the repo)")
    return load_dbbench(DEV_SET)


class ReferenceReplay:
    """Replays each sample's reference SQL, then answers: queries with the values of the rows
    it got back (["none"] for no rows, the data's convention), mutations with []."""

    def __init__(self, samples) -> None:
        self.by_question = {s.question: s for s in samples}
        self.calls: list[int] = []

    def generate(self, conversations, params):
        self.calls.append(len(conversations))
        replies = []
        for conv in conversations:
            sample = self.by_question[conv[2]["content"]]
            if len(conv) == 3 and sample.reference_sql:
                replies.append(op(sample.reference_sql))
            elif sample.is_mutation:
                replies.append(answer("[]"))
            else:
                replies.append(answer(repr(self.values(conv[-1]["content"]))))
        return replies

    @staticmethod
    def values(observation: str) -> list[str]:
        names = {"__builtins__": {}, "Decimal": decimal.Decimal, "datetime": datetime}
        try:
            rows = eval(observation, names)  # our own server's repr of its rows
        except Exception:
            return []
        return [str(v) for row in rows for v in row] or ["none"]


def test_dev_set_loads():
    samples = _dev_set()
    assert len(samples) == 360
    counts: dict[str, int] = {}
    for s in samples:
        counts[s.type] = counts.get(s.type, 0) + 1
    assert counts["INSERT"] == counts["UPDATE"] == 120
    assert sum(v for k, v in counts.items() if k not in ("INSERT", "UPDATE")) == 120
    assert all(s.reference_sql for s in samples)
    assert len(DBSkill(samples, DBConfig(subset="cycleqd")).samples) == 341
    # Every sample the official code leaves out shares its table name with another sample.
    names = [s.table.name for s in samples]
    assert all(names.count(samples[i].table.name) > 1 for i in CYCLEQD_EXCLUDED)
    # Answering the label itself scores 1 for every query: the comparison accepts the data.
    for s in samples:
        if not s.is_mutation:
            assert agentbench_match(" " + json.dumps(list(s.label)), s.label), s.index


def test_dev_set_smoke_on_sqlite():
    samples = [s for s in _dev_set() if s.index in (2, 120, 240, 19)]
    backend = ReferenceReplay(samples)
    result = DBSkill(samples, DBConfig(url="sqlite://")).evaluate(backend)
    assert len(result.samples) == 4 and backend.calls == [4, 4]
    assert all(s.detail["status"] == "answered" for s in result.samples)


# Reference statements that cannot reproduce the data's answer_md5 on a MySQL 8-like server:
# 225's answer_md5 is the hash of neither the table before nor the table after its reference
# UPDATE; 278 and 295 compare a TEXT column with a number in an UPDATE's WHERE, which strict mode
# (MySQL 8's default, AgentBench's server) rejects; without strict mode (sql_mode="") both
# reproduce.
UNREPRODUCIBLE_MUTATIONS = {"225", "278", "295"}


@pytest.mark.slow
def test_reference_replay_on_the_dev_set(mysql_url):
    samples = _dev_set()
    backend = ReferenceReplay(samples)
    started = time.monotonic()
    result = DBSkill(samples, DBConfig(url=mysql_url)).evaluate(backend)
    seconds = time.monotonic() - started
    m = result.metrics
    failed_mutations = {
        s.sample_id for s in result.samples if s.detail["type"] in ("INSERT", "UPDATE")
    } - {s.sample_id for s in result.samples if s.correct}
    print(
        f"\nDBBench dev reference replay on {mysql_url.split('@')[-1]}: "
        f"overall {m['overall_cat_accuracy']:.4f}, SELECT {m['SELECT_accuracy']:.4f}, "
        f"INSERT {m['INSERT_accuracy']:.4f}, UPDATE {m['UPDATE_accuracy']:.4f} "
        f"in {seconds:.1f} s; failed mutations {sorted(failed_mutations, key=int)}"
    )
    assert backend.calls == [360, 360]
    assert failed_mutations == UNREPRODUCIBLE_MUTATIONS
    assert m["INSERT_accuracy"] == 1.0
    # Most reference SELECTs of the data do not run on MySQL (double-quoted or [bracketed]
    # identifiers, unquoted names with blanks, words glued by lost newlines) or return other
    # rows than the label: about a quarter reproduce the label.
    assert 0.2 <= m["SELECT_accuracy"] <= 0.5
    assert result.quality == m["overall_cat_accuracy"]

"""Seeded generators of the tiny world's three task families: (question, reference answer).

Families (they mirror the paper's coding / DB / OS skills, scaled down to what a ~1.3M-parameter
Llama can learn on a CPU in minutes):

- ``tiny_code``: a one-line Python *expression* over variables shown in the prompt
  (``xs = [3, 9, 4]`` / "the 2nd largest of xs" -> ``sorted(xs)[-2]``), scored by evaluating
  it (sandboxed) with the variables bound and comparing values. Inputs are named rather than
  inlined because a model of this size, trained for minutes, does not learn to copy a list
  token by token (measured: 0% on "the list [..]" -> ``[..]``, and the first design's experts
  failed mostly on copying); names, thresholds and words are still copied;
- ``tiny_sql``: one SQLite query over a small table shown in the prompt, scored by comparing
  result rows with the reference query's;
- ``tiny_shell``: a one-line shell pipeline over files shown in the prompt
  (``grep -c kiwi a.txt``), scored by comparing stdout with the reference's.

Every family has *skill templates* (the expert's training data and the evaluation sets) and
*warm-up templates* (only in the shared base's general set: they teach the chat format, the
three answer syntaxes and copying values out of the prompt, not the skill mappings). Each
template has several phrasings, and its slots (lists, numbers, words, tables, files) are drawn
at random, so evaluation measures generalisation to new inputs, not recall.

Train and evaluation sets are disjoint by construction, whatever their seeds: every question is
assigned to one split by a hash of its text (`split_of`), and a generator for a split rejects
questions of the other one.

Difficulty (`level` 1..3) sets the sizes: list lengths and number ranges (code), rows per table
(SQL), lines per file (shell).
"""

from __future__ import annotations

import hashlib
import random
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from cycleqd.skills.tiny._harness import canon, trusted_eval

FAMILIES = ("tiny_code", "tiny_sql", "tiny_shell")
SPLITS = ("train", "eval")
EVAL_SHARE = 5  # one question in EVAL_SHARE belongs to the evaluation split
TRIES = 200  # draws of one template before it counts as used up
PREFIX = {"tiny_code": "Python", "tiny_sql": "SQL", "tiny_shell": "bash"}


@dataclass(frozen=True)
class Table:
    name: str
    columns: tuple[str, ...]
    types: tuple[str, ...]  # SQLite column types: TEXT | INTEGER
    rows: tuple[tuple[Any, ...], ...]


@dataclass(frozen=True)
class TinySample:
    family: str
    template: str  # template id, e.g. "kth_largest"
    question: str  # the whole user message (table / files included)
    answer: str  # the reference answer: one line, no code fence
    expected: Any  # code: canonical value; sql: list of rows; shell: normalised stdout
    table: Table | None = None  # tiny_sql
    files: tuple[tuple[str, str], ...] = ()  # tiny_shell: (name, content)
    variables: tuple[tuple[str, Any], ...] = ()  # tiny_code: (name, value) bound for the answer
    ordered: bool = True  # tiny_sql: rows compared in order (the reference has ORDER BY)
    index: int = 0

    @property
    def sample_id(self) -> str:
        return f"{self.family}-{self.index}-{self.template}"

    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.question}]

    def chat(self) -> dict[str, list[dict[str, str]]]:
        """The sample as a chat fine-tuning example (`{"messages": [user, assistant]}`)."""
        return {"messages": [*self.messages(), {"role": "assistant", "content": self.answer}]}


def split_of(question: str) -> str:
    digest = hashlib.sha256(question.encode()).digest()
    return "eval" if int.from_bytes(digest[:8], "big") % EVAL_SHARE == 0 else "train"


def _rng(*parts: Any) -> random.Random:
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


# ------------------------------------------------------------------------------- word pools

WORDS = ("apple", "kiwi", "plum", "pear", "fig", "lime", "mango", "peach", "grape", "melon",
         "lemon", "olive", "date", "berry", "cherry", "guava")  # fmt: skip
SHORT_WORDS = ("cat", "dog", "sun", "red", "box", "sky", "cup", "map", "pen", "hat", "owl",
               "bee", "ant", "fox", "elk", "yak")  # fmt: skip
ORDINALS = {1: "1st", 2: "2nd", 3: "3rd", 4: "4th"}

# (table, label column, number column, category column, labels, number range, categories)
SCHEMAS = (
    ("people", "name", "age", "city",
     ("ann", "bob", "cid", "dan", "eve", "fay", "gus", "hal", "ida", "jon", "kim", "lou"),
     (18, 70), ("rome", "oslo", "lima", "kyiv")),
    ("items", "item", "price", "shop",
     ("pen", "cup", "hat", "bag", "mug", "box", "key", "map", "jar", "fan", "pot", "rug"),
     (1, 99), ("north", "south", "east")),
    ("pets", "pet", "weight", "owner",
     ("rex", "tom", "max", "leo", "kit", "bo", "ziggy", "nala", "milo", "luna", "coco", "oreo"),
     (2, 60), ("ann", "bob", "cid", "dan")),
    ("cars", "car", "speed", "color",
     ("golf", "polo", "mini", "fiat", "kia", "audi", "opel", "seat", "jeep", "saab", "ford"),
     (80, 250), ("red", "blue", "black", "white")),
    ("books", "title", "pages", "genre",
     ("dune", "emma", "ulysses", "it", "odyssey", "hamlet", "beloved", "carrie", "walden"),
     (90, 900), ("novel", "poem", "drama")),
    ("teams", "team", "score", "league",
     ("lions", "bears", "hawks", "wolves", "sharks", "eagles", "tigers", "owls", "foxes"),
     (0, 120), ("east", "west")),
)  # fmt: skip
FILE_NAMES = ("a.txt", "b.txt", "log.txt", "notes.txt", "list.txt", "words.txt")
NUM_FILES = ("nums.txt", "data.txt", "n.txt", "vals.txt")
CSV_FILES = ("data.csv", "t.csv", "rows.csv")


def _level(level: int) -> int:
    if level not in (1, 2, 3):
        raise ValueError(f"level must be 1, 2 or 3, got {level}")
    return level


# ------------------------------------------------------------------------------------ code


def _int_list(rng: random.Random, level: int, distinct: bool = False) -> list[int]:
    n = rng.randint(3, 3 + level)
    hi = (9, 50, 99)[level - 1]
    if distinct:
        return rng.sample(range(hi + 1), n)
    return [rng.randint(0, hi) for _ in range(n)]


def _lit(values: Sequence[int]) -> str:
    return "[" + ", ".join(str(v) for v in values) + "]"


LIST_NAMES = ("xs", "nums", "vals", "data", "items", "ys")
INT_NAMES = ("n", "num", "m", "big")
STR_NAMES = ("w", "s", "word", "name", "text")

# A code question: (question, answer, variables). Variables are shown in the prompt as
# `name = value` lines and bound when the answer is evaluated.
CodeQ = tuple[str, str, dict[str, Any]]


def _code_templates() -> dict[str, tuple[bool, Callable[[random.Random, int], CodeQ]]]:
    """template id -> (is_skill, fn(rng, level) -> (question, answer, variables))."""

    def a_list(rng, lv, distinct=False):
        return rng.choice(LIST_NAMES), _int_list(rng, lv, distinct)

    def an_int(rng, lv):
        return rng.choice(INT_NAMES), rng.randint(10, (999, 99999, 9999999)[lv - 1])

    def a_word(rng, lv):
        word = rng.choice(WORDS) + (rng.choice(SHORT_WORDS) if lv > 1 else "")
        return rng.choice(STR_NAMES), word

    def on_list(phrasings, answer, distinct=False):
        def make(rng, lv):
            name, values = a_list(rng, lv, distinct)
            q = rng.choice(phrasings).format(L=name)
            return q, answer.format(L=name), {name: values}

        return make

    def digit_sum(rng, lv):
        name, n = an_int(rng, lv)
        q = rng.choice(("the sum of the digits of {n}", "the digit sum of {n}"))
        return q.format(n=name), f"sum(map(int, str({name})))", {name: n}

    def n_digits(rng, lv):
        name, n = an_int(rng, lv)
        q = rng.choice(("the number of digits of {n}", "how many digits {n} has"))
        return q.format(n=name), f"len(str({name}))", {name: n}

    def kth_largest(rng, lv):
        name, values = a_list(rng, lv, distinct=True)
        k = rng.randint(2, min(3, len(values)))
        q = rng.choice(("the {o} largest of {L}", "the {o} largest number in {L}"))
        return q.format(o=ORDINALS[k], L=name), f"sorted({name})[-{k}]", {name: values}

    def count(rng, lv):
        name, values = a_list(rng, lv)
        x = rng.choice(values) if rng.random() < 0.8 else rng.randint(0, 9)
        if rng.random() < 0.5:
            values[rng.randrange(len(values))] = x
        q = rng.choice(("how many times {x} occurs in {L}", "count the {x}s in {L}"))
        return q.format(x=x, L=name), f"{name}.count({x})", {name: values}

    def first_k(rng, lv):
        name, values = a_list(rng, lv)
        k = rng.randint(1, len(values) - 1)
        q = rng.choice(("the first {k} items of {L}", "the first {k} elements of {L}"))
        return q.format(k=k, L=name), f"{name}[:{k}]", {name: values}

    def last_k(rng, lv):
        name, values = a_list(rng, lv)
        k = rng.randint(1, len(values) - 1)
        q = rng.choice(("the last {k} items of {L}", "the last {k} elements of {L}"))
        return q.format(k=k, L=name), f"{name}[-{k}:]", {name: values}

    def above(rng, lv):
        name, values = a_list(rng, lv)
        t = rng.choice(values)
        q = rng.choice(("the numbers in {L} above {t}", "keep the items of {L} over {t}"))
        return q.format(t=t, L=name), f"[x for x in {name} if x > {t}]", {name: values}

    def times(rng, lv):
        name, values = a_list(rng, lv)
        k = rng.randint(2, 9)
        q = rng.choice(("each number in {L} times {k}", "multiply every item of {L} by {k}"))
        return q.format(k=k, L=name), f"[x * {k} for x in {name}]", {name: values}

    def index_of(rng, lv):
        name, values = a_list(rng, lv, distinct=True)
        x = rng.choice(values)
        q = rng.choice(("the position of {x} in {L}", "the index of {x} in {L}"))
        return q.format(x=x, L=name), f"{name}.index({x})", {name: values}

    def power(rng, lv):
        a, b = rng.randint(2, (5, 9, 12)[lv - 1]), rng.randint(2, (3, 5, 7)[lv - 1])
        q = rng.choice(("{a} to the power {b}", "{a} raised to {b}"))
        return q.format(a=a, b=b), f"{a} ** {b}", {}

    def on_word(phrasings, answer):
        def make(rng, lv):
            name, word = a_word(rng, lv)
            return rng.choice(phrasings).format(w=name), answer.format(w=name), {name: word}

        return make

    # warm-up (general set only): Python syntax, names and literals, copying from the prompt
    def w_value(rng, lv):
        name, values = a_list(rng, lv)
        return rng.choice(("the value of {L}", "{L} itself")).format(L=name), name, {name: values}

    def w_add(rng, lv):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        q = rng.choice(("{a} plus {b}", "add {a} and {b}"))
        return q.format(a=a, b=b), f"{a} + {b}", {}

    def w_mul(rng, lv):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        q = rng.choice(("{a} times {b}", "multiply {a} by {b}"))
        return q.format(a=a, b=b), f"{a} * {b}", {}

    def w_sub(rng, lv):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        return f"{a} minus {b}", f"{a} - {b}", {}

    def w_word(rng, lv):
        w = rng.choice(WORDS + SHORT_WORDS)
        return rng.choice(("the word '{w}'", "the string '{w}'")).format(w=w), f"'{w}'", {}

    def w_append(rng, lv):
        name, values = a_list(rng, lv)
        x = rng.randint(0, 99)
        return f"{name} with {x} appended", f"{name} + [{x}]", {name: values}

    def w_first(rng, lv):
        name, values = a_list(rng, lv)
        q = rng.choice(("the first item of {L}", "the item at index 0 of {L}"))
        return q.format(L=name), f"{name}[0]", {name: values}

    def w_join(rng, lv):
        (a, x), (b, y) = a_word(rng, lv), a_word(rng, lv)
        if a == b:
            b = "other"
        return f"{a} followed by {b}", f"{a} + {b}", {a: x, b: y}

    skill = {
        "digit_sum": digit_sum,
        "n_digits": n_digits,
        "reverse": on_list(("reverse the list {L}", "{L} in reverse order"), "{L}[::-1]"),
        "kth_largest": kth_largest,
        "largest": on_list(("the largest of {L}", "the maximum of {L}"), "max({L})"),
        "smallest": on_list(("the smallest of {L}", "the minimum of {L}"), "min({L})"),
        "sort": on_list(("sort {L}", "{L} in ascending order"), "sorted({L})"),
        "sort_desc": on_list(
            ("sort {L} in descending order", "{L} from largest to smallest"),
            "sorted({L}, reverse=True)",
        ),
        "total": on_list(("the sum of {L}", "add up {L}"), "sum({L})"),
        "length": on_list(("the number of items in {L}", "how many numbers {L} holds"), "len({L})"),
        "count": count,
        "evens": on_list(
            ("the even numbers in {L}", "keep the even numbers of {L}"),
            "[x for x in {L} if x % 2 == 0]",
        ),
        "squares": on_list(
            ("the squares of {L}", "square each number in {L}"), "[x * x for x in {L}]"
        ),
        "spread": on_list(
            ("the largest of {L} minus the smallest", "the range of {L}"), "max({L}) - min({L})"
        ),
        "first_k": first_k,
        "last_k": last_k,
        "above": above,
        "times": times,
        "index_of": index_of,
        "power": power,
        "upper": on_word(("{w} in upper case", "{w} in capitals"), "{w}.upper()"),
        "str_reverse": on_word(("the string {w} reversed", "{w} spelled backwards"), "{w}[::-1]"),
        "str_len": on_word(("the length of {w}", "how many letters {w} has"), "len({w})"),
    }
    warm = [w_value, w_add, w_mul, w_sub, w_word, w_append, w_first, w_join]
    out = {name: (True, fn) for name, fn in skill.items()}
    out.update({f.__name__: (False, f) for f in warm})
    return out


def code_prompt(variables: dict[str, Any]) -> str:
    return "\n".join(f"{name} = {value!r}" for name, value in variables.items())


# ------------------------------------------------------------------------------------- sql


def _table(rng: random.Random, level: int) -> tuple[Table, tuple[str, str, str, tuple]]:
    name, label, num, cat, labels, (lo, hi), cats = rng.choice(SCHEMAS)
    n = rng.randint(*((4, 4), (4, 6), (6, 8))[level - 1])
    names = rng.sample(labels, n)
    nums = rng.sample(range(lo, hi + 1), n)
    used = rng.sample(cats, min(len(cats), rng.randint(2, 3)))
    cats_col = [rng.choice(used) for _ in range(n)]
    rows = tuple(zip(names, nums, cats_col, strict=True))
    table = Table(name, (label, num, cat), ("TEXT", "INTEGER", "TEXT"), rows)
    return table, (label, num, cat, tuple(used))


def table_prompt(table: Table) -> str:
    lines = [f"table {table.name}({', '.join(table.columns)}):"]
    lines += ["|".join(str(v) for v in row) for row in table.rows]
    return "\n".join(lines)


def _sql_templates() -> dict[str, tuple[bool, Callable]]:
    """template id -> (is_skill, fn(rng, table, cols) -> (question, answer))."""

    def _threshold(rng, table):
        nums = sorted(r[1] for r in table.rows)
        i = rng.randint(0, len(nums) - 2)
        return rng.randint(nums[i], nums[i + 1] - 1) if nums[i + 1] > nums[i] else nums[i]

    def filter_gt(rng, t, c):
        a, n, _, _ = c
        v = _threshold(rng, t)
        q = rng.choice(("{a} where {n} is over {v}", "{a} with {n} above {v}"))
        return q.format(a=a, n=n, v=v), f"SELECT {a} FROM {t.name} WHERE {n} > {v} ORDER BY {a}"

    def filter_lt(rng, t, c):
        a, n, _, _ = c
        v = _threshold(rng, t) + 1
        q = rng.choice(("{a} where {n} is under {v}", "{a} with {n} below {v}"))
        return q.format(a=a, n=n, v=v), f"SELECT {a} FROM {t.name} WHERE {n} < {v} ORDER BY {a}"

    def filter_eq(rng, t, c):
        a, _, k, used = c
        x = rng.choice(used)
        q = rng.choice(("{a} where {k} is {x}", "{a} with {k} {x}"))
        return q.format(a=a, k=k, x=x), f"SELECT {a} FROM {t.name} WHERE {k} = '{x}' ORDER BY {a}"

    def count_eq(rng, t, c):
        _, _, k, used = c
        x = rng.choice(used)
        q = rng.choice(("how many rows have {k} {x}", "count rows where {k} is {x}"))
        return q.format(k=k, x=x), f"SELECT COUNT(*) FROM {t.name} WHERE {k} = '{x}'"

    def count_gt(rng, t, c):
        _, n, _, _ = c
        v = _threshold(rng, t)
        q = rng.choice(("how many rows have {n} over {v}", "count rows where {n} is above {v}"))
        return q.format(n=n, v=v), f"SELECT COUNT(*) FROM {t.name} WHERE {n} > {v}"

    def agg(fn, words):
        def make(rng, t, c):
            n = c[1]
            q = rng.choice(words)
            return q.format(n=n), f"SELECT {fn}({n}) FROM {t.name}"

        make.__name__ = fn.lower()
        return make

    def argmax(rng, t, c):
        a, n, _, _ = c
        q = rng.choice(("the {a} with the largest {n}", "which {a} has the highest {n}"))
        return q.format(a=a, n=n), f"SELECT {a} FROM {t.name} ORDER BY {n} DESC LIMIT 1"

    def argmin(rng, t, c):
        a, n, _, _ = c
        q = rng.choice(("the {a} with the smallest {n}", "which {a} has the lowest {n}"))
        return q.format(a=a, n=n), f"SELECT {a} FROM {t.name} ORDER BY {n} LIMIT 1"

    def top_k(rng, t, c):
        a, n, _, _ = c
        k = rng.randint(2, 3)
        q = rng.choice(("the top {k} {a} by {n}", "the {k} {a} with the highest {n}"))
        return q.format(a=a, n=n, k=k), f"SELECT {a} FROM {t.name} ORDER BY {n} DESC LIMIT {k}"

    def sorted_by(rng, t, c):
        a, n, _, _ = c
        q = rng.choice(("{a} sorted by {n}", "{a} ordered by {n}"))
        return q.format(a=a, n=n), f"SELECT {a} FROM {t.name} ORDER BY {n}"

    def distinct(rng, t, c):
        k = c[2]
        q = rng.choice(("the distinct {k} values", "each {k} once"))
        return q.format(k=k), f"SELECT DISTINCT {k} FROM {t.name} ORDER BY {k}"

    def group_count(rng, t, c):
        k = c[2]
        q = rng.choice(("number of rows per {k}", "count rows for each {k}"))
        return q.format(k=k), f"SELECT {k}, COUNT(*) FROM {t.name} GROUP BY {k} ORDER BY {k}"

    def group_sum(rng, t, c):
        _, n, k, _ = c
        q = rng.choice(("total {n} per {k}", "sum of {n} for each {k}"))
        return (
            q.format(n=n, k=k),
            f"SELECT {k}, SUM({n}) FROM {t.name} GROUP BY {k} ORDER BY {k}",
        )

    # warm-up
    def w_all(rng, t, c):
        return rng.choice(("all rows", "every row", "the whole table")), f"SELECT * FROM {t.name}"

    def w_col(rng, t, c):
        col = rng.choice(t.columns)
        q = rng.choice(("the {x} column", "all {x} values"))
        return q.format(x=col), f"SELECT {col} FROM {t.name}"

    def w_two(rng, t, c):
        x, y = rng.sample(t.columns, 2)
        return f"the columns {x} and {y}", f"SELECT {x}, {y} FROM {t.name}"

    def w_rows(rng, t, c):
        return rng.choice(("the number of rows", "how many rows")), f"SELECT COUNT(*) FROM {t.name}"

    def w_row_of(rng, t, c):
        a = c[0]
        x = rng.choice(t.rows)[0]
        return f"the row of {x}", f"SELECT * FROM {t.name} WHERE {a} = '{x}'"

    skill = [
        filter_gt,
        filter_lt,
        filter_eq,
        count_eq,
        count_gt,
        agg("MAX", ("the largest {n}", "the maximum {n}")),
        agg("MIN", ("the smallest {n}", "the minimum {n}")),
        agg("SUM", ("the total {n}", "the sum of all {n}")),
        agg("AVG", ("the average {n}", "the mean {n}")),
        argmax,
        argmin,
        top_k,
        sorted_by,
        distinct,
        group_count,
        group_sum,
    ]
    warm = [w_all, w_col, w_two, w_rows, w_row_of]
    out = {f.__name__: (True, f) for f in skill}
    out.update({f.__name__: (False, f) for f in warm})
    return out


def run_reference_sql(table: Table, query: str) -> list[tuple]:
    """The reference query's rows (trusted SQL: our own templates)."""
    conn = sqlite3.connect(":memory:")
    try:
        create_table(conn, table)
        return [tuple(r) for r in conn.execute(query).fetchall()]
    finally:
        conn.close()


def create_table(conn: sqlite3.Connection, table: Table) -> None:
    cols = ", ".join(f'"{c}" {t}' for c, t in zip(table.columns, table.types, strict=True))
    conn.execute(f'CREATE TABLE "{table.name}" ({cols})')
    marks = ", ".join("?" * len(table.columns))
    conn.executemany(f'INSERT INTO "{table.name}" VALUES ({marks})', table.rows)


# ----------------------------------------------------------------------------------- shell


def _word_lines(rng: random.Random, level: int) -> list[str]:
    n = rng.randint(*((4, 5), (5, 7), (7, 9))[level - 1])
    pool = rng.sample(WORDS, 5)
    lines = []
    for _ in range(n):
        words = [rng.choice(pool)]
        if rng.random() < 0.4:
            words.append(rng.choice(SHORT_WORDS))
        lines.append(" ".join(words))
    return lines


def _num_lines(rng: random.Random, level: int) -> list[str]:
    n = rng.randint(*((4, 5), (5, 7), (7, 9))[level - 1])
    return [str(v) for v in rng.sample(range(1, (99, 500, 2000)[level - 1]), n)]


def _csv_lines(rng: random.Random, level: int) -> list[str]:
    n = rng.randint(*((3, 4), (4, 6), (6, 8))[level - 1])
    names = rng.sample(SHORT_WORDS, n)
    return [f"{w},{rng.choice(WORDS)},{rng.randint(1, 99)}" for w in names]


def files_prompt(files: Sequence[tuple[str, str]]) -> str:
    return "\n".join(f"file {name}:\n{content.rstrip(chr(10))}" for name, content in files)


def normalise_stdout(text: str) -> str:
    """Trailing blanks of each line and trailing empty lines do not count."""
    return "\n".join(line.rstrip() for line in text.rstrip().split("\n")) if text.strip() else ""


def _shell_templates() -> dict[str, tuple[bool, Callable]]:
    """template id -> (is_skill, fn(rng, level) -> (question, answer, files, expected lines))."""

    def words_file(rng, lv):
        name = rng.choice(FILE_NAMES)
        return name, _word_lines(rng, lv)

    def pick_word(rng, lines):
        present = sorted({w for line in lines for w in line.split()})
        return rng.choice(present) if rng.random() < 0.85 else rng.choice(WORDS)

    def grep_count(rng, lv):
        f, lines = words_file(rng, lv)
        w = pick_word(rng, lines)
        q = rng.choice(("count lines containing '{w}' in {f}", "how many lines of {f} have '{w}'"))
        n = sum(w in line for line in lines)
        return q.format(w=w, f=f), f"grep -c {w} {f}", [(f, lines)], [str(n)]

    def grep(rng, lv):
        f, lines = words_file(rng, lv)
        w = pick_word(rng, lines)
        q = rng.choice(("lines of {f} containing '{w}'", "show the lines with '{w}' in {f}"))
        return q.format(w=w, f=f), f"grep {w} {f}", [(f, lines)], [x for x in lines if w in x]

    def grep_v(rng, lv):
        f, lines = words_file(rng, lv)
        w = pick_word(rng, lines)
        q = rng.choice(("lines of {f} without '{w}'", "drop the lines with '{w}' from {f}"))
        return (
            q.format(w=w, f=f),
            f"grep -v {w} {f}",
            [(f, lines)],
            [x for x in lines if w not in x],
        )

    def line_count(rng, lv):
        f, lines = words_file(rng, lv)
        q = rng.choice(("number of lines in {f}", "how many lines {f} has"))
        return q.format(f=f), f"wc -l < {f}", [(f, lines)], [str(len(lines))]

    def word_count(rng, lv):
        f, lines = words_file(rng, lv)
        q = rng.choice(("number of words in {f}", "how many words {f} has"))
        n = sum(len(x.split()) for x in lines)
        return q.format(f=f), f"wc -w < {f}", [(f, lines)], [str(n)]

    def head(rng, lv):
        f, lines = words_file(rng, lv)
        k = rng.randint(1, 3)
        q = rng.choice(("the first {k} lines of {f}", "top {k} lines of {f}"))
        return q.format(k=k, f=f), f"head -n {k} {f}", [(f, lines)], lines[:k]

    def tail(rng, lv):
        f, lines = words_file(rng, lv)
        k = rng.randint(1, 3)
        q = rng.choice(("the last {k} lines of {f}", "bottom {k} lines of {f}"))
        return q.format(k=k, f=f), f"tail -n {k} {f}", [(f, lines)], lines[-k:]

    def sort(rng, lv):
        f, lines = words_file(rng, lv)
        q = rng.choice(("{f} sorted", "sort the lines of {f}"))
        return q.format(f=f), f"sort {f}", [(f, lines)], sorted(lines)

    def sort_r(rng, lv):
        f, lines = words_file(rng, lv)
        q = rng.choice(("{f} sorted in reverse", "sort {f} backwards"))
        return q.format(f=f), f"sort -r {f}", [(f, lines)], sorted(lines, reverse=True)

    def sort_u(rng, lv):
        f, lines = words_file(rng, lv)
        q = rng.choice(("the unique lines of {f}, sorted", "sorted lines of {f} without repeats"))
        return q.format(f=f), f"sort -u {f}", [(f, lines)], sorted(set(lines))

    def count_unique(rng, lv):
        f, lines = words_file(rng, lv)
        q = rng.choice(("number of distinct lines in {f}", "how many different lines {f} has"))
        return q.format(f=f), f"sort -u {f} | wc -l", [(f, lines)], [str(len(set(lines)))]

    def sort_n(rng, lv):
        f, lines = rng.choice(NUM_FILES), _num_lines(rng, lv)
        q = rng.choice(("the numbers in {f} from small to large", "sort {f} numerically"))
        return q.format(f=f), f"sort -n {f}", [(f, lines)], sorted(lines, key=int)

    def max_num(rng, lv):
        f, lines = rng.choice(NUM_FILES), _num_lines(rng, lv)
        q = rng.choice(("the largest number in {f}", "the maximum of {f}"))
        return q.format(f=f), f"sort -n {f} | tail -n 1", [(f, lines)], [max(lines, key=int)]

    def cut(rng, lv):
        f, lines = rng.choice(CSV_FILES), _csv_lines(rng, lv)
        k = rng.randint(1, 3)
        q = rng.choice(("field {k} of {f}", "column {k} of {f}"))
        got = [x.split(",")[k - 1] for x in lines]
        return q.format(k=k, f=f), f"cut -d, -f{k} {f}", [(f, lines)], got

    def upper(rng, lv):
        f, lines = words_file(rng, lv)
        q = rng.choice(("{f} in upper case", "{f} in capitals"))
        return q.format(f=f), f"tr a-z A-Z < {f}", [(f, lines)], [x.upper() for x in lines]

    def two_files_count(rng, lv):
        f, g = rng.sample(FILE_NAMES, 2)
        a, b = _word_lines(rng, 1), _word_lines(rng, 1)
        w = pick_word(rng, a + b)
        q = rng.choice(
            (
                "count lines containing '{w}' in {f} and {g}",
                "how many lines of {f} and {g} have '{w}'",
            )
        )
        n = sum(w in x for x in a + b)
        return q.format(w=w, f=f, g=g), f"cat {f} {g} | grep -c {w}", [(f, a), (g, b)], [str(n)]

    # warm-up
    def w_cat(rng, lv):
        f, lines = words_file(rng, lv)
        q = rng.choice(("show {f}", "print the file {f}"))
        return q.format(f=f), f"cat {f}", [(f, lines)], lines

    def w_cat2(rng, lv):
        f, g = rng.sample(FILE_NAMES, 2)
        a, b = _word_lines(rng, 1), _word_lines(rng, 1)
        return f"{f} followed by {g}", f"cat {f} {g}", [(f, a), (g, b)], a + b

    def w_echo(rng, lv):
        f, lines = words_file(rng, lv)
        w = rng.choice(WORDS + SHORT_WORDS)
        q = rng.choice(("print the word '{w}'", "say '{w}'"))
        return q.format(w=w), f"echo {w}", [(f, lines)], [w]

    def w_ls(rng, lv):
        f, g = rng.sample(FILE_NAMES, 2)
        a, b = _word_lines(rng, 1), _word_lines(rng, 1)
        q = rng.choice(("list the files", "the file names"))
        return q, "ls", [(f, a), (g, b)], sorted([f, g])

    skill = [
        grep_count,
        grep,
        grep_v,
        line_count,
        word_count,
        head,
        tail,
        sort,
        sort_r,
        sort_u,
        count_unique,
        sort_n,
        max_num,
        cut,
        upper,
        two_files_count,
    ]
    warm = [w_cat, w_cat2, w_echo, w_ls]
    out = {f.__name__: (True, f) for f in skill}
    out.update({f.__name__: (False, f) for f in warm})
    return out


TEMPLATES: dict[str, dict[str, tuple[bool, Callable]]] = {
    "tiny_code": _code_templates(),
    "tiny_sql": _sql_templates(),
    "tiny_shell": _shell_templates(),
}


def skill_templates(family: str) -> list[str]:
    return [name for name, (skill, _) in TEMPLATES[_family(family)].items() if skill]


def warmup_templates(family: str) -> list[str]:
    return [name for name, (skill, _) in TEMPLATES[_family(family)].items() if not skill]


def _family(family: str) -> str:
    if family not in FAMILIES:
        raise ValueError(f"unknown tiny family {family!r}: use one of {', '.join(FAMILIES)}")
    return family


# ------------------------------------------------------------------------------ generation


def make_sample(family: str, template: str, rng: random.Random, level: int = 2) -> TinySample:
    """One sample of a template (whatever split its question falls in)."""
    fn = TEMPLATES[_family(family)][template][1]
    prefix = PREFIX[family]
    if family == "tiny_code":
        question, answer, variables = fn(rng, level)
        head = f"{prefix}. {code_prompt(variables)}\n" if variables else f"{prefix}. "
        return TinySample(
            family,
            template,
            f"{head}Q: {question}",
            answer,
            canon(trusted_eval(answer, variables)),
            variables=tuple(variables.items()),
        )
    if family == "tiny_sql":
        table, cols = _table(rng, level)
        question, answer = fn(rng, table, cols)
        rows = run_reference_sql(table, answer)
        text = f"{prefix}. {table_prompt(table)}\nQ: {question}"
        ordered = "ORDER BY" in answer
        return TinySample(family, template, text, answer, rows, table=table, ordered=ordered)
    question, answer, files, lines = fn(rng, level)
    files = tuple((name, "\n".join(body) + "\n") for name, body in files)
    text = f"{prefix}. {files_prompt(files)}\nQ: {question}"
    expected = normalise_stdout("\n".join(lines))
    return TinySample(family, template, text, answer, expected, files=files)


def generate(
    family: str,
    n: int,
    seed: int = 0,
    split: str = "eval",
    level: int = 2,
    templates: Sequence[str] | None = None,
) -> list[TinySample]:
    """`n` distinct samples of `family` from `split` ("train" | "eval"), round-robin over
    `templates` (default: the family's skill templates), deterministic in all arguments.

    A template whose questions of this split run out (small ones, like "5 to the power 3" at
    level 1, have a few dozen) leaves the rotation; the others fill in."""
    _family(family)
    _level(level)
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    names = list(templates) if templates is not None else skill_templates(family)
    unknown = [t for t in names if t not in TEMPLATES[family]]
    if unknown or not names:
        raise ValueError(f"unknown {family} templates {unknown}: known {list(TEMPLATES[family])}")
    rng = _rng(family, split, seed, level, ",".join(names))
    order = list(names)
    rng.shuffle(order)
    out: list[TinySample] = []
    seen: set[str] = set()
    turn = 0
    while len(out) < n:
        if not order:
            raise RuntimeError(f"cannot draw {n} distinct {family} {split} samples from {names}")
        template = order[turn % len(order)]
        for _ in range(TRIES):
            sample = make_sample(family, template, rng, level)
            if sample.question not in seen and split_of(sample.question) == split:
                seen.add(sample.question)
                out.append(_with_index(sample, len(out)))
                turn += 1
                break
        else:  # this template's questions of this split are used up: go on without it
            order.remove(template)
    return out


def _with_index(sample: TinySample, index: int) -> TinySample:
    return replace(sample, index=index)

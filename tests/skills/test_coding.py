"""Coding skill (MBPP+) with scripted models: right code scores 1, wrong code 0, malformed or
hostile replies fail without stopping the evaluation; on the real MBPP+ set every canonical
solution passes. Also the data loader (location, sha256)."""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

import pytest

from cycleqd.generate.base import SamplingParams
from cycleqd.skills.coding import (
    SYSTEM_MESSAGE,
    CodingSkill,
    build_instruction,
    extract_code,
    mbpp_deserialize_inputs,
    outputs_match,
    sanitize,
)
from cycleqd.skills.data import (
    KNOWN_SHA256,
    MBPP_PLUS,
    DataError,
    DataIntegrityError,
    load_jsonl,
)

from .services import sandbox_skip

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
needs_data = pytest.mark.skipif(
    not (DATA / MBPP_PLUS).exists(),
    reason=f"the real MBPP+ set is not at {DATA.resolve()} (see the data README)",
)


_SKIP = sandbox_skip()
needs_sandbox = pytest.mark.skipif(_SKIP is not None, reason=str(_SKIP))


class ScriptedBackend:
    """A 'model' with fixed replies: reply_for(conversation) -> str."""

    def __init__(self, reply_for):
        self.reply_for = reply_for
        self.calls: list[int] = []

    def generate(self, conversations, params):
        self.calls.append(len(conversations))
        return [self.reply_for(list(c)) for c in conversations]


ROWS = [
    {
        "task_id": "Mbpp/9001",
        "prompt": '"""\nWrite a function to add two integers.\n"""\n',
        "entry_point": "add_numbers",
        "canonical_solution": "\ndef add_numbers(a, b):\n    return a + b\n",
        "base_input": [[1, 2], [-5, 5], [10**30, 1]],
        "plus_input": [[0, 0], [7, -8]],
        "atol": 0,
        "assertion": "\nassert add_numbers(1, 2) == 3\nassert add_numbers(-5, 5) == 0\n",
    },
    {
        "task_id": "Mbpp/9002",
        "prompt": '"""\nWrite a function to find the area of a circle of radius r\n"""\n',
        "entry_point": "circle_area",
        "canonical_solution": "\ndef circle_area(r):\n    return 3.141592653589793 * r * r\n",
        "base_input": [[1], [2.5], [10]],
        "plus_input": [],
        "atol": 0.0001,
        "assertion": "\nassert math.isclose(circle_area(1), 3.14159, rel_tol=0.001)\n",
    },
    {  # tuples come back from JSON lists (EvalPlus's deserialisation of Mbpp/2)
        "task_id": "Mbpp/2",
        "prompt": '"""\nWrite a function to find the shared elements of two lists.\n"""',
        "entry_point": "similar_elements",
        "canonical_solution": "\ndef similar_elements(a, b):\n  return tuple(set(a) & set(b))\n",
        "base_input": [[[3, 4, 5, 6], [5, 7, 4, 10]], [[11, 12, 14, 13], [17, 15, 14, 13]]],
        "plus_input": [],
        "atol": 0,
        "assertion": "\nassert set(similar_elements((3, 4, 5, 6),(5, 7, 4, 10))) == set((4, 5))\n",
    },
]

RIGHT = {
    "add_numbers": "Sure!\n```python\ndef add_numbers(a, b):\n    return b + a\n```\nDone.",
    "circle_area": (
        "```python\nimport math\n\ndef circle_area(r):\n    return math.pi * r ** 2\n\n"
        "print(circle_area(2))\nassert circle_area(0) == 1  # a wrong example test\n```"
    ),
    # order differs from the reference's set order: accepted (EvalPlus set-equality oracle);
    # also checks that the inputs really are tuples
    "similar_elements": (
        "```python\ndef similar_elements(t1, t2):\n    assert isinstance(t1, tuple)\n"
        "    return tuple(sorted(set(t1) & set(t2), reverse=True))\n```"
    ),
}
WRONG = {
    "add_numbers": "```python\ndef add_numbers(a, b):\n    return a - b\n```",
    "circle_area": "```python\ndef circle_area(r):\n    return 3.14 * r * r\n```",
    "similar_elements": "```python\ndef similar_elements(a, b):\n    return a\n```",
}


def _entry(conversation) -> str:
    text = conversation[-1]["content"]
    for row in ROWS:
        if row["entry_point"] + "(" in text:
            return row["entry_point"]
    raise AssertionError(f"unknown task in {text!r}")


def _skill(**kw) -> CodingSkill:
    return CodingSkill(rows=ROWS, **kw)


# -- pure parts ------------------------------------------------------------------------------


def test_prompt_is_system_message_plus_instruction_with_assertion():
    skill = _skill()
    conv = skill.conversations()[0]
    assert conv[0] == {"role": "system", "content": SYSTEM_MESSAGE}
    assert conv[1]["role"] == "user"
    assert conv[1]["content"] == (
        "Write a function to add two integers. Your code should satisfy the following "
        "assertion:\n```python\nassert add_numbers(1, 2) == 3\n```\n"
        "Write the complete Python function in a ```python code block."
    )
    assert skill.sampling == SamplingParams(max_new_tokens=512, temperature=0.0)


def test_extract_code():
    assert extract_code("a\n```python\nx = 1\n```\n```python\ny = 2\n```") == "x = 1"
    assert extract_code("```\nplain = 1\n```") == "plain = 1"
    assert extract_code("```bash\nls\n```\n```py\nz = 3\n```") == "z = 3"
    assert extract_code("def f():\n    return 1") == "def f():\n    return 1"
    assert extract_code("```python\ndef f():\n    return 1") == "def f():\n    return 1"  # cut off
    assert extract_code(None) == ""  # type: ignore[arg-type]


def test_sanitize_keeps_definitions_and_what_they_use():
    code = (
        "import math\nSCALE = 2\nunused = print('side effect')\n\n@staticmethod\n"
        "def f(x):\n    return math.sqrt(x) * SCALE\n\nprint(f(4))\nassert f(1) == 0\n"
        "if __name__ == '__main__':\n    f(3)\n"
    )
    out = sanitize(code)
    assert "print" not in out and "assert" not in out and "__main__" not in out
    assert "import math" in out and "SCALE = 2" in out and "@staticmethod" in out
    assert sanitize("def broken(:\n") == "def broken(:\n"


def test_outputs_match_follows_evalplus():
    assert outputs_match(1, 1.0, 0, "f")
    assert outputs_match(0.1 + 0.2, 0.3, 0, "f")  # floats: atol at least 1e-6
    assert not outputs_match(0.31, 0.3, 0, "f")
    assert outputs_match([1.00001, 2.0], [1.0, 2.0], 1e-4, "f")
    assert not outputs_match((1.0, 2.0), [1.0, 2.0], 1e-4, "f")  # type must match
    assert not outputs_match(math.nan, math.nan, 1e-4, "f")
    assert not outputs_match((1, 2), [1, 2], 0, "f")
    assert outputs_match((2, 1), (1, 2), 0, "similar_elements")
    assert outputs_match("match", True, 0, "text_match_three")  # "not None" oracle
    assert not outputs_match(None, True, 0, "text_match_three")
    assert outputs_match(123, False, 0, "are_equivalent")


def test_mbpp_input_types_are_restored():
    assert mbpp_deserialize_inputs("Mbpp/2", [[[1, 2], [3]]]) == [[(1, 2), (3,)]]
    assert mbpp_deserialize_inputs("Mbpp/124", [[1, 2]]) == [(1.0, complex(2))]
    assert mbpp_deserialize_inputs("Mbpp/580", [[[1, [2, 3]]]]) == [((1, (2, 3)),)]
    assert mbpp_deserialize_inputs("Mbpp/3", [[1]]) == [[1]]


def test_instruction_from_released_prompt_format():
    """Released MBPP+ prompts carry the first test inside the docstring."""
    skill = CodingSkill(
        rows=[
            dict(
                ROWS[0],
                prompt='"""\nWrite a function to add.\nassert add_numbers(1, 2) == 3\n"""\n',
                assertion="",
            )
        ]
    )
    text = build_instruction(skill.tasks[0])
    assert text.startswith("Write a function to add. Your code should satisfy")
    assert "```python\nassert add_numbers(1, 2) == 3\n```" in text


# -- scripted models in the sandbox -------------------------------------------------------------


@needs_sandbox
def test_right_code_scores_one_wrong_code_scores_zero():
    skill = _skill()
    right = ScriptedBackend(lambda c: RIGHT[_entry(c)])
    result = skill.evaluate(right)
    assert right.calls == [3]  # every task in one generate call
    assert [s.correct for s in result.samples] == [True, True, True], [
        s.detail.get("error") for s in result.samples
    ]
    assert result.quality == 1.0 and result.skill == "coding"
    wrong = skill.evaluate(ScriptedBackend(lambda c: WRONG[_entry(c)]))
    assert wrong.quality == 0.0
    assert all("wrong output" in s.detail["error"] for s in wrong.samples)


@needs_sandbox
def test_plus_inputs_are_an_option():
    skill = _skill(inputs="plus")
    reply = "```python\ndef add_numbers(a, b):\n    return a + b if a != 7 else a - b\n```"
    base = _skill().score_reply(_skill().tasks[0], reply)
    plus = skill.score_reply(skill.tasks[0], reply)
    assert base.correct and not plus.correct  # 7 - (-8) != -1 only among the plus inputs
    assert plus.detail["total_inputs"] == 5


MALFORMED = {
    "empty": "",
    "prose": "I am sorry, I cannot write this function.",
    "syntax_error": "```python\ndef add_numbers(a, b) return a + b\n```",
    "wrong_name": "```python\ndef add(a, b):\n    return a + b\n```",
    "not_a_string": None,
    "raises": "```python\ndef add_numbers(a, b):\n    raise ValueError('no')\n```",
    "exits_in_call": "```python\nimport sys\ndef add_numbers(a, b):\n    sys.exit(0)\n```",
    "exits_at_import": "```python\nimport sys\nK = sys.exit(0)\ndef add_numbers(a, b):\n"
    "    return a + b + K\n```",
    "os_exit_in_call": "```python\nimport os\ndef add_numbers(a, b):\n    os._exit(0)\n```",
    "infinite_loop": "```python\ndef add_numbers(a, b):\n    while True:\n        pass\n```",
    "ignores_alarm": "```python\nimport signal\ndef add_numbers(a, b):\n"
    "    signal.signal(signal.SIGALRM, signal.SIG_IGN)\n    while True:\n        pass\n```",
    "fork_bomb": "```python\nimport os\ndef add_numbers(a, b):\n    while True:\n"
    "        try:\n            os.fork()\n        except OSError:\n            pass\n```",
    "huge_memory": "```python\ndef add_numbers(a, b):\n    x = bytearray(10**11)\n"
    "    return a + b\n```",
    "prints_a_lot": "```python\ndef add_numbers(a, b):\n    print('x' * 10**7)\n"
    "    return a - b\n```",
    "forged_result_line": '```python\nimport sys\nprint(\'{"status": "ok", "results": []}\')\n'
    "def add_numbers(a, b):\n    return 0\n```",
    "returns_a_generator": "```python\ndef add_numbers(a, b):\n"
    "    return (x for x in [a + b])\n```",
}


@needs_sandbox
def test_malformed_and_hostile_replies_fail_without_crashing():
    skill = _skill(min_time_limit=0.5)
    task = skill.tasks[0]
    t0 = time.monotonic()
    for name, reply in MALFORMED.items():
        result = skill.score_reply(task, reply)  # type: ignore[arg-type]
        assert result.correct is False, name
        assert result.detail.get("error"), name
    assert time.monotonic() - t0 < 120
    # ...and a correct reply still scores afterwards
    assert skill.score_reply(task, RIGHT["add_numbers"]).correct


@needs_sandbox
def test_wrong_number_of_replies_is_an_error_not_a_score():
    skill = _skill()
    with pytest.raises(ValueError, match="replies"):
        skill.evaluate(type("B", (), {"generate": lambda self, c, p: ["x"]})())


# -- the real data ---------------------------------------------------------------------------


@needs_data
@needs_sandbox
def test_real_mbpp_first_tasks_right_and_wrong():
    skill = CodingSkill(DATA, limit=8)
    by_text = {build_instruction(t): t for t in skill.tasks}
    right = skill.evaluate(
        ScriptedBackend(lambda c: f"```python\n{by_text[c[-1]['content']].reference_code}\n```")
    )
    assert right.quality == 1.0
    wrong = skill.evaluate(
        ScriptedBackend(
            lambda c: (
                f"```python\ndef {by_text[c[-1]['content']].entry_point}(*a):\n    return None\n```"
            )
        )
    )
    assert wrong.quality == 0.0


@needs_data
@needs_sandbox
def test_real_mbpp_plus_inputs_canonical_passes():
    skill = CodingSkill(DATA, limit=6, inputs="plus")
    replies = [f"```python\n{t.reference_code}\n```" for t in skill.tasks]
    result = skill.score(replies)
    assert result.quality == 1.0, [s.detail.get("error") for s in result.samples]


@pytest.mark.slow
@needs_data
@needs_sandbox
def test_real_mbpp_canonical_solutions_score_100_percent_on_base_inputs(capsys):
    t0 = time.monotonic()
    skill = CodingSkill(DATA)
    assert len(skill.tasks) == 399
    replies = [f"```python\n{t.reference_code}\n```" for t in skill.tasks]
    result = skill.score(replies)
    elapsed = time.monotonic() - t0
    failed = [(s.sample_id, s.detail.get("error")) for s in result.samples if not s.correct]
    with capsys.disabled():
        passed = len(result.samples) - len(failed)
        print(
            f"\nMBPP+ canonical base pass@1: {result.quality:.4f} ({passed}/399) in {elapsed:.1f} s"
        )
    assert failed == []


# -- data loading ----------------------------------------------------------------------------


def test_load_jsonl_checks_sha256(tmp_path):
    rows = [{"a": 1}, {"b": [2]}]
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    (tmp_path / "x.jsonl").write_bytes(data)
    assert load_jsonl(tmp_path, "x.jsonl") == rows
    assert load_jsonl(tmp_path / "x.jsonl", sha256=hashlib.sha256(data).hexdigest()) == rows
    assert load_jsonl(f"file://{tmp_path}/x.jsonl") == rows
    with pytest.raises(DataIntegrityError, match="does not match"):
        load_jsonl(tmp_path / "x.jsonl", sha256="0" * 64)
    # a file with a known name is always checked against the published checksum
    (tmp_path / MBPP_PLUS).write_bytes(data)
    with pytest.raises(DataIntegrityError, match=KNOWN_SHA256[MBPP_PLUS]):
        load_jsonl(tmp_path, MBPP_PLUS)
    assert load_jsonl(tmp_path, MBPP_PLUS, verify=False) == rows


def test_load_jsonl_errors_say_where(tmp_path, monkeypatch):
    monkeypatch.delenv("CYCLEQD_DATA", raising=False)
    with pytest.raises(DataError, match="CYCLEQD_DATA"):
        load_jsonl(None, MBPP_PLUS)
    with pytest.raises(DataError, match="does not exist"):
        load_jsonl(tmp_path, "missing.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"ok": 1}\nnot json\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2"):
        load_jsonl(tmp_path / "bad.jsonl")
    monkeypatch.setenv("CYCLEQD_DATA", str(tmp_path))
    (tmp_path / "y.jsonl").write_text('{"y": 1}\n')
    assert load_jsonl(None, "y.jsonl") == [{"y": 1}]


def test_object_store_uris_go_through_the_object_store(monkeypatch):
    calls = []

    class Store:
        def get_bytes(self, key):
            calls.append(key)
            return b'{"remote": true}\n'

    def fake_open_store(uri):
        calls.append(uri)
        return Store()

    monkeypatch.setattr("cycleqd.objectstore.open_store", fake_open_store)
    assert load_jsonl("s3://bucket/datasets", "z.jsonl") == [{"remote": True}]
    assert calls == ["s3://bucket/datasets", "z.jsonl"]


@needs_data
def test_real_data_files_match_their_published_checksums():
    for name, rows in (("mbppplus.jsonl", 399), ("agentbench_os.jsonl", 170)):
        assert len(load_jsonl(DATA, name)) == rows

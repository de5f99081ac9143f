"""OS skill (AgentBench OS) with scripted models: multi-turn episodes in sandboxes, judged as
AgentBench judges them; malformed or hostile replies fail without stopping the evaluation;
on the real set, the tasks' own example scripts played as the agent pass as far as the data
allows (the known exceptions are listed below, with why)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from cycleqd.skills.data import AGENTBENCH_OS
from cycleqd.skills.os_skill import (
    EMPTY_OUTPUT,
    NEW_PROBLEM,
    ONE_SHOT,
    OUTPUT_PREFIX,
    PROMPT,
    TRUNCATED,
    OSSkill,
    format_output,
    parse_action,
)

from .services import sandbox_skip

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
needs_data = pytest.mark.skipif(
    not (DATA / AGENTBENCH_OS).exists(),
    reason=f"the real AgentBench OS set is not at {DATA.resolve()} (see the data README)",
)


_SKIP = sandbox_skip(user="root", cwd="/")
needs_sandbox = pytest.mark.skipif(_SKIP is not None, reason=str(_SKIP))

INT_CHECK = {
    "language": "python",
    "code": "from sys import argv\nif int(argv[1]) == int(argv[2]):\n    exit(0)\nexit(1)\n",
}
ROWS = [
    {  # answer checked against the example script's output, in the same sandbox
        "index": 0,
        "description": "How many files are in /data?",
        "init_script": [
            {"language": "bash", "code": "mkdir /data && touch /data/a /data/b /data/c"}
        ],
        "start": None,
        "check": [None, INT_CHECK],
        "match": None,
        "example_script": {"language": "bash", "code": "ls /data | wc -l"},
    },
    {  # exact answer; the start script's shell variable is visible to the agent
        "index": 1,
        "description": "Test if variable var is an integer? Answer yes or no.",
        "init_script": None,
        "start": {"language": "bash", "code": "var=10"},
        "check": None,
        "match": {"answer": "yes", "strip": True},
        "example_script": None,
    },
    {  # an operation, verified by a checker script
        "index": 2,
        "description": "Create the file /root/done containing ok, then finish.",
        "init_script": [],
        "start": None,
        "check": [{"language": "bash", "code": '[ "$(cat /root/done)" = ok ]'}],
        "match": None,
        "example_script": {"language": "bash", "code": "echo ok > /root/done"},
    },
    {  # python init script; users, groups, files owned by them (a full uid range)
        "index": 3,
        "description": "Which user owns /srv/report? Also tell me the number in /tmp/n plus 1.",
        "init_script": [
            {"language": "python", "code": "open('/tmp/n', 'w').write('41')"},
            {
                "language": "bash",
                "code": "useradd -m alice && touch /srv/report && chown alice /srv/report",
            },
        ],
        "start": None,
        "check": [None, INT_CHECK],
        "match": None,
        "example_script": {"language": "bash", "code": "echo $(( $(cat /tmp/n) + 1 ))"},
    },
]

GOOD = {
    0: ["Think: list it.\n\nAct: bash\n\n```bash\nls /data | wc -l\n```", "Act: answer(3)"],
    1: [
        "Think: test.\n\nAct: bash\n\n```bash\n[[ $var =~ ^[0-9]+$ ]] && echo yes || echo no\n```",
        "Think: it is.\n\nAct: answer(yes)",
    ],
    2: ["Act: bash\n\n```bash\necho ok > /root/done\n```", "Think: done.\n\nAct: finish"],
    3: [
        "Act: bash\n\n```bash\nstat -c %U /srv/report; cat /tmp/n\n```",
        "Think: 41 + 1.\n\nAct: answer(42)",
    ],
}
BAD = {
    0: ["Act: answer(4)"],
    1: ["Act: answer(no)"],
    2: ["Act: bash\n\n```bash\necho nope > /root/done\n```", "Act: finish"],
    3: ["Act: answer(41)"],
}


def _index(conversation) -> int:
    description = conversation[len(ONE_SHOT)]["content"][len(NEW_PROBLEM) :]
    return next(r["index"] for r in ROWS if r["description"] == description)


class ScriptedBackend:
    """A 'model' with a fixed script of replies per task (by turn), recording every call."""

    def __init__(self, script: dict[int, list[str]]):
        self.script = script
        self.calls: list[list[int]] = []
        self.seen: dict[int, list[dict]] = {}

    def generate(self, conversations, params):
        self.calls.append([_index(c) for c in conversations])
        out = []
        for c in conversations:
            i = _index(c)
            self.seen[i] = list(c)
            turn = sum(1 for m in c[len(ONE_SHOT) + 1 :] if m["role"] == "assistant")
            replies = self.script[i]
            out.append(replies[min(turn, len(replies) - 1)])
        return out


def _skill(**kw) -> OSSkill:
    return OSSkill(rows=ROWS, **kw)


# -- pure parts ------------------------------------------------------------------------------


def test_parse_action_follows_agentbench():
    bash = parse_action("Think: x\n\nAct: bash\n\n```bash\nls\n```\n\n```bash\npwd\n```")
    assert (bash.kind, bash.content) == ("bash", "ls\n\npwd")
    assert parse_action("Act: answer(42)").content == "42"
    assert parse_action("Act: answer( (a) b )").content == " (a) b "
    assert parse_action("Act: Finish").kind == "finish"
    # the last valid action wins; an answer without parentheses is skipped
    assert parse_action("Act: bash\n```bash\nls\n```\nAct: answer(7)").content == "7"
    assert parse_action("Act: answer(7)\nAct: answer oops").content == "7"
    for junk in ("", "no action here", "Act: dance", "Act: answer 7", None):
        assert parse_action(junk).kind == "invalid"  # type: ignore[arg-type]
    assert parse_action("Act: bash\nls").content == ""  # no ```bash block: an empty command


def test_format_output_truncates_like_agentbench():
    assert format_output("") == EMPTY_OUTPUT
    assert format_output("42\n") == OUTPUT_PREFIX + "42\n"
    long = format_output("x" * 801)
    assert long == OUTPUT_PREFIX + "x" * 780 + TRUNCATED


def test_conversation_starts_with_the_agentbench_prompt_and_one_shot():
    skill = _skill()
    backend = ScriptedBackend({i: ["Act: answer(0)"] for i in range(4)})
    if _SKIP is None:
        skill.evaluate(backend)
        conv = backend.seen[0]
    else:
        from cycleqd.skills.os_skill import initial_messages

        conv = initial_messages(ROWS[0]["description"])
    assert conv[0]["role"] == "user" and conv[0]["content"].startswith(PROMPT)
    assert conv[0]["content"].endswith('Now, my problem is:\n\ntell me how many files are in '
                                       'the directory "/etc"?')  # fmt: skip
    assert [m["role"] for m in conv[1:6]] == ["assistant", "user"] * 2 + ["assistant"]
    assert conv[6] == {"role": "user", "content": NEW_PROBLEM + ROWS[0]["description"]}


# -- scripted models in sandboxes ------------------------------------------------------------


@needs_sandbox
def test_right_answers_score_one_and_rounds_are_batched():
    backend = ScriptedBackend(GOOD)
    result = _skill().evaluate(backend)
    assert [s.correct for s in result.samples] == [True] * 4, [
        (s.detail["answer"], s.detail["error"], s.detail["log"]) for s in result.samples
    ]
    assert result.quality == 1.0 and result.skill == "os"
    # one generate call per round, with every episode still open
    assert backend.calls == [[0, 1, 2, 3], [0, 1, 2, 3]]
    transcript = result.samples[3].detail["transcript"]
    assert transcript[0]["role"] == "user" and "owns /srv/report" in transcript[0]["content"]
    assert transcript[2]["content"] == OUTPUT_PREFIX + "alice\n41"
    assert result.samples[1].detail["answer"] == "yes"


@needs_sandbox
def test_wrong_answers_score_zero():
    result = _skill().evaluate(ScriptedBackend(BAD))
    assert [s.correct for s in result.samples] == [False] * 4


MALFORMED = [
    "",
    "I would rather not.",
    "Act: dance",
    "Act: answer 3",  # no parentheses: not an action
    None,
    "Act: bash",  # no code block: runs an empty command, episode goes on
    "```bash\nls /data | wc -l\n```",  # no Act line
    "Act: " + "x" * 100_000,
]


@needs_sandbox
def test_malformed_replies_fail_without_crashing():
    for reply in MALFORMED:
        backend = ScriptedBackend({i: [reply] for i in range(4)})  # type: ignore[list-item]
        result = _skill().evaluate(backend)
        assert result.quality == 0.0, reply
        assert len(result.samples) == 4


@needs_sandbox
def test_round_limit_and_shell_state_across_turns():
    looping = [
        "Act: bash\n\n```bash\ncd /tmp && X=5 && export Y=6 && f() { echo fn; }\n```",
        "Act: bash\n\n```bash\necho $PWD $X $Y $(f) $var\n```",
        "Act: bash\n\n```bash\nexit 3\n```",  # exiting the shell keeps its state too
        "Act: bash\n\n```bash\necho $PWD $?\n```",
        "Act: bash\n\n```bash\nsleep 100 &\n```",
    ]
    backend = ScriptedBackend({i: looping for i in range(4)})
    result = _skill(max_rounds=5).evaluate(backend)
    assert len(backend.calls) == 5 and result.quality == 0.0
    sample = result.samples[1]  # the start script set var=10
    assert sample.detail["rounds"] == 5 and sample.detail["answer"] == ""
    outputs = [m["content"] for m in sample.detail["transcript"] if m["role"] == "user"]
    assert outputs[2] == OUTPUT_PREFIX + "/tmp 5 6 fn 10\n"
    assert outputs[4] == OUTPUT_PREFIX + "/tmp 0\n"


@needs_sandbox
def test_hostile_actions_ruin_only_their_own_episode():
    attacks = [
        "Act: bash\n\n```bash\n:(){ :|:& };:\n```",
        "Act: bash\n\n```bash\nrm -rf --no-preserve-root / 2>/dev/null; echo gone\n```",
        "Act: bash\n\n```bash\nkill -9 -1\n```",
    ]
    script = dict(GOOD)
    script[1] = attacks  # the match task's episode goes rogue; the others play fair
    t0 = time.monotonic()
    result = _skill(action_timeout=5.0).evaluate(ScriptedBackend(script))
    assert time.monotonic() - t0 < 120
    assert [s.correct for s in result.samples] == [True, False, True, True]


@needs_sandbox
def test_background_processes_of_the_start_script_live_through_the_episode():
    rows = [
        {
            "index": 7,
            "description": "Which program writes to /root/log?",
            "init_script": [],
            "start": {
                "language": "bash",
                "code": 'python3 -c \'import time\nwhile True:\n  open("/root/log", "a")'
                '.write("x")\n  time.sleep(0.2)\' &',
            },
            "check": None,
            "match": {"answer": "python3", "strip": True},
            "example_script": None,
        }
    ]
    script = [
        "Act: bash\n\n```bash\nsleep 1; ps -eo comm | grep -c python3; wc -c < /root/log\n```",
        "Act: answer(python3)",
    ]

    class Backend:
        transcript: tuple = ()

        def generate(self, conversations, params):
            (conv,) = conversations
            Backend.transcript = tuple(conv)
            turn = sum(1 for m in conv[len(ONE_SHOT) + 1 :] if m["role"] == "assistant")
            return [script[turn]]

    result = OSSkill(rows=rows).evaluate(Backend())
    assert result.quality == 1.0
    count, size = Backend.transcript[-1]["content"][len(OUTPUT_PREFIX) :].split()
    assert int(count) == 1 and int(size) >= 3


# -- the real data ---------------------------------------------------------------------------

# Samples whose reference play cannot pass here (or only by chance: "flaky"), and why.
KNOWN_FAILURES = {
    38: "the checker walks /lib recursively in bash, twice; the host's /usr is large (GBs) "
    "and it runs past the 60 s script limit",
    42: "checker parses `du -sh /usr` with int(); the host's /usr is '5.1G' (a decimal)",
    52: "needs `apt install sudo` (network) and a setuid sudo",
    53: "needs `apt install sudo` (network) and a setuid sudo",
    55: "needs `apt install sudo` (network) and a setuid sudo",
    62: "flaky: depends on live memory use (`free`) at the moment of each run",
    64: "flaky: counts files from / (the variable is unset in the agent's shell): /proc "
    "differs between the agent's run and the checker's run",
    65: "`find .` from / over the host's /usr: a multi-line answer, unanswerable in one line",
    74: "flaky: depends on live memory use (`free`) at the moment of each run",
    85: "flaky: counts files from / including /proc: differs between the two runs",
    153: "checker parses `du -sh` output with int(); '4.0K' fails (a data bug, also upstream)",
}


class ReferenceAgent:
    """Plays each task's example script as its bash action, then answers with its output
    (or finishes); match-only tasks are answered with the expected answer."""

    def __init__(self, tasks):
        self.tasks = list(tasks)
        self.by_conv: dict[int, object] = {}

    def generate(self, conversations, params):
        out = []
        for conv in conversations:
            task = self.by_conv.get(id(conv))
            if task is None:
                description = conv[len(ONE_SHOT)]["content"][len(NEW_PROBLEM) :]
                task = next(t for t in self.tasks if t.description == description)
                self.tasks.remove(task)
                self.by_conv[id(conv)] = task
            last = conv[-1]["content"]
            if last.startswith(NEW_PROBLEM) and task.example_script is not None:
                out.append(f"Act: bash\n\n```bash\n{task.example_script.code}\n```")
            elif task.example_script is None and task.match:
                out.append(f"Act: answer({task.match['answer']})")
            elif last.startswith(OUTPUT_PREFIX) and last[len(OUTPUT_PREFIX) :].strip():
                out.append(f"Act: answer({last[len(OUTPUT_PREFIX) :].strip()})")
            elif task.check and None in task.check:
                out.append("Act: answer()")
            else:
                out.append("Act: finish")
        return out


@pytest.mark.slow
@needs_data
@needs_sandbox
def test_real_os_reference_play_passes_as_far_as_the_data_allows(capsys):
    t0 = time.monotonic()
    skill = OSSkill(DATA)
    assert len(skill.tasks) == 170
    result = skill.evaluate(ReferenceAgent(skill.tasks))
    elapsed = time.monotonic() - t0
    failed = {int(s.sample_id.split("/")[1]): s for s in result.samples if not s.correct}
    with capsys.disabled():
        passed = 170 - len(failed)
        print(
            f"\nAgentBench OS reference play: {result.quality:.4f} ({passed}/170) in "
            f"{elapsed:.1f} s; failing: {sorted(failed)}"
        )
    unexpected = {
        i: json.dumps(s.detail["log"])[:600] for i, s in failed.items() if i not in KNOWN_FAILURES
    }
    assert not unexpected
    assert result.quality >= (170 - len(KNOWN_FAILURES)) / 170 - 1e-9

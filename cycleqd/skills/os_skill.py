"""OS skill: AgentBench OS interaction, multi-turn, every command in a sandboxed machine.

Each episode gets a fresh sandbox session (root inside it, an Ubuntu-like writable file
system, no network), runs the task's init scripts and start script, then talks with the
model for at most `max_rounds` rounds in AgentBench's format: every reply must take one of
three actions,

    Act: bash  + a ```bash block   -> run in the episode's shell, output is the next user turn
    Act: answer(<answer>)          -> end the episode with that answer
    Act: finish                    -> end the episode (the task was an operation)

and is judged as AgentBench judges it: `match` compares the answer exactly (optionally
stripped); a `check` list runs scripts in the same sandbox, each receiving the answer and the
outputs of the scripts before it as arguments (a null entry means the task's
`example_script`), and passes when all exit with 0. A reply without a valid action ends the
episode with an empty answer. All still-open episodes of a round go to the backend in one
`generate` call.

The shell: AgentBench types the commands into one interactive `bash --login`. Here every
command is a fresh `bash` that restores and saves the shell's state (working directory,
variables, exported environment, functions, aliases), so `cd`, `var=...` and `export` carry
over from turn to turn; background processes (`cmd &`) keep running for the whole episode.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cycleqd.generate.base import ChatBackend, Message, SamplingParams
from cycleqd.sandbox import Limits, MiB, RunResult, SandboxError, get_backend
from cycleqd.sandbox.base import Backend, Session
from cycleqd.skills.base import SampleResult, SkillResult
from cycleqd.skills.data import AGENTBENCH_OS, load_jsonl

# AgentBench OS (THUDM/AgentBench, os_interaction/task.py), as CycleQD's evaluation uses it.
PROMPT = (
    "You are an assistant that will act like a person, I'will play the role of linux(ubuntu) "
    "operating system. Your goal is to implement the operations required by me or answer to "
    "the question proposed by me. For each of your turn, you should first think what you "
    'should do, and then take exact one of the three actions: "bash", "finish" or '
    '"answer". \n\n'
    "1. If you think you should execute some bash code, take bash action, and you should "
    "print like this:\n\nThink: put your thought here.\n\nAct: bash\n\n```bash\n"
    "# put your bash code here\n```\n\n"
    "2. If you think you have finished the task, take finish action, and you should print "
    "like this:\n\nThink: put your thought here.\n\nAct: finish\n\n"
    "3. If you think you have got the answer to the question, take answer action, and you "
    "should print like this:\n\nThink: put your thought here.\n\n"
    "Act: answer(Your answer to the question should be put in this pair of parentheses)\n\n"
    "If the output is too long, I will truncate it. The truncated output is not complete. "
    "You have to deal with the truncating problem by yourself. Attention, your bash code "
    "should not contain any input operation. Once again, you should take only exact one of "
    "the three actions in each turn.\n\n"
)
ONE_SHOT: list[Message] = [
    {
        "role": "user",
        "content": 'tell me how many files are in the directory "/etc"?',
    },
    {
        "role": "assistant",
        "content": "Think: To count the files in /etc, I need to print all the files in it.\n\n"
        "Act: bash\n\n```bash\nls /etc\n```",
    },
    {
        "role": "user",
        "content": "The output of the OS:\ncpi cron.hourly fuse.conf iproute2 lvm "
        "networkd-dispatcher protocols selinux tmpfiles.d [truncated because the output is "
        "too long]",
    },
    {
        "role": "assistant",
        "content": "Think: The output has been truncated because it is too long, so I need to "
        "count files by script directly.\n\nAct: bash\n\n```bash\nls -1 /etc | wc -l\n```",
    },
    {"role": "user", "content": "The output of the OS:\n220"},
    {
        "role": "assistant",
        "content": "Think: Now I get the answer, it is 220.\n\nAct: answer(220)",
    },
]
NEW_PROBLEM = "Now, I will start a new problem in a new OS. My problem is:\n\n"
FIRST_PROBLEM = "Now, my problem is:\n\n"
OUTPUT_PREFIX = "The output of the OS:\n\n"
EMPTY_OUTPUT = "The output of the OS is empty."
TRUNCATE_AT, TRUNCATE_KEEP = 800, 780
TRUNCATED = "\n[truncated because the output is too long]"

# The 111 task indices CycleQD optimises on (SakanaAI/CycleQD tasks/agentbench_os.py).
CYCLEQD_TASK_IDS = (
    1, 2, 3, 4, 5, 7, 8, 11, 12, 13, 15, 16, 17, 19, 21, 22, 23, 24, 25, 26, 27, 28, 34, 35,
    36, 39, 40, 42, 43, 44, 45, 46, 49, 50, 51, 52, 54, 57, 60, 61, 63, 66, 75, 76, 77, 78,
    79, 83, 84, 88, 89, 90, 92, 93, 94, 96, 97, 99, 101, 102, 103, 105, 108, 109, 111, 115,
    116, 117, 118, 119, 123, 124, 128, 129, 132, 133, 135, 136, 137, 138, 139, 140, 141, 142,
    144, 145, 146, 147, 148, 149, 150, 151, 152, 153, 154, 155, 156, 157, 158, 159, 160, 161,
    162, 163, 164, 165, 166, 167, 168, 169,
)  # fmt: skip

# One agent turn = a fresh bash that restores the episode's shell state, runs the command
# (stderr merged into stdout, as a terminal shows it) and saves the state on any exit.
SHELL_STATE_DIR = "/run/.cycleqd-shell"
SHELL_WRAPPER = r"""
__cq_d=/run/.cycleqd-shell
mkdir -p "$__cq_d" 2>/dev/null
if [ -r "$__cq_d/state" ]; then . "$__cq_d/state" >/dev/null 2>&1; fi
builtin cd -- "$(cat "$__cq_d/cwd" 2>/dev/null || echo /)" 2>/dev/null || builtin cd /
__cq_save() {
  __cq_rc=$?
  builtin pwd > "$__cq_d/cwd" 2>/dev/null
  mapfile -t __cq_names < <(compgen -v)
  {
    for __cq_n in "${__cq_names[@]}"; do
      case "$__cq_n" in
        __cq_*|BASH|BASH_*|BASHOPTS|BASHPID|COLUMNS|COMP_*|DIRSTACK|EPOCHREALTIME|\
EPOCHSECONDS|EUID|FUNCNAME|GROUPS|HISTCMD|HOSTNAME|HOSTTYPE|LINENO|LINES|MACHTYPE|\
OLDPWD|OPTERR|OPTIND|OSTYPE|PIPESTATUS|PPID|PWD|RANDOM|SECONDS|SHELLOPTS|SHLVL|\
SRANDOM|UID|_) continue ;;
      esac
      declare -p "$__cq_n" 2>/dev/null
    done
    declare -f
    alias -p
  } > "$__cq_d/state.new" 2>/dev/null && mv -f "$__cq_d/state.new" "$__cq_d/state"
  exit "$__cq_rc"
}
trap __cq_save EXIT
exec 2>&1 </dev/null
__cq_cmd=$1
shift
eval "$__cq_cmd"
"""
# `docker exec` semantics for init/check scripts: one stream, stdout and stderr interleaved.
MERGED = 'exec 2>&1 </dev/null; exec "$@"'


@dataclass(frozen=True)
class Script:
    language: str  # bash | python
    code: str

    @classmethod
    def parse(cls, obj: Any) -> Script | None:
        if obj is None:
            return None
        if isinstance(obj, dict):
            return cls(str(obj.get("language", "bash")), str(obj.get("code", "")))
        if isinstance(obj, list | tuple) and len(obj) == 2:
            return cls(str(obj[0]), str(obj[1]))
        if isinstance(obj, str):
            return cls("bash", obj)
        raise ValueError(f"unrecognised script {obj!r}")

    def argv(self, params: Sequence[str] = ()) -> list[str]:
        if self.language == "bash":
            argv = ["bash", "-c", self.code]
            if params:
                argv += ["--", *params]
        elif self.language == "python":
            argv = ["python3", "-c", self.code, *params]
        else:
            raise ValueError(f"unsupported script language {self.language!r}")
        return ["bash", "-c", MERGED, "cycleqd", *argv]


@dataclass(frozen=True)
class OSTask:
    index: int
    description: str
    init_script: tuple[Script, ...]
    start: Script | None
    check: tuple[Script | None, ...] | None
    match: dict | None
    example_script: Script | None

    @classmethod
    def from_row(cls, row: dict) -> OSTask:
        check = row.get("check")
        return cls(
            index=int(row["index"]),
            description=str(row["description"]),
            init_script=tuple(Script.parse(s) for s in row.get("init_script") or ()),
            start=Script.parse(row.get("start")),
            check=None if check is None else tuple(Script.parse(c) for c in check),
            match=row.get("match") or None,
            example_script=Script.parse(row.get("example_script")),
        )

    @property
    def sample_id(self) -> str:
        return f"os/{self.index}"


@dataclass
class Action:
    kind: str  # bash | answer | finish | invalid
    content: str | None = None


def parse_action(reply: str) -> Action:
    """AgentBench's reading of a reply: the last `Act:` line that names a valid action."""
    if not isinstance(reply, str):
        return Action("invalid")
    for act in reversed(re.findall(r"Act:\s*(.+)", reply)):
        low = act.lower()
        if low.startswith("bash"):
            blocks = re.findall(r"```bash\n(.*?)\n```", reply, re.DOTALL)
            return Action("bash", "\n\n".join(blocks))
        if low.startswith("finish"):
            return Action("finish")
        if low.startswith("answer"):
            content = act[6:].strip()
            left, right = content.find("("), content.rfind(")")
            if left == -1 or right == -1:
                continue
            return Action("answer", content[left + 1 : right])
    return Action("invalid")


def format_output(text: str) -> str:
    if not text:
        return EMPTY_OUTPUT
    if len(text) > TRUNCATE_AT:
        text = text[:TRUNCATE_KEEP] + TRUNCATED
    return OUTPUT_PREFIX + text


def initial_messages(description: str, one_shot: bool = True) -> list[Message]:
    if not one_shot:
        return [{"role": "user", "content": PROMPT + FIRST_PROBLEM + description}]
    first = {"role": "user", "content": PROMPT + FIRST_PROBLEM + ONE_SHOT[0]["content"]}
    return [
        first,
        *(dict(m) for m in ONE_SHOT[1:]),
        {  # type: ignore[misc]
            "role": "user",
            "content": NEW_PROBLEM + description,
        },
    ]


@dataclass
class Episode:
    task: OSTask
    messages: list[Message]
    session: Session | None = None
    done: bool = False
    answer: str | None = None
    correct: bool = False
    error: str | None = None
    rounds: int = 0
    log: list[dict] = field(default_factory=list)


def _output_text(result: RunResult) -> str:
    return (result.stdout + result.stderr).decode("utf-8", "replace")


class OSSkill:
    """AgentBench OS through any ChatBackend; one sandbox session per episode."""

    name = "os"

    def __init__(
        self,
        data_path: str | Path | None = None,
        *,
        limit: int | None = None,
        indices: Sequence[int] | None = None,
        max_rounds: int = 5,
        workers: int | None = None,
        batch_size: int | None = None,
        sandbox: Backend | str | None = None,
        sampling: SamplingParams | None = None,
        action_timeout: float = 20.0,
        script_timeout: float = 60.0,
        one_shot: bool = True,
        limits: Limits | None = None,
        rows: Sequence[dict] | None = None,
    ) -> None:
        rows = list(rows) if rows is not None else load_jsonl(data_path, AGENTBENCH_OS)
        tasks = [OSTask.from_row(r) for r in rows]
        if indices is not None:
            wanted = set(int(i) for i in indices)
            tasks = [t for t in tasks if t.index in wanted]
        if limit is not None:
            tasks = tasks[:limit]
        self.tasks = tasks
        self.max_rounds = max_rounds
        self.workers = workers or max(1, min(2, os.cpu_count() or 1))
        self.batch_size = batch_size or max(1, len(tasks))
        self._sandbox = sandbox
        self.sampling = sampling or SamplingParams(max_new_tokens=512, temperature=0.0)
        self.action_timeout = action_timeout
        self.script_timeout = script_timeout
        self.one_shot = one_shot
        self.limits = limits or Limits(
            user="root",
            cwd="/",
            wall_time=action_timeout,
            cpu_time=max(action_timeout, script_timeout),
            memory=2 << 30,
            nproc=128,
            output_bytes=1 * MiB,
            disk=512 * MiB,
            file_size=256 * MiB,
        )

    @property
    def sandbox(self) -> Backend:
        if not isinstance(self._sandbox, Backend):
            self._sandbox = get_backend(self._sandbox)
        return self._sandbox

    # -- episode steps ------------------------------------------------------------------------
    def _run_script(self, ep: Episode, script: Script, params: Sequence[str] = ()) -> RunResult:
        assert ep.session is not None
        return ep.session.run(
            script.argv(params),
            timeout=self.script_timeout,
            user="root",
            cwd="/",
            background="keep",
        )

    def _shell(self, ep: Episode, command: str, timeout: float) -> RunResult:
        assert ep.session is not None
        return ep.session.run(
            ["bash", "-c", SHELL_WRAPPER, "bash", command],
            timeout=timeout,
            user="root",
            cwd="/",
            background="keep",
        )

    def _setup(self, ep: Episode) -> None:
        # A sandbox that cannot start is the host's problem, not the model's: it raises.
        ep.session = self.sandbox.open(self.limits)
        try:
            for script in ep.task.init_script:
                r = self._run_script(ep, script)
                ep.log.append(
                    {"init": script.code[:200], "exit": r.exit_code, "reason": r.killed_reason}
                )
            if ep.task.start is not None:
                r = self._shell(ep, ep.task.start.code, self.script_timeout)
                ep.log.append(
                    {
                        "start": ep.task.start.code[:200],
                        "exit": r.exit_code,
                        "reason": r.killed_reason,
                    }
                )
        except SandboxError as exc:
            ep.error = f"sandbox failed during the task's set-up: {exc}"
            ep.done = True

    def _act(self, ep: Episode, reply: str) -> None:
        """Apply one model reply: run its bash action or end the episode."""
        ep.rounds += 1
        if not isinstance(reply, str):
            reply = ""
        ep.messages.append({"role": "assistant", "content": reply})
        action = parse_action(reply)
        entry: dict[str, Any] = {"action": action.kind}
        if action.kind == "bash":
            command = action.content or ""
            entry["command"] = command
            try:
                result = self._shell(ep, command, self.action_timeout)
            except SandboxError as exc:
                ep.error = f"sandbox: {exc}"
                ep.done = True
                ep.log.append(entry)
                return
            text = _output_text(result)
            entry.update(exit=result.exit_code, reason=result.killed_reason)
            ep.messages.append({"role": "user", "content": format_output(text)})
        elif action.kind in ("answer", "finish"):
            ep.answer = action.content
            ep.done = True
        else:
            ep.answer = ""
            ep.done = True
        ep.log.append(entry)

    def judge(self, ep: Episode) -> bool:
        task, answer = ep.task, ep.answer
        if task.match:
            if isinstance(answer, str) and task.match.get("strip"):
                answer = answer.strip()
            if "answer" in task.match:
                return answer == task.match["answer"]
            if "regex" in task.match:
                return re.search(task.match["regex"], answer or "") is not None
            return False
        if task.check:
            params = [str(answer)]
            for script in task.check:
                script = script if script is not None else task.example_script
                if script is None:
                    return False
                result = self._run_script(ep, script, params)
                output = _output_text(result)
                ep.log.append(
                    {"check": script.code[:200], "exit": result.exit_code, "output": output[:500]}
                )
                if result.exit_code != 0:
                    return False
                params.append(_output_text(result))
            return True
        return False

    def _finish(self, ep: Episode) -> None:
        try:
            if ep.error is None and ep.session is not None and ep.session.alive:
                ep.correct = self.judge(ep)
        except SandboxError as exc:
            ep.error = f"judge: {exc}"
            ep.correct = False
        finally:
            if ep.session is not None:
                ep.session.close()
                ep.session = None

    # -- the loop -------------------------------------------------------------------------------
    def evaluate(self, backend: ChatBackend) -> SkillResult:
        _ = self.sandbox  # fail early, with the install hint, when no sandbox can run here
        results: dict[int, SampleResult] = {}
        for start in range(0, len(self.tasks), self.batch_size):
            chunk = self.tasks[start : start + self.batch_size]
            for ep in self._run_batch(backend, chunk):
                results[ep.task.index] = SampleResult(
                    ep.task.sample_id,
                    ep.correct,
                    {
                        "answer": ep.answer,
                        "error": ep.error,
                        "rounds": ep.rounds,
                        # From the task's own question on (the shared prompt and one-shot
                        # example before it are the same in every episode).
                        "transcript": ep.messages[(len(ONE_SHOT) if self.one_shot else 0) :],
                        "log": ep.log,
                    },
                )
        return SkillResult(self.name, [results[t.index] for t in self.tasks])

    def _run_batch(self, backend: ChatBackend, tasks: Sequence[OSTask]) -> list[Episode]:
        episodes = [Episode(t, initial_messages(t.description, self.one_shot)) for t in tasks]
        with ThreadPoolExecutor(self.workers) as pool:
            try:
                list(pool.map(self._setup, episodes))
                for _ in range(self.max_rounds):
                    open_eps = [ep for ep in episodes if not ep.done]
                    if not open_eps:
                        break
                    replies = backend.generate([ep.messages for ep in open_eps], self.sampling)
                    if len(replies) != len(open_eps):
                        raise ValueError(
                            f"the backend returned {len(replies)} replies for {len(open_eps)}"
                        )
                    list(pool.map(self._act, open_eps, replies))
                    list(pool.map(self._finish, [ep for ep in open_eps if ep.done]))
                for ep in episodes:  # out of rounds: judged with an empty answer
                    if not ep.done:
                        ep.answer, ep.done = "", True
                        ep.log.append({"action": "round_limit"})
                list(pool.map(self._finish, [ep for ep in episodes if ep.session is not None]))
            finally:
                for ep in episodes:
                    if ep.session is not None:
                        ep.session.close()
                        ep.session = None
        return episodes

"""A fork server that runs the campaign's stages as a pipeline run would, and dies on cue.

`python stage_worker.py` imports torch, transformers and cycleqd once, then reads one JSON job
per line on stdin. For each job it forks a worker (cheap: nothing is imported again) that runs
the stage functions of `cycleqd.steps` in the pipeline's order (seed, then per generation
breed -> evaluate each child -> commit, then export and release), each opening the campaign
from the store as a Kubeflow task does. The worker SIGKILLs itself at the job's kill point:

- `kill_at`: the N-th mutation of the store (a put or a delete; every local-store write goes
  through `LocalObjectStore._write`), or with `kill_area` the N-th one of keys in that area
  (the key's first segment: `generations`, `LATEST`, `models`, ...), with `phase` "before"
  (nothing written), "torn" (the temporary file is written and synced, the rename never
  happens) or "after" (written);
- `delay`: the fork server kills it after that many seconds, wherever it is (mid-evaluation,
  mid-materialisation, ...).

The worker appends what it does to the job's `log` file (`stage <name>`, `done <name>`,
`kill ...`, `result {...}`), so the test knows where each kill landed. The fork server answers
each job with one JSON line: the worker's exit code or signal.

The fork server itself never runs a torch operation, so forking it is safe.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback


def _log(path: str, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line.replace("\n", " ") + "\n").encode())
    finally:
        os.close(fd)


def _install_kill_hook(job: dict, state: dict) -> None:
    from cycleqd import objectstore

    kill_at = job.get("kill_at")
    phase = job.get("phase", "before")
    store_cls = objectstore.LocalObjectStore
    write, delete = store_cls._write, store_cls.delete

    def die(op: str, key: str) -> None:
        _log(job["log"], f"kill {state['stage']} {state['n']} {op} {key} {phase}")
        os.kill(os.getpid(), signal.SIGKILL)

    target = job.get("kill_area")  # or: the `kill_at`-th mutation of keys in this area
    seen: dict[str, int] = {}

    def hit(op: str, key: str) -> bool:
        state["n"] += 1
        if target is None:
            return state["n"] == kill_at
        area = key.split("/", 1)[0]
        seen[area] = seen.get(area, 0) + 1
        return area == target and seen[area] == kill_at

    def hooked_write(self, key, fill):
        if hit("put", key):
            if phase == "before":
                die("put", key)
            if phase == "torn":

                def replace(src, dst):  # the temporary file is complete: die before the rename
                    die("put", key)

                os.replace = replace
            sha = write(self, key, fill)
            die("put", key)  # phase "after"
            return sha
        return write(self, key, fill)

    def hooked_delete(self, key):
        if hit("delete", key):
            if phase != "after":
                die("delete", key)
            delete(self, key)
            die("delete", key)
        return delete(self, key)

    store_cls._write = hooked_write
    store_cls.delete = hooked_delete


def _run_pipeline(job: dict) -> None:
    import torch

    from cycleqd import steps

    torch.set_num_threads(1)  # the same arithmetic in every worker: results are comparable
    if job.get("driver"):
        os.environ["CYCLEQD_DRIVER_PID"] = str(os.getpid())
    state = {"n": 0, "stage": "start"}
    _install_kill_hook(job, state)
    text, store, owner, log = job["config"], job["store"], job["owner"], job["log"]

    def stage(name: str, fn, *args, **kwargs):
        state["stage"] = name
        _log(log, f"stage {name}")
        out = fn(*args, **kwargs)
        _log(log, f"done {name}")
        return out

    stage("seed", steps.seed, text, store, owner=owner)
    while children := stage("breed", steps.breed, text, store, owner=owner):
        for gid in children:
            stage("evaluate", steps.evaluate, text, store, gid)
        stage("commit", steps.commit, text, store, owner=owner)
    final = stage("export", steps.export, text, store, owner=owner)
    stage("release", steps.release, store, owner)
    _log(log, "result " + json.dumps({"export": final, "mutations": state["n"]}))


def _worker(job: dict) -> None:
    try:
        _run_pipeline(job)
    except BaseException:
        _log(job["log"], "error " + traceback.format_exc())
        os._exit(1)
    os._exit(0)


def main() -> None:
    # Import once, here; workers fork from this process.
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from transformers import LlamaForCausalLM  # noqa: F401

    import cycleqd.probe_world
    import cycleqd.steps  # noqa: F401

    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _worker(job)
        delay = job.get("delay")
        killed_by_timer = False
        deadline = None if delay is None else time.monotonic() + delay
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if deadline is not None and time.monotonic() >= deadline and not killed_by_timer:
                _log(job["log"], f"timer {delay:.2f}")
                os.kill(pid, signal.SIGKILL)
                killed_by_timer = True
            time.sleep(0.01)
        if os.WIFSIGNALED(status):
            answer = {"signal": os.WTERMSIG(status), "timer": killed_by_timer}
        else:
            answer = {"exit": os.WEXITSTATUS(status), "timer": False}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()

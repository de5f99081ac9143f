"""Runs a batch of model answers (Python expressions or shell commands) and reports results.

This file is both a module (the host imports `canon`, `values_equal`, `trusted_eval`) and the
script the sandbox runs (``python3 -I -S -c <this file>``, stdlib only). The script reads one
JSON request on stdin:

    {"mode": "code" | "shell", "items": [...], "timeout": s, "cap": bytes, "nonce": str}

- ``code``: items are ``{"expr": str, "vars": {name: value}}`` (or bare expression strings).
  Each is evaluated, with the variables bound, in a forked child (so no answer sees
  another's side effects) with only a few harmless builtins, under a wall-clock limit (the child
  is SIGKILLed), and its value comes back in canonical JSON form (`canon`).
- ``shell``: items are ``{"files": [[name, text], ...], "cmd": str}``. Each runs as
  ``bash -c cmd`` in a fresh temporary folder holding only those files, in its own session
  (the whole process group is killed afterwards), with stdin from /dev/null, ``LC_ALL=C`` and a
  minimal PATH; stdout is kept up to ``cap`` bytes.

``rlimits`` (optional: ``{"as": bytes, "fsize": bytes, "cpu": seconds}``) are applied to the
harness itself before anything runs; every answer's process inherits them.

It writes one line ``<nonce><json>`` to stdout: ``{"results": [...]}``, one result per item.
"""

import contextlib
import json
import math
import os
import select
import signal
import sys
import time

SAFE_BUILTINS = (
    "abs", "all", "any", "bool", "chr", "dict", "divmod", "enumerate", "filter", "float",
    "int", "isinstance", "len", "list", "map", "max", "min", "ord", "pow", "range", "reversed",
    "round", "set", "sorted", "str", "sum", "tuple", "zip",
)  # fmt: skip
MAX_NODES = 10000
MAX_DEPTH = 50


def _safe_builtins():
    import builtins

    return {name: getattr(builtins, name) for name in SAFE_BUILTINS}


def trusted_eval(expr, variables=None):
    """Evaluate one of *our own* reference expressions (never a model's: that runs sandboxed)."""
    scope = dict(variables or {})
    return eval(compile(expr, "<reference>", "eval"), {"__builtins__": _safe_builtins()}, scope)


def canon(value):
    """A JSON-able, type-tagged form of a value, equal for equal values in any process."""
    budget = [MAX_NODES]

    def walk(v, depth):
        budget[0] -= 1
        if budget[0] < 0 or depth > MAX_DEPTH:
            raise ValueError("value too large")
        if v is None:
            return ["none"]
        if isinstance(v, bool):
            return ["bool", v]
        if isinstance(v, int):
            return ["int", str(int(v))]
        if isinstance(v, float):
            return ["float", repr(float(v))]
        if isinstance(v, str):
            if len(v) > 4096:
                raise ValueError("value too large")
            return ["str", str(v)]
        if isinstance(v, list | tuple):
            return ["list" if isinstance(v, list) else "tuple", [walk(x, depth + 1) for x in v]]
        if isinstance(v, set | frozenset):
            return ["set", sorted((walk(x, depth + 1) for x in v), key=json.dumps)]
        if isinstance(v, dict):
            items = [[walk(k, depth + 1), walk(x, depth + 1)] for k, x in v.items()]
            return ["dict", sorted(items, key=json.dumps)]
        return ["other", type(v).__name__]

    return walk(value, 0)


def _number(form):
    return int(form[1]) if form[0] == "int" else float(form[1])


def values_equal(a, b):
    """Equality of two `canon` forms: numbers numerically (floats to 1e-9), the rest exactly."""
    if not isinstance(a, list) or not isinstance(b, list) or not a or not b:
        return False
    ta, tb = a[0], b[0]
    if ta in ("int", "float") and tb in ("int", "float"):
        x, y = _number(a), _number(b)
        if isinstance(x, int) and isinstance(y, int):
            return x == y
        try:
            return math.isclose(float(x), float(y), rel_tol=1e-9, abs_tol=1e-9)
        except OverflowError:
            return False
    if ta != tb:
        return False
    if ta in ("list", "tuple", "set"):
        return len(a[1]) == len(b[1]) and all(
            values_equal(x, y) for x, y in zip(a[1], b[1], strict=True)
        )
    if ta == "dict":
        return len(a[1]) == len(b[1]) and all(
            values_equal(k1, k2) and values_equal(v1, v2)
            for (k1, v1), (k2, v2) in zip(a[1], b[1], strict=True)
        )
    return a[1:] == b[1:]


# ------------------------------------------------------------------------------ the script


def _read_capped(fds, deadline, cap):
    """Read the given fds to EOF or until the deadline; returns (data per fd, timed_out,
    truncated)."""
    data = {fd: bytearray() for fd in fds}
    open_fds = list(fds)
    truncated = False
    while open_fds:
        left = deadline - time.monotonic()
        if left <= 0:
            return data, True, truncated
        ready, _, _ = select.select(open_fds, [], [], left)
        for fd in ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                open_fds.remove(fd)
                continue
            room = cap - len(data[fd])
            if room > 0:
                data[fd] += chunk[:room]
            if len(chunk) > room:
                truncated = True
    return data, False, truncated


def _eval_child(expr, variables, fd, cap):
    try:
        code = compile(expr, "<answer>", "eval")
        value = eval(code, {"__builtins__": _safe_builtins()}, dict(variables))
        out = {"ok": True, "value": canon(value)}
    except BaseException as exc:  # whatever the answer raised, even SystemExit
        try:
            out = {"ok": False, "error": (type(exc).__name__ + ": " + str(exc))[:300]}
        except BaseException:
            out = {"ok": False, "error": type(exc).__name__}
    try:
        text = json.dumps(out)
    except BaseException:
        text = json.dumps({"ok": False, "error": "unencodable value"})
    if len(text) > cap:
        text = json.dumps({"ok": False, "error": "value too large"})
    data = text.encode()
    while data:
        data = data[os.write(fd, data) :]


def run_code(item, timeout, cap):
    if isinstance(item, str):
        expr, variables = item, {}
    else:
        expr, variables = item["expr"], item.get("vars") or {}
    sys.stdout.flush()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: evaluate, report, exit without cleanup handlers
        try:
            os.close(r)
            sys.setrecursionlimit(200)
            _eval_child(expr, variables, w, cap)
        finally:
            os._exit(0)
    os.close(w)
    try:
        data, timed_out, _ = _read_capped([r], time.monotonic() + timeout, cap + 256)
    finally:
        os.close(r)
    if timed_out:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    if timed_out:
        return {"ok": False, "error": "timeout", "timed_out": True}
    try:
        out = json.loads(bytes(data[r]).decode())
        if isinstance(out, dict):
            return out
    except ValueError:
        pass
    return {"ok": False, "error": f"no result (child status {status})"}


def run_shell(item, timeout, cap):
    import shutil
    import subprocess
    import tempfile

    folder = tempfile.mkdtemp(prefix="tiny-")
    try:
        for name, text in item["files"]:
            if "/" in name or name in ("", ".", ".."):
                return {"ok": False, "error": f"bad file name {name!r}"}
            with open(os.path.join(folder, name), "w") as f:
                f.write(text)
        env = {"PATH": "/usr/bin:/bin", "LC_ALL": "C", "HOME": folder}
        proc = subprocess.Popen(
            ["/bin/bash", "-c", item["cmd"]],
            cwd=folder,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        out, err = proc.stdout.fileno(), proc.stderr.fileno()
        try:
            data, timed_out, truncated = _read_capped([out, err], time.monotonic() + timeout, cap)
        finally:
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)  # leftovers of the command's session
            proc.wait()
            proc.stdout.close()
            proc.stderr.close()
        return {
            "ok": not timed_out and proc.returncode is not None,
            "exit": proc.returncode,
            "stdout": bytes(data[out]).decode("utf-8", "replace"),
            "stderr": bytes(data[err][:300]).decode("utf-8", "replace"),
            "timed_out": timed_out,
            "truncated": truncated,
        }
    except Exception as exc:
        return {"ok": False, "error": (type(exc).__name__ + ": " + str(exc))[:300]}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _limit(rlimits):
    import resource

    names = {"as": resource.RLIMIT_AS, "fsize": resource.RLIMIT_FSIZE, "cpu": resource.RLIMIT_CPU}
    for key, value in (rlimits or {}).items():
        _soft, hard = resource.getrlimit(names[key])
        value = int(value) if hard == resource.RLIM_INFINITY else min(int(value), hard)
        resource.setrlimit(names[key], (value, value))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def main():
    request = json.loads(sys.stdin.buffer.read().decode())
    _limit(request.get("rlimits"))
    timeout, cap = float(request["timeout"]), int(request["cap"])
    run = run_code if request["mode"] == "code" else run_shell
    results = [run(item, timeout, cap) for item in request["items"]]
    sys.stdout.write(request["nonce"] + json.dumps({"results": results}) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()

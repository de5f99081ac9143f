"""Call one Python function on many inputs inside the sandbox and report its outputs.

This file is both a module (the host imports `encode`, `decode`, `Opaque`) and the script the
sandbox runs (`python3 -I -c <this file>`, stdlib only). The script reads one JSON request on
stdin:

    {"code": str, "entry_point": str, "inputs": [tagged args...], "time_limits": [s...],
     "load_limit": s, "stop_on_error": bool, "nonce": str}

silences stdout/stderr of the code under test (it may print), defines the code, calls
`entry_point(*args)` on every input under a per-call time limit (SIGALRM) and writes one line
`<nonce><json>` to the original stdout:

    {"status": "ok" | "load_error", "error": str | None,
     "results": [{"ok": bool, "out": tagged | None, "error": str | None, "time": s}]}

Values cross the boundary as *tagged JSON*, which keeps the Python types that equality
depends on (tuple vs list, set, dict, complex, bytes, big ints) and never needs pickle: the
host never unpickles anything a sandboxed program produced.
"""

import json
import math

_BIG = 1 << 63
_MAX_DEPTH = 200


class Opaque:
    """A value of a type the codec does not carry: equal only to the same type and repr."""

    __slots__ = ("repr", "type")

    def __init__(self, type_name, text):
        self.type = type_name
        self.repr = text

    def __eq__(self, other):
        return isinstance(other, Opaque) and (self.type, self.repr) == (other.type, other.repr)

    def __hash__(self):
        return hash((self.type, self.repr))

    def __repr__(self):
        return f"<{self.type}: {self.repr[:200]}>"


def encode(value, depth=0):
    """A JSON-able form of `value` that `decode` turns back into an equal Python value."""
    if depth > _MAX_DEPTH:
        return {"o": [type(value).__name__, "<too deep>"]}
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        value = int(value)
        return value if -_BIG < value < _BIG else {"i": hex(value)}
    if isinstance(value, float):
        value = float(value)
        if math.isnan(value) or math.isinf(value):
            return {"x": repr(value)}
        return value
    if isinstance(value, str):
        return str(value)
    if isinstance(value, list):
        return [encode(v, depth + 1) for v in value]
    if isinstance(value, tuple):
        return {"t": [encode(v, depth + 1) for v in value]}
    if isinstance(value, frozenset):
        return {"fs": [encode(v, depth + 1) for v in value]}
    if isinstance(value, set):
        return {"s": [encode(v, depth + 1) for v in value]}
    if isinstance(value, dict):
        return {"d": [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in value.items()]}
    if isinstance(value, complex):
        return {"c": [encode(value.real), encode(value.imag)]}
    if isinstance(value, (bytes, bytearray)):
        return {"b": bytes(value).hex()}
    try:
        text = repr(value)
    except BaseException:
        text = "<unrepresentable>"
    return {"o": [type(value).__name__, text[:10000]]}


def decode(data):
    """The Python value of a tagged-JSON form (the inverse of `encode`)."""
    if isinstance(data, list):
        return [decode(v) for v in data]
    if not isinstance(data, dict):
        return data
    if len(data) != 1:
        raise ValueError("malformed tagged value")
    ((tag, body),) = data.items()
    if tag == "t":
        return tuple(decode(v) for v in body)
    if tag == "s":
        return {decode(v) for v in body}
    if tag == "fs":
        return frozenset(decode(v) for v in body)
    if tag == "d":
        return {decode(k): decode(v) for k, v in body}
    if tag == "i":
        return int(body, 16)
    if tag == "x":
        return float(body)
    if tag == "c":
        return complex(decode(body[0]), decode(body[1]))
    if tag == "b":
        return bytes.fromhex(body)
    if tag == "o":
        return Opaque(str(body[0]), str(body[1]))
    raise ValueError(f"unknown tag {tag!r}")


def _main():
    import os
    import signal
    import sys
    import time

    class _Timeout(BaseException):
        pass

    def on_alarm(signum, frame):
        raise _Timeout()

    req = json.loads(sys.stdin.buffer.read())
    nonce = req["nonce"]
    # our private copy of stdout; the code under test writes into /dev/null
    report = os.fdopen(os.dup(1), "w")
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    signal.signal(signal.SIGALRM, on_alarm)

    def finish(payload):
        signal.setitimer(signal.ITIMER_REAL, 0)
        try:
            line = nonce + json.dumps(payload) + "\n"
        except BaseException as exc:  # e.g. MemoryError on an enormous output
            error = f"cannot report the outputs: {type(exc).__name__}: {exc}"
            line = nonce + json.dumps({"status": "harness_error", "error": error[:500]}) + "\n"
        report.write(line)
        report.flush()
        os._exit(0)

    namespace = {"__name__": "__cycleqd_candidate__", "__builtins__": __builtins__}
    try:
        signal.setitimer(signal.ITIMER_REAL, float(req.get("load_limit", 5.0)))
        exec(compile(req["code"], "<candidate>", "exec"), namespace)
        signal.setitimer(signal.ITIMER_REAL, 0)
        fn = namespace.get(req["entry_point"])
        if not callable(fn):
            raise NameError(f"{req['entry_point']!r} is not defined as a function")
    except BaseException as exc:
        signal.setitimer(signal.ITIMER_REAL, 0)
        error = "timeout" if isinstance(exc, _Timeout) else f"{type(exc).__name__}: {exc}"
        finish({"status": "load_error", "error": error[:2000], "results": []})

    results = []
    limits = req["time_limits"]
    for i, tagged in enumerate(req["inputs"]):
        try:
            args = decode(tagged)
        except Exception as exc:
            finish({"status": "load_error", "error": f"bad input {i}: {exc}", "results": results})
        start = time.perf_counter()
        try:
            signal.setitimer(signal.ITIMER_REAL, float(limits[i]))
            out = fn(*args)
            signal.setitimer(signal.ITIMER_REAL, 0)
            elapsed = time.perf_counter() - start
            results.append({"ok": True, "out": encode(out), "error": None, "time": elapsed})
            del out
        except BaseException as exc:
            signal.setitimer(signal.ITIMER_REAL, 0)
            elapsed = time.perf_counter() - start
            error = "timeout" if isinstance(exc, _Timeout) else f"{type(exc).__name__}: {exc}"
            results.append({"ok": False, "out": None, "error": error[:500], "time": elapsed})
            if req.get("stop_on_error"):
                break
    finish({"status": "ok", "error": None, "results": results})


if __name__ == "__main__":
    _main()

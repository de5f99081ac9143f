"""A warm evaluator shared by the evaluation tasks of a local pipeline run.

Through kfp.local every evaluation task is a fresh Python process, and importing torch and
transformers and loading the model cost more than scoring a generation of the tiny world
(measured: ~5.7 s of a 15.5 s generation). So the local driver (`cycleqd run`) starts one
evaluation server beside the pipeline and names its Unix socket in `SOCKET_ENV`; each
evaluation task (`evaluate_children`) then hands its children to the server, which scores
them exactly as the task would (`steps.evaluate_many`: results kept in the store) with a
model that stays loaded across generations.

Nothing depends on the server being there: when the variable is unset (a cluster), the
socket is gone, or the server dies mid-request, the task evaluates in its own process, and
children the server already scored are read back from the store, not scored again.

The same server relays the tasks' MLflow events (`cycleqd.tracking.relay`): a task hands
them over and goes on, one warm tracker delivers them; the driver has it deliver what is left
before it stops the server.

The socket lives in a private (0700) temporary folder: only the user who started the run can
reach it. One request is one JSON line each way.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from cycleqd.errors import CycleQDError

log = logging.getLogger(__name__)

SOCKET_ENV = "CYCLEQD_EVALUATION_SOCKET"
START_TIMEOUT_S = 30.0


class EvaluationServiceError(CycleQDError):
    """The evaluation server failed on a request for a reason other than the campaign's."""


# -- client (evaluation tasks) -------------------------------------------------------------------


def _request(path: str, message: dict, timeout: float | None = None) -> dict | None:
    """One request and its reply; None when the server closed the connection before it had
    replied in full (it died); OSError when it cannot be reached."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(timeout)
        conn.connect(path)
        conn.sendall(json.dumps(message).encode() + b"\n")
        with conn.makefile("rb") as reply:
            line = reply.readline()
    return json.loads(line) if line.endswith(b"\n") else None


def evaluate_children(
    config_yaml: str, store_uri: str, genome_ids: list[str], run_owner: str = ""
) -> list[dict]:
    """What an evaluation task does: the run's warm evaluators score the children where the
    run started some (`cycleqd.warm_evaluators`), else a local run's server where there is
    one, else this process (`steps.evaluate_many`). The server's way imports neither torch
    nor the campaign's modules here."""
    if run_owner:
        from cycleqd.warm_evaluators import registry_for

        registry = registry_for(store_uri, run_owner)
        if registry is not None:
            from cycleqd.evaluator_pool import evaluate_with_pool

            return evaluate_with_pool(config_yaml, store_uri, genome_ids, registry)
    records = evaluate_remote(config_yaml, store_uri, genome_ids)
    if records is None:
        from cycleqd import steps

        records = steps.evaluate_many(config_yaml, store_uri, genome_ids)
    return records


def send_tracking(message: dict) -> bool:
    """Hand a tracking event to the run's server (`RelayTracker`); False: there is none to
    take it, or it is gone (the task then tracks on its own)."""
    path = os.environ.get(SOCKET_ENV)
    if not path:
        return False
    try:
        reply = _request(path, message, timeout=60)
    except OSError:
        return False
    return bool(reply and reply.get("ok"))


def evaluation_metrics(records: list[dict]) -> dict[str, float]:
    """A group of children's evaluation records as metrics under names no genome id enters,
    so that the Kubeflow UI compares them across runs: per skill the best child's score and
    the mean over the children scored, and how many were scored and rejected (weights not
    finite: no scores, no archive)."""
    scored = [r["scores"] for r in records if r["scores"] is not None]
    metrics = {
        "children_scored": float(len(scored)),
        "children_rejected": float(len(records) - len(scored)),
    }
    for skill in sorted({skill for scores in scored for skill in scores}):
        values = [scores[skill] for scores in scored if skill in scores]
        metrics[f"{skill}_best_child"] = max(values)
        metrics[f"{skill}_mean"] = sum(values) / len(values)
    return metrics


def evaluate_remote(config_yaml: str, store_uri: str, genome_ids: list[str]) -> list[dict] | None:
    """The children's evaluation records from the run's evaluation server, or None where
    there is none to ask (the caller then evaluates them itself)."""
    path = os.environ.get(SOCKET_ENV)
    if not path:
        return None
    request = {
        "op": "evaluate",
        "config": config_yaml,
        "store_uri": store_uri,
        "genome_ids": genome_ids,
    }
    try:
        reply = _request(path, request)
    except OSError as exc:
        log.warning("evaluation server %s unreachable (%s): evaluating in this task", path, exc)
        return None
    if reply is None:
        log.warning(
            "evaluation server %s stopped during the request: evaluating in this task "
            "(children it scored are read back from the store)",
            path,
        )
        return None
    if "error" in reply:
        if reply.get("campaign_error"):  # what the task itself would have raised
            raise CycleQDError(reply["error"])
        raise EvaluationServiceError(
            f"evaluation server failed: {reply['error']} (its log has the traceback)"
        )
    return reply["records"]


# -- server --------------------------------------------------------------------------------------


class EvaluationServer:
    """Scores children for evaluation tasks with one warm evaluator, one request at a time
    (one model); the evaluator is rebuilt only when a request's config asks for another."""

    def __init__(self) -> None:
        self._evaluator = None
        self._key: str | None = None
        self._lock = threading.Lock()
        self._relay = None  # the TrackingRelay, from the first tracking event on
        self._relay_lock = threading.Lock()  # not the model's: events never wait on scoring
        self.stats = {"requests": 0, "children": 0, "evaluators_built": 0}
        # Seconds by part over all requests (`Campaign.timings`: materialize_s, evaluate_s) and
        # in requests as a whole (busy_s): benchmarks split a generation with them.
        self.timings: Counter[str] = Counter()

    def _evaluator_for(self, config_yaml: str):
        from cycleqd.config import load_config_text
        from cycleqd.evaluators import build_evaluator

        config = load_config_text(config_yaml)
        # A later run may raise `generations`; nothing else may change under a warm model.
        key = json.dumps(config.model_dump(mode="json", exclude={"generations"}), sort_keys=True)
        if key != self._key:
            self._evaluator, self._key = None, None  # the old model goes before the new loads
            self._evaluator = build_evaluator(config)
            self._key = key
            self.stats["evaluators_built"] += 1
        return self._evaluator

    def warm(self, config_yaml: str) -> None:
        """Build the evaluator and load its model now, before the first request needs it."""
        with self._lock:
            self._evaluator_for(config_yaml).warm()

    def evaluate(self, config_yaml: str, store_uri: str, genome_ids: list[str]) -> list[dict]:
        from cycleqd import steps

        with self._lock:
            started = time.perf_counter()
            evaluator = self._evaluator_for(config_yaml)
            records = steps.evaluate_many(
                config_yaml, store_uri, genome_ids, evaluator=evaluator, timings=self.timings
            )
            self.timings["busy_s"] += time.perf_counter() - started
            self.stats["requests"] += 1
            self.stats["children"] += len(genome_ids)
        return records

    def handle(self, message: dict) -> dict:
        op = message.get("op")
        if op == "ping":
            return {"ok": True, "pid": os.getpid(), **self.stats, "timings": dict(self.timings)}
        if op == "warm":
            threading.Thread(target=self._warm_quietly, args=(message["config"],)).start()
            return {"ok": True}
        if op == "track":
            with self._relay_lock:
                if self._relay is None:
                    from cycleqd.tracking.relay import TrackingRelay

                    self._relay = TrackingRelay()
            self._relay.submit(message)
            return {"ok": True}
        if op == "close_tracking":
            with self._relay_lock:
                relay, self._relay = self._relay, None
            return {"ok": True, "missed": relay.close() if relay is not None else []}
        if op == "evaluate":
            started = time.perf_counter()
            try:
                records = self.evaluate(
                    message["config"], message["store_uri"], list(message["genome_ids"])
                )
            except CycleQDError as exc:
                return {"error": str(exc), "campaign_error": True}
            log.info("scored %d child(ren) in %.2f s", len(records), time.perf_counter() - started)
            return {"records": records}
        return {"error": f"unknown request {op!r}"}

    def _warm_quietly(self, config_yaml: str) -> None:
        try:
            self.warm(config_yaml)
        except Exception:  # the first request builds it again and reports what is wrong
            log.warning("warming the evaluator failed:\n%s", traceback.format_exc())

    def serve(self, listener: socket.socket) -> None:
        while True:
            conn, _ = listener.accept()
            threading.Thread(target=self._connection, args=(conn,), daemon=True).start()

    def _connection(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rwb") as stream:
            try:
                reply = self.handle(json.loads(stream.readline()))
            except Exception as exc:
                log.error("request failed:\n%s", traceback.format_exc())
                reply = {"error": f"{type(exc).__name__}: {exc}"}
            with contextlib.suppress(OSError):  # the task is gone: its retry asks again
                stream.write(json.dumps(reply).encode() + b"\n")
                stream.flush()


def _exit_with_parent(parent: int) -> None:
    """The server serves one run: it leaves when the driver that started it is gone, even if
    the driver was killed before it could stop the server."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(0)


def serve(path: str, parent: int) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    log.info("evaluation server %d listening on %s", os.getpid(), path)
    EvaluationServer().serve(listener)


# -- the driver's side ---------------------------------------------------------------------------


class ServiceHandle:
    def __init__(self, path: str, process: subprocess.Popen) -> None:
        self.path, self.process = path, process
        self.running = False  # False: it did not start, the tasks evaluate themselves

    def stats(self) -> dict:
        """The server's counters (requests, children, evaluators_built) and `timings`."""
        try:
            reply = _request(self.path, {"op": "ping"}, timeout=10)
        except OSError:
            reply = None
        if reply is None:
            raise EvaluationServiceError(f"evaluation server {self.path} is gone")
        return reply


@contextlib.contextmanager
def evaluation_service(log_path: Path, warm_config: str | None = None) -> Iterator[ServiceHandle]:
    """Run an evaluation server for the block, and name it to the tasks started inside it
    (through the environment they inherit). `warm_config` loads its model at once, while the
    pipeline's first tasks run. A server that does not start is reported and left out: the
    tasks then evaluate in their own processes, as on a cluster."""
    folder = tempfile.mkdtemp(prefix="cycleqd-eval-")  # 0700: this user only
    path = os.path.join(folder, "socket")
    with open(log_path, "ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "cycleqd.evaluation_service", path, str(os.getpid())],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    handle = ServiceHandle(path, process)
    previous = os.environ.get(SOCKET_ENV)
    try:
        try:
            _wait_until_listening(handle, log_path)
        except EvaluationServiceError as exc:
            log.warning("%s; every evaluation task loads its own model", exc)
        else:
            handle.running = True
            os.environ[SOCKET_ENV] = path
            if warm_config is not None:
                with contextlib.suppress(OSError):  # best effort: the first request builds it
                    _request(path, {"op": "warm", "config": warm_config}, timeout=10)
        yield handle
    finally:
        if previous is None:
            os.environ.pop(SOCKET_ENV, None)
        else:
            os.environ[SOCKET_ENV] = previous
        if handle.running:
            _close_tracking(handle)
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(folder, ignore_errors=True)


def _close_tracking(handle: ServiceHandle) -> None:
    """Have the server deliver the tracking events it still holds before it stops."""
    try:
        reply = _request(handle.path, {"op": "close_tracking"}, timeout=600)
    except OSError as exc:
        log.warning("tracking: the evaluation server could not be asked to deliver (%s)", exc)
        return
    for missed in (reply or {}).get("missed", []):
        log.warning("tracking: not delivered to MLflow: %s", missed)


def _wait_until_listening(handle: ServiceHandle, log_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if handle.process.poll() is not None:
            raise EvaluationServiceError(
                f"the evaluation server exited at start (code {handle.process.returncode}); "
                f"see {log_path}"
            )
        with contextlib.suppress(OSError):
            if _request(handle.path, {"op": "ping"}, timeout=5) is not None:
                return
        if time.monotonic() > deadline:
            raise EvaluationServiceError(
                f"the evaluation server did not answer within {START_TIMEOUT_S:.0f} s; "
                f"see {log_path}"
            )
        time.sleep(0.05)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A local run's warm evaluation server.")
    parser.add_argument("socket", help="Unix socket path to listen on")
    parser.add_argument("parent", type=int, help="exit when this process is gone")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s evaluation-server %(levelname)s %(message)s"
    )
    os.environ.pop(SOCKET_ENV, None)  # the server evaluates itself, never asks another
    serve(args.socket, args.parent)


if __name__ == "__main__":
    main()

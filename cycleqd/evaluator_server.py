"""A warm evaluator as a local process: the part of vLLM's OpenAI-compatible server that
CycleQD's evaluation tasks use, over the transformers backend.

On a cluster each warm evaluator is `vllm serve` with the worker extension
(`cycleqd.evaluator_launch.kubernetes`); on a machine without vLLM (a laptop, CI) the local
launcher starts this server instead, so that a local run takes the very same path: the same
requests, the same weight swaps by recipe (`vllm_worker.WeightSwapExtension`, here over a
transformers model), and with the transformers backend the same batches as in-process.

Endpoints (vLLM's names and bodies): GET /health, GET /v1/models, POST /tokenize (messages ->
token ids with the model's chat template), POST /v1/completions (token-id prompts, one batch),
POST /collective_rpc (`swap_weights`), POST /reset_prefix_cache. Every endpoint but /health
requires the bearer token from $CYCLEQD_EVALUATOR_TOKEN (never on the command line, where
`ps` shows it). It listens on 127.0.0.1 only; one request generates or swaps at a time.
"""

from __future__ import annotations

import argparse
import hmac
import json
import logging
import os
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from cycleqd.generate.base import SamplingParams
from cycleqd.generate.server_backend import SERVED_MODEL
from cycleqd.generate.vllm_worker import WeightSwapExtension
from cycleqd.state import process_alive

log = logging.getLogger(__name__)

TOKEN_ENV = "CYCLEQD_EVALUATOR_TOKEN"


class _Loader:
    """vLLM's `model.load_weights(weights=...)` over the transformers backend."""

    def __init__(self, backend) -> None:
        self.backend = backend

    def load_weights(self, weights) -> int:
        return self.backend.load_weights(weights)  # strict: every tensor, or an error


class TransformersWorker(WeightSwapExtension):
    """The worker extension over a transformers backend in this process."""

    def __init__(self, backend) -> None:
        import torch

        self.model_runner = type("ModelRunner", (), {"model": _Loader(backend)})()
        self.device = torch.device(backend.device)


class EvaluatorService:
    def __init__(self, backend, token: str) -> None:
        self.backend = backend
        self.worker = TransformersWorker(backend)
        self.token = token
        self.lock = threading.Lock()  # one model: a swap never interleaves with a batch
        self.last_request = time.monotonic()
        self.stats = {"swaps": 0, "batches": 0}

    def authorised(self, header: str | None) -> bool:
        expected = f"Bearer {self.token}"
        return header is not None and hmac.compare_digest(header.encode(), expected.encode())

    def post(self, path: str, body: dict[str, Any]) -> Any:
        self.last_request = time.monotonic()
        if path == "/tokenize":
            return {"tokens": self.backend.encode(body["messages"])}
        if path == "/v1/completions":
            stop = body.get("stop") or ()
            params = SamplingParams(
                max_new_tokens=int(body.get("max_tokens", 16)),
                temperature=float(body.get("temperature", 1.0)),
                stop=(stop,) if isinstance(stop, str) else tuple(stop),
            )
            with self.lock:
                texts = self.backend.generate_ids(body["prompt"], params)
                self.stats["batches"] += 1
            return {
                "object": "text_completion",
                "model": SERVED_MODEL,
                "choices": [
                    {"index": i, "text": text, "finish_reason": "stop"}
                    for i, text in enumerate(texts)
                ],
            }
        if path == "/collective_rpc":
            if body.get("method") != "swap_weights":
                raise ValueError(f"unknown method {body.get('method')!r}: swap_weights only")
            with self.lock:
                count = self.worker.swap_weights(*body.get("args", []))
                self.stats["swaps"] += 1
            request = (body.get("args") or [{}])[0]
            log.info("swapped in %s (%d tensors)", request.get("genome_id", "a model"), count)
            return {"results": [count]}
        if path == "/reset_prefix_cache":
            return None  # the transformers backend keeps no cache across batches
        raise KeyError(path)


def _handler(service: EvaluatorService):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args) -> None:
            log.debug(format, *args)

        def _reply(self, status: int, body: Any = None) -> None:
            data = b"" if body is None else json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path == "/health":
                return self._reply(200)
            if not service.authorised(self.headers.get("Authorization")):
                return self._reply(401, {"error": "missing or wrong bearer token"})
            if self.path == "/v1/models":
                return self._reply(200, {"data": [{"id": SERVED_MODEL, "object": "model"}]})
            if self.path == "/stats":
                return self._reply(200, {"pid": os.getpid(), **service.stats})
            return self._reply(404, {"error": f"no route {self.path}"})

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            if not service.authorised(self.headers.get("Authorization")):
                return self._reply(401, {"error": "missing or wrong bearer token"})
            try:
                body = json.loads(raw) if raw else {}
                result = service.post(self.path, body)
            except KeyError as exc:
                if exc.args == (self.path,):
                    return self._reply(404, {"error": f"no route {self.path}"})
                log.error("%s failed:\n%s", self.path, traceback.format_exc())
                return self._reply(400, {"error": f"{type(exc).__name__}: {exc}"})
            except (ValueError, TypeError) as exc:
                return self._reply(400, {"error": f"{type(exc).__name__}: {exc}"})
            except Exception as exc:
                log.error("%s failed:\n%s", self.path, traceback.format_exc())
                return self._reply(500, {"error": f"{type(exc).__name__}: {exc}"})
            return self._reply(200, result)

    return Handler


def _exit_when_orphaned(service: EvaluatorService, parent: int, idle_s: float) -> None:
    """A local evaluator serves one run: it leaves when the process that owns the run is gone,
    or after `idle_s` without a request (a run whose exit handler never ran)."""
    while True:
        time.sleep(0.5)
        gone = parent > 0 and not process_alive(parent)
        idle = idle_s > 0 and time.monotonic() - service.last_request > idle_s
        if gone or idle:
            log.info("exiting: %s", "owner gone" if gone else f"idle for {idle_s:.0f} s")
            os._exit(0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A local warm evaluator (vLLM API subset).")
    parser.add_argument("--model", required=True, help="the base model: a path or s3:// URI")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--owner-pid", type=int, default=0, help="exit when it is gone")
    parser.add_argument("--idle-exit-s", type=float, default=3600.0)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s evaluator %(levelname)s %(message)s"
    )
    token = os.environ.pop(TOKEN_ENV, "")
    if not token:
        parser.error(f"${TOKEN_ENV} must hold the bearer token")
    import torch

    from cycleqd.generate.transformers_backend import TransformersBackend
    from cycleqd.model_sources import local_folder

    torch.set_num_threads(args.threads)
    backend = TransformersBackend.from_pretrained(
        local_folder(args.model, "base model"),
        dtype=args.dtype,
        device=args.device,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    service = EvaluatorService(backend, token)
    # Listening only once the model is loaded: /health answering means ready, as with vLLM.
    server = ThreadingHTTPServer(("127.0.0.1", args.port), _handler(service))
    server.daemon_threads = True
    threading.Thread(
        target=_exit_when_orphaned,
        args=(service, args.owner_pid, args.idle_exit_s),
        daemon=True,
    ).start()
    log.info("evaluator %d serving %s on 127.0.0.1:%d", os.getpid(), args.model, args.port)
    server.serve_forever()


if __name__ == "__main__":
    main()

"""A chat backend whose model lives in a warm evaluator: a vLLM OpenAI-compatible server with
the project's worker extension (`vllm_worker`), or its local stand-in `cycleqd.evaluator_server`.

The evaluation task keeps the skills (their prompts, the sandboxed checkers) and sends the
evaluator only small JSON: a weight swap by recipe (`POST /collective_rpc`, method
`swap_weights`, then `POST /reset_prefix_cache`), and each `generate` call's conversations as
one batch: rendered by the server's own chat template (`POST /tokenize`, one per
conversation, in parallel) and generated in one `POST /v1/completions` with the token ids as
prompts. One request per `generate` call keeps the batches, and so the replies, exactly those
of the same backend in-process.

An evaluator that cannot be reached, times out or answers 5xx raises
`EvaluatorUnavailableError`: the caller moves the child to another evaluator. A 4xx (a token
the server refuses, a request it does not understand) is the caller's mistake, a
`CycleQDError` that says so.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from cycleqd.errors import CycleQDError
from cycleqd.generate.base import Message, SamplingParams

SERVED_MODEL = "cycleqd"  # the name every evaluator serves its (swapped) model under


class EvaluatorUnavailableError(CycleQDError):
    """A warm evaluator cannot be reached or failed mid-request: its work goes elsewhere."""


class EvaluatorRequestError(CycleQDError):
    """A warm evaluator refused a request (4xx): a wrong token, or a request it cannot do."""


class ServerBackend:
    """A `ChatBackend` over a warm evaluator at `url` (http://host:port), with swaps by
    recipe naming models by location (`reads_locations`)."""

    weights_from = "requests"
    reads_locations = True

    def __init__(
        self, url: str, token: str, timeout_s: float = 1800.0, workers: int = 8, seed: int = 0
    ):
        self.url = url.rstrip("/")
        self.token = token
        self.seed = seed  # of sampling (temperature > 0), as the in-process backends'
        self.timeout_s = timeout_s
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tokenize")

    # -- ChatBackend ---------------------------------------------------------------------------

    def generate(
        self, conversations: Sequence[Sequence[Message]], params: SamplingParams
    ) -> list[str]:
        if not conversations:
            return []
        prompts = list(self._pool.map(self._tokenize, conversations))
        reply = self.post(
            "/v1/completions",
            {
                "model": SERVED_MODEL,
                "prompt": prompts,
                "max_tokens": params.max_new_tokens,
                "temperature": params.temperature,
                "stop": list(params.stop),
                "seed": self.seed,
            },
        )
        texts = [""] * len(prompts)
        for choice in reply["choices"]:
            texts[choice["index"]] = choice["text"]
        from cycleqd.generate.transformers_backend import cut_at_stop

        return [cut_at_stop(text, params.stop) for text in texts]

    def _tokenize(self, conversation: Sequence[Message]) -> list[int]:
        reply = self.post(
            "/tokenize",
            {
                "model": SERVED_MODEL,
                "messages": list(conversation),
                "add_generation_prompt": True,
                "add_special_tokens": False,  # the chat template writes BOS itself
            },
        )
        return reply["tokens"]

    # -- weights -------------------------------------------------------------------------------

    def swap(self, request: dict) -> int:
        """Run a swap request on the evaluator's workers, then drop its prefix cache (KV
        blocks of the previous weights would be reused otherwise)."""
        reply = self.post("/collective_rpc", {"method": "swap_weights", "args": [request]})
        self.post("/reset_prefix_cache", None)
        results = reply.get("results") if isinstance(reply, dict) else None
        return int(results[0]) if results else 0

    # -- HTTP ----------------------------------------------------------------------------------

    def healthy(self, timeout_s: float = 5.0) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=timeout_s) as response:
                return response.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def post(self, path: str, body: dict | None) -> Any:
        data = json.dumps(body).encode() if body is not None else b""
        request = urllib.request.Request(
            f"{self.url}{path}",
            data=data,
            method="POST",
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {self.token}"},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                text = response.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:500].decode(errors="replace")
            if exc.code >= 500:
                raise EvaluatorUnavailableError(
                    f"evaluator {self.url} failed on {path}: HTTP {exc.code} {detail}"
                ) from None
            if exc.code in (401, 403):
                raise EvaluatorRequestError(
                    f"evaluator {self.url} refused the token (HTTP {exc.code}): the run's "
                    "evaluator registry and the evaluators disagree; start the run again"
                ) from None
            raise EvaluatorRequestError(
                f"evaluator {self.url} refused {path}: HTTP {exc.code} {detail}"
            ) from None
        except (TimeoutError, OSError, urllib.error.URLError) as exc:
            raise EvaluatorUnavailableError(
                f"evaluator {self.url} unreachable on {path}: {exc}"
            ) from None
        return json.loads(text) if text else None

    def close(self) -> None:
        self._pool.shutdown(wait=False)

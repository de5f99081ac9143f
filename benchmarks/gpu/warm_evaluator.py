"""What a warm evaluator saves, measured: engine start, an in-place weight swap, and a fresh
load of another model, through the same server and requests as a campaign's evaluators.

`--server vllm` (a GPU machine): `vllm serve` exactly as the Kubernetes launcher's pods run it
(`KubernetesLauncher.command`: the worker extension, dev mode for /collective_rpc, the token
as $VLLM_API_KEY). `--server local` (any machine): the local stand-in,
`cycleqd.evaluator_server` over the transformers backend. Measured in one run, on one model:

- engine start: process start to /health answering (the base model loaded);
- weight swap: POST /collective_rpc `swap_weights` with an expert's folder, then
  /reset_prefix_cache (median of `--swaps`);
- fresh load: a second server started on the expert (what a per-task engine pays per task);
- a batch of `--prompts` chat prompts through /tokenize + /v1/completions.

Prints the ratios fresh load / swap and engine start / swap, and writes JSON to --out.

    python benchmarks/gpu/warm_evaluator.py --server local --out benchmarks/results
    python benchmarks/gpu/warm_evaluator.py --server vllm --model DIR --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def start_server(kind: str, model: str, dtype: str, log: Path) -> tuple[subprocess.Popen, str, str]:
    from cycleqd.evaluator_launch.base import EvaluatorSpec
    from cycleqd.evaluator_launch.local import free_port

    port, token = free_port(), secrets.token_urlsafe(16)
    env = dict(os.environ)
    if kind == "vllm":
        from cycleqd.evaluator_launch.kubernetes import (
            KubernetesEvaluatorSettings,
            KubernetesLauncher,
        )

        spec = EvaluatorSpec(owner="bench", count=1, base_location=model, dtype=dtype)
        spec = EvaluatorSpec(**{**spec.to_json(), "gpu_memory_utilization": 0.4})
        command = KubernetesLauncher(KubernetesEvaluatorSettings(port=port)).command(spec)
        env.update(VLLM_SERVER_DEV_MODE="1", VLLM_API_KEY=token)
    else:
        command = [sys.executable, "-m", "cycleqd.evaluator_server", "--model", model]
        command += ["--port", str(port), "--dtype", dtype, "--threads", "1"]
        env["CYCLEQD_EVALUATOR_TOKEN"] = token
    out = open(log, "ab")  # noqa: SIM115 (the server's whole life)
    process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    return process, f"http://127.0.0.1:{port}", token


def wait_healthy(process: subprocess.Popen, url: str, timeout: float = 1800.0) -> float:
    from cycleqd.generate.server_backend import ServerBackend

    started, backend = time.perf_counter(), ServerBackend(url, "")
    while time.perf_counter() - started < timeout:
        if process.poll() is not None:
            raise SystemExit(f"server exited with {process.returncode} (see its log)")
        if backend.healthy(timeout_s=2):
            return time.perf_counter() - started
        time.sleep(0.1)
    raise SystemExit(f"no /health within {timeout:.0f} s")


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()


def models(args, root: Path) -> tuple[str, str]:
    """The base (`--model`, or a random chat Llama built here) and an expert of it."""
    from cycleqd import probe_world
    from cycleqd.generate.tiny_tokenizer import save_chat_model

    base = (
        Path(args.model)
        if args.model
        else save_chat_model(root / "base", hidden=256, heads=4, intermediate=512, layers=4)
    )
    expert = probe_world.build_expert(base, root / "expert", seed=1, strength=0.02)
    for side in base.iterdir():  # a model of its own: the tokenizer and chat template too
        if not side.name.endswith(".safetensors") and not (expert / side.name).exists():
            shutil.copy(side, expert / side.name)
    return str(base), str(expert)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", choices=["vllm", "local"], default="local")
    parser.add_argument("--model", help="an HF folder with a chat template (default: built)")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 (vllm), float32")
    parser.add_argument("--swaps", type=int, default=5)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    dtype = args.dtype or ("bfloat16" if args.server == "vllm" else "float32")
    from cycleqd.generate.base import SamplingParams
    from cycleqd.generate.server_backend import ServerBackend

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    wall = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="warm-evaluator-") as tmp:
        base, expert = models(args, Path(tmp))
        log = out / f"warm_evaluator-{args.server}.log"
        process, url, token = start_server(args.server, base, dtype, log)
        try:
            engine_start = wait_healthy(process, url)
            backend = ServerBackend(url, token)
            swaps = []
            for _ in range(args.swaps):
                started = time.perf_counter()
                backend.swap({"kind": "safetensors", "location": expert})
                swaps.append(time.perf_counter() - started)
            conversations = [
                [{"role": "user", "content": f"Write a Python one-liner number {i}."}]
                for i in range(args.prompts)
            ]
            started = time.perf_counter()
            replies = backend.generate(conversations, SamplingParams(max_new_tokens=64))
            batch = time.perf_counter() - started
        finally:
            stop(process)
        process, url, _ = start_server(args.server, expert, dtype, log)
        try:
            fresh_load = wait_healthy(process, url)
        finally:
            stop(process)
    swap = statistics.median(swaps)
    result = {
        "server": args.server,
        "model": args.model or "random chat Llama (4 layers, hidden 256)",
        "dtype": dtype,
        "engine_start_s": round(engine_start, 3),
        "weight_swap_s": round(swap, 4),
        "weight_swaps_s": [round(s, 4) for s in swaps],
        "fresh_load_s": round(fresh_load, 3),
        "batch_s": round(batch, 3),
        "prompts": args.prompts,
        "replied": sum(1 for r in replies if r),
        "fresh_load_over_swap": round(fresh_load / swap, 1),
        "engine_start_over_swap": round(engine_start / swap, 1),
        "wall_s": round(time.perf_counter() - wall, 1),
    }
    print(f"{'engine start':<16}{engine_start:>9.2f} s")
    print(f"{'weight swap':<16}{swap:>9.3f} s   (median of {len(swaps)})")
    print(f"{'fresh load':<16}{fresh_load:>9.2f} s")
    print(f"{'batch':<16}{batch:>9.2f} s   ({args.prompts} prompts, 64 tokens)")
    print(
        f"a swap instead of a fresh load: {result['fresh_load_over_swap']}x less time "
        f"({args.server}, {dtype}); {result['wall_s']} s in all"
    )
    (out / f"warm_evaluator-{args.server}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

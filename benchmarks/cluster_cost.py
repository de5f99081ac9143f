"""A cost model of a paper-scale campaign on a cluster: 1,200 children of Llama-3-8B experts
on 8 GPUs, wall time and GPU-hours for three designs.

- **official**: the official code's design (SakanaAI/CycleQD: Celery, one warm vLLM worker per
  GPU for the whole search, every worker kept busy): each worker starts once, then per child
  swaps the merged weights in place and scores it.
- **per-task engines**: this pipeline's evaluation tasks today: every evaluation task is a
  fresh GPU pod that copies base and experts, starts an engine and loads the weights, then
  scores its share of one generation; the paper's population 1 keeps one GPU busy, a
  population of 8 keeps 8 busy but pays the start per child.
- **warm evaluators**: one engine per GPU for a whole run, children of a generation (8, one
  per GPU) dealt to them and swapped in place; CPU tasks (breed, commit) between generations.

Every constant below names its source; where no measurement of this setup exists, it says
"assumed". Nothing here runs a model: change a constant with `--set NAME=VALUE`, or measure
the GPU ones with `benchmarks/gpu/run.sh` when a GPU is lent.

    PYTHONPATH=. .venv/bin/python benchmarks/cluster_cost.py [--set s3_gb_per_s=0.5]
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@dataclass(frozen=True)
class Constants:
    # -- the campaign ---------------------------------------------------------------------------
    children: int = 1200  # the paper's search (Kuroki et al., ICLR 2025, section 4)
    gpus: int = 8  # the paper's setup
    # Llama-3-8B in bfloat16: 8.03e9 parameters x 2 bytes (the model card's parameter count).
    model_gb: float = 16.06
    models_per_pod: int = 4  # base + three experts, copied into each evaluation pod's cache
    # -- Kubernetes and the image ---------------------------------------------------------------
    # Kubernetes' scalability SLO: pod startup latency, image pull excluded, <= 5 s at the 99th
    # percentile (kubernetes/community, sig-scalability/slos/pod_startup_latency.md).
    pod_start_s: float = 5.0
    # The evaluator image (vllm/vllm-openai v0.33 base, ~10 GB: assumed from the base image's
    # size class) pulled once per node at 200 MB/s (assumed registry bandwidth); later pods on
    # the node find it cached (imagePullPolicy IfNotPresent).
    image_pull_s: float = 10.0 / 0.2
    # -- weights --------------------------------------------------------------------------------
    # S3 -> pod copy bandwidth (stated: one pod, parallel ranged GETs on a 25 Gbit/s NIC is
    # ~3 GB/s at best; 1 GB/s leaves room for a shared object store).
    s3_gb_per_s: float = 1.0
    # Weight loading into the GPU from local disk: 21.82 GiB in ~18 s (the startup breakdown
    # in vllm-project/vllm#44881) -> 1.3 GB/s.
    disk_to_gpu_gb_per_s: float = 21.82 * 1.074 / 18
    # -- vLLM engine start, weights excluded (the same breakdown): container init to engine
    # config ~16 s, torch.compile from its cache ~5 s; CUDA graph capture and KV-cache
    # profiling for a dense 8B: assumed 20 s (that report's 210 s was an sm_120 FP4 case).
    engine_start_s: float = 16.0 + 5.0 + 20.0
    # In-place weight swap of a child on the GPU: the merge reads base + experts (4 x 16 GB)
    # from host memory over PCIe 5 (~50 GB/s effective: assumed) and writes 16 GB on the GPU;
    # plus the prefix-cache reset. Measured by benchmarks/gpu/run.sh when a GPU is lent.
    swap_s: float = 4 * 16.06 / 50 + 0.5
    # -- scoring one child on every skill with vLLM ---------------------------------------------
    # Output throughput of Llama-3.1-8B on one H100 with vLLM: 5,777 tokens/s offline (Red Hat's
    # MLPerf Inference v5.1 submission, FP8, vLLM 0.10.0); bfloat16 assumed 0.6 of that.
    decode_tokens_per_s: float = 5777 * 0.6
    # Generated tokens per task (assumed; the small real world's transcripts are SmolLM2's):
    # MBPP+ one reply of ~250 tokens; DBBench and AgentBench OS up to 5 rounds of ~120.
    coding_tokens: int = 250
    db_tokens: int = 5 * 120
    os_tokens: int = 5 * 120
    coding_tasks: int = 0  # 0: counted in ../shared/data (mbppplus.jsonl)
    db_tasks: int = 341  # the DBBench subset the official code scores (README "Configuration")
    os_tasks: int = 0  # 0: counted in ../shared/data (agentbench_os.jsonl)
    # -- the pipeline between generations -------------------------------------------------------
    cpu_task_s: float = 3.0  # breed or commit work (benchmarks/commit_tracking.py: 0.5-0.6 s)
    cpu_tasks_per_generation: int = 2  # breed, commit


def _tasks(name: str, given: int) -> int:
    if given:
        return given
    path = DATA / name
    return sum(1 for line in path.open() if line.strip()) if path.is_file() else 0


def evaluation_s(c: Constants) -> float:
    """Seconds to score one child on the three skills: generated tokens over throughput."""
    tokens = (
        _tasks("mbppplus.jsonl", c.coding_tasks) * c.coding_tokens
        + c.db_tasks * c.db_tokens
        + _tasks("agentbench_os.jsonl", c.os_tasks) * c.os_tokens
    )
    return tokens / c.decode_tokens_per_s


def fresh_engine_s(c: Constants, with_pull: bool) -> float:
    """A GPU pod from nothing to ready: start, (image), copy the models, engine, weights."""
    copy = c.models_per_pod * c.model_gb / c.s3_gb_per_s
    load = c.model_gb / c.disk_to_gpu_gb_per_s
    return c.pod_start_s + (c.image_pull_s if with_pull else 0) + copy + c.engine_start_s + load


def designs(c: Constants) -> dict[str, tuple[float, float]]:
    """Design -> (wall seconds, GPU-seconds)."""
    evaluate = evaluation_s(c)
    first = fresh_engine_s(c, with_pull=True)
    later = fresh_engine_s(c, with_pull=False)
    generation_cpu = c.cpu_tasks_per_generation * (c.pod_start_s + c.cpu_task_s)
    per_gpu = c.children / c.gpus
    out = {}
    # Official: warm workers, always busy; no per-generation pods.
    wall = first + per_gpu * (c.swap_s + evaluate)
    out["official (warm Celery workers)"] = (wall, c.gpus * wall)
    # Today, population 1: one fresh engine per child, generations one after another.
    per_child = later + evaluate
    wall = first - later + c.children * (per_child + generation_cpu)
    out["per-task engines, population 1"] = (wall, c.children * per_child)
    # Today, population 8: 8 fresh engines per generation in parallel.
    generations = c.children / c.gpus
    wall = first - later + generations * (per_child + generation_cpu)
    out["per-task engines, population 8"] = (wall, c.children * per_child)
    # Warm evaluators: started once per run; per generation a swap and a score per GPU, and
    # the CPU tasks while the GPUs wait (GPUs are held for the whole run): breed, commit, and
    # the start of the evaluation tasks' CPU pods (they hold an evaluator per child and run
    # the skills' checkers; pipelines/cycleqd_pipeline.py with warm_evaluators).
    evaluation_pods = c.pod_start_s
    wall = first + generations * (c.swap_s + evaluate + generation_cpu + evaluation_pods)
    out["warm evaluators, population 8"] = (wall, c.gpus * wall)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args(argv)
    constants = Constants()
    types = {f.name: f.type for f in fields(Constants)}
    for item in args.set:
        name, _, value = item.partition("=")
        if name not in types:
            parser.error(f"unknown constant {name!r}; known: {', '.join(types)}")
        constants = replace(constants, **{name: (int if types[name] == "int" else float)(value)})
    rows = designs(constants)
    if args.json:
        print(json.dumps({"constants": asdict(constants), "designs": rows}, indent=1))
        return 0
    evaluate = evaluation_s(constants)
    print(
        f"{constants.children} children of 8B experts on {constants.gpus} GPUs; scoring a child: "
        f"{evaluate:.0f} s; a fresh engine: {fresh_engine_s(constants, False):.0f} s "
        f"({fresh_engine_s(constants, True):.0f} s with the image pull)"
    )
    official_wall, official_gpu = rows["official (warm Celery workers)"]
    print(f"{'design':34} {'wall h':>8} {'GPU-h':>8} {'wall x':>7} {'GPU-h x':>8}")
    for name, (wall, gpu) in rows.items():
        print(
            f"{name:34} {wall / 3600:8.1f} {gpu / 3600:8.1f} {wall / official_wall:7.2f} "
            f"{gpu / official_gpu:8.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

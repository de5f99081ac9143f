"""Peak memory and throughput of materialising one CycleQD child, ours against the official path.

Ours: `cycleqd.materialize.Materializer` builds the child from its recipe one tensor at a time
and streams it to a safetensors file (or copies it into a model allocated once).
Official: SakanaAI/CycleQD's per-child path (main.py `Worker.merge_models`): load both parents
as full state dicts, task vectors, linear merge, the SVD-of-expert mutation from a precomputed
SVD dictionary, `load_state_dict` into the worker's model and `save_pretrained`.

Every variant runs in a fresh subprocess, so peak RSS belongs to that variant alone; phases
inside one process (first / second child) get their own peak by resetting the kernel's
high-water mark. Run from the repository root:

    PYTHONPATH=. .venv/bin/python benchmarks/materialize.py            # ~127M params, < 5 min
    PYTHONPATH=. .venv/bin/python benchmarks/materialize.py --quick    # tiny smoke test
"""

from __future__ import annotations

# Only the standard library at module level: the "import" baseline must measure exactly what
# a child process pays for torch + cycleqd, and the parent must not hold a model.
import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cycleqd.genome import Mutation
    from cycleqd.materialize import Materializer

REPO = Path(__file__).resolve().parent.parent
RESULT_PREFIX = "BENCH-RESULT "
MERGE_WEIGHTS = (0.6, 0.4)  # sum to 1, so the official code's division by the sum is a no-op
SVD_EXPERT_RATE = 0.1  # official configs/qd/mutation/svd_uniform_noise.yaml
GAUSSIAN_SIGMA = 1e-3
PAPER_SVD_WMAX = 1.5
TOLERANCE = 1e-5


# -- memory measurement -------------------------------------------------------------------------


def _memory() -> dict[str, int]:
    """VmRSS, VmHWM and RssAnon of this process, in bytes."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:  # not Linux: psutil's RSS stands in for all three
        import psutil

        rss = psutil.Process().memory_info().rss
        return {"VmRSS": rss, "VmHWM": rss, "RssAnon": rss}
    values = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon"):
            values[key] = int(rest.split()[0]) * 1024
    return values


def _reset_high_water_mark() -> bool:
    """Linux >= 4.0 resets VmHWM to the current RSS when "5" is written to clear_refs."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


@dataclass
class Phase:
    """One measured step: a child materialised, a worker started, or an import."""

    key: str
    label: str
    seconds: float = 0.0
    out_bytes: int = 0  # bytes of weights produced (0: nothing produced)
    peak_rss: int = 0  # kernel high-water mark over the phase, file-backed pages included
    peak_anon: int = 0  # sampled peak of anonymous memory (what the kernel cannot drop)
    extra: dict[str, float] = field(default_factory=dict)


class PeakMeter:
    """Times a phase and records its peak RSS and peak anonymous memory.

    The high-water mark counts mmap'd safetensors pages, which the kernel may drop under
    pressure; anonymous memory is sampled every few ms from a thread (torch ops release the
    GIL), so it can miss spikes shorter than that.
    """

    def __init__(self, phase: Phase, interval: float = 0.005):
        self.phase = phase
        self.interval = interval
        self._stop = threading.Event()
        self._peak_rss = 0
        self._peak_anon = 0
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            mem = _memory()
            self._peak_rss = max(self._peak_rss, mem["VmRSS"])
            self._peak_anon = max(self._peak_anon, mem["RssAnon"])
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMeter:
        self._reset = _reset_high_water_mark()
        self._thread.start()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.phase.seconds = time.perf_counter() - self._t0
        self._stop.set()
        self._thread.join()
        mem = _memory()
        sampled = max(self._peak_rss, mem["VmRSS"])
        self.phase.peak_rss = mem["VmHWM"] if self._reset else sampled
        self.phase.peak_anon = max(self._peak_anon, mem["RssAnon"])


# -- the model world ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Size:
    hidden: int
    layers: int
    intermediate: int
    vocab: int

    @property
    def tag(self) -> str:
        return f"llama-h{self.hidden}-l{self.layers}-i{self.intermediate}-v{self.vocab}"

    @property
    def heads(self) -> int:
        return self.hidden // 64 if self.hidden % 64 == 0 else 1  # Llama's head_dim of 64


@dataclass(frozen=True)
class World:
    base: Path
    experts: tuple[Path, Path]
    svd_dict: Path  # official format: {skill: {"<name>.U"|".S"|".V": tensor}} for experts[0]
    out: Path

    @classmethod
    def at(cls, root: Path, size: Size) -> World:
        folder = root / size.tag
        return cls(
            base=folder / "base",
            experts=(folder / "expert-1", folder / "expert-2"),
            svd_dict=folder / "expert-1-svd.pt",
            out=root / f"out-{size.tag}",
        )

    def to_json(self) -> str:
        return json.dumps(
            {
                "base": str(self.base),
                "experts": [str(p) for p in self.experts],
                "svd_dict": str(self.svd_dict),
                "out": str(self.out),
            }
        )

    @classmethod
    def from_json(cls, text: str) -> World:
        raw = json.loads(text)
        first, second = (Path(p) for p in raw["experts"])
        return cls(Path(raw["base"]), (first, second), Path(raw["svd_dict"]), Path(raw["out"]))


def ensure_world(world: World, size: Size) -> None:
    """Build (once; a marker file says a build finished) the base, two experts, the SVD dict."""
    from cycleqd.probe_world import build_base, build_expert, llama_config

    done = world.base.parent / "complete"
    if done.exists():
        return
    print(f"building the random {size.tag} world in {world.base.parent} (once) ...", flush=True)
    shutil.rmtree(world.base.parent, ignore_errors=True)
    t0 = time.perf_counter()
    config = llama_config(size.hidden, size.layers, size.intermediate, size.vocab, size.heads)
    build_base(world.base, config, seed=0)
    for i, folder in enumerate(world.experts, start=1):
        build_expert(world.base, folder, seed=i)
    print(f"  base and experts: {time.perf_counter() - t0:.1f} s", flush=True)
    t0 = time.perf_counter()
    build_svd_dict(world)
    print(f"  official SVD dict of expert-1 (offline step): {time.perf_counter() - t0:.1f} s")
    done.write_text("ok\n")


def build_svd_dict(world: World) -> None:
    """What the official code loads from `seed_model_svd_path`: SVD of each task vector."""
    import torch

    from cycleqd.weights import SafetensorsFolder

    base, expert = SafetensorsFolder(world.base), SafetensorsFolder(world.experts[0])
    factors = {}
    for name in base.names():
        task_vector = expert.get(name) - base.get(name)
        if "norm" in name or task_vector.ndim != 2:
            continue
        u, s, vh = torch.linalg.svd(task_vector, full_matrices=False)
        factors[f"{name}.U"], factors[f"{name}.S"], factors[f"{name}.V"] = u, s, vh.mT
    torch.save({"skill1": factors}, world.svd_dict)


# -- ours ---------------------------------------------------------------------------------------


def _ours_setup(world: World) -> tuple[Materializer, tuple[str, str], int]:
    from cycleqd.genome import Genome, GenomeBook
    from cycleqd.materialize import Materializer
    from cycleqd.weights import SafetensorsFolder

    book = GenomeBook()
    folders = {book.add(Genome(kind="base", source=str(world.base))): world.base}
    experts = []
    for i, path in enumerate(world.experts, start=1):
        gid = book.add(Genome(kind="expert", source=str(path), skill=f"skill{i}"))
        folders[gid] = path
        experts.append(gid)
    opened = {gid: SafetensorsFolder(path) for gid, path in folders.items()}
    materializer = Materializer(book, opened.get, dtype="float32")
    out_bytes = sum(spec.nbytes for spec in materializer.specs().values())
    return materializer, (experts[0], experts[1]), out_bytes


def _child(materializer: Materializer, parents: tuple[str, str], mutation: Mutation) -> str:
    from cycleqd.genome import Genome

    return materializer.book.add(
        Genome(kind="child", parents=parents, weights=MERGE_WEIGHTS, mutation=mutation)
    )


def _to_file(materializer: Materializer, gid: str, folder: Path, phase: Phase) -> None:
    from cycleqd.weights import write_safetensors

    folder.mkdir(parents=True, exist_ok=True)
    with PeakMeter(phase):
        # The sha256 is computed while writing: it is part of the timed work.
        write_safetensors(
            folder / "model.safetensors", materializer.specs(), materializer.tensors(gid)
        )


def ours_svd_expert(world: World) -> list[Phase]:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from cycleqd.genome import Mutation

    materializer, (e1, e2), out_bytes = _ours_setup(world)
    phases = []
    for seed, key, label in (
        (1, "ours-svd-expert-1", "ours, svd_expert, 1st child (factors computed) → file"),
        (2, "ours-svd-expert-2", "ours, svd_expert, 2nd child (factors cached) → file"),
    ):
        gid = _child(materializer, (e1, e2), Mutation("svd_expert", seed, SVD_EXPERT_RATE, e1))
        phase = Phase(key, label, out_bytes=out_bytes)
        _to_file(materializer, gid, world.out / key, phase)
        phases.append(phase)

    # (b) A model allocated once per pod, as an evaluator holds it; not part of the phase.
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(world.base))
    state = model.state_dict()
    gid = _child(materializer, (e1, e2), Mutation("svd_expert", 3, SVD_EXPERT_RATE, e1))
    phase = Phase(
        "ours-svd-expert-model",
        "ours, svd_expert, 3rd child (cached) → preallocated model",
        out_bytes=out_bytes,
    )
    with PeakMeter(phase), torch.no_grad():
        for name, tensor in materializer.tensors(gid):
            state[name].copy_(tensor)
    phases.append(phase)
    return phases


def _ours_single(world: World, key: str, label: str, mutation: Mutation) -> list[Phase]:
    materializer, parents, out_bytes = _ours_setup(world)
    gid = _child(materializer, parents, mutation)
    phase = Phase(key, label, out_bytes=out_bytes)
    _to_file(materializer, gid, world.out / key, phase)
    return [phase]


def ours_gaussian(world: World) -> list[Phase]:
    from cycleqd.genome import Mutation

    return _ours_single(
        world,
        "ours-gaussian",
        "ours, gaussian mutation → file",
        Mutation("gaussian", seed=1, scale=GAUSSIAN_SIGMA),
    )


def ours_none(world: World) -> list[Phase]:
    from cycleqd.genome import Mutation

    return _ours_single(world, "ours-none", "ours, no mutation → file", Mutation("none"))


def ours_paper_svd(world: World) -> list[Phase]:
    from cycleqd.genome import Mutation

    return _ours_single(
        world,
        "ours-svd",
        "ours, paper svd (child's own SVD) → file",
        Mutation("svd", seed=1, scale=PAPER_SVD_WMAX),
    )


# -- the official path --------------------------------------------------------------------------


def _official(world: World, key: str, label: str, mutate: bool) -> list[Phase]:
    """SakanaAI/CycleQD main.py Worker.merge_models for one child, in float32 (the official
    code uses bfloat16; float32 keeps the comparison exact). Its mutation draws the scales
    with torch.rand from the generation seed; here they come from cycleqd's seeded
    uniform_factors so that both paths produce the same child."""
    import torch
    from transformers import AutoModelForCausalLM

    from cycleqd.operators import uniform_factors

    start = Phase(f"{key}-start", "official, worker start (base model + SVD dict)")
    with PeakMeter(start):
        # Worker.__init__: base_params aliases hf_model's parameters (state_dict() is views).
        hf_model = AutoModelForCausalLM.from_pretrained(world.base, dtype=torch.float32)
        base_params = hf_model.state_dict()
        svd_dict = torch.load(world.svd_dict) if mutate else None

    phase = Phase(key, label, out_bytes=sum(t.nbytes for t in base_params.values()))
    with PeakMeter(phase), torch.no_grad():
        # crossover.merge: every parent as a full state dict, then full task vectors.
        ft_params = [
            AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()
            for path in world.experts
        ]
        task_vectors = [{k: ft[k] - base_params[k] for k in base_params} for ft in ft_params]
        weights = torch.tensor(MERGE_WEIGHTS)
        merged = {}
        for k in task_vectors[0]:  # ModelwiseLinearMerge._merge
            merged[k] = torch.zeros_like(task_vectors[0][k])
            for i in range(len(task_vectors)):
                merged[k] += weights[i] * task_vectors[i][k]
            merged[k] /= weights.sum()
        child = {k: base_params[k] + merged[k] for k in base_params}
        if svd_dict is not None:  # SVDUniformMutator._mutate
            factors = svd_dict["skill1"]
            for k in child:
                if "norm" in k:
                    continue
                scales = uniform_factors(1, k, min(child[k].shape), SVD_EXPERT_RATE)
                u, s, v = factors[f"{k}.U"], factors[f"{k}.S"], factors[f"{k}.V"]
                child[k] += u @ torch.diag_embed(scales * s) @ v.T
        hf_model.load_state_dict(child)
        hf_model.save_pretrained(world.out / key, safe_serialization=True)
    return [start, phase] if mutate else [phase]


def official_svd_expert(world: World) -> list[Phase]:
    return _official(
        world,
        "official-svd-expert",
        "official, svd_expert child (full state dicts, save_pretrained)",
        mutate=True,
    )


def official_none(world: World) -> list[Phase]:
    return _official(world, "official-none", "official, no mutation child", mutate=False)


# -- baselines ----------------------------------------------------------------------------------


def _import_baseline(key: str, label: str, modules: tuple[str, ...]) -> list[Phase]:
    import importlib

    phase = Phase(key, label)
    t0 = time.perf_counter()
    for module in modules:
        importlib.import_module(module)
    phase.seconds = time.perf_counter() - t0
    mem = _memory()
    phase.peak_rss, phase.peak_anon = mem["VmHWM"], mem["RssAnon"]
    return [phase]


def import_ours(world: World) -> list[Phase]:
    return _import_baseline(
        "import",
        "baseline: process that imports torch + cycleqd",
        ("torch", "cycleqd.materialize", "cycleqd.weights", "cycleqd.genome"),
    )


def import_transformers(world: World) -> list[Phase]:
    return _import_baseline(
        "import-hf",
        "baseline: process that imports torch + cycleqd + transformers",
        ("torch", "cycleqd.materialize", "transformers", "transformers.models.llama"),
    )


VARIANTS: dict[str, Callable[[World], list[Phase]]] = {
    "import": import_ours,
    "import-hf": import_transformers,
    "ours-svd-expert": ours_svd_expert,
    "ours-gaussian": ours_gaussian,
    "ours-none": ours_none,
    "ours-svd": ours_paper_svd,
    "official-svd-expert": official_svd_expert,
    "official-none": official_none,
}

# Which official row each of our rows is compared with: the same mutation where the official
# code has it; otherwise its cheapest child (no mutation).
OFFICIAL_OF = {
    "ours-svd-expert-1": "official-svd-expert",
    "ours-svd-expert-2": "official-svd-expert",
    "ours-svd-expert-model": "official-svd-expert",
    "ours-gaussian": "official-none",
    "ours-none": "official-none",
    "ours-svd": "official-none",
}


# -- orchestration ------------------------------------------------------------------------------


def run_in_subprocess(variant: str, world: World, threads: int | None) -> list[Phase]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)  # torch's intra-op pool reads it at start
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--_variant",
        variant,
        "--_world",
        world.to_json(),
    ]
    print(f"  running {variant} ...", flush=True)
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.stderr.write(done.stdout + done.stderr)
        raise SystemExit(f"variant {variant} failed with exit code {done.returncode}")
    line = next(x for x in done.stdout.splitlines() if x.startswith(RESULT_PREFIX))
    return [Phase(**p) for p in json.loads(line[len(RESULT_PREFIX) :])]


def best_of(runs: list[list[Phase]]) -> list[Phase]:
    """Each phase's fastest repeat (the least disturbed by other processes), largest peaks."""
    merged = []
    for repeats in zip(*runs, strict=True):
        fastest = min(repeats, key=lambda p: p.seconds)
        merged.append(
            replace(
                fastest,
                peak_rss=max(p.peak_rss for p in repeats),
                peak_anon=max(p.peak_anon for p in repeats),
            )
        )
    return merged


def child_main(variant: str, world_json: str) -> None:
    phases = VARIANTS[variant](World.from_json(world_json))
    print(RESULT_PREFIX + json.dumps([asdict(p) for p in phases]), flush=True)


def max_abs_diff(a: Path, b: Path) -> float:
    """Largest |a - b| over every tensor of two model folders with the same tensor names."""
    from cycleqd.weights import SafetensorsFolder

    fa, fb = SafetensorsFolder(a), SafetensorsFolder(b)
    if fa.names() != fb.names():
        raise SystemExit(f"{a} and {b} hold different tensors")
    return max(float((fa.get(n).float() - fb.get(n).float()).abs().max()) for n in fa.names())


def model_facts(world: World) -> dict[str, int]:
    from cycleqd.weights import SafetensorsFolder

    specs = SafetensorsFolder(world.base).specs()
    factor_bytes = 0  # the Materializer's cached U, S, Vh of one expert, float32
    for name, spec in specs.items():
        if len(spec.shape) == 2 and "norm" not in name:
            m, n = spec.shape
            k = min(m, n)
            factor_bytes += 4 * (m * k + k + k * n)
    return {
        "params": sum(spec.nbytes // spec.dtype.itemsize for spec in specs.values()),
        "bytes": sum(spec.nbytes for spec in specs.values()),
        "factor_bytes": factor_bytes,
    }


def _mb(n: int) -> str:
    return f"{n / 2**20:,.0f}"


def render_table(phases: list[Phase], model_bytes: int) -> str:
    by_key = {p.key: p for p in phases}
    rows = [
        "| # | variant | s | GB/s | peak RSS MB | peak anon MB | RSS / model | anon / model "
        "| speed vs official | RSS vs official | anon vs official |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for i, p in enumerate(phases, start=1):
        gbps = f"{p.out_bytes / p.seconds / 1e9:.3f}" if p.out_bytes else "—"
        speed = rss = anon = "—"
        official = by_key.get(OFFICIAL_OF.get(p.key, ""))
        if official is not None:
            speed = f"{official.seconds / p.seconds:.2f}× (#{phases.index(official) + 1})"
            rss = f"{p.peak_rss / official.peak_rss:.2f}×"
            anon = f"{p.peak_anon / official.peak_anon:.2f}×"
        rows.append(
            f"| {i} | {p.label} | {p.seconds:.2f} | {gbps} | {_mb(p.peak_rss)} "
            f"| {_mb(p.peak_anon)} | {p.peak_rss / model_bytes:.2f} "
            f"| {p.peak_anon / model_bytes:.2f} | {speed} | {rss} | {anon} |"
        )
    return "\n".join(rows)


def machine() -> str:
    cores = os.cpu_count()
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        ram = float("nan")
    return f"{platform.machine()} CPU, {cores} cores, {ram:.0f} GiB RAM, {platform.system()}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path("/tmp/cycleqd-bench"),
        help="where the random models are cached and outputs written",
    )
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a tiny model (hidden 64, 2 layers): a smoke test, not a benchmark",
    )
    parser.add_argument(
        "--keep-outputs",
        action="store_true",
        help="keep the materialised children under WORKDIR/out-*",
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="run each variant N times; report the fastest"
    )
    parser.add_argument("--threads", type=int, help="torch threads per variant (OMP_NUM_THREADS)")
    parser.add_argument("--json", type=Path, help="also write the measurements here")
    parser.add_argument("--_variant", help=argparse.SUPPRESS)
    parser.add_argument("--_world", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # transformers' progress bars would bury the table (children inherit the environment).
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if args._variant:
        child_main(args._variant, args._world)
        return
    if args.quick:
        size = Size(hidden=64, layers=2, intermediate=176, vocab=256)
    else:
        size = Size(args.hidden, args.layers, args.intermediate, args.vocab)
    world = World.at(args.workdir, size)
    ensure_world(world, size)
    facts = model_facts(world)
    print(f"model: {facts['params'] / 1e6:.1f}M params, {_mb(facts['bytes'])} MB float32")

    shutil.rmtree(world.out, ignore_errors=True)
    load_before = os.getloadavg()[0]
    phases: list[Phase] = []
    for variant in VARIANTS:
        runs = [run_in_subprocess(variant, world, args.threads) for _ in range(args.repeat)]
        phases.extend(best_of(runs))
    load_after = os.getloadavg()[0]

    diff_none = max_abs_diff(world.out / "ours-none", world.out / "official-none")
    diff_svd = max_abs_diff(world.out / "ours-svd-expert-1", world.out / "official-svd-expert")
    if not args.keep_outputs:
        shutil.rmtree(world.out, ignore_errors=True)

    import torch

    by_key = {p.key: p for p in phases}
    print()
    print(
        f"{size.tag}: {facts['params'] / 1e6:.1f}M params, model {_mb(facts['bytes'])} MB "
        f"float32; {machine()}, torch {torch.__version__} "
        f"({args.threads or torch.get_num_threads()} threads); best of {args.repeat}; "
        f"{datetime.date.today().isoformat()}; load average {load_before:.2f} before, "
        f"{load_after:.2f} after"
    )
    if max(load_before, load_after) > 0.3 * (os.cpu_count() or 1):
        print("warning: other processes were using the CPU; timings are noisy (try --repeat 3)")
    print()
    print(render_table(phases, facts["bytes"]))
    print()
    row = {p.key: i for i, p in enumerate(phases, start=1)}
    print(
        f"- cached SVD factors of one expert: {_mb(facts['factor_bytes'])} MB "
        f"({facts['factor_bytes'] / facts['bytes']:.2f}× the model), held for the "
        f"Materializer's life (rows {row['ours-svd-expert-2']}-{row['ours-svd-expert-model']} "
        "include them)"
    )
    first, second = by_key["ours-svd-expert-1"], by_key["ours-svd-expert-2"]
    print(
        f"- computing one expert's SVD factors: ~{first.seconds - second.seconds:.1f} s "
        f"(row {row['ours-svd-expert-1']} minus row {row['ours-svd-expert-2']}); the official "
        "code precomputes them offline"
    )
    ok_none = diff_none <= TOLERANCE
    print(
        f"- check, no mutation: max |ours - official| = {diff_none:.2e} "
        f"({'OK' if ok_none else 'FAIL'}, tolerance {TOLERANCE:g})"
    )
    print(
        f"- check, svd_expert child, same seeded scales: max |ours - official| = "
        f"{diff_svd:.2e} (informative; the official mutation uses diag_embed matmuls)"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "size": asdict(size),
                    "facts": facts,
                    "machine": machine(),
                    "load_average": [load_before, load_after],
                    "phases": [asdict(p) for p in phases],
                    "max_abs_diff": {"none": diff_none, "svd_expert": diff_svd},
                },
                indent=2,
            )
        )
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(f"- largest child process peak RSS (ru_maxrss): {usage.ru_maxrss / 1024:,.0f} MB")
    if not ok_none:
        raise SystemExit(1)


if __name__ == "__main__":
    main()

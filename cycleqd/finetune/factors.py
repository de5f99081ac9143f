"""SVD factors of an expert's task vector, computed once and stored beside its weights.

The official code's mutation adds `U diag(r * S) V^T` of the quality skill's expert task
vector; breeding reads these factors instead of decomposing `expert - base` again.

- LoRA: `delta W = scale * B @ A` with B (out x r) and A (r x in). With thin QRs B = Qb Rb and
  A^T = Qa Ra, `delta W = Qb (scale Rb Ra^T) Qa^T`; the SVD of the r x r core, Uc S Vch,
  gives U = Qb Uc, Vh = Vch Qa^T: the exact rank-r factors, never forming the full matrix
  (computed in float64, stored in float32).
- Full fine-tuning (and imported experts): the thin SVD of every changed 2-D tensor
  (`cycleqd.operators.is_svd_target`), optionally cut to the top `rank` singular values.

Stored as one safetensors file, `<expert>/task_vector/factors.safetensors`, tensors
`<name>.U` (out x k), `<name>.S` (k), `<name>.Vh` (k x in) for each changed weight `<name>`
(names as in the model's safetensors); a weight without factors has a zero task vector (or is
1-D: mutations pass those through). The file's metadata says `kind` (lora | full) and `rank`.
It is inside the expert's folder, so the folder's manifest (written last) vouches for it; it
sits in a subfolder, so readers of the model's `*.safetensors` never see it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open

from cycleqd.errors import CycleQDError, MissingTensorError
from cycleqd.objectstore import (
    LocalObjectStore,
    ObjectStore,
    RemoteSafetensors,
    StoreNotFoundError,
    open_store,
    read_manifest,
)
from cycleqd.operators import is_svd_target
from cycleqd.weights import FACTORS_FILE, TensorSpec, write_safetensors

Factors = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class FactorsNotFoundError(CycleQDError):
    """An expert has no (complete) stored task vector factors."""


# -- computing -------------------------------------------------------------------------------


def lora_factors(a: torch.Tensor, b: torch.Tensor, scale: float) -> Factors:
    """U, S, Vh of `scale * b @ a` (b: out x r, a: r x in) from thin QRs, rank r."""
    a64, b64 = a.detach().to("cpu", torch.float64), b.detach().to("cpu", torch.float64)
    qb, rb = torch.linalg.qr(b64)  # out x r, r x r
    qa, ra = torch.linalg.qr(a64.T)  # in x r, r x r
    uc, s, vch = torch.linalg.svd(scale * rb @ ra.T, full_matrices=False)
    return (qb @ uc).float(), s.float(), (vch @ qa.T).float()


def full_factors(delta: torch.Tensor, rank: int | None = None) -> Factors:
    """Thin SVD of a task vector tensor (float32 on its device), cut to `rank` if given."""
    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
    if rank is not None and rank < s.numel():
        u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    return u.cpu().contiguous(), s.cpu().contiguous(), vh.cpu().contiguous()


def factor_rank(shape: tuple[int, ...], rank: int | None) -> int:
    k = min(shape)
    return k if rank is None else min(k, rank)


def write_factors(
    path: str | Path,
    plan: Mapping[str, tuple[tuple[int, int], int]],
    produce: Callable[[str], Factors],
    *,
    kind: str,
    metadata: Mapping[str, str] | None = None,
) -> str:
    """Stream factors into one safetensors file; `plan`: name -> ((out, in), k), `produce`
    computes one weight's factors when it is written. Returns the file's sha256."""
    specs: dict[str, TensorSpec] = {}
    for name, ((rows, cols), k) in plan.items():
        specs[f"{name}.U"] = TensorSpec((rows, k), torch.float32)
        specs[f"{name}.S"] = TensorSpec((k,), torch.float32)
        specs[f"{name}.Vh"] = TensorSpec((k, cols), torch.float32)

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for name in sorted(plan):
            u, s, vh = produce(name)
            yield f"{name}.S", s
            yield f"{name}.U", u
            yield f"{name}.Vh", vh

    ranks = sorted({k for _, k in plan.values()})
    meta = {
        "format": "cycleqd-task-vector-factors",
        "kind": kind,
        "rank": str(ranks[-1]) if len(ranks) == 1 else json.dumps(ranks),
        "tensors": str(len(plan)),
        **(metadata or {}),
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return write_safetensors(path, specs, tensors(), meta)


# -- reading ---------------------------------------------------------------------------------


class TaskVectorFactors(Mapping[str, Factors]):
    """Stored factors, read lazily: `factors[name] -> (U, S, Vh)` (float32, CPU)."""

    def __init__(self, reader, where: str):
        self._reader = reader
        self.where = where
        names = reader.names() if hasattr(reader, "names") else list(reader.keys())
        self._names = sorted({n.rsplit(".", 1)[0] for n in names if n.endswith(".S")})

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self._reader.metadata() or {})

    @property
    def kind(self) -> str:
        return self.metadata.get("kind", "")

    def _get(self, name: str) -> torch.Tensor:
        if isinstance(self._reader, RemoteSafetensors):
            return self._reader.get(name)
        return self._reader.get_tensor(name)

    def __getitem__(self, name: str) -> Factors:
        if name not in self._names:
            raise KeyError(name)
        return self._get(f"{name}.U"), self._get(f"{name}.S"), self._get(f"{name}.Vh")

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def delta(self, name: str) -> torch.Tensor:
        """U diag(S) Vh: the task vector of one weight."""
        u, s, vh = self[name]
        return (u * s) @ vh


def load_task_vector_factors(store: ObjectStore | str | Path, prefix: str) -> TaskVectorFactors:
    """The factors of the expert published at `prefix` of `store` (see the module doc)."""
    store = store if isinstance(store, ObjectStore) else open_store(store)
    prefix = prefix.strip("/")
    where = f"{store.uri.rstrip('/')}/{prefix}"
    manifest = read_manifest(store, prefix)
    if manifest is None:
        raise FactorsNotFoundError(f"{where}: no published expert there (no manifest)")
    recorded = (manifest.get("files") or {}).get(FACTORS_FILE)
    if recorded is None:
        raise FactorsNotFoundError(
            f"{where}: the expert was published without task vector factors "
            f"({FACTORS_FILE}); publish it again with cycleqd.finetune"
        )
    key = f"{prefix}/{FACTORS_FILE}"
    try:
        info = store.stat(key)
    except StoreNotFoundError:
        raise FactorsNotFoundError(
            f"{where}: {FACTORS_FILE} is in the manifest but missing"
        ) from None
    if info.sha256 is not None and info.sha256 != recorded:
        raise FactorsNotFoundError(
            f"{where}/{FACTORS_FILE} does not match the expert's manifest (sha256 "
            f"{info.sha256[:16]}... vs {recorded[:16]}...): publish the expert again"
        )
    try:
        if isinstance(store, LocalObjectStore):
            reader = safe_open(str(store.root / prefix / FACTORS_FILE), framework="pt")
        else:
            reader = RemoteSafetensors(store, key)
    except (MissingTensorError, OSError, ValueError) as exc:
        raise FactorsNotFoundError(f"{where}/{FACTORS_FILE} is unreadable: {exc}") from None
    return TaskVectorFactors(reader, f"{where}/{FACTORS_FILE}")


def plan_for(names_shapes: Mapping[str, tuple[int, ...]], rank: int | None):
    """The factor plan of the 2-D non-norm weights among `names_shapes`."""
    return {
        name: ((shape[0], shape[1]), factor_rank(shape, rank))
        for name, shape in names_shapes.items()
        if is_svd_target(name, torch.empty(shape, device="meta"))
    }


__all__ = [
    "FACTORS_FILE",
    "FactorsNotFoundError",
    "TaskVectorFactors",
    "full_factors",
    "load_task_vector_factors",
    "lora_factors",
    "write_factors",
]

"""Safetensors files in a store read tensor by tensor with ranged GETs (`RemoteSafetensors`),
behind the same names/specs/get interface as `cycleqd.weights.SafetensorsFolder`. torch is
imported only when a header or a tensor is read."""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from cycleqd.errors import MissingTensorError
from cycleqd.objectstore.base import MiB, ObjectStore
from cycleqd.objectstore.errors import StoreNotFoundError
from cycleqd.objectstore.keys import check_key
from cycleqd.weights import TensorSpec, code_dtypes

if TYPE_CHECKING:
    import torch


@functools.cache
def _remote_dtypes() -> dict[str, torch.dtype]:
    """Every safetensors dtype code this torch can read (imports torch)."""
    import torch

    dtypes = dict(code_dtypes())
    for code, attr in (
        ("I8", "int8"),
        ("I16", "int16"),
        ("U16", "uint16"),
        ("U32", "uint32"),
        ("U64", "uint64"),
        ("F8_E4M3", "float8_e4m3fn"),
        ("F8_E5M2", "float8_e5m2"),
    ):
        if hasattr(torch, attr):
            dtypes.setdefault(code, getattr(torch, attr))
    return dtypes


_MAX_HEADER = 100 * MiB  # the safetensors format's own limit


class RemoteSafetensors:
    """A safetensors file (key ending in .safetensors) or a model folder (every *.safetensors
    directly under the key) in a store, read tensor by tensor with ranged GETs.

    Each file's header costs one ranged GET (two if it is larger than `header_probe`); each
    tensor then costs one. Same interface as `cycleqd.weights.SafetensorsFolder`.
    """

    def __init__(self, store: ObjectStore, key: str, header_probe: int = 1 * MiB):
        self.store = store
        key = check_key(key.strip("/"))
        self.folder = f"{store.uri.rstrip('/')}/{key}"
        if key.endswith(".safetensors"):
            files, self._dir = [key], key.rsplit("/", 1)[0] if "/" in key else ""
        else:
            files = [
                k
                for k in store.list(f"{key}/")
                if k.endswith(".safetensors") and "/" not in k[len(key) + 1 :]
            ]
            self._dir = key
        if not files:
            raise MissingTensorError(
                f"{self.folder}: no *.safetensors files; point at a model folder saved with "
                "save_pretrained(safe_serialization=True)"
            )
        self._where: dict[str, tuple[str, int, int]] = {}
        self._specs: dict[str, TensorSpec] = {}
        self._metadata: dict[str, dict] = {}
        for file in files:
            self._read_header(file, header_probe)
        self._cache: dict[str, torch.Tensor] = {}
        self._cache_lock = threading.Lock()

    def _read_header(self, file: str, probe: int) -> None:
        where = f"{self.store.uri.rstrip('/')}/{file}"
        head = self.store.get_range(file, 0, max(probe, 8))
        if len(head) < 8:
            raise MissingTensorError(f"{where}: not a safetensors file (only {len(head)} bytes)")
        size = int.from_bytes(head[:8], "little")
        if size > _MAX_HEADER:
            raise MissingTensorError(f"{where}: not a safetensors file (header of {size} bytes)")
        raw = head[8 : 8 + size]
        if len(raw) < size:
            raw += self.store.get_range(file, len(head), 8 + size)
        if len(raw) < size:
            raise MissingTensorError(f"{where}: truncated safetensors header")
        try:
            header = json.loads(raw)
        except (ValueError, RecursionError):
            raise MissingTensorError(f"{where}: not a safetensors file (bad header)") from None
        if not isinstance(header, dict):
            raise MissingTensorError(f"{where}: not a safetensors file (bad header)")
        start = 8 + size
        for name, info in header.items():
            try:
                if name == "__metadata__":
                    self._metadata[file] = {str(k): str(v) for k, v in dict(info or {}).items()}
                    continue
                dtype = _remote_dtypes().get(info["dtype"])
                if dtype is None:
                    raise MissingTensorError(f"{where}: tensor {name!r} has unsupported dtype")
                spec = TensorSpec(tuple(info["shape"]), dtype)
                begin, end = info["data_offsets"]
                numbers = (*spec.shape, begin, end)
                valid = all(type(d) is int and d >= 0 for d in numbers)
                if not valid or end - begin != spec.nbytes:
                    raise MissingTensorError(f"{where}: tensor {name!r} has inconsistent offsets")
            except (KeyError, TypeError, ValueError, OverflowError):
                raise MissingTensorError(
                    f"{where}: not a safetensors file (bad entry for tensor {str(name)[:80]!r})"
                ) from None
            self._specs[name] = spec
            self._where[name] = (file, start + begin, start + end)

    def names(self) -> list[str]:
        return sorted(self._specs)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: spec.shape for name, spec in self._specs.items()}

    def specs(self) -> dict[str, TensorSpec]:
        return dict(self._specs)

    def metadata(self) -> dict[str, str]:
        merged: dict[str, str] = {}
        for meta in self._metadata.values():
            merged.update(meta)
        return merged

    def _fetch(self, name: str) -> torch.Tensor:
        where = self._where.get(name)
        if where is None:
            raise MissingTensorError(f"{self.folder}: tensor {name!r} is missing")
        file, begin, end = where
        spec = self._specs[name]
        import torch

        if begin == end:
            return torch.empty(spec.shape, dtype=spec.dtype)
        data = self.store.get_range(file, begin, end)
        if len(data) != end - begin:
            raise MissingTensorError(
                f"{self.folder}: tensor {name!r} is cut off ({len(data)} of {end - begin} bytes)"
            )
        return torch.frombuffer(bytearray(data), dtype=spec.dtype).reshape(spec.shape)

    def get(self, name: str) -> torch.Tensor:
        """The tensor (a prefetched one is handed over and dropped from the cache)."""
        with self._cache_lock:
            tensor = self._cache.pop(name, None)
        return tensor if tensor is not None else self._fetch(name)

    def prefetch(self, names: Iterable[str], max_workers: int = 8) -> dict[str, torch.Tensor]:
        """Fetch several tensors in parallel; they are kept until `get` takes them."""
        names = [n for n in dict.fromkeys(names) if n not in self._cache]
        for name in names:
            if name not in self._where:
                raise MissingTensorError(f"{self.folder}: tensor {name!r} is missing")
        with ThreadPoolExecutor(max_workers=max(1, max_workers)) as pool:
            fetched = dict(zip(names, pool.map(self._fetch, names), strict=True))
        with self._cache_lock:
            self._cache.update(fetched)
            return dict(fetched)

    def config(self) -> dict:
        key = f"{self._dir}/config.json" if self._dir else "config.json"
        try:
            return json.loads(self.store.get_bytes(key))
        except StoreNotFoundError:
            return {}

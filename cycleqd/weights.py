"""Safetensors model folders, read and written one tensor at a time.

Reading goes through `safe_open` (memory-mapped, one tensor per call); writing streams each
tensor's bytes after a header computed up front, so neither side ever holds a whole state
dict. A folder is complete only once `cycleqd-manifest.json` exists: it is written last.

torch and safetensors are imported where tensors are read or written, not with this module:
the pipeline's CPU tasks (breed, commit) open the model folders only to check that they
match (headers and config.json), and a task that never imports torch starts ~1 s sooner.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cycleqd.errors import MissingTensorError, ModelMismatchError
from cycleqd.redact import redact_text

if TYPE_CHECKING:
    import torch

MANIFEST = "cycleqd-manifest.json"
# Where fine-tuning leaves an expert's task-vector SVD factors, beside its weights.
FACTORS_FILE = "task_vector/factors.safetensors"

# The safetensors dtype codes read and written here: code -> (torch attribute, bytes per item).
_CODES = {
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "F64": ("float64", 8),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "BOOL": ("bool", 1),
    "U8": ("uint8", 1),
}


@functools.cache
def code_dtypes() -> dict[str, torch.dtype]:
    """Safetensors dtype code -> torch dtype (imports torch)."""
    import torch

    return {code: getattr(torch, attr) for code, (attr, _) in _CODES.items()}


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


_MAX_HEADER = 100 << 20  # the safetensors format's own limit


def _read_header(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """The tensors of a safetensors file by name, as (shape, dtype code); MissingTensorError
    naming the file when it is not one (truncated, corrupted header, unknown dtype, offsets
    past its end)."""
    try:
        with path.open("rb") as f:
            head = f.read(8)
            size = int.from_bytes(head, "little")
            if len(head) < 8 or size > _MAX_HEADER:
                raise ValueError("no safetensors header")
            raw = f.read(size)
            end = f.seek(0, os.SEEK_END)
        if len(raw) < size:
            raise ValueError("truncated header")
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        specs = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            shape, code = tuple(info["shape"]), info["dtype"]
            itemsize = _CODES[code][1]
            begin, stop = info["data_offsets"]
            if not all(type(d) is int and d >= 0 for d in (*shape, begin, stop)):
                raise ValueError(f"tensor {name!r} has a bad shape or offsets")
            if stop - begin != math.prod(shape) * itemsize or 8 + size + stop > end:
                raise ValueError(f"tensor {name!r} has inconsistent offsets")
            specs[name] = (shape, code)
        return specs
    except OSError as exc:
        raise MissingTensorError(f"cannot read {path}: {exc.strerror}") from None
    except (ValueError, KeyError, TypeError, RecursionError, OverflowError) as exc:
        what = f"{type(exc).__name__}: {exc}" if not isinstance(exc, ValueError) else str(exc)
        raise MissingTensorError(
            f"{path} is not a valid safetensors file ({what[:200]}); rewrite or restore it"
        ) from None


class SafetensorsFolder:
    """A model folder (HF layout: one or more *.safetensors files), opened lazily."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise MissingTensorError(
                f"{redact_text(self.folder)}: no *.safetensors files; point the config at a "
                "model folder saved with save_pretrained(safe_serialization=True)"
            )
        self._file_of: dict[str, Path] = {}
        self._header: dict[str, tuple[tuple[int, ...], str]] = {}  # name -> (shape, code)
        for file in files:
            for name, entry in _read_header(file).items():
                self._file_of[name] = file
                self._header[name] = entry
        self._specs: dict[str, TensorSpec] | None = None  # built on first use (imports torch)
        self._handles: dict[Path, object] = {}

    def names(self) -> list[str]:
        return sorted(self._header)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape by name (without importing torch)."""
        return {name: shape for name, (shape, _) in self._header.items()}

    def specs(self) -> dict[str, TensorSpec]:
        if self._specs is None:
            dtypes = code_dtypes()
            self._specs = {
                name: TensorSpec(shape, dtypes[code])
                for name, (shape, code) in self._header.items()
            }
        return dict(self._specs)

    def get(self, name: str) -> torch.Tensor:
        file = self._file_of.get(name)
        if file is None:
            raise MissingTensorError(f"{redact_text(self.folder)}: tensor {name!r} is missing")
        handle = self._handles.get(file)
        if handle is None:
            from safetensors import safe_open

            handle = self._handles[file] = safe_open(str(file), framework="pt", device="cpu")
        return handle.get_tensor(name)

    def config(self) -> dict:
        path = self.folder / "config.json"
        if not path.exists():
            return {}
        try:
            config = json.loads(path.read_text())
        except (OSError, ValueError, RecursionError) as exc:
            raise ModelMismatchError(f"{path} is not readable JSON ({exc})") from None
        if not isinstance(config, dict):
            raise ModelMismatchError(f"{path} is not a JSON object")
        return config


# Fields of config.json that must agree for two checkpoints to be merged tensor by tensor.
_ARCH_FIELDS = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "tie_word_embeddings",
)


def check_compatible(base: SafetensorsFolder, others: Mapping[str, SafetensorsFolder]) -> None:
    """Every expert must have the base's tensors with the base's shapes; say which differ."""
    base_shapes, base_config = base.shapes(), base.config()
    for label, other in others.items():
        for key in _ARCH_FIELDS:
            if key in base_config and base_config.get(key) != other.config().get(
                key, base_config[key]
            ):
                raise ModelMismatchError(
                    f"{label} ({other.folder}): config.json {key}={other.config().get(key)!r} but "
                    f"the base has {base_config[key]!r}; experts must be fine-tuned from the base"
                )
        shapes = other.shapes()
        missing = sorted(set(base_shapes) - set(shapes))
        extra = sorted(set(shapes) - set(base_shapes))
        if missing or extra:
            raise ModelMismatchError(
                f"{label} ({other.folder}) does not have the base's tensors: "
                f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}"
            )
        for name, shape in base_shapes.items():
            if shapes[name] != shape:
                raise ModelMismatchError(
                    f"{label} ({other.folder}): tensor {name!r} has shape {list(shapes[name])}"
                    f", the base has {list(shape)}"
                )


def write_safetensors(
    path: str | Path,
    specs: Mapping[str, TensorSpec],
    tensors: Iterable[tuple[str, torch.Tensor]],
    metadata: Mapping[str, str] | None = None,
) -> str:
    """Stream tensors into one safetensors file; returns its sha256.

    `tensors` must yield exactly the names of `specs`, in any order; the header is written
    first from the specs, then each tensor at its offset, so memory stays at one tensor.
    """
    import torch

    dtype_codes = {dtype: code for code, dtype in code_dtypes().items()}
    path = Path(path)
    order = sorted(specs)
    header: dict[str, object] = {"__metadata__": dict(metadata or {})}
    offset = 0
    for name in order:
        spec = specs[name]
        header[name] = {
            "dtype": dtype_codes[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    start = 8 + len(raw)
    tmp = path.with_name(path.name + ".partial")
    written: set[str] = set()
    # Tensors arriving in header order (the materialiser's order) are hashed as they are
    # written; any other order falls back to reading the file back once.
    digest = hashlib.sha256()
    next_offset = 0
    with tmp.open("wb") as f, ThreadPoolExecutor(1, thread_name_prefix="sha256") as hasher:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        digest.update(len(raw).to_bytes(8, "little"))
        digest.update(raw)
        f.truncate(start + offset)
        for name, tensor in tensors:
            info = header.get(name)
            if not isinstance(info, dict) or name == "__metadata__":
                raise MissingTensorError(f"writing {path}: unexpected tensor {name!r}")
            spec = specs[name]
            if tuple(tensor.shape) != spec.shape:
                raise ModelMismatchError(
                    f"writing {path}: {name} has shape {list(tensor.shape)}, "
                    f"expected {list(spec.shape)}"
                )
            data = tensor.detach().to("cpu", spec.dtype).contiguous()
            f.seek(start + info["data_offsets"][0])
            if data.numel():
                raw_bytes = data.reshape(-1).view(torch.uint8).numpy().data
                in_order = digest is not None and info["data_offsets"][0] == next_offset
                # sha256 (one core, ~1.7 GB/s) runs beside the write, both outside the GIL;
                # both end before the next tensor is asked for, whose memory may be reused.
                hashed = hasher.submit(digest.update, raw_bytes) if in_order else None
                f.write(raw_bytes)
                if hashed is not None:
                    hashed.result()
                else:
                    digest = None
            if digest is not None:
                next_offset = info["data_offsets"][1]
            written.add(name)
    missing = sorted(set(order) - written)
    if missing:
        tmp.unlink()
        raise MissingTensorError(f"writing {path}: tensors never produced: {missing[:5]}")
    os.replace(tmp, path)
    return digest.hexdigest() if digest is not None else sha256_file(path)


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def iter_tensors(source: SafetensorsFolder) -> Iterator[tuple[str, torch.Tensor]]:
    for name in source.names():
        yield name, source.get(name)

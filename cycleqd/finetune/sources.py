"""Where models and data sets come from: a local path, an object-store URI, a Hub repo id.

`split_uri("s3://bucket/a/b")` opens the store one level up and returns the key below it, so
that a model folder or a file can be named by a single URI. `fetch_model_folder` gives a local
folder for any source (downloading store objects, or a Hugging Face snapshot where a network
exists).
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from urllib.parse import unquote, urlparse

from cycleqd.errors import CycleQDError
from cycleqd.objectstore import (
    LocalObjectStore,
    ObjectStore,
    StoreError,
    StoreNotFoundError,
    open_store,
    read_manifest,
)
from cycleqd.weights import MANIFEST, sha256_file

# Files of a model folder that are not weights in safetensors form: never copied.
_OTHER_WEIGHTS = (".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt", ".gguf", ".onnx")
_HF_REPO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


class SourceError(CycleQDError):
    """A model or data set cannot be found or fetched."""


def is_uri(source: str | Path) -> bool:
    return isinstance(source, str) and "://" in source


def local_path(source: str | Path) -> Path | None:
    """The local path a source names (a plain path or file://), else None."""
    if isinstance(source, Path):
        return source
    if not is_uri(source):
        return Path(source).expanduser()
    parsed = urlparse(source)
    if parsed.scheme.lower() == "file" and parsed.netloc in ("", "localhost"):
        return Path(unquote(parsed.path))
    return None


def split_uri(uri: str) -> tuple[ObjectStore, str]:
    """`s3://bucket/a/b/c` -> (store at s3://bucket/a/b, 'c')."""
    parsed = urlparse(uri)
    path = unquote(parsed.path).rstrip("/")
    if parsed.scheme.lower() == "s3":
        key = path.strip("/")
        if not key:
            raise SourceError(f"{uri}: name an object or folder inside the bucket")
        parent, _, leaf = key.rpartition("/")
        root = f"s3://{parsed.netloc}/{parent}" if parent else f"s3://{parsed.netloc}"
        return open_store(root), leaf
    local = local_path(uri)
    if local is None:
        raise SourceError(f"unsupported URI {uri!r}: use s3://bucket/key, file:///path or a path")
    local = local.absolute()
    return LocalObjectStore(local.parent), local.name


def model_files(folder: Path) -> dict[str, Path]:
    """The files of a model folder worth keeping: top level, no manifest, no other formats."""
    return {
        p.name: p
        for p in sorted(folder.iterdir())
        if p.is_file()
        and p.name != MANIFEST
        and not p.name.startswith(".")
        and not p.name.endswith(_OTHER_WEIGHTS)
    }


def weights_digest(files: dict[str, str]) -> str:
    """One sha256 for a model's weights from {file name: sha256} of its *.safetensors files:
    the file's own sha256 when there is one file, else the sha256 of `sha  name` lines."""
    shards = {n: s for n, s in files.items() if n.endswith(".safetensors")}
    if len(shards) == 1:
        return next(iter(shards.values()))
    text = "".join(f"{sha}  {name}\n" for name, sha in sorted(shards.items()))
    return hashlib.sha256(text.encode()).hexdigest()


def folder_weights_digest(folder: Path) -> str:
    files = {p.name: sha256_file(p) for p in sorted(folder.glob("*.safetensors"))}
    if not files:
        raise SourceError(f"{folder}: no *.safetensors files")
    return weights_digest(files)


def fetch_model_folder(source: str | Path, cache: Path, *, what: str = "model") -> tuple[Path, str]:
    """A local folder holding the model named by `source`, and its weights digest.

    `source`: a local folder; a store URI of a model folder (`s3://bucket/experts/x`, files
    downloaded into `cache`); or a Hugging Face repo id (`org/name`, snapshot downloaded
    into `cache`, only where the Hub can be reached).
    """
    local = local_path(source)
    if local is not None and (not isinstance(source, str) or is_uri(source) or local.exists()):
        if not local.is_dir():
            raise SourceError(f"{what} {source}: no such folder")
        if not any(local.glob("*.safetensors")):
            raise SourceError(
                f"{what} {source}: no *.safetensors files; save the model with "
                "save_pretrained(safe_serialization=True)"
            )
        return local, folder_weights_digest(local)
    if is_uri(source):
        return _fetch_from_store(str(source), cache, what)
    if isinstance(source, str) and _HF_REPO.match(source) and not source.startswith("."):
        return _fetch_from_hub(source, cache, what)
    if isinstance(source, str) and source.startswith(("/", ".", "~")):
        raise SourceError(f"{what} {source}: no such folder")
    raise SourceError(
        f"{what} {source!r}: not a folder, a store URI (s3://bucket/key, file:///path) or a "
        "Hugging Face repo id (org/name)"
    )


def _fetch_from_store(uri: str, cache: Path, what: str) -> tuple[Path, str]:
    try:
        store, key = split_uri(uri)
    except StoreError as exc:
        raise SourceError(f"{what} {uri}: {exc}") from None
    manifest = read_manifest(store, key)
    if manifest is not None and isinstance(manifest.get("files"), dict):
        names = [n for n in manifest["files"] if "/" not in n]
    else:
        names = [k[len(key) + 1 :] for k in store.list(f"{key}/")]
        names = [n for n in names if "/" not in n and n != MANIFEST]
    names = [n for n in names if not n.endswith(_OTHER_WEIGHTS)]
    if not any(n.endswith(".safetensors") for n in names):
        raise SourceError(f"{what} {uri}: no *.safetensors files under it")
    folder = cache / hashlib.sha256(uri.encode()).hexdigest()[:16]
    folder.mkdir(parents=True, exist_ok=True)
    shas = {}
    for name in names:
        try:
            shas[name] = store.get_file(f"{key}/{name}", folder / name)
        except StoreNotFoundError:
            raise SourceError(f"{what} {uri}: {name} is listed but missing") from None
    return folder, weights_digest(shas)


def _fetch_from_hub(repo_id: str, cache: Path, what: str) -> tuple[Path, str]:
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    hint = (
        f"download it where a network exists (`hf download {repo_id} --local-dir DIR`) "
        "and pass the folder instead"
    )
    if offline:
        raise SourceError(
            f"{what} {repo_id!r} looks like a Hugging Face repo id, but the Hub is off "
            f"(HF_HUB_OFFLINE is set): {hint}"
        )
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - a dependency of transformers
        raise SourceError(f"{what} {repo_id!r}: huggingface_hub is not installed; {hint}") from None
    folder = cache / ("hub-" + repo_id.replace("/", "--"))
    try:
        snapshot_download(
            repo_id,
            local_dir=folder,
            allow_patterns=["*.safetensors", "*.json", "*.jinja", "tokenizer*", "*.model"],
        )
    except Exception as exc:
        raise SourceError(
            f"{what} {repo_id!r}: cannot download it from the Hugging Face Hub "
            f"({type(exc).__name__}: {str(exc)[:200]}); {hint}"
        ) from None
    return folder, folder_weights_digest(folder)


__all__ = [
    "SourceError",
    "fetch_model_folder",
    "folder_weights_digest",
    "is_uri",
    "local_path",
    "model_files",
    "split_uri",
    "weights_digest",
]

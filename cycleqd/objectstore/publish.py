"""Model folders in a store, visible only once complete: `publish_model` uploads the files
first and the manifest (`cycleqd-manifest.json`: sha256 and size of every file) last;
`model_is_complete` is true only when that manifest exists and names files that are there."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from cycleqd.objectstore.base import ObjectStore, ProgressCallback
from cycleqd.objectstore.errors import (
    InvalidKeyError,
    StoreError,
    StoreIntegrityError,
    StoreNotFoundError,
)
from cycleqd.objectstore.keys import check_key
from cycleqd.weights import MANIFEST


def publish_model(
    store: ObjectStore,
    prefix: str,
    files: Mapping[str, str | Path],
    metadata: Mapping[str, object] | None = None,
    progress: ProgressCallback | None = None,
) -> dict:
    """Upload a model folder; it becomes visible (manifest written) only once all files are in.

    An existing manifest is removed first, so that re-publishing over a model never leaves
    the old manifest vouching for a mixture of old and new files. Returns the manifest.
    """
    prefix = check_key(prefix.strip("/"), what="model prefix")
    if not files:
        raise StoreError(f"publish_model({prefix!r}): no files to publish")
    for name, path in files.items():
        check_key(name, what="file name")
        if name == MANIFEST:
            raise StoreError(f"publish_model: {MANIFEST} is written by publish_model itself")
        if not Path(path).is_file():
            raise StoreError(f"publish_model({prefix!r}): {name} -> {path} is not a file")
    try:
        json.dumps(dict(metadata or {}))
    except (TypeError, ValueError) as exc:
        raise StoreError(f"publish_model({prefix!r}): metadata is not JSON: {exc}") from None
    store.delete(f"{prefix}/{MANIFEST}")  # invisible from here until the new manifest is in
    for key in store.list(f"{prefix}/"):
        if key[len(prefix) + 1 :] not in files:
            store.delete(key)  # a leftover of an earlier version of this folder
    shas, sizes = {}, {}
    for name in sorted(files):
        path = Path(files[name])
        sizes[name] = path.stat().st_size
        shas[name] = store.put_file(f"{prefix}/{name}", path, progress=progress)
    manifest = {**(metadata or {}), "files": shas, "sizes": sizes}
    store.put_bytes(f"{prefix}/{MANIFEST}", json.dumps(manifest, indent=1).encode())
    return manifest


def read_manifest(store: ObjectStore, prefix: str) -> dict | None:
    """The model folder's manifest; None if the folder is not (yet) published or the manifest
    is unreadable (corrupted: the folder counts as unpublished and is published again)."""
    prefix = check_key(prefix.strip("/"), what="model prefix")
    try:
        manifest = json.loads(store.get_bytes(f"{prefix}/{MANIFEST}"))
    except StoreNotFoundError:
        return None
    except (StoreIntegrityError, ValueError, RecursionError):
        return None
    return manifest if isinstance(manifest, dict) else None


def model_is_complete(store: ObjectStore, prefix: str) -> bool:
    """True when the manifest exists and every file it names is there with its size and sha."""
    manifest = read_manifest(store, prefix)
    if manifest is None or not isinstance(manifest.get("files"), dict) or not manifest["files"]:
        return False
    prefix = prefix.strip("/")
    sizes = manifest.get("sizes") or {}
    if not isinstance(sizes, dict):
        return False
    for name, sha in manifest["files"].items():
        if not isinstance(sha, str):
            return False
        try:
            info = store.stat(f"{prefix}/{name}")
        except (StoreNotFoundError, InvalidKeyError):
            return False
        if name in sizes and info.size != sizes[name]:
            return False
        if info.sha256 is not None and info.sha256 != sha:
            return False
    return True


def copy_folder_to_store(folder: str | Path, store: ObjectStore, prefix: str, **kwargs) -> dict:
    """Publish every file directly inside a local model folder (convenience for publish_model)."""
    folder = Path(folder)
    files = {p.name: p for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}
    return publish_model(store, prefix, files, **kwargs)

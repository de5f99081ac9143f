"""Where a campaign's base and experts are read from: a local folder (for example a volume
mounted in the pod), a `file://` URI, or `s3://bucket/prefix`.

    source = ModelSource("s3://models/llama-3-8b", "base model")
    source.genome_source      # what the base/expert genome hashes: its id never needs a read
    source.weights()          # opened on first use (SafetensorsFolder interface)
    source.local_folder()     # a local folder (S3: this pod's cached copy), e.g. for vLLM
    source.side_files()       # config.json, tokenizer files, chat template (for export)
    check_models(config.models)   # preflight: headers and config.json only

A model on S3 is copied once per pod into a local cache (`$CYCLEQD_MODEL_CACHE`, default
`~/.cache/cycleqd/models`) and read from there memory-mapped, as local folders are. Measured
(`benchmarks/model_sources.py`, 127M-parameter base + 3 experts): reading tensor by tensor
with ranged GETs (`RemoteSafetensors`) pays the transfer for every child (5.6 s per child,
38x local folders); the copy costs 10 s once, then children build at local speed, so it wins
from a pod's second child on, and the experts' stored factors and vLLM need local files
anyway. Ranged reads stay selectable: `CYCLEQD_MODEL_ACCESS=ranged`.

The cache: one folder per URI, filled into a temporary folder and renamed into place, under
an exclusive lock (two processes of a pod never fill one entry twice). Every file is checked
against the sha256 in the store's manifest (`cycleqd-manifest.json`, written by
`publish_model`), and a reused entry is hashed again once per process and compared with the
store's manifest as it is now, so a model re-published under the same URI is fetched again.
A folder uploaded without a manifest (`aws s3 cp --recursive`) is checked by size against
the store's listing instead (and by its objects' own sha256 where our store wrote them).

S3 endpoint and credentials are the rest of the project's (`cycleqd.objectstore.open_store`).
Nothing here imports torch: the CPU-only tasks import this module but never open a model.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urlparse

from cycleqd.errors import CycleQDError, MissingTensorError, ModelMismatchError
from cycleqd.objectstore import (
    ObjectStore,
    RemoteSafetensors,
    StoreError,
    StoreNotFoundError,
    open_store,
    read_manifest,
)
from cycleqd.redact import redact_uri
from cycleqd.weights import FACTORS_FILE, MANIFEST, SafetensorsFolder, check_compatible, sha256_file

CACHE_ENV = "CYCLEQD_MODEL_CACHE"
ACCESS_ENV = "CYCLEQD_MODEL_ACCESS"
ACCESS_MODES = ("copy", "ranged")
DEFAULT_ACCESS = "copy"  # chosen by benchmarks/model_sources.py
# What export copies beside the weights so that the folder loads with from_pretrained.
SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)
_RECORD = ".cycleqd-source.json"  # in a cache entry: where it came from, what was checked
_OTHER_WEIGHTS = (".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt", ".gguf", ".onnx")
_EXPECTED = (
    "expected a folder of *.safetensors files (Hugging Face layout, saved with "
    "save_pretrained(safe_serialization=True)) directly under it"
)


class ModelSourceError(CycleQDError):
    """A base or expert model cannot be read where the config says it is."""


class Weights(Protocol):
    """What SafetensorsFolder and RemoteSafetensors both offer."""

    folder: object

    def names(self) -> list[str]: ...
    def shapes(self) -> dict[str, tuple[int, ...]]: ...
    def config(self) -> dict: ...
    def get(self, name: str): ...


# -- locations -----------------------------------------------------------------------------------


def genome_source(location: str | Path) -> str:
    """The `source` of a base or expert genome (its id hashes it): for a local path the path
    as `Path` writes it (the ids of campaigns made before URIs were allowed stay the same),
    for a URI the URI without a trailing slash."""
    text = str(location).strip()
    if "://" in text:
        return text.rstrip("/")
    return str(Path(text))


def _local_path(location: str) -> Path | None:
    """The folder a plain path or file:// URI names; None for s3://; an error otherwise."""
    if "://" not in location:
        return Path(location).expanduser()
    parsed = urlparse(location)
    scheme = parsed.scheme.lower()
    if scheme == "file" and parsed.netloc in ("", "localhost"):
        return Path(unquote(parsed.path))
    if scheme == "s3":
        return None
    raise ModelSourceError(
        f"unsupported model location {redact_uri(location)!r}: use s3://bucket/prefix, "
        "file:///path or a folder path (a volume mounted in the pod)"
    )


def _split_s3(uri: str) -> tuple[ObjectStore, str]:
    """`s3://bucket/a/b` -> (store at s3://bucket/a, 'b'): a folder named by one key."""
    parsed = urlparse(uri)
    key = unquote(parsed.path).strip("/")
    if not parsed.netloc or not key:
        raise ModelSourceError(
            f"model location {redact_uri(uri)!r} names no folder: use s3://bucket/prefix"
        )
    parent, _, leaf = key.rpartition("/")
    return open_store(f"s3://{parsed.netloc}/{parent}" if parent else f"s3://{parsed.netloc}"), leaf


def _access_mode(access: str | None) -> str:
    mode = (access or os.environ.get(ACCESS_ENV, "") or DEFAULT_ACCESS).strip().lower()
    if mode not in ACCESS_MODES:
        raise ModelSourceError(
            f"{ACCESS_ENV}={mode!r}: use one of {', '.join(ACCESS_MODES)} (copy: one local copy "
            "per pod, read memory-mapped; ranged: tensor by tensor from S3)"
        )
    return mode


# -- one model -----------------------------------------------------------------------------------


class _Checked:
    """What `check_compatible` reads, named by the location the config gave (not a cache
    path), with config.json parsed once."""

    def __init__(self, location: str, weights: Weights):
        self.folder = redact_uri(location)
        self._shapes = weights.shapes()
        try:
            config = weights.config()
        except ValueError as exc:  # RemoteSafetensors: config.json that is not JSON
            raise ModelMismatchError(
                f"{self.folder}/config.json is not readable JSON ({exc})"
            ) from None
        if not isinstance(config, dict):
            raise ModelMismatchError(f"{self.folder}/config.json is not a JSON object")
        self._config = config

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return self._shapes

    def config(self) -> dict:
        return self._config


class ModelSource:
    """One base or expert location, opened on first use (construction reads nothing)."""

    def __init__(
        self,
        location: str | Path,
        what: str = "model",
        *,
        access: str | None = None,
        cache: ModelCache | None = None,
    ):
        """`what` names the model in messages ("base model", "expert 'coding'"); `access`:
        copy | ranged for s3:// models (default: $CYCLEQD_MODEL_ACCESS, else copy)."""
        self.location = str(location).strip()
        self.what = what
        self.genome_source = genome_source(self.location)
        self._local = _local_path(self.location)
        self._access = access
        self._cache = cache
        self._weights: Weights | None = None
        self._folder: Path | None = None

    @property
    def remote(self) -> bool:
        return self._local is None

    def __repr__(self) -> str:
        return f"ModelSource({redact_uri(self.location)!r}, {self.what!r})"

    def _shown(self) -> str:
        return f"{self.what} {redact_uri(self.genome_source)}"

    def weights(self) -> Weights:
        """The tensors, opened once: a local folder memory-mapped, an S3 folder from this
        pod's copy (or by ranged GETs with access 'ranged')."""
        if self._weights is None:
            if self.remote and _access_mode(self._access) == "ranged":
                self._weights = self._remote_headers()
            else:
                self._weights = self._open_local(self.local_folder())
        return self._weights

    def local_folder(self) -> Path:
        """A local folder holding the model: itself, or (S3) this pod's cached copy."""
        if self._folder is None:
            if self._local is not None:
                self._folder = self._local
            else:
                cache = self._cache or ModelCache()
                self._folder = cache.folder(self.genome_source, what=self.what)
        return self._folder

    def checked(self) -> _Checked:
        """Tensor names, shapes and config.json, for `check_compatible`. Reads only headers
        and config.json: an S3 model is not downloaded (ranged GETs), unless already open."""
        if self._weights is not None:
            weights = self._weights
        elif self.remote:
            weights = self._remote_headers()
        else:
            weights = self._open_local(self._local)
        try:
            return _Checked(self.location, weights)
        except StoreError as exc:  # RemoteSafetensors reading config.json
            raise self._unreadable(exc) from None

    def side_files(self, names: tuple[str, ...] = SIDE_FILES) -> dict[str, str]:
        """The files beside the weights that make a folder loadable (config, tokenizer, chat
        template), as text; absent ones are left out."""
        if self.remote and _access_mode(self._access) == "ranged":
            store, key = self._store()
            found = {}
            for name in names:
                try:
                    found[name] = store.get_bytes(f"{key}/{name}").decode()
                except StoreNotFoundError:
                    continue
                except StoreError as exc:
                    raise self._unreadable(exc) from None
            return found
        folder = self.local_folder()
        return {n: (folder / n).read_text() for n in names if (folder / n).is_file()}

    # -- internals -------------------------------------------------------------------------------

    def _open_local(self, folder: Path) -> SafetensorsFolder:
        if not folder.is_dir():
            raise MissingTensorError(f"{self._shown()}: no such folder; {_EXPECTED}")
        return SafetensorsFolder(folder)

    def _store(self) -> tuple[ObjectStore, str]:
        try:
            return _split_s3(self.genome_source)
        except StoreError as exc:
            raise self._unreadable(exc) from None

    def _unreadable(self, exc: BaseException) -> ModelSourceError:
        return ModelSourceError(f"cannot read the {self._shown()}: {exc}")

    def _remote_headers(self) -> RemoteSafetensors:
        store, key = self._store()
        try:
            keys = store.list(f"{key}/")
            if not any(_top_level_weights(k[len(key) + 1 :]) for k in keys):
                raise _missing(self._shown(), [k[len(key) + 1 :] for k in keys])
            return RemoteSafetensors(store, key)
        except StoreError as exc:
            raise self._unreadable(exc) from None


def _top_level_weights(name: str) -> bool:
    return name.endswith(".safetensors") and "/" not in name


def _missing(shown: str, found: list[str]) -> MissingTensorError:
    if not found:
        return MissingTensorError(f"{shown}: nothing there; {_EXPECTED}")
    listed = ", ".join(found[:5]) + (", ..." if len(found) > 5 else "")
    return MissingTensorError(f"{shown}: no *.safetensors files there ({listed}); {_EXPECTED}")


def _check(base: _Checked, experts: Mapping[str, _Checked]) -> None:
    check_compatible(base, experts)  # type: ignore[arg-type]  (reads folder/shapes/config)


def open_models(sources: Mapping[str, ModelSource], base: str) -> dict[str, Weights]:
    """Open every model (S3: copied into this pod's cache first) and check that each shares
    the base's tensors and shapes (`sources[base]` is the base); returns the opened weights
    by the same keys. ModelMismatchError names the location the config gave."""
    opened = {key: source.weights() for key, source in sources.items()}
    _check(
        sources[base].checked(),
        {source.what: source.checked() for key, source in sources.items() if key != base},
    )
    return opened


def check_models(models) -> dict[str, tuple[int, ...]]:
    """Preflight: the base and every expert given by location are there, readable, and share
    the base's tensors and shapes (`models`: the config's `models` section; experts the
    campaign fine-tunes are not there yet). Reads headers and config.json only (S3: ranged
    GETs; nothing is downloaded or written). Raises MissingTensorError, ModelSourceError
    (unreadable: credentials, endpoint) or ModelMismatchError, naming the model and its
    location. Returns the base's tensor shapes by name."""
    base = ModelSource(models.base, "base model")
    experts = {
        s: ModelSource(loc, f"expert {s!r}")
        for s, loc in models.experts.items()
        if isinstance(loc, str)
    }
    checked_base = base.checked()
    _check(checked_base, {e.what: e.checked() for e in experts.values()})
    return checked_base.shapes()


def local_folder(location: str | Path, what: str = "model") -> Path:
    """A local folder holding the model at `location` (S3: this pod's cached copy); for code
    that needs files on disk (vLLM, a tokenizer, from_pretrained)."""
    return ModelSource(location, what).local_folder()


# -- the per-pod cache ---------------------------------------------------------------------------


def cache_root() -> Path:
    """$CYCLEQD_MODEL_CACHE; else ~/.cache/cycleqd/models where the home folder is writable
    (pods often run with HOME=/ and a read-only root), else the temp folder."""
    configured = os.environ.get(CACHE_ENV, "").strip()
    if configured:
        return Path(configured).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    home = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    candidate = home / "cycleqd" / "models"
    try:
        candidate.mkdir(parents=True, exist_ok=True)
        if os.access(candidate, os.W_OK):
            return candidate
    except OSError:
        pass
    return Path(tempfile.gettempdir()) / f"cycleqd-models-{os.getuid()}"


# Entries hashed in this process, with the store's description they were checked against.
_verified: dict[Path, dict] = {}


class ModelCache:
    """Local copies of S3 model folders, one per URI (see the module's docstring)."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else cache_root()

    def entry(self, uri: str) -> Path:
        """The folder a URI is copied to: readable name, then a hash of the whole URI."""
        uri = genome_source(uri)
        leaf = re.sub(r"[^A-Za-z0-9._-]", "_", uri.rsplit("/", 1)[-1])[:60].lstrip(".") or "m"
        return self.root / f"{leaf}-{hashlib.sha256(uri.encode()).hexdigest()[:16]}"

    def folder(self, uri: str, what: str = "model") -> Path:
        """The local copy of the model folder at `uri`: reused when it matches the store,
        else (re)filled."""
        uri = genome_source(uri)
        shown = f"{what} {redact_uri(uri)}"
        try:
            store, key = _split_s3(uri)
            expected = _describe(store, key, shown)
            target = self.entry(uri)
            with _locked(target.with_name(target.name + ".lock")):
                if _verified.get(target) == expected or self._reusable(target, uri, expected):
                    _verified[target] = expected
                    return target
                self._fill(store, key, uri, expected, target, shown)
                _verified[target] = expected
                return target
        except StoreError as exc:
            raise ModelSourceError(f"cannot read the {shown}: {exc}") from None
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise ModelSourceError(
                    f"the model cache {self.root} ran out of space copying the {shown}: give it "
                    f"more room (the pipeline's model_cache_size) or point {CACHE_ENV} elsewhere"
                ) from None
            raise ModelSourceError(
                f"cannot copy the {shown} into the model cache {self.root}: {exc}; point "
                f"{CACHE_ENV} at a writable folder"
            ) from None

    def _reusable(self, target: Path, uri: str, expected: dict) -> bool:
        """The entry was filled from this URI as the store describes it now, and its bytes
        still have the sha256 recorded then (a manifest's, where there is one)."""
        try:
            record = json.loads((target / _RECORD).read_text())
        except (OSError, ValueError):
            return False
        if not isinstance(record, dict) or record.get("uri") != uri:
            return False
        if record.get("expected") != expected:
            return False
        local = record.get("sha256") or {}
        for name, info in expected["files"].items():
            path = target / name
            if not path.is_file() or path.stat().st_size != info["size"]:
                return False
            if sha256_file(path) != local.get(name):
                return False
        return True

    def _fill(
        self, store: ObjectStore, key: str, uri: str, expected: dict, target: Path, shown: str
    ) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        needed = sum(info["size"] for info in expected["files"].values())
        free = shutil.disk_usage(self.root).free
        if needed > free:
            raise ModelSourceError(
                f"the model cache {self.root} has {free / 1e9:.1f} GB free, the {shown} needs "
                f"{needed / 1e9:.1f} GB: give it more room (the pipeline's model_cache_size) or "
                f"point {CACHE_ENV} elsewhere"
            )
        for stale in self.root.glob(f".{target.name}.tmp-*"):  # a fill that died (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = self.root / f".{target.name}.tmp-{uuid.uuid4().hex[:12]}"
        try:
            shas = {}
            for name, info in sorted(expected["files"].items()):
                path = tmp / name
                shas[name] = store.get_file(f"{key}/{name}", path)
                size = path.stat().st_size
                if size != info["size"] or (info["sha256"] and shas[name] != info["sha256"]):
                    against = f"its {MANIFEST}" if expected["manifest"] else "the store's listing"
                    want = f"{info['size']} bytes, sha256 {(info['sha256'] or '?')[:16]}"
                    raise ModelSourceError(
                        f"the {shown}: {name} as downloaded does not match {against} ({size} "
                        f"bytes, sha256 {shas[name][:16]}...; expected {want}...); the folder "
                        "changed while it was read, or is corrupted: upload the model again"
                    )
            record = {"uri": uri, "expected": expected, "sha256": shas}
            (tmp / _RECORD).write_text(json.dumps(record, indent=1))
            if target.exists():  # stale: out of the way first, rename cannot replace a folder
                old = self.root / f".{target.name}.tmp-old-{uuid.uuid4().hex[:12]}"
                target.rename(old)
                shutil.rmtree(old, ignore_errors=True)
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _describe(store: ObjectStore, key: str, shown: str) -> dict:
    """The files to copy with their sizes and sha256 (None where unknown), from the folder's
    manifest, or (no manifest) from the listing: top-level files and the task vector's
    factors, never other weight formats."""
    manifest = read_manifest(store, key)
    if manifest is None and store.exists(f"{key}/{MANIFEST}"):
        raise ModelSourceError(
            f"the {shown}: its {MANIFEST} is unreadable (corrupted); publish the model again"
        )
    files: dict[str, dict] = {}
    if manifest is not None and isinstance(manifest.get("files"), dict):
        sizes = manifest.get("sizes") if isinstance(manifest.get("sizes"), dict) else {}
        for name, sha in manifest["files"].items():
            if not isinstance(name, str) or name.endswith(_OTHER_WEIGHTS):
                continue
            size = sizes.get(name)
            if not isinstance(size, int):
                size = store.stat(f"{key}/{name}").size
            files[name] = {"size": size, "sha256": sha if isinstance(sha, str) else None}
    else:
        manifest = None
        for full in store.list(f"{key}/"):
            name = full[len(key) + 1 :]
            if name.split("/")[-1].startswith(".") or name.endswith(_OTHER_WEIGHTS):
                continue
            if "/" in name and name != FACTORS_FILE:
                continue  # checkpoints and other subfolders: not the model
            info = store.stat(full)
            files[name] = {"size": info.size, "sha256": info.sha256}
    if not any(_top_level_weights(n) for n in files):
        raise _missing(shown, sorted(files))
    return {"manifest": manifest is not None, "files": files}


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock between processes (flock on `path`), released on exit or death."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


__all__ = [
    "ACCESS_ENV",
    "CACHE_ENV",
    "SIDE_FILES",
    "ModelCache",
    "ModelSource",
    "ModelSourceError",
    "cache_root",
    "check_models",
    "genome_source",
    "local_folder",
    "open_models",
]

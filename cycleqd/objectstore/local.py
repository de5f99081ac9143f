"""A store in a local folder: objects are files, written atomically (temporary file, then
rename), their sha256 kept in an extended attribute where the file system has them."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
from collections.abc import Callable
from pathlib import Path

from cycleqd.objectstore.base import (
    ObjectInfo,
    ObjectStore,
    ProgressCallback,
    check_range,
    integrity_error,
    sha256_of,
)
from cycleqd.objectstore.errors import StoreError, StoreNotFoundError, StorePreconditionError
from cycleqd.objectstore.keys import TMP_MARK, check_key, check_prefix, temp_sibling

_XATTR = "user.cycleqd.sha256"
_CHUNK = 1 << 22


class LocalObjectStore(ObjectStore):
    """Objects as files under `root`; every write goes to a temporary file, then os.replace."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().absolute()
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(f"{self.root} is not a folder; a local store needs a folder")

    @property
    def uri(self) -> str:
        return self.root.as_uri()

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*check_key(key).split("/"))

    def _where(self, key: str) -> str:
        return str(self.root.joinpath(*key.split("/")))

    def _write(self, key: str, fill: Callable[[object], str]) -> str:
        """Write through `fill(file) -> sha256` into a temp file, then rename onto the key."""
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise StoreError(
                f"cannot store {key!r} in {self.uri}: a part of its folder path is an object "
                "(a local store cannot hold both 'a' and 'a/b')"
            ) from None
        if path.is_dir():
            raise StoreError(f"{path} is a folder; cannot store an object under key {key!r}")
        tmp = temp_sibling(path)
        try:
            with tmp.open("wb") as f:
                sha = fill(f)
                f.flush()
                os.fsync(f.fileno())
            _set_xattr(tmp, sha)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return sha

    def put_bytes(self, key: str, data: bytes) -> str:
        data = bytes(data)

        def fill(f) -> str:
            f.write(data)
            return sha256_of(data)

        return self._write(key, fill)

    def put_file(self, key: str, path: str | Path, progress: ProgressCallback | None = None) -> str:
        source = Path(path)
        if not source.is_file():
            raise StoreError(f"cannot upload {source}: no such file")

        def fill(f) -> str:
            digest = hashlib.sha256()
            with source.open("rb") as src:
                while block := src.read(_CHUNK):
                    digest.update(block)
                    f.write(block)
                    if progress:
                        progress(len(block))
            return digest.hexdigest()

        return self._write(key, fill)

    def _open(self, key: str):
        path = self._path(key)
        try:
            return path.open("rb")
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise StoreNotFoundError(f"no object {key!r} in {self.uri}") from None

    def get_bytes(self, key: str, verify: bool = True) -> bytes:
        with self._open(key) as f:
            data = f.read()
            recorded = _get_xattr(f.fileno()) if verify else None
        if recorded is not None and sha256_of(data) != recorded:
            raise integrity_error(self._where(key), recorded, sha256_of(data))
        return data

    def get_file(self, key: str, path: str | Path, verify: bool = True) -> str:
        dest = Path(path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_sibling(dest)
        digest = hashlib.sha256()
        try:
            with self._open(key) as src, tmp.open("wb") as out:
                recorded = _get_xattr(src.fileno())
                while block := src.read(_CHUNK):
                    digest.update(block)
                    out.write(block)
            if verify and recorded is not None and digest.hexdigest() != recorded:
                raise integrity_error(self._where(key), recorded, digest.hexdigest())
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        return digest.hexdigest()

    def stat(self, key: str) -> ObjectInfo:
        with self._open(key) as f:
            return ObjectInfo(os.fstat(f.fileno()).st_size, _get_xattr(f.fileno()))

    def get_range(self, key: str, start: int, end: int) -> bytes:
        check_range(start, end)
        with self._open(key) as f:
            f.seek(start)
            return f.read(end - start)

    def list(self, prefix: str = "") -> list[str]:
        check_prefix(prefix)
        # Walk only the deepest folder the prefix names.
        folder = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        top = self.root.joinpath(*folder.split("/")) if folder else self.root
        keys = []
        if top.is_dir():
            for dirpath, _dirs, files in os.walk(top):
                rel = Path(dirpath).relative_to(self.root).as_posix()
                for name in files:
                    if TMP_MARK in name:
                        continue
                    key = name if rel == "." else f"{rel}/{name}"
                    if key.startswith(prefix):
                        keys.append(key)
        return sorted(keys)

    # -- compare-and-swap: conditional writes serialised by a lock on the store's folder --------

    def conditional_writes(self) -> bool:
        return True

    def get_versioned(self, key: str) -> tuple[bytes, str]:
        data = self.get_bytes(key, verify=False)
        return data, sha256_of(data)

    def put_if(self, key: str, data: bytes, version: str | None) -> str:
        """The version is the sha256 of the bytes. Every conditional writer of this store
        takes an exclusive flock on its root folder (processes on this machine, or on a file
        system with working flock), compares, then writes as `put_bytes` does."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                current: str | None = self.get_versioned(key)[1]
            except StoreNotFoundError:
                current = None
            if current != version:
                raise StorePreconditionError(
                    f"{self._where(key)} changed since it was read (another writer)"
                )
            return self.put_bytes(key, data)
        finally:
            os.close(fd)  # releases the lock

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink()
        except (FileNotFoundError, NotADirectoryError):
            return
        except IsADirectoryError:
            raise StoreError(f"{path} is a folder, not an object") from None
        # Remove folders left empty, up to (not including) the root.
        parent = path.parent
        while parent != self.root and self.root in parent.parents:
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent


def _set_xattr(path: Path, sha: str) -> None:
    # No xattrs on macOS/Windows and some file systems: the object is then not verified.
    with contextlib.suppress(AttributeError, OSError):
        os.setxattr(path, _XATTR, sha.encode())


def _get_xattr(fd: int) -> str | None:
    try:
        return os.getxattr(fd, _XATTR).decode()
    except (AttributeError, OSError, UnicodeDecodeError):  # none recorded, or no xattrs here
        return None

"""The object-store interface (`ObjectStore`) and what its implementations share: the object
info, byte-range checks and the integrity check of stored bytes against their sha256."""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cycleqd.objectstore.errors import (
    InvalidKeyError,
    StoreError,
    StoreIntegrityError,
    StoreNotFoundError,
)

MiB = 1 << 20

ProgressCallback = Callable[[int], None]


@dataclass(frozen=True)
class ObjectInfo:
    size: int
    sha256: str | None  # recorded when the object was written; None if written by another tool


class ObjectStore(ABC):
    """Objects under relative keys. Writes of one key are atomic: readers see old or new."""

    @property
    @abstractmethod
    def uri(self) -> str: ...

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> str:
        """Store `data` under `key`; returns its sha256."""

    @abstractmethod
    def get_bytes(self, key: str, verify: bool = True) -> bytes:
        """The object's bytes; with `verify`, check them against the recorded sha256."""

    @abstractmethod
    def stat(self, key: str) -> ObjectInfo:
        """Size and recorded sha256; StoreNotFoundError if there is no such object."""

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Sorted keys that start with `prefix` (a plain string prefix, as in S3)."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object; no error if it does not exist."""

    @abstractmethod
    def put_file(self, key: str, path: str | Path, progress: ProgressCallback | None = None) -> str:
        """Upload a local file (S3: multipart, parts in parallel); returns its sha256."""

    @abstractmethod
    def get_file(self, key: str, path: str | Path, verify: bool = True) -> str:
        """Download to a local file (written atomically); returns its sha256."""

    @abstractmethod
    def get_range(self, key: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of the object (fewer if it ends before `end`)."""

    # -- compare-and-swap ----------------------------------------------------------------------

    def conditional_writes(self) -> bool:
        """Whether `put_if` is a real compare-and-swap here."""
        return False

    def get_versioned(self, key: str) -> tuple[bytes, str]:
        """The object's bytes and the version that `put_if` compares against."""
        raise NotImplementedError(f"{type(self).__name__} has no conditional writes")

    def put_if(self, key: str, data: bytes, version: str | None) -> str:
        """Store `data` under `key` only if the object is still at `version` (None: only if
        there is none), atomically; returns the new version. StorePreconditionError when
        another writer got there first."""
        raise NotImplementedError(f"{type(self).__name__} has no conditional writes")

    def exists(self, key: str) -> bool:
        try:
            self.stat(key)
        except StoreNotFoundError:
            return False
        return True

    def size(self, key: str) -> int:
        return self.stat(key).size

    def delete_prefix(self, prefix: str) -> int:
        """Delete every key under `prefix` (which must name a folder: end with '/')."""
        if not prefix.endswith("/"):
            raise InvalidKeyError(f"delete_prefix({prefix!r}): the prefix must end with '/'")
        keys = self.list(prefix)
        for key in keys:
            self.delete(key)
        return len(keys)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"


def check_range(start: int, end: int) -> None:
    """Refuse a byte range [start, end) that is not one (negative, reversed, not ints)."""
    if not (isinstance(start, int) and isinstance(end, int)) or start < 0 or end < start:
        raise StoreError(f"invalid byte range [{start}, {end}): need 0 <= start <= end")


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def integrity_error(where: str, recorded: str, actual: str) -> StoreIntegrityError:
    """The error for an object at `where` whose bytes no longer have the recorded sha256."""
    return StoreIntegrityError(
        f"{where} is corrupted: its bytes have sha256 {actual[:16]}..., but {recorded[:16]}... "
        "was recorded when it was written; rewrite it from its source (or delete it)"
    )

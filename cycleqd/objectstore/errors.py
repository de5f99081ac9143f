"""The object store's errors: one `StoreError` family, each saying what to check."""

from __future__ import annotations

from cycleqd.errors import CycleQDError


class StoreError(CycleQDError):
    """The object store failed; the message says what to check.

    `transient` is true where trying again later may succeed (endpoint away, 5xx, throttling).
    """

    transient = False


class InvalidKeyError(StoreError, ValueError):
    """A key is not a plain relative path below the store's root."""


class StoreNotFoundError(StoreError):
    """No object under that key."""


class StoreRangeError(StoreError):
    """A byte range starts at or beyond the end of the object."""


class StoreIntegrityError(StoreError):
    """An object's bytes do not match the sha256 recorded when it was written."""


class StoreAuthError(StoreError):
    """The S3 service rejected the credentials (or they are missing)."""


class StoreBucketMissingError(StoreError):
    """The bucket does not exist at the endpoint."""


class StoreUnreachableError(StoreError):
    """The S3 endpoint cannot be reached (refused, timed out, DNS)."""

    transient = True


class StorePreconditionError(StoreError):
    """A conditional write found the object changed (or created) since it was read."""

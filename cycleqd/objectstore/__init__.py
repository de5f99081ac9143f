"""One object-store interface over a local folder and S3 (boto3).

Keys are relative, '/'-separated paths below the store's root (a folder, or a bucket and a
prefix). Every object carries the sha256 of its bytes (S3: object metadata `sha256`; local
folder: the extended attribute `user.cycleqd.sha256` where the file system has them), and
`get_bytes`/`get_file` verify it.

A model folder becomes visible only once all of its files are stored: `publish_model`
uploads the files first and writes `cycleqd-manifest.json` (sha256 and size of every file)
last; `model_is_complete` is true only when that manifest exists and names files that are
there. `RemoteSafetensors` reads safetensors files tensor by tensor with ranged GETs, behind
the same names/specs/get interface as `cycleqd.weights.SafetensorsFolder`.

URIs: `open_store("s3://bucket/prefix")` (endpoint from `CYCLEQD_S3_ENDPOINT` or
`AWS_ENDPOINT_URL`; credentials from the AWS environment variables or from a mounted
Kubernetes secret folder named by `CYCLEQD_S3_SECRET_DIR`), `open_store("file:///path")`
or `open_store("/path")`.

The modules, one concern each: `errors`, `keys` (what a key may be), `base` (the
`ObjectStore` interface), `local` and `s3` (the two stores), `credentials` (S3 endpoint and
credentials), `uri` (`open_store`), `publish` (model folders) and `remote_safetensors`.
Import from this package; the modules are its layout, not its interface.
"""

from cycleqd.objectstore.base import ObjectInfo, ObjectStore, ProgressCallback
from cycleqd.objectstore.credentials import SECRET_DIR_ENV, endpoint_from_env
from cycleqd.objectstore.errors import (
    InvalidKeyError,
    StoreAuthError,
    StoreBucketMissingError,
    StoreError,
    StoreIntegrityError,
    StoreNotFoundError,
    StorePreconditionError,
    StoreRangeError,
    StoreUnreachableError,
)
from cycleqd.objectstore.keys import check_key, check_prefix
from cycleqd.objectstore.local import LocalObjectStore
from cycleqd.objectstore.publish import (
    copy_folder_to_store,
    model_is_complete,
    publish_model,
    read_manifest,
)
from cycleqd.objectstore.remote_safetensors import RemoteSafetensors
from cycleqd.objectstore.s3 import S3ObjectStore
from cycleqd.objectstore.uri import open_store

__all__ = [
    "SECRET_DIR_ENV",
    "InvalidKeyError",
    "LocalObjectStore",
    "ObjectInfo",
    "ObjectStore",
    "ProgressCallback",
    "RemoteSafetensors",
    "S3ObjectStore",
    "StoreAuthError",
    "StoreBucketMissingError",
    "StoreError",
    "StoreIntegrityError",
    "StoreNotFoundError",
    "StorePreconditionError",
    "StoreRangeError",
    "StoreUnreachableError",
    "check_key",
    "check_prefix",
    "copy_folder_to_store",
    "endpoint_from_env",
    "model_is_complete",
    "open_store",
    "publish_model",
    "read_manifest",
]

"""The object store against a local folder and a real S3 server (SeaweedFS, `weed mini`).

One behaviour suite runs over both LocalObjectStore and S3ObjectStore; then S3 specifics:
credentials, a missing bucket, a dead or hung endpoint, and a server killed during the
multipart upload of a model published with publish_model.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cycleqd.errors import MissingTensorError
from cycleqd.objectstore import (
    InvalidKeyError,
    LocalObjectStore,
    RemoteSafetensors,
    S3ObjectStore,
    StoreAuthError,
    StoreBucketMissingError,
    StoreError,
    StoreIntegrityError,
    StoreNotFoundError,
    StoreUnreachableError,
    model_is_complete,
    open_store,
    publish_model,
    read_manifest,
)
from cycleqd.weights import MANIFEST, SafetensorsFolder

MiB = 1 << 20


def s3_store(server, prefix: str | None = None, bucket: str | None = None, **options):
    settings = {
        "access_key_id": server.access_key,
        "secret_access_key": server.secret_key,
        "part_size": 5 * MiB,
        "max_concurrency": 4,
        "connect_timeout": 2,
        "read_timeout": 10,
        "max_attempts": 3,
    }
    settings.update(options)
    store = S3ObjectStore(
        bucket or server.bucket, prefix or f"t/{uuid.uuid4().hex[:10]}", server.endpoint, **settings
    )
    store.test_server = server  # for tests that go behind the store's back
    return store


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalObjectStore(tmp_path / "store")
    return s3_store(request.getfixturevalue("seaweed"))


def corrupt(store, key: str, data: bytes) -> None:
    """Change an object's bytes behind the store's back, keeping its recorded sha256."""
    if isinstance(store, LocalObjectStore):
        with (store.root / key).open("r+b") as f:  # in place: the xattr stays
            f.write(data)
        return
    client = store.test_server.client()
    full = f"{store.prefix}/{key}"
    meta = client.head_object(Bucket=store.bucket, Key=full)["Metadata"]
    client.put_object(Bucket=store.bucket, Key=full, Body=data, Metadata=meta)


def can_verify_local(tmp_path: Path) -> bool:
    probe = tmp_path / "xattr-probe"
    probe.write_bytes(b"")
    try:
        os.setxattr(probe, "user.cycleqd.probe", b"1")
    except (AttributeError, OSError):
        return False
    return True


# -- the behaviour suite, over both stores -------------------------------------------------------


def test_round_trip(store):
    assert not store.exists("a/b.json")
    sha = store.put_bytes("a/b.json", b'{"x": 1}')
    assert sha == hashlib.sha256(b'{"x": 1}').hexdigest()
    assert store.exists("a/b.json")
    assert store.get_bytes("a/b.json") == b'{"x": 1}'
    assert store.size("a/b.json") == 8
    store.put_bytes("a/b.json", b"new")  # overwrite
    assert store.get_bytes("a/b.json") == b"new"
    store.put_bytes("empty", b"")
    assert store.get_bytes("empty") == b"" and store.size("empty") == 0
    with pytest.raises(StoreNotFoundError, match="no object"):
        store.get_bytes("a/missing")
    with pytest.raises(StoreNotFoundError):
        store.size("missing")
    assert store.uri.startswith("s3://" if isinstance(store, S3ObjectStore) else "file://")


def test_list_and_delete(store):
    for key in ["m/2/x", "m/1/b", "m/1/a", "m/10", "n/z", "top"]:
        store.put_bytes(key, key.encode())
    assert store.list() == ["m/1/a", "m/1/b", "m/10", "m/2/x", "n/z", "top"]
    assert store.list("m/1/") == ["m/1/a", "m/1/b"]
    assert store.list("m/1") == ["m/1/a", "m/1/b", "m/10"]  # a plain string prefix, as in S3
    assert store.list("nothing/") == []
    store.delete("m/1/a")
    store.delete("m/1/a")  # deleting what is gone is fine
    assert store.list("m/") == ["m/1/b", "m/10", "m/2/x"]
    assert store.delete_prefix("m/") == 3
    assert store.list() == ["n/z", "top"]
    if isinstance(store, LocalObjectStore):
        assert sorted(p.name for p in store.root.iterdir()) == ["n", "top"]  # no empty folders


def test_ranged_reads(store):
    data = bytes(range(256)) * 4
    store.put_bytes("r", data)
    assert store.get_range("r", 0, 8) == data[:8]
    assert store.get_range("r", 100, 357) == data[100:357]
    assert store.get_range("r", 10, 10) == b""
    assert store.get_range("r", 1000, 2000) == data[1000:]  # cut at the end
    assert store.get_range("r", 1024, 1030) == b""
    with pytest.raises(StoreError, match="invalid byte range"):
        store.get_range("r", 5, 4)
    with pytest.raises(StoreNotFoundError):
        store.get_range("missing", 0, 4)


def test_put_file_multipart(store, tmp_path):
    size = 17 * MiB + 12345  # four 5 MiB parts and a tail
    path = tmp_path / "big.bin"
    data = os.urandom(size)
    path.write_bytes(data)
    seen = []
    sha = store.put_file("models/big.bin", path, progress=seen.append)
    assert sha == hashlib.sha256(data).hexdigest()
    assert sum(seen) == size
    assert store.size("models/big.bin") == size
    assert store.stat("models/big.bin").sha256 in (sha, None)
    boundary = 5 * MiB
    assert (
        store.get_range("models/big.bin", boundary - 7, boundary + 9)
        == data[boundary - 7 : boundary + 9]
    )
    assert store.get_file("models/big.bin", tmp_path / "back.bin") == sha
    assert (tmp_path / "back.bin").read_bytes() == data
    if isinstance(store, S3ObjectStore):
        client = store.test_server.client()
        head = client.head_object(Bucket=store.bucket, Key=f"{store.prefix}/models/big.bin")
        assert head["ETag"].strip('"').endswith("-4")  # really uploaded in 4 parts
        assert head["Metadata"]["sha256"] == sha


def test_sha256_detects_corruption(store, tmp_path):
    if isinstance(store, LocalObjectStore) and not can_verify_local(tmp_path):
        pytest.skip("this file system has no user xattrs: local objects are not verified")
    store.put_bytes("state/LATEST", b"12\n")
    corrupt(store, "state/LATEST", b"99\n")
    with pytest.raises(StoreIntegrityError, match="corrupted"):
        store.get_bytes("state/LATEST")
    assert store.get_bytes("state/LATEST", verify=False) == b"99\n"
    with pytest.raises(StoreIntegrityError):
        store.get_file("state/LATEST", tmp_path / "latest")
    assert not (tmp_path / "latest").exists()
    assert not any("cycleqd-tmp" in p.name for p in tmp_path.iterdir())
    # An object written by another tool carries no sha256: it is read unverified.
    if isinstance(store, S3ObjectStore):
        client = store.test_server.client()
        client.put_object(Bucket=store.bucket, Key=f"{store.prefix}/foreign", Body=b"hi")
        assert store.stat("foreign").sha256 is None
        assert store.get_bytes("foreign") == b"hi"


def _write_safetensors(path: Path) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    tensors = {
        "model.embed_tokens.weight": torch.randn(64, 16, generator=g),
        "model.layers.0.mlp.up_proj.weight": torch.randn(32, 16, generator=g).to(torch.bfloat16),
        "model.layers.0.input_layernorm.weight": torch.rand(16, generator=g).half(),
        "model.rotary.inv_freq": torch.arange(8, dtype=torch.int64),
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0, 4),
    }
    save_file(tensors, str(path), metadata={"format": "pt"})
    return tensors


class CountingStore:
    """Wraps a store and counts ranged GETs."""

    def __init__(self, inner):
        self.inner, self.ranges = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def get_range(self, key, start, end):
        self.ranges.append((key, start, end))
        return self.inner.get_range(key, start, end)


def test_remote_safetensors_reads_tensor_by_tensor(store, tmp_path):
    path = tmp_path / "model.safetensors"
    _write_safetensors(path)
    store.put_file("models/m/model.safetensors", path)
    counting = CountingStore(store)
    remote = RemoteSafetensors(counting, "models/m/model.safetensors")
    assert len(counting.ranges) == 1  # the header: one ranged GET
    local = SafetensorsFolder(tmp_path)
    assert remote.names() == local.names()
    assert remote.specs() == local.specs()
    assert remote.metadata() == {"format": "pt"}
    with safe_open(str(path), framework="pt") as reference:
        for i, name in enumerate(remote.names(), start=1):
            tensor = remote.get(name)
            expected = reference.get_tensor(name)
            assert tensor.dtype == expected.dtype and tensor.shape == expected.shape
            assert torch.equal(tensor, expected), name
            if expected.numel():
                assert counting.ranges[-1][0] == "models/m/model.safetensors"
            assert len(counting.ranges) <= 1 + i  # one GET per tensor, none for empty ones
        before = len(counting.ranges)
        fetched = remote.prefetch(remote.names(), max_workers=4)
        assert set(fetched) == set(remote.names())
        for name in remote.names():
            assert torch.equal(remote.get(name), reference.get_tensor(name))
        assert len(counting.ranges) == before + 5  # prefetched: get() costs nothing more
    with pytest.raises(MissingTensorError, match="'nope' is missing"):
        remote.get("nope")


def test_remote_safetensors_folder_and_long_header(store, tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    g = torch.Generator().manual_seed(1)
    save_file({"a.weight": torch.randn(4, 4, generator=g)}, str(folder / "model-1.safetensors"))
    save_file({"b.weight": torch.randn(3, generator=g)}, str(folder / "model-2.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 4}))
    publish_model(store, "models/folder", {p.name: p for p in folder.iterdir()})
    counting = CountingStore(store)
    remote = RemoteSafetensors(counting, "models/folder", header_probe=16)  # header > probe
    assert len(counting.ranges) == 4  # two GETs per header
    local = SafetensorsFolder(folder)
    assert remote.names() == local.names() == ["a.weight", "b.weight"]
    for name in local.names():
        assert torch.equal(remote.get(name), local.get(name))
    assert remote.config() == local.config()


def test_key_escape_rejected(store, tmp_path):
    bad = [
        "../x",
        "a/../../x",
        "a/./b",
        "/etc/passwd",
        "a\\..\\b",
        "a//b",
        "a/",
        "",
        "a\x00b",
        "a\nb",
        "x\x7f",
    ]
    for key in bad:
        for call in (
            lambda k: store.put_bytes(k, b"x"),
            lambda k: store.get_bytes(k),
            lambda k: store.exists(k),
            lambda k: store.delete(k),
            lambda k: store.get_range(k, 0, 1),
            lambda k: store.put_file(k, __file__),
        ):
            with pytest.raises(InvalidKeyError, match="invalid store key"):
                call(key)
    with pytest.raises(InvalidKeyError):
        store.list("../")
    with pytest.raises(InvalidKeyError):
        publish_model(store, "../evil", {"f": __file__})
    with pytest.raises(InvalidKeyError):
        publish_model(store, "ok", {"../f": __file__})
    assert store.list() == []
    if isinstance(store, LocalObjectStore):
        assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written anywhere


class FailingStore(CountingStore):
    """Fails the n-th put_file, as a lost connection would."""

    def __init__(self, inner, fail_on_put: int):
        super().__init__(inner)
        self.fail_on_put, self.puts = fail_on_put, 0

    def put_file(self, key, path, progress=None):
        self.puts += 1
        if self.puts == self.fail_on_put:
            raise StoreUnreachableError("injected failure")
        return self.inner.put_file(key, path, progress=progress)


def test_publish_model_visible_only_when_complete(store, tmp_path):
    weights, config = tmp_path / "model.safetensors", tmp_path / "config.json"
    weights.write_bytes(os.urandom(3000))
    config.write_text("{}")
    assert not model_is_complete(store, "models/g1")
    manifest = publish_model(
        store, "models/g1", {"model.safetensors": weights, "config.json": config}, {"genome": "g1"}
    )
    assert model_is_complete(store, "models/g1")
    assert read_manifest(store, "models/g1") == manifest
    assert manifest["genome"] == "g1"
    assert (
        manifest["files"]["model.safetensors"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    )
    assert store.list("models/g1/") == [
        "models/g1/config.json",
        f"models/g1/{MANIFEST}",
        "models/g1/model.safetensors",
    ]

    # A missing local file is reported before anything in the store changes.
    with pytest.raises(StoreError, match="not a file"):
        publish_model(store, "models/g1", {"a.safetensors": tmp_path / "missing"})
    assert model_is_complete(store, "models/g1")
    # A failure half-way through a re-publish: the old manifest is gone, nothing half-visible.
    failing = FailingStore(store, fail_on_put=2)
    files = {"a.safetensors": weights, "b.safetensors": weights}
    with pytest.raises(StoreError, match="injected"):
        publish_model(failing, "models/g1", files)
    assert store.exists("models/g1/a.safetensors")
    assert not model_is_complete(store, "models/g1")
    # Re-publishing succeeds and removes files of the earlier version.
    publish_model(store, "models/g1", {"model.safetensors": weights})
    assert model_is_complete(store, "models/g1")
    assert store.list("models/g1/") == [f"models/g1/{MANIFEST}", "models/g1/model.safetensors"]
    # A file that vanishes after publishing makes the model incomplete again.
    store.delete("models/g1/model.safetensors")
    assert not model_is_complete(store, "models/g1")


# -- opening stores by URI and credentials -------------------------------------------------------


def test_open_store_local(tmp_path):
    assert isinstance(open_store(str(tmp_path)), LocalObjectStore)
    store = open_store(tmp_path.as_uri())
    assert isinstance(store, LocalObjectStore) and store.root == tmp_path
    assert open_store(store.uri).root == tmp_path
    with pytest.raises(StoreError, match="unsupported store URI"):
        open_store("gs://bucket/x")
    with pytest.raises(StoreError, match="invalid S3 bucket name"):
        open_store("s3://Bad_Bucket/x")


def test_open_store_s3_with_secret_folder(seaweed, tmp_path, monkeypatch):
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "AWS_ACCESS_KEY_ID").write_text(seaweed.access_key + "\n")
    (secret / "AWS_SECRET_ACCESS_KEY").write_text(seaweed.secret_key + "\n")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CYCLEQD_S3_SECRET_DIR", str(secret))
    monkeypatch.setenv("CYCLEQD_S3_ENDPOINT", seaweed.endpoint)
    store = open_store(f"s3://{seaweed.bucket}/campaigns/c1")
    assert isinstance(store, S3ObjectStore) and store.uri == f"s3://{seaweed.bucket}/campaigns/c1"
    store.put_bytes("config.yaml", b"name: c1\n")
    assert store.get_bytes("config.yaml") == b"name: c1\n"
    assert seaweed.secret_key not in repr(store)

    # The standard environment variables work too.
    monkeypatch.delenv("CYCLEQD_S3_SECRET_DIR")
    monkeypatch.delenv("CYCLEQD_S3_ENDPOINT")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweed.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweed.secret_key)
    monkeypatch.setenv("AWS_ENDPOINT_URL", seaweed.endpoint)
    assert open_store(f"s3://{seaweed.bucket}/campaigns/c1").list() == ["config.yaml"]

    # A secret folder without the secret key says which file is missing.
    (secret / "AWS_SECRET_ACCESS_KEY").unlink()
    monkeypatch.setenv("CYCLEQD_S3_SECRET_DIR", str(secret))
    with pytest.raises(StoreAuthError, match="AWS_SECRET_ACCESS_KEY"):
        open_store(f"s3://{seaweed.bucket}/x")


# -- S3 errors a person can act on ---------------------------------------------------------------


def test_wrong_credentials(seaweed, tmp_path, monkeypatch):
    wrong_secret = "not-the-secret-" + uuid.uuid4().hex
    store = s3_store(seaweed, secret_access_key=wrong_secret)
    calls = [
        lambda: store.put_bytes("x", b"1"),
        lambda: store.get_bytes("x"),
        lambda: store.exists("x"),
        lambda: store.list(),
    ]
    for call in calls:
        with pytest.raises(StoreAuthError) as info:
            call()
        message = str(info.value)
        assert "check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or the secret" in message
        assert wrong_secret not in message and wrong_secret not in repr(info.value)
    assert wrong_secret not in repr(store) and wrong_secret not in str(vars(store))
    # From a mounted secret folder: the message names where the credentials came from.
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "AWS_ACCESS_KEY_ID").write_text(seaweed.access_key)
    (secret / "AWS_SECRET_ACCESS_KEY").write_text(wrong_secret)
    monkeypatch.setenv("CYCLEQD_S3_SECRET_DIR", str(secret))
    store = S3ObjectStore(seaweed.bucket, "p", seaweed.endpoint, max_attempts=1)
    with pytest.raises(StoreAuthError, match="CYCLEQD_S3_SECRET_DIR") as info:
        store.get_bytes("x")
    assert wrong_secret not in str(info.value)


def test_missing_bucket(seaweed):
    bucket = "no-such-bucket-" + uuid.uuid4().hex[:8]
    for call in (
        lambda store: store.put_bytes("x", b"1"),
        lambda store: store.exists("x"),
        lambda store: store.list(),
        lambda store: store.get_range("x", 0, 8),
    ):
        store = s3_store(seaweed, prefix="p", bucket=bucket)
        with pytest.raises(StoreBucketMissingError) as info:
            call(store)
        message = str(info.value)
        assert f"bucket {store.bucket!r} does not exist at {seaweed.endpoint}; create it" in message
    names = {b["Name"] for b in seaweed.client().list_buckets()["Buckets"]}
    assert bucket not in names  # and nothing created it behind our back


def test_dead_endpoint_fails_fast():
    with socket.socket() as s:  # a port with nothing listening: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    store = S3ObjectStore(
        "bucket",
        "p",
        endpoint,
        access_key_id="k",
        secret_access_key="s3cr3t-value",
        connect_timeout=1,
        read_timeout=1,
        max_attempts=2,
    )
    started = time.monotonic()
    with pytest.raises(StoreUnreachableError, match=f"cannot reach S3 endpoint {endpoint}") as info:
        store.get_bytes("x")
    assert time.monotonic() - started < 5
    assert "s3cr3t-value" not in str(info.value)


def test_hung_endpoint_times_out():
    listener = socket.socket()  # accepts connections (backlog) but never answers
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    try:
        endpoint = f"http://127.0.0.1:{listener.getsockname()[1]}"
        store = S3ObjectStore(
            "bucket",
            "p",
            endpoint,
            access_key_id="k",
            secret_access_key="s",
            connect_timeout=1,
            read_timeout=0.5,
            max_attempts=1,
        )
        started = time.monotonic()
        with pytest.raises(StoreUnreachableError, match="cannot reach"):
            store.list()
        assert time.monotonic() - started < 5
    finally:
        listener.close()


# -- fault: the server dies during a multipart upload --------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("restart", ["during-upload", "after-failure"])
def test_server_killed_during_publish(seaweed, tmp_path, restart):
    """Kill SeaweedFS (SIGKILL) a third of the way into a model's multipart upload and start it
    again on the same data folder and port: the model is complete or invisible, never half."""
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(os.urandom(24 * MiB))
    config = tmp_path / "config.json"
    config.write_text('{"model_type": "llama"}')
    files = {"config.json": config, "model.safetensors": weights}
    prefix = "models/faulty"
    # Requests that reach SeaweedFS while it is still starting can hang: a short read timeout
    # lets botocore retry them soon.
    options = {"connect_timeout": 1, "read_timeout": 2, "max_attempts": 3, "max_concurrency": 2}
    if restart == "after-failure":
        options["upload_attempts"] = 1
    store = s3_store(seaweed, prefix=f"fault-{restart}", **options)
    store.put_bytes("keep", b"ok")

    state = {"sent": 0, "killed": False}
    lock = threading.Lock()
    restarter: list[threading.Thread] = []

    def progress(n: int) -> None:
        with lock:
            state["sent"] += n
            if state["killed"] or state["sent"] < 8 * MiB:
                return
            state["killed"] = True
            seaweed.kill()
        if restart == "during-upload":

            def start_again():
                time.sleep(0.5)
                seaweed.start()

            restarter.append(threading.Thread(target=start_again))
            restarter[0].start()

    outcome = "published"
    try:
        publish_model(store, prefix, files, {"genome": "faulty"}, progress=progress)
    except StoreError as exc:
        outcome = f"failed: {type(exc).__name__}"
    finally:
        for thread in restarter:
            thread.join()
        if seaweed.proc is None:
            seaweed.start()
    assert state["killed"], "the server was never killed: the upload finished too early"
    if restart == "after-failure":
        assert outcome.startswith("failed")

    fresh = s3_store(seaweed, prefix=f"fault-{restart}")
    assert fresh.get_bytes("keep") == b"ok"  # data written before the crash survived
    if model_is_complete(fresh, prefix):
        assert outcome == "published"
        for name, path in files.items():
            got = fresh.get_file(f"{prefix}/{name}", tmp_path / f"check-{name}")
            assert got == hashlib.sha256(path.read_bytes()).hexdigest()
    else:
        assert not fresh.exists(f"{prefix}/{MANIFEST}")
        assert read_manifest(fresh, prefix) is None
    print(f"\n[{restart}] upload outcome: {outcome}; complete={model_is_complete(fresh, prefix)}")

    publish_model(fresh, prefix, files, {"genome": "faulty"})
    assert model_is_complete(fresh, prefix)
    assert (
        fresh.get_file(f"{prefix}/model.safetensors", tmp_path / "again")
        == hashlib.sha256(weights.read_bytes()).hexdigest()
    )

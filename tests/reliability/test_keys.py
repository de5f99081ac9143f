"""Names cannot escape their prefix: store keys, genome ids, campaign names and store URIs
with `../`, absolute paths, NUL, backslashes, unicode oddities or great length, on a local
folder and on real S3 (SeaweedFS). Every attempt is refused with a store/config error, or
stays inside the prefix; nothing outside is ever written or read."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cycleqd import probe_world
from cycleqd.config import parse_config
from cycleqd.errors import ConfigError, CycleQDError
from cycleqd.objectstore import (
    LocalObjectStore,
    ObjectStore,
    S3ObjectStore,
    check_key,
    open_store,
)
from cycleqd.state import CampaignStore

SECRET = b"outside-the-prefix-do-not-read"
HOSTILE = [
    "../escape",
    "a/../../escape",
    "..",
    ".",
    "a/./b",
    "/etc/passwd",
    "//etc/passwd",
    "a//b",
    "a/",
    "",
    "a\\..\\..\\escape",
    "..\\escape",
    "C:\\Windows\\escape",
    "a\x00b",
    "escape\x00/../x",
    "a\nb",
    "a\rb",
    "\x7f",
    "\u2025/escape",  # two dot leader
    "\uff0e\uff0e/escape",  # fullwidth full stops: an ordinary name, must stay inside
    "%2e%2e/escape",  # percent-encoded dots: an ordinary name, must stay inside
    "a/\u202e/b",  # right-to-left override
    "\ud800",  # lone surrogate
    "~/escape",
    "$HOME/escape",
    "x" * 300,
    "a/" + "b" * 1100,
    "d/" * 600 + "e",
    "models/.cycleqd-tmp-abc",
    "secret",  # the planted secret's own name, relative: must read the prefix's, not it
]
names = st.one_of(
    st.sampled_from(HOSTILE),
    st.text(max_size=40),
    st.lists(st.sampled_from(["..", ".", "", "a", "\\", "\x00", "\u2025", "/"]), max_size=6).map(
        "/".join
    ),
)
OPS = ("put_bytes", "get_bytes", "stat", "exists", "delete", "list", "delete_prefix", "put_file")


def _attempt(store: ObjectStore, op: str, key: str, tmp: Path) -> bytes | None:
    """One store operation with a hostile key; returns bytes read, if any."""
    if op == "put_bytes":
        store.put_bytes(key, b"hostile")
    elif op == "get_bytes":
        return store.get_bytes(key)
    elif op == "stat":
        store.stat(key)
    elif op == "exists":
        store.exists(key)
    elif op == "delete":
        store.delete(key)
    elif op == "list":
        for found in store.list(key):
            check_key(found)  # a listed key is a plain relative path: it names an inside object
    elif op == "delete_prefix":
        store.delete_prefix(key if key.endswith("/") else key + "/")
    elif op == "put_file":
        source = tmp / "upload.bin"
        source.write_bytes(b"hostile")
        store.put_file(key, source)
    return None


def _contained(store: ObjectStore, key: str, tmp: Path, outside_intact) -> int:
    """Run every operation; returns how many were contained (refused or kept inside)."""
    contained = 0
    for op in OPS:
        try:
            got = _attempt(store, op, key, tmp)
        except CycleQDError:
            got = None  # refused with a store error (InvalidKeyError, StoreNotFoundError, ...)
        ok = got != SECRET and outside_intact()
        contained += ok
    return contained


def test_local_store_keys_stay_inside_the_folder(tmp_path, reliability):
    outside = tmp_path / "outside"
    root = outside / "store"
    root.mkdir(parents=True)
    (outside / "secret").write_bytes(SECRET)
    (outside / "escape").write_bytes(SECRET)
    store = LocalObjectStore(root)
    store.put_bytes("secret", b"inside")  # the in-prefix object of the same name

    def outside_intact() -> bool:
        found = sorted(p.relative_to(outside).as_posix() for p in outside.rglob("*"))
        extra = [f for f in found if not f.startswith("store") and f not in ("secret", "escape")]
        return not extra and (outside / "secret").read_bytes() == SECRET

    counts = {"tried": 0, "survived": 0}

    @settings(max_examples=150)
    @given(key=names)
    def run(key: str) -> None:
        counts["tried"] += len(OPS)
        counts["survived"] += _contained(store, key, tmp_path, outside_intact)

    try:
        for key in HOSTILE:  # every listed name, whatever hypothesis picks
            counts["tried"] += len(OPS)
            counts["survived"] += _contained(store, key, tmp_path, outside_intact)
        run()
    finally:
        reliability.record(
            "Hostile inputs",
            "store keys (local folder): ../, absolute, NUL, backslashes, unicode, long",
            tried=counts["tried"],
            survived=counts["survived"],
            detail=f"{len(HOSTILE)} listed names + 150 generated, x {len(OPS)} operations; "
            "refused with InvalidKeyError or kept inside; nothing outside written or read",
        )
    assert counts["survived"] == counts["tried"]
    assert (outside / "secret").read_bytes() == SECRET


@pytest.mark.slow
def test_s3_store_keys_stay_inside_the_prefix(seaweed, tmp_path, reliability):
    prefix = f"keys-{uuid.uuid4().hex[:8]}/campaign"
    client = seaweed.client()
    client.put_object(Bucket=seaweed.bucket, Key=f"{prefix.split('/')[0]}/secret", Body=SECRET)
    store = S3ObjectStore(
        seaweed.bucket,
        prefix,
        seaweed.endpoint,
        access_key_id=seaweed.access_key,
        secret_access_key=seaweed.secret_key,
    )

    def bucket_keys() -> list[str]:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=seaweed.bucket)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def outside_intact() -> bool:
        keys = [k for k in bucket_keys() if k.startswith(prefix.split("/")[0] + "/")]
        return all(k.startswith(prefix + "/") or k.endswith("/secret") for k in keys)

    tried = survived = 0
    try:
        for key in HOSTILE:
            tried += len(OPS)
            survived += _contained(store, key, tmp_path, outside_intact)
    finally:
        reliability.record(
            "Hostile inputs",
            "store keys (S3, SeaweedFS): ../, absolute, NUL, backslashes, unicode, long",
            tried=tried,
            survived=survived,
            detail=f"{len(HOSTILE)} names x {len(OPS)} operations; refused or kept under the "
            "prefix; the object beside the prefix never read or changed",
        )
    assert survived == tried
    got = client.get_object(Bucket=seaweed.bucket, Key=f"{prefix.split('/')[0]}/secret")
    assert got["Body"].read() == SECRET


def test_genome_ids_campaign_names_and_uris_are_refused(tmp_path, reliability):
    """Genome ids become model folders, campaign names MLflow experiments and registered
    models, store URIs buckets and prefixes: a hostile one is refused, naming it."""
    outside = tmp_path / "outside"
    store = CampaignStore(outside / "campaign")
    models = {"base": "b", "experts": {s: s for s in probe_world.SKILLS}}
    tried = refused = 0
    for bad in (h for h in HOSTILE if h != "secret"):  # "secret" is a fine name
        for attempt in (
            lambda b=bad: store.model_uri(b),
            lambda b=bad: store.has_model(b),
            lambda b=bad: store.open_model(b, "exports"),
            lambda b=bad: store.delete_model(b),
            lambda b=bad: parse_config(probe_world.default_config(models, name=b)),
        ):
            tried += 1
            try:
                attempt()
            except (CycleQDError, ConfigError):
                refused += 1
    for uri in (
        "s3://../escape",
        "s3://bucket/a/../../escape",
        "s3://bucket/\x00",
        "s3://BUCKET/x",
        "s3:///nobucket",
        "s3://bucket/" + "p/" * 600,
        "ftp://host/x",
        "file://otherhost/x",
        "",
        "   ",
    ):
        tried += 1
        try:
            open_store(uri)
        except CycleQDError as exc:
            refused += "invalid" in str(exc) or "unsupported" in str(exc) or "bucket" in str(exc)
    leftovers = [p for p in outside.rglob("*")] if outside.exists() else []
    reliability.record(
        "Hostile inputs",
        "genome ids, campaign names, store URIs",
        tried=tried,
        survived=refused if not leftovers else 0,
        detail="every one refused with a CycleQDError naming it; nothing created",
    )
    assert refused == tried and not leftovers, leftovers


def test_listed_names_cover_the_brief():
    # The list keeps what the issue names: ../, absolute paths, NUL, backslashes, unicode, long.
    joined = "".join(HOSTILE)
    assert all(x in joined for x in ("../", "/etc", "\x00", "\\", "\u2025", "x" * 300))
    assert os.sep == "/"  # backslashes are plain characters in POSIX paths: refused anyway

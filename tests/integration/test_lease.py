"""The campaign lease as a compare-and-swap: conditional writes on a local folder and on a real
S3 server (SeaweedFS honours If-None-Match and If-Match), runs racing for a campaign (exactly
one wins, at once), and the write-then-read-back lease kept for S3 services that ignore the
conditions."""

from __future__ import annotations

import threading
import uuid

import pytest

from cycleqd.objectstore import LocalObjectStore, StorePreconditionError
from cycleqd.state import CampaignLockedError, CampaignStore

from .test_objectstore import s3_store


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalObjectStore(tmp_path / "store")
    return s3_store(request.getfixturevalue("seaweed"))


def test_put_if_writes_only_over_the_version_it_read(store) -> None:
    assert store.conditional_writes()
    first = store.put_if("lease.json", b"a", None)
    with pytest.raises(StorePreconditionError, match="another writer"):
        store.put_if("lease.json", b"b", None)  # it exists now
    data, version = store.get_versioned("lease.json")
    assert (data, version) == (b"a", first)
    second = store.put_if("lease.json", b"c", version)
    assert second != first
    with pytest.raises(StorePreconditionError):
        store.put_if("lease.json", b"d", first)  # stale: someone wrote since
    assert store.get_bytes("lease.json") == b"c"


def _race(store_of, racers: int) -> tuple[list[str], list[str]]:
    """`racers` runs acquire one campaign at the same instant; (winners, refusal messages)."""
    barrier = threading.Barrier(racers)
    won, refused = [], []

    def run() -> None:
        campaign = CampaignStore(store_of())
        barrier.wait()
        try:
            campaign.acquire(settle=0)  # no settle time: the swap alone decides
            won.append(campaign._lease_owner)
        except CampaignLockedError as exc:
            refused.append(str(exc))

    threads = [threading.Thread(target=run) for _ in range(racers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return won, refused


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_of_runs_racing_for_a_campaign_exactly_one_wins(kind, tmp_path, request, reliability):
    rounds, racers, decided = 6, 6, 0
    for round_ in range(rounds):
        if kind == "local":
            root = tmp_path / f"campaign-{round_}"
            won, refused = _race(lambda root=root: LocalObjectStore(root), racers)
        else:
            server = request.getfixturevalue("seaweed")
            prefix = f"race/{uuid.uuid4().hex[:8]}"
            won, refused = _race(lambda s=server, p=prefix: s3_store(s, prefix=p), racers)
        assert len(won) == 1, (won, refused)
        assert len(refused) == racers - 1
        assert all("being written by another run" in m or "at the same time" in m for m in refused)
        decided += 1
    reliability.record(
        "Concurrency",
        f"{racers} runs take one campaign at the same instant ({kind} store, compare-and-swap)",
        tried=rounds,
        survived=decided,
        detail=f"{rounds} rounds: each time exactly one won and {racers - 1} were refused "
        "naming the holder, with no settle time",
    )


def test_an_s3_service_that_ignores_conditions_keeps_the_read_back_lease(seaweed) -> None:
    """Some S3 services accept the conditional headers and ignore them: the probe finds
    out, and the lease falls back to writing, waiting and reading back."""
    store = s3_store(seaweed)
    put_object = store._client.put_object

    def ignoring_conditions(**kwargs):
        kwargs.pop("IfNoneMatch", None)
        kwargs.pop("IfMatch", None)
        return put_object(**kwargs)

    store._client.put_object = ignoring_conditions
    assert not store.conditional_writes()
    assert store.list("preflight/") == []  # the probe cleaned up
    first = CampaignStore(store)
    first.acquire(settle=0.05)
    with pytest.raises(CampaignLockedError, match="being written by another run"):
        CampaignStore(store).acquire(settle=0.05)
    first.release()
    assert first.read_lease() is None


def test_a_run_that_lost_its_lease_cannot_renew_it(store) -> None:
    dead = CampaignStore(store)
    dead.acquire(ttl=0.01, settle=0)
    threading.Event().wait(0.05)  # the lease expires
    taker = CampaignStore(store)
    taker.acquire(settle=0)
    with pytest.raises(CampaignLockedError, match="lost the lease"):
        dead.renew()
    taker.renew()  # the holder renews
    assert taker.read_lease().owner == taker._lease_owner

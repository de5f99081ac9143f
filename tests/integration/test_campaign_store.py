"""Campaign state in a store: one writer at a time, and a whole campaign living in real S3."""

from __future__ import annotations

import time
import uuid

import pytest

from cycleqd import probe_world
from cycleqd.campaign import Campaign
from cycleqd.config import parse_config
from cycleqd.errors import CycleQDError
from cycleqd.objectstore import LocalObjectStore, RemoteSafetensors, S3ObjectStore
from cycleqd.state import CampaignLockedError, CampaignStore


def _campaign(world, evaluator, store, **overrides) -> Campaign:
    config = probe_world.default_config(world, generations=overrides.pop("generations", 4))
    config.update(overrides)
    return Campaign(parse_config(config), store, evaluator)


def test_second_writer_is_refused_with_who_holds_it(tiny_world, probe_evaluator, tmp_path):
    first = _campaign(tiny_world, probe_evaluator, CampaignStore(tmp_path))
    with pytest.raises(CampaignLockedError, match=r"being written by another run \(host .*pid"):
        _campaign(tiny_world, probe_evaluator, CampaignStore(tmp_path))
    first.run()
    first.close()
    # Once released, another run resumes it.
    with _campaign(tiny_world, probe_evaluator, CampaignStore(tmp_path), generations=6) as second:
        assert second.generation == 4
        second.run()
        assert second.generation == 6


def test_expired_lease_of_a_dead_run_is_taken_over(tmp_path):
    dead = CampaignStore(tmp_path)
    dead.acquire(ttl=0.5, settle=0)
    with pytest.raises(CampaignLockedError):
        CampaignStore(tmp_path).acquire(settle=0)
    time.sleep(0.6)
    taker = CampaignStore(tmp_path)
    taker.acquire(settle=0)
    # The dead run, coming back, cannot write any more.
    with pytest.raises(CampaignLockedError, match="lost the lease"):
        dead.renew()
    taker.release()
    assert taker.read_lease() is None


def test_snapshots_are_never_overwritten_with_other_content(tmp_path):
    store = CampaignStore(tmp_path)
    store.write_snapshot(1, {"archives": {}, "genomes": [], "x": 1})
    store.write_snapshot(1, {"archives": {}, "genomes": [], "x": 1})  # same bytes: fine
    with pytest.raises(CycleQDError, match="never overwritten"):
        store.write_snapshot(1, {"archives": {}, "genomes": [], "x": 2})
    assert store.latest_generation() == 1


def test_corrupted_latest_pointer_is_reported(tmp_path):
    store = CampaignStore(tmp_path)
    (tmp_path / "LATEST").write_text("banana")
    with pytest.raises(CycleQDError, match="LATEST is corrupted"):
        store.latest_generation()


@pytest.mark.slow
def test_campaign_in_s3_resumes_from_another_process_view(
    tiny_world, probe_evaluator, seaweed, tmp_path
):
    """The paper's SVD mutation stores elites as weights: they go to S3, are read back
    tensor by tensor with ranged GETs, and a fresh Campaign on the same URI resumes."""
    prefix = f"campaigns/{uuid.uuid4().hex[:8]}"

    def s3_store() -> CampaignStore:
        return CampaignStore(
            S3ObjectStore(
                seaweed.bucket,
                prefix,
                seaweed.endpoint,
                access_key_id=seaweed.access_key,
                secret_access_key=seaweed.secret_key,
            )
        )

    local = _campaign(
        tiny_world,
        probe_evaluator,
        CampaignStore(tmp_path / "local"),
        generations=6,
        mutation={"kind": "svd"},
    )
    local.run()

    first = _campaign(
        tiny_world, probe_evaluator, s3_store(), generations=3, mutation={"kind": "svd"}
    )
    first.run()
    first.close()
    with _campaign(
        tiny_world, probe_evaluator, s3_store(), generations=6, mutation={"kind": "svd"}
    ) as resumed:
        assert resumed.generation == 3
        resumed.run()
        # Same seed, same campaign, whether in a folder or in S3, in one run or two.
        assert resumed.archives == local.archives
        stored = resumed.store.stored_models()
        assert stored == local.store.stored_models() and stored
        handle = resumed.store.open_model(stored[0])
        assert isinstance(handle, RemoteSafetensors)
        name = "model.layers.0.mlp.gate_proj.weight"
        assert handle.get(name).equal(local.store.open_model(stored[0]).get(name))
        assert resumed.store.model_uri(stored[0]).startswith(f"s3://{seaweed.bucket}/{prefix}/")


def test_lease_of_a_killed_local_driver_is_taken_over_at_once(tmp_path, monkeypatch):
    import subprocess

    from cycleqd.state import DRIVER_PID_ENV

    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid that no longer runs
    monkeypatch.setenv(DRIVER_PID_ENV, str(gone.pid))
    CampaignStore(tmp_path, owner="killed-run").acquire(settle=0)
    monkeypatch.delenv(DRIVER_PID_ENV)
    lease = CampaignStore(tmp_path).read_lease()
    assert lease.driver and lease.pid == gone.pid and not lease.is_live()
    CampaignStore(tmp_path, owner="next-run").acquire(settle=0)
    assert CampaignStore(tmp_path).read_lease().owner == "next-run"
    # A cluster task's lease (no driver) is only ever given up by expiry.
    CampaignStore(tmp_path / "k8s", owner="pod-run").acquire(settle=0)
    assert not CampaignStore(tmp_path / "k8s").read_lease().driver
    with pytest.raises(CampaignLockedError):
        CampaignStore(tmp_path / "k8s", owner="other").acquire(settle=0)


def test_a_runs_later_tasks_renew_its_lease_without_waiting_out_a_race(tmp_path, monkeypatch):
    """The lease of stores without conditional writes (written, then read back)."""
    from cycleqd import state

    class WithoutConditionalWrites(LocalObjectStore):
        def conditional_writes(self) -> bool:
            return False

    store = WithoutConditionalWrites(tmp_path)

    waits: list[float] = []
    monkeypatch.setattr(state.time, "sleep", waits.append)
    first = CampaignStore(store, owner="run-1")
    first.acquire(settle=0.2)
    assert waits == [0.2]  # won against whoever might be racing for it
    later_task = CampaignStore(store, owner="run-1")
    later_task.acquire(ttl=3600, settle=0.2)
    assert waits == [0.2] and later_task.read_lease().owner == "run-1"
    # A lease about to expire may be read as gone by a rival: back to the careful path.
    CampaignStore(store, owner="run-1").acquire(ttl=state.RENEW_MARGIN_S / 2)
    assert waits == [0.2]
    CampaignStore(store, owner="run-1").acquire(settle=0.2)
    assert waits == [0.2, 0.2]
    with pytest.raises(CampaignLockedError):
        CampaignStore(store, owner="run-2").acquire(settle=0.2)

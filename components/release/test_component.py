from cycleqd.state import CampaignStore
from cycleqd_kfp.components.release.component import release


def test_gives_back_only_its_own_runs_lease(tmp_path):
    mine = CampaignStore(tmp_path, owner="run-1")
    mine.acquire(settle=0)
    release.python_func(store_uri=str(tmp_path), run_owner="run-2")
    assert CampaignStore(tmp_path).read_lease().owner == "run-1"
    release.python_func(store_uri=str(tmp_path), run_owner="run-1")
    assert CampaignStore(tmp_path).read_lease() is None


def test_gives_the_lease_back_as_a_kfp_task(kfp_local, tmp_path):
    store = tmp_path / "campaign"
    CampaignStore(store, owner="run-1").acquire(settle=0)
    release(store_uri=str(store), run_owner="run-1")
    assert CampaignStore(store).read_lease() is None

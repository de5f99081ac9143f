from cycleqd.state import CampaignStore
from cycleqd_kfp.components.release.component import release


def test_gives_back_only_its_own_runs_lease(tmp_path):
    mine = CampaignStore(tmp_path, owner="run-1")
    mine.acquire(settle=0)
    release.python_func(store_uri=str(tmp_path), run_owner="run-2")
    assert CampaignStore(tmp_path).read_lease().owner == "run-1"
    release.python_func(store_uri=str(tmp_path), run_owner="run-1")
    assert CampaignStore(tmp_path).read_lease() is None

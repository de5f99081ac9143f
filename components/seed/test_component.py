import yaml

from cycleqd import probe_world
from cycleqd.state import CampaignStore
from cycleqd_kfp.components.seed.component import seed


def test_seeds_once(tiny_world, tmp_path):
    config = yaml.safe_dump(probe_world.default_config(tiny_world))
    assert (
        seed.python_func(
            campaign_config=config, store_uri=str(tmp_path), tracking_uri="", run_owner="r"
        )
        == 0
    )
    snapshot = CampaignStore(tmp_path).read_snapshot(0)
    experts = {g["id"] for g in snapshot["genomes"] if g["kind"] == "expert"}
    in_archives = {e["genome_id"] for cells in snapshot["archives"].values() for e in cells}
    assert in_archives == experts
    # A retried seed task changes nothing.
    assert (
        seed.python_func(
            campaign_config=config, store_uri=str(tmp_path), tracking_uri="", run_owner="r"
        )
        == 0
    )
    assert CampaignStore(tmp_path).read_snapshot(0) == snapshot

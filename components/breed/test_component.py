import pytest

from cycleqd import steps
from cycleqd.errors import CycleQDError
from cycleqd.state import CampaignStore
from cycleqd_kfp.components.breed.component import breed


def test_breeds_population_then_nothing_once_done(probe_campaign, tmp_path):
    config = probe_campaign(generations=1, population=3)
    args = {"campaign_config": config, "store_uri": str(tmp_path), "run_owner": "r"}
    with pytest.raises(CycleQDError, match="not seeded yet"):
        breed.python_func(**args, shards=3)
    steps.seed(config, str(tmp_path), owner="r")
    shards = breed.python_func(**args, shards=3)
    assert len(shards) == 3 and all("," not in s for s in shards) and len(set(shards)) == 3
    # Retried before the commit: the same children, nothing bred twice; fewer shards deal the
    # same children round-robin.
    assert breed.python_func(**args, shards=3) == shards
    assert breed.python_func(**args, shards=2) == [f"{shards[0]},{shards[2]}", shards[1]]
    assert breed.python_func(**args, shards=1) == [",".join(shards)]
    for gid in shards:
        steps.evaluate(config, str(tmp_path), gid)
    steps.commit(config, str(tmp_path), owner="r")
    assert breed.python_func(**args, shards=3) == []
    # A later run raises the generations to reach without touching the config.
    assert len(breed.python_func(**args, shards=3, search_generations=2)) == 3


def test_breeds_as_a_kfp_task(probe_campaign, kfp_local, tmp_path):
    config = probe_campaign(generations=1, population=3)
    store = str(tmp_path / "campaign")
    steps.seed(config, store, owner="r")
    task = breed(campaign_config=config, store_uri=store, run_owner="r", shards=2)
    # The children's recipes are in the store, dealt into two groups.
    recorded = [r["id"] for r in CampaignStore(store).get_json("pending/000001.json")]
    assert task.output == steps.shard(recorded, 2) and len(recorded) == 3

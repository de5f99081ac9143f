import pytest
import yaml

from cycleqd import probe_world, steps
from cycleqd.errors import ConfigError, CycleQDError
from cycleqd_kfp.components.breed.component import breed


def test_breeds_population_then_nothing_once_done(tiny_world, tmp_path):
    config = yaml.safe_dump(
        {**probe_world.default_config(tiny_world, generations=1), "population": 3}
    )
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


def test_shards_deal_children_round_robin_and_never_exceed_the_children():
    ids = [f"g{i}" for i in range(5)]
    assert steps.shard(ids, 2) == ["g0,g2,g4", "g1,g3"]
    assert steps.shard(ids, 8) == ids
    assert steps.shard([], 4) == []
    with pytest.raises(ConfigError, match="shards must be at least 1"):
        steps.shard(ids, 0)

import pytest
import yaml

from cycleqd import steps, tiny
from cycleqd.errors import CycleQDError
from cycleqd_kfp.components.breed.component import breed


def test_breeds_population_then_nothing_once_done(tiny_world, tmp_path):
    config = yaml.safe_dump({**tiny.default_config(tiny_world, generations=1), "population": 3})
    with pytest.raises(CycleQDError, match="not seeded yet"):
        breed.python_func(campaign_config=config, store_uri=str(tmp_path), run_owner="r")
    steps.seed(config, str(tmp_path), owner="r")
    children = breed.python_func(campaign_config=config, store_uri=str(tmp_path), run_owner="r")
    assert len(children) == 3 and len(set(children)) == 3
    # Retried before the commit: the same children, nothing bred twice.
    assert (
        breed.python_func(campaign_config=config, store_uri=str(tmp_path), run_owner="r")
        == children
    )
    for gid in children:
        steps.evaluate(config, str(tmp_path), gid)
    steps.commit(config, str(tmp_path), owner="r")
    assert breed.python_func(campaign_config=config, store_uri=str(tmp_path), run_owner="r") == []

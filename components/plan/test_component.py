import json

import pytest

from cycleqd import steps
from cycleqd.errors import ConfigError
from cycleqd.state import CampaignStore
from cycleqd_kfp.components.plan.component import plan


def _decide(config: str, store: str, stage: str) -> bool:
    return plan.python_func(campaign_config=config, store_uri=store, stage=stage)


def test_seed_and_export_have_work_only_until_done(probe_campaign, tmp_path, capsys):
    config, store = probe_campaign(), str(tmp_path / "campaign")
    assert _decide(config, store, "seed") and _decide(config, store, "export")
    assert json.loads(capsys.readouterr().out.splitlines()[0])["latest_generation"] == -1
    steps.seed(config, store, owner="r")
    assert not _decide(config, store, "seed")
    assert _decide(config, store, "export")  # the seeded archives' final model: not exported
    exported = steps.export(config, store, owner="r")
    assert not _decide(config, store, "export")
    assert steps.plan(config, store)["final_genome_id"] == exported["genome_id"]


def test_names_the_stages_it_decides_on(probe_campaign, tmp_path):
    with pytest.raises(ConfigError, match=r"'seed', 'export'.*'evaluate'"):
        _decide(probe_campaign(), str(tmp_path), "evaluate")


def test_decides_as_a_kfp_task_reading_only(probe_campaign, kfp_local, tmp_path):
    config, store = probe_campaign(), str(tmp_path / "campaign")
    assert plan(campaign_config=config, store_uri=store, stage="seed").output is True
    steps.seed(config, store, owner="r")
    keys = CampaignStore(store).store.list("")
    assert plan(campaign_config=config, store_uri=store, stage="seed").output is False
    assert CampaignStore(store).store.list("") == keys  # decided, nothing written

import json

import pytest
import yaml

from cycleqd.finetune.expert import published_expert
from cycleqd.finetune.trainer import list_checkpoints
from cycleqd.skills.tiny.train import MINI_WORLD, campaign_config
from cycleqd.state import CampaignStore
from cycleqd_kfp.components.finetune.component import finetune


@pytest.fixture
def mini_campaign(mini_skill_world) -> str:
    """The tiny skill world at its smallest, every expert a fine-tuning spec (4 steps)."""
    config = campaign_config(mini_skill_world, name="mini", generations=1, samples=3, population=1)
    return yaml.safe_dump(config)


def _assert_published(store_uri: str, skill: str, record: dict) -> None:
    """The expert the task reports is the one in the store, with what it was trained on and
    no checkpoint left behind."""
    store = CampaignStore(store_uri)
    expert = published_expert(store.store, store.expert_prefix(skill))
    assert expert.sha256 == record["sha256"] and expert.genome_id == record["genome_id"]
    assert store.store.exists(store.training_set_key(skill))
    assert list_checkpoints(store.store, store.checkpoints_prefix(skill)) == []


def test_the_finetune_component_trains_and_a_retry_reuses(mini_campaign, tmp_path):
    args = dict(campaign_config=mini_campaign, store_uri=str(tmp_path), skill="tiny_shell")
    first = json.loads(finetune.python_func(**args, tracking_uri=""))
    assert first["skill"] == "tiny_shell" and not first["reused"]
    assert first["steps"] == MINI_WORLD.expert.steps
    _assert_published(str(tmp_path), "tiny_shell", first)
    retried = json.loads(finetune.python_func(**args, tracking_uri=""))
    assert retried["reused"] and retried["sha256"] == first["sha256"]


def test_trains_an_expert_as_a_kfp_task(mini_campaign, kfp_local, tmp_path):
    store = str(tmp_path / "campaign")
    task = finetune(
        campaign_config=mini_campaign, store_uri=store, skill="tiny_sql", tracking_uri=""
    )
    record = json.loads(task.output)
    assert record["skill"] == "tiny_sql" and not record["reused"]
    _assert_published(store, "tiny_sql", record)

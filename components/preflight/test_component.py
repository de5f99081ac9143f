import json

import pytest
import yaml

from cycleqd import probe_world
from cycleqd.errors import ConfigError, ModelMismatchError
from cycleqd.generate.factory import RUNTIME_ENV
from cycleqd.state import CampaignStore
from cycleqd_kfp.components.preflight.component import preflight


def test_reports_a_new_campaign(probe_campaign, tmp_path, capsys):
    out = preflight.python_func(
        campaign_config=probe_campaign(generations=12, population=1),
        store_uri=str(tmp_path),
        tracking_uri="",
        run_owner="run-1",
    )
    assert json.loads(capsys.readouterr().out) == {
        "campaign": "tiny",
        "store_uri": tmp_path.as_uri(),
        "latest_generation": -1,
        "target_generations": 12,
        "experts_to_train": [],
    }
    assert out == []  # every expert given by location


def test_names_what_to_fix(tiny_world, probe_campaign, tmp_path):
    with pytest.raises(ConfigError, match=r"population.*greater than or equal to 1"):
        preflight.python_func(
            campaign_config=probe_campaign(population=0),
            store_uri=str(tmp_path),
            tracking_uri="",
            run_owner="r",
        )
    models = {**tiny_world, "experts": {**tiny_world["experts"], "probe_b": tiny_world["base"]}}
    other = probe_world.build_base(
        tmp_path / "other", probe_world.llama_config(hidden=32, intermediate=64)
    )
    models["experts"]["probe_c"] = str(other)
    with pytest.raises(ModelMismatchError, match="probe_c"):
        preflight.python_func(
            campaign_config=probe_campaign(models=models),
            store_uri=str(tmp_path / "s"),
            tracking_uri="",
            run_owner="r",
        )


def test_lists_the_experts_to_fine_tune_as_a_kfp_task(
    mini_skill_world, kfp_local, tmp_path, monkeypatch
):
    from cycleqd.skills.tiny import FAMILIES
    from cycleqd.skills.tiny.train import campaign_config

    # As in the pipeline, preflight runs in the CPU tools image, where nothing is scored.
    monkeypatch.setenv(RUNTIME_ENV, "cpu-tools")
    config = campaign_config(mini_skill_world, name="mini", generations=1, samples=3)
    store = tmp_path / "campaign"
    task = preflight(
        campaign_config=yaml.safe_dump(config),
        store_uri=str(store),
        tracking_uri="",
        run_owner="run-1",
    )
    assert task.output == list(FAMILIES)
    assert CampaignStore(store).store.list("") == []  # checked, nothing written

import json

import pytest
import yaml

from cycleqd import probe_world
from cycleqd.errors import ConfigError, ModelMismatchError
from cycleqd_kfp.components.preflight.component import preflight


def _config(world, **overrides) -> str:
    return yaml.safe_dump({**probe_world.default_config(world), **overrides})


def test_reports_a_new_campaign(tiny_world, tmp_path, capsys):
    out = preflight.python_func(
        campaign_config=_config(tiny_world),
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


def test_names_what_to_fix(tiny_world, tmp_path):
    with pytest.raises(ConfigError, match=r"population.*greater than or equal to 1"):
        preflight.python_func(
            campaign_config=_config(tiny_world, population=0),
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
            campaign_config=_config(tiny_world, models=models),
            store_uri=str(tmp_path / "s"),
            tracking_uri="",
            run_owner="r",
        )

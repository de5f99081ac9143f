"""`cycleqd submit` and `cycleqd schedule`: the run's parameters they send."""

from __future__ import annotations

import argparse

import pytest
import yaml

from cycleqd import config as config_module
from cycleqd import probe_world
from cycleqd.config import load_config_text
from cycleqd.errors import ConfigError
from cycleqd_kfp.pipelines import cli


def _args(config: str, **extra) -> argparse.Namespace:
    return argparse.Namespace(config=config, store="s3://bucket/campaign", tracking_uri="", **extra)


@pytest.fixture
def campaign_yaml(tiny_world) -> str:
    return yaml.safe_dump(probe_world.default_config(tiny_world, generations=3))


def test_a_local_file_goes_inline_and_a_shared_uri_by_reference(
    campaign_yaml, monkeypatch, tmp_path
):
    path = tmp_path / "campaign.yaml"
    path.write_text(campaign_yaml)
    inline = cli._arguments(_args(str(path)))
    assert load_config_text(inline["campaign_config"]) == load_config_text(campaign_yaml)
    assert inline["search_generations"] == 0

    # Read here once to fail before submitting, then sent as it is: every run reads it.
    fetched: list[str] = []

    def fetch(location: str, scheme: str) -> bytes:
        fetched.append(location)
        return campaign_yaml.encode()

    monkeypatch.setattr(config_module, "_fetch_config", fetch)
    uri = "https://configs.example/campaign.yaml"
    shared = cli._arguments(_args(uri, search_generations=5))
    assert shared["campaign_config"] == uri and fetched == [uri]
    assert shared["search_generations"] == 5


def test_a_bad_config_or_target_fails_before_submitting(campaign_yaml, tmp_path):
    with pytest.raises(ConfigError, match="No such file"):
        cli._arguments(_args(str(tmp_path / "missing.yaml")))
    path = tmp_path / "campaign.yaml"
    path.write_text(campaign_yaml)
    with pytest.raises(ConfigError, match="got -1"):
        cli._arguments(_args(str(path), search_generations=-1))


def test_submit_continues_until_done_only_when_asked(campaign_yaml, tmp_path):
    path = tmp_path / "campaign.yaml"
    path.write_text(campaign_yaml)
    assert cli._arguments(_args(str(path)))["continue_until_done"] is False
    chained = cli._arguments(_args(str(path), continue_until_done=True))
    assert chained["continue_until_done"] is True


def test_warm_evaluators_on_a_probe_campaign_are_one_clear_error(campaign_yaml, tmp_path, capsys):
    path = tmp_path / "campaign.yaml"
    path.write_text(campaign_yaml)
    argv = ["run", "--config", str(path), "--workdir", str(tmp_path / "w"), "--no-tracking"]
    assert cli.main([*argv, "--warm-evaluators", "2"]) == 2
    err = capsys.readouterr().err
    assert "--warm-evaluators serve a chat model to the skills" in err
    assert "Traceback" not in err
    assert not (tmp_path / "w" / "campaign").exists()  # nothing written


def test_a_second_run_on_a_held_campaign_prints_the_lease_message(campaign_yaml, tmp_path, capsys):
    """`cycleqd run` (kfp.local) on a campaign another run holds: one message naming the
    holder and what to do, before kfp.local starts a task; nothing written."""
    from cycleqd.state import CampaignStore

    path = tmp_path / "campaign.yaml"
    path.write_text(campaign_yaml)
    store = tmp_path / "store"
    CampaignStore(store, owner="other-run").acquire(settle=0)
    argv = ["run", "--config", str(path), "--workdir", str(tmp_path / "w"), "--no-tracking"]
    assert cli.main([*argv, "--store", str(store)]) == 2
    err = capsys.readouterr().err
    assert "other-run" in err and "Traceback" not in err
    assert not (tmp_path / "w" / "kfp-local").exists()  # no task started
    assert CampaignStore(store).read_lease().owner == "other-run"

import json

import pytest
from kfp import dsl

from cycleqd import probe_world, steps
from cycleqd.state import CampaignStore
from cycleqd_kfp.components.commit.component import commit


@pytest.fixture
def evaluated(probe_campaign, probe_evaluator, tmp_path) -> dict:
    """A campaign whose generation 1 is bred and evaluated, not committed: commit's inputs."""
    config = probe_campaign(generations=2, population=3)
    store = str(tmp_path / "campaign")
    steps.seed(config, store, owner="r")
    children = steps.breed(config, store, owner="r")
    steps.evaluate_many(config, store, children, evaluator=probe_evaluator)
    return {"campaign_config": config, "store_uri": store, "tracking_uri": "", "run_owner": "r"}


def _assert_metrics_and_maps_show_the_snapshot(store: str, metrics: dict, maps_html: str):
    archives = CampaignStore(store).read_snapshot(1)["archives"]
    assert metrics["generation"] == 1
    for skill in probe_world.SKILLS:
        assert metrics[f"{skill}_elites"] == len(archives[skill])
        assert metrics[f"{skill}_best"] == max(e["quality"] for e in archives[skill])
    assert "archives after generation 1" in maps_html
    assert maps_html.count("<svg") == len(probe_world.SKILLS)


def test_commits_the_generation_once_and_shows_the_archives(evaluated, output_artifact):
    archives = output_artifact(dsl.Metrics, "archives")
    maps = output_artifact(dsl.HTML, "elite_maps")
    summary = json.loads(commit.python_func(**evaluated, archives=archives, elite_maps=maps))
    store = CampaignStore(evaluated["store_uri"])
    assert store.latest_generation() == 1
    assert summary["generation"] == 1 and summary["committed"]
    assert len(summary["children"]) == 3
    entered = {c["genome_id"] for c in summary["children"] if c["entered"]}
    elites = {
        e["genome_id"] for cells in store.read_snapshot(1)["archives"].values() for e in cells
    }
    assert entered and entered <= elites
    with open(maps.path) as f:
        _assert_metrics_and_maps_show_the_snapshot(
            evaluated["store_uri"], archives.metadata, f.read()
        )
    # A retried task finds nothing pending: the committed generation stays as it was.
    again = commit.python_func(
        **evaluated,
        archives=output_artifact(dsl.Metrics, "archives-again"),
        elite_maps=output_artifact(dsl.HTML, "elite_maps-again"),
    )
    assert not json.loads(again)["committed"] and store.latest_generation() == 1


def test_commits_as_a_kfp_task(evaluated, kfp_local):
    task = commit(**evaluated)
    assert json.loads(task.outputs["Output"])["committed"]
    with open(task.outputs["elite_maps"].path) as f:
        maps_html = f.read()
    metrics = task.outputs["archives"].metadata
    _assert_metrics_and_maps_show_the_snapshot(evaluated["store_uri"], metrics, maps_html)

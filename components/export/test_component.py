import json
from pathlib import Path

import pytest
from kfp import dsl

from cycleqd import probe_world, steps
from cycleqd.objectstore import model_is_complete
from cycleqd.state import CampaignStore
from cycleqd.weights import SafetensorsFolder
from cycleqd_kfp.components.export.component import export


def _seeded(config: str, store: str) -> dict:
    """The export's arguments for a campaign seeded (generation 0: the experts' archives)."""
    steps.seed(config, store, owner="r")
    return {"campaign_config": config, "store_uri": store, "tracking_uri": "", "run_owner": "r"}


def _final_genome(store: str, genome_id: str) -> dict:
    return json.loads(CampaignStore(store).store.get_bytes(f"exports/{genome_id}/genome.json"))


@pytest.mark.parametrize("method", ["merge_best", "best_mean"])
def test_exports_the_final_model_of_the_configs_method(
    method, probe_campaign, probe_evaluator, output_artifact, tmp_path
):
    store = str(tmp_path / "campaign")
    args = _seeded(probe_campaign(final={"method": method}), store)
    final_scores = output_artifact(dsl.Metrics, "final_scores")
    final_model = output_artifact(dsl.Model, "final_model")
    result = json.loads(
        export.python_func(**args, final_scores=final_scores, final_model=final_model)
    )

    campaign = CampaignStore(store)
    gid = result["genome_id"]
    assert result["generation"] == 0 and result["uri"] == campaign.model_uri(gid, "exports")
    assert campaign.stored_models("exports") == [gid]
    assert model_is_complete(campaign.store, f"exports/{gid}")
    genome = _final_genome(store, gid)
    archives = campaign.read_snapshot(0)["archives"]
    if method == "merge_best":  # the best elite of every archive, softmax weights
        bests = [max(archives[s], key=lambda e: e["quality"])["genome_id"] for s in archives]
        assert genome["parents"] == bests and sum(genome["weights"]) == pytest.approx(1.0)
    else:  # one elite: the best mean over the skills
        elites = sorted(
            (e for cells in archives.values() for e in cells), key=lambda e: e["genome_id"]
        )
        best = max(elites, key=lambda e: sum(e["scores"].values()))  # ties: the first id
        assert genome["parents"] == [best["genome_id"]] and genome["weights"] == [1.0]
    # The weights written are the model that was scored, and the scores are the metrics.
    folder = SafetensorsFolder(Path(store) / "exports" / gid)
    tensors = ((name, folder.get(name)) for name in folder.names())
    assert probe_evaluator.evaluate(gid, tensors) == result["scores"] == final_scores.metadata
    assert set(result["scores"]) == set(probe_world.SKILLS)
    _assert_describes_the_export(final_model, result, method)


def _assert_describes_the_export(model: dsl.Model, result: dict, method: str) -> None:
    """The Model artifact points at the exported weights in the store and identifies them."""
    assert model.metadata == {
        "uri": result["uri"],
        "genome_id": result["genome_id"],
        "sha256": result["sha256"],
        "scores": result["scores"],
        "method": method,
        "generation": result["generation"],
    }
    assert json.loads(Path(model.path).read_text()) == model.metadata


def test_exports_as_a_kfp_task_and_a_retry_finds_the_export_done(
    probe_campaign, kfp_local, output_artifact, tmp_path
):
    store = str(tmp_path / "campaign")
    args = _seeded(probe_campaign(), store)
    task = export(**args)
    result = json.loads(task.outputs["Output"])
    assert task.outputs["final_scores"].metadata == result["scores"]
    _assert_describes_the_export(task.outputs["final_model"], result, "merge_best")
    assert result["written"] is True
    assert CampaignStore(store).stored_models("exports") == [result["genome_id"]]
    folder = Path(store) / "exports" / result["genome_id"]
    files = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    retried = export.python_func(
        **args,
        final_scores=output_artifact(dsl.Metrics, "retried"),
        final_model=output_artifact(dsl.Model, "retried_model"),
    )
    # Read back, not scored or written again: the same sha256 and scores.
    assert json.loads(retried) == {**result, "written": False}
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == files

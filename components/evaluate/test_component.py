import json

import pytest
from kfp import dsl

from cycleqd import probe_world, steps
from cycleqd.errors import CycleQDError
from cycleqd.state import CampaignStore
from cycleqd_kfp.components.evaluate.component import evaluate


class CountingEvaluator:
    """Wraps the probe evaluator and counts the models it scores."""

    def __init__(self, inner) -> None:
        self.inner, self.calls = inner, 0

    def evaluate(self, genome_id, tensors):
        self.calls += 1
        return self.inner.evaluate(genome_id, tensors)


@pytest.fixture
def bred(probe_campaign, tmp_path) -> tuple[str, str, str]:
    """A seeded campaign whose generation 1 is bred: (config, store, its children as one
    evaluation group)."""
    config = probe_campaign(generations=1, population=3)
    store = str(tmp_path / "campaign")
    steps.seed(config, store, owner="r")
    (group,) = steps.shard(steps.breed(config, store, owner="r"), 1)
    return config, store, group


def _assert_every_child_scored(metrics: dict, children: str, output: str) -> None:
    """The metrics name skills, never genome ids (runs compare in the UI); the ids are in
    the task's output."""
    by_child = json.loads(output)
    assert list(by_child) == children.split(",")
    for skill in probe_world.SKILLS:
        values = [scores[skill] for scores in by_child.values()]
        assert metrics[f"{skill}_best_child"] == max(values)
        assert metrics[f"{skill}_mean"] == pytest.approx(sum(values) / len(values))
        assert all(0.0 <= v <= 1.0 for v in values)
    assert metrics["children_scored"] == len(by_child) and metrics["children_rejected"] == 0
    assert not any(child[:8] in name for child in by_child for name in metrics)


def test_scores_a_shard_once_with_one_evaluator_and_logs_every_child(
    bred, probe_evaluator, output_artifact, monkeypatch
):
    config, store, shard = bred
    built: list[CountingEvaluator] = []

    def build(_config):
        built.append(CountingEvaluator(probe_evaluator))
        return built[-1]

    monkeypatch.setattr(steps, "build_evaluator", build)
    metrics = output_artifact(dsl.Metrics, "scores")
    output = evaluate.python_func(
        campaign_config=config, store_uri=store, genome_ids=shard, scores=metrics
    )
    assert len(built) == 1 and built[0].calls == 3
    _assert_every_child_scored(metrics.metadata, shard, output)
    # A retried task reads the recorded scores back: nothing is scored twice.
    again = output_artifact(dsl.Metrics, "scores-again")
    assert (
        evaluate.python_func(
            campaign_config=config, store_uri=store, genome_ids=shard, scores=again
        )
        == output
    )
    assert built[-1].calls == 0 and again.metadata == metrics.metadata


def test_refuses_children_of_another_generation(probe_campaign, output_artifact, tmp_path):
    config = probe_campaign(generations=1, population=1)
    store = str(tmp_path / "campaign")
    steps.seed(config, store, owner="r")
    steps.breed(config, store, owner="r")
    metrics = output_artifact(dsl.Metrics, "scores")
    with pytest.raises(CycleQDError, match="not in generation 1"):
        evaluate.python_func(
            campaign_config=config, store_uri=store, genome_ids="feedface", scores=metrics
        )


def test_scores_as_a_kfp_task_and_keeps_the_scores_in_the_store(bred, kfp_local):
    config, store, group = bred
    task = evaluate(campaign_config=config, store_uri=store, genome_ids=group)
    _assert_every_child_scored(task.outputs["scores"].metadata, group, task.outputs["Output"])
    kept = CampaignStore(store)
    by_child = json.loads(task.outputs["Output"])
    for child in group.split(","):  # for the commit task, and for a retried task to read back
        assert kept.get_json(f"evaluations/{child}.json")["scores"] == by_child[child]

import pytest
import yaml
from kfp import dsl

from cycleqd import probe_world, steps
from cycleqd.errors import CycleQDError
from cycleqd_kfp.components.evaluate.component import evaluate


class CountingEvaluator:
    """Wraps the probe evaluator and counts the models it scores."""

    def __init__(self, inner) -> None:
        self.inner, self.calls = inner, 0

    def evaluate(self, genome_id, tensors):
        self.calls += 1
        return self.inner.evaluate(genome_id, tensors)


def test_scores_a_shard_once_with_one_evaluator_and_logs_every_child(
    tiny_world, probe_evaluator, tmp_path, monkeypatch
):
    config = yaml.safe_dump(
        {**probe_world.default_config(tiny_world, generations=1), "population": 3}
    )
    store = str(tmp_path / "campaign")
    steps.seed(config, store, owner="r")
    (shard,) = steps.shard(steps.breed(config, store, owner="r"), 1)
    built: list[CountingEvaluator] = []

    def build(_config):
        built.append(CountingEvaluator(probe_evaluator))
        return built[-1]

    monkeypatch.setattr(steps, "build_evaluator", build)
    metrics = dsl.Metrics(name="scores", uri=str(tmp_path / "metrics"), metadata={})
    evaluate.python_func(campaign_config=config, store_uri=store, genome_ids=shard, scores=metrics)
    assert len(built) == 1 and built[0].calls == 3
    children = shard.split(",")
    for child in children:
        for skill in probe_world.SKILLS:
            assert 0.0 <= metrics.metadata[f"{child[:12]}.{skill}"] <= 1.0
        assert metrics.metadata[f"{child[:12]}.rejected"] == 0.0
    # A retried task reads the recorded scores back: nothing is scored twice.
    again = dsl.Metrics(name="scores", uri=str(tmp_path / "metrics2"), metadata={})
    evaluate.python_func(campaign_config=config, store_uri=store, genome_ids=shard, scores=again)
    assert built[-1].calls == 0 and again.metadata == metrics.metadata


def test_refuses_children_of_another_generation(tiny_world, tmp_path):
    config = yaml.safe_dump(probe_world.default_config(tiny_world, generations=1))
    store = str(tmp_path / "campaign")
    steps.seed(config, store, owner="r")
    steps.breed(config, store, owner="r")
    metrics = dsl.Metrics(name="scores", uri=str(tmp_path / "m"), metadata={})
    with pytest.raises(CycleQDError, match="not in generation 1"):
        evaluate.python_func(
            campaign_config=config, store_uri=store, genome_ids="feedface", scores=metrics
        )

from cycleqd import steps
from cycleqd.state import CampaignStore
from cycleqd_kfp.components.seed.component import seed


def _arguments(config: str, store: str) -> dict:
    return {"campaign_config": config, "store_uri": store, "tracking_uri": "", "run_owner": "r"}


def _assert_the_experts_are_the_archives(store: str) -> dict:
    snapshot = CampaignStore(store).read_snapshot(0)
    experts = {g["id"] for g in snapshot["genomes"] if g["kind"] == "expert"}
    in_archives = {e["genome_id"] for cells in snapshot["archives"].values() for e in cells}
    assert in_archives == experts
    return snapshot


def test_seeds_once(probe_campaign, tmp_path):
    args = _arguments(probe_campaign(generations=12, population=1), str(tmp_path))
    assert seed.python_func(**args) == 0
    snapshot = _assert_the_experts_are_the_archives(str(tmp_path))
    # A retried seed task changes nothing.
    assert seed.python_func(**args) == 0
    assert CampaignStore(tmp_path).read_snapshot(0) == snapshot


def test_a_later_runs_seed_leaves_the_campaign_where_it_is(
    probe_campaign, probe_evaluator, tmp_path
):
    config = probe_campaign(generations=2, population=1)
    store = str(tmp_path)
    steps.seed(config, store, owner="r")
    children = steps.breed(config, store, owner="r")
    steps.evaluate_many(config, store, children, evaluator=probe_evaluator)
    steps.commit(config, store, owner="r")
    assert seed.python_func(**_arguments(config, store)) == 1
    assert CampaignStore(store).latest_generation() == 1


def test_seeds_as_a_kfp_task(probe_campaign, kfp_local, tmp_path):
    store = str(tmp_path / "campaign")
    assert seed(**_arguments(probe_campaign(), store)).output == 0
    _assert_the_experts_are_the_archives(store)

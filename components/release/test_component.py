from cycleqd.state import CampaignStore
from cycleqd_kfp.components.release.component import release


def test_gives_back_only_its_own_runs_lease(tmp_path):
    mine = CampaignStore(tmp_path, owner="run-1")
    mine.acquire(settle=0)
    release.python_func(store_uri=str(tmp_path), run_owner="run-2")
    assert CampaignStore(tmp_path).read_lease().owner == "run-1"
    release.python_func(store_uri=str(tmp_path), run_owner="run-1")
    assert CampaignStore(tmp_path).read_lease() is None


def test_gives_the_lease_back_as_a_kfp_task(kfp_local, tmp_path):
    store = tmp_path / "campaign"
    CampaignStore(store, owner="run-1").acquire(settle=0)
    release(store_uri=str(store), run_owner="run-1")
    assert CampaignStore(store).read_lease() is None


def _run_one_generation(config: str, store: str, owner: str) -> None:
    from cycleqd import steps

    steps.seed(config, store, owner=owner)
    steps.evaluate_many(config, store, steps.breed(config, store, owner=owner))
    steps.commit(config, store, owner=owner)


def test_says_where_the_campaign_stands_and_follows_up_in_a_cluster(
    probe_campaign, tmp_path, monkeypatch, capsys
):
    """Outside a cluster no follow-up is tried; inside one, the follow-up learns whether the
    campaign reached its target and whether this run committed a generation."""
    from cycleqd_kfp.pipelines import continuation

    config, store = probe_campaign(generations=2, population=2), str(tmp_path / "c")
    _run_one_generation(config, store, "run-1")
    calls = []
    monkeypatch.setattr(
        continuation, "follow_up", lambda client, run, **kw: calls.append((run, kw)) or "ok"
    )
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    release.python_func(store_uri=store, run_owner="run-1", campaign_config=config)
    assert "'done': False, 'progressed': True" in capsys.readouterr().out
    assert calls == []  # kfp.local, a laptop: no KFP API to ask
    assert CampaignStore(store).store.list("runs/") == []  # the run's record goes with it

    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    release.python_func(
        store_uri=store, run_owner="run-2", campaign_config=config, continue_until_done=True
    )
    assert calls == [
        ("run-2", {"campaign_done": False, "progressed": False, "continue_runs": True})
    ]
    release.python_func(
        store_uri=store, run_owner="run-3", campaign_config=config, search_generations=1
    )
    assert calls[-1] == (
        "run-3",
        {"campaign_done": True, "progressed": False, "continue_runs": False},
    )


def test_an_unreadable_config_still_gives_the_lease_back(tmp_path, capsys, monkeypatch):
    """The exit handler runs whatever happened: a config it cannot read (a URI gone, a
    mistake preflight stopped) costs the follow-up, never the lease."""
    store = tmp_path / "campaign"
    CampaignStore(store, owner="run-1").acquire(settle=0)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    release.python_func(
        store_uri=str(store), run_owner="run-1", campaign_config=str(tmp_path / "gone.yaml")
    )
    assert CampaignStore(store).read_lease() is None
    assert "error" in capsys.readouterr().out

"""MLflow tracking of a real tiny campaign, against a real `mlflow server`.

The servers run with a SQLite and a PostgreSQL backend, artifacts proxied into the SeaweedFS
S3 bucket. The campaign is the tiny probe world's (`cycleqd.probe_world`); the tracker's hooks are
called around `seed()`, `step()` and `finalize()`/`export()` as the campaign will call them.
Lineage is checked from the registry entry of the final model back to the experts and the
base through MLflow alone (MlflowClient queries on tags and links), then compared with the
campaign's genome book.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import cycleqd_tests_mlflow_server as mlflow_server
import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from cycleqd import probe_world
from cycleqd.archive import ArchiveSet
from cycleqd.campaign import Campaign
from cycleqd.config import parse_config
from cycleqd.elite_maps import MapData, maps_of, project_2d, write_elite_maps
from cycleqd.state import CampaignStore
from cycleqd.tracking import MLflowTracker, NullTracker, flatten

SKILLS = list(probe_world.SKILLS)
DATASETS = {
    s: (f"probes-{s}", f"digest-{s}", f"s3://datasets/probes/{s}.jsonl") for s in probe_world.SKILLS
}


# -- servers --------------------------------------------------------------------------------------


def _start_server(tmp_path_factory, seaweed, backend: str, name: str):
    workdir = tmp_path_factory.mktemp(f"mlflow-{name}")
    if backend == "postgres":
        try:
            backend_uri = mlflow_server.postgres_database()
        except mlflow_server.PostgresUnavailable as exc:
            pytest.skip(f"PostgreSQL backend not tested: {exc}")
    else:
        backend_uri = f"sqlite:///{workdir / 'mlflow.db'}"
    server = mlflow_server.MLflowServer(
        workdir,
        backend_uri,
        artifacts_destination=f"s3://{seaweed.bucket}/mlartifacts/{name}",
        env=mlflow_server.s3_environment(seaweed),
    )
    server.prefix = f"mlartifacts/{name}/"
    try:
        server.start()
    except BaseException:
        if backend == "postgres":
            mlflow_server.drop_database(backend_uri)
        raise
    return server


def _stop_server(server) -> None:
    server.kill()
    if server.backend_uri.startswith("postgresql"):
        mlflow_server.drop_database(server.backend_uri)


@pytest.fixture(scope="module")
def sqlite_server(tmp_path_factory, seaweed):
    """A running MLflow server (SQLite backend, artifacts in the SeaweedFS bucket)."""
    srv = _start_server(tmp_path_factory, seaweed, "sqlite", "sqlite")
    yield srv
    _stop_server(srv)


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def server(request, tmp_path_factory, seaweed):
    """The SQLite server above, then one with a fresh PostgreSQL database as backend."""
    if request.param == "sqlite":
        yield request.getfixturevalue("sqlite_server")
        return
    srv = _start_server(tmp_path_factory, seaweed, "postgres", "postgres")
    yield srv
    _stop_server(srv)


@pytest.fixture(autouse=True)
def _no_injected_run(monkeypatch):
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture
def no_fluent_runs(monkeypatch):
    """The tracker must not use mlflow.start_run (mlflow issue 15713)."""

    def refuse(*args, **kwargs):
        raise AssertionError("the tracker called mlflow.start_run")

    monkeypatch.setattr(mlflow, "start_run", refuse)


# -- driving a campaign ---------------------------------------------------------------------------


def _campaign(world, evaluator, root, generations: int = 4, seed: int = 1) -> Campaign:
    config = probe_world.default_config(world, generations=generations)
    config["seed"] = seed  # seed 1 breeds elites from elites within 4 generations
    return Campaign(parse_config(config), CampaignStore(root), evaluator)


def _drive(
    campaign: Campaign, tracker, *, until: int | None = None, export: bool = True, start=True
):
    """The hooks, called where Campaign will call them."""
    if start:
        tracker.campaign_started(
            campaign.config,
            campaign.book,
            campaign.generation if campaign.generation >= 0 else None,
            datasets=DATASETS,
        )
    if campaign.generation < 0:
        campaign.seed()
        seeded = [h for h in campaign.history if h.generation == 0]
        tracker.generation_done(0, seeded, campaign.archives, campaign.book)
    last = campaign.config.generations if until is None else until
    while campaign.generation < last:
        results = campaign.step()
        tracker.generation_done(campaign.generation, results, campaign.archives, campaign.book)
    if not export:
        return None
    gid, scores = campaign.finalize()
    sha = campaign.export(gid)
    uri = campaign.store.model_uri(gid, "exports")
    tracker.model_exported(gid, scores, uri, sha, campaign.book)
    return gid, scores, uri, sha


def _client(uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


class _Cached:
    """A client that fetches each model and run once (lineage walks revisit them)."""

    def __init__(self, client: MlflowClient):
        self._client = client
        self._seen: dict[tuple[str, str], object] = {}

    def _once(self, kind: str, key: str, fetch):
        if (kind, key) not in self._seen:
            self._seen[kind, key] = fetch(key)
        return self._seen[kind, key]

    def get_logged_model(self, model_id: str):
        return self._once("model", model_id, self._client.get_logged_model)

    def get_run(self, run_id: str):
        return self._once("run", run_id, self._client.get_run)

    def __getattr__(self, name: str):
        return getattr(self._client, name)


def _runs(client, experiment: str, campaign_id: str) -> list:
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs(
        [exp.experiment_id], f"tags.`cycleqd.campaign_id` = '{campaign_id}'", max_results=1000
    )


# -- lineage: MLflow only -------------------------------------------------------------------------


def _parent_model_ids(model) -> list[str]:
    ids, i = [], 0
    while f"cycleqd.parent.{i}.genome_id" in model.tags:
        ids.append(model.tags[f"cycleqd.parent.{i}.model_id"])
        i += 1
    return ids


def _walk(client: MlflowClient, model_id: str) -> dict[str, object]:
    """Every LoggedModel reachable from `model_id` through parent and base links."""
    seen: dict[str, object] = {}
    frontier = [model_id]
    while frontier:
        current = frontier.pop()
        if current in seen:
            continue
        model = client.get_logged_model(current)
        seen[current] = model
        frontier.extend(_parent_model_ids(model))
        if model.tags.get("cycleqd.kind") == "expert":
            frontier.append(model.tags["cycleqd.base.model_id"])
    return seen


def _check_lineage(client: MlflowClient, registry_name: str, world: dict, campaign, final):
    client = _Cached(client)
    gid, scores, uri, sha = final
    versions = client.search_model_versions(f"name = '{registry_name}'")
    assert len(versions) == 1, versions
    version = versions[0]
    assert version.source.startswith("models:/")
    final_model_id = version.source.removeprefix("models:/")
    assert version.tags["cycleqd.model_id"] == final_model_id
    assert version.tags["cycleqd.sha256"] == sha

    reached = _walk(client, final_model_id)
    by_genome = {m.tags["cycleqd.genome_id"]: m for m in reached.values()}
    kinds = sorted(m.tags["cycleqd.kind"] for m in reached.values())
    assert kinds.count("base") == 1 and kinds.count("expert") == len(SKILLS)
    final_model = reached[final_model_id]
    assert final_model.tags["cycleqd.store_uri"] == uri
    assert final_model.tags["cycleqd.sha256"] == sha
    assert final_model.tags["mlflow.model.isExternal"] == "true"
    assert final_model.params["parents"] == ",".join(campaign.book[gid].parents)
    # The base and the experts point at their weights.
    base = next(m for m in reached.values() if m.tags["cycleqd.kind"] == "base")
    assert base.tags["cycleqd.source"] == str(Path(world["base"]))
    for model in reached.values():
        if model.tags["cycleqd.kind"] == "expert":
            skill = model.tags["cycleqd.skill"]
            assert model.tags["cycleqd.source"] == str(Path(world["experts"][skill]))
    # Every LoggedModel of the campaign (final, elites, experts) leads back to the experts and
    # the base, and the links agree with the campaign's own genome book.
    experiment = client.get_experiment(final_model.experiment_id)
    all_models = client.search_logged_models(
        [experiment.experiment_id],
        filter_string=f"tags.`cycleqd.campaign_id` = '{final_model.tags['cycleqd.campaign_id']}'",
    )
    elites = [m for m in all_models if m.tags["cycleqd.kind"] == "child"]
    assert elites, "no elite was recorded as a LoggedModel"
    deep = 0
    for model in [final_model, *elites]:
        genome_id = model.tags["cycleqd.genome_id"]
        lineage = _walk(client, model.model_id)
        genomes = {m.tags["cycleqd.genome_id"] for m in lineage.values()}
        book = campaign.book
        assert genomes == {genome_id, book.base_id(), *book.ancestors(genome_id)}
        parents = [lineage[p] for p in _parent_model_ids(model)]
        assert [p.tags["cycleqd.genome_id"] for p in parents] == list(book[genome_id].parents)
        deep += any(p.tags["cycleqd.kind"] == "child" for p in parents)
        # Parent run links name the runs where the parents were made.
        for i, parent in enumerate(parents):
            run = client.get_run(model.tags[f"cycleqd.parent.{i}.run_id"])
            assert run.data.tags["cycleqd.genome_id"] == parent.tags["cycleqd.genome_id"]
        # The model's source run holds its recipe and scores.
        run = client.get_run(model.source_run_id)
        assert run.data.tags["cycleqd.genome_id"] == genome_id
        assert {f"score.{s}" for s in SKILLS} <= set(run.data.metrics)
    assert deep, "expected at least one elite bred from another elite (seed 1)"
    assert set(by_genome) >= {campaign.book.base_id(), *campaign.book.expert_ids().values()}
    # The final model's scores are on the model itself.
    assert {m.key for m in final_model.metrics} == {f"score.{s}" for s in SKILLS}
    assert {m.key: m.value for m in final_model.metrics} == pytest.approx(
        {f"score.{s}": v for s, v in scores.items()}
    )


def _check_runs(client, experiment, tracker, campaign, generations: int):
    runs = _runs(client, experiment, tracker.campaign_id)
    by_id = {r.info.run_id: r for r in runs}
    campaign_runs = [r for r in runs if r.data.tags.get("cycleqd.role") == "campaign"]
    assert len(campaign_runs) == 1
    top = campaign_runs[0]
    assert top.data.tags["cycleqd.campaign_uri"] == campaign.store.uri
    assert top.data.tags["cycleqd.campaign"] == campaign.config.name
    params = flatten(campaign.config.model_dump(mode="json"))
    assert {k: top.data.params[k] for k in params if k != "generations"} == {
        k: v for k, v in params.items() if k != "generations"
    }
    datasets = {d.dataset.name: d.dataset for d in top.inputs.dataset_inputs}
    assert {n: (d.digest, d.source_type) for n, d in datasets.items()} == {
        f"probes-{s}": (f"digest-{s}", "s3") for s in SKILLS
    }
    gens = {
        int(r.data.tags["cycleqd.generation"]): r
        for r in runs
        if r.data.tags.get("cycleqd.role") == "generation"
    }
    assert sorted(gens) == list(range(generations + 1))
    for gen in gens.values():
        assert gen.data.tags["mlflow.parentRunId"] == top.info.run_id
    children = [r for r in runs if r.data.tags.get("cycleqd.role") in ("child", "seed")]
    per_generation = campaign.config.population
    assert len(children) == len(SKILLS) + generations * per_generation
    # (a resumed campaign's history holds only the generations bred since it resumed)
    history = {(h.generation, h.genome_id): h for h in campaign.history}
    keys = {
        (int(r.data.tags["cycleqd.generation"]), r.data.tags["cycleqd.genome_id"]) for r in children
    }
    assert set(history) <= keys
    for run in children:
        tags, params = run.data.tags, run.data.params
        generation = int(tags["cycleqd.generation"])
        parent = by_id[tags["mlflow.parentRunId"]]
        assert parent.info.run_id == gens[generation].info.run_id
        result = history.get((generation, tags["cycleqd.genome_id"]))
        if result is None:
            continue
        assert tags["cycleqd.entered"] == ",".join(result.entered)
        assert tags["cycleqd.rejected"] == str(result.scores is None).lower()
        assert params["quality_skill"] == result.skill
        if result.scores is not None:
            assert {k: run.data.metrics[f"score.{k}"] for k in SKILLS} == pytest.approx(
                result.scores
            )
        if tags["cycleqd.role"] == "child":
            genome = campaign.book[result.genome_id]
            assert params["parents"] == ",".join(genome.parents)
            assert [float(params[f"weight_{i}"]) for i in range(2)] == list(genome.weights)
            assert params["mutation.kind"] == genome.mutation.kind
            assert int(params["mutation.seed"]) == genome.mutation.seed
            assert float(params["mutation.scale"]) == genome.mutation.scale
            assert params["mutation.expert"] == (genome.mutation.expert or "")
            # Parents' models are the run's inputs, an elite's own model its output.
            # (search results carry no model inputs/outputs: get the run)
            full = client.get_run(run.info.run_id)
            inputs = {i.model_id for i in full.inputs.model_inputs}
            assert len(inputs) == len(set(genome.parents))
            outputs = [o.model_id for o in full.outputs.model_outputs]
            assert (len(outputs) == 1) == bool(result.entered)
    return top, gens


def _check_maps_in_s3(seaweed, prefix: str, top, gens) -> None:
    s3 = seaweed.client()
    keys: list[str] = []
    token = None
    while True:
        kwargs = {"Bucket": seaweed.bucket, "Prefix": prefix}
        if token:
            kwargs["ContinuationToken"] = token
        page = s3.list_objects_v2(**kwargs)
        keys += [o["Key"] for o in page.get("Contents", [])]
        token = page.get("NextContinuationToken")
        if not token:
            break
    for generation, run in gens.items():
        for skill in SKILLS:
            suffix = f"/{run.info.run_id}/artifacts/elite_maps/{skill}.png"
            found = [k for k in keys if k.endswith(suffix)]
            assert found, f"no elite map {skill} of generation {generation} in the bucket"
            marker = f"/{top.info.run_id}/artifacts/images/elite_map_{skill}+step+{generation}+"
            assert any(marker in k and k.endswith(".png") for k in keys), marker
    body = s3.get_object(Bucket=seaweed.bucket, Key=found[0])["Body"].read()
    assert body.startswith(b"\x89PNG")


# -- tests ----------------------------------------------------------------------------------------


def test_elite_maps_project_and_write(tmp_path):
    """Elite maps: 2 BC axes as they are, more projected by max, written as PNGs."""
    grid = np.full((3, 4, 5), np.nan)
    grid[1, 2, 0], grid[1, 2, 4], grid[0, 0, 3] = 0.2, 0.7, 0.1
    plane = project_2d(grid)
    assert plane.shape == (3, 4) and plane[1, 2] == 0.7 and plane[0, 0] == 0.1
    assert np.isnan(plane).sum() == 10
    assert project_2d(np.array([np.nan, 0.3])).shape == (2, 1)

    config = parse_config(
        {
            "name": "maps",
            "skills": [{"name": n, "bins": 5} for n in ("a", "b", "c", "d")],
            "models": {"base": "/b", "experts": {n: f"/{n}" for n in "abcd"}},
            "evaluation": {"scorer": "probe"},
        }
    )
    archives = ArchiveSet.for_config(config)
    archives.offer("g1", {"a": 0.9, "b": 0.1, "c": 0.5, "d": 0.2})
    maps = maps_of(archives)
    assert maps["a"].grid.shape == (5, 5, 5) and maps["a"].elites == 1
    assert maps["a"].best == pytest.approx(0.9)
    paths = write_elite_maps(archives, tmp_path / "maps", generation=3)
    assert sorted(p.name for p in paths) == [f"{n}-g000003.png" for n in "abcd"]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in paths)
    two = MapData("x", ("y",), ((0.0, 1.0),), np.array([np.nan, 0.5]))
    assert write_elite_maps({"x": two}, tmp_path / "one")[0].stat().st_size > 1000


@pytest.mark.slow
@pytest.mark.usefixtures("no_fluent_runs")
def test_server_lineage_maps_and_registry(server, seaweed, tiny_world, probe_evaluator, tmp_path):
    """A 4-generation campaign against the server (SQLite / PostgreSQL backend, S3 artifacts)."""
    campaign = _campaign(tiny_world, probe_evaluator, tmp_path / "campaign")
    experiment = f"lineage-{tmp_path.name}"
    tracker = MLflowTracker(
        server.uri, experiment, campaign.store.uri, registry_name=f"final-{tmp_path.name}"
    )
    try:
        final = _drive(campaign, tracker)
    finally:
        tracker.close()
        campaign.close()
    assert tracker.missed() == []
    assert mlflow.active_run() is None

    client = _client(server.uri)
    top, gens = _check_runs(client, experiment, tracker, campaign, generations=4)
    assert top.info.status == "FINISHED"
    _check_lineage(client, f"final-{tmp_path.name}", tiny_world, campaign, final)
    _check_maps_in_s3(seaweed, server.prefix, top, gens)
    # The campaign run charts the archives over the generations.
    history = client.get_metric_history(top.info.run_id, f"archive.{SKILLS[0]}.elites")
    assert sorted(m.step for m in history) == list(range(5))


@pytest.mark.slow
@pytest.mark.usefixtures("no_fluent_runs")
def test_injected_mlflow_run_id_nests(
    sqlite_server, tiny_world, probe_evaluator, tmp_path, monkeypatch
):
    """A Kubeflow task's MLFLOW_RUN_ID becomes the campaign run (seeding task), then a
    generation run (a later task resuming the campaign); nothing is resumed by mistake."""
    client = _client(sqlite_server.uri)
    experiment = f"kfp-{tmp_path.name}"
    exp_id = client.create_experiment(experiment)
    # What KFP makes: a run per pipeline run, a nested run per task.
    pipeline = client.create_run(exp_id, run_name="kfp-pipeline-run").info.run_id
    task1 = client.create_run(
        exp_id, run_name="seed-task", tags={"mlflow.parentRunId": pipeline}
    ).info.run_id

    monkeypatch.setenv("MLFLOW_RUN_ID", task1)
    campaign = _campaign(tiny_world, probe_evaluator, tmp_path / "campaign", generations=2)
    tracker = MLflowTracker(sqlite_server.uri, experiment, campaign.store.uri)
    _drive(campaign, tracker, export=False)
    tracker.close()
    campaign.close()
    assert tracker.missed() == []
    assert tracker.campaign_run_id == task1

    runs = _runs(client, experiment, tracker.campaign_id)
    campaign_runs = [r for r in runs if r.data.tags.get("cycleqd.role") == "campaign"]
    assert [r.info.run_id for r in campaign_runs] == [task1]
    task_run = client.get_run(task1)
    assert task_run.data.tags["mlflow.parentRunId"] == pipeline  # KFP's nesting is kept
    assert task_run.info.status == "RUNNING"  # KFP ends its own run, not the tracker
    assert task_run.data.params["mutation.kind"] == "svd_expert"
    gens = {
        int(r.data.tags["cycleqd.generation"]): r
        for r in runs
        if r.data.tags.get("cycleqd.role") == "generation"
    }
    assert sorted(gens) == [0, 1, 2]
    assert all(g.data.tags["mlflow.parentRunId"] == task1 for g in gens.values())
    for run in runs:
        if run.data.tags.get("cycleqd.role") in ("child", "seed"):
            generation = int(run.data.tags["cycleqd.generation"])
            assert run.data.tags["mlflow.parentRunId"] == gens[generation].info.run_id

    # A later task resumes the campaign for one generation; its run is that generation's.
    task2 = client.create_run(
        exp_id, run_name="generation-task", tags={"mlflow.parentRunId": pipeline}
    ).info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", task2)
    resumed = _campaign(tiny_world, probe_evaluator, tmp_path / "campaign", generations=3)
    assert resumed.generation == 2
    tracker = MLflowTracker(sqlite_server.uri, experiment, resumed.store.uri, attach="generation")
    final = _drive(resumed, tracker)
    tracker.close()
    resumed.close()
    assert tracker.missed() == []
    assert tracker.campaign_run_id == task1  # found by tag, not created again

    runs = _runs(client, experiment, tracker.campaign_id)
    assert [r.info.run_id for r in runs if r.data.tags.get("cycleqd.role") == "campaign"] == [task1]
    gen3 = client.get_run(task2)
    assert gen3.data.tags["cycleqd.role"] == "generation"
    assert gen3.data.tags["cycleqd.generation"] == "3"
    assert gen3.data.tags["cycleqd.campaign_run_id"] == task1
    assert gen3.data.tags["mlflow.parentRunId"] == pipeline  # KFP's, left alone
    (child,) = [
        r
        for r in runs
        if r.data.tags.get("cycleqd.role") == "child" and r.data.tags["cycleqd.generation"] == "3"
    ]
    assert child.data.tags["mlflow.parentRunId"] == task2
    # Its parents were bred by the first task: linked by tag search.
    genome = resumed.book[child.data.tags["cycleqd.genome_id"]]
    for i, parent in enumerate(genome.parents):
        assert child.data.tags[f"cycleqd.parent.{i}.genome_id"] == parent
        model = client.get_logged_model(child.data.tags[f"cycleqd.parent.{i}.model_id"])
        assert model.tags["cycleqd.genome_id"] == parent
    final_run = next(r for r in runs if r.data.tags.get("cycleqd.role") == "final")
    assert final_run.data.tags["mlflow.parentRunId"] == task1
    assert final_run.data.tags["cycleqd.genome_id"] == final[0]


@pytest.mark.slow
def test_server_killed_mid_campaign(sqlite_server, tiny_world, probe_evaluator, tmp_path):
    """The server dies after generation 1: the campaign completes, the tracker queues what it
    could not deliver, and hands it over once the server is back."""
    server = sqlite_server
    try:
        campaign = _campaign(tiny_world, probe_evaluator, tmp_path / "campaign")
        experiment = f"fault-{tmp_path.name}"
        tracker = MLflowTracker(
            server.uri,
            experiment,
            campaign.store.uri,
            registry_name=f"final-{tmp_path.name}",
            retry_interval=0.0,
            request_timeout=5,
        )
        _drive(campaign, tracker, until=1, export=False)
        assert tracker.missed() == []

        # Down during generations 2 and 3: they are queued, the search goes on.
        server.kill()
        _drive(campaign, tracker, until=3, export=False, start=False)
        assert campaign.generation == 3
        missed = tracker.missed()
        assert [(m.event, m.lost) for m in missed] == [
            ("generation 2 (1 models)", False),
            ("generation 3 (1 models)", False),
        ]
        assert "failed with exception" in missed[0].detail
        # Back: the next event delivers the queue, in order.
        server.start()
        _drive(campaign, tracker, until=4, export=False, start=False)
        assert tracker.missed() == []

        # Down again for the export: close() delivers it once the server is back.
        server.kill()
        final = _drive(campaign, tracker, start=False)
        assert campaign.store.has_model(final[0], "exports")
        assert [m.event for m in tracker.missed()] == [f"final model {final[0]} exported"]
        server.start()
        tracker.close()
        assert tracker.missed() == []
        campaign.close()

        client = _client(server.uri)
        _check_runs(client, experiment, tracker, campaign, generations=4)
        _check_lineage(client, f"final-{tmp_path.name}", tiny_world, campaign, final)
    finally:
        if server.proc is None:
            server.start()


def test_embedded_sqlite_and_resume(tiny_world, probe_evaluator, tmp_path):
    """tracking_uri=None: a SQLite file and artifacts beside the campaign, no server; a resumed
    campaign finds its runs and models again."""
    run_folder = tmp_path / "run"
    campaign = _campaign(tiny_world, probe_evaluator, run_folder / "campaign", generations=2)
    tracker = MLflowTracker(None, None, campaign.store.uri)
    assert tracker.tracking_uri == f"sqlite:///{(run_folder / 'mlflow.db').resolve()}"
    _drive(campaign, tracker, export=False)
    tracker.close()
    campaign.close()
    assert tracker.missed() == []
    assert (run_folder / "mlflow.db").is_file()
    maps = list((run_folder / "mlartifacts").rglob("elite_maps/probe_a.png"))
    assert len(maps) == 3  # generations 0, 1, 2

    resumed = _campaign(tiny_world, probe_evaluator, run_folder / "campaign", generations=4)
    tracker = MLflowTracker(None, None, resumed.store.uri)
    final = _drive(resumed, tracker)
    tracker.close()
    resumed.close()
    assert tracker.missed() == []

    client = _client(tracker.tracking_uri)
    top, _ = _check_runs(client, "tiny", tracker, resumed, generations=4)
    assert top.data.tags["cycleqd.resumed_from"] == "2"
    assert top.info.status == "FINISHED"
    _check_lineage(client, "tiny", tiny_world, resumed, final)
    assert len(list((run_folder / "mlartifacts").rglob("elite_maps/probe_a.png"))) == 5


def test_unreachable_server_never_stops_the_search(tiny_world, probe_evaluator, tmp_path, caplog):
    """No server at all: every hook returns at once, the queue stays bounded, and `missed()`
    says what was dropped and what is still queued."""
    caplog.set_level(logging.ERROR, logger="cycleqd.tracking")
    campaign = _campaign(tiny_world, probe_evaluator, tmp_path / "campaign", generations=4)
    port = mlflow_server.free_port()  # nothing listens there
    tracker = MLflowTracker(
        f"http://127.0.0.1:{port}",
        "nowhere",
        campaign.store.uri,
        max_pending=3,
        retry_interval=0.0,
    )
    final_id = _drive(campaign, tracker)[0]
    tracker.close()
    campaign.close()
    assert campaign.generation == 4
    missed = tracker.missed()
    # Kept: the campaign start, the export and the close, which are never dropped; dropped:
    # the generations, oldest first, to keep at most 3 events.
    assert [(m.event, m.lost) for m in missed] == [
        ("campaign tiny started", False),
        (f"final model {final_id} exported", False),
        ("campaign closed", False),
    ] + [(f"generation {g} (1 models)" if g else "generation 0 (3 models)", True) for g in range(5)]
    assert all("dropped" in m.detail for m in missed if m.lost)
    assert "failed with exception" in missed[0].detail
    assert not caplog.records  # nothing escaped as an error


def test_rejected_step_is_skipped_not_blocking(tiny_world, probe_evaluator, tmp_path, monkeypatch):
    """A step MLflow (or a bug) rejects is reported lost; later events still arrive."""
    campaign = _campaign(tiny_world, probe_evaluator, tmp_path / "campaign", generations=1)
    tracker = MLflowTracker(None, "rejects", campaign.store.uri, local_dir=tmp_path / "ml")

    def broken(self, generation, skill, data):
        raise ValueError("cannot draw")

    monkeypatch.setattr(MLflowTracker, "_log_elite_map", broken)
    _drive(campaign, tracker)
    tracker.close()
    campaign.close()
    missed = tracker.missed()
    assert missed and all(m.lost and "cannot draw" in m.detail for m in missed)
    assert len(missed) == 2 * len(SKILLS)  # generations 0 and 1, one per archive
    client = _client(tracker.tracking_uri)
    versions = client.search_model_versions("name = 'tiny'")
    assert len(versions) == 1


def test_rejected_children_are_recorded(tiny_world, probe_evaluator, tmp_path):
    """Children with non-finite weights get a run flagged rejected, no scores, no model."""
    config = probe_world.default_config(tiny_world, generations=2)
    config["mutation"] = {"kind": "gaussian", "sigma": 1e39}  # overflows: every child is Inf
    campaign = Campaign(parse_config(config), CampaignStore(tmp_path / "c"), probe_evaluator)
    tracker = MLflowTracker(None, "nan", campaign.store.uri)
    _drive(campaign, tracker, export=False)
    tracker.close()
    campaign.close()
    assert tracker.missed() == []
    client = _client(tracker.tracking_uri)
    children = [
        r
        for r in _runs(client, "nan", tracker.campaign_id)
        if r.data.tags.get("cycleqd.role") == "child"
    ]
    assert len(children) == 2
    for run in children:
        assert run.data.tags["cycleqd.rejected"] == "true"
        assert run.data.params["rejected"] == "true" and run.data.params["entered"] == "-"
        assert run.data.metrics == {}
        assert run.data.params["mutation.kind"] == "gaussian"
        assert "cycleqd.model_id" not in run.data.tags


def test_null_tracker_is_silent(tiny_world, probe_evaluator, tmp_path):
    campaign = _campaign(tiny_world, probe_evaluator, tmp_path / "campaign", generations=1)
    tracker = NullTracker()
    _drive(campaign, tracker)
    tracker.close()
    campaign.close()
    assert tracker.missed() == []


def test_the_ui_opens_model_development_with_a_champion_and_the_kfp_run(
    tiny_world, probe_evaluator, tmp_path, monkeypatch
):
    """What MLflow 3's UI reads: the experiment's kind (its runs view, not the GenAI view),
    the User and Source columns, the Kubeflow run with its UI link, and the registered final
    model's `champion` alias on its latest version."""
    monkeypatch.setenv("CYCLEQD_KFP_UI", "https://kubeflow.example.com/pipeline/")
    monkeypatch.setenv("CYCLEQD_IMAGE", "ghcr.io/cycleqd/cpu-tools:1.0")
    campaign = _campaign(tiny_world, probe_evaluator, tmp_path / "run" / "campaign", generations=1)
    tracker = MLflowTracker(
        None, None, campaign.store.uri, registry_name="ui-final", kfp_run_id="run-42"
    )
    final = _drive(campaign, tracker)
    tracker.close()
    campaign.close()
    assert tracker.missed() == []
    client = _client(tracker.tracking_uri)
    experiment = client.get_experiment(tracker.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    top = client.get_run(tracker.campaign_run_id)
    assert top.data.tags["mlflow.source.type"] == "JOB"
    assert top.data.tags["mlflow.user"]
    assert top.data.tags["cycleqd.kfp_run_id"] == "run-42"
    assert top.data.tags["cycleqd.kfp_run_url"] == (
        "https://kubeflow.example.com/pipeline/#/runs/details/run-42"
    )
    assert top.data.tags["cycleqd.image"] == "ghcr.io/cycleqd/cpu-tools:1.0"
    champion = client.get_model_version_by_alias("ui-final", "champion")
    assert champion.tags["cycleqd.genome_id"] == final[0]
    # The LoggedModel lists its registered version (its page's "Model versions") and each
    # score once.
    model = client.get_logged_model(champion.source.removeprefix("models:/"))
    listed = json.loads(model.tags["mlflow.modelVersions"])
    assert listed == [{"name": "ui-final", "version": str(champion.version)}]
    keys = [m.key for m in model.metrics]
    assert sorted(keys) == sorted(set(keys)) == sorted(f"score.{s}" for s in final[1])


def test_pipeline_tasks_track_where_mlflow_tracking_uri_points(tmp_path, monkeypatch):
    """An empty tracking parameter falls back to $MLFLOW_TRACKING_URI (KFP's MLflow plugin
    injects it; the cycleqd-mlflow-client ConfigMap provides it), as MLflow users expect."""
    from cycleqd.tracking import resolve_tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("CYCLEQD_MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri("") == ""
    monkeypatch.setenv("CYCLEQD_MLFLOW_TRACKING_URI", "http://cycleqd-mlflow:5000")  # ConfigMap
    assert resolve_tracking_uri("") == "http://cycleqd-mlflow:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert resolve_tracking_uri("") == "http://mlflow:5000"
    assert resolve_tracking_uri("http://other:5000") == "http://other:5000"

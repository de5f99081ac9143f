"""The campaign's stages as functions of plain strings: what each Kubeflow component calls.

Every stage opens the campaign from its store URI, does one idempotent piece of work and
returns a small JSON-able value (ids, scores, URIs; never weights). `config_yaml` is what the
pipeline's `campaign_config` parameter gives: the document (YAML, or one-line JSON) or its URI
or path (`cycleqd.config.resolve_config_text`); the writing stages take `generations` to
reach, 0 for the config's. A retried task redoes
nothing that was committed; a new run resumes from the last complete generation.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections import Counter
from collections.abc import Iterator

from cycleqd import evaluation_service, experts
from cycleqd.campaign import Campaign
from cycleqd.config import CampaignConfig, load_config_text
from cycleqd.errors import ConfigError, CycleQDError
from cycleqd.evaluators import build_evaluator, preflight_evaluation
from cycleqd.experts import check_expert_specs, experts_to_train
from cycleqd.model_sources import check_models
from cycleqd.protocols import Evaluator, Tracker
from cycleqd.redact import redact_uri
from cycleqd.state import EXPORT_SCORES, CampaignLockedError, CampaignStore
from cycleqd.tracking import MLflowTracker, NullTracker, resolve_tracking_uri
from cycleqd.tracking.relay import RelayTracker

log = logging.getLogger(__name__)


def _tracker(
    tracking_uri: str, config: CampaignConfig, store: CampaignStore, owner: str | None
) -> Tracker:
    tracking_uri = resolve_tracking_uri(tracking_uri)
    if not tracking_uri:
        return NullTracker()
    spec = {
        "tracking_uri": tracking_uri,
        "experiment": config.name,
        "campaign_uri": store.uri,
        "registry_name": f"{config.name}-final",
        "source": "cycleqd pipeline",
        "kfp_run_id": owner or None,  # a pipeline's tasks hold the lease as their run
    }
    if os.environ.get(evaluation_service.SOCKET_ENV):  # a local run's service relays events
        return RelayTracker(spec, evaluation_service.send_tracking)
    return MLflowTracker(**spec)


@contextlib.contextmanager
def open_campaign(
    config_yaml: str,
    store_uri: str,
    *,
    owner: str | None = None,
    tracking_uri: str = "",
    writer: bool = True,
    evaluator: Evaluator | None = None,
    generations: int = 0,
) -> Iterator[Campaign]:
    """`evaluator`: a warm one to use (the evaluation server's); by default one is built,
    lazily, from the config. `generations`: to reach, where not 0 (the config's)."""
    config = load_config_text(config_yaml, generations)
    store = CampaignStore(store_uri, owner=owner or None)
    tracker = _tracker(tracking_uri, config, store, owner) if writer else NullTracker()
    if evaluator is None:
        evaluator = build_evaluator(config)
    campaign = Campaign(config, store, evaluator, tracker, writer=writer)
    try:
        if writer:
            tracker.campaign_started(
                config, campaign.book, campaign.generation if campaign.generation >= 0 else None
            )
        yield campaign
    finally:
        campaign.close()
        for missed in tracker.missed():
            log.warning("tracking: MLflow did not receive %s", missed)


def preflight(
    config_yaml: str,
    store_uri: str,
    tracking_uri: str = "",
    owner: str = "",
    generations: int = 0,
) -> dict:
    """Fail fast, with what to fix: config, skills (data, database, sandbox, backend), store
    access, models, lease, MLflow. Nothing is written to the store before the checks that
    need no store have passed."""
    config = load_config_text(config_yaml, generations)
    preflight_evaluation(config)
    # Headers and config.json only (S3: ranged GETs): models that cannot be read stop the run
    # before anything is written to the store; the experts to fine-tune (their data, their
    # LoRA targets against the base's layers) before any GPU is requested.
    check_expert_specs(config, check_models(config.models))
    store = CampaignStore(store_uri)
    store.check_writable()
    store.check_config(config)
    lease = store.read_lease()
    if lease is not None and lease.owner != owner and lease.is_live():
        raise CampaignLockedError(store.locked_message(lease))
    tracking_uri = resolve_tracking_uri(tracking_uri)
    if tracking_uri:
        _check_mlflow(tracking_uri)
    latest = store.latest_generation()
    return {
        "campaign": config.name,
        "store_uri": store.uri,
        "latest_generation": -1 if latest is None else latest,
        "target_generations": config.generations,
        "experts_to_train": experts_to_train(config),
    }


def _check_mlflow(tracking_uri: str) -> None:
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    from mlflow import MlflowClient

    try:
        MlflowClient(tracking_uri).search_experiments(max_results=1)
    except Exception as exc:  # any failure here means: not reachable as configured
        raise CycleQDError(
            f"MLflow at {redact_uri(tracking_uri)} is not reachable ({type(exc).__name__}); "
            "check the tracking URI, or leave it empty to run without tracking"
        ) from None


def train_expert(config_yaml: str, store_uri: str, skill: str, tracking_uri: str = "") -> dict:
    """The experts stage for one skill: fine-tune its expert from the base and publish it in
    the campaign store (once; a rerun resumes from its checkpoints or reuses it)."""
    config = load_config_text(config_yaml)
    return experts.train_expert(config, store_uri, skill, resolve_tracking_uri(tracking_uri))


def seed(
    config_yaml: str,
    store_uri: str,
    tracking_uri: str = "",
    owner: str = "",
    generations: int = 0,
) -> int:
    """Generation 0 (the experts in the archives), once; returns the last complete generation."""
    with open_campaign(
        config_yaml, store_uri, owner=owner, tracking_uri=tracking_uri, generations=generations
    ) as c:
        c.seed()
        return c.generation


def shard(genome_ids: list[str], shards: int) -> list[str]:
    """Children dealt round-robin into at most `shards` groups, each a comma-separated string
    (a ParallelFor item): one evaluation task per group keeps one warm engine for several
    children instead of starting an engine per child."""
    if shards < 1:
        raise ConfigError(f"shards must be at least 1, got {shards}")
    groups = [genome_ids[i::shards] for i in range(min(shards, len(genome_ids)))]
    return [",".join(group) for group in groups]


def breed(config_yaml: str, store_uri: str, owner: str = "", generations: int = 0) -> list[str]:
    """The next generation's child genome ids; empty once the campaign reached its target
    (`generations`, where not 0, else the config's)."""
    with open_campaign(config_yaml, store_uri, owner=owner, generations=generations) as c:
        if c.generation < 0:
            raise CycleQDError(f"{c.store.uri} is not seeded yet; run the seed step first")
        if c.generation >= c.config.generations:
            return []
        return c.breed_next()


def evaluate(config_yaml: str, store_uri: str, genome_id: str) -> dict:
    """Materialise one child and score it on every skill (kept in the store for the commit)."""
    return evaluate_many(config_yaml, store_uri, [genome_id])[0]


def check_pending(campaign: Campaign, genome_ids: list[str]) -> None:
    """Refuse children that are not the next generation's (a stale or foreign task)."""
    pending = campaign.load_pending()
    strangers = [g for g in genome_ids if g not in pending]
    if strangers:
        raise CycleQDError(
            f"child(ren) {', '.join(strangers)} not in generation {campaign.generation + 1} of "
            f"{campaign.store.uri}"
        )


def evaluate_many(
    config_yaml: str,
    store_uri: str,
    genome_ids: list[str],
    evaluator: Evaluator | None = None,
    timings: Counter[str] | None = None,
) -> list[dict]:
    """Evaluate children in a row with one warm evaluator; children already evaluated (by an
    earlier attempt of a retried task) are read back, not scored again. `evaluator`: a warm
    one (the evaluation server's); by default one is built from the config. `timings` gets
    the campaign's seconds by part added (`Campaign.timings`)."""
    with open_campaign(config_yaml, store_uri, writer=False, evaluator=evaluator) as c:
        check_pending(c, genome_ids)
        records = [c.evaluate_child(g) for g in genome_ids]
        if timings is not None:
            timings.update(c.timings)
        return records


def commit(
    config_yaml: str,
    store_uri: str,
    tracking_uri: str = "",
    owner: str = "",
    generations: int = 0,
) -> dict:
    """Insert the evaluated children into the archives and commit the generation."""
    with open_campaign(
        config_yaml, store_uri, owner=owner, tracking_uri=tracking_uri, generations=generations
    ) as c:
        generation = c.generation + 1
        pending = c.store.get_json(c.store.pending_key(generation))
        results = c.commit_next() if pending else []
        if pending and owner:  # what this run did, for its exit handler (`release`)
            record = c.store.get_json(c.store.run_key(owner)) or {"committed": []}
            record["committed"] = sorted({*record["committed"], generation})
            c.store.put_json(c.store.run_key(owner), record)
        summary = {
            "generation": c.generation,
            "committed": bool(pending),
            "children": [
                {
                    "genome_id": r.genome_id,
                    "skill": r.skill,
                    "scores": r.scores,
                    "entered": r.entered,
                }
                for r in results
            ],
            "archives": {
                s: {"elites": len(c.archives[s].cells), "best": c.archives[s].best().quality}
                for s in c.archives.names
            },
        }
    # After close (the tracker's last delivery attempt): this task ends here, so what MLflow
    # has not received is reported in the task's output rather than only in its log.
    summary["tracking_missed"] = [str(m) for m in c.tracker.missed()]
    return summary


# The GPU stages that `plan` decides on (its answers' keys).
PLANNED_STAGES = ("seed", "export")


def plan(config_yaml: str, store_uri: str) -> dict:
    """What the GPU stages have left to do, read from the store on the CPU: `seed`, whether
    the campaign is not seeded yet; `export`, whether the final genome of its last committed
    archives (`final_genome_id`) has no complete export yet. The pipeline runs seed and export
    only when they do, so a rerun of a seeded or finished campaign holds no GPU for them."""
    latest = CampaignStore(store_uri).latest_generation()
    if latest is None:
        return {"latest_generation": -1, "seed": True, "final_genome_id": None, "export": True}
    with open_campaign(config_yaml, store_uri, writer=False) as c:
        final_id = c.final_genome_id()
        exported = c.store.completed_export(final_id) is not None
    return {
        "latest_generation": latest,
        "seed": False,
        "final_genome_id": final_id,
        "export": not exported,
    }


def export(
    config_yaml: str,
    store_uri: str,
    tracking_uri: str = "",
    owner: str = "",
    generations: int = 0,
) -> dict:
    """Build the final model by the config's `final.method` (`merge_best`: the best elite of
    every archive merged with softmax weights; `best_mean`: the elite with the best mean
    score), score it and write it to the store's exports (registered with the tracker).

    Once: when `exports/<final id>/` is already complete (an earlier run or attempt exported
    the same final model), nothing is scored or written and the export is read back;
    `written` says which."""
    with open_campaign(
        config_yaml, store_uri, owner=owner, tracking_uri=tracking_uri, generations=generations
    ) as c:
        genome_id = c.final_genome_id()
        previous = c.store.completed_export(genome_id)
        if previous is None:
            scores = c.evaluate(genome_id)
            files = {
                "genome.json": json.dumps(c.book[genome_id].to_dict()),
                EXPORT_SCORES: json.dumps(scores),
            }
            sha = c.export(genome_id, scores, files)
        else:
            sha, scores = previous["sha256"], previous["scores"]
        summary = {
            "genome_id": genome_id,
            "uri": c.store.model_uri(genome_id, "exports"),
            "sha256": sha,
            "scores": scores,
            "generation": c.generation,
            "method": c.config.final.method,
            "written": previous is None,
        }
    summary["tracking_missed"] = [str(m) for m in c.tracker.missed()]
    return summary


def final_model_card(export_summary: dict) -> dict:
    """What identifies an exported final model (`export`'s summary): where it is in the
    campaign store, its genome id, the sha256 of its weights, its score per skill, the final
    method and the generation it was built from."""
    return {
        key: export_summary[key]
        for key in ("uri", "genome_id", "sha256", "scores", "method", "generation")
    }


def release(store_uri: str, owner: str, config_yaml: str = "", generations: int = 0) -> dict:
    """What the pipeline's exit handler does, whatever happened before: stop the run's warm
    evaluators (if it started any), give back its lease, and say where the campaign stands
    (with its config): `done` (the target reached), `progressed` (this run committed a
    generation), for the run's follow-up (`pipelines.continuation`)."""
    from cycleqd import warm_evaluators

    store = CampaignStore(store_uri)
    state: dict = {}
    try:
        try:
            run = store.get_json(store.run_key(owner)) if owner else None
            latest = store.latest_generation()
            state["latest_generation"] = -1 if latest is None else latest
            if config_yaml:
                target = load_config_text(config_yaml, generations).generations
                state["done"] = latest is not None and latest >= target
                state["progressed"] = bool((run or {}).get("committed"))
        except CycleQDError as exc:  # the evaluators and the lease go back regardless
            state = {"error": str(exc)}
        warm_evaluators.stop(store_uri, owner)
    finally:
        CampaignStore(store_uri, owner=owner).release(shared=True)
        if owner:
            store.store.delete_prefix(store.run_prefix(owner))
    return state


def elite_maps_html(config_yaml: str, store_uri: str) -> str:
    """One heatmap per archive of the last committed generation, as a self-contained HTML
    page (inline SVG, each elite's scores in its tooltip) for the Kubeflow UI."""
    import html

    from cycleqd.archive import ArchiveSet
    from cycleqd.elite_maps import maps_of, to_svg

    config = load_config_text(config_yaml)
    store = CampaignStore(store_uri)
    latest = store.latest_generation()
    if latest is None:
        return "<p>no generation committed yet</p>"
    archives = ArchiveSet.for_config(config)
    archives.load_dict(store.read_snapshot(latest)["archives"])
    maps = [to_svg(data, latest) for data in maps_of(archives).values()]
    title = f"{html.escape(config.name)}: archives after generation {latest}"
    return f"<h3>{title}</h3>\n" + "\n".join(maps)

"""A run's warm evaluators from start to stop: what the pipeline's `start evaluators` task and
its exit handler do, and how an evaluation task finds them.

`start` creates the run's evaluators (`evaluator_launch`) and writes their registry into the
campaign store; `stop` deletes them and the registry; `registry_for` is how an evaluation
task learns, from its run's id, whether its run has any (else it evaluates in its own process
as before). A retried `start` keeps the first attempt's token: evaluators already running
(vLLM reads its API key once, at start) keep answering.
"""

from __future__ import annotations

import logging
import secrets

from cycleqd.errors import CycleQDError
from cycleqd.evaluator_launch import EvaluatorSpec, launcher_for
from cycleqd.evaluator_pool import EvaluatorRegistry, require_skills_scorer
from cycleqd.state import CampaignStore

log = logging.getLogger(__name__)


def spec_for(config, owner: str, count: int, launcher_kind: str) -> EvaluatorSpec:
    """What each evaluator serves: the campaign's base with its backend's settings (vLLM's
    on a cluster; the transformers backend's for local processes)."""
    backend = config.evaluation.backend
    extra: tuple[str, ...] = ()
    if launcher_kind == "local":
        extra = (
            "--device",
            getattr(backend, "device", "cpu"),
            "--batch-size",
            str(getattr(backend, "batch_size", 16)),
            "--threads",
            str(getattr(backend, "threads", 0) or 1),
        )
    return EvaluatorSpec(
        owner=owner,
        count=count,
        base_location=str(config.models.base),
        dtype=backend.dtype or config.dtype,
        seed=config.seed,
        max_model_len=getattr(backend, "max_model_len", None),
        gpu_memory_utilization=getattr(backend, "gpu_memory_utilization", 0.85),
        tensor_parallel_size=getattr(backend, "tensor_parallel_size", 1),
        extra_args=extra,
    )


def start(
    config_yaml: str,
    store_uri: str,
    owner: str,
    count: int,
    launcher: str = "auto",
    settings_json: str = "",
) -> list[dict[str, str]]:
    """Create the run's `count` evaluators (at once; they warm up while the run seeds) and
    register them; returns their names and addresses."""
    from cycleqd.config import load_config_text

    if count < 1:
        raise CycleQDError(f"warm evaluators: count must be at least 1, got {count}")
    if not owner:
        raise CycleQDError("warm evaluators belong to a run: its id (run_owner) is empty")
    config = load_config_text(config_yaml)
    require_skills_scorer(config, "warm evaluators", "compile without warm evaluators")
    store = CampaignStore(store_uri)
    chosen = launcher_for(launcher, settings_json)
    previous = EvaluatorRegistry.load(store, owner)
    if previous is not None and previous.launcher == "local":
        chosen.stop(previous.to_json())  # a retried start: local processes are started afresh
    token = previous.token if previous is not None else secrets.token_urlsafe(32)
    created = chosen.start(spec_for(config, owner, count, chosen.kind), token)
    registry = EvaluatorRegistry(
        owner, chosen.kind, token, created["evaluators"], created.get("resources", {})
    )
    registry.save(store)
    log.info(
        "run %s: %d warm evaluator(s) (%s): %s",
        owner,
        count,
        chosen.kind,
        ", ".join(e["url"] for e in registry.evaluators),
    )
    return [{"name": e["name"], "url": e["url"]} for e in registry.evaluators]


def stop(store_uri: str, owner: str) -> bool:
    """Delete the run's evaluators and their registry; False where it had none."""
    store = CampaignStore(store_uri)
    registry = EvaluatorRegistry.load(store, owner)
    if registry is None:
        return False
    launcher_for(registry.launcher).stop(registry.to_json())
    store.store.delete(store.evaluators_key(owner))
    return True


def registry_for(store_uri: str, owner: str) -> EvaluatorRegistry | None:
    return EvaluatorRegistry.load(CampaignStore(store_uri), owner) if owner else None

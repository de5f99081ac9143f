"""A run's warm evaluators, as the evaluation tasks use them: find one, hold it for one child,
move the child to another when it dies.

The run's registry (`evaluator_launch.base`) lists the evaluators and their token. A task
holds an evaluator while it scores one child on it (a swap, then the skills' batches): two
tasks on one engine would swap each other's weights mid-evaluation. A hold is a small object
in the campaign store, `runs/<run>/holds/<evaluator>.json` (holder, expiry), taken with a
compare-and-swap where the store has conditional writes (S3 If-None-Match / If-Match, a lock
locally) and by write-then-read-back elsewhere; it is given back after the child, and expires
(`HOLD_TTL_S`) if its task dies holding it.

Each task starts at its own evaluator (a hash of its children), so that with as many tasks as
evaluators each keeps its engine; it takes any free one when its own is busy or gone. An
evaluator that fails mid-child (connection refused or reset, a timeout, HTTP 5xx) is left
alone for `RETRY_DEAD_S` and the child is scored again from the start on another: its scores
are written to the store only once complete, so nothing is scored twice and nothing is lost.
A restarted evaluator (Kubernetes restarts a StatefulSet's pod) is used again once its
/health answers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import socket
import time
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from cycleqd.errors import CycleQDError
from cycleqd.generate.server_backend import EvaluatorUnavailableError, ServerBackend
from cycleqd.objectstore import StorePreconditionError
from cycleqd.state import CampaignStore

log = logging.getLogger(__name__)

HOLD_TTL_S = 30 * 60.0  # one child's evaluation at 8B with room; renewed per child
RETRY_DEAD_S = 30.0  # a failed evaluator is asked again (its /health) after this long
WAIT_S_ENV = "CYCLEQD_EVALUATOR_WAIT_S"
DEFAULT_WAIT_S = 45 * 60.0  # engines start while seeding runs; vLLM at 8B: minutes


@dataclass
class EvaluatorRegistry:
    owner: str
    launcher: str
    token: str
    evaluators: list[dict[str, str]]
    resources: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, store: CampaignStore, owner: str) -> EvaluatorRegistry | None:
        record = store.get_json(store.evaluators_key(owner)) if owner else None
        if not record:
            return None
        return cls(
            record["owner"],
            record["launcher"],
            record["token"],
            list(record["evaluators"]),
            dict(record.get("resources") or {}),
        )

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, store: CampaignStore) -> None:
        store.put_json(store.evaluators_key(self.owner), self.to_json())

    def names(self) -> list[str]:
        return [e["name"] for e in self.evaluators]


class EvaluatorPool:
    """Holds on a run's evaluators for one task (`holder`)."""

    def __init__(
        self,
        store: CampaignStore,
        registry: EvaluatorRegistry,
        holder: str | None = None,
        wait_s: float | None = None,
        ttl_s: float = HOLD_TTL_S,
        seed: int = 0,
    ) -> None:
        """`seed`: sampling's seed in generation requests (the campaign's)."""
        if not registry.evaluators:
            raise CycleQDError(f"run {registry.owner} has no warm evaluators in its registry")
        self.store, self.registry, self.ttl_s = store, registry, ttl_s
        self.holder = holder or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.wait_s = (
            wait_s if wait_s is not None else float(os.environ.get(WAIT_S_ENV, DEFAULT_WAIT_S))
        )
        self._backends = {
            e["name"]: ServerBackend(e["url"], registry.token, seed=seed)
            for e in registry.evaluators
        }
        self._failed_at: dict[str, float] = {}
        self.failures = 0

    @contextlib.contextmanager
    def held(self, prefer: int = 0) -> Iterator[tuple[str, ServerBackend]]:
        """An evaluator held for the block: (its name, its backend)."""
        name = self._acquire(prefer)
        try:
            yield name, self._backends[name]
        finally:
            self._give_back(name)

    def backend(self, name: str) -> ServerBackend:
        """The chat backend of evaluator `name` (nothing is held by asking)."""
        return self._backends[name]

    def failed(self, name: str, error: Exception) -> None:
        """`name` failed mid-child: left alone for a while, its child goes elsewhere."""
        self.failures += 1
        self._failed_at[name] = time.monotonic()
        log.warning("evaluator %s failed (%s): its child goes to another evaluator", name, error)

    def _acquire(self, prefer: int) -> str:
        names = self.registry.names()
        order = names[prefer % len(names) :] + names[: prefer % len(names)]
        deadline = time.monotonic() + self.wait_s
        pause = 0.2
        while True:
            for name in order:
                failed = self._failed_at.get(name)
                if failed is not None and time.monotonic() - failed < RETRY_DEAD_S:
                    continue
                # /health first: while engines start, tasks ask them, not the store.
                if not self._backends[name].healthy() or not self._take(name):
                    continue
                self._failed_at.pop(name, None)
                return name
            if time.monotonic() > deadline:
                raise EvaluatorUnavailableError(
                    f"no warm evaluator of run {self.registry.owner} was free and answering "
                    f"within {self.wait_s:.0f} s ({', '.join(names)}); see the evaluators' "
                    "logs (kubectl logs -l cycleqd.ai/run=<run>), or raise "
                    f"${WAIT_S_ENV} if their engines start slowly"
                )
            time.sleep(pause)
            pause = min(pause * 1.5, 5.0)  # many tasks waiting: a few store reads a second

    # -- holds ---------------------------------------------------------------------------------

    def _key(self, name: str) -> str:
        return self.store.evaluator_hold_key(self.registry.owner, name)

    def _record(self) -> bytes:
        return json.dumps({"holder": self.holder, "expires": time.time() + self.ttl_s}).encode()

    def _take(self, name: str) -> bool:
        key, objects = self._key(name), self.store.store
        if objects.conditional_writes():
            try:
                data, version = objects.get_versioned(key)
            except Exception:  # none yet
                data, version = None, None
            if data is not None and _live_other(data, self.holder):
                return False
            try:
                objects.put_if(key, self._record(), version)
            except StorePreconditionError:
                return False  # another task got there first
            return True
        # Without conditional writes: write, then read back (a racer's write replaces ours).
        current = self.store.get_json(key)
        if current is not None and _live_other(json.dumps(current).encode(), self.holder):
            return False
        objects.put_bytes(key, self._record())
        time.sleep(0.05)
        current = self.store.get_json(key)
        return current is not None and current.get("holder") == self.holder

    def _give_back(self, name: str) -> None:
        key = self._key(name)
        with contextlib.suppress(Exception):  # an expired hold is as good as given back
            current = self.store.get_json(key)
            if current is not None and current.get("holder") == self.holder:
                self.store.store.delete(key)


def _live_other(data: bytes, holder: str) -> bool:
    try:
        record = json.loads(data)
        return record.get("holder") != holder and float(record["expires"]) > time.time()
    except (ValueError, KeyError, TypeError, AttributeError):
        return False  # an unreadable hold protects nothing


def require_skills_scorer(config, what: str, fix: str) -> None:
    """Warm evaluators serve a chat model: the probe scorer, which scores weights in the
    task, cannot use them (ConfigError: `what`, and `fix`)."""
    from cycleqd.errors import ConfigError

    if config.evaluation.scorer != "skills":
        raise ConfigError(
            f"{what} serve a chat model to the skills; evaluation.scorer "
            f"{config.evaluation.scorer!r} scores in the task: {fix}"
        )


def preferred_evaluator(genome_ids: list[str]) -> int:
    """The task's own evaluator index: stable for a group of children, spread over groups."""
    return zlib.crc32(",".join(genome_ids).encode())


def evaluate_with_pool(
    config_yaml: str, store_uri: str, genome_ids: list[str], registry: EvaluatorRegistry
) -> list[dict]:
    """Score children on the run's warm evaluators, one held evaluator per child; children
    already scored (by an earlier attempt) are read back from the store."""
    from cycleqd.config import load_config_text
    from cycleqd.evaluators import skills_evaluator
    from cycleqd.steps import check_pending, open_campaign

    config = load_config_text(config_yaml)
    require_skills_scorer(config, "warm evaluators", "run without them")
    store = CampaignStore(store_uri)
    pool = EvaluatorPool(store, registry, seed=config.seed)
    prefer = preferred_evaluator(genome_ids)
    evaluator = skills_evaluator(config, backend=pool.backend(registry.names()[0]))
    records = []
    with open_campaign(config_yaml, store_uri, writer=False, evaluator=evaluator) as campaign:
        check_pending(campaign, genome_ids)
        for genome_id in genome_ids:
            while True:
                with pool.held(prefer) as (name, backend):
                    evaluator.backend = backend
                    try:
                        records.append(campaign.evaluate_child(genome_id))
                        break
                    except EvaluatorUnavailableError as exc:
                        pool.failed(name, exc)
    return records

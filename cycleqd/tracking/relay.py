"""Tracking through a local run's service: tasks hand their events over and return.

Through kfp.local every task is a fresh process, and a commit task that tracks in MLflow itself
pays for importing mlflow, opening its database and finding the campaign's runs again: seconds
per generation against a fraction of one without tracking. So where the run has its service
(`cycleqd.evaluation_service`, named in the tasks' environment), a task's tracker is a
`RelayTracker`: each event goes to the service as JSON (the config, the genome book, the
archives, the children's results) and the task goes on. The service keeps one warm
`MLflowTracker` per campaign and delivers the events in the order they came, in a thread of its
own; at the end of the run the driver asks it to deliver what is left and close.

When the service cannot be reached, the task's tracker falls back to its own `MLflowTracker`
(as on a cluster, where there is no such service), replaying the campaign's start first:
nothing is lost, it only costs the time it did before.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import queue
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from cycleqd.protocols import ChildResult, DatasetRef, Tracker

if TYPE_CHECKING:
    from cycleqd.archive import ArchiveSet
    from cycleqd.config import CampaignConfig
    from cycleqd.genome import GenomeBook
    from cycleqd.tracking.queue import Missed

log = logging.getLogger(__name__)

# What an MLflowTracker is built from (its keyword arguments), sent with every event.
TrackerSpec = dict[str, Any]
Send = Callable[[dict], bool]  # hands a message to the service; False: it cannot be reached


class RelayTracker:
    """A task's side: events to the run's service, or to a tracker of its own when the
    service is gone."""

    def __init__(self, spec: TrackerSpec, send: Send) -> None:
        self.spec = spec
        self._send = send
        self._own: Tracker | None = None
        self._started: tuple | None = None  # campaign_started's arguments, to replay

    def campaign_started(
        self,
        config: CampaignConfig,
        book: GenomeBook,
        resumed_from: int | None,
        datasets: Mapping[str, DatasetRef] | None = None,
    ) -> None:
        self._started = (config, book, resumed_from, datasets)
        self._relay(
            "campaign_started",
            {
                "config": config.model_dump(mode="json"),
                "book": book.to_list(),
                "resumed_from": resumed_from,
                "datasets": {k: list(v) for k, v in (datasets or {}).items()},
            },
            lambda t: t.campaign_started(config, book, resumed_from, datasets),
        )

    def generation_done(
        self, generation: int, results: list[ChildResult], archives: ArchiveSet, book: GenomeBook
    ) -> None:
        self._relay(
            "generation_done",
            {
                "generation": generation,
                "results": [dataclasses.asdict(r) for r in results],
                "archives": archives.to_dict(),
                "book": book.to_list(),
            },
            lambda t: t.generation_done(generation, results, archives, book),
        )

    def model_exported(
        self,
        genome_id: str,
        scores: dict[str, float] | None,
        uri: str,
        sha256: str,
        book: GenomeBook,
    ) -> None:
        self._relay(
            "model_exported",
            {
                "genome_id": genome_id,
                "scores": scores,
                "uri": uri,
                "sha256": sha256,
                "book": book.to_list(),
            },
            lambda t: t.model_exported(genome_id, scores, uri, sha256, book),
        )

    def close(self) -> None:
        """The service delivers and closes at the end of the run; a tracker of this task's
        own is closed here."""
        if self._own is not None:
            self._own.close()

    def missed(self) -> list[Missed]:
        return self._own.missed() if self._own is not None else []

    def _relay(self, event: str, payload: dict, fallback: Callable[[Tracker], None]) -> None:
        if self._own is None and self._send(
            {"op": "track", "spec": self.spec, "event": event, **payload}
        ):
            return
        if self._own is None:
            from cycleqd.tracking.mlflow_tracker import MLflowTracker

            log.warning("tracking: the run's service is gone; this task tracks on its own")
            self._own = MLflowTracker(**self.spec)
            if event != "campaign_started" and self._started is not None:
                self._own.campaign_started(*self._started)
        fallback(self._own)


class TrackingRelay:
    """The service's side: one MLflowTracker per campaign (per spec), fed in arrival order by
    one thread, so that a task's events are queued in the time it takes to read them."""

    def __init__(self) -> None:
        self._events: queue.Queue[dict | None] = queue.Queue()
        self._trackers: dict[str, tuple[Tracker, CampaignConfig | None]] = {}
        self._worker = threading.Thread(target=self._deliver, name="tracking-relay", daemon=True)
        self._worker.start()

    def submit(self, message: dict) -> None:
        self._events.put(message)

    def close(self) -> list[str]:
        """Deliver what is queued, close every tracker; what MLflow did not take."""
        self._events.put(None)
        self._worker.join()
        missed = []
        for tracker, _config in self._trackers.values():
            tracker.close()
            missed += [str(m) for m in tracker.missed()]
        return missed

    def _deliver(self) -> None:
        while (message := self._events.get()) is not None:
            try:
                self._apply(message)
            except Exception:  # tracking never stops the run: the tracker reports its misses
                log.exception("tracking relay: event %s not applied", message.get("event"))

    def _apply(self, message: dict) -> None:
        from cycleqd.archive import ArchiveSet
        from cycleqd.config import CampaignConfig
        from cycleqd.genome import GenomeBook
        from cycleqd.tracking.mlflow_tracker import MLflowTracker

        key = json.dumps(message["spec"], sort_keys=True)
        tracker, config = self._trackers.get(key) or (MLflowTracker(**message["spec"]), None)
        book = GenomeBook()
        book.load_list(message["book"])
        event = message["event"]
        if event == "campaign_started":
            started = CampaignConfig.model_validate(message["config"])
            # Every task of a run starts the campaign again; the warm tracker has it already.
            if config is None or started != config:
                datasets = {k: tuple(v) for k, v in message["datasets"].items()}
                tracker.campaign_started(started, book, message["resumed_from"], datasets)
            config = started
        elif config is None:
            raise ValueError(f"{event} before the campaign started")
        elif event == "generation_done":
            archives = ArchiveSet.for_config(config)
            archives.load_dict(message["archives"])
            results = [ChildResult(**r) for r in message["results"]]
            tracker.generation_done(message["generation"], results, archives, book)
        elif event == "model_exported":
            tracker.model_exported(
                message["genome_id"], message["scores"], message["uri"], message["sha256"], book
            )
        self._trackers[key] = (tracker, config)

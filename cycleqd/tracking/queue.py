"""The retry queue between a tracker's hooks and MLflow: tracking never stops the search.

Each hook queues an event of small steps; steps are delivered in order and each is removed
only once MLflow has taken it. When MLflow cannot be reached, the event stays queued
(bounded: the oldest droppable events are dropped first) and delivery resumes on the next
event or at a forced delivery; `missed()` lists what is not delivered. A step MLflow rejects
outright is skipped, with the steps of its group after it, and reported as lost.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass

from cycleqd.redact import redact_text

log = logging.getLogger(__name__)

Step = tuple[str, str, Callable[[], None]]  # (group, what, step): a failed step skips its group

_UNREACHABLE_HINTS = (
    "failed with exception",
    "max retries exceeded",
    "connection refused",
    "connectionerror",
    "timed out",
    "read timeout",
    "name or service not known",
    "remotedisconnected",
    "connection aborted",
    "connection reset",
)
_TRANSIENT_TRIES = 5  # a step failing with a transient error is given up after as many tries


@dataclass(frozen=True)
class Missed:
    """An event (or one step of it) that MLflow has not received.

    `lost` is False while it is still queued for delivery, True where it never will be
    (dropped from a full queue, or rejected by MLflow)."""

    event: str
    detail: str
    lost: bool = False

    def __str__(self) -> str:
        state = "lost" if self.lost else "pending"
        return f"{self.event} ({state}): {self.detail}"


@dataclass
class Event:
    """What one hook queued: its steps still to deliver, and how delivery last went."""

    label: str
    steps: deque[Step]
    droppable: bool = True
    attempts: int = 0  # failed delivery attempts of the current step
    error: str | None = None


class Rejected(Exception):
    """A step that cannot succeed (bad data, MLflow said no): skip it, do not retry."""


def error_kind(exc: BaseException) -> str:
    """'unreachable' (retry forever), 'transient' (retry a few times) or 'rejected'."""
    if isinstance(exc, Rejected):
        return "rejected"
    text = f"{type(exc).__name__} {exc}".lower()
    if isinstance(exc, (ConnectionError, TimeoutError)) or any(
        h in text for h in _UNREACHABLE_HINTS
    ):
        return "unreachable"
    code = getattr(exc, "error_code", None)
    if code is not None:  # an MlflowException: the server (or store) answered
        if code in ("INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"):
            return "transient"
        return "rejected"
    if isinstance(exc, OSError) or "operationalerror" in text or "database is locked" in text:
        return "transient"
    return "rejected"  # a bug on our side: retrying would fail the same way


def _short(exc: BaseException, limit: int = 300) -> str:
    # MLflow's errors name the request URL, userinfo included: mask it (logged and reported).
    text = " ".join(redact_text(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class RetryQueue:
    """Events delivered in order, kept while MLflow is away.

    max_pending: events kept; beyond, the oldest droppable events are dropped (lost).
    retry_interval: after a failed delivery, seconds during which new events are only queued.
    connection: the context every delivery runs in (the HTTP settings of the tracker).
    """

    def __init__(
        self,
        max_pending: int,
        retry_interval: float,
        connection: Callable[[], AbstractContextManager[None]],
    ) -> None:
        if max_pending < 1:
            raise ValueError("max_pending must be at least 1")
        self.max_pending = max_pending
        self.retry_interval = retry_interval
        self._connection = connection
        self._pending: deque[Event] = deque()
        self._lost: deque[Missed] = deque(maxlen=1000)
        self._lost_count = 0
        self._last_failure: float | None = None
        self._current: Event | None = None

    @property
    def empty(self) -> bool:
        return not self._pending

    @property
    def retrying(self) -> bool:
        """Whether the step being delivered failed before: it may have partly happened."""
        return self._current is not None and self._current.attempts > 0

    def add(
        self, label: str, steps: Iterable[Step], *, droppable: bool, deliver: bool = True
    ) -> None:
        """Queue an event (dropping the oldest droppable ones past `max_pending`); with
        `deliver`, try to deliver the queue unless a delivery failed moments ago."""
        self._pending.append(Event(label, deque(steps), droppable=droppable))
        while len(self._pending) > self.max_pending:
            victim = next((e for e in self._pending if e.droppable and e.attempts == 0), None)
            victim = victim or next((e for e in self._pending if e.droppable), None)
            if victim is None:
                break
            self._pending.remove(victim)
            self._lose(Missed(victim.label, "dropped: too many events queued", lost=True))
        if deliver:
            self.deliver()

    def deliver(self, force: bool = False) -> None:
        """Deliver what is queued, up to the first step MLflow cannot take now. Without
        `force`, nothing is tried within `retry_interval` of a failed delivery."""
        if not self._pending:
            return
        if (
            not force
            and self._last_failure is not None
            and time.monotonic() - self._last_failure < self.retry_interval
        ):
            return
        with self._connection():
            try:
                self._deliver_all()
            finally:
                self._current = None

    def missed(self) -> list[Missed]:
        """Queued events first (still to be delivered), then what was lost."""
        out = [
            Missed(e.label, e.error or f"queued ({len(e.steps)} steps)", lost=False)
            for e in self._pending
        ]
        out.extend(self._lost)
        if self._lost_count > len(self._lost):
            out.append(
                Missed("earlier events", f"{self._lost_count - len(self._lost)} more", lost=True)
            )
        return out

    def _lose(self, missed: Missed) -> None:
        self._lost.append(missed)
        self._lost_count += 1
        log.warning("tracking: %s", missed)

    def _deliver_all(self) -> None:
        while self._pending:
            event = self._pending[0]
            self._current = event
            while event.steps:
                group, what, step = event.steps[0]
                try:
                    step()
                except Exception as exc:
                    kind = error_kind(exc)
                    event.attempts += 1
                    event.error = f"{what}: {type(exc).__name__}: {_short(exc)}"
                    if kind == "rejected" or (
                        kind == "transient" and event.attempts >= _TRANSIENT_TRIES
                    ):
                        log.debug("tracking: step rejected", exc_info=True)
                        self._lose(Missed(event.label, event.error, lost=True))
                        # What follows in the same group depends on this step: skip it too.
                        event.steps = deque(s for s in event.steps if s[0] != group)
                        event.attempts = 0
                        continue
                    self._last_failure = time.monotonic()
                    log.warning(
                        "tracking: MLflow unavailable, %s stays queued (%s)",
                        event.label,
                        event.error,
                    )
                    return
                event.steps.popleft()
                event.attempts = 0
                event.error = None
            self._pending.popleft()
        self._last_failure = None

"""What a campaign talks to, and what it hands over: the `Evaluator` that scores models, the
`Tracker` that records the campaign, and the `ChildResult` of each model scored.

A leaf module: it imports nothing from cycleqd at run time, so that the campaign, the
trackers and the evaluators can all depend on it without depending on one another.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

    from cycleqd.archive import ArchiveSet
    from cycleqd.config import CampaignConfig
    from cycleqd.genome import GenomeBook
    from cycleqd.tracking.queue import Missed

Tensors = Iterable[tuple[str, "torch.Tensor"]]
DatasetRef = tuple[str, str, str]  # (name, digest, source URI) of a skill's data set


@dataclass
class ChildResult:
    """A model scored in a generation (in generation 0: an expert) and the archives it
    entered; what the tracker records of it."""

    genome_id: str
    generation: int
    skill: str
    scores: dict[str, float] | None  # None: rejected (non-finite weights)
    entered: list[str] = field(default_factory=list)
    weights_uri: str | None = None  # where full weights were written, if they were
    sha256: str | None = None


# -- evaluators ---------------------------------------------------------------------------------


class Evaluator(Protocol):
    """Scores a model on every skill; each score is a quality in [0, 1].

    An evaluator may also offer (`EvaluatorBase` gives each a default that offers nothing):
    - `weight_buffers() -> Mapping[str, torch.Tensor] | None`, its warm model's tensors by
      checkpoint name: children are then materialised straight into them, and the `tensors`
      it receives are those same tensors (copying them is free);
    - `takes_requests` (True) and `evaluate_request(genome_id, request)`: the model is built
      where it runs (vLLM's GPU workers) from a small recipe (`vllm_worker.genome_request`),
      so no tensor is materialised in this process;
    - `reads_locations` (True, with `takes_requests`): the model is built in another pod (a
      warm evaluator), so requests name models by location (s3:// or a shared path), never
      by this process's folders;
    - `samples(genome_id) -> dict | None`: the per-sample details of the genome it scored
      last, kept in the store as its transcripts.
    """

    def evaluate(self, genome_id: str, tensors: Tensors) -> dict[str, float]: ...


class EvaluatorBase(ABC):
    """An `Evaluator` with every optional ability present, off by default: subclasses
    override the ones they offer, and callers use them without probing."""

    takes_requests: bool = False
    reads_locations: bool = False

    @abstractmethod
    def evaluate(self, genome_id: str, tensors: Tensors) -> dict[str, float]: ...

    def weight_buffers(self) -> Mapping[str, torch.Tensor] | None:
        return None

    def evaluate_request(self, genome_id: str, request: dict) -> dict[str, float]:
        raise NotImplementedError(
            f"{type(self).__name__} scores tensors; it takes no requests (takes_requests=False)"
        )

    def samples(self, genome_id: str) -> dict[str, Any] | None:
        return None

    def warm(self) -> None:
        """Load what scoring needs now, before the first model arrives (default: nothing
        is loaded lazily)."""
        return None


def as_evaluator(evaluator: Evaluator) -> EvaluatorBase:
    """`evaluator` as an `EvaluatorBase`: itself where it is one, else wrapped, so that code
    written against the bare protocol keeps working (its abilities are looked up on it)."""
    if isinstance(evaluator, EvaluatorBase):
        return evaluator
    return _DuckTypedEvaluator(evaluator)


class _DuckTypedEvaluator(EvaluatorBase):
    """An evaluator that only follows the protocol: each optional ability is used where the
    object has it, at each call (an object may offer one conditionally)."""

    def __init__(self, inner: Evaluator) -> None:
        self.inner = inner

    def evaluate(self, genome_id: str, tensors: Tensors) -> dict[str, float]:
        return self.inner.evaluate(genome_id, tensors)

    def weight_buffers(self) -> Mapping[str, torch.Tensor] | None:
        offer = getattr(self.inner, "weight_buffers", None)
        return offer() if offer is not None else None

    @property
    def takes_requests(self) -> bool:  # type: ignore[override]
        return bool(getattr(self.inner, "takes_requests", False))

    @property
    def reads_locations(self) -> bool:  # type: ignore[override]
        return bool(getattr(self.inner, "reads_locations", False))

    def evaluate_request(self, genome_id: str, request: dict) -> dict[str, float]:
        return self.inner.evaluate_request(genome_id, request)  # type: ignore[attr-defined]

    def samples(self, genome_id: str) -> dict[str, Any] | None:
        offer = getattr(self.inner, "samples", None)
        return offer(genome_id) if offer is not None else None

    def __repr__(self) -> str:
        return f"as_evaluator({self.inner!r})"


# -- trackers -----------------------------------------------------------------------------------


class Tracker(Protocol):
    """What a campaign reports. Implementations must never raise into the search."""

    def campaign_started(
        self,
        config: CampaignConfig,
        book: GenomeBook,
        resumed_from: int | None,
        datasets: Mapping[str, DatasetRef] | None = None,
    ) -> None: ...

    def generation_done(
        self,
        generation: int,
        results: list[ChildResult],
        archives: ArchiveSet,
        book: GenomeBook,
    ) -> None: ...

    def model_exported(
        self,
        genome_id: str,
        scores: dict[str, float] | None,
        uri: str,
        sha256: str,
        book: GenomeBook,
    ) -> None: ...

    def close(self) -> None: ...

    def missed(self) -> list[Missed]: ...

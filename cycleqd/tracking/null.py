"""The tracker of a campaign that records nothing (no tracking URI given)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cycleqd.tracking.queue import Missed


class NullTracker:
    """Tracks nothing."""

    def campaign_started(self, config, book, resumed_from, datasets=None) -> None:
        pass

    def generation_done(self, generation, results, archives, book) -> None:
        pass

    def model_exported(self, genome_id, scores, uri, sha256, book) -> None:
        pass

    def close(self) -> None:
        pass

    def missed(self) -> list[Missed]:
        return []

"""The campaign's final model, built from the last archives, one class per method.

To add a method: a class here with its `options` (tag `method`), registered with
`@FINAL_METHODS.register` (see docs/adding_a_variant.md).
"""

from __future__ import annotations

from abc import abstractmethod
from typing import TYPE_CHECKING, Literal

import numpy as np

from cycleqd.genome import Genome
from cycleqd.operators import aggregation_weights
from cycleqd.variants import Registry, Variant, VariantOptions

if TYPE_CHECKING:
    from cycleqd.archive import ArchiveSet


class FinalMethod(Variant):
    @abstractmethod
    def genome(self, archives: ArchiveSet, options: VariantOptions) -> Genome:
        """The final model's genome (kind `final`), its parents taken from the archives."""


FINAL_METHODS: Registry[FinalMethod] = Registry("final", tag="method", default="merge_best")


class MergeBestOptions(VariantOptions):
    method: Literal["merge_best"] = "merge_best"


@FINAL_METHODS.register
class MergeBest(FinalMethod):
    """The paper's: merge the best elite of every archive, theta = theta_base +
    sum_k beta_k tau_k with beta = softmax(qualities)."""

    options = MergeBestOptions

    def genome(self, archives, options):
        bests = [archives[name].best() for name in archives.names]
        beta = aggregation_weights(np.array([b.quality for b in bests]))
        return Genome(
            kind="final",
            parents=tuple(b.genome_id for b in bests),
            weights=tuple(float(b) for b in beta),
        )


class BestMeanOptions(VariantOptions):
    method: Literal["best_mean"] = "best_mean"


@FINAL_METHODS.register
class BestMean(FinalMethod):
    """The elite, over all archives, with the best mean score over the skills (the archives'
    best generalist). Where the experts stay the best of their own skill the paper's merge is
    little more than the experts' average; this keeps what the search found."""

    options = BestMeanOptions

    def genome(self, archives, options):
        elites = sorted(
            (e for name in archives.names for e in archives[name].cells.values()),
            key=lambda e: e.genome_id,  # ties: the same pick whatever the insertion order
        )
        if not elites:
            raise ValueError("the archives are empty: seed them with the experts first")
        best = max(elites, key=lambda e: sum(e.scores.values()) / len(e.scores))
        return Genome(kind="final", parents=(best.genome_id,), weights=(1.0,))

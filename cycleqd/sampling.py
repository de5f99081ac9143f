"""Parent sampling: how likely each elite of an archive is to become a parent, one class per
method; elite sampling maps normalised values to [a_lo, a_hi] by one of `FORMULAS`.

To add a method: a class here with its `options` (tag `method`), registered with
`@SAMPLING.register`; a formula: a function registered with `@formula(name)` (see
docs/adding_a_variant.md).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import Field, model_validator

from cycleqd.variants import Registry, Variant, VariantOptions

if TYPE_CHECKING:
    from cycleqd.archive import Archive, Cell

# name -> f(unit, a_lo, a_hi): values min-max normalised to [0, 1], mapped to weights.
Formula = Callable[[np.ndarray, float, float], np.ndarray]
FORMULAS: dict[str, Formula] = {}


def formula(name: str) -> Callable[[Formula], Formula]:
    def register(function: Formula) -> Formula:
        FORMULAS[name] = function
        return function

    return register


@formula("paper")
def _paper(unit: np.ndarray, a_lo: float, a_hi: float) -> np.ndarray:
    """a_lo + norm(v) * (a_hi - a_lo), as the paper writes it."""
    return a_lo + unit * (a_hi - a_lo)


@formula("official")
def _official(unit: np.ndarray, a_lo: float, a_hi: float) -> np.ndarray:
    """a_lo + norm(v) * a_hi, as the official code computes it."""
    return a_lo + unit * a_hi


class SamplingMethod(Variant):
    @abstractmethod
    def probabilities(
        self, archive: Archive, options: VariantOptions
    ) -> tuple[list[Cell], np.ndarray]:
        """Per-elite parent probabilities (summing to 1), cells in sorted order."""


SAMPLING: Registry[SamplingMethod] = Registry("sampling", tag="method", default="elite")


class EliteOptions(VariantOptions):
    method: Literal["elite"] = "elite"
    formula: Literal[tuple(FORMULAS)] = Field(  # type: ignore[valid-type]
        default="paper", description=f"how values map to weights: {', '.join(FORMULAS)}"
    )
    a_lo: float = Field(default=0.5, gt=0.0)
    a_hi: float = Field(default=0.8, gt=0.0)

    @model_validator(mode="after")
    def _bounds_are_ordered(self) -> EliteOptions:
        if not self.a_lo < self.a_hi:
            raise ValueError(f"a_lo ({self.a_lo}) must be smaller than a_hi ({self.a_hi})")
        return self


@SAMPLING.register
class EliteSampling(SamplingMethod):
    """The paper's (section 3): better and more specialised elites are likelier parents. An
    elite's weight is the product, over its quality and every BC coordinate (its cell
    index), of the min-max normalised value mapped to [a_lo, a_hi] by the formula."""

    options = EliteOptions

    def probabilities(self, archive, options: EliteOptions):
        cells = sorted(archive.cells)
        if not cells:
            return cells, np.zeros(0)
        scale = FORMULAS[options.formula]

        def weights(values: np.ndarray) -> np.ndarray:
            lo, hi = values.min(), values.max()
            if lo == hi:
                return np.ones_like(values, dtype=float)
            return scale((values - lo) / (hi - lo), options.a_lo, options.a_hi)

        probs = weights(np.array([archive.cells[c].quality for c in cells], dtype=float))
        coords = np.array(cells, dtype=float).reshape(len(cells), -1)
        for axis in range(coords.shape[1]):
            probs = probs * weights(coords[:, axis])
        total = probs.sum()
        if total <= 0:
            probs = np.ones(len(cells))
            total = float(len(cells))
        return cells, probs / total


class UniformOptions(VariantOptions):
    method: Literal["uniform"] = "uniform"


@SAMPLING.register
class UniformSampling(SamplingMethod):
    """Every elite alike (the ablation without elite sampling)."""

    options = UniformOptions

    def probabilities(self, archive, options):
        cells = sorted(archive.cells)
        return cells, np.full(len(cells), 1.0 / max(len(cells), 1))

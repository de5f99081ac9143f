"""Crossover: how a child's parents are merged, one class per method.

A method draws the merge weights of the parents' task vectors; the child's genome stores them
and every consumer (the materialiser, the compact linear form, the vLLM workers) merges
linearly with them. To add a method: a class here with its `options` (tag `method`),
registered with `@CROSSOVERS.register` (see docs/adding_a_variant.md).
"""

from __future__ import annotations

from abc import abstractmethod
from typing import ClassVar, Literal

import numpy as np
from pydantic import Field

from cycleqd.operators import crossover_weights
from cycleqd.variants import Registry, Variant, VariantOptions


class CrossoverMethod(Variant):
    # Options a proposer may set per child (`cycleqd.proposers`), in this order.
    tunable: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def weights(
        self, options: VariantOptions, rng: np.random.Generator, parents: int
    ) -> tuple[float, ...]:
        """One merge weight per parent, drawn from the child's random stream."""


CROSSOVERS: Registry[CrossoverMethod] = Registry("crossover", tag="method", default="linear")


class LinearOptions(VariantOptions):
    method: Literal["linear"] = "linear"
    mu: float = Field(default=0.0, description="mean shift of the weights, N(1 + mu, sigma)")
    sigma: float = Field(default=0.01, ge=0.0, description="spread of the weights")


@CROSSOVERS.register
class LinearCrossover(CrossoverMethod):
    """Model-wise linear merge of task vectors, weights w_i ~ N(1 + mu, sigma), normalised
    by their sum (the paper's)."""

    options = LinearOptions
    tunable = ("mu", "sigma")

    def weights(self, options: LinearOptions, rng, parents):
        drawn = crossover_weights(rng, parents, options.mu, options.sigma)
        return tuple(float(w) for w in drawn)

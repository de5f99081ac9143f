"""Proposers: where each child's crossover and mutation parameters come from.

`fixed` (the default) takes them from the config (`crossover.mu`, `crossover.sigma`,
`mutation.rate`...) for every child. `cma_es` is the official code's option: one CMA-ES per
quality skill proposes them from the parents' cells. Its candidate i is a matrix W_i; a child
bred from parents p1, p2 in skill q's archive gets the parameters x @ W_i, where x is the two
parents' cell coordinates divided by the bins (their other skills' scores, binned); once
`popsize` children of skill q are scored, the strategy is told their fitness, the child's own
normalised cell coordinates plus its quality on q (higher: better). The parameters it tunes
are each variant's `tunable` options (linear crossover: mu, sigma; svd_expert: rate; svd:
w_max; gaussian: sigma), started at 0 with step size `sigma`, as the official code does.

The state of a CMA-ES is the fitness of every child it was told, per skill, in order: the
strategy is rebuilt by replaying its asks and tells from its seed, so the state is plain JSON
in the generation's snapshot (no pickled objects), and a resumed campaign proposes exactly
what an uninterrupted one would. The children of a generation share one skill and take
consecutive candidates, so `population` must divide `popsize`.

To add a proposer: a class here with its `options` (tag `kind`), registered with
`@PROPOSERS.register` (see docs/adding_a_variant.md).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field

from cycleqd.errors import ConfigError
from cycleqd.variants import Registry, Variant, VariantOptions


class ProposerMethod(Variant):
    # Whether it learns from the children's fitness: then the snapshot keeps it per skill.
    learns: ClassVar[bool] = False

    def check(self, options: VariantOptions, population: int) -> None:
        """Raise ConfigError where this proposer cannot run this campaign here."""

    @abstractmethod
    def propose(
        self,
        options: VariantOptions,
        history: Sequence[float],
        slot: int,
        inputs: np.ndarray,
        tunable: int,
    ) -> np.ndarray | None:
        """The `tunable` parameter values of the child that takes candidate `slot` of the
        batch in progress (`history`: this skill's fitnesses so far), from its parents'
        normalised cells `inputs`; None: the config's values."""

    def batch_slot(self, options: VariantOptions, history: Sequence[float]) -> int:
        """The candidate the next child of a skill takes."""
        return 0


PROPOSERS: Registry[ProposerMethod] = Registry("proposer", tag="kind", default="fixed")


class FixedOptions(VariantOptions):
    kind: Literal["fixed"] = "fixed"


@PROPOSERS.register
class FixedProposer(ProposerMethod):
    """The config's crossover and mutation options for every child (the paper's)."""

    options = FixedOptions

    def propose(self, options, history, slot, inputs, tunable):
        return None


class CmaEsOptions(VariantOptions):
    kind: Literal["cma_es"] = "cma_es"
    popsize: int = Field(default=8, ge=2, description="candidates per CMA-ES generation")
    sigma: float = Field(default=0.01, gt=0.0, description="initial step size")
    seed: int = Field(default=42, ge=0, description="the strategies' random stream")


@PROPOSERS.register
class CmaEsProposer(ProposerMethod):
    """The official code's CMA-ES over the crossover and mutation parameters."""

    options = CmaEsOptions
    learns = True

    def check(self, options: CmaEsOptions, population: int) -> None:
        if not _cma_installed():
            raise ConfigError(
                "proposer.kind is 'cma_es', but the `cma` package is not installed: "
                "pip install 'cycleqd[cma]' (or pip install cma==4.5.0), or set "
                "proposer.kind to 'fixed'"
            )
        if options.popsize % population:
            raise ConfigError(
                f"proposer.popsize {options.popsize} is not a multiple of population "
                f"{population}: a generation's children take consecutive candidates of one "
                "CMA-ES generation (e.g. population 1, 2, 4 or 8 with popsize 8)"
            )

    def batch_slot(self, options: CmaEsOptions, history: Sequence[float]) -> int:
        return len(history) % options.popsize

    def propose(self, options: CmaEsOptions, history, slot, inputs, tunable):
        if tunable == 0:
            return None
        candidates = _asked(options, tuple(history), inputs.size * tunable)
        weights = np.asarray(candidates[slot]).reshape(inputs.size, tunable)
        return inputs @ weights


def _cma_installed() -> bool:
    try:
        import cma  # noqa: F401
    except ImportError:
        return False
    return True


def _strategy(options: CmaEsOptions, dimension: int):
    import cma

    rng = np.random.default_rng(options.seed)
    return cma.CMAEvolutionStrategy(
        np.zeros(dimension),
        options.sigma,
        inopts={
            "popsize": options.popsize,
            "seed": np.nan,  # never touch numpy's global generator
            "randn": lambda *shape: rng.standard_normal(shape),
            "verbose": -9,
            "verb_log": 0,
            "verb_disp": 0,
        },
    )


_CACHE: dict[tuple, list] = {}


def _asked(options: CmaEsOptions, history: tuple[float, ...], dimension: int) -> list:
    """The candidates of the batch in progress: the strategy replayed through every complete
    batch of `history` (ask, then tell the negated fitness: CMA-ES minimises)."""
    done = len(history) - len(history) % options.popsize
    key = (options, history[:done], dimension)
    if key not in _CACHE:
        strategy = _strategy(options, dimension)
        for start in range(0, done, options.popsize):
            asked = strategy.ask()
            strategy.tell(asked, [-f for f in history[start : start + options.popsize]])
        _CACHE.clear()  # one campaign at a time: keep only the latest
        _CACHE[key] = strategy.ask()
    return _CACHE[key]


def cell_inputs(archive, parents: Sequence[Mapping[str, float] | None]) -> np.ndarray:
    """The parents' cells in `archive` (one bin index per BC skill), divided by the bins; a
    parent no archive holds (an expert borrowed when every archive holds one same model) is
    at the grid's origin."""
    bins = np.array([s.bins for s in archive.bc_skills], dtype=float)
    cells = [
        np.array(archive.cell_of(p), dtype=float) if p else np.zeros(bins.size) for p in parents
    ]
    return np.concatenate([cell / bins for cell in cells])


def fitness(archive, scores: Mapping[str, float]) -> float:
    """A child's fitness for its skill's CMA-ES: its normalised cell plus its quality."""
    bins = np.array([s.bins for s in archive.bc_skills], dtype=float)
    cell = np.array(archive.cell_of(scores), dtype=float) / bins
    return float(cell.sum() + archive.quality_of(scores))


def tuned_options(options: VariantOptions, names: Sequence[str], values: Any) -> VariantOptions:
    """`options` with its tunable fields set to the proposed values (a standard deviation,
    `sigma` of the linear crossover, as its absolute value, as the official code)."""
    update = {}
    for name, value in zip(names, values, strict=True):
        update[name] = abs(float(value)) if name == "sigma" else float(value)
    return options.model_copy(update=update)

"""Mutations: how a child is perturbed after crossover, one class per kind.

A mutation is stored in the child's genome as a small record (`genome.Mutation`: kind, seed,
scale, expert). Its class says how the record is drawn from the config (`recipe`), whether the
child keeps a compact linear form (`extend_linear_form`: the base plus a combination of the
experts' task vectors, their SVD factors and regenerable noise; see `genome`), and how one
tensor of a child's task vector is mutated when it is built from its parents (`apply`).
Random draws inside a tensor come from (seed, tensor name) only, so any process rebuilds the
same weights from the record.

To add a mutation: a class here with its `options` (tag `kind`), registered with
`@MUTATIONS.register`; docs/adding_a_variant.md walks through one.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field

from cycleqd.errors import GenomeError
from cycleqd.genome import LinearForm, Mutation
from cycleqd.variants import Registry, Variant, VariantOptions

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class TensorContext:
    """What a mutation may use to change one tensor: its checkpoint name, the device, and
    `add_expert_svd(out, expert, seed, rate)`, which adds U diag(r * S) V^T of an expert's
    task vector (r ~ U[0, rate) drawn from (seed, name)) to `out` in place."""

    name: str
    device: torch.device
    add_expert_svd: Callable[[torch.Tensor, str, int, float], None]


class MutationMethod(Variant):
    """One kind of mutation. Subclasses set `options` and implement `recipe` and `apply`."""

    # Options a proposer may set per child (`cycleqd.proposers`), in this order.
    tunable: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def recipe(self, options: VariantOptions, seed: int, expert: str) -> Mutation:
        """The record stored in a child's genome. `seed` is drawn for every child whatever the
        kind (the generation's random stream does not depend on it); `expert` is the genome
        id of the expert of the skill the child is bred for."""

    def check(self, mutation: Mutation) -> None:
        """Raise GenomeError when a record of this kind is malformed (records are read back
        from stores that anyone may have edited)."""

    def extend_linear_form(self, form: LinearForm, mutation: Mutation) -> LinearForm | None:
        """The child's compact form once mutated (`form` is the crossover's and may be
        changed in place), or None when the mutation leaves the experts' span; then the
        child's elites are stored as weights. The default: no compact form."""
        return None

    @abstractmethod
    def apply(
        self, task_vector: torch.Tensor, mutation: Mutation, tensor: TensorContext
    ) -> torch.Tensor:
        """One tensor of the child's task vector (the parents' merge minus the base),
        mutated; it may be changed in place and returned."""


MUTATIONS: Registry[MutationMethod] = Registry("mutation", tag="kind", default="svd")


class SvdOptions(VariantOptions):
    kind: Literal["svd"] = "svd"
    w_max: float = Field(default=1.5, gt=0.0, description="singular values scaled by U[0, w_max]")


@MUTATIONS.register
class SvdMutation(MutationMethod):
    """The paper's: SVD of the child's own task vector, singular values scaled by factors
    drawn from U[0, w_max]. Leaves the experts' span, so elites are stored as weights."""

    options = SvdOptions
    tunable = ("w_max",)

    def recipe(self, options: SvdOptions, seed: int, expert: str) -> Mutation:
        return Mutation(kind="svd", seed=seed, scale=options.w_max)

    def apply(self, task_vector, mutation, tensor):
        from cycleqd.operators import svd_rescale

        return svd_rescale(task_vector, tensor.name, mutation.seed, mutation.scale)


class SvdExpertOptions(VariantOptions):
    kind: Literal["svd_expert"] = "svd_expert"
    rate: float = Field(default=0.1, gt=0.0, description="r ~ U[0, rate) per singular value")


@MUTATIONS.register
class SvdExpertMutation(MutationMethod):
    """The official code's: add U diag(r * S) V^T of the quality skill's expert task vector,
    r ~ U[0, rate). Stays in the experts' span: children are a few coefficients."""

    options = SvdExpertOptions
    tunable = ("rate",)

    def recipe(self, options: SvdExpertOptions, seed: int, expert: str) -> Mutation:
        return Mutation(kind="svd_expert", seed=seed, scale=options.rate, expert=expert)

    def check(self, mutation: Mutation) -> None:
        if not mutation.expert:
            raise GenomeError("an svd_expert mutation must name the expert it draws from")

    def extend_linear_form(self, form, mutation):
        form.svd_terms.append((mutation.expert, mutation.seed, mutation.scale, 1.0))
        return form

    def apply(self, task_vector, mutation, tensor):
        tensor.add_expert_svd(task_vector, mutation.expert, mutation.seed, mutation.scale)
        return task_vector


class GaussianOptions(VariantOptions):
    kind: Literal["gaussian"] = "gaussian"
    sigma: float = Field(default=1e-3, gt=0.0, description="standard deviation of the noise")


@MUTATIONS.register
class GaussianMutation(MutationMethod):
    """Add N(0, sigma) to every weight, seeded per tensor, so it is regenerable."""

    options = GaussianOptions
    tunable = ("sigma",)

    def recipe(self, options: GaussianOptions, seed: int, expert: str) -> Mutation:
        return Mutation(kind="gaussian", seed=seed, scale=options.sigma)

    def extend_linear_form(self, form, mutation):
        form.noise_terms.append((mutation.seed, mutation.scale, 1.0))
        return form

    def apply(self, task_vector, mutation, tensor):
        from cycleqd.operators import gaussian_noise

        shape = task_vector.shape
        return task_vector.add_(
            gaussian_noise(tensor.name, shape, mutation.seed, mutation.scale, tensor.device)
        )


class NoMutationOptions(VariantOptions):
    kind: Literal["none"] = "none"


@MUTATIONS.register
class NoMutation(MutationMethod):
    """Crossover only."""

    options = NoMutationOptions

    def recipe(self, options: NoMutationOptions, seed: int, expert: str) -> Mutation:
        return Mutation(kind="none", seed=seed)

    def extend_linear_form(self, form, mutation):
        return form

    def apply(self, task_vector, mutation, tensor):
        return task_vector

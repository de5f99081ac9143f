"""Genomes: every model as a recipe of a few KB, with a content id.

A base or expert genome points at weights. A child or final genome names its parents, the
weights of the linear merge of their task vectors, and a seeded mutation. Weights are built
from the recipe only where they are needed (see `materialize`).

When is a recipe compact? Crossover is linear in the parents' task vectors, the official
code's mutation adds a combination of an *expert's* SVD factors, and seeded Gaussian noise
can be regenerated. A model bred only with those is, per tensor,

    base + sum_e a_e tau_e + sum_e U_e diag(b_e) V_e^T + sum_j c_j noise_j

and `linear_form` computes the coefficients. The paper's SVD mutation decomposes the child's
own task vector, which leaves that span: such genomes have no linear form and their elites
must be stored as weights.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Literal, get_args

from cycleqd.errors import GenomeError

if TYPE_CHECKING:
    from cycleqd.mutations import MutationMethod

GenomeKind = Literal["base", "expert", "child", "final"]
GENOME_KINDS: tuple[str, ...] = get_args(GenomeKind)


@dataclass(frozen=True)
class Mutation:
    """A child's mutation as stored in its genome; its kind's class in `cycleqd.mutations`
    says what the fields mean."""

    kind: str
    seed: int = 0
    scale: float = 0.0  # svd: w_max; svd_expert: rate; gaussian: sigma
    expert: str | None = None  # svd_expert: whose task vector factors are added

    def __post_init__(self) -> None:
        self.method().check(self)

    def method(self) -> MutationMethod:
        """The class of this kind (`cycleqd.mutations`, which imports this module)."""
        from cycleqd.mutations import MUTATIONS

        if self.kind not in MUTATIONS:
            raise GenomeError(f"unknown mutation kind {self.kind!r}; allowed: {MUTATIONS.names()}")
        return MUTATIONS[self.kind]


@dataclass(frozen=True)
class Genome:
    kind: GenomeKind
    parents: tuple[str, ...] = ()
    weights: tuple[float, ...] = ()
    mutation: Mutation | None = None
    source: str | None = None  # base/expert: where the weights are
    skill: str | None = None  # expert: its skill; child: the quality skill it was bred for
    generation: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in GENOME_KINDS:
            raise GenomeError(f"unknown genome kind {self.kind!r}; allowed: {GENOME_KINDS}")
        if self.kind in ("base", "expert"):
            if self.source is None or self.parents:
                raise GenomeError(f"a {self.kind} genome needs a source and no parents")
        else:
            if len(self.parents) < 1 or len(self.parents) != len(self.weights):
                raise GenomeError(
                    f"a {self.kind} genome needs parents and one merge weight per parent, got "
                    f"{len(self.parents)} parents and {len(self.weights)} weights"
                )

    @property
    def id(self) -> str:
        """Content id: the same recipe always has the same id, whoever computes it."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        data = asdict(self)
        data["parents"] = list(self.parents)
        data["weights"] = [float(w) for w in self.weights]
        return data

    @classmethod
    def from_dict(cls, data: Mapping) -> Genome:
        """A genome from its record; GenomeError (never another exception) if it is malformed:
        records are read back from stores that anyone may have edited."""
        if not isinstance(data, Mapping):
            raise GenomeError(f"malformed genome record {_short(data)}: not a mapping")
        try:
            mutation = data.get("mutation")
            if mutation is not None and not isinstance(mutation, Mapping):
                raise TypeError("mutation must be a mapping or null")
            parents = data.get("parents", ())
            weights = data.get("weights", ())
            if not isinstance(parents, list | tuple) or not all(
                isinstance(p, str) for p in parents
            ):
                raise TypeError("parents must be a list of genome ids")
            if not isinstance(weights, list | tuple) or not all(_is_number(w) for w in weights):
                raise TypeError("weights must be a list of finite numbers")
            for name in ("source", "skill"):
                if not isinstance(data.get(name), str | None):
                    raise TypeError(f"{name} must be a string or null")
            generation = data.get("generation")
            if generation is not None and not _is_int(generation):
                raise TypeError("generation must be an integer or null")
            if mutation:
                _check_mutation(mutation)
            return cls(
                kind=data["kind"],
                parents=tuple(parents),
                weights=tuple(float(w) for w in weights),
                mutation=Mutation(**mutation) if mutation else None,
                source=data.get("source"),
                skill=data.get("skill"),
                generation=generation,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise GenomeError(f"malformed genome record {_short(data)}: {exc}") from None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _check_mutation(mutation: Mapping) -> None:
    if not isinstance(mutation.get("kind"), str):
        raise TypeError("mutation.kind must be a string")
    if "seed" in mutation and not _is_int(mutation["seed"]):
        raise TypeError("mutation.seed must be an integer")
    if "scale" in mutation and not _is_number(mutation["scale"]):
        raise TypeError("mutation.scale must be a finite number")
    if not isinstance(mutation.get("expert"), str | None):
        raise TypeError("mutation.expert must be a string or null")


def _short(data: object, limit: int = 200) -> str:
    """A record in an error message, cut short: a corrupted file may be huge."""
    text = repr(dict(data) if isinstance(data, Mapping) else data)
    return text if len(text) <= limit else text[:limit] + "..."


@dataclass
class LinearForm:
    """base + sum_e coeffs[e] * tau_e + sum_e svd terms + noise terms (see module doc)."""

    coeffs: dict[str, float] = field(default_factory=dict)  # expert genome id -> a_e
    # (expert genome id, seed, rate, coefficient): U_e diag(coef * r(seed) * S_e) V_e^T
    svd_terms: list[tuple[str, int, float, float]] = field(default_factory=list)
    # (seed, sigma, coefficient): coef * N(0, sigma)(seed)
    noise_terms: list[tuple[int, float, float]] = field(default_factory=list)

    def scaled(self, factor: float) -> LinearForm:
        return LinearForm(
            {e: a * factor for e, a in self.coeffs.items()},
            [(e, s, r, c * factor) for e, s, r, c in self.svd_terms],
            [(s, sg, c * factor) for s, sg, c in self.noise_terms],
        )

    def add(self, other: LinearForm) -> None:
        """Sum of two forms. A mutation both forms inherit from a shared ancestor appears once,
        with the coefficients summed: without that, a term is repeated once per path through
        the lineage, and the forms (and the cost of materialising them) grow without bound."""
        for e, a in other.coeffs.items():
            self.coeffs[e] = self.coeffs.get(e, 0.0) + a
        self.svd_terms = _merge_terms(self.svd_terms, other.svd_terms)
        self.noise_terms = _merge_terms(self.noise_terms, other.noise_terms)


def _merge_terms(mine: list[tuple], other: list[tuple]) -> list:
    """Terms of both lists, first-seen order; equal terms (all but the last field, the
    coefficient) are merged by adding their coefficients."""
    merged = {term[:-1]: term[-1] for term in mine}
    for term in other:
        key = term[:-1]
        merged[key] = merged[key] + term[-1] if key in merged else term[-1]
    return [(*key, coeff) for key, coeff in merged.items()]


class GenomeBook:
    """All genomes of a campaign by id: the lineage graph."""

    def __init__(self) -> None:
        self._genomes: dict[str, Genome] = {}
        self._linear: dict[str, LinearForm | None] = {}

    def add(self, genome: Genome) -> str:
        for parent in genome.parents:
            if parent not in self._genomes:
                raise GenomeError(f"genome refers to unknown parent {parent}")
        gid = genome.id
        self._genomes[gid] = genome
        return gid

    def __getitem__(self, gid: str) -> Genome:
        try:
            return self._genomes[gid]
        except KeyError:
            raise GenomeError(f"unknown genome {gid}") from None

    def __contains__(self, gid: str) -> bool:
        return gid in self._genomes

    def __len__(self) -> int:
        return len(self._genomes)

    def items(self):
        return self._genomes.items()

    def base_id(self) -> str:
        bases = [g for g, x in self._genomes.items() if x.kind == "base"]
        if len(bases) != 1:
            raise GenomeError(f"a campaign has exactly one base genome, found {len(bases)}")
        return bases[0]

    def expert_ids(self) -> dict[str, str]:
        """skill -> expert genome id."""
        return {x.skill: g for g, x in self._genomes.items() if x.kind == "expert" and x.skill}

    def linear_form(self, gid: str) -> LinearForm | None:
        """The compact form of a genome, or None when its lineage left the experts' span."""
        if gid in self._linear:
            return self._linear[gid]
        genome = self[gid]
        form: LinearForm | None
        if genome.kind == "base":
            form = LinearForm()
        elif genome.kind == "expert":
            form = LinearForm({gid: 1.0})
        else:
            form = LinearForm()
            for parent, weight in zip(genome.parents, genome.weights, strict=True):
                parent_form = self.linear_form(parent)
                if parent_form is None:
                    form = None
                    break
                form.add(parent_form.scaled(weight))
            mutation = genome.mutation
            if form is not None and mutation is not None:
                form = mutation.method().extend_linear_form(form, mutation)
        self._linear[gid] = form
        return form

    def ancestors(self, gid: str) -> list[str]:
        """Every genome this one descends from, nearest first, each once."""
        seen: list[str] = []
        frontier = list(self[gid].parents)
        while frontier:
            parent = frontier.pop(0)
            if parent not in seen:
                seen.append(parent)
                frontier.extend(self[parent].parents)
        return seen

    def pruned(self, keep: Iterable[str]) -> GenomeBook:
        """A book of the base, the experts, `keep` and every ancestor of those, in this book's
        order (parents before children), with their cached linear forms. The campaign keeps
        only what its archives can still breed from or be rebuilt from: a book that kept
        every child ever bred would grow with the number of generations."""
        needed = {self.base_id(), *self.expert_ids().values()}
        frontier = list(keep)
        while frontier:
            gid = frontier.pop()
            if gid not in needed:
                needed.add(gid)
                frontier.extend(self[gid].parents)
        book = GenomeBook()
        for gid, genome in self._genomes.items():
            if gid in needed:
                book._genomes[gid] = genome
                if gid in self._linear:
                    book._linear[gid] = self._linear[gid]
        return book

    def to_list(self) -> list[dict]:
        return [{"id": g, **x.to_dict()} for g, x in self._genomes.items()]

    def load_list(self, records: list[dict]) -> None:
        if not isinstance(records, list):
            raise GenomeError(f"genome records must be a list, got {type(records).__name__}")
        for record in records:
            genome = Genome.from_dict(record)
            if record.get("id") not in (None, genome.id):
                raise GenomeError(
                    f"genome record {record.get('id')} does not match its content ({genome.id}): "
                    "the file was edited or corrupted"
                )
            self.add(genome)

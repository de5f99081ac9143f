"""The campaign config: one typed document, validated on load.

Every validation error names the field (as a dotted path) and what is allowed, so that a
user who mistyped a YAML key knows what to fix without reading the source.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cycleqd.errors import ConfigError

_M = TypeVar("_M", bound=BaseModel)

DType = Literal["float32", "bfloat16", "float16"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class SkillConfig(_Strict):
    """One skill: its quality is the score in its own archive; elsewhere it is a BC axis."""

    name: str = Field(pattern=r"^[a-z][a-z0-9_]{0,31}$")
    bc_min: float = 0.0
    bc_max: float = 1.0
    bins: int = Field(default=15, ge=1, le=1000)

    @model_validator(mode="after")
    def _range_is_ordered(self) -> SkillConfig:
        if not self.bc_min < self.bc_max:
            raise ValueError(f"bc_min ({self.bc_min}) must be smaller than bc_max ({self.bc_max})")
        return self


class SamplingConfig(_Strict):
    """Parent selection. `elite` weights elites by quality and BC (paper section 3)."""

    method: Literal["elite", "uniform"] = "elite"
    # paper: a_lo + norm(v) * (a_hi - a_lo); official: a_lo + norm(v) * a_hi (their code).
    formula: Literal["paper", "official"] = "paper"
    a_lo: float = Field(default=0.5, gt=0.0)
    a_hi: float = Field(default=0.8, gt=0.0)

    @model_validator(mode="after")
    def _bounds_are_ordered(self) -> SamplingConfig:
        if not self.a_lo < self.a_hi:
            raise ValueError(f"a_lo ({self.a_lo}) must be smaller than a_hi ({self.a_hi})")
        return self


class CrossoverConfig(_Strict):
    """Model-wise linear merge of task vectors, weights w_i ~ N(1 + mu, sigma), normalised."""

    method: Literal["linear"] = "linear"
    mu: float = 0.0
    sigma: float = Field(default=0.01, ge=0.0)


class MutationConfig(_Strict):
    """How a child is perturbed after crossover.

    - svd: the paper's: SVD of the child's own task vector, singular values scaled by
      factors drawn from U[0, w_max]. Leaves the experts' span, so elites are stored as weights.
    - svd_expert: the official code's: add U diag(r * S) V^T of the quality skill's expert task
      vector, r ~ U[0, rate). Stays in the experts' span: children are a few coefficients.
    - gaussian: add N(0, sigma) to every weight (seeded, regenerable).
    - none: crossover only.
    """

    kind: Literal["svd", "svd_expert", "gaussian", "none"] = "svd"
    w_max: float = Field(default=1.5, gt=0.0)
    rate: float = Field(default=0.1, gt=0.0)
    sigma: float = Field(default=1e-3, gt=0.0)


class EvaluationConfig(_Strict):
    """How models are scored.

    - tiny: the tiny skill world (`cycleqd.skills.tiny`): `samples` held-out questions per
      skill drawn with `seed`, greedy decoding, answers verified by execution. The skills must
      be that world's (tiny_code, tiny_sql, tiny_shell) and the models share its tokenizer.
    - probe: agreement with each skill's expert on fixed random prompts (any model, no data;
      a smoke test of the machinery, not a skill).
    """

    world: Literal["probe", "tiny"] = "probe"
    probe_prompts: int = Field(default=64, ge=1)
    samples: int = Field(default=96, ge=1, le=100_000)
    seed: int = Field(default=1, ge=0)
    level: int = Field(default=2, ge=1, le=3)
    threads: int = Field(default=0, ge=0, description="torch CPU threads; 0: torch's default")
    # The summary's second opinion: the tiny world scores the final comparison again on
    # questions drawn with this seed, so the search's selection cannot flatter its pick.
    holdout_seed: int = Field(default=1001, ge=0)


class FinalConfig(_Strict):
    """The campaign's final model, built from the last archives.

    - merge_best (paper): merge the best elite of every archive, theta = theta_base +
      sum_k beta_k tau_k with beta = softmax(qualities).
    - best_mean: the elite, over all archives, with the best mean score over the skills (the
      archives' best generalist). Where the experts stay the best of their own skill the
      paper's merge is little more than the experts' average; this keeps what the search found.
    """

    method: Literal["merge_best", "best_mean"] = "merge_best"


class ModelsConfig(_Strict):
    """Where the base and the experts live: local folders of safetensors (HF layout)."""

    base: str
    experts: dict[str, str] = Field(min_length=2)


class CampaignConfig(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
    seed: int = Field(default=0, ge=0)
    generations: int = Field(default=30, ge=0)
    population: int = Field(default=1, ge=1, description="children bred per generation (paper: 1)")
    skills: list[SkillConfig] = Field(min_length=2)
    models: ModelsConfig
    sampling: SamplingConfig = SamplingConfig()
    crossover: CrossoverConfig = CrossoverConfig()
    mutation: MutationConfig = MutationConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    final: FinalConfig = FinalConfig()
    dtype: DType = "float32"

    @model_validator(mode="after")
    def _skills_match_experts(self) -> CampaignConfig:
        names = [s.name for s in self.skills]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"skills: duplicated skill name(s) {duplicated}")
        unknown = sorted(set(self.models.experts) - set(names))
        if unknown:
            raise ValueError(
                f"models.experts: unknown skill(s) {unknown}; allowed: the names in skills {names}"
            )
        missing = [n for n in names if n not in self.models.experts]
        if missing:
            raise ValueError(f"models.experts: no expert for skill(s) {missing}; one per skill")
        if self.evaluation.world == "tiny":
            from cycleqd.skills.tiny.tasks import FAMILIES

            foreign = [n for n in names if n not in FAMILIES]
            if foreign:
                raise ValueError(
                    f"skills: {foreign} are not skills of the tiny world; with "
                    f"evaluation.world 'tiny' use {list(FAMILIES)}"
                )
        return self

    @property
    def skill_names(self) -> list[str]:
        return [s.name for s in self.skills]

    def skill(self, name: str) -> SkillConfig:
        for s in self.skills:
            if s.name == name:
                return s
        raise KeyError(name)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _fields_at(root: type[BaseModel], loc: tuple) -> list[str]:
    """The field names allowed at a location of a config (for unknown-field errors)."""
    model = root
    for part in loc:
        if isinstance(part, int):
            continue
        if part not in model.model_fields:
            return []
        annotation = model.model_fields[part].annotation
        inner = [a for a in (annotation, *get_args(annotation)) if isinstance(a, type)]
        models = [a for a in inner if issubclass(a, BaseModel)]
        if not models:
            return []
        model = models[0]
    return list(model.model_fields)


def _describe(root: type[BaseModel], error: dict[str, Any]) -> str:
    where = ".".join(str(p) for p in error["loc"]) or "(top level)"
    kind = error["type"]
    ctx = error.get("ctx") or {}
    if kind == "literal_error":
        return f"{where}: got {error['input']!r}; allowed: {ctx.get('expected')}"
    if kind == "extra_forbidden":
        allowed = ", ".join(_fields_at(root, error["loc"][:-1]))
        return f"{where}: unknown field; allowed here: {allowed}"
    if kind == "missing":
        return f"{where}: required field is missing"
    message = error["msg"].removeprefix("Value error, ")
    if kind == "value_error":
        return message if where == "(top level)" else f"{where}: {message}"
    return f"{where}: {message} (got {error.get('input')!r})"


def describe_validation_error(root: type[BaseModel], exc: ValidationError, source: str) -> str:
    """Every problem of a pydantic validation as one line naming the field and what is
    allowed: shared by every typed config of the project."""
    problems = "\n".join(f"  - {_describe(root, e)}" for e in exc.errors())
    return f"{source} is invalid:\n{problems}"


def validate(root: type[_M], data: Any, source: str) -> _M:
    """Validate a mapping into a typed config, or raise ConfigError listing every problem."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of fields, got {type(data).__name__}")
    try:
        return root.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(root, exc, source)) from None


def read_yaml(path: str | Path, what: str = "config") -> Any:
    """The YAML document of a file, or ConfigError saying why it cannot be read."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8 text (byte {exc.start}): is it a {what}?") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{path} nests too deeply to be a {what}") from None


def parse_config(data: Any, source: str = "config") -> CampaignConfig:
    return validate(CampaignConfig, data, source)


def load_config(path: str | Path) -> CampaignConfig:
    return parse_config(read_yaml(path), source=str(path))

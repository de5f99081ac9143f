"""The campaign config: one typed document, validated on load.

Every validation error names the field (as a dotted path) and what is allowed, so that a
user who mistyped a YAML key knows what to fix without reading the source.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union, get_args
from urllib.parse import unquote, urlparse

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    model_validator,
)

from cycleqd.crossovers import CROSSOVERS
from cycleqd.errors import ConfigError
from cycleqd.final_methods import FINAL_METHODS
from cycleqd.finetune_settings import TrainingSettings
from cycleqd.mutations import MUTATIONS
from cycleqd.proposers import PROPOSERS
from cycleqd.redact import redact_text, redact_uri
from cycleqd.sampling import SAMPLING
from cycleqd.skills.registry import (
    REGISTRY,
    SkillConfig,
    StrictModel,
    has_training_set,
    options_class,
    owners_of,
    skill_names,
)
from cycleqd.variants import Registry

_M = TypeVar("_M", bound=BaseModel)

DType = Literal["float32", "bfloat16", "float16"]


_Strict = StrictModel


class AnySkillConfig(SkillConfig):
    """A skill name the registry does not know: only the probe scorer takes it (options are
    kept here to say which skill they belong to)."""

    model_config = ConfigDict(extra="allow", frozen=True, allow_inf_nan=False)


_ANY = "(unregistered)"


def _skill_tag(value: Any) -> str:
    name = value.get("name") if isinstance(value, dict) else getattr(value, "name", None)
    return name if isinstance(name, str) and name in REGISTRY else _ANY


# One variant per registered name (the tiny world's three share a class), and the rest.
SkillEntry = Annotated[
    Union[
        (
            Annotated[AnySkillConfig, Tag(_ANY)],
            *(Annotated[spec.options, Tag(name)] for name, spec in REGISTRY.items()),
        )
    ],
    Discriminator(_skill_tag),
]


# The search's interchangeable parts: each field is the union of its registered variants'
# options (see `cycleqd.variants`), tagged by `kind` (mutation) or `method` (the others).
VARIANT_FAMILIES: dict[str, Registry] = {
    r.family: r for r in (SAMPLING, CROSSOVERS, MUTATIONS, PROPOSERS, FINAL_METHODS)
}
SamplingConfig = SAMPLING.config_type()
CrossoverConfig = CROSSOVERS.config_type()
MutationConfig = MUTATIONS.config_type()
ProposerConfig = PROPOSERS.config_type()
FinalConfig = FINAL_METHODS.config_type()


class TransformersBackendConfig(_Strict):
    """Hugging Face transformers on the CPU or a GPU: one warm model per evaluator, children
    written into its weights in place."""

    kind: Literal["transformers"] = "transformers"
    device: str = Field(default="cpu", pattern=r"^(cpu|cuda(:[0-9]+)?)$")
    dtype: DType | None = Field(default=None, description="None: the campaign's dtype")
    batch_size: int = Field(default=16, ge=1, le=4096)
    threads: int = Field(default=0, ge=0, description="torch CPU threads; 0: torch's default")


class VLLMBackendConfig(_Strict):
    """vLLM on GPUs (the evaluator image): one warm engine, each child built on the GPU from
    its genome by the worker extension, prefix cache reset after every swap."""

    kind: Literal["vllm"]
    dtype: DType | None = Field(default=None, description="None: the campaign's dtype")
    tensor_parallel_size: int = Field(default=1, ge=1, le=64)
    gpu_memory_utilization: float = Field(default=0.85, gt=0.0, le=1.0)
    max_model_len: int | None = Field(default=None, ge=256)
    enforce_eager: bool = False


def _backend_tag(value: Any) -> str:
    kind = value.get("kind", "transformers") if isinstance(value, dict) else value.kind
    return kind if isinstance(kind, str) else repr(kind)


BackendConfig = Annotated[
    Annotated[TransformersBackendConfig, Tag("transformers")]
    | Annotated[VLLMBackendConfig, Tag("vllm")],
    Discriminator(_backend_tag),
]


class EvaluationConfig(_Strict):
    """How models are scored.

    - scorer `skills` (default): every skill in `skills` (see `cycleqd.skills.registry`) is
      scored over one warm chat `backend`; each sample's transcript is kept in the store.
    - scorer `probe`: agreement with each skill's expert on fixed random prompts (any model,
      any skill names, no data; a smoke test of the machinery, not a skill).
    """

    scorer: Literal["skills", "probe"] = "skills"
    backend: BackendConfig = TransformersBackendConfig()
    probe_prompts: int = Field(default=64, ge=1)
    transcripts: bool = Field(default=True, description="keep every sample's transcript")
    humaneval: int = Field(
        default=0, ge=0, le=164, description="HumanEval problems reported beside the scores"
    )


DERIVED = "derived"


class ExpertTraining(TrainingSettings):
    """An expert the campaign fine-tunes from `models.base` (the experts stage, before the
    archives are seeded), published to the campaign store under `experts/<skill>`.

    `data`: chat JSONL (a file, a folder of *.jsonl or an s3:// URI), or `derived`: the
    skill's own training part (`cycleqd data training-set`), built from the part of its data
    set that the skill never scores (the skill then scores its evaluation part by default)."""

    data: str = Field(default=DERIVED, min_length=1)
    size: int | None = Field(default=None, ge=1, description="derived: at most this many rows")

    @property
    def derived(self) -> bool:
        return self.data == DERIVED

    @model_validator(mode="after")
    def _size_is_for_derived(self) -> ExpertTraining:
        if self.size is not None and not self.derived:
            raise ValueError("size: only for data 'derived' (cut your own data set instead)")
        return self


def _expert_tag(value: Any) -> str:
    return "location" if isinstance(value, str) else "training"


ExpertEntry = Annotated[
    Annotated[str, Tag("location")] | Annotated[ExpertTraining, Tag("training")],
    Discriminator(_expert_tag),
]


class ModelsConfig(_Strict):
    """The base and one expert per skill. Each expert is either where it lives (a folder of
    safetensors in HF layout: a local or mounted path, `file://` or `s3://`; read where
    weights are used, copied once per pod from S3), or a fine-tuning spec (`ExpertTraining`):
    the campaign trains it from the base before seeding and publishes it in its store."""

    base: str
    experts: dict[str, ExpertEntry] = Field(min_length=2)

    def trained(self) -> dict[str, ExpertTraining]:
        """The experts the campaign fine-tunes, by skill."""
        return {s: e for s, e in self.experts.items() if isinstance(e, ExpertTraining)}


class CampaignConfig(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
    seed: int = Field(default=0, ge=0)
    generations: int = Field(default=30, ge=0)
    population: int = Field(default=1, ge=1, description="children bred per generation (paper: 1)")
    objective: Literal["cycle", "mean"] = Field(
        default="cycle",
        description="cycle: one archive per skill, each generation breeding for the next "
        "skill's quality (CycleQD); mean: one archive, quality the mean of the skills, cell "
        "the bins of every skill (the paper's ablation without the cycle)",
    )
    skills: list[SkillEntry] = Field(min_length=2)
    models: ModelsConfig
    sampling: SamplingConfig = SAMPLING.default_options()
    crossover: CrossoverConfig = CROSSOVERS.default_options()
    mutation: MutationConfig = MUTATIONS.default_options()
    # Where each child's crossover and mutation options come from: the config's (`fixed`),
    # or the official code's CMA-ES per skill (`cma_es`; needs the `cma` package).
    proposer: ProposerConfig = PROPOSERS.default_options()
    evaluation: EvaluationConfig = EvaluationConfig()
    final: FinalConfig = FINAL_METHODS.default_options()
    dtype: DType = "float32"

    @model_validator(mode="before")
    @classmethod
    def _score_the_evaluation_part(cls, data: Any) -> Any:
        """A skill whose expert is fine-tuned on its derived training part scores, unless
        the config says otherwise, only the other part: no model is scored on what an
        expert was trained on."""
        if not isinstance(data, dict):
            return data
        models = data.get("models")
        experts = models.get("experts") if isinstance(models, dict) else None
        skills = data.get("skills")
        if not isinstance(experts, dict) or not isinstance(skills, list):
            return data
        resolved = []
        for entry in skills:
            name = entry.get("name") if isinstance(entry, dict) else None
            spec = experts.get(name) if isinstance(name, str) else None
            options = options_class(name) if isinstance(name, str) else None
            if (
                isinstance(spec, dict)
                and spec.get("data", DERIVED) == DERIVED
                and options is not None
                and "part" in options.model_fields
                and "part" not in entry
            ):
                entry = {**entry, "part": "evaluation"}
            resolved.append(entry)
        return {**data, "skills": resolved}

    @model_validator(mode="after")
    def _skills_match_experts(self) -> CampaignConfig:
        names = [s.name for s in self.skills]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"skills: duplicated skill name(s) {duplicated}")
        for i, skill in enumerate(self.skills):
            if not isinstance(skill, AnySkillConfig):
                if self.evaluation.scorer == "probe":
                    raise ValueError(
                        f"skills.{i}: {skill.name!r} is a real skill; the probe scorer takes "
                        "made-up names (probe_a, ...) only: use evaluation.scorer 'skills'"
                    )
                continue
            if self.evaluation.scorer == "skills":
                raise ValueError(
                    f"skills.{i}: unknown skill {skill.name!r}; skills: "
                    f"{', '.join(skill_names())} (or evaluation.scorer 'probe', the machinery's "
                    "smoke test, for made-up names)"
                )
            if skill.model_extra:
                raise ValueError(
                    f"skills.{i}: a probe skill has no options, got {sorted(skill.model_extra)}"
                )
        unknown = sorted(set(self.models.experts) - set(names))
        if unknown:
            raise ValueError(
                f"models.experts: unknown skill(s) {unknown}; allowed: the names in skills {names}"
            )
        missing = [n for n in names if n not in self.models.experts]
        if missing:
            raise ValueError(
                f"models.experts: no expert for skill(s) {missing}; one per skill: a model "
                "location or a fine-tuning spec (e.g. `{data: derived}`)"
            )
        PROPOSERS[self.proposer.kind].check(self.proposer, self.population)
        if self.models.trained() and self.evaluation.scorer == "probe":
            raise ValueError(
                "models.experts: the probe scorer compares models with each expert's weights, "
                "so its experts are given by location, not fine-tuned by the campaign"
            )
        for skill, spec in self.models.trained().items():
            if spec.derived and not has_training_set(skill):
                raise ValueError(
                    f"models.experts.{skill}.data: skill {skill!r} has no training set of its "
                    "own; give a chat JSONL data set (file, folder or s3:// URI)"
                )
        return self

    @model_validator(mode="after")
    def _objective_fits(self) -> CampaignConfig:
        if self.objective != "mean":
            return self
        if "mean" in self.skill_names:
            raise ValueError("objective 'mean' names its archive 'mean': rename the skill 'mean'")
        if self.mutation.kind == "svd_expert":
            raise ValueError(
                "mutation 'svd_expert' draws from the expert of the skill a child is bred for; "
                "objective 'mean' breeds for no single skill: use mutation 'svd', 'gaussian' "
                "or 'none', or objective 'cycle'"
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
    if tuple(loc[:2]) == ("models", "experts") and len(loc) >= 4:
        model, loc = ExpertTraining, loc[4:]  # an expert's fine-tuning spec
    for part in loc:
        if isinstance(part, int):
            continue
        if part in REGISTRY or part == _ANY:  # a tagged union's variant: the skill's options
            model = options_class(part) or SkillConfig
            continue
        if model is root and part == "skills":
            model = SkillConfig
            continue
        if model is EvaluationConfig and part == "backend":
            model = TransformersBackendConfig  # the tag that follows picks the variant
            continue
        family = VARIANT_FAMILIES.get(part) if model is root else None
        if family is not None:
            # The tag that follows (there is one: unions of 2+ variants) picks the variant.
            model = family.options_of(family.default)
            continue
        if part not in model.model_fields:
            tagged = _tagged_variant(model, part)
            if tagged is None:
                return []
            model = tagged
            continue
        annotation = model.model_fields[part].annotation
        inner = [a for a in (annotation, *get_args(annotation)) if isinstance(a, type)]
        models = [a for a in inner if issubclass(a, BaseModel)]
        if not models:
            return []
        model = models[0]
    return list(model.model_fields)


def _tagged_variant(model: type[BaseModel], tag: str) -> type[BaseModel] | None:
    """A discriminated union's variant by its tag (`kind`), e.g. evaluation.backend.vllm."""
    for cls in (TransformersBackendConfig, VLLMBackendConfig):
        if cls.model_fields["kind"].annotation == Literal[tag]:  # type: ignore[valid-type]
            return cls
    for family in VARIANT_FAMILIES.values():
        if model is family.options_of(family.default) and tag in family:
            return family.options_of(tag)
    return None


def _where(loc: tuple) -> str:
    """A dotted location without the tags pydantic inserts (skills.0.coding.x: skills.0.x)."""
    shown = [
        str(p)
        for i, p in enumerate(loc)
        if not (i and _is_tag(loc[i - 1], p)) and not _is_expert_tag(loc, i)
    ]
    return ".".join(shown) or "(top level)"


def _is_tag(before: Any, part: Any) -> bool:
    if before == "backend" or isinstance(before, int):
        return isinstance(part, str) and (part in REGISTRY or part == _ANY or part in _KINDS)
    family = VARIANT_FAMILIES.get(before) if isinstance(before, str) else None
    return family is not None and len(family.names()) > 1 and part in family


def _is_expert_tag(loc: tuple, i: int) -> bool:
    """models.experts.<skill>.training.x: the tag of a fine-tuning spec (or a location)."""
    return i == 3 and tuple(loc[:2]) == ("models", "experts") and loc[3] in _EXPERT_TAGS


_KINDS = ("transformers", "vllm")
_EXPERT_TAGS = ("location", "training")


def _describe(root: type[BaseModel], error: dict[str, Any]) -> str:
    where = _where(error["loc"])
    kind = error["type"]
    ctx = error.get("ctx") or {}
    if kind == "literal_error":
        return f"{where}: got {error['input']!r}; allowed: {ctx.get('expected')}"
    loc = error["loc"]
    family = VARIANT_FAMILIES.get(loc[0]) if loc and root is CampaignConfig else None
    if kind == "extra_forbidden":
        field = str(error["loc"][-1])
        allowed = ", ".join(_fields_at(root, error["loc"][:-1]))
        owners = owners_of(field) if error["loc"][0] == "skills" else []
        hint = f" ({field} is an option of: {', '.join(owners)})" if owners else ""
        if family is not None and len(error["loc"]) == 3:
            chosen = error["loc"][1]
            return (
                f"{where}: unknown field for {family.tag} {chosen!r}; allowed here: {allowed} "
                f"({_other_variants(family, chosen)})"
            )
        return f"{where}: unknown field{hint}; allowed here: {allowed}"
    if kind == "union_tag_invalid":
        if family is not None and len(error["loc"]) == 1:
            return f"{where}.{family.tag}: got {ctx.get('tag')!r}; allowed: {family.allowed()}"
        return f"{where}: got {ctx.get('tag')!r}; allowed: {ctx.get('expected_tags')}"
    if kind == "missing":
        return f"{where}: required field is missing"
    message = error["msg"].removeprefix("Value error, ")
    if kind == "value_error":
        return message if where == "(top level)" else f"{where}: {message}"
    return f"{where}: {message} (got {error.get('input')!r})"


def _other_variants(family: Registry, chosen: str) -> str:
    """What a family's other variants take, for an option given to the wrong one."""
    others = []
    for name in family:
        if name != chosen:
            options = [f for f in family.options_of(name).model_fields if f != family.tag]
            others.append(f"{name}: {', '.join(options) or 'no options'}")
    return f"other {family.tag}s take: " + "; ".join(others)


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


def parse_stored_config(data: Any, source: str) -> CampaignConfig:
    """A config that the project wrote into a campaign store. Stores written before each
    variant had its own options hold every variant's options side by side (`mutation: {kind:
    svd, w_max: 1.5, rate: 0.1, sigma: 0.001}`): only the named variant's are kept, so those
    campaigns resume. A user's config gets no such leniency (`parse_config`)."""
    if isinstance(data, dict):
        data = dict(data)
        for name, family in VARIANT_FAMILIES.items():
            entry = data.get(name)
            if isinstance(entry, dict) and family.tag_of(entry) in family:
                own = family.options_of(family.tag_of(entry)).model_fields
                data[name] = {k: v for k, v in entry.items() if k in own}
    return parse_config(data, source)


def load_config(path: str | Path) -> CampaignConfig:
    return parse_config(read_yaml(path), source=str(path))


# A campaign config given as one parameter (the Kubeflow UI's field is one line): the
# document itself, or where to read it.
CONFIG_URI_SCHEMES = ("s3", "http", "https", "file")
CONFIG_FORMS = "a YAML document, one-line JSON or a URI (s3://, https://, a file path)"
# A config is a few KiB; more names the wrong file (a model, a data set).
MAX_CONFIG_BYTES = 1 << 20
CONFIG_FETCH_TIMEOUT_S = 30.0
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")


def config_location(text: str) -> str | None:
    """The URI or path that `text` names, or None where it is the document itself: a
    one-line text with a scheme (`s3://...`), or a bare YAML string (a path); a mapping, JSON
    or several lines are a document."""
    line = text.strip()
    if not line or "\n" in line or line.startswith(("{", "[")):
        return None
    if _SCHEME.match(line):
        return line
    try:
        value = yaml.safe_load(line)
    except yaml.YAMLError:
        return None  # a document that lost its line breaks: `config_document` says so
    return line if isinstance(value, str) else None


def resolve_config_text(text: str) -> str:
    """The campaign config document that a parameter gives: `text` itself (a YAML document,
    or JSON on one line), or the contents of the file it names: `s3://bucket/key` (read with
    the campaign store's endpoint and credentials), `http(s)://...`, `file:///path` or a
    path. What the campaign pins is the parsed config, so a URI and the same config inline
    are one campaign."""
    location = config_location(text)
    if location is None:
        return text
    shown = redact_uri(location)
    scheme = _SCHEME.match(location)
    scheme_name = scheme.group(1).lower() if scheme else ""
    if scheme and scheme_name not in CONFIG_URI_SCHEMES:
        raise ConfigError(
            f"campaign config {shown!r}: unsupported scheme {scheme_name!r}; give {CONFIG_FORMS}"
        )
    in_the_pod = "; a path is read where the task runs (a volume mounted in the pod)"
    hint = {
        "s3": "; the pipeline reads it with the campaign store's credentials and endpoint",
        "file": in_the_pod,
        "": in_the_pod,
    }.get(scheme_name, "")
    try:
        data = _fetch_config(location, scheme_name)
    except ConfigError:
        raise
    except Exception as exc:  # any failure to read: the user's URI, credentials or network
        raise ConfigError(
            f"cannot fetch campaign config from {shown}: {_reason(exc)}{hint}"
        ) from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"campaign config {shown} is over {MAX_CONFIG_BYTES} bytes: is it a config file?"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"campaign config {shown} is not UTF-8 text (byte {exc.start}): is it a config file?"
        ) from None


def _fetch_config(location: str, scheme: str) -> bytes:
    if scheme == "s3":
        from cycleqd.objectstore import open_store

        parsed = urlparse(location)
        parent, _, key = unquote(parsed.path).strip("/").rpartition("/")
        if not parsed.netloc or not key:
            raise ConfigError(
                f"campaign config {redact_uri(location)!r} names no file: use s3://bucket/key"
            )
        # verify=False: a config uploaded by hand (aws s3 cp) carries no sha256 of ours.
        store = open_store(f"s3://{parsed.netloc}/{parent}")
        return store.get_bytes(key, verify=False)
    if scheme in ("http", "https"):
        from urllib.request import urlopen

        with urlopen(location, timeout=CONFIG_FETCH_TIMEOUT_S) as response:
            return response.read(MAX_CONFIG_BYTES + 1)
    path = Path(unquote(urlparse(location).path) if scheme == "file" else location)
    with path.expanduser().open("rb") as f:
        return f.read(MAX_CONFIG_BYTES + 1)


def _reason(exc: BaseException) -> str:
    """Why a fetch failed, in words: the OS's, the HTTP status, or the store's message."""
    from urllib.error import HTTPError, URLError

    if isinstance(exc, HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, URLError):
        exc = exc.reason if isinstance(exc.reason, OSError) else OSError(str(exc.reason))
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return redact_text(str(exc)) or type(exc).__name__


def config_document(text: str, source: str = "campaign config") -> Any:
    """The document of a campaign config's text: YAML, or JSON (one line, as the Kubeflow
    UI's parameter field keeps it)."""
    stripped = text.strip()
    json_error = None
    if stripped.startswith("{"):
        try:
            return json.loads(stripped)
        except json.JSONDecodeError as exc:
            json_error = exc  # or a YAML flow mapping ({name: x, seed: 0}): YAML decides
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        if json_error is not None:
            raise ConfigError(f"{source} is not valid JSON: {json_error}") from None
        one_line = (
            "; it is one line: the Kubeflow UI's parameter field drops a YAML document's "
            "line breaks, so give it as one-line JSON or as a URI (s3://, https://, a path)"
            if "\n" not in stripped
            else ""
        )
        raise ConfigError(f"{source} is not valid YAML: {exc}{one_line}") from None


def load_config_text(text: str, generations: int = 0) -> CampaignConfig:
    """The campaign config that a parameter gives (`resolve_config_text`: the document, or a
    URI or path of it), with `generations` to reach where not 0 (the one field that may
    change between runs of a campaign)."""
    if generations < 0:
        raise ConfigError(
            "generations to reach must be 0 (the config's `generations`) or more, got "
            f"{generations}"
        )
    location = config_location(text)
    source = f"campaign config {redact_uri(location)}" if location else "campaign config"
    data = config_document(resolve_config_text(text), source)
    if generations and isinstance(data, dict):
        data = {**data, "generations": generations}
    return parse_config(data, source)

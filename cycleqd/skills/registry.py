"""Every skill a campaign can score, by name, each with its own options.

A campaign config's `skills` list names skills from `REGISTRY`; an entry's fields are the
archive's (`bc_min`, `bc_max`, `bins`) plus the options of that skill and no other, so a typo or
another skill's option is an error that lists what exists. `build_skill` turns an entry into
the skill object that `SkillsEvaluator` scores over one warm chat backend.

Options are plain pydantic models (no torch, no data read): the config validates anywhere,
and the skill's heavy modules are imported only when it is built.

Every skill also derives a training set from its own data (`training_set(options, size)`,
see `cycleqd.skills.training_sets`): the real skills from the *training* part of a fixed hash
split of their tasks (`cycleqd.skills.split`), so that scoring with `part: evaluation` never
shows a fine-tuned expert a task it was trained on; the tiny skills from their generator's
train split.

To add a skill: an options class (its `name` a one-value Literal), a builder, a training-set
builder (or None), and a line in `REGISTRY`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar
from urllib.parse import quote, urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DB_PASSWORD_ENV = "CYCLEQD_DB_PASSWORD"

_T = TypeVar("_T")


class StrictModel(BaseModel):
    """Unknown fields are errors; values are frozen and finite."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class SkillConfig(StrictModel):
    """One skill: its quality is the score in its own archive; elsewhere it is a BC axis.

    This base class holds what every skill has; the registry's classes add each skill's own
    options. With `evaluation.scorer: probe` any name is allowed and there are no options.
    """

    name: str = Field(pattern=r"^[a-z][a-z0-9_]{0,31}$")
    bc_min: float = 0.0
    bc_max: float = 1.0
    bins: int = Field(default=15, ge=1, le=1000)

    @model_validator(mode="after")
    def _range_is_ordered(self) -> SkillConfig:
        if not self.bc_min < self.bc_max:
            raise ValueError(f"bc_min ({self.bc_min}) must be smaller than bc_max ({self.bc_max})")
        return self


class _Subset(StrictModel):
    """Which tasks of a benchmark are scored: the first `limit` in the data set's order, or,
    with `seed`, `limit` tasks drawn at random with that seed (the same subset every time).
    `part` is applied first: `limit: 20, part: evaluation` scores 20 evaluation-part tasks."""

    data: str | None = Field(
        default=None,
        description="folder, file or s3:// prefix holding the data set; default $CYCLEQD_DATA",
    )
    limit: int | None = Field(default=None, ge=1, description="tasks to score; default: all")
    seed: int | None = Field(default=None, ge=0, description="draw `limit` tasks with this seed")
    max_new_tokens: int = Field(default=512, ge=1, le=32768)
    part: Literal["all", "training", "evaluation"] = Field(
        default="all",
        description="which side of the fixed hash split (cycleqd.skills.split) is scored; "
        "`evaluation` never overlaps the `training` part that the skill's derived training "
        "set is built from",
    )

    @model_validator(mode="after")
    def _seed_needs_limit(self):
        if self.seed is not None and self.limit is None:
            raise ValueError("seed picks a random subset of `limit` tasks: set limit too")
        return self


class TinySkillConfig(SkillConfig):
    """A skill of the tiny world (`cycleqd.skills.tiny`): generated questions, verified by
    execution; `samples` questions of the evaluation split drawn with `seed`."""

    name: Literal["tiny_code", "tiny_sql", "tiny_shell"]
    samples: int = Field(default=96, ge=1, le=100_000)
    seed: int = Field(default=1, ge=0)
    level: int = Field(default=2, ge=1, le=3)
    max_new_tokens: int = Field(default=64, ge=1, le=4096)
    # The summary's second opinion: the final comparison is scored again on questions drawn
    # with this seed, so the search's selection cannot flatter its pick.
    holdout_seed: int = Field(default=1001, ge=0)


class CodingSkillConfig(_Subset, SkillConfig):
    """MBPP+ (EvalPlus), every program run in the sandbox; `inputs: base` is the paper's
    base_pass@1, `plus` adds EvalPlus's extra inputs."""

    name: Literal["coding"]
    inputs: Literal["base", "plus"] = "base"
    task_ids: list[str] | None = Field(default=None, description="score only these task ids")
    time_factor: float = Field(default=4.0, gt=0)


class DBSkillConfig(_Subset, SkillConfig):
    """AgentBench DBBench, multi-turn against a MySQL-compatible server (one throw-away
    database and account per episode). The password comes from $CYCLEQD_DB_PASSWORD, never
    from the config (which is stored with the campaign and logged to MLflow)."""

    name: Literal["db"]
    url: str = "mysql://root@127.0.0.1:3306"
    subset: Literal["all", "cycleqd"] = "all"
    max_rounds: int = Field(default=5, ge=0, le=50)
    statement_timeout_s: float = Field(default=5.0, gt=0)

    @field_validator("url")
    @classmethod
    def _no_password(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme.lower() not in ("mysql", "mariadb", "mysql+pymysql", "mariadb+pymysql"):
            raise ValueError(f"use mysql://user@host:port (MySQL or MariaDB), got {url!r}")
        if parts.password:
            raise ValueError(
                f"put the database password in ${DB_PASSWORD_ENV} (a Kubernetes secret), not in "
                "the config: the config is stored with the campaign and logged to MLflow"
            )
        if not parts.hostname:
            raise ValueError(f"{url!r} names no host: mysql://user@host:port")
        return url


class OSSkillConfig(_Subset, SkillConfig):
    """AgentBench OS interaction, multi-turn, every command in a sandboxed machine."""

    name: Literal["os"]
    indices: list[int] | None = Field(default=None, description="score only these task indices")
    max_rounds: int = Field(default=5, ge=1, le=50)
    action_timeout_s: float = Field(default=20.0, gt=0)
    # AgentBench shows one solved example first; without it prompts are ~1,000 tokens shorter
    # (a CPU's prefill time), and scores are not comparable with the paper's.
    one_shot: bool = True


@dataclass(frozen=True)
class SkillSpec:
    options: type[SkillConfig]
    build: Callable[[Any], Any]  # options -> a Skill (the backend batches generation itself)
    needs_sandbox: bool  # runs model output (code, shell) in cycleqd.sandbox
    # (options, size) -> a cycleqd.skills.training_sets.TrainingSet: chat rows in the skill's
    # own prompt and action format, none of them a task that `part: evaluation` scores.
    training_set: Callable[[Any, int | None], Any] | None = None


def _pick(items: Sequence[_T], limit: int | None, seed: int | None) -> list[_T]:
    """The first `limit` items, or `limit` drawn with `seed` (kept in data-set order)."""
    items = list(items)
    if limit is None or limit >= len(items):
        return items
    if seed is None:
        return items[:limit]
    import numpy as np

    chosen = np.random.default_rng(seed).choice(len(items), size=limit, replace=False)
    return [items[i] for i in sorted(chosen)]


def _build_tiny(options: TinySkillConfig):
    from cycleqd.skills.tiny.skill import TinySkill

    return TinySkill(
        options.name,
        options.samples,
        seed=options.seed,
        level=options.level,
        max_new_tokens=options.max_new_tokens,
    )


def coding_skill(options: CodingSkillConfig, rows: Sequence[dict]):
    """The coding skill over these MBPP+ rows, with the entry's scoring options."""
    from cycleqd.generate.base import SamplingParams
    from cycleqd.skills.coding import CodingSkill

    return CodingSkill(
        rows=rows,
        inputs=options.inputs,
        time_factor=options.time_factor,
        sampling=SamplingParams(max_new_tokens=options.max_new_tokens, temperature=0.0),
    )


def _build_coding(options: CodingSkillConfig):
    from cycleqd.skills.data import MBPP_PLUS, load_jsonl
    from cycleqd.skills.split import coding_task_id, select

    rows = select("coding", load_jsonl(options.data, MBPP_PLUS), coding_task_id, options.part)
    if options.task_ids is not None:
        wanted = set(options.task_ids)
        rows = [r for r in rows if r.get("task_id") in wanted]
        unknown = wanted - {r.get("task_id") for r in rows}
        if unknown:
            from cycleqd.errors import ConfigError

            where = "" if options.part == "all" else f" in the {options.part} part"
            raise ConfigError(
                f"skills.coding.task_ids: no such MBPP+ task(s){where} {sorted(unknown)}"
            )
    return coding_skill(options, _pick(rows, options.limit, options.seed))


def database_url(url: str) -> str:
    """The config's url with the password from $CYCLEQD_DB_PASSWORD, where it is set."""
    password = os.environ.get(DB_PASSWORD_ENV)
    if not password:
        return url
    parts = urlsplit(url)
    user = quote(parts.username or "root", safe="")
    netloc = f"{user}:{quote(password, safe='')}@{parts.hostname}"
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def db_config(options: DBSkillConfig):
    """The db skill's episode settings (`cycleqd.skills.db.DBConfig`) for a config entry."""
    from cycleqd.skills.db import DBConfig

    return DBConfig(
        url=database_url(options.url),
        max_rounds=options.max_rounds,
        max_new_tokens=options.max_new_tokens,
        statement_timeout_s=options.statement_timeout_s,
        subset=options.subset,
    )


def _build_db(options: DBSkillConfig):
    from cycleqd.skills.data import DBBENCH_DEV, load_jsonl
    from cycleqd.skills.db import DBSkill, load_dbbench
    from cycleqd.skills.split import select

    samples = load_dbbench(load_jsonl(options.data, DBBENCH_DEV))
    samples = select("db", samples, lambda s: s.sample_id, options.part)
    skill = DBSkill(samples, db_config(options))  # `subset` is applied here, after `part`
    skill.samples = _pick(skill.samples, options.limit, options.seed)
    return skill


def check_database(options: DBSkillConfig) -> None:
    """Connect to the `db` skill's server as its episodes will; CycleQDError saying what to
    fix when it cannot be reached or refuses the account."""
    from cycleqd.errors import CycleQDError
    from cycleqd.skills.db_sandbox import open_sandbox

    try:
        open_sandbox(database_url(options.url)).close()
    except Exception as exc:  # any failure: the episodes would fail the same way
        raise CycleQDError(
            f"skills.db.url: cannot use the database server at {options.url} "
            f"({type(exc).__name__}: {str(exc)[:300]}); start it or fix the url (the password "
            f"comes from ${DB_PASSWORD_ENV})"
        ) from None


def os_skill(options: OSSkillConfig, rows: Sequence[dict]):
    """The os skill over these AgentBench OS rows, with the entry's episode options."""
    from cycleqd.generate.base import SamplingParams
    from cycleqd.skills.os_skill import OSSkill

    return OSSkill(
        rows=rows,
        max_rounds=options.max_rounds,
        action_timeout=options.action_timeout_s,
        one_shot=options.one_shot,
        sampling=SamplingParams(max_new_tokens=options.max_new_tokens, temperature=0.0),
    )


def _build_os(options: OSSkillConfig):
    from cycleqd.skills.data import AGENTBENCH_OS, load_jsonl
    from cycleqd.skills.split import os_task_id, select

    rows = select("os", load_jsonl(options.data, AGENTBENCH_OS), os_task_id, options.part)
    if options.indices is not None:
        wanted = set(options.indices)
        rows = [r for r in rows if int(r["index"]) in wanted]
    return os_skill(options, _pick(rows, options.limit, options.seed))


def _training_set(options: SkillConfig, size: int | None = None):
    from cycleqd.skills.training_sets import training_set

    return training_set(options, size)


REGISTRY: dict[str, SkillSpec] = {
    **{
        family: SkillSpec(TinySkillConfig, _build_tiny, False, _training_set)
        for family in ("tiny_code", "tiny_sql", "tiny_shell")
    },
    # MBPP+ (EvalPlus)
    "coding": SkillSpec(CodingSkillConfig, _build_coding, True, _training_set),
    # AgentBench DBBench, MySQL/MariaDB
    "db": SkillSpec(DBSkillConfig, _build_db, False, _training_set),
    "os": SkillSpec(OSSkillConfig, _build_os, True, _training_set),  # AgentBench OS
}


def skill_names() -> list[str]:
    return list(REGISTRY)


def options_class(name: str) -> type[SkillConfig] | None:
    spec = REGISTRY.get(name)
    return spec.options if spec else None


def has_training_set(name: str) -> bool:
    """Whether the registered skill `name` derives a training set from its data."""
    spec = REGISTRY.get(name)
    return spec is not None and spec.training_set is not None


def owners_of(field: str) -> list[str]:
    """The registered skills that have an option called `field`."""
    return [n for n, s in REGISTRY.items() if field in s.options.model_fields]


def build_skill(options: SkillConfig):
    """The skill object for a validated config entry (reads its data set)."""
    spec = REGISTRY.get(options.name)
    if spec is None or not isinstance(options, spec.options):
        raise ValueError(f"{options.name!r} is not a registered skill: {', '.join(REGISTRY)}")
    return spec.build(options)

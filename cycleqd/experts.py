"""The experts stage: every expert the campaign config gives as a fine-tuning spec is trained
from the base and published to the campaign store before the archives are seeded.

    check_expert_specs(config, base_shapes)   # preflight: data, LoRA targets (no GPU, no torch)
    train_expert(config, store_uri, "coding") # one skill: data -> LoRA/full -> published expert

A skill's expert is published under `experts/<skill>` with its genome record and its task
vector's SVD factors (`cycleqd.finetune`); the campaign then reads it from there like any
expert. Idempotent: a published expert is never trained again (same spec: reused by
fingerprint; after seeding: reused whatever happens), and a killed run resumes from its last
checkpoint in the store, producing the same bytes as an uninterrupted one.

A `derived` training set (the skill's own training part) is built once and kept in the store
(`training/<skill>.jsonl`): episodes replayed against a database or a sandbox need not give
the same text twice (an init script's `$RANDOM`), and the expert must be reproducible from
what it was trained on.
"""

from __future__ import annotations

import logging
import os
import time

from cycleqd.config import CampaignConfig, ExpertTraining
from cycleqd.errors import ConfigError, CycleQDError
from cycleqd.finetune_settings import missing_targets
from cycleqd.state import CampaignStore

log = logging.getLogger(__name__)

# Torch threads of a fine-tuning process (unset: torch's default). A local run that trains
# experts side by side on a few cores sets it: tiny models train faster as one thread per
# process than as processes that share cores between threads. The weights depend on it.
THREADS_ENV = "CYCLEQD_FINETUNE_THREADS"


def experts_to_train(config: CampaignConfig) -> list[str]:
    """The skills whose expert the campaign fine-tunes, in the config's skill order."""
    trained = config.models.trained()
    return [s for s in config.skill_names if s in trained]


def check_expert_specs(config: CampaignConfig, base_shapes: dict[str, tuple[int, ...]]) -> None:
    """Preflight of every fine-tuning spec, before any GPU is requested: LoRA targets that the
    base has (from its safetensors header), and given data sets that are chat JSONL with an
    assistant turn in every row (read in full: a bad row fails here, not hours later)."""
    from cycleqd.finetune.data import DatasetError, load_chat_dataset

    problems = []
    for skill, spec in config.models.trained().items():
        where = f"models.experts.{skill}"
        if spec.method == "lora":
            why = missing_targets(base_shapes, spec.lora.target_modules)
            if why:
                problems.append(f"{where}.lora.target_modules: {why}")
        if not spec.derived:
            try:
                load_chat_dataset(spec.data)
            except DatasetError as exc:
                problems.append(f"{where}.data: {exc}")
    if problems:
        listed = "\n  - ".join(problems)
        raise ConfigError(f"the experts to fine-tune cannot be trained:\n  - {listed}")


def _spec(config: CampaignConfig, skill: str) -> ExpertTraining:
    spec = config.models.experts.get(skill)
    if not isinstance(spec, ExpertTraining):
        given = "not a skill of this campaign" if spec is None else f"given by location ({spec})"
        raise ConfigError(f"expert {skill!r}: nothing to fine-tune ({given})")
    return spec


def training_data(config: CampaignConfig, store: CampaignStore, skill: str) -> str:
    """The URI of the chat JSONL that the skill's expert trains on: the spec's data, or the
    skill's derived training set, built and stored the first time."""
    spec = _spec(config, skill)
    if not spec.derived:
        return spec.data
    key = store.training_set_key(skill)
    if not store.store.exists(key):
        from cycleqd.skills.training_sets import training_set

        started = time.perf_counter()
        built = training_set(config.skill(skill), spec.size)
        if not built.rows:
            raise CycleQDError(
                f"skill {skill!r}: its training part gave no usable conversation "
                f"({built.candidates} candidates, rejected: {built.rejected}); give "
                f"models.experts.{skill}.data instead"
            )
        store.store.put_bytes(key, built.jsonl())
        log.info(
            "training set %s: %d conversations of %d candidates (rejected %s) in %.1f s",
            skill,
            len(built.rows),
            built.candidates,
            built.rejected,
            time.perf_counter() - started,
        )
    return f"{store.uri.rstrip('/')}/{key}"


def finetune_config(
    config: CampaignConfig, store: CampaignStore, skill: str, data: str, tracking_uri: str = ""
):
    """The `cycleqd.finetune` config of one skill's expert in this campaign."""
    from cycleqd.finetune.config import FinetuneConfig

    spec = _spec(config, skill)
    return FinetuneConfig(
        **spec.settings(),
        name=f"{config.name}-{skill}",
        skill=skill,
        base=config.models.base,
        data=data,
        store=store.uri,
        prefix=store.expert_prefix(skill),
        checkpoint_prefix=store.checkpoints_prefix(skill),
        tracking_uri=tracking_uri or None,
        experiment=config.name,
    )


def train_expert(
    config: CampaignConfig, store_uri: str, skill: str, tracking_uri: str = ""
) -> dict:
    """Fine-tune and publish one skill's expert (see the module doc); returns its record."""
    from cycleqd.finetune.expert import published_expert
    from cycleqd.finetune.run import run_finetune

    spec = _spec(config, skill)
    threads = os.environ.get(THREADS_ENV, "").strip()
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    store = CampaignStore(store_uri)
    if not store.check_config(config):  # a store of another campaign is refused here
        store.write_config(config.to_yaml())
    published = published_expert(store.store, store.expert_prefix(skill))
    if published is not None and store.latest_generation() is not None:
        # Seeded: the archives hold this expert's genome; it is never trained again.
        return {
            "skill": skill,
            "uri": published.uri,
            "sha256": published.sha256,
            "genome_id": published.genome_id,
            "reused": True,
        }
    data = training_data(config, store, skill)
    result = run_finetune(finetune_config(config, store, skill, data, tracking_uri))
    record = result.to_json()
    log.info(
        "expert %s: %s (%s, %d steps, %.0f tokens/s)",
        skill,
        "reused" if result.reused else "trained",
        spec.method,
        result.steps,
        result.tokens_per_second,
    )
    return {"skill": skill, **record}


__all__ = [
    "check_expert_specs",
    "experts_to_train",
    "finetune_config",
    "train_expert",
    "training_data",
]

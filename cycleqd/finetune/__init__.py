"""Expert fine-tuning: supervised fine-tuning (peft LoRA, or full) of one expert per skill.

    from cycleqd.finetune import run_finetune, import_expert, load_task_vector_factors

    result = run_finetune("coding-expert.yaml")     # or a dict / FinetuneConfig
    result.uri, result.sha256, result.genome_id     # the published expert
    factors = load_task_vector_factors(store, "experts/coding-expert")
    u, s, vh = factors["model.layers.0.self_attn.q_proj.weight"]

Modules: `config` (FinetuneConfig), `data` (chat JSONL, assistant-only labels), `trainer`
(the loop and its checkpoints), `factors` (task vector SVD factors), `expert` (publishing,
importing), `tracking` (MLflow), `run` (the whole stage).
"""

# Imported on first use: reading the package's configs and data sets needs no torch (the
# CPU-only tasks validate expert specs and training data), training does.
_EXPORTS = {
    "ChatDataset": "cycleqd.finetune.data",
    "CheckpointMismatchError": "cycleqd.finetune.trainer",
    "DatasetError": "cycleqd.finetune.data",
    "FACTORS_FILE": "cycleqd.finetune.factors",
    "FactorsNotFoundError": "cycleqd.finetune.factors",
    "FinetuneConfig": "cycleqd.finetune.config",
    "FinetuneError": "cycleqd.finetune.trainer",
    "FinetuneResult": "cycleqd.finetune.run",
    "LoraSettings": "cycleqd.finetune.config",
    "PublishedExpert": "cycleqd.finetune.expert",
    "SourceError": "cycleqd.finetune.sources",
    "TaskVectorFactors": "cycleqd.finetune.factors",
    "encode_conversation": "cycleqd.finetune.data",
    "encode_dataset": "cycleqd.finetune.data",
    "evaluate": "cycleqd.finetune.trainer",
    "import_expert": "cycleqd.finetune.expert",
    "load_chat_dataset": "cycleqd.finetune.data",
    "load_finetune_config": "cycleqd.finetune.config",
    "load_task_vector_factors": "cycleqd.finetune.factors",
    "parse_finetune_config": "cycleqd.finetune.config",
    "published_expert": "cycleqd.finetune.expert",
    "run_finetune": "cycleqd.finetune.run",
}


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


__all__ = [
    "FACTORS_FILE",
    "ChatDataset",
    "CheckpointMismatchError",
    "DatasetError",
    "FactorsNotFoundError",
    "FinetuneConfig",
    "FinetuneError",
    "FinetuneResult",
    "LoraSettings",
    "PublishedExpert",
    "SourceError",
    "TaskVectorFactors",
    "encode_conversation",
    "encode_dataset",
    "evaluate",
    "import_expert",
    "load_chat_dataset",
    "load_finetune_config",
    "load_task_vector_factors",
    "parse_finetune_config",
    "published_expert",
    "run_finetune",
]

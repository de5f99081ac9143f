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

from cycleqd.finetune.config import (
    FinetuneConfig,
    LoraSettings,
    load_finetune_config,
    parse_finetune_config,
)
from cycleqd.finetune.data import (
    ChatDataset,
    DatasetError,
    encode_conversation,
    encode_dataset,
    load_chat_dataset,
)
from cycleqd.finetune.expert import PublishedExpert, import_expert, published_expert
from cycleqd.finetune.factors import (
    FACTORS_FILE,
    FactorsNotFoundError,
    TaskVectorFactors,
    load_task_vector_factors,
)
from cycleqd.finetune.run import FinetuneResult, run_finetune
from cycleqd.finetune.sources import SourceError
from cycleqd.finetune.trainer import CheckpointMismatchError, FinetuneError, evaluate

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

"""The chat backend a campaign config asks for, and whether it can run here.

`check_backend` is cheap (no model load, no CUDA context, vLLM not imported): preflight calls
it so that a config asking for vLLM where vLLM is not installed fails before anything is
written, with what to do; `build_backend` loads the model.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Any

from cycleqd.errors import CycleQDError

RUNTIME_ENV = "CYCLEQD_RUNTIME"  # set by the images: cpu-tools | evaluator | trainer


class BackendUnavailableError(CycleQDError):
    """The configured generation backend cannot run in this environment."""


def evaluates_here() -> bool:
    """False in the CPU tools image, whose tasks never generate (the evaluator image does)."""
    return os.environ.get(RUNTIME_ENV, "") != "cpu-tools"


def check_backend(config: Any) -> None:
    """Raise BackendUnavailableError when `config` (evaluation.backend) cannot run here."""
    if config.kind == "vllm":
        if "vllm" not in sys.modules and importlib.util.find_spec("vllm") is None:
            raise BackendUnavailableError(
                "evaluation.backend.kind is 'vllm', but vLLM is not installed here: run the "
                "evaluation on the vLLM evaluator image (images/Dockerfile.evaluator; on a laptop "
                "`pip install vllm` in a separate virtualenv with a GPU), or set "
                "evaluation.backend.kind to 'transformers' (device cpu or cuda)"
            )
        return
    if config.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise BackendUnavailableError(
                f"evaluation.backend.device is {config.device!r}, but torch sees no GPU here "
                f"(torch {torch.__version__}): use device 'cpu', or run on a GPU node"
            )


def build_backend(config: Any, model_folder: str, dtype: str, seed: int = 0):
    """A warm chat backend over the model in `model_folder` (a local HF folder)."""
    check_backend(config)
    dtype = config.dtype or dtype
    if config.kind == "vllm":
        from cycleqd.generate.vllm_backend import VLLMBackend

        return VLLMBackend(
            str(model_folder),
            dtype=dtype,
            tensor_parallel_size=config.tensor_parallel_size,
            gpu_memory_utilization=config.gpu_memory_utilization,
            max_model_len=config.max_model_len,
            enforce_eager=config.enforce_eager,
            seed=seed,
        )
    import torch

    from cycleqd.generate.transformers_backend import TransformersBackend

    if config.threads:
        torch.set_num_threads(config.threads)
    return TransformersBackend.from_pretrained(
        model_folder, dtype=dtype, device=config.device, batch_size=config.batch_size, seed=seed
    )

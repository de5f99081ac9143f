"""Text generation backends. Import a concrete backend from its own module: `transformers_backend`
(CPU/GPU) or `vllm_backend` (GPU image only; importing it elsewhere fails by design)."""

from cycleqd.generate.base import ChatBackend, Message, SamplingParams

__all__ = ["ChatBackend", "Message", "SamplingParams"]

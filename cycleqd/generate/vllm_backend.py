"""The GPU evaluator's backend: one warm vLLM engine per process, new weights swapped in place.

Starting an engine (process spawn, weight load, memory profiling, CUDA graph capture) costs
tens of seconds; a CycleQD evaluator scores one child after another on the same
architecture. So the engine starts once, and each child's weights are loaded into it through
the worker extension in `vllm_worker` (`collective_rpc("swap_weights", ...)`): from a local
safetensors folder, or built on the GPU from the child's genome. Only small requests cross
the RPC, never tensors. After every swap the prefix cache is reset: otherwise KV blocks
computed with the previous model's weights are reused for prompts sharing a prefix, and
scores come out silently wrong.

Only the vLLM evaluator image has vLLM (it pins its own torch and transformers); importing
this module anywhere else fails with an ImportError that says so.
"""

from __future__ import annotations

from collections.abc import Sequence

try:
    import vllm
except ImportError as exc:  # the CPU environment: by design
    raise ImportError(
        "cycleqd.generate.vllm_backend needs vLLM, which is installed only in the vLLM "
        "evaluator image (see images/; it pins its own torch and transformers). Run there, or "
        "use cycleqd.generate.transformers_backend.TransformersBackend on this machine."
    ) from exc

from cycleqd.generate.base import Message, SamplingParams
from cycleqd.generate.transformers_backend import cut_at_stop
from cycleqd.generate.vllm_worker import WORKER_EXTENSION, genome_request


class VLLMBackend:
    """A `ChatBackend` over a warm `vllm.LLM`, with in-place weight swaps (`swap`).

    `model` is a local folder or, with `load_format="runai_streamer"` (the default for
    `s3://` URIs), an S3 prefix streamed straight to the GPU on the first load; for an
    S3-compatible store set AWS_ENDPOINT_URL, RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING=0 and
    the usual AWS credentials in the environment. `enable_sleep_mode` lets `sleep()` hand the
    GPU memory back between evaluations without losing the engine.
    """

    weights_from = "requests"  # new weights arrive as swap requests, never as tensors

    def __init__(
        self,
        model: str,
        *,
        dtype: str = "bfloat16",
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.85,
        max_model_len: int | None = None,
        enable_sleep_mode: bool = False,
        load_format: str = "auto",
        seed: int = 0,
        **engine_kwargs,
    ):
        if load_format == "auto" and model.startswith("s3://"):
            load_format = "runai_streamer"
        self.dtype = dtype
        self.seed = seed
        self.sleeping = False
        self.llm = vllm.LLM(
            model=model,
            dtype=dtype,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            enable_sleep_mode=enable_sleep_mode,
            load_format=load_format,
            seed=seed,
            worker_extension_cls=WORKER_EXTENSION,
            **engine_kwargs,
        )

    # -- ChatBackend ---------------------------------------------------------------------------

    def generate(
        self, conversations: Sequence[Sequence[Message]], params: SamplingParams
    ) -> list[str]:
        if self.sleeping:
            raise RuntimeError("the engine is asleep: call wake_up() before generating")
        sampling = vllm.SamplingParams(
            max_tokens=params.max_new_tokens,
            temperature=params.temperature,
            stop=list(params.stop) or None,
            seed=self.seed if params.temperature > 0 else None,
        )
        # vLLM batches and schedules all conversations itself (continuous batching); the
        # tokenizer's chat template is applied with the assistant header appended.
        outputs = self.llm.chat(
            [list(c) for c in conversations],
            sampling,
            add_generation_prompt=True,
            use_tqdm=False,
        )
        # vLLM already leaves the stop string out of the text; cutting again is a no-op there
        # and keeps the contract identical to the transformers backend's.
        return [cut_at_stop(o.outputs[0].text, params.stop) for o in outputs]

    # -- weights -------------------------------------------------------------------------------

    def swap_folder(self, folder: str) -> int:
        """Load a local safetensors folder (same architecture) into the warm engine."""
        return self.swap({"kind": "safetensors", "path": str(folder)})

    def swap_genome(self, book, genome_id: str, folders: dict[str, str]) -> int:
        """Build a genome's weights inside each worker, on its GPU, from the base and the
        experts (and stored elites) in `folders` (genome id -> local folder)."""
        return self.swap(genome_request(book, genome_id, folders, dtype=self.dtype))

    def swap(self, request: dict) -> int:
        """Run a swap request (see `vllm_worker`) on every worker, then reset the prefix
        cache; returns the number of tensors loaded per worker."""
        if self.sleeping:
            raise RuntimeError("wake_up() the engine before swapping weights")
        counts = self.llm.collective_rpc("swap_weights", args=(request,))
        if self.llm.reset_prefix_cache() is False:
            raise RuntimeError("vLLM refused to reset its prefix cache after a weight swap")
        return counts[0]

    # -- sleep mode ----------------------------------------------------------------------------

    def sleep(self, level: int = 1) -> None:
        """Free the GPU (needs enable_sleep_mode). Level 1 keeps the weights in CPU memory;
        level 2 drops them, so a swap must follow `wake_up()` before generating again."""
        self.llm.sleep(level=level)
        self.sleeping = True

    def wake_up(self) -> None:
        self.llm.wake_up()
        self.sleeping = False
        self.llm.reset_prefix_cache()

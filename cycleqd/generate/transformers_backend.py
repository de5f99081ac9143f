"""Chat generation with plain transformers: batched, left-padded, KV-cached, on CPU or GPU.

Our own decode loop rather than `model.generate`, for three reasons: a sequence that has
produced a stop string (or the end-of-turn token) leaves the batch at once, and its rows are
dropped from the KV cache, so a batch costs what its live sequences cost; stop strings are
matched on decoded text, as vLLM does, and cut off; and it is small enough to read.

Greedy decoding (temperature 0) gives the same text batched as one prompt at a time: left
padding is masked out and position ids count real tokens only, so every row sees exactly
what it would alone. (In float32 the two agree to rounding; a near-tie between the two best
tokens could in principle flip, as with any batched inference. In bf16 on a GPU such flips are
more likely; compare scores, not strings, across batch sizes there.)
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from cycleqd.generate.base import Message, SamplingParams

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class GenerationStats:
    """What the last `generate` call did (for benchmarks and logs)."""

    prompts: int = 0
    batches: int = 0
    prompt_tokens: int = 0
    padded_prompt_tokens: int = 0  # prompt tokens including left padding
    generated_tokens: int = 0  # tokens decoded, up to and including a stop string
    seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds else 0.0


class TransformersBackend:
    """A `ChatBackend` over a causal LM and its tokenizer (with a chat template).

    `batch_size` prompts run together; prompts are sorted by length first, so that each batch
    holds prompts of similar length (little padding), and replies come back in input order.
    Sampling with temperature > 0 draws from a generator seeded with `seed` at every call.
    """

    weights_from = "tensors"  # new weights: `load_weights`, or written into `weight_buffers`

    def __init__(
        self,
        model,
        tokenizer,
        batch_size: int = 8,
        device: str | torch.device | None = None,
        seed: int = 0,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(
                "the tokenizer has no chat template; use an instruct model's tokenizer or set "
                "tokenizer.chat_template"
            )
        self.device = torch.device(device) if device is not None else model.device
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.seed = seed
        self.eos_ids = _eos_ids(model, tokenizer)
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else min(self.eos_ids, default=0)
        self.stats = GenerationStats()
        # transformers 5.x renamed `past_key_values` to `cache`; 4.x has the old names.
        accepted = inspect.signature(self.model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in accepted else "past_key_values"
        self._prefill_kwargs = {"logits_to_keep": 1} if "logits_to_keep" in accepted else {}

    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path,
        dtype: str | torch.dtype = "bfloat16",
        device: str | torch.device = "cpu",
        **kwargs,
    ) -> TransformersBackend:
        """Model and tokenizer from one local folder (HF layout, safetensors)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch_dtype = _DTYPES[dtype] if isinstance(dtype, str) else dtype
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        return cls(model, tokenizer, device=device, **kwargs)

    # -- ChatBackend ---------------------------------------------------------------------------

    def encode(self, conversation: Sequence[Message]) -> list[int]:
        """The prompt's token ids: the chat template with the assistant header appended."""
        text = self.tokenizer.apply_chat_template(
            list(conversation), tokenize=False, add_generation_prompt=True
        )
        # The template writes the BOS token itself: adding special tokens again would double it.
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def generate(
        self, conversations: Sequence[Sequence[Message]], params: SamplingParams
    ) -> list[str]:
        return self.generate_ids([self.encode(c) for c in conversations], params)

    def generate_ids(self, prompts: Sequence[list[int]], params: SamplingParams) -> list[str]:
        """`generate` for prompts already encoded (`encode`): what a server that received
        token ids runs, with the same batches and so the same replies."""
        start = time.perf_counter()
        prompts = [list(p) for p in prompts]
        self.stats = GenerationStats(prompts=len(prompts))
        # Longest first: a batch that does not fit in memory fails at once, not at the end.
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        replies: list[str] = [""] * len(prompts)
        generator = None
        if params.temperature > 0:
            generator = torch.Generator(device=self.device).manual_seed(self.seed)
        for first in range(0, len(order), self.batch_size):
            chunk = order[first : first + self.batch_size]
            texts = self._generate_batch([prompts[i] for i in chunk], params, generator)
            for i, text in zip(chunk, texts, strict=True):
                replies[i] = text
        self.stats.seconds = time.perf_counter() - start
        return replies

    # -- weights -------------------------------------------------------------------------------

    def weight_buffers(self) -> dict[str, torch.Tensor]:
        """The model's tensors by checkpoint name (views on its parameters), for a producer
        that writes weights in place (`Materializer.tensors(gid, into=...)`): `load_weights`
        of those same tensors then copies nothing."""
        return self.model.state_dict()

    @torch.no_grad()
    def load_weights(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], strict: bool = True
    ) -> int:
        """Copy (name, tensor) pairs into the model in place, one tensor at a time.

        Names are the checkpoint's (HF layout, as `Materializer.tensors` yields them); dtype
        and device are converted on copy. With `strict`, every tensor of the model must be
        given (tied weights count once). Returns the number of tensors copied.
        """
        state = self.model.state_dict()  # views on the parameters: copy_ writes through
        filled: set[int] = set()
        count = 0
        for name, tensor in named_tensors:
            target = state.get(name)
            if target is None:
                raise KeyError(f"the model has no tensor {name!r}: is this the same architecture?")
            if tuple(target.shape) != tuple(tensor.shape):
                raise ValueError(
                    f"tensor {name!r}: the model's shape is {tuple(target.shape)}, "
                    f"got {tuple(tensor.shape)}"
                )
            target.copy_(tensor)
            filled.add(target.data_ptr())
            count += 1
        if strict:
            missing = sorted(n for n, t in state.items() if t.data_ptr() not in filled)
            if missing:
                raise ValueError(
                    f"{len(missing)} tensors of the model were not given, e.g. {missing[:3]}; "
                    "the model now mixes two sets of weights"
                )
        return count

    # -- the decode loop -----------------------------------------------------------------------

    @torch.inference_mode()
    def _generate_batch(
        self, prompts: list[list[int]], params: SamplingParams, generator: torch.Generator | None
    ) -> list[str]:
        from transformers import DynamicCache

        n = len(prompts)
        width = max(len(p) for p in prompts)
        ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            mask[row, width - len(prompt) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        # Positions count real tokens only: a left-padded row is positioned as if alone.
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        self.stats.batches += 1
        self.stats.prompt_tokens += sum(len(p) for p in prompts)
        self.stats.padded_prompt_tokens += n * width

        tokens: list[list[int]] = [[] for _ in range(n)]
        if params.max_new_tokens <= 0:
            return ["" for _ in range(n)]
        try:
            cache = DynamicCache(config=self.model.config)
        except TypeError:  # transformers < 4.56
            cache = DynamicCache()
        logits = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **{self._cache_kwarg: cache},
            **self._prefill_kwargs,
        ).logits[:, -1, :]
        next_position = positions[:, -1:] + 1
        live = list(range(n))  # the prompt index of each row still in the batch
        for step in range(params.max_new_tokens):
            chosen = self._pick(logits, params.temperature, generator)
            keep: list[int] = []
            for row, (index, token) in enumerate(zip(live, chosen.tolist(), strict=True)):
                if token in self.eos_ids:
                    continue
                tokens[index].append(token)
                self.stats.generated_tokens += 1
                if params.stop and self._has_stop(tokens[index], params.stop):
                    continue
                keep.append(row)
            if not keep or step == params.max_new_tokens - 1:
                break
            if len(keep) < len(live):  # finished rows leave the batch and the cache
                rows = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(rows)
                mask, next_position, chosen = mask[rows], next_position[rows], chosen[rows]
                live = [live[r] for r in keep]
            mask = torch.cat([mask, mask.new_ones((len(live), 1))], dim=1)
            logits = self.model(
                input_ids=chosen[:, None],
                attention_mask=mask,
                position_ids=next_position,
                use_cache=True,
                **{self._cache_kwarg: cache},
            ).logits[:, -1, :]
            next_position = next_position + 1
        return [cut_at_stop(self._decode(t), params.stop) for t in tokens]

    def _pick(
        self, logits: torch.Tensor, temperature: float, generator: torch.Generator | None
    ) -> torch.Tensor:
        if temperature <= 0:
            return logits.argmax(dim=-1)
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def _has_stop(self, tokens: list[int], stop: Sequence[str]) -> bool:
        # The whole reply is decoded, not just the last token: a stop string may span tokens,
        # and a multi-byte character is only complete once all of its bytes are there.
        text = self._decode(tokens)
        return any(s and s in text for s in stop)


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """The text before the first occurrence of any stop string."""
    cut = len(text)
    for s in stop:
        if s:
            at = text.find(s)
            if at != -1:
                cut = min(cut, at)
    return text[:cut]


def _eos_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (tokenizer.eos_token_id, config_eos):
        if isinstance(value, int):
            ids.add(value)
        elif value is not None:
            ids.update(int(v) for v in value)
    return ids

"""A tiny Llama-3-style chat tokenizer and chat model, built in code (no downloads).

The tokenizer is a byte-level BPE trained on a few strings: every byte is in its alphabet, so
it encodes any text (HumanEval prompts included) and decodes back exactly. It carries the
special tokens and the chat template of Llama 3 Instruct, so code written against it works
unchanged on the real tokenizer. `build_chat_model` pairs it with a random Llama whose
vocabulary matches (for tests and benchmarks).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

BOS = "<|begin_of_text|>"
EOT = "<|eot_id|>"  # end of a turn: the stop token of an instruct model
EOS = "<|end_of_text|>"
PAD = "<|finetune_right_pad_id|>"  # Llama 3's spare token that fine-tunes use for padding
SPECIAL_TOKENS = (BOS, EOS, "<|start_header_id|>", "<|end_header_id|>", EOT, PAD)

# Llama 3 Instruct's template, without the date/tools preamble of 3.1.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{{ message['content'] | trim }}{{ '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)

CORPUS = (
    "def add(a, b):\n    return a + b\n",
    "def is_prime(n: int) -> bool:\n    for i in range(2, n):\n        if n % i == 0:\n"
    "            return False\n    return True\n",
    "from typing import List\n\n\ndef has_close_elements(numbers: List[float]) -> bool:\n"
    '    """ Check if in given list of numbers, are any two numbers closer to each other."""\n',
    "SELECT name, COUNT(*) FROM users WHERE age > 30 GROUP BY name ORDER BY name;",
    "ls -la /home/user && cat README.md | grep -n 'install' | wc -l",
    "The quick brown fox jumps over the lazy dog. Answer the question step by step.",
    "You are a helpful assistant. Write a Python function that solves the task.",
)


def build_tokenizer(vocab_size: int = 512, corpus: Iterable[str] = CORPUS):
    """A `PreTrainedTokenizerFast` with Llama 3's special tokens and chat template.

    `len(tokenizer)` is at most `vocab_size` (the trainer stops when it runs out of merges).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOT,
        pad_token=PAD,
        chat_template=CHAT_TEMPLATE,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )


def build_chat_model(
    seed: int = 0,
    tokenizer=None,
    hidden: int = 64,
    layers: int = 2,
    intermediate: int = 176,
    heads: int = 4,
    max_positions: int = 2048,
):
    """A random Llama (float32, eval mode) sized to the tokenizer; returns (model, tokenizer).

    Weights are drawn wider than the default init (as in `cycleqd.probe_world`), so greedy decoding
    wanders over the vocabulary instead of repeating one token.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tokenizer or build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 2 and "embed" not in name:
                param.copy_(torch.randn(param.shape, generator=generator) / param.shape[1] ** 0.5)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model.eval(), tokenizer


def save_chat_model(folder: str | Path, seed: int = 0, **kwargs) -> Path:
    """`build_chat_model` saved as a model folder (safetensors + tokenizer + chat template)."""
    model, tokenizer = build_chat_model(seed=seed, **kwargs)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return Path(folder)

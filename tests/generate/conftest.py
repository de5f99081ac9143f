"""Fixtures for the generation tests: a tiny chat tokenizer and random Llamas built in code."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tokenizer():
    from cycleqd.generate.tiny_tokenizer import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="session")
def chat_model(tokenizer):
    from cycleqd.generate.tiny_tokenizer import build_chat_model

    return build_chat_model(seed=0, tokenizer=tokenizer)[0]


@pytest.fixture(scope="session")
def other_chat_model(tokenizer):
    from cycleqd.generate.tiny_tokenizer import build_chat_model

    return build_chat_model(seed=1, tokenizer=tokenizer)[0]


@pytest.fixture(scope="session")
def conversations():
    """Eleven conversations of different lengths: system prompts, multi-turn, code, unicode."""
    topics = ["add two numbers", "is_prime", "SELECT name FROM users", "ls -la", "fox"]
    convs = []
    for i in range(11):
        conv = []
        if i % 3 == 0:
            conv.append({"role": "system", "content": "You are a helpful assistant."})
        conv.append({"role": "user", "content": f"Task {i}: {topics[i % 5]} " + "word " * (i * i)})
        if i % 4 == 1:
            conv.append({"role": "assistant", "content": "def f(x):\n    return x  # ünï"})
            conv.append({"role": "user", "content": "Again, step by step."})
        convs.append(conv)
    return convs

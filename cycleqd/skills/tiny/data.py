"""Chat-format training data of the tiny world: ``{"messages": [user, assistant]}`` per line.

- `skill_examples(family, n)`: an expert's fine-tuning set (the family's skill templates, from
  the *train* split: never a question of any evaluation set);
- `general_examples(...)`: the shared base's mixed set: every family's warm-up templates (the
  chat format, the three answer syntaxes, copying values out of the prompt) plus, optionally, a
  few skill-template examples per family, shuffled together.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cycleqd.skills.tiny.tasks import FAMILIES, generate, skill_templates, warmup_templates

Example = dict[str, list[dict[str, str]]]


def skill_examples(family: str, n: int, seed: int = 0, level: int = 2) -> list[Example]:
    return [s.chat() for s in generate(family, n, seed=seed, split="train", level=level)]


def general_examples(
    n_warmup: int = 1000,
    n_skill: int = 0,
    seed: int = 0,
    level: int = 2,
    families: Iterable[str] = FAMILIES,
    skill_seed_offset: int = 1000,
) -> list[Example]:
    """`n_warmup` warm-up examples and `n_skill` skill examples per family, shuffled.

    The skill examples come from seeds `seed + skill_seed_offset` so that they differ from the
    experts' sets drawn with `seed` (both are train-split questions)."""
    out: list[Example] = []
    for family in families:
        out += [
            s.chat()
            for s in generate(
                family,
                n_warmup,
                seed=seed,
                split="train",
                level=level,
                templates=warmup_templates(family),
            )
        ]
        if n_skill:
            out += [
                s.chat()
                for s in generate(
                    family,
                    n_skill,
                    seed=seed + skill_seed_offset,
                    split="train",
                    level=level,
                    templates=skill_templates(family),
                )
            ]
    random.Random(seed).shuffle(out)
    return out


def write_jsonl(path: str | Path, examples: Iterable[dict[str, Any]]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for example in examples:
            f.write(json.dumps(example, ensure_ascii=False) + "\n")
    return path


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    with Path(path).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_datasets(
    folder: str | Path,
    n_skill: int = 4000,
    n_warmup: int = 1000,
    n_general_skill: int = 0,
    seed: int = 0,
    level: int = 2,
) -> dict[str, Path]:
    """general.jsonl and one <family>.jsonl per family under `folder`; returns their paths."""
    folder = Path(folder)
    paths = {
        "general": write_jsonl(
            folder / "general.jsonl", general_examples(n_warmup, n_general_skill, seed, level)
        )
    }
    for family in FAMILIES:
        paths[family] = write_jsonl(
            folder / f"{family}.jsonl", skill_examples(family, n_skill, seed, level)
        )
    return paths

"""A fixed split of every real skill's tasks into a *training* and an *evaluation* part.

An expert fine-tuned on a skill's derived training set (`cycleqd.skills.training_sets`) has
seen the training part's tasks and their solutions; scoring it with `part: evaluation` (an
option of the coding, db and os skills) never shows it one of them again.

A task's part depends only on the skill's name and the task's id: the first 8 bytes of
``sha256(f"{skill}/{task_id}")`` read as a big-endian unsigned integer, divided by 2**64; below
`TRAINING_FRACTION` is training, the rest evaluation. No random generator, no Python `hash`:
the same on every machine and every Python version, whatever subset is loaded.

Task ids (what `part_of` is given, and the `id` of every derived training row):

- ``coding`` (MBPP+): the row's ``task_id``, e.g. ``"Mbpp/2"``;
- ``os`` (AgentBench OS): the row's ``index`` as a decimal string, e.g. ``"0"`` (the skill
  reports the sample as ``"os/0"``);
- ``db`` (AgentBench DBBench): the rows have no id field; the db skill's own id of a sample,
  `DBSample.sample_id`, is the row's 0-based position in ``agentbench_dbbench_dev.jsonl`` as a
  decimal string (``"0"`` .. ``"359"``). The file is pinned by its sha256
  (`cycleqd.skills.data.KNOWN_SHA256`), so positions cannot shift under the split.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from typing import Literal, TypeVar

TRAINING_FRACTION = 0.5

Part = Literal["training", "evaluation"]
PartOption = Literal["all", "training", "evaluation"]
PARTS: tuple[str, ...] = ("all", "training", "evaluation")

_T = TypeVar("_T")


def part_of(skill: str, task_id: str) -> Part:
    """The part `task_id` of `skill` belongs to (see the module docstring)."""
    digest = hashlib.sha256(f"{skill}/{task_id}".encode()).digest()
    fraction = int.from_bytes(digest[:8], "big") / 2**64
    return "training" if fraction < TRAINING_FRACTION else "evaluation"


def in_part(skill: str, task_id: str, part: PartOption) -> bool:
    """Whether the task is selected by a skill's `part` option ("all" selects every task)."""
    if part == "all":
        return True
    if part not in PARTS:
        raise ValueError(f"part must be one of {', '.join(PARTS)}, got {part!r}")
    return part_of(skill, task_id) == part


def select(
    skill: str, items: Iterable[_T], task_id: Callable[[_T], str], part: PartOption
) -> list[_T]:
    """The items of `part`, in their order."""
    return [item for item in items if in_part(skill, task_id(item), part)]


# -- task ids of the three real skills --------------------------------------------------------


def coding_task_id(row: dict) -> str:
    """An MBPP+ row's id: its ``task_id``."""
    return str(row["task_id"])


def os_task_id(row: dict) -> str:
    """An AgentBench OS row's id: its ``index``."""
    return str(int(row["index"]))


def db_task_id(index: int) -> str:
    """A DBBench row's id: its 0-based position in the file (`DBSample.sample_id`)."""
    return str(int(index))

"""Generators: deterministic per seed, disjoint train/eval splits, every template reachable."""

from __future__ import annotations

import pytest

from cycleqd.skills.tiny import FAMILIES, generate
from cycleqd.skills.tiny.data import general_examples, read_jsonl, skill_examples, write_datasets
from cycleqd.skills.tiny.tasks import skill_templates, split_of, warmup_templates


@pytest.mark.parametrize("family", FAMILIES)
def test_generators_are_deterministic_per_seed(family):
    a = generate(family, 40, seed=7, split="eval")
    b = generate(family, 40, seed=7, split="eval")
    c = generate(family, 40, seed=8, split="eval")
    assert a == b
    assert [s.question for s in a] != [s.question for s in c]
    assert len({s.question for s in a}) == 40  # distinct within a set
    assert [s.index for s in a] == list(range(40))


@pytest.mark.parametrize("family", FAMILIES)
def test_train_and_eval_are_disjoint_whatever_the_seeds(family):
    train = {s.question for seed in range(3) for s in generate(family, 300, seed, "train")}
    evals = {s.question for seed in range(3) for s in generate(family, 100, seed, "eval")}
    assert not train & evals
    assert all(split_of(q) == "train" for q in train)
    assert all(split_of(q) == "eval" for q in evals)
    # the expert's and the base's training data hold no evaluation question either
    chats = skill_examples(family, 200, seed=0) + general_examples(50, 10, seed=0)
    assert not {e["messages"][0]["content"] for e in chats} & evals


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("level", [1, 2, 3])
def test_every_template_at_every_level(family, level):
    samples = generate(family, 60, seed=0, split="eval", level=level)
    assert {s.template for s in samples} == set(skill_templates(family))
    warm = generate(
        family, 12, seed=0, split="train", level=level, templates=warmup_templates(family)
    )
    assert {s.template for s in warm} == set(warmup_templates(family))
    assert not set(skill_templates(family)) & set(warmup_templates(family))
    for s in samples:
        assert "\n" not in s.answer and s.answer == s.answer.strip()
        assert s.question.startswith(
            {"tiny_code": "Python", "tiny_sql": "SQL", "tiny_shell": "bash"}[family]
        )


def test_levels_change_sizes():
    small = generate("tiny_sql", 30, seed=0, level=1)
    large = generate("tiny_sql", 30, seed=0, level=3)
    assert max(len(s.table.rows) for s in small) < min(len(s.table.rows) for s in large)


def test_small_templates_run_out_and_leave_the_rotation():
    # "5 to the power 3" has only 16 questions at level 1; the other templates fill in
    samples = generate("tiny_code", 400, seed=0, split="eval", level=1)
    assert len(samples) == 400
    assert 0 < sum(s.template == "power" for s in samples) < 8


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="unknown tiny family"):
        generate("tiny_cobol", 3)
    with pytest.raises(ValueError, match="level"):
        generate("tiny_code", 3, level=4)
    with pytest.raises(ValueError, match="split"):
        generate("tiny_code", 3, split="test")
    with pytest.raises(ValueError, match="templates"):
        generate("tiny_code", 3, templates=["nope"])


def test_chat_jsonl_datasets(tmp_path):
    paths = write_datasets(tmp_path, n_skill=20, n_warmup=10, n_general_skill=2)
    assert set(paths) == {"general", *FAMILIES}
    for family in FAMILIES:
        rows = read_jsonl(paths[family])
        assert len(rows) == 20
        for row in rows:
            roles = [m["role"] for m in row["messages"]]
            assert roles == ["user", "assistant"]
            assert all(isinstance(m["content"], str) and m["content"] for m in row["messages"])
    general = read_jsonl(paths["general"])
    assert len(general) == 3 * (10 + 2)
    prefixes = {row["messages"][0]["content"].split(maxsplit=1)[0] for row in general}
    assert prefixes == {"Python.", "SQL.", "bash."}

"""The tiny world's models: a shared base and one expert per family, trained on a CPU.

- `world_tokenizer`: the tiny byte-level BPE (`cycleqd.generate.tiny_tokenizer`) trained on the
  world's own text, so prompts are short;
- `new_model`: a random Llama (standard init) of a `ModelShape`;
- `train`: a minimal full fine-tuning loop (AdamW, warmup + cosine, loss on assistant tokens
  only, the chat template exactly as `TransformersBackend` prompts);
- `build_base`: tokenizer -> base (random init, trained on the mixed general set), and the
  experts as fine-tuning specs: `cycleqd run` trains them in the pipeline's experts stage;
- `build_world`: the base, then the experts through that same stage (`cycleqd.experts`), as
  HF folders; for the feasibility report and tests that need trained experts;
- `average_merge`: theta_base + mean of the experts' task vectors;
- ``python -m cycleqd.skills.tiny.train OUT``: builds a world and prints the feasibility report
  (minutes per model, each model's three scores, the average merge's).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from cycleqd.skills.tiny.data import Example, general_examples, write_jsonl
from cycleqd.skills.tiny.tasks import FAMILIES, generate, skill_templates, warmup_templates

log = logging.getLogger(__name__)


def build_threads(sample_s: float = 1.0) -> int:
    """Torch threads for training the base: the cores nobody else is using now. Measured on 2
    cores: idle, 2 threads train 1.7x faster than 1; with other work running, 2 threads ran
    ~4x slower than 1 (the ops are small; threads wait for each other). On a 2-core AVX-512
    box, 1 and 2 threads built bit-identical worlds; torch's vector kernels do change them
    (AVX-512 against AVX2, `ATEN_CPU_CAPABILITY`: other losses from step 100 on), so the
    world differs from one CPU to another. It is built once per workdir and reused; the
    threads and kernels used are in world.json's report."""
    cores = os.cpu_count() or 1
    idle = _idle_cores(sample_s)
    return max(1, min(cores, int(idle + 0.25)))


def _idle_cores(sample_s: float) -> float:
    """Idle cores over the next `sample_s` seconds (/proc/stat; the load average, which lags
    by a minute, where there is none)."""

    def times() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        return fields[3] + fields[4], sum(fields)  # idle + iowait, all

    cores = os.cpu_count() or 1
    try:
        idle0, total0 = times()
        time.sleep(sample_s)
        idle1, total1 = times()
        return cores * (idle1 - idle0) / max(1, total1 - total0)
    except (OSError, ValueError, IndexError):
        try:
            return cores - os.getloadavg()[0]
        except OSError:
            return float(cores)


@dataclass(frozen=True)
class ModelShape:
    hidden: int = 160
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 432
    max_positions: int = 512


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 600
    lr: float = 3e-3
    batch_size: int = 32
    warmup: int = 30
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    max_len: int = 256
    seed: int = 0


@dataclass(frozen=True)
class WorldConfig:
    """The knobs of the tiny world's models (defaults: measured, see `main`'s report).

    The base sees every family's warm-up templates and a few skill examples per family (about
    4 per template): it knows the chat format, the three syntaxes and a little of each skill.
    Mergeability depends on that: with 24-60 skill examples per family instead of 100-150 the
    experts still reach 0.8-0.9, but the average merge falls to ~0.2 (the task vectors must
    carry more, and interfere more)."""

    seed: int = 0
    level: int = 2
    vocab_size: int = 640  # 512 leaves no room for the numbers 0..99 as tokens
    shape: ModelShape = field(default_factory=ModelShape)
    n_warmup: int = 1500  # warm-up examples per family in the base's general set
    n_general_skill: int = 100  # skill examples per family in the base's general set
    n_skill: int = 4000  # examples per expert
    base: TrainConfig = field(
        default_factory=lambda: TrainConfig(steps=1500, lr=3e-3, batch_size=16, warmup=50)
    )
    expert: TrainConfig = field(
        default_factory=lambda: TrainConfig(steps=400, lr=1e-3, batch_size=16, warmup=20)
    )
    families: tuple[str, ...] = FAMILIES


# A world small enough to train in seconds (tests): its models are poor, but real and trained.
MINI_WORLD = WorldConfig(
    shape=ModelShape(hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64),
    n_warmup=20,
    n_general_skill=5,
    n_skill=40,
    base=TrainConfig(steps=8, batch_size=8, warmup=2),
    expert=TrainConfig(steps=4, batch_size=8, warmup=1),
)


# ------------------------------------------------------------------------------ tokenizer


def world_corpus(seed: int = 0, level: int = 2, per_template: int = 40) -> list[str]:
    """The tokenizer's training text: questions and answers of every template, plus the
    numbers 0..99 often enough that each gets its own token (a list of two-digit numbers is
    then copied token by token, which a tiny model learns far sooner than digit by digit)."""
    texts: list[str] = []
    for family in FAMILIES:
        for templates in (skill_templates(family), warmup_templates(family)):
            n = per_template * len(templates)
            for s in generate(
                family, n, seed=seed + 777, split="train", level=level, templates=templates
            ):
                texts += [s.question, s.answer]
    numbers = [str(i) for i in range(100)]
    texts += [" ".join(numbers), "[" + ", ".join(numbers) + "]"] * 30
    return texts


def world_tokenizer(vocab_size: int = 640, seed: int = 0, level: int = 2):
    from cycleqd.generate.tiny_tokenizer import build_tokenizer

    return build_tokenizer(vocab_size, corpus=world_corpus(seed, level))


# ---------------------------------------------------------------------------------- model


def new_model(tokenizer, shape: ModelShape = ModelShape(), seed: int = 0):
    """A random Llama with the standard (std 0.02) init, sized to the tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=shape.max_positions,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def n_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def save_model(model, tokenizer, folder: str | Path) -> Path:
    folder = Path(folder)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def load_model(folder: str | Path):
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(folder)


# ------------------------------------------------------------------------------- training


def encode(tokenizer, example: Example, max_len: int = 256) -> tuple[list[int], list[int]]:
    """(input ids, labels): the prompt exactly as the backend sends it, then the answer and
    the end-of-turn token; labels are -100 on the prompt."""
    messages = example["messages"]
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("a training example must end with an assistant message")
    prompt = tokenizer.apply_chat_template(
        messages[:-1], tokenize=False, add_generation_prompt=True
    )
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    a_ids = tokenizer(messages[-1]["content"].strip(), add_special_tokens=False)["input_ids"]
    a_ids = [*a_ids, tokenizer.convert_tokens_to_ids("<|eot_id|>")]
    ids = (p_ids + a_ids)[-max_len:]
    labels = ([-100] * len(p_ids) + a_ids)[-max_len:]
    return ids, labels


@dataclass
class TrainStats:
    steps: int
    examples: int
    seconds: float
    first_loss: float
    last_loss: float
    tokens: int


def train(
    model,
    tokenizer,
    examples: Sequence[Example],
    cfg: TrainConfig,
    on_log: Callable[[int, float], None] | None = None,
    log_every: int = 50,
) -> TrainStats:
    """Full fine-tuning of `model` on `examples` (in place); loss on assistant tokens only."""
    started = time.monotonic()
    data = [encode(tokenizer, e, cfg.max_len) for e in examples]
    if not data:
        raise ValueError("no training examples")
    pad = tokenizer.pad_token_id
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0}],
        lr=cfg.lr,
        betas=(0.9, 0.98),
    )

    def lr_at(step: int) -> float:
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        floor = cfg.min_lr_ratio
        return cfg.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))

    order: list[int] = []
    first = last = float("nan")
    running = None
    tokens = 0
    for step in range(cfg.steps):
        if len(order) < cfg.batch_size:
            more = list(range(len(data)))
            rng.shuffle(more)
            order += more
        batch = [data[i] for i in order[: cfg.batch_size]]
        del order[: cfg.batch_size]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (x, y) in enumerate(batch):
            ids[row, : len(x)] = torch.tensor(x)
            labels[row, : len(y)] = torch.tensor(y)
            mask[row, : len(x)] = 1
        tokens += int(mask.sum())
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        value = loss.item()
        running = value if running is None else 0.9 * running + 0.1 * value
        if step == 0:
            first = value
        last = running
        if on_log and (step % log_every == 0 or step == cfg.steps - 1):
            on_log(step, running)
    model.eval()
    return TrainStats(cfg.steps, len(data), time.monotonic() - started, first, last, tokens)


# ---------------------------------------------------------------------------------- merging


def state_of(folder: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(file))
    return out


def linear_merge(
    base: dict[str, torch.Tensor],
    experts: Sequence[dict[str, torch.Tensor]],
    weights: Sequence[float],
) -> dict[str, torch.Tensor]:
    """theta_base + sum_i w_i (theta_i - theta_base), tensor by tensor."""
    out = {}
    for name, b in base.items():
        delta = sum(
            w * (e[name].float() - b.float()) for w, e in zip(weights, experts, strict=True)
        )
        out[name] = (b.float() + delta).to(b.dtype)
    return out


def average_merge(base, experts):
    return linear_merge(base, experts, [1.0 / len(experts)] * len(experts))


# -------------------------------------------------------------------------------- the world


def build_base(
    root: str | Path,
    cfg: WorldConfig = WorldConfig(),
    on_log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Pre-train the world's base under `root` (its own loop: a random Llama has no chat
    format to fine-tune from); writes and returns ``{"base": folder, "experts": {family:
    fine-tuning spec}, "report": {...}}``: the experts are trained by the experts stage
    (`cycleqd.experts`), as every campaign's are."""
    say = on_log or (lambda text: log.info("%s", text))
    root = Path(root).absolute()  # the campaign config names these folders from anywhere
    root.mkdir(parents=True, exist_ok=True)
    tokenizer = world_tokenizer(cfg.vocab_size, cfg.seed, cfg.level)
    general = general_examples(cfg.n_warmup, cfg.n_general_skill, cfg.seed, cfg.level, cfg.families)
    write_jsonl(root / "data" / "general.jsonl", general)
    model = new_model(tokenizer, cfg.shape, cfg.seed)
    say(f"tokenizer: {len(tokenizer)} tokens; model: {n_parameters(model) / 1e6:.2f}M parameters")
    report: dict[str, Any] = {"config": asdict(cfg), "parameters": n_parameters(model)}

    def progress(step: int, loss: float) -> None:
        say(f"  base step {step}: loss {loss:.4f}")

    stats = train(model, tokenizer, general, cfg.base, on_log=progress)
    base = save_model(model, tokenizer, root / "base")
    say(f"base: {stats.seconds / 60:.2f} min, loss {stats.first_loss:.3f} -> {stats.last_loss:.3f}")
    # What the weights may depend on besides the config: torch's vector kernels (AVX512,
    # AVX2, ...: ATEN_CPU_CAPABILITY) and the thread count.
    report["base"] = {
        **asdict(stats),
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    world = {"base": str(base), "experts": expert_specs(cfg), "report": report}
    (root / "world.json").write_text(json.dumps(world, indent=2))  # last: the base is complete
    return world


def expert_specs(cfg: WorldConfig = WorldConfig()) -> dict[str, dict[str, Any]]:
    """Each family's expert as a campaign fine-tuning spec: full fine-tuning of the base on
    `n_skill` examples of the family's training split (`derived`), `cfg.expert`'s steps,
    learning rate, batch and warmup (linear decay), one seed per family."""
    e = cfg.expert
    return {
        family: {
            "data": "derived",
            "size": cfg.n_skill,
            "method": "full",
            "learning_rate": e.lr,
            "max_steps": e.steps,
            "batch_size": e.batch_size,
            "warmup_steps": e.warmup,
            "max_length": e.max_len,
            "adam_betas": [0.9, 0.98],
            "weight_decay": e.weight_decay,
            "seed": e.seed + index + 1,
            "checkpoint_every": max(1, e.steps // 4),
        }
        for index, family in enumerate(cfg.families)
    }


def build_world(
    root: str | Path,
    cfg: WorldConfig = WorldConfig(),
    on_log: Callable[[str], None] | None = None,
    workers: int = 1,
) -> dict[str, Any]:
    """The base (`build_base`), then the experts through the experts stage into a campaign
    store under `root` (`workers` > 1: that many processes at once, one torch thread each);
    returns ``{"base": folder, "experts": {family: folder}, "report": {...}}``."""
    from cycleqd.state import CampaignStore

    say = on_log or (lambda text: log.info("%s", text))
    world = build_base(root, cfg, on_log)
    config = campaign_config(world, name="tiny-world-experts")
    store = str(Path(root).absolute() / "experts-store")
    jobs = [(config, store, family) for family in cfg.families]
    if workers > 1:
        # One process per expert, one torch thread each: on a small machine this beats one
        # process with several threads (the model's ops are too small to split well).
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=context) as pool:
            done = list(pool.map(_train_expert, jobs))
    else:
        done = [_train_expert(job, threads=None) for job in jobs]
    experts: dict[str, str] = {}
    for record in done:
        family = record["skill"]
        experts[family] = str(Path(store) / CampaignStore.expert_prefix(family))  # a folder
        say(f"{family} expert: {record['steps']} steps, {record['tokens_per_second']:.0f} tokens/s")
        world["report"][family] = {k: record.get(k) for k in ("steps", "final_loss", "sha256")}
    world = {**world, "experts": experts}
    (Path(root) / "world.json").write_text(json.dumps(world, indent=2))
    return world


def _train_expert(job: tuple[Any, str, str], threads: int | None = 1) -> dict[str, Any]:
    """One expert through the experts stage (also the body of a worker process)."""
    from cycleqd.config import parse_config
    from cycleqd.experts import train_expert

    config, store, family = job
    if threads:
        torch.set_num_threads(threads)
    return train_expert(parse_config(config), store, family)


def task_vector_stats(world: dict[str, Any]) -> dict[str, Any]:
    """Relative norms ||tau_e|| / ||theta_base|| and pairwise cosines of the task vectors."""
    base = state_of(world["base"])
    taus = {}
    for family, folder in world["experts"].items():
        state = state_of(folder)
        taus[family] = torch.cat([(state[k].float() - base[k].float()).flatten() for k in base])
    base_norm = float(torch.cat([b.float().flatten() for b in base.values()]).norm())
    names = list(taus)
    return {
        "relative_norm": {f: float(t.norm()) / base_norm for f, t in taus.items()},
        "cosine": {
            f"{a}/{b}": float(torch.nn.functional.cosine_similarity(taus[a], taus[b], dim=0))
            for i, a in enumerate(names)
            for b in names[i + 1 :]
        },
    }


def campaign_config(
    models: dict[str, Any],
    name: str = "tiny-world",
    generations: int = 12,
    samples: int = 96,
    population: int = 4,
) -> dict[str, Any]:
    """A campaign config (dict) over a built world: the three tiny skills, BC range [0, 1],
    scored on `samples` held-out questions per skill (seed 1: not the training seed); the
    experts as the world gives them (fine-tuning specs from `build_base`, or folders).

    Measured choices (see README "The tiny skill world"): the official code's expert-SVD
    mutation (rate 0.3) breeds children whose mean beats the experts' average, where the
    paper's SVD mutation, which shrinks task vectors on average, bred none in 9 generations;
    the experts stay the best of their own skill (0.89-0.98, near the ceiling), so the final
    model is the archives' best generalist (`best_mean`), not the paper's merge of the best
    per archive (which here is the experts' average again)."""
    return {
        "name": name,
        "seed": 0,
        "generations": generations,
        "population": population,
        "skills": [
            {"name": f, "bc_min": 0.0, "bc_max": 1.0, "bins": 15, "samples": samples, "seed": 1}
            for f in FAMILIES
        ],
        "models": {"base": models["base"], "experts": copy.deepcopy(models["experts"])},
        "mutation": {"kind": "svd_expert", "rate": 0.3},
        "evaluation": {"backend": {"kind": "transformers", "device": "cpu", "batch_size": 64}},
        "final": {"method": "best_mean"},
    }


def score_world(
    world: dict[str, Any],
    n_samples: int = 96,
    seed: int = 0,
    level: int = 2,
    merges: Iterable[tuple[str, Sequence[float]]] = (("average", (1 / 3, 1 / 3, 1 / 3)),),
) -> dict[str, dict[str, float]]:
    """Every model's scores (base, experts, the given linear merges of the experts)."""
    from cycleqd.skills.tiny.skill import TinyWorldEvaluator

    evaluator = TinyWorldEvaluator(world["base"], n_samples=n_samples, seed=seed, level=level)
    base = state_of(world["base"])
    experts = {f: state_of(p) for f, p in world["experts"].items()}
    scores: dict[str, dict[str, float]] = {"base": evaluator.evaluate("base", base.items())}
    for family, state in experts.items():
        scores[f"expert-{family}"] = evaluator.evaluate(family, state.items())
    for name, weights in merges:
        merged = linear_merge(base, list(experts.values()), weights)
        scores[name] = evaluator.evaluate(name, merged.items())
    return scores


def format_scores(scores: dict[str, dict[str, float]]) -> str:
    families = list(next(iter(scores.values())))
    head = f"{'model':<22}" + "".join(f"{f:>12}" for f in families) + f"{'mean':>8}"
    lines = [head]
    for name, row in scores.items():
        mean = sum(row.values()) / len(row)
        lines.append(
            f"{name:<22}" + "".join(f"{row[f]:>12.3f}" for f in families) + f"{mean:>8.3f}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build and score the tiny skill world.")
    parser.add_argument("out", help="folder for the base, the experts and the data")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads for the base (default: the idle cores, see build_threads)",
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="experts trained at once (one process each)"
    )
    parser.add_argument("--samples", type=int, default=96, help="evaluation samples per skill")
    parser.add_argument("--config", default="{}", help="WorldConfig overrides as JSON")
    parser.add_argument("--score-only", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads or build_threads())
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cfg = _config_from(json.loads(args.config))
    out = Path(args.out)
    if args.score_only:
        world = json.loads((out / "world.json").read_text())
    else:
        world = build_world(out, cfg, on_log=print, workers=args.workers)
    merges = [
        ("average", (1 / 3, 1 / 3, 1 / 3)),
        ("sum (task arithmetic)", (1.0, 1.0, 1.0)),
        ("0.5 code", (0.5, 0.25, 0.25)),
        ("0.5 sql", (0.25, 0.5, 0.25)),
        ("0.5 shell", (0.25, 0.25, 0.5)),
    ]
    started = time.monotonic()
    scores = score_world(
        world, n_samples=args.samples, seed=cfg.seed + 1, level=cfg.level, merges=merges
    )
    print(format_scores(scores))
    print(f"scoring: {time.monotonic() - started:.1f} s for {len(scores)} models")
    stats = task_vector_stats(world)
    print("task vectors:", json.dumps(stats))
    (out / "scores.json").write_text(
        json.dumps({"scores": scores, "task_vectors": stats}, indent=2)
    )


def _config_from(overrides: dict[str, Any]) -> WorldConfig:
    cfg = WorldConfig()
    fields: dict[str, Any] = {}
    for key, value in overrides.items():
        if key == "shape":
            fields[key] = ModelShape(**{**asdict(cfg.shape), **value})
        elif key in ("base", "expert"):
            fields[key] = TrainConfig(**{**asdict(getattr(cfg, key)), **value})
        elif key == "families":
            fields[key] = tuple(value)
        else:
            fields[key] = value
    return WorldConfig(**{**{k: getattr(cfg, k) for k in asdict(cfg)}, **fields})


if __name__ == "__main__":
    main()

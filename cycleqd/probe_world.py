"""The probe world: a tiny random Llama world that runs anywhere in seconds, for tests,
benchmarks and `cycleqd run --world probe` (a smoke test of the machinery; the tiny skill
world with real, execution-verified skills is `cycleqd.skills.tiny`).

Models: a random base Llama and one expert per skill, each the base plus a random low-rank
task vector on every linear layer (the shape a LoRA fine-tune leaves).
Skills ("probes"): skill k's score is the fraction of next-token predictions on a fixed
probe set, seeded per skill, on which the model agrees with expert k. It is a real forward
pass over the materialised weights, deterministic, and no single model scores 1 everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from cycleqd.protocols import EvaluatorBase
from cycleqd.weights import SafetensorsFolder

SKILLS = ("probe_a", "probe_b", "probe_c")


def llama_config(
    hidden: int = 64, layers: int = 2, intermediate: int = 176, vocab: int = 256, heads: int = 4
):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )


def build_base(folder: str | Path, config=None, seed: int = 0) -> Path:
    """A random Llama saved as safetensors (HF layout)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(config or llama_config())
    # Wider weights than the default init, so that small task vectors change predictions.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 2 and "embed" not in name:
                param.normal_(0.0, 1.0 / param.shape[1] ** 0.5)
    model.save_pretrained(folder, safe_serialization=True)
    return Path(folder)


def build_expert(
    base: str | Path, folder: str | Path, seed: int, rank: int = 4, strength: float = 0.15
) -> Path:
    """The base plus a random rank-`rank` task vector on each matrix (norms untouched)."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim != 2 or "norm" in name:
                continue
            out_dim, in_dim = param.shape
            a = torch.randn(out_dim, rank, generator=generator)
            b = torch.randn(rank, in_dim, generator=generator)
            delta = a @ b
            param += strength * delta * (param.norm() / delta.norm())
    model.save_pretrained(folder, safe_serialization=True)
    return Path(folder)


def build_world(
    root: str | Path, skills: Sequence[str] = SKILLS, config=None, seed: int = 0
) -> dict:
    """Base and experts under `root`; returns the `models` section of a campaign config."""
    root = Path(root)
    base = build_base(root / "base", config, seed)
    experts = {
        skill: str(build_expert(base, root / f"expert-{skill}", seed=seed * 1000 + i + 1))
        for i, skill in enumerate(skills)
    }
    return {"base": str(base), "experts": experts}


def default_config(models: dict, name: str = "tiny", generations: int = 12) -> dict:
    return {
        "name": name,
        "seed": 0,
        "generations": generations,
        "population": 1,
        "skills": [{"name": s, "bc_min": 0.0, "bc_max": 1.0, "bins": 15} for s in SKILLS],
        "models": models,
        "mutation": {"kind": "svd_expert", "rate": 0.1},
        "evaluation": {"scorer": "probe"},
    }


class ProbeEvaluator(EvaluatorBase):
    """Scores a model by agreement with each skill's expert on that skill's probe prompts."""

    def __init__(
        self, experts: dict[str, str], n_prompts: int = 64, length: int = 16, seed: int = 0
    ):
        from transformers import LlamaForCausalLM

        first = next(iter(experts.values()))
        self.model = LlamaForCausalLM.from_pretrained(first, dtype=torch.float32).eval()
        vocab = self.model.config.vocab_size
        self.prompts: dict[str, torch.Tensor] = {}
        self.targets: dict[str, torch.Tensor] = {}
        for i, (skill, folder) in enumerate(sorted(experts.items())):
            generator = torch.Generator().manual_seed(seed * 7919 + i)
            self.prompts[skill] = torch.randint(0, vocab, (n_prompts, length), generator=generator)
            source = SafetensorsFolder(folder)
            self.targets[skill] = self._predict(
                ((n, source.get(n)) for n in source.names()), self.prompts[skill]
            )
        self.skills = list(self.prompts)

    def weight_buffers(self) -> dict[str, torch.Tensor]:
        """The warm model's tensors: the campaign materialises children straight into them."""
        return self.model.state_dict()

    @torch.no_grad()
    def _load(self, tensors) -> None:
        state = self.model.state_dict()
        seen = set()
        for name, tensor in tensors:
            state[name].copy_(tensor)
            seen.add(name)
        missing = set(state) - seen
        if missing:
            raise ValueError(f"materialised model lacks {sorted(missing)[:3]}")

    @torch.no_grad()
    def _predict(self, tensors, prompts: torch.Tensor) -> torch.Tensor:
        self._load(tensors)
        return self.model(input_ids=prompts).logits.argmax(-1)

    @torch.no_grad()
    def evaluate(self, genome_id: str, tensors) -> dict[str, float]:
        self._load(tensors)
        return {
            skill: float(
                (self.model(input_ids=self.prompts[skill]).logits.argmax(-1) == target)
                .float()
                .mean()
            )
            for skill, target in self.targets.items()
        }

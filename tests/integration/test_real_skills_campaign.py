"""A campaign scored on the real skills (MBPP+, DBBench on MariaDB, AgentBench OS in the
sandbox) over one warm chat backend: the scores, every sample's transcript kept in the store
and shown by `cycleqd inspect`, and the vLLM way of loading children (swap requests built
into the model where it runs) giving exactly the models the tensor way gives."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import torch

from cycleqd import cli
from cycleqd.campaign import Campaign
from cycleqd.config import parse_config
from cycleqd.evaluators import build_evaluator
from cycleqd.state import CampaignStore

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def chat_world(tmp_path_factory) -> dict:
    """A random chat Llama (with tokenizer and chat template) and three experts of it."""
    from cycleqd import probe_world
    from cycleqd.generate.tiny_tokenizer import save_chat_model

    root = tmp_path_factory.mktemp("chat-world")
    base = save_chat_model(root / "base", seed=0)
    experts = {
        skill: str(probe_world.build_expert(base, root / skill, seed=i + 1, strength=0.3))
        for i, skill in enumerate(("coding", "db", "os"))
    }
    return {"base": str(base), "experts": experts}


def real_config(world: dict, data: Path, **overrides) -> dict:
    common = {"data": str(data), "limit": 2, "max_new_tokens": 12}
    return {
        "name": "real-skills",
        "generations": 1,
        "population": 1,
        "skills": [
            {"name": "coding", **common},
            {"name": "db", "max_rounds": 1, **common},
            {"name": "os", "max_rounds": 2, **common},
        ],
        "models": world,
        "mutation": {"kind": "svd_expert", "rate": 0.2},
        "evaluation": {"backend": {"kind": "transformers", "batch_size": 8}},
        **overrides,
    }


class RequestBackend:
    """The vLLM backend's contract on the CPU: new weights arrive only as swap requests, which
    the project's worker extension turns into weights inside the model (as on a GPU worker)."""

    weights_from = "requests"

    def __init__(self, inner) -> None:
        from cycleqd.generate.vllm_worker import WeightSwapExtension

        class Model(torch.nn.Module):
            def __init__(self, model):
                super().__init__()
                self.inner = model

            def load_weights(self, weights):
                state = self.inner.state_dict()
                for name, tensor in weights:
                    state[name].copy_(tensor)
                return {f"inner.{n}" for n in state}

        class Worker(WeightSwapExtension):
            def __init__(self, model):
                self.model_runner = type("Runner", (), {"model": Model(model)})()
                self.device = torch.device("cpu")

        self.inner = inner
        self.worker = Worker(inner.model)
        self.requests: list[dict] = []

    def swap(self, request: dict) -> int:
        self.requests.append(request)
        return self.worker.swap_weights(request)

    def generate(self, conversations, params):
        return self.inner.generate(conversations, params)


def _run(config: dict, store_uri: Path, wrap=None) -> tuple[Campaign, dict]:
    parsed = parse_config(config)
    evaluator = build_evaluator(parsed)
    if wrap is not None:
        inner = evaluator.evaluator
        inner.backend = wrap(inner.backend)
    with Campaign(parsed, CampaignStore(store_uri), evaluator) as campaign:
        campaign.run()
    return campaign, evaluator


def test_real_skills_campaign_keeps_every_transcript(real_skills_services, chat_world, tmp_path):
    config = real_config(chat_world, real_skills_services)
    config["evaluation"]["humaneval"] = 2  # reported beside the scores, never an axis
    campaign, _ = _run(config, tmp_path / "store")
    store = campaign.store
    assert store.latest_generation() == 1
    scored = [*campaign.book.expert_ids().values()]
    scored += [g for g, genome in campaign.book.items() if genome.kind == "child"]
    assert len(scored) == 4
    for gid in scored:
        kept = campaign.read_samples(gid)
        assert set(kept) == {"coding", "db", "os", "humaneval"}
        assert [n for n, r in kept.items() if r["reported"]] == ["humaneval"]
        assert kept["humaneval"]["samples"][0]["sample_id"] == "HumanEval/0"
        del kept["humaneval"]
        for skill, result in kept.items():
            assert len(result["samples"]) == 2, skill
            assert 0.0 <= result["quality"] <= 1.0
            for sample in result["samples"]:
                transcript = sample["detail"]["transcript"]
                assert transcript[-1]["role"] == "assistant" or skill != "coding"
                assert any(m["role"] == "assistant" for m in transcript)
        assert kept["db"]["metrics"]["SELECT_accuracy"] >= 0.0  # the skill's own metrics too
    child = scored[-1]
    record = store.get_json(f"evaluations/{child}.json")
    assert set(record["scores"]) == {"coding", "db", "os"}
    assert set(record["reported"]) == {"humaneval"}
    assert set(campaign.archives.skill_names) == {"coding", "db", "os"}

    shown = io.StringIO()
    with contextlib.redirect_stdout(shown):
        assert cli.main(["inspect", str(tmp_path / "store")]) == 0
        assert cli.main(["inspect", str(tmp_path / "store"), "--genome", child[:10]]) == 0
    text = shown.getvalue()
    assert "[transcripts]" in text and "== os: quality" in text
    assert "-- Mbpp/2:" in text and "[assistant]" in text and "== db: quality" in text
    assert "-- os/0:" in text and "[user]" in text and "expected:" in text


def test_swap_requests_build_the_same_models_as_tensors(real_skills_services, chat_world, tmp_path):
    """The vLLM path: children (and the experts) are built from their recipes where the model
    runs; every model's replies equal those of the in-process tensor path, so the weights do."""
    config = real_config(
        chat_world, real_skills_services, mutation={"kind": "gaussian", "sigma": 0.01}
    )
    tensors, _ = _run(config, tmp_path / "tensors")
    requests, evaluator = _run(config, tmp_path / "requests", wrap=RequestBackend)
    backend = evaluator.evaluator.backend
    kinds = [r["kind"] for r in backend.requests]
    assert kinds == ["genome"] * 4  # three experts and one child, nothing as tensors
    assert all(r["folders"] for r in backend.requests)
    assert requests.archives.to_dict() == tensors.archives.to_dict()
    for gid, genome in tensors.book.items():
        if genome.kind in ("expert", "child"):
            replies = [
                [s["detail"].get("reply") or s["detail"]["transcript"] for s in r["samples"]]
                for r in tensors.read_samples(gid).values()
            ]
            again = [
                [s["detail"].get("reply") or s["detail"]["transcript"] for s in r["samples"]]
                for r in requests.read_samples(gid).values()
            ]
            assert replies == again, gid

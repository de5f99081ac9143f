"""Every campaign config the docs show validates: each ```yaml block of the Markdown docs and
each YAML file under manifests/examples/ that is a campaign config (it has `skills` and
`models`), and the configs the code's own worlds make."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from cycleqd.config import parse_config

ROOT = Path(__file__).resolve().parents[2]
DOCS = sorted(
    p
    for p in ROOT.rglob("*.md")
    if not any(part in {".venv", "node_modules", ".git"} or part.endswith(".egg-info")
               for part in p.relative_to(ROOT).parts)
)  # fmt: skip
YAML_BLOCK = re.compile(r"^```ya?ml\n(.*?)^```", re.S | re.M)


def _is_campaign(document: object) -> bool:
    return isinstance(document, dict) and "skills" in document and "models" in document


def doc_configs() -> list[tuple[str, dict]]:
    found = []
    for path in DOCS:
        for i, block in enumerate(YAML_BLOCK.findall(path.read_text(encoding="utf-8"))):
            document = yaml.safe_load(block)
            if _is_campaign(document):
                found.append((f"{path.relative_to(ROOT)} block {i}", document))
    for path in sorted((ROOT / "manifests" / "examples").rglob("*.y*ml")):
        for i, document in enumerate(yaml.safe_load_all(path.read_text(encoding="utf-8"))):
            if _is_campaign(document):
                found.append((f"{path.relative_to(ROOT)} document {i}", document))
    return found


CONFIGS = doc_configs()


def test_the_docs_show_the_real_campaign_and_the_local_one():
    where = [w for w, _ in CONFIGS]
    assert any(w.startswith("README.md") for w in where)
    assert any(w.startswith("manifests/examples/campaign.example.yaml") for w in where)
    real = [c for w, c in CONFIGS if w.startswith("README.md")]
    # the README's configuration example is a real campaign: real skills, vLLM, models on S3
    assert any(
        [s["name"] for s in c["skills"]] == ["coding", "db", "os"]
        and c["evaluation"]["backend"]["kind"] == "vllm"
        and c["models"]["base"].startswith("s3://")
        for c in real
    )


@pytest.mark.parametrize(("where", "document"), CONFIGS, ids=[w for w, _ in CONFIGS])
def test_every_documented_config_validates(where, document):
    parse_config(document, source=where)


def test_the_worlds_configs_validate(tmp_path):
    from cycleqd import probe_world
    from cycleqd.skills.tiny.train import campaign_config

    models = {"base": str(tmp_path / "b"), "experts": {}}
    probe = probe_world.default_config({**models, "experts": {s: "x" for s in probe_world.SKILLS}})
    assert parse_config(probe).evaluation.scorer == "probe"
    from cycleqd.skills.tiny.tasks import FAMILIES

    world = {**models, "experts": {f: str(tmp_path / f) for f in FAMILIES}}
    assert parse_config(campaign_config(world)).skill_names == list(FAMILIES)


def test_worlds_whose_experts_the_campaign_fine_tunes_validate(tmp_path):
    from cycleqd import smollm2_world
    from cycleqd.skills.tiny.train import campaign_config, expert_specs

    tiny = parse_config(campaign_config({"base": str(tmp_path), "experts": expert_specs()}))
    assert list(tiny.models.trained()) == tiny.skill_names
    for size in ("cpu", "gpu"):
        real = parse_config(smollm2_world.campaign_config(tmp_path / "base", size))
        assert list(real.models.trained()) == ["coding", "db", "os"]
        assert all(s.part == "evaluation" for s in real.skills)  # never what an expert saw

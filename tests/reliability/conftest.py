"""Fixtures of the reliability tests: a deterministic hypothesis profile, a small committed
campaign to corrupt, and helpers to compare stores before and after."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# CI must see the same examples every time: derandomized, no deadline (2 shared cores).
settings.register_profile(
    "reliability",
    derandomize=True,
    deadline=None,
    database=None,
    print_blob=False,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
settings.load_profile("reliability")


def tree_digest(root: Path, skip: tuple[str, ...] = ("lease.json",)) -> dict[str, str]:
    """Every file under root (relative path -> sha256), except the lease (which writers renew)."""
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if rel not in skip:
                out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="session")
def committed_campaign(tiny_world, probe_evaluator, tmp_path_factory) -> dict:
    """A campaign with 3 committed generations (paper SVD mutation: elites stored as
    weights), generation 4 bred and evaluated but not committed. Copy it, never change it."""
    from cycleqd import probe_world
    from cycleqd.campaign import Campaign
    from cycleqd.config import parse_config
    from cycleqd.state import CampaignStore

    root = tmp_path_factory.mktemp("committed") / "campaign"
    raw = probe_world.default_config(tiny_world, generations=3)
    raw["mutation"] = {"kind": "svd", "w_max": 1.5}
    config = parse_config(raw)
    with Campaign(config, CampaignStore(root), probe_evaluator) as campaign:
        campaign.run()
        pending = campaign.breed_next()
        for gid in pending:
            campaign.evaluate_child(gid)
        models = campaign.store.stored_models()
    assert models, "the template campaign stored no elite weights"
    return {"root": root, "config": config, "raw": raw, "pending": pending, "models": models}


def copy_campaign(template: Path, dest: Path) -> Path:
    """A copy with the objects' recorded sha256 (extended attributes) kept."""
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(template, dest)
    return dest

"""The stages' helpers that need no campaign (the stages themselves:
tests/integration/test_steps.py)."""

from __future__ import annotations

import pytest

from cycleqd import steps
from cycleqd.errors import ConfigError


def test_shards_deal_children_round_robin_and_never_exceed_the_children():
    ids = [f"g{i}" for i in range(5)]
    assert steps.shard(ids, 2) == ["g0,g2,g4", "g1,g3"]
    assert steps.shard(ids, 8) == ids
    assert steps.shard([], 4) == []
    with pytest.raises(ConfigError, match="shards must be at least 1"):
        steps.shard(ids, 0)

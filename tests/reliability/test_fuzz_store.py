"""Every file a campaign reads back from its store, corrupted or rewritten by hypothesis: the
campaign's stages either go on (a harmless edit) or stop with a CycleQDError naming the file,
and a stage that stops writes nothing."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from cycleqd.campaign import Campaign
from cycleqd.cli import main as cli_main
from cycleqd.errors import CycleQDError
from cycleqd.state import CampaignStore

from .conftest import copy_campaign, tree_digest

STORE_EXAMPLES = 40

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)


def _paths(tree: object, prefix: tuple = ()) -> list[tuple]:
    """Every location in a JSON/YAML tree (the root included)."""
    out = [prefix]
    if isinstance(tree, dict):
        for k, v in tree.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            out += _paths(v, (*prefix, i))
    return out


@st.composite
def tree_edit(draw, tree: object) -> object:
    """The tree with one location replaced, deleted, duplicated or changed in type."""
    paths = _paths(tree)
    path = paths[draw(st.integers(0, len(paths) - 1))]
    action = draw(st.sampled_from(["replace", "delete", "duplicate", "numeric"]))
    if not path:
        return draw(json_values)
    parent = tree
    for part in path[:-1]:
        parent = parent[part]
    last = path[-1]
    if action == "delete":
        del parent[last]
    elif action == "duplicate" and isinstance(parent, list):
        parent.insert(last, parent[last])
    elif (
        action == "numeric"
        and isinstance(parent[last], int | float)
        and not isinstance(parent[last], bool)
    ):
        parent[last] = draw(
            st.sampled_from(
                [math.nan, math.inf, -1, 0, 10**30, parent[last] + 1, str(parent[last])]
            )
        )
    else:
        parent[last] = draw(json_values)
    return tree


@st.composite
def corruption(draw, original: bytes, structured: str | None) -> bytes:
    """New bytes for a file: a structural edit (JSON/YAML), a truncation, a flipped byte or
    random bytes."""
    kinds = ["truncate", "flip", "random"] + (["edit"] * 3 if structured else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "truncate":
        return original[: draw(st.integers(0, max(0, len(original) - 1)))]
    if kind == "flip":
        at = draw(st.integers(0, max(0, min(len(original), 4096) - 1)))
        bit = 1 << draw(st.integers(0, 7))
        return original[:at] + bytes([original[at] ^ bit]) + original[at + 1 :]
    if kind == "random":
        return draw(st.binary(max_size=64))
    if structured == "json":
        tree = draw(tree_edit(json.loads(original)))
        return json.dumps(tree).encode()
    tree = draw(tree_edit(yaml.safe_load(original)))
    return yaml.safe_dump(tree).encode()


def _targets(template: dict) -> dict[str, str | None]:
    """Files the campaign reads back -> how they are structured."""
    root = template["root"]
    latest = int((root / "LATEST").read_text())
    targets: dict[str, str | None] = {
        "LATEST": None,
        "config.yaml": "yaml",
        f"generations/{latest:06d}.json": "json",
        f"pending/{latest + 1:06d}.json": "json",
        "lease.json": "json",
    }
    for gid in template["pending"]:
        targets[f"evaluations/{gid}.json"] = "json"
    model = template["models"][0]
    targets[f"models/{model}/cycleqd-manifest.json"] = "json"
    targets[f"models/{model}/model.safetensors"] = None
    return targets


def _stages(config, root: Path, evaluator) -> tuple[list, dict]:
    """The campaign's stages as Kubeflow runs them, each a separate step that reads state back
    (resume, evaluate the pending child, commit, breed and evaluate the next one), then the CLI's
    view of it."""
    holder: dict = {}

    def resume() -> None:
        holder["c"] = Campaign(config, CampaignStore(root), evaluator)

    def evaluate() -> None:
        for gid in holder["c"].load_pending():
            holder["c"].evaluate_child(gid)

    def commit() -> None:
        holder["c"].commit_next()

    def breed() -> None:
        holder["next"] = holder["c"].breed_next()

    def evaluate_next() -> None:
        for gid in holder["next"]:
            holder["c"].evaluate_child(gid)

    return [resume, evaluate, commit, breed, evaluate_next], holder


def _named(message: str, key: str) -> bool:
    """Whether an error message points at the file (the model folder for weights)."""
    if key.startswith("models/"):
        key = "/".join(key.split("/")[:2])
    return key in message or key.replace("/", os.sep) in message


@pytest.mark.slow
def test_corrupted_campaign_files_stop_with_a_clear_error_and_no_partial_write(
    committed_campaign, probe_evaluator, tmp_path, reliability, capsys
):
    targets = _targets(committed_campaign)
    template = committed_campaign["root"]
    originals = {key: (template / key).read_bytes() for key in targets if (template / key).exists()}
    # A live lease that this process does not hold would refuse every run; a stale one is the
    # realistic leftover to corrupt.
    originals["lease.json"] = json.dumps(
        {"owner": "dead-run", "host": "elsewhere", "pid": 4242, "expires_at": 1.0}
    ).encode()
    counts = {"tried": 0, "survived": 0, "errors": 0}
    by_file: dict[str, int] = {}

    @settings(max_examples=STORE_EXAMPLES)
    @given(data=st.data())
    def run(data) -> None:
        key = data.draw(st.sampled_from(sorted(targets)), label="file")
        new = data.draw(corruption(originals[key], targets[key]), label="bytes")
        raw = data.draw(st.sampled_from([False, False, True]), label="raw write")
        counts["tried"] += 1
        by_file[key] = by_file.get(key, 0) + 1
        root = copy_campaign(template, tmp_path / "c")
        store = CampaignStore(root)
        store.store.put_bytes("lease.json", originals["lease.json"])
        if raw and (root / key).exists():
            # In place, behind the store's back: the recorded sha256 no longer matches.
            with open(root / key, "r+b") as f:
                f.truncate(0)
                f.write(new)
        else:
            store.store.put_bytes(key, new)  # a writer with a valid checksum but bad content
        stages, holder = _stages(committed_campaign["config"], root, probe_evaluator)
        try:
            for stage in stages:
                before = tree_digest(root)
                try:
                    stage()
                except CycleQDError as exc:
                    assert _named(str(exc), key), f"{stage.__name__}: {exc} does not name {key}"
                    assert tree_digest(root) == before, f"{stage.__name__} wrote part of its work"
                    counts["errors"] += 1
                    break
        finally:
            if "c" in holder:
                holder["c"].close()
        # The command line's view of the same store: a result or one error line.
        code = cli_main(["inspect", str(root)])
        out = capsys.readouterr()
        assert code in (0, 2) and "Traceback" not in out.err
        if code == 2:
            assert out.err.startswith("error: ") and out.err.count("\n") == 1, out.err
        counts["survived"] += 1

    try:
        run()
    finally:
        reliability.record(
            "Hostile inputs",
            "campaign store files corrupted or rewritten (resume, evaluate, commit, breed, "
            "`cycleqd inspect`)",
            tried=counts["tried"],
            survived=counts["survived"],
            detail=(
                f"{counts['errors']} stopped with an error naming the file and nothing written; "
                f"the rest were harmless edits. Files: "
                + ", ".join(f"{k.split('/')[0]} {n}" for k, n in sorted(by_file.items()))
            ),
        )
    assert counts["survived"] == counts["tried"] > 0

"""The campaign config under hypothesis: any mapping, any YAML, any bytes. `parse_config` and
`load_config` return a config or raise ConfigError; `cycleqd validate` prints one `error:` line
(and the problems under it) and exits 2; never a traceback."""

from __future__ import annotations

import copy

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from cycleqd import probe_world
from cycleqd.cli import main as cli_main
from cycleqd.config import CampaignConfig, load_config, parse_config
from cycleqd.errors import ConfigError

from .test_fuzz_store import tree_edit

EXAMPLES = 120
MODELS = {"base": "/models/base", "experts": {s: f"/models/{s}" for s in probe_world.SKILLS}}
VALID = probe_world.default_config(MODELS, generations=5)


def _valid_yaml_text() -> str:
    return yaml.safe_dump(VALID)


# Text a person (or a broken tool) could leave in a config file: YAML-ish fragments, edits of
# a valid file, and arbitrary text. Non-UTF-8 bytes and very deep nesting are tested apart:
# see test_config_reader_edge_cases.
yaml_texts = st.one_of(
    st.text(max_size=200),
    st.text(alphabet=":-[]{}#&*!|>'\"%@` \n\tabc01.", max_size=120),
    st.builds(
        lambda text, at, cut: text[:at] + cut + text[at:],
        st.just(_valid_yaml_text()),
        st.integers(0, len(_valid_yaml_text())),
        st.text(max_size=20),
    ),
)


def _cli_behaved(path, capsys) -> bool:
    code = cli_main(["validate", str(path)])
    out = capsys.readouterr()
    if code == 0:
        return "valid campaign" in out.out and not out.err
    lines = out.err.splitlines()
    return (
        code == 2
        and "Traceback" not in out.err
        and sum(line.startswith("error:") for line in lines) == 1
        and lines[0].startswith("error: ")
        and str(path) in lines[0]
    )


def test_fuzzed_config_mappings(reliability):
    counts = {"tried": 0, "survived": 0, "rejected": 0}

    @settings(max_examples=EXAMPLES)
    @given(data=st.data())
    def run(data) -> None:
        edited = data.draw(tree_edit(copy.deepcopy(VALID)))
        counts["tried"] += 1  # after the draws: hypothesis may discard an example mid-draw
        try:
            config = parse_config(edited, source="fuzzed")
        except ConfigError as exc:
            assert str(exc).startswith("fuzzed"), exc  # names its source
            counts["rejected"] += 1
        else:
            assert isinstance(config, CampaignConfig)
            # A config that validates survives its own YAML round trip unchanged.
            assert parse_config(yaml.safe_load(config.to_yaml())) == config
        counts["survived"] += 1

    try:
        run()
    finally:
        reliability.record(
            "Hostile inputs",
            "campaign config mappings (one field replaced, deleted, retyped) -> parse_config",
            tried=counts["tried"],
            survived=counts["survived"],
            detail=f"{counts['rejected']} rejected with a ConfigError naming the source; the "
            "rest valid and stable under a YAML round trip",
        )
    assert counts["survived"] == counts["tried"] > 0


def test_fuzzed_config_files_and_cli(tmp_path, capsys, reliability):
    counts = {"tried": 0, "survived": 0, "rejected": 0}
    path = tmp_path / "campaign.yaml"

    @settings(max_examples=EXAMPLES)
    @given(text=yaml_texts)
    def run(text: str) -> None:
        counts["tried"] += 1
        path.write_text(text)
        try:
            load_config(path)
        except ConfigError as exc:
            assert str(path) in str(exc), exc
            counts["rejected"] += 1
        assert _cli_behaved(path, capsys)
        counts["survived"] += 1

    try:
        run()
    finally:
        reliability.record(
            "Hostile inputs",
            "campaign config files (arbitrary text, YAML fragments, cut valid files) -> "
            "load_config and `cycleqd validate`",
            tried=counts["tried"],
            survived=counts["survived"],
            detail=f"{counts['rejected']} rejected: one `error:` line naming the file, exit 2, "
            "no traceback",
        )
    assert counts["survived"] == counts["tried"] > 0


# Found by this fuzzing (they were tracebacks): bytes that are not UTF-8, and nesting deep
# enough to exhaust the YAML parser's recursion.
GAPS = {
    "not UTF-8": b"\xff\xfe\x00name: x\n",
    "deeply nested": b"name: " + b"[" * 3000 + b"\n",
}


@pytest.mark.parametrize("case", sorted(GAPS))
def test_config_reader_edge_cases(case, tmp_path, capsys):
    path = tmp_path / "campaign.yaml"
    path.write_bytes(GAPS[case])
    with pytest.raises(ConfigError):
        load_config(path)
    assert _cli_behaved(path, capsys)

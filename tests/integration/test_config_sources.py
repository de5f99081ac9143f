"""The campaign config as the pipeline's one-line parameter gives it: a YAML document, one-line
JSON, or a URI or path of a config file (S3 with the store's credentials, http(s), a local
path), all one campaign; and the run's `generations` override."""

from __future__ import annotations

import functools
import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from cycleqd import probe_world, steps
from cycleqd.config import config_location, load_config_text, resolve_config_text
from cycleqd.errors import ConfigError
from cycleqd.state import CampaignStore


@pytest.fixture
def config(tiny_world) -> dict:
    return probe_world.default_config(tiny_world, generations=2)


@pytest.fixture
def http_folder(tmp_path) -> Iterator[tuple[Path, str]]:
    """A folder served over http on loopback: (the folder, its base URL)."""
    folder = tmp_path / "served"
    folder.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def s3_env(seaweed, monkeypatch):
    """The S3 settings a pod gets from the campaign store's secret."""
    for name in ("CYCLEQD_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "CYCLEQD_S3_SECRET_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", seaweed.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweed.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweed.secret_key)
    return seaweed


def _upload_by_hand(seaweed, key: str, body: bytes) -> str:
    """As `aws s3 cp` would: no sha256 metadata of ours."""
    seaweed.client().put_object(Bucket=seaweed.bucket, Key=key, Body=body)
    return f"s3://{seaweed.bucket}/{key}"


@pytest.mark.parametrize(
    ("text", "location"),
    [
        ("s3://bucket/configs/agents.yaml", "s3://bucket/configs/agents.yaml"),
        ("  https://example.com/c.json\n", "https://example.com/c.json"),
        ("/configs/agents.yaml", "/configs/agents.yaml"),
        ("configs/agents.yaml", "configs/agents.yaml"),
        ("name: agents", None),  # a one-line YAML mapping is a document
        ('{"name": "agents"}', None),
        ("name: agents\nseed: 0\n", None),
        ("name: agents seed: 0 generations: 3", None),  # a document that lost its line breaks
    ],
)
def test_a_parameter_names_a_file_or_is_the_document(text, location):
    assert config_location(text) == location


def test_yaml_one_line_json_and_a_path_are_one_config(config, tmp_path):
    as_yaml = yaml.safe_dump(config)
    as_json = json.dumps(config)
    assert "\n" not in as_json
    as_flow_yaml = yaml.safe_dump(config, default_flow_style=True, width=1 << 20).strip()
    assert "\n" not in as_flow_yaml and as_flow_yaml.startswith("{")
    path = tmp_path / "campaign.yaml"
    path.write_text(as_yaml)
    expected = load_config_text(as_yaml)
    for text in (as_json, as_flow_yaml, str(path), path.as_uri()):
        assert load_config_text(text) == expected
    assert resolve_config_text(str(path)) == as_yaml  # the file's own text, as it is


def test_a_yaml_document_without_its_line_breaks_says_how_to_give_it(config):
    flattened = " ".join(yaml.safe_dump(config).splitlines())
    with pytest.raises(ConfigError, match="one line: the Kubeflow UI's parameter field drops"):
        load_config_text(flattened)
    with pytest.raises(ConfigError, match="campaign config is not valid JSON"):
        load_config_text(json.dumps(config)[:-1])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("ftp://host/c.yaml", "unsupported scheme 'ftp'; give a YAML document"),
        ("/nonexistent/campaign.yaml", "cannot fetch .*/nonexistent/campaign.yaml: No such file"),
        ("s3://bucket", "names no file: use s3://bucket/key"),
    ],
)
def test_bad_locations_say_what_is_wrong(text, message):
    with pytest.raises(ConfigError, match=message):
        load_config_text(text)


def test_a_file_that_is_not_a_config_is_refused(tmp_path):
    binary = tmp_path / "weights.bin"
    binary.write_bytes(b"\xff\xfe" * 10)
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        resolve_config_text(str(binary))
    huge = tmp_path / "huge.yaml"
    huge.write_bytes(b"#" * (2 << 20))
    with pytest.raises(ConfigError, match="bytes: is it a config file"):
        resolve_config_text(str(huge))


def test_config_over_http(config, http_folder):
    folder, base = http_folder
    (folder / "campaign.json").write_text(json.dumps(config))
    assert load_config_text(f"{base}/campaign.json") == load_config_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match=r"cannot fetch campaign config from http://.*: HTTP 404"):
        load_config_text(f"{base}/missing.yaml")


def test_config_from_s3_with_the_store_credentials(config, s3_env, monkeypatch):
    uri = _upload_by_hand(s3_env, "configs/campaign.yaml", yaml.safe_dump(config).encode())
    assert load_config_text(uri) == load_config_text(json.dumps(config))
    with pytest.raises(
        ConfigError,
        match=r"cannot fetch campaign config from s3://.*/configs/missing.yaml: .*"
        "the pipeline reads it with the campaign store's credentials",
    ):
        load_config_text(f"s3://{s3_env.bucket}/configs/missing.yaml")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(ConfigError, match="campaign store's credentials") as info:
        load_config_text(uri)
    assert "not-the-secret" not in str(info.value)


def test_a_campaign_by_uri_continues_with_the_same_config_inline(config, s3_env, tmp_path):
    uri = _upload_by_hand(s3_env, "configs/pinned.yaml", yaml.safe_dump(config).encode())
    store = str(tmp_path / "campaign")
    assert steps.seed(uri, store, owner="r") == 0
    # The store pins the parsed config: the same one inline is the same campaign.
    assert steps.breed(json.dumps(config), store, owner="r")
    stored = CampaignStore(store).read_config_text()
    assert load_config_text(stored) == load_config_text(uri)
    other = _upload_by_hand(
        s3_env, "configs/other.yaml", yaml.safe_dump({**config, "population": 5}).encode()
    )
    with pytest.raises(ConfigError, match="different config"):
        steps.commit(other, store, owner="r")


def test_generations_to_reach_override_the_configs(config, tmp_path):
    text = json.dumps(config)  # generations: 2
    store = str(tmp_path / "campaign")
    assert steps.preflight(text, store, generations=1)["target_generations"] == 1
    steps.seed(text, store, owner="r", generations=1)
    children = steps.breed(text, store, owner="r", generations=1)
    for gid in children:
        steps.evaluate(text, store, gid)
    assert steps.commit(text, store, owner="r", generations=1)["generation"] == 1
    assert steps.breed(text, store, owner="r", generations=1) == []  # reached
    assert steps.breed(text, store, owner="r")  # the config's 2: one more
    with pytest.raises(ConfigError, match=r"must be 0 .* or more, got -1"):
        load_config_text(text, generations=-1)

"""Base and experts on a real S3 server (SeaweedFS): read only where weights are used, copied
once per pod into a verified cache, and checked by preflight before anything is written.

The pods' environment is mimicked: endpoint and credentials in AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (the `cycleqd-s3` secret), the cache folder in
CYCLEQD_MODEL_CACHE (the pipeline's emptyDir).
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import uuid
from pathlib import Path

import pytest
import yaml

from cycleqd import probe_world, steps
from cycleqd.campaign import Campaign
from cycleqd.config import parse_config
from cycleqd.errors import MissingTensorError, ModelMismatchError
from cycleqd.genome import GenomeBook
from cycleqd.model_sources import (
    ModelCache,
    ModelSource,
    ModelSourceError,
    check_models,
    genome_source,
    local_folder,
)
from cycleqd.objectstore import S3ObjectStore, copy_folder_to_store, open_store
from cycleqd.state import CampaignStore
from cycleqd.weights import SafetensorsFolder


@pytest.fixture
def pod_env(seaweed, monkeypatch, tmp_path):
    """The S3 settings a pod gets from the secret, and an empty model cache."""
    for name in ("CYCLEQD_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "CYCLEQD_S3_SECRET_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", seaweed.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweed.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweed.secret_key)
    monkeypatch.setenv("CYCLEQD_MODEL_CACHE", str(tmp_path / "model-cache"))
    monkeypatch.delenv("CYCLEQD_MODEL_ACCESS", raising=False)
    return tmp_path / "model-cache"


def _upload(seaweed, folders: dict[str, str]) -> tuple[str, dict[str, str]]:
    """Publish folders (manifest with sha256) under a fresh prefix; returns it and URIs."""
    root = f"s3://{seaweed.bucket}/models-{uuid.uuid4().hex[:8]}"
    store = open_store(root)
    for key, folder in folders.items():
        copy_folder_to_store(folder, store, key)
    return root, {key: f"{root}/{key}" for key in folders}


@pytest.fixture
def s3_world(seaweed, pod_env, tiny_world) -> tuple[str, dict]:
    """The tiny world's base and experts on S3: (their root URI, a config's `models`)."""
    folders = {"base": tiny_world["base"], **tiny_world["experts"]}
    root, uris = _upload(seaweed, folders)
    return root, {"base": uris["base"], "experts": {s: uris[s] for s in tiny_world["experts"]}}


class S3Requests:
    """Every request an S3ObjectStore makes in this process, as (store URI, action, key)."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple[str, str, str | None]] = []
        original = S3ObjectStore._call

        def counted(store, action, key, fn):
            self.calls.append((store.uri, action, key))
            return original(store, action, key, fn)

        monkeypatch.setattr(S3ObjectStore, "_call", counted)

    def under(self, root: str, since: int = 0) -> list[tuple[str, str, str | None]]:
        """The requests (from call number `since` on) whose store and key are below `root`."""
        return [c for c in self.calls[since:] if f"{c[0]}/{c[2] or ''}".startswith(root)]


def _canonical(snapshot: dict) -> dict:
    """A snapshot's archives with genome ids replaced by their lineage (base, expert skill,
    parents, weights, mutation): ids hash the models' locations, which differ between two
    campaigns that hold the same models in two places."""
    book = GenomeBook()
    book.load_list(snapshot["genomes"])
    names: dict[str, object] = {}

    def name(gid: str):
        if gid not in names:
            genome = book[gid]
            if genome.kind == "base":
                names[gid] = "base"
            elif genome.kind == "expert":
                names[gid] = f"expert {genome.skill}"
            else:
                mutation = dict(genome.to_dict().get("mutation") or {})
                if mutation.get("expert"):
                    mutation["expert"] = name(mutation["expert"])
                names[gid] = json.dumps(
                    [
                        genome.kind,
                        [name(p) for p in genome.parents],
                        list(genome.weights),
                        mutation,
                        genome.skill,
                        genome.generation,
                    ],
                    sort_keys=True,
                )
        return names[gid]

    return {
        skill: [{**entry, "genome_id": name(entry["genome_id"])} for entry in entries]
        for skill, entries in snapshot["archives"].items()
    }


def _run_tasks(
    config: dict,
    store_uri: str,
    evaluator,
    requests: S3Requests,
    models: str,
    cache_of_pod,
    generations: int = 2,
) -> dict:
    """seed -> (breed -> evaluate -> commit) x generations, each step as its pipeline task
    does it; breed and commit must send no request at all to the models' prefix."""
    text = yaml.safe_dump(config)
    parsed = parse_config(config)
    cache_of_pod("seed")
    with Campaign(parsed, CampaignStore(store_uri, owner="run"), evaluator) as campaign:
        campaign.seed()
    for generation in range(1, generations + 1):
        before = len(requests.calls)
        shards = steps.breed(text, store_uri, owner="run")
        assert requests.under(models, since=before) == [], "breed read the models"
        cache_of_pod(f"evaluate-{generation}")
        ids = [g for shard in shards for g in shard.split(",")]
        steps.evaluate_many(text, store_uri, ids, evaluator=evaluator)
        before = len(requests.calls)
        summary = steps.commit(text, store_uri, owner="run")
        assert requests.under(models, since=before) == [], "commit read the models"
        assert summary["generation"] == generation
    store = CampaignStore(store_uri)
    return store.read_snapshot(store.latest_generation())


def test_campaign_with_models_on_s3(
    s3_world, tiny_world, probe_evaluator, seaweed, monkeypatch, tmp_path
):
    models_root, models = s3_world
    requests = S3Requests(monkeypatch)
    pods: list[Path] = []

    def new_pod(task: str) -> None:  # every task a pod: an empty cache of its own
        pods.append(tmp_path / "pods" / task)
        monkeypatch.setenv("CYCLEQD_MODEL_CACHE", str(pods[-1]))

    config = probe_world.default_config(models, generations=2)
    on_s3 = _run_tasks(
        config,
        f"s3://{seaweed.bucket}/campaign-{uuid.uuid4().hex[:8]}",
        probe_evaluator,
        requests,
        models_root,
        new_pod,
    )
    # Seed and evaluate read the models from S3 (each pod its own copy, checked by sha256).
    downloads = [c for c in requests.under(models_root) if c[1] == "download"]
    files = len(list(Path(tiny_world["base"]).iterdir()))  # config, generation config, weights
    assert len(downloads) == 3 * 4 * files  # (seed, evaluate x 2) x (base + 3 experts)
    for pod in pods:
        assert len([p for p in pod.iterdir() if p.is_dir()]) == 4

    local = _run_tasks(
        probe_world.default_config(tiny_world, generations=2),
        str(tmp_path / "local-campaign"),
        probe_evaluator,
        requests,
        models_root,
        lambda task: None,
    )
    assert _canonical(on_s3) == _canonical(local)
    # Genome sources: the URI without a trailing slash; a local path as before (the ids of
    # existing campaigns stay the same).
    bases = [g["source"] for s in (on_s3, local) for g in s["genomes"] if g["kind"] == "base"]
    assert bases == [models["base"], str(Path(tiny_world["base"]))]
    assert genome_source(models["base"] + "/") == models["base"]


# -- preflight: one clear message, nothing written -----------------------------------------------


def _campaign_store(seaweed) -> str:
    return f"s3://{seaweed.bucket}/campaign-{uuid.uuid4().hex[:8]}"


def _preflight(models: dict, store_uri: str) -> None:
    config = yaml.safe_dump(probe_world.default_config(models))
    steps.preflight(config, store_uri, owner="run")


def test_preflight_passes_reading_only_headers(s3_world, seaweed, monkeypatch, pod_env):
    models_root, models = s3_world
    requests = S3Requests(monkeypatch)
    store_uri = _campaign_store(seaweed)
    _preflight(models, store_uri)
    actions = {c[1] for c in requests.under(models_root)}
    assert actions <= {"list", "read a range of", "read"}, actions  # no download
    assert not pod_env.exists()  # nothing copied


def test_preflight_names_a_missing_s3_model(s3_world, seaweed):
    _, models = s3_world
    missing = f"s3://{seaweed.bucket}/nowhere-{uuid.uuid4().hex[:6]}/coding-expert"
    models["experts"]["probe_b"] = missing
    store_uri = _campaign_store(seaweed)
    with pytest.raises(MissingTensorError) as info:
        _preflight(models, store_uri)
    assert str(info.value) == (
        f"expert 'probe_b' {missing}: nothing there; expected a folder of *.safetensors files "
        "(Hugging Face layout, saved with save_pretrained(safe_serialization=True)) directly "
        "under it"
    )
    assert open_store(store_uri).list() == []


def test_preflight_names_an_s3_expert_with_other_shapes(s3_world, seaweed, tmp_path):
    _, models = s3_world
    other = probe_world.build_base(
        tmp_path / "other", probe_world.llama_config(hidden=32, intermediate=64)
    )
    _, uris = _upload(seaweed, {"other": str(other)})
    models["experts"]["probe_c"] = uris["other"]
    store_uri = _campaign_store(seaweed)
    with pytest.raises(ModelMismatchError) as info:
        _preflight(models, store_uri)
    assert str(info.value) == (
        f"expert 'probe_c' ({uris['other']}): config.json hidden_size=32 but the base has 64; "
        "experts must be fine-tuned from the base"
    )
    assert open_store(store_uri).list() == []


@pytest.mark.parametrize("fault", ["unreachable endpoint", "wrong credentials"])
def test_preflight_names_an_unreadable_s3_model(s3_world, monkeypatch, tmp_path, fault):
    _, models = s3_world
    if fault == "unreachable endpoint":
        with socket.socket() as s:  # a port with nothing listening: connection refused
            s.bind(("127.0.0.1", 0))
            endpoint = f"http://127.0.0.1:{s.getsockname()[1]}"
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        expected = f"cannot reach S3 endpoint {endpoint} to open {models['base'].rsplit('/', 1)[0]}"
    else:
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
        expected = "refused to list"
    store = tmp_path / "campaign"  # a local store: it stays reachable, and must stay empty
    with pytest.raises(ModelSourceError) as info:
        _preflight(models, str(store))
    message = str(info.value)
    assert message.startswith(f"cannot read the base model {models['base']}: "), message
    assert expected in message
    assert "not-the-secret" not in message
    assert not store.exists() or list(store.iterdir()) == []


# -- the per-pod cache ---------------------------------------------------------------------------


def _downloads(requests: S3Requests, since: int = 0) -> list:
    return [c for c in requests.calls[since:] if c[1] == "download"]


def test_cache_is_filled_once_reused_verified_and_refreshed(s3_world, monkeypatch, tmp_path):
    import cycleqd.model_sources as ms

    _, models = s3_world
    uri = models["experts"]["probe_a"]
    requests = S3Requests(monkeypatch)
    cache = ModelCache(tmp_path / "cache")
    folder = cache.folder(uri)
    assert folder.parent == tmp_path / "cache" and folder.name.startswith("probe_a-")
    assert sorted(p.name for p in folder.iterdir()) == [
        ".cycleqd-source.json",
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]
    assert len(_downloads(requests)) == 3
    # Another process (the memo of this one forgotten): hashed again, nothing downloaded.
    monkeypatch.setattr(ms, "_verified", {})
    before = len(requests.calls)
    assert ModelCache(tmp_path / "cache").folder(uri + "/") == folder
    assert _downloads(requests, before) == []
    # A flipped byte in the copy: found by its sha256, copied again.
    monkeypatch.setattr(ms, "_verified", {})
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    before = len(requests.calls)
    assert cache.folder(uri) == folder
    assert len(_downloads(requests, before)) == 3
    assert (
        hashlib.sha256(weights.read_bytes()).hexdigest()
        == json.loads((folder / ".cycleqd-source.json").read_text())["expected"]["files"][
            "model.safetensors"
        ]["sha256"]
    )
    # The model re-published under the same URI (another manifest): copied again, even in
    # the process that verified the old one.
    store = open_store(uri.rsplit("/", 1)[0])
    config = json.loads((folder / "config.json").read_text())
    edited = tmp_path / "edited"
    edited.mkdir()
    for p in folder.iterdir():
        if not p.name.startswith("."):
            (edited / p.name).write_bytes(p.read_bytes())
    (edited / "config.json").write_text(json.dumps({**config, "note": "republished"}))
    copy_folder_to_store(edited, store, uri.rsplit("/", 1)[1])
    before = len(requests.calls)
    assert json.loads((cache.folder(uri) / "config.json").read_text())["note"] == "republished"
    assert len(_downloads(requests, before)) == 3
    assert not [p for p in (tmp_path / "cache").iterdir() if ".tmp-" in p.name]


def test_two_fills_at_once_download_once(s3_world, monkeypatch, tmp_path):
    _, models = s3_world
    requests = S3Requests(monkeypatch)
    barrier = threading.Barrier(2)
    found: list[Path] = []

    def fill() -> None:  # separate open file descriptions: flock excludes them like processes
        barrier.wait()
        found.append(ModelCache(tmp_path / "cache").folder(models["base"]))

    threads = [threading.Thread(target=fill) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(found) == 2 and found[0] == found[1]
    assert len(_downloads(requests)) == 3  # config.json, generation_config.json, weights


def test_folder_uploaded_without_a_manifest(seaweed, pod_env, tiny_world, tmp_path):
    """As `aws s3 cp --recursive` leaves it: no manifest, no sha256 metadata; sizes checked.
    Other weight formats and subfolders other than the task vector's factors are not copied."""
    prefix = f"raw-{uuid.uuid4().hex[:8]}/expert"
    client = seaweed.client()
    base = Path(tiny_world["experts"]["probe_a"])
    for path in base.iterdir():
        client.put_object(
            Bucket=seaweed.bucket, Key=f"{prefix}/{path.name}", Body=path.read_bytes()
        )
    extras = {
        "pytorch_model.bin": b"x" * 10,
        "checkpoint-1/model.safetensors": b"y",
        "task_vector/factors.safetensors": b"z" * 3,
    }
    for name, body in extras.items():
        client.put_object(Bucket=seaweed.bucket, Key=f"{prefix}/{name}", Body=body)
    uri = f"s3://{seaweed.bucket}/{prefix}"
    folder = local_folder(uri, "expert 'probe_a'")
    assert folder.parent == pod_env
    copied = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert copied == [
        ".cycleqd-source.json",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "task_vector/factors.safetensors",
    ]
    weights = SafetensorsFolder(folder)
    reference = SafetensorsFolder(base)
    name = "model.layers.0.mlp.up_proj.weight"
    assert weights.get(name).equal(reference.get(name))


def test_ranged_access_reads_the_same_tensors_and_side_files(s3_world, tiny_world):
    _, models = s3_world
    ranged = ModelSource(models["base"], "base model", access="ranged")
    copied = ModelSource(models["base"], "base model", access="copy")
    local = ModelSource(tiny_world["base"], "base model")
    assert type(ranged.weights()).__name__ == "RemoteSafetensors"
    assert ranged.weights().names() == copied.weights().names() == local.weights().names()
    for name in local.weights().names():
        assert ranged.weights().get(name).equal(local.weights().get(name))
        assert copied.weights().get(name).equal(local.weights().get(name))
    assert ranged.side_files() == copied.side_files() == local.side_files()
    assert "config.json" in local.side_files()


def test_bad_locations_are_named(tmp_path, monkeypatch):
    with pytest.raises(ModelSourceError, match=r"unsupported model location 'hf://org/x'"):
        ModelSource("hf://org/x", "base model")
    monkeypatch.setenv("CYCLEQD_MODEL_ACCESS", "stream")
    with pytest.raises(ModelSourceError, match=r"CYCLEQD_MODEL_ACCESS='stream': use one of"):
        ModelSource("s3://bucket/x", "base model").weights()
    with pytest.raises(MissingTensorError, match=r"base model .*/absent: no such folder"):
        check_models(
            parse_config(
                probe_world.default_config(
                    {
                        "base": str(tmp_path / "absent"),
                        "experts": {s: str(tmp_path / s) for s in probe_world.SKILLS},
                    }
                )
            ).models
        )


# -- evaluation data from S3, as a pod reads it --------------------------------------------------


def test_evaluation_data_from_s3_with_the_pods_settings(seaweed, pod_env, monkeypatch):
    from cycleqd.skills.data import DataError, load_jsonl

    rows = [{"task_id": i, "prompt": f"p{i}"} for i in range(3)]
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    prefix = f"s3://{seaweed.bucket}/datasets-{uuid.uuid4().hex[:8]}"
    open_store(prefix).put_bytes("sample.jsonl", data)
    sha = hashlib.sha256(data).hexdigest()
    assert load_jsonl(prefix, "sample.jsonl", sha256=sha) == rows
    monkeypatch.setenv("CYCLEQD_DATA", prefix)  # the data location from the environment
    assert load_jsonl(None, "sample.jsonl", sha256=sha) == rows
    with pytest.raises(DataError, match=rf"cannot read {prefix}/absent.jsonl: no object"):
        load_jsonl(None, "absent.jsonl")


def test_local_folders_for_the_vllm_worker(s3_world, probe_evaluator, tmp_path):
    """The vLLM worker reads local folders: the campaign hands it this pod's copies."""
    from cycleqd.generate.vllm_worker import genome_request

    _, models = s3_world
    config = parse_config(probe_world.default_config(models))
    with Campaign(config, CampaignStore(tmp_path / "campaign"), probe_evaluator) as campaign:
        folders = campaign.model_folders()
        expert = campaign.book.expert_ids()["probe_a"]
        request = genome_request(campaign.book, expert, folders)
    assert (
        set(request["folders"])
        == set(folders)
        == set(campaign.book.expert_ids().values()) | {campaign.book.base_id()}
    )
    for folder in request["folders"].values():
        assert SafetensorsFolder(folder).names()  # a local copy with its weights

"""vLLM backend: the weight-swap worker extension (on the CPU, with a stand-in model runner),
the import guard, and, where vLLM and a GPU exist, swaps against fresh engines."""

from __future__ import annotations

import importlib.util
import json
import time
from types import SimpleNamespace

import pytest
import torch

from cycleqd.generate.base import SamplingParams
from cycleqd.generate.vllm_worker import WeightSwapExtension, genome_request

HAS_VLLM = importlib.util.find_spec("vllm") is not None


# -- CPU: the import guard and the worker extension's logic ------------------------------------


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed here: the guard does not fire")
def test_importing_without_vllm_says_where_to_run():
    with pytest.raises(ImportError, match="evaluator image"):
        import cycleqd.generate.vllm_backend  # noqa: F401


class StandInModel(torch.nn.Module):
    """vLLM's model interface as the extension uses it: `load_weights(weights=...)`."""

    def __init__(self, model):
        super().__init__()
        self.inner = model

    def load_weights(self, weights):
        state = self.inner.state_dict()
        loaded = set()
        for name, tensor in weights:
            state[name].copy_(tensor)
            loaded.add(f"inner.{name}")
        return loaded


class StandInWorker(WeightSwapExtension):
    def __init__(self, model):
        self.model_runner = type("Runner", (), {"model": StandInModel(model)})()
        self.device = torch.device("cpu")


@pytest.fixture(scope="module")
def world(tmp_path_factory, tokenizer):
    """A chat base, two experts and a child genome (official-code mutation)."""
    from cycleqd import probe_world
    from cycleqd.generate.tiny_tokenizer import save_chat_model
    from cycleqd.genome import Genome, GenomeBook, Mutation

    root = tmp_path_factory.mktemp("vllm-world")
    base = save_chat_model(root / "base", tokenizer=tokenizer, hidden=128, heads=2)
    book = GenomeBook()
    folders = {book.add(Genome(kind="base", source=str(base))): str(base)}
    experts = []
    for i in range(2):
        folder = probe_world.build_expert(base, root / f"expert{i}", seed=i + 1)
        gid = book.add(Genome(kind="expert", source=str(folder), skill=f"s{i}"))
        folders[gid] = str(folder)
        experts.append(gid)
    child = book.add(
        Genome(
            kind="child",
            parents=tuple(experts),
            weights=(0.7, 0.3),
            mutation=Mutation("svd_expert", seed=5, scale=0.2, expert=experts[1]),
        )
    )
    return {"root": root, "base": base, "book": book, "folders": folders, "child": child}


def _materialized(world, genome_id):
    from cycleqd.materialize import Materializer
    from cycleqd.weights import SafetensorsFolder

    opened = {gid: SafetensorsFolder(f) for gid, f in world["folders"].items()}
    return dict(Materializer(world["book"], opened.get).tensors(genome_id))


def test_a_genome_request_is_small_json_with_parents_first(world):
    request = genome_request(world["book"], world["child"], world["folders"], dtype="float32")
    text = json.dumps(request)
    assert len(text) < 4096  # a recipe, not weights
    ids = [r["id"] for r in request["genomes"]]
    assert ids[-1] == world["child"] and ids[0] == world["book"].base_id()
    assert set(request["folders"]) == set(world["folders"])


def test_worker_swaps_in_a_folder_and_a_genome(world):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(world["base"], dtype=torch.float32)
    worker = StandInWorker(model)
    expert = next(g for g, x in world["book"].items() if x.kind == "expert")
    n = worker.swap_weights({"kind": "safetensors", "path": world["folders"][expert]})
    assert n == len(model.state_dict())
    expert_model = LlamaForCausalLM.from_pretrained(world["folders"][expert], dtype=torch.float32)
    for name, tensor in expert_model.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name

    request = json.loads(
        json.dumps(genome_request(world["book"], world["child"], world["folders"], dtype="float32"))
    )
    worker.swap_weights(request)
    want = _materialized(world, world["child"])
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, want[name]), name
    # The materializer (and its SVD factor cache) lives on across swaps.
    first = worker._cycleqd_state["mat"]
    worker.swap_weights(request)
    assert worker._cycleqd_state["mat"] is first


def test_worker_refuses_unknown_requests_and_partial_loads(world):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(world["base"], dtype=torch.float32)
    worker = StandInWorker(model)
    with pytest.raises(ValueError, match="unknown weight swap"):
        worker.swap_weights({"kind": "pickle"})
    worker.model_runner.model.load_weights = lambda weights: {"inner.lm_head.weight"}
    with pytest.raises(RuntimeError, match="unloaded"):
        worker.swap_weights({"kind": "safetensors", "path": str(world["base"])})


# -- GPU: a real engine --------------------------------------------------------------------------


def _gpu_ready() -> str | None:
    if not HAS_VLLM:
        return "vLLM is not installed: these tests run in the vLLM evaluator image"
    if not torch.cuda.is_available():
        return "no CUDA device: vLLM needs a GPU"
    return None


gpu = pytest.mark.skipif(_gpu_ready() is not None, reason=_gpu_ready() or "")

PARAMS = SamplingParams(max_new_tokens=32)
CONVERSATIONS = [
    [{"role": "user", "content": "Shared prefix for the prefix cache. " * 8 + f"Question {i}"}]
    for i in range(6)
]


def _engine(folder, **kwargs):
    from cycleqd.generate.vllm_backend import VLLMBackend

    return VLLMBackend(
        str(folder),
        dtype="float32",
        gpu_memory_utilization=0.25,
        max_model_len=1024,
        enforce_eager=True,
        **kwargs,
    )


def _shutdown(backend):
    import gc

    del backend.llm
    gc.collect()
    torch.cuda.empty_cache()


@pytest.fixture(scope="module")
def gpu_world(tmp_path_factory, tokenizer):
    """Two chat models with a head size vLLM's attention kernels take (64)."""
    from cycleqd.generate.tiny_tokenizer import save_chat_model

    root = tmp_path_factory.mktemp("vllm-gpu")
    kwargs = {"tokenizer": tokenizer, "hidden": 256, "heads": 4, "intermediate": 512}
    return {
        "a": save_chat_model(root / "a", seed=0, **kwargs),
        "b": save_chat_model(root / "b", seed=1, **kwargs),
    }


@gpu
def test_swap_equals_a_fresh_engine_and_is_faster(gpu_world):
    start = time.perf_counter()
    warm = _engine(gpu_world["a"])
    fresh_start_s = time.perf_counter() - start
    before = warm.generate(CONVERSATIONS, PARAMS)  # fills the prefix cache with A's KV

    start = time.perf_counter()
    warm.swap_folder(str(gpu_world["b"]))
    swap_s = time.perf_counter() - start
    after = warm.generate(CONVERSATIONS, PARAMS)
    warm.swap_folder(str(gpu_world["a"]))
    assert warm.generate(CONVERSATIONS, PARAMS) == before
    _shutdown(warm)

    fresh = _engine(gpu_world["b"])
    assert after == fresh.generate(CONVERSATIONS, PARAMS)
    assert after != before
    _shutdown(fresh)
    print(f"\nfresh engine start {fresh_start_s:.1f} s, in-place swap {swap_s:.3f} s")
    assert swap_s < fresh_start_s


@gpu
def test_genome_swap_equals_the_stored_child(world, tmp_path):
    from cycleqd.materialize import Materializer
    from cycleqd.weights import SafetensorsFolder, write_safetensors

    opened = {gid: SafetensorsFolder(f) for gid, f in world["folders"].items()}
    materializer = Materializer(world["book"], opened.get)
    child_dir = tmp_path / "child"
    child_dir.mkdir()
    write_safetensors(
        child_dir / "model.safetensors", materializer.specs(), materializer.tensors(world["child"])
    )
    backend = _engine(world["base"])
    backend.swap_folder(str(child_dir))
    stored = backend.generate(CONVERSATIONS, PARAMS)
    backend.swap_folder(str(world["base"]))
    backend.swap_genome(world["book"], world["child"], world["folders"])
    assert backend.generate(CONVERSATIONS, PARAMS) == stored
    _shutdown(backend)


@gpu
def test_sleep_and_wake_keep_the_weights(gpu_world):
    backend = _engine(gpu_world["a"], enable_sleep_mode=True)
    before = backend.generate(CONVERSATIONS, PARAMS)
    backend.sleep(level=1)
    with pytest.raises(RuntimeError, match="asleep"):
        backend.generate(CONVERSATIONS, PARAMS)
    backend.wake_up()
    assert backend.generate(CONVERSATIONS, PARAMS) == before
    _shutdown(backend)


# -- CPU: VLLMBackend's own logic against a stand-in `vllm` module --------------------------------


class FakeLLM:
    """Just enough of `vllm.LLM`: chat runs a transformers model, collective_rpc calls the
    worker extension on it, and every call is recorded."""

    def __init__(self, model, **kwargs):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from cycleqd.generate.transformers_backend import TransformersBackend

        self.kwargs = {"model": model, **kwargs}
        self.calls: list[str] = []
        hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
        self.backend = TransformersBackend(hf, AutoTokenizer.from_pretrained(model))
        self.worker = StandInWorker(hf)
        self.reset_result = True

    def chat(self, conversations, sampling, add_generation_prompt, use_tqdm):
        self.calls.append("chat")
        assert add_generation_prompt and sampling.temperature == 0
        params = SamplingParams(max_new_tokens=sampling.max_tokens, stop=tuple(sampling.stop or ()))
        texts = self.backend.generate(conversations, params)
        return [SimpleNamespace(outputs=[SimpleNamespace(text=t)]) for t in texts]

    def collective_rpc(self, method, args=()):
        self.calls.append(method)
        return [getattr(self.worker, method)(*args)]

    def reset_prefix_cache(self):
        self.calls.append("reset_prefix_cache")
        return self.reset_result

    def sleep(self, level):
        self.calls.append(f"sleep{level}")

    def wake_up(self):
        self.calls.append("wake_up")


@pytest.fixture
def fake_vllm(monkeypatch):
    import sys
    import types

    module = types.ModuleType("vllm")
    module.LLM = FakeLLM
    module.SamplingParams = lambda **kw: SimpleNamespace(**kw)
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.delitem(sys.modules, "cycleqd.generate.vllm_backend", raising=False)
    import cycleqd.generate.vllm_backend as vllm_backend

    yield vllm_backend
    sys.modules.pop("cycleqd.generate.vllm_backend", None)


def test_backend_wiring_with_a_stand_in_engine(fake_vllm, world, tokenizer, tmp_path):
    from cycleqd.generate.tiny_tokenizer import save_chat_model
    from cycleqd.generate.transformers_backend import TransformersBackend

    backend = fake_vllm.VLLMBackend(str(world["base"]), dtype="float32")
    assert backend.llm.kwargs["worker_extension_cls"] == (
        "cycleqd.generate.vllm_worker.WeightSwapExtension"
    )
    assert backend.llm.kwargs["load_format"] == "auto"
    params = SamplingParams(max_new_tokens=16, stop=("\n",))
    before = backend.generate(CONVERSATIONS, params)

    other = save_chat_model(tmp_path / "other", seed=3, tokenizer=tokenizer, hidden=128, heads=2)
    backend.llm.calls.clear()
    backend.swap_folder(str(other))
    assert backend.llm.calls == ["swap_weights", "reset_prefix_cache"]
    fresh = TransformersBackend.from_pretrained(other, "float32", "cpu")
    assert backend.generate(CONVERSATIONS, params) == fresh.generate(CONVERSATIONS, params)
    assert backend.generate(CONVERSATIONS, params) != before

    backend.swap_genome(world["book"], world["child"], world["folders"])
    child = TransformersBackend.from_pretrained(world["base"], "float32", "cpu")
    child.load_weights(_materialized(world, world["child"]).items())
    assert backend.generate(CONVERSATIONS, params) == child.generate(CONVERSATIONS, params)

    backend.llm.reset_result = False
    with pytest.raises(RuntimeError, match="prefix cache"):
        backend.swap_folder(str(other))

    backend.sleep()
    with pytest.raises(RuntimeError, match="asleep"):
        backend.generate(CONVERSATIONS, params)
    backend.wake_up()
    assert backend.llm.calls[-3:] == ["sleep1", "wake_up", "reset_prefix_cache"]


def test_s3_models_stream_with_runai(fake_vllm, monkeypatch):
    seen = {}
    monkeypatch.setattr(fake_vllm.vllm, "LLM", lambda **kw: seen.update(kw))
    fake_vllm.VLLMBackend("s3://models/base", enable_sleep_mode=True)
    assert seen["load_format"] == "runai_streamer" and seen["enable_sleep_mode"] is True


def test_a_campaign_config_asking_for_vllm_gets_it_and_swaps_by_recipe(fake_vllm, world, tmp_path):
    """`evaluation.backend.kind: vllm` builds VLLMBackend with the config's engine settings,
    and the campaign hands it every model (experts and children) as a swap request: no
    tensor is materialised in the campaign's process."""
    from cycleqd.campaign import Campaign
    from cycleqd.config import parse_config
    from cycleqd.evaluators import build_evaluator
    from cycleqd.state import CampaignStore

    base = str(world["base"])
    experts = [world["book"][g].source for g in world["book"].expert_ids().values()]
    config = parse_config(
        {
            "name": "vllm-config",
            "generations": 2,
            "dtype": "float32",
            "skills": [
                {"name": "tiny_code", "samples": 2, "max_new_tokens": 8},
                {"name": "tiny_sql", "samples": 2, "max_new_tokens": 8},
            ],
            "models": {"base": base, "experts": {"tiny_code": experts[0], "tiny_sql": experts[1]}},
            "mutation": {"kind": "svd_expert", "rate": 0.2},
            "evaluation": {
                "backend": {
                    "kind": "vllm",
                    "tensor_parallel_size": 2,
                    "gpu_memory_utilization": 0.5,
                    "max_model_len": 2048,
                    "enforce_eager": True,
                }
            },
        }
    )
    evaluator = build_evaluator(config)
    with Campaign(config, CampaignStore(tmp_path / "store"), evaluator) as campaign:
        campaign.run()
    llm = evaluator.evaluator.backend.llm
    assert {k: llm.kwargs[k] for k in ("tensor_parallel_size", "gpu_memory_utilization")} == {
        "tensor_parallel_size": 2,
        "gpu_memory_utilization": 0.5,
    }
    assert llm.kwargs["max_model_len"] == 2048 and llm.kwargs["enforce_eager"] is True
    assert llm.kwargs["dtype"] == "float32" and llm.kwargs["model"] == base
    swaps = [c for c in llm.calls if c == "swap_weights"]
    assert len(swaps) == 2 + 2  # two experts, two children
    # every swap is followed by a prefix-cache reset before anything is generated
    for i, call in enumerate(llm.calls):
        if call == "swap_weights":
            assert llm.calls[i + 1] == "reset_prefix_cache"
    assert campaign.generation == 2
    assert campaign.read_samples(campaign.book.expert_ids()["tiny_sql"])["tiny_sql"]["samples"]


@gpu
def test_vllm_serve_with_the_extension_swaps_by_location_as_a_warm_evaluator(gpu_world, tmp_path):
    """A warm evaluator as the Kubernetes launcher runs it (`vllm serve`, the worker extension,
    dev mode, the token as $VLLM_API_KEY), driven by the evaluation tasks' ServerBackend: a
    swap by location changes the replies to the other model's, and back again."""
    import os
    import secrets
    import socket
    import subprocess

    from cycleqd.evaluator_launch.base import EvaluatorSpec
    from cycleqd.evaluator_launch.kubernetes import KubernetesEvaluatorSettings, KubernetesLauncher
    from cycleqd.generate.server_backend import EvaluatorRequestError, ServerBackend

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    spec = EvaluatorSpec(
        owner="gpu-test",
        count=1,
        base_location=str(gpu_world["a"]),
        dtype="float32",
        max_model_len=1024,
        gpu_memory_utilization=0.25,
        extra_args=("--enforce-eager",),
    )
    command = KubernetesLauncher(KubernetesEvaluatorSettings(port=port)).command(spec)
    token = secrets.token_urlsafe(16)
    env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1", "VLLM_API_KEY": token}
    with open(tmp_path / "vllm-serve.log", "wb") as log:
        server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        backend = ServerBackend(f"http://127.0.0.1:{port}", token)
        deadline = time.monotonic() + 600
        while not backend.healthy():
            assert server.poll() is None, (tmp_path / "vllm-serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "vllm serve did not answer /health in 600 s"
            time.sleep(1)
        before = backend.generate(CONVERSATIONS, PARAMS)
        started = time.perf_counter()
        backend.swap({"kind": "safetensors", "location": str(gpu_world["b"])})
        swap_s = time.perf_counter() - started
        after = backend.generate(CONVERSATIONS, PARAMS)
        backend.swap({"kind": "safetensors", "location": str(gpu_world["a"])})
        assert backend.generate(CONVERSATIONS, PARAMS) == before
        assert after != before
        with pytest.raises(EvaluatorRequestError, match="refused the token"):
            ServerBackend(backend.url, "wrong").generate(CONVERSATIONS[:1], PARAMS)
    finally:
        server.terminate()
        server.wait(60)
    fresh = _engine(gpu_world["b"])
    assert after == fresh.generate(CONVERSATIONS, PARAMS)
    _shutdown(fresh)
    print(f"\nvllm serve: swap by location {swap_s:.3f} s")

"""The fused CPU merge gives the torch path's bits, catches non-finite results, and the
Materializer uses it (or not) without changing a single weight."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from cycleqd import merge_kernel
from cycleqd.errors import NonFiniteWeightsError
from cycleqd.genome import Genome, GenomeBook, Mutation
from cycleqd.materialize import Materializer
from cycleqd.weights import SafetensorsFolder

pytestmark = pytest.mark.skipif(
    not merge_kernel.available(), reason="numba is not installed: pip install -e ."
)


@pytest.fixture(params=[1, 3], ids=["one-thread", "three-parts"])
def parts(request, monkeypatch):
    """The kernel on one thread, or split into three parts on three threads."""
    saved = torch.get_num_threads()
    if request.param > 1:
        monkeypatch.setattr(merge_kernel, "PARALLEL_MIN_ELEMENTS", 1000)
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(saved)


def _torch_merge(base, experts, coeffs, out_dtype):
    """The reference: the torch ops of the block-wise path, on whole tensors."""
    b = base.float()
    out = torch.add(b, experts[0].float() - b, alpha=coeffs[0])
    for x, a in zip(experts[1:], coeffs[1:], strict=True):
        out.add_(x.float() - b, alpha=a)
    return out.to(out_dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("count", [1, 2, 3])
def test_bit_identical_to_torch(dtype, out_dtype, count, parts):
    g = torch.Generator().manual_seed(count)
    n = 100_003  # not a multiple of any vector width: the tail is covered too
    base = torch.randn(n, generator=g).to(dtype)
    experts = [(base.float() + 0.02 * torch.randn(n, generator=g)).to(dtype) for _ in range(count)]
    coeffs = [0.6, -0.35, 1.7][:count]  # one that float32 cannot hold exactly, one negative
    out = torch.empty(n, dtype=out_dtype)
    assert merge_kernel.merge(base, experts, coeffs, out)
    expected = _torch_merge(base, experts, coeffs, out_dtype)
    assert torch.equal(out, expected), f"{(out != expected).sum()} of {n} elements differ"


def test_finish_rounds_like_torch(parts):
    g = torch.Generator().manual_seed(0)
    acc = torch.randn(4099, generator=g) * torch.logspace(-30, 30, 4099)
    out = torch.empty(4099, dtype=torch.bfloat16)
    assert merge_kernel.finish(acc, out)
    assert torch.equal(out, acc.to(torch.bfloat16))


@pytest.mark.parametrize(
    ("poison", "coeff"),
    [
        (float("nan"), 0.5),  # NaN in an expert
        (float("inf"), 0.5),  # Inf in an expert
        (3.4e38, 1.0),  # finite in float32, rounds to Inf in bfloat16
        (10.0, 1e38),  # overflows in the arithmetic
    ],
)
def test_non_finite_results_are_reported(poison, coeff, parts):
    base = torch.zeros(5000)
    expert = torch.zeros(5000)
    expert[4321] = poison
    out = torch.empty(5000, dtype=torch.bfloat16)
    assert not merge_kernel.merge(base, [expert], [coeff], out)
    assert merge_kernel.merge(base, [torch.zeros(5000)], [coeff], out)


def test_rejects_what_it_cannot_take():
    base = torch.zeros(8)
    with pytest.raises(ValueError, match="at least one expert"):
        merge_kernel.merge(base, [], [], torch.empty(8))
    with pytest.raises(ValueError, match="one dtype"):
        merge_kernel.merge(base, [base, base.bfloat16()], [0.5, 0.5], torch.empty(8))
    with pytest.raises(ValueError, match="contiguous CPU"):
        merge_kernel.merge(torch.zeros(8, 2).t()[0], [base], [1.0], torch.empty(8))
    assert not merge_kernel.supports(torch.float16)


@pytest.fixture(scope="module")
def worlds(tiny_world, tmp_path_factory):
    """The tiny world's base and experts in float32 (as built) and in bfloat16."""
    bf16 = tmp_path_factory.mktemp("bf16-world")
    folders = {"base": tiny_world["base"], **tiny_world["experts"]}
    converted = {}
    for key, folder in folders.items():
        tensors = load_file(f"{folder}/model.safetensors")
        (bf16 / key).mkdir()
        save_file(
            {k: v.to(torch.bfloat16) for k, v in tensors.items()}, bf16 / key / "model.safetensors"
        )
        converted[key] = str(bf16 / key)
    return {"float32": folders, "bfloat16": converted}


def _book(folders):
    book = GenomeBook()
    opened = {book.add(Genome(kind="base", source=folders["base"])): folders["base"]}
    experts = []
    for skill, folder in folders.items():
        if skill != "base":
            gid = book.add(Genome(kind="expert", source=folder, skill=skill))
            opened[gid] = folder
            experts.append(gid)
    return book, {g: SafetensorsFolder(f) for g, f in opened.items()}, experts


@pytest.mark.parametrize("block", [None, 300])  # 300: many blocks (of whole rows) per tensor
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_materializer_fused_equals_torch_path(worlds, dtype, block, monkeypatch):
    if block:
        monkeypatch.setattr("cycleqd.materialize.BLOCK_ELEMENTS", block)
    book, opened, (e1, e2, e3) = _book(worlds[dtype])
    first = book.add(Genome("child", (e1, e2), (0.55, 0.45), Mutation("svd_expert", 3, 0.3, e1)))
    children = [
        book.add(Genome("child", (e1, e3), (0.3, 0.7))),
        first,
        book.add(Genome("child", (first, e3), (0.6, 0.4), Mutation("gaussian", 4, 1e-3))),
    ]
    for out_dtype in ("float32", "bfloat16"):
        fused = Materializer(book, opened.get, dtype=out_dtype, fused=True)
        got = {g: dict(fused.tensors(g)) for g in children}
        plain = Materializer(book, opened.get, dtype=out_dtype, fused=False)
        want = {g: dict(plain.tensors(g)) for g in children}
        for g in children:
            for name, tensor in want[g].items():
                assert torch.equal(got[g][name], tensor), (dtype, out_dtype, g, name)
        # tensor() (float32, unchecked) is the same arithmetic as tensors()
        name = "model.layers.0.self_attn.q_proj.weight"
        assert torch.equal(fused.tensor(first, name).to(got[first][name].dtype), got[first][name])


def test_materializer_rejects_non_finite_child(worlds):
    book, opened, (e1, e2, _) = _book(worlds["bfloat16"])
    child = book.add(Genome("child", (e1, e2), (1e39, -1e39)))  # inf in float32
    with pytest.raises(NonFiniteWeightsError, match="NaN or Inf"):
        dict(Materializer(book, opened.get, dtype="bfloat16", fused=True).tensors(child))


def test_materializer_writes_into_matching_buffers(worlds):
    book, opened, (e1, e2, _) = _book(worlds["bfloat16"])
    child = book.add(Genome("child", (e1, e2), (0.3, 0.7), Mutation("svd_expert", 1, 0.3, e2)))
    materializer = Materializer(book, opened.get, dtype="bfloat16", fused=True)
    allocated = dict(materializer.tensors(child))
    buffers = {name: torch.zeros_like(t) for name, t in allocated.items()}
    odd = "model.norm.weight"
    buffers[odd] = torch.zeros(allocated[odd].shape, dtype=torch.float32)  # wrong dtype
    untouched = buffers[odd].clone()
    for name, tensor in materializer.tensors(child, into=buffers):
        assert torch.equal(tensor, allocated[name]), name
        same = tensor.data_ptr() == buffers[name].data_ptr()
        assert same == (name != odd), name  # written in place unless the buffer cannot take it
    assert torch.equal(buffers[odd], untouched)


def test_fused_by_default_only_for_models_worth_it(worlds, monkeypatch):
    book, opened, _ = _book(worlds["float32"])
    assert not Materializer(book, opened.get).fused  # a test world, far below the threshold
    monkeypatch.setattr("cycleqd.materialize.FUSED_MIN_ELEMENTS", 1000)
    assert Materializer(book, opened.get).fused
    monkeypatch.setattr(merge_kernel, "available", lambda: False)  # numba missing
    assert not Materializer(book, opened.get, fused=True).fused


def test_compiles_without_a_writable_cache(monkeypatch):
    """A read-only image with no writable home: numba finds nowhere to cache the kernel and
    refuses `cache=True`; the kernel is then compiled in memory instead of being lost."""
    import numba.core.caching

    monkeypatch.setattr(numba.core.caching.CacheImpl, "_locator_classes", [])
    monkeypatch.setattr(merge_kernel, "_kernels", None)
    assert merge_kernel.available()
    out = torch.empty(10)
    assert merge_kernel.merge(torch.zeros(10), [torch.ones(10)], [0.5], out)
    assert torch.equal(out, torch.full((10,), 0.5))
    monkeypatch.setattr(merge_kernel, "_kernels", None)  # the next test compiles afresh


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("CYCLEQD_FUSED_MERGE", "0")
    monkeypatch.setattr(merge_kernel, "_kernels", None)
    assert not merge_kernel.available()
    monkeypatch.setattr(merge_kernel, "_kernels", None)


def test_parts_in_a_forked_child(monkeypatch):
    """A child forked after the parent used the thread pool merges in parts too (it inherits
    the pool object but none of its threads: reusing it would hang)."""
    import multiprocessing

    monkeypatch.setattr(merge_kernel, "PARALLEL_MIN_ELEMENTS", 1000)
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert merge_kernel.merge(torch.zeros(5000), [torch.ones(5000)], [1.0], torch.empty(5000))
        with multiprocessing.get_context("fork").Pool(1) as pool:
            assert pool.apply_async(_merge_in_parts).get(timeout=60)
    finally:
        torch.set_num_threads(saved)


def _merge_in_parts() -> bool:
    merge_kernel.PARALLEL_MIN_ELEMENTS = 1000
    torch.set_num_threads(2)
    out = torch.empty(5000)
    return merge_kernel.merge(torch.zeros(5000), [torch.ones(5000)], [0.5], out) and bool(
        (out == 0.5).all()
    )

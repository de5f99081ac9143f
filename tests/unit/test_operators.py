"""Crossover, mutations and final aggregation pinned to the CycleQD paper.

- crossover: w_i ~ N(1 + mu, sigma), normalised by their sum (model-wise linear merge)
- final merge: beta = softmax(f)
- SVD mutation (paper): U diag(r * S) V^T of the child's task vector, r ~ U[0, w_max];
  1-D tensors and normalisation layers pass through
- tensor-level randomness is seeded by (mutation seed, tensor name) only
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch

from cycleqd.operators import (
    aggregation_weights,
    crossover_weights,
    gaussian_noise,
    is_svd_target,
    svd_rescale,
    tensor_generator,
    uniform_factors,
)

# ---------------------------------------------------------------- crossover


def test_crossover_weights_are_the_raw_normals_over_their_sum() -> None:
    # The same seed drawn by hand: N(1 + mu, sigma) = N(1.3, 0.02), three parents.
    raw = np.random.default_rng(123).normal(1.3, 0.02, size=3)
    assert np.all(np.abs(raw - 1.3) < 0.1)  # sanity: these really are N(1.3, 0.02) draws
    weights = crossover_weights(np.random.default_rng(123), 3, mu=0.3, sigma=0.02)
    np.testing.assert_allclose(weights, raw / raw.sum(), rtol=1e-15)
    assert weights.sum() == pytest.approx(1.0, abs=1e-15)


def test_crossover_weights_default_two_parents() -> None:
    raw = np.random.default_rng(7).normal(1.0, 0.01, size=2)
    weights = crossover_weights(np.random.default_rng(7), 2, mu=0.0, sigma=0.01)
    np.testing.assert_allclose(weights, [raw[0] / (raw[0] + raw[1]), raw[1] / (raw[0] + raw[1])])
    # sigma 0.01 keeps both weights close to 1/2
    assert np.all(np.abs(weights - 0.5) < 0.02)


def test_crossover_weights_consume_the_callers_generator() -> None:
    rng = np.random.default_rng(11)
    first = crossover_weights(rng, 2, 0.0, 0.01)
    second = crossover_weights(rng, 2, 0.0, 0.01)
    assert not np.array_equal(first, second)
    expected_rng = np.random.default_rng(11)
    expected_rng.normal(1.0, 0.01, size=2)
    raw = expected_rng.normal(1.0, 0.01, size=2)
    np.testing.assert_allclose(second, raw / raw.sum(), rtol=1e-15)


@pytest.mark.parametrize(("n", "mu"), [(1, 0.0), (2, 0.0), (4, 0.0), (2, 1.0), (3, -0.5)])
def test_crossover_weights_with_zero_sigma_are_equal(n: int, mu: float) -> None:
    # sigma 0: every raw weight is 1 + mu, so each normalised weight is exactly 1 / n
    weights = crossover_weights(np.random.default_rng(0), n, mu=mu, sigma=0.0)
    np.testing.assert_allclose(weights, [1.0 / n] * n, rtol=1e-15)


def test_crossover_negative_sigma_is_its_absolute_value() -> None:
    a = crossover_weights(np.random.default_rng(3), 2, 0.0, -0.05)
    b = crossover_weights(np.random.default_rng(3), 2, 0.0, 0.05)
    np.testing.assert_array_equal(a, b)


def test_crossover_weights_spread_matches_sigma() -> None:
    # w_0 = r_0 / (r_0 + r_1) with r_i ~ N(1, s): to first order w_0 = 1/2 + (r_0 - r_1) / 4,
    # so sd(w_0) = s * sqrt(2) / 4. With s = 0.04: 0.0141421.
    rng = np.random.default_rng(99)
    w0 = np.array([crossover_weights(rng, 2, 0.0, 0.04)[0] for _ in range(4000)])
    assert w0.mean() == pytest.approx(0.5, abs=0.001)
    assert w0.std() == pytest.approx(0.04 * math.sqrt(2) / 4, rel=0.06)


def test_crossover_weights_summing_to_zero_raise() -> None:
    # mu = -1, sigma = 0: every raw weight is 0
    with pytest.raises(ValueError, match="sigma"):
        crossover_weights(np.random.default_rng(0), 2, mu=-1.0, sigma=0.0)


# ---------------------------------------------------------------- aggregation


@pytest.mark.parametrize(
    ("qualities", "expected"),
    [
        ([0.0, math.log(2)], [1 / 3, 2 / 3]),  # e^0 : e^ln2 = 1 : 2
        ([0.0, math.log(2), math.log(3)], [1 / 6, 2 / 6, 3 / 6]),  # 1 : 2 : 3
        ([0.4, 0.4, 0.4], [1 / 3, 1 / 3, 1 / 3]),
        ([1000.0, 1000.0 + math.log(3)], [1 / 4, 3 / 4]),  # no overflow
        ([-1000.0, -1000.0 + math.log(4)], [1 / 5, 4 / 5]),  # no underflow to 0 / 0
        ([0.764, 0.382, 0.426], None),  # paper headline scores: checked below
    ],
)
def test_aggregation_weights_are_softmax(qualities: list[float], expected: list[float]) -> None:
    beta = aggregation_weights(np.array(qualities))
    assert beta.sum() == pytest.approx(1.0, abs=1e-12)
    if expected is None:
        # e^0.764 = 2.146846, e^0.382 = 1.465212, e^0.426 = 1.531121; sum 5.143179
        # -> 0.417416, 0.284885, 0.297700
        np.testing.assert_allclose(beta, [0.417416, 0.284885, 0.297700], atol=2e-6)
    else:
        np.testing.assert_allclose(beta, expected, rtol=1e-12)


# ---------------------------------------------------------------- tensor generator


def _expected_seed(seed: int, name: str) -> int:
    # the documented scheme: first 8 bytes of sha256("seed:name"), little endian, >> 1
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1


def test_tensor_generator_seed_depends_only_on_seed_and_name() -> None:
    assert tensor_generator(0, "w").initial_seed() == _expected_seed(0, "w")
    assert tensor_generator(17, "model.layers.0.mlp.up_proj.weight").initial_seed() == (
        _expected_seed(17, "model.layers.0.mlp.up_proj.weight")
    )
    assert tensor_generator(1, "w").initial_seed() != tensor_generator(2, "w").initial_seed()
    assert tensor_generator(1, "w").initial_seed() != tensor_generator(1, "v").initial_seed()


def test_tensor_generator_is_independent_of_call_order_and_global_seed() -> None:
    names = ["a.weight", "b.weight", "c.bias"]
    torch.manual_seed(0)
    forward = {n: torch.rand(5, generator=tensor_generator(3, n)) for n in names}
    torch.manual_seed(12345)
    torch.rand(100)  # disturb the global generator
    backward = {n: torch.rand(5, generator=tensor_generator(3, n)) for n in reversed(names)}
    for n in names:
        torch.testing.assert_close(forward[n], backward[n], rtol=0, atol=0)
    assert not torch.equal(forward["a.weight"], forward["b.weight"])


# ---------------------------------------------------------------- SVD mutation


def test_is_svd_target() -> None:
    assert is_svd_target("model.layers.0.self_attn.q_proj.weight", torch.zeros(4, 3))
    assert not is_svd_target("model.layers.0.self_attn.q_proj.bias", torch.zeros(4))
    assert not is_svd_target("model.layers.0.input_layernorm.weight", torch.zeros(4))
    assert not is_svd_target("model.norm.weight", torch.zeros(4, 4))  # 2-D but a norm
    assert not is_svd_target("conv.weight", torch.zeros(2, 2, 2))


def test_uniform_factors_are_u_0_high() -> None:
    r = uniform_factors(5, "w", 10000, 1.5)
    assert r.shape == (10000,)
    assert float(r.min()) >= 0.0
    assert float(r.max()) < 1.5
    assert float(r.mean()) == pytest.approx(0.75, abs=0.02)  # mean of U[0, 1.5]
    expected = torch.rand(10000, generator=tensor_generator(5, "w")) * 1.5
    torch.testing.assert_close(r, expected, rtol=0, atol=0)


def test_svd_rescale_on_a_diagonal_matrix() -> None:
    # diag(3, 2): U = V = I, S = (3, 2). The result must be diag(3 r0, 2 r1), where
    # r = U[0, 1.5) draws from the (seed, name) generator, in singular value order.
    tv = torch.tensor([[3.0, 0.0], [0.0, 2.0]])
    r = torch.rand(2, generator=torch.Generator().manual_seed(_expected_seed(9, "w"))) * 1.5
    out = svd_rescale(tv, "w", seed=9, w_max=1.5)
    expected = torch.tensor([[3.0 * float(r[0]), 0.0], [0.0, 2.0 * float(r[1])]])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(6, 4), (4, 6), (5, 5)])
def test_svd_rescale_keeps_singular_vectors_and_scales_values(shape: tuple[int, int]) -> None:
    gen = torch.Generator().manual_seed(0)
    tv = torch.randn(shape, generator=gen, dtype=torch.float64).float()
    w_max = 1.5
    out = svd_rescale(tv, "layer.weight", seed=4, w_max=w_max)
    assert out.shape == tv.shape
    u, s, vh = torch.linalg.svd(tv.double(), full_matrices=False)
    # If out = U diag(d) V^T with the input's U and V, then U^T out V = diag(d) exactly:
    # off-diagonal entries vanish (same singular vectors, up to sign, which cancels here).
    projected = u.T @ out.double() @ vh.T
    d = torch.diagonal(projected)
    off = projected - torch.diag(d)
    assert float(off.abs().max()) < 1e-5
    r = d / s
    assert float(r.min()) >= -1e-6
    assert float(r.max()) <= w_max + 1e-6
    # and r are exactly the (seed, name) uniform draws
    expected_r = torch.rand(min(shape), generator=tensor_generator(4, "layer.weight")) * w_max
    torch.testing.assert_close(r.float(), expected_r, rtol=1e-4, atol=1e-5)


def test_svd_rescale_passes_non_matrices_and_norms_through() -> None:
    bias = torch.randn(7)
    assert svd_rescale(bias, "layer.bias", 1, 1.5) is bias
    norm = torch.randn(4, 4)
    assert svd_rescale(norm, "model.layers.3.post_attention_layernorm.weight", 1, 1.5) is norm
    assert svd_rescale(norm, "model.norm.weight", 1, 1.5) is norm


def test_svd_rescale_is_determined_by_seed_and_name() -> None:
    tv = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
    a = svd_rescale(tv, "w", 3, 1.5)
    torch.testing.assert_close(a, svd_rescale(tv.clone(), "w", 3, 1.5), rtol=0, atol=0)
    assert not torch.allclose(a, svd_rescale(tv, "w", 4, 1.5))
    assert not torch.allclose(a, svd_rescale(tv, "v", 3, 1.5))
    # does not depend on the global torch seed
    torch.manual_seed(999)
    torch.testing.assert_close(a, svd_rescale(tv, "w", 3, 1.5), rtol=0, atol=0)


def test_svd_rescale_w_max_scales_linearly() -> None:
    # the same draws u ~ U[0, 1) times w_max: doubling w_max doubles the result
    tv = torch.randn(5, 3, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(
        svd_rescale(tv, "w", 8, 2.0), 2.0 * svd_rescale(tv, "w", 8, 1.0), rtol=1e-5, atol=1e-6
    )


# ---------------------------------------------------------------- Gaussian mutation


def test_gaussian_noise_is_deterministic_and_has_the_right_std() -> None:
    shape = torch.Size([200, 500])
    sigma = 0.003
    a = gaussian_noise("w", shape, 5, sigma, torch.device("cpu"))
    assert a.shape == shape
    assert a.dtype == torch.float32
    torch.testing.assert_close(
        a, gaussian_noise("w", shape, 5, sigma, torch.device("cpu")), rtol=0, atol=0
    )
    # 100000 draws: sd of the sample std ~ sigma / sqrt(2n) = 0.22% of sigma
    assert float(a.std()) == pytest.approx(sigma, rel=0.02)
    assert abs(float(a.mean())) < 4 * sigma / math.sqrt(a.numel())
    expected = torch.randn(200, 500, generator=tensor_generator(5, "w")) * sigma
    torch.testing.assert_close(a, expected, rtol=0, atol=0)


def test_gaussian_noise_differs_across_seeds_and_names() -> None:
    cpu = torch.device("cpu")
    a = gaussian_noise("w", torch.Size([64]), 5, 1.0, cpu)
    assert not torch.allclose(a, gaussian_noise("w", torch.Size([64]), 6, 1.0, cpu))
    assert not torch.allclose(a, gaussian_noise("v", torch.Size([64]), 5, 1.0, cpu))
    # sigma only scales the same draws
    torch.testing.assert_close(gaussian_noise("w", torch.Size([64]), 5, 0.5, cpu), 0.5 * a)

"""CycleQD's operators: crossover weights, mutations and final aggregation.

Random draws that shape a genome (merge weights, mutation seeds) use numpy Generators owned
by the engine. Random draws inside a tensor (SVD scale factors, Gaussian noise) come from a
torch Generator seeded by (mutation seed, tensor name), so any process can rebuild the same
weights from the recipe alone, tensor by tensor, in any order.

torch is imported by the tensor operators only: breeding (crossover weights) runs without it.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


def crossover_weights(
    rng: np.random.Generator, n_parents: int, mu: float, sigma: float
) -> np.ndarray:
    """w_i ~ N(1 + mu, |sigma|), normalised by their sum (model-wise linear merge)."""
    raw = rng.normal(1.0 + mu, abs(sigma), size=n_parents)
    total = raw.sum()
    if not np.isfinite(total) or abs(total) < 1e-12:
        raise ValueError(f"merge weights {raw} sum to {total}; lower crossover.sigma")
    return raw / total


def aggregation_weights(qualities: np.ndarray) -> np.ndarray:
    """beta = softmax(f): the final model is theta_base + sum_k beta_k tau_k."""
    shifted = np.exp(qualities - np.max(qualities))
    return shifted / shifted.sum()


def tensor_generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator that depends only on the seed and the tensor's name."""
    import torch

    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def is_svd_target(name: str, tensor: torch.Tensor) -> bool:
    """SVD mutations touch matrices only; 1-D weights and normalisation layers pass through."""
    return tensor.ndim == 2 and "norm" not in name


def uniform_factors(seed: int, name: str, rank: int, high: float) -> torch.Tensor:
    """r ~ U[0, high) per singular value, regenerable from (seed, name)."""
    import torch

    return torch.rand(rank, generator=tensor_generator(seed, name), dtype=torch.float32) * high


def svd_rescale(task_vector: torch.Tensor, name: str, seed: int, w_max: float) -> torch.Tensor:
    """The paper's SVD mutation of one tensor of the child's own task vector:
    U diag(r * S) V^T with r ~ U[0, w_max]; non-matrices are returned unchanged."""
    if not is_svd_target(name, task_vector):
        return task_vector
    import torch

    u, s, vh = torch.linalg.svd(task_vector.float(), full_matrices=False)
    r = uniform_factors(seed, name, s.numel(), w_max).to(s.device)
    return (u * (s * r)) @ vh


def gaussian_noise(
    name: str, shape: torch.Size, seed: int, sigma: float, device: torch.device
) -> torch.Tensor:
    import torch

    noise = torch.randn(tuple(shape), generator=tensor_generator(seed, name), dtype=torch.float32)
    return (noise * sigma).to(device)

"""Turn a genome into weights, one tensor at a time.

Peak memory stays near one output tensor plus the inputs of that tensor (the base's and the
experts' slices), whatever the model size: nothing here holds a whole state dict. The
consumer decides where each tensor goes (a model in memory, a streamed safetensors file).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from cycleqd.errors import GenomeError, NonFiniteWeightsError
from cycleqd.genome import GenomeBook, LinearForm
from cycleqd.operators import gaussian_noise, is_svd_target, svd_rescale, uniform_factors
from cycleqd.weights import FACTORS_FILE, SafetensorsFolder, TensorSpec

# genome id -> stored weights of that genome, or None when it must be built from its recipe.
WeightsResolver = Callable[[str], SafetensorsFolder | None]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Materializer:
    """Builds genomes' tensors from the base, the experts and stored elites.

    The SVD factors of the experts' task vectors (for the official code's mutation) are
    computed once per tensor and kept for the life of this object: one per evaluation pod.
    """

    def __init__(
        self,
        book: GenomeBook,
        resolve: WeightsResolver,
        dtype: str = "float32",
        device: str | torch.device = "cpu",
        factor_cache_bytes: int = 8 << 30,
    ):
        self.book = book
        self.resolve = resolve
        self.dtype = _DTYPES[dtype]
        self.device = torch.device(device)
        self.base_id = book.base_id()
        base = resolve(self.base_id)
        if base is None:
            raise GenomeError("the base genome has no weights to read")
        self.base = base
        # LRU of expert SVD factors, bounded: full-rank factors of one expert take ~1.3x the
        # model in float32, so an unbounded cache would hold several models per pod.
        self._factors: OrderedDict[tuple[str, str], tuple[torch.Tensor, ...]] = OrderedDict()
        self._factor_bytes = 0
        self._factor_files: dict[str, object] = {}
        self.factor_cache_bytes = factor_cache_bytes

    def specs(self) -> dict[str, TensorSpec]:
        """Names and shapes of every output tensor, in the output dtype."""
        return {
            name: TensorSpec(spec.shape, self.dtype if spec.dtype.is_floating_point else spec.dtype)
            for name, spec in self.base.specs().items()
        }

    def tensors(self, genome_id: str) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, tensor) for every tensor of the genome, checked finite."""
        for name in self.base.names():
            tensor = self.tensor(genome_id, name)
            if tensor.is_floating_point():
                # A sum is finite iff every element is (barring overflow, re-checked exactly);
                # it avoids a full boolean tensor per weight.
                if not torch.isfinite(tensor.sum()) and not torch.isfinite(tensor).all():
                    raise NonFiniteWeightsError(
                        f"genome {genome_id}: tensor {name!r} holds NaN or Inf; the model is "
                        "rejected and will not be archived"
                    )
                tensor = tensor.to(self.dtype)
            yield name, tensor

    def tensor(self, genome_id: str, name: str) -> torch.Tensor:
        return self._tensor(genome_id, name, {})

    # -- internals ---------------------------------------------------------------------------

    def _read(
        self, genome_id: str, name: str, memo: dict[str, torch.Tensor]
    ) -> torch.Tensor | None:
        if genome_id in memo:
            return memo[genome_id]
        source = self.resolve(genome_id)
        if source is None:
            return None
        tensor = source.get(name).to(self.device)
        if tensor.is_floating_point():
            tensor = tensor.float()
        memo[genome_id] = tensor
        return tensor

    def _tensor(self, genome_id: str, name: str, memo: dict[str, torch.Tensor]) -> torch.Tensor:
        stored = self._read(genome_id, name, memo)
        if stored is not None:
            return stored
        base = self._read(self.base_id, name, memo)
        if not base.is_floating_point():
            return base
        form = self.book.linear_form(genome_id)
        if form is not None:
            out = self._from_linear_form(form, name, base, memo)
        else:
            out = self._from_parents(genome_id, name, base, memo)
        memo[genome_id] = out
        return out

    def _from_parents(
        self, genome_id: str, name: str, base: torch.Tensor, memo: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        genome = self.book[genome_id]
        if genome.kind in ("base", "expert"):
            raise GenomeError(f"{genome.kind} genome {genome_id} has no readable weights")
        task_vector = torch.zeros_like(base)
        for parent, weight in zip(genome.parents, genome.weights, strict=True):
            task_vector.add_(self._tensor(parent, name, memo) - base, alpha=weight)
        mutation = genome.mutation
        if mutation is None or mutation.kind == "none":
            pass
        elif mutation.kind == "svd":
            task_vector = svd_rescale(task_vector, name, mutation.seed, mutation.scale)
        elif mutation.kind == "svd_expert":
            expert_form = LinearForm(
                svd_terms=[(mutation.expert, mutation.seed, mutation.scale, 1.0)]
            )
            self._add_expert_svd_terms(task_vector, expert_form, name, memo)
        elif mutation.kind == "gaussian":
            task_vector += gaussian_noise(
                name, base.shape, mutation.seed, mutation.scale, self.device
            )
        return base + task_vector

    def _from_linear_form(
        self, form: LinearForm, name: str, base: torch.Tensor, memo: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        # In place, with one scratch tensor: peak stays at ~3 copies of the largest tensor.
        out = base.clone()
        scratch = torch.empty_like(base)
        for expert in sorted(form.coeffs):
            torch.sub(self._read(expert, name, memo), base, out=scratch)
            out.add_(scratch, alpha=form.coeffs[expert])
        if form.svd_terms:
            self._add_expert_svd_terms(out, form, name, memo)
        for seed, sigma, coeff in form.noise_terms:
            out.add_(gaussian_noise(name, base.shape, seed, sigma, self.device), alpha=coeff)
        return out

    def _add_expert_svd_terms(
        self, out: torch.Tensor, form: LinearForm, name: str, memo: dict[str, torch.Tensor]
    ) -> None:
        """out += sum_j c_j U_e diag(r_j * S_e) V_e^T, grouped by expert: one matmul each."""
        if not is_svd_target(name, out):
            return
        rank = min(out.shape)
        scales: dict[str, torch.Tensor] = {}
        for expert, seed, rate, coeff in form.svd_terms:
            r = coeff * uniform_factors(seed, name, rank, rate)
            scales[expert] = scales[expert] + r if expert in scales else r
        for expert in sorted(scales):
            factors = self._expert_factors(expert, name, memo)
            if factors is None:
                continue  # the expert left this weight unchanged: its task vector is zero
            u, s, vh = factors
            # Stored factors may have rank k < min(shape) (LoRA); the first k draws are the
            # same as in the full-rank case, so both paths build the same mutation.
            out.addmm_(u * (s * scales[expert][: s.numel()].to(s.device)), vh)

    def _stored_factors(self, expert: str):
        """The expert's task-vector factors written at fine-tuning time, if any
        (`task_vector/factors.safetensors` beside its weights), opened once."""
        if expert not in self._factor_files:
            handle = None
            folder = getattr(self.resolve(expert), "folder", None)
            path = Path(str(folder)) / FACTORS_FILE if folder is not None else None
            if path is not None and path.is_file():
                opened = safe_open(str(path), framework="pt", device="cpu")
                handle = (opened, set(opened.keys()))
            self._factor_files[expert] = handle
        return self._factor_files[expert]

    def _expert_factors(
        self, expert: str, name: str, memo: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, ...] | None:
        stored = self._stored_factors(expert)
        if stored is not None:
            handle, keys = stored
            if f"{name}.U" not in keys:
                return None
            return tuple(
                handle.get_tensor(f"{name}.{part}").to(self.device) for part in ("U", "S", "Vh")
            )
        key = (expert, name)
        if key in self._factors:
            self._factors.move_to_end(key)
            return self._factors[key]
        base = self._read(self.base_id, name, memo)
        factors = torch.linalg.svd(self._read(expert, name, memo) - base, full_matrices=False)
        size = sum(t.numel() * t.element_size() for t in factors)
        while self._factors and self._factor_bytes + size > self.factor_cache_bytes:
            _, evicted = self._factors.popitem(last=False)
            self._factor_bytes -= sum(t.numel() * t.element_size() for t in evicted)
        if size <= self.factor_cache_bytes:
            self._factors[key] = factors
            self._factor_bytes += size
        return factors

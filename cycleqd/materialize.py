"""Turn a genome into weights, one tensor at a time.

Peak memory stays near one output tensor plus the inputs of that tensor (the base's and the
experts' slices), whatever the model size: nothing here holds a whole state dict. The
consumer decides where each tensor goes (a model in memory, a streamed safetensors file).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open

from cycleqd import merge_kernel
from cycleqd.errors import GenomeError, NonFiniteWeightsError
from cycleqd.genome import GenomeBook, LinearForm
from cycleqd.mutations import TensorContext
from cycleqd.operators import gaussian_noise, is_svd_target, uniform_factors
from cycleqd.weights import FACTORS_FILE, SafetensorsFolder, TensorSpec

# genome id -> stored weights of that genome, or None when it must be built from its recipe.
WeightsResolver = Callable[[str], SafetensorsFolder | None]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Elements per block of a merge on the CPU (rounded down to whole rows where SVD terms are
# added). A block's float32 base, result and scratch (3 MB) stay in cache, so each weight is
# read from memory once and written once instead of once per elementwise pass over whole
# tensors (~10 passes). benchmarks/bandwidth.py measured 2^16..2^20; 2^18 was fastest.
BLOCK_ELEMENTS = 1 << 18
# Models from this many weights merge through the fused kernel by default: it saves 1.7-3 s
# per 1B weights per child but costs ~0.8 s once per process (numba's import and cached code),
# which the 1.3M-weight tiny world (~0.04 s per child in torch) never earns back.
FUSED_MIN_ELEMENTS = 1 << 26
# Elements per block on a GPU: three float32 scratch blocks of 64 MB; launches are amortised.
DEVICE_BLOCK_ELEMENTS = 1 << 24

Sources = dict[str, "SafetensorsFolder | None"]


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
        fused: bool | None = None,
    ):
        """`fused`: merge with the fused CPU kernel (`merge_kernel`); None: when the model has
        at least FUSED_MIN_ELEMENTS weights (below that, loading the kernel, ~0.8 s per
        process, costs more than it saves). Both paths give the same bits."""
        self.book = book
        self.resolve = resolve
        self.dtype = _DTYPES[dtype]
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:  # comparable to tensors'
            self.device = torch.device("cuda", torch.cuda.current_device())
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
        self._fused = fused

    def specs(self) -> dict[str, TensorSpec]:
        """Names and shapes of every output tensor, in the output dtype."""
        return {
            name: TensorSpec(spec.shape, self.dtype if spec.dtype.is_floating_point else spec.dtype)
            for name, spec in self.base.specs().items()
        }

    def tensors(
        self, genome_id: str, into: Mapping[str, torch.Tensor] | None = None
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, tensor) for every tensor of the genome, in the output dtype, checked
        finite.

        `into` (a warm model's state dict, say): where it has a tensor of the same name,
        shape, dtype and device, contiguous, a compact genome's tensor is written straight
        into it and that tensor is yielded, so the consumer's `copy_` into its model is free
        and no output is allocated. A rejected (non-finite) genome leaves `into` half written.
        """
        sources: Sources = {}  # resolved once per model, not once per tensor (S3: a HEAD each)
        form = self.book.linear_form(genome_id)
        compact = form is not None and self._source(genome_id, sources) is None
        for name in self.base.names():
            if compact:
                # Cast and checked block by block, straight into the output dtype.
                out = into.get(name) if into is not None else None
                yield name, self._linear(form, name, sources, self.dtype, genome_id, out)
                continue
            tensor = self._tensor(genome_id, name, {}, sources)
            if tensor.is_floating_point():
                _check_finite(tensor, genome_id, name)
                tensor = tensor.to(self.dtype)
            yield name, tensor

    @property
    def fused(self) -> bool:
        """Whether CPU merges go through the fused kernel (decided once, see __init__)."""
        if self._fused is None:
            elements = sum(
                math.prod(spec.shape)
                for spec in self.base.specs().values()
                if spec.dtype.is_floating_point
            )
            self._fused = elements >= FUSED_MIN_ELEMENTS
        return self._fused and merge_kernel.available()

    def tensor(self, genome_id: str, name: str) -> torch.Tensor:
        """One tensor in float32 (integer tensors as stored), unchecked."""
        return self._tensor(genome_id, name, {}, {})

    # -- internals ---------------------------------------------------------------------------

    def _source(self, genome_id: str, sources: Sources) -> SafetensorsFolder | None:
        if genome_id not in sources:
            sources[genome_id] = self.resolve(genome_id)
        return sources[genome_id]

    def _read(
        self, genome_id: str, name: str, memo: dict[str, torch.Tensor], sources: Sources
    ) -> torch.Tensor | None:
        if genome_id in memo:
            return memo[genome_id]
        source = self._source(genome_id, sources)
        if source is None:
            return None
        tensor = source.get(name).to(self.device)
        if tensor.is_floating_point():
            tensor = tensor.float()
        memo[genome_id] = tensor
        return tensor

    def _tensor(
        self, genome_id: str, name: str, memo: dict[str, torch.Tensor], sources: Sources
    ) -> torch.Tensor:
        stored = self._read(genome_id, name, memo, sources)
        if stored is not None:
            return stored
        kind = self.book[genome_id].kind
        if kind in ("base", "expert"):
            raise GenomeError(f"{kind} genome {genome_id} has no readable weights")
        form = self.book.linear_form(genome_id)
        if form is not None:
            out = self._linear(form, name, sources, None, genome_id)
        else:
            base = self._read(self.base_id, name, memo, sources)
            if not base.is_floating_point():
                return base
            out = self._from_parents(genome_id, name, base, memo, sources)
        memo[genome_id] = out
        return out

    def _from_parents(
        self,
        genome_id: str,
        name: str,
        base: torch.Tensor,
        memo: dict[str, torch.Tensor],
        sources: Sources,
    ) -> torch.Tensor:
        genome = self.book[genome_id]
        task_vector = torch.zeros_like(base)
        for parent, weight in zip(genome.parents, genome.weights, strict=True):
            task_vector.add_(self._tensor(parent, name, memo, sources) - base, alpha=weight)
        mutation = genome.mutation
        if mutation is not None:

            def add_expert_svd(out: torch.Tensor, expert: str, seed: int, rate: float) -> None:
                form = LinearForm(svd_terms=[(expert, seed, rate, 1.0)])
                self._add_expert_svd_terms(out, form, name, sources)

            context = TensorContext(name, self.device, add_expert_svd)
            task_vector = mutation.method().apply(task_vector, mutation, context)
        return base + task_vector

    def _linear(
        self,
        form: LinearForm,
        name: str,
        sources: Sources,
        out_dtype: torch.dtype | None,
        genome_id: str,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """base + sum_e a_e (x_e - base) + sum_e U_e diag(b_e S_e) V_e^T (+ noise), in float32.

        Reads the sources' stored dtype straight from their memory maps, so each weight is read
        from memory once and written once. On the CPU the merge is one fused pass
        (`merge_kernel`), with the SVD terms added per block of rows; elsewhere (GPU, float16,
        no numba) torch ops go block by block. Both do the whole-tensor per-element arithmetic
        (x_e and base upcast exactly, subtract, fused scale-add, experts in sorted order), so
        they give the same bits. With `out_dtype` the result is checked finite and cast in the
        same pass, unless noise terms (drawn per whole tensor) follow; then into `out` when
        it fits (see `tensors`).
        """
        raw_base = self._source(self.base_id, sources).get(name)
        if not raw_base.is_floating_point():
            return raw_base.to(self.device)
        experts = sorted(form.coeffs)
        raws = [self._source(e, sources).get(name) for e in experts]
        on_cpu = self.device.type == "cpu"
        shape, numel = raw_base.shape, raw_base.numel()
        low_rank = self._scaled_svd_terms(form, name, raw_base, sources)
        cols = shape[1] if low_rank else 1
        # Whole rows, so that the SVD terms can be added per block. On a GPU the sources stay
        # in host memory and move a block at a time: whole tensors in float32 (3 scratch
        # copies of an 8B Llama's embedding: 6 GB) would not fit beside a warm engine.
        limit = BLOCK_ELEMENTS if on_cpu else DEVICE_BLOCK_ELEMENTS
        block = min(numel, max(cols, limit // cols * cols)) if numel else numel
        # Straight into the output dtype, unless noise terms (drawn per whole tensor) follow.
        final = out_dtype is not None and not form.noise_terms
        dtype = out_dtype if final else torch.float32
        writable = (
            out is not None
            and final
            and out.shape == shape
            and out.dtype == dtype
            and out.device == self.device
            and out.is_contiguous()
        )
        result = out if writable else torch.empty(shape, dtype=dtype, device=self.device)
        if numel:
            flat_base, flat_result = raw_base.reshape(-1), result.reshape(-1)
            flats = [r.reshape(-1) for r in raws]
            fused = (
                on_cpu
                and experts
                and len({r.dtype for r in raws}) == 1
                and merge_kernel.supports(raw_base.dtype, dtype, raws[0].dtype)
                and self.fused
            )
            merge = _merge_fused if fused else _merge_torch
            coeffs = [form.coeffs[e] for e in experts]
            if not merge(flat_base, flats, coeffs, low_rank, cols, block, flat_result, final):
                raise _non_finite(genome_id, name)
        if final:
            return result
        for seed, sigma, coeff in form.noise_terms:
            result.add_(gaussian_noise(name, shape, seed, sigma, self.device), alpha=coeff)
        if out_dtype is None:
            return result
        _check_finite(result, genome_id, name)
        return result.to(out_dtype)

    def _scaled_svd_terms(
        self, form: LinearForm, name: str, like: torch.Tensor, sources: Sources
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(U_e diag(b_e S_e), V_e^T) per expert with SVD terms, sorted by expert, where
        b_e = sum_j c_j r_j(seed_j): the SVD terms of this tensor are sum_e us_e @ vh_e."""
        if not form.svd_terms or not is_svd_target(name, like):
            return []
        rank = min(like.shape)
        scales: dict[str, torch.Tensor] = {}
        for expert, seed, rate, coeff in form.svd_terms:
            r = coeff * uniform_factors(seed, name, rank, rate)
            scales[expert] = scales[expert] + r if expert in scales else r
        terms = []
        for expert in sorted(scales):
            factors = self._expert_factors(expert, name, sources)
            if factors is None:
                continue  # the expert left this weight unchanged: its task vector is zero
            u, s, vh = factors
            # Stored factors may have rank k < min(shape) (LoRA); the first k draws are the
            # same as in the full-rank case, so both paths build the same mutation.
            terms.append((u * (s * scales[expert][: s.numel()].to(s.device)), vh))
        return terms

    def _add_expert_svd_terms(
        self, out: torch.Tensor, form: LinearForm, name: str, sources: Sources
    ) -> None:
        """out += sum_j c_j U_e diag(r_j * S_e) V_e^T, grouped by expert: one matmul each."""
        for us, vh in self._scaled_svd_terms(form, name, out, sources):
            out.addmm_(us, vh)

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
        self, expert: str, name: str, sources: Sources
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
        memo: dict[str, torch.Tensor] = {}
        base = self._read(self.base_id, name, memo, sources)
        task_vector = self._read(expert, name, memo, sources) - base
        factors = torch.linalg.svd(task_vector, full_matrices=False)
        size = sum(t.numel() * t.element_size() for t in factors)
        while self._factors and self._factor_bytes + size > self.factor_cache_bytes:
            _, evicted = self._factors.popitem(last=False)
            self._factor_bytes -= sum(t.numel() * t.element_size() for t in evicted)
        if size <= self.factor_cache_bytes:
            self._factors[key] = factors
            self._factor_bytes += size
        return factors


def _merge_fused(
    flat_base: torch.Tensor,
    flats: list[torch.Tensor],
    coeffs: list[float],
    low_rank: list[tuple[torch.Tensor, torch.Tensor]],
    cols: int,
    block: int,
    flat_result: torch.Tensor,
    final: bool,
) -> bool:
    """The merge in one fused pass (`merge_kernel`); SVD terms added per block of rows
    between the merge and the cast. Returns False when the result is not finite (checked
    only when `final`)."""
    if not low_rank:
        return merge_kernel.merge(flat_base, flats, coeffs, flat_result) or not final
    acc = torch.empty(block) if final else None
    for start in range(0, flat_base.numel(), block):
        stop = min(start + block, flat_base.numel())
        out = acc[: stop - start] if final else flat_result[start:stop]
        merge_kernel.merge(flat_base[start:stop], [f[start:stop] for f in flats], coeffs, out)
        rows = out.view(-1, cols)
        for us, vh in low_rank:
            rows.addmm_(us[start // cols : stop // cols], vh)
        if final and not merge_kernel.finish(out, flat_result[start:stop]):
            return False
    return True


def _merge_torch(
    flat_base: torch.Tensor,
    flats: list[torch.Tensor],
    coeffs: list[float],
    low_rank: list[tuple[torch.Tensor, torch.Tensor]],
    cols: int,
    block: int,
    flat_result: torch.Tensor,
    final: bool,
) -> bool:
    """The same merge with torch ops, block by block (GPU, float16, no numba): on a CPU a
    block's float32 inputs and result stay in cache across the ~8 elementwise passes; on a GPU
    each block of the sources (in host memory) is copied to the device as it is upcast."""
    numel = flat_base.numel()
    f32 = {"dtype": torch.float32, "device": flat_result.device}
    base32, scratch = torch.empty(block, **f32), torch.empty(block, **f32)
    acc = torch.empty(block, **f32) if final else None
    for start in range(0, numel, block):
        stop = min(start + block, numel)
        n = stop - start
        b, s = base32[:n], scratch[:n]
        o = acc[:n] if final else flat_result[start:stop]
        b.copy_(flat_base[start:stop])
        if not flats:
            o.copy_(b)
        for i, (flat, coeff) in enumerate(zip(flats, coeffs, strict=True)):
            if flat.dtype == torch.float32 and flat.device == b.device:
                torch.sub(flat[start:stop], b, out=s)
            else:  # upcast (and move), then subtract: a mixed-dtype sub is ~2x slower
                s.copy_(flat[start:stop])
                s.sub_(b)
            # o = b + a*s for the first expert: what copying b into o, then adding, gives
            if i == 0:
                torch.add(b, s, alpha=coeff, out=o)
            else:
                o.add_(s, alpha=coeff)
        if low_rank:
            rows = o.view(n // cols, cols)
            for us, vh in low_rank:
                rows.addmm_(us[start // cols : stop // cols], vh)
        if final:
            flat_result[start:stop].copy_(o)
            # Checked after the cast: a float32 above bfloat16's largest value rounds to Inf.
            if not _is_finite(flat_result[start:stop]):
                return False
    return True


def _is_finite(tensor: torch.Tensor) -> bool:
    # A sum is finite iff every element is (barring overflow, re-checked exactly); it avoids
    # a full boolean tensor per weight.
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


def _non_finite(genome_id: str, name: str) -> NonFiniteWeightsError:
    return NonFiniteWeightsError(
        f"genome {genome_id}: tensor {name!r} holds NaN or Inf; the model is rejected and "
        "will not be archived"
    )


def _check_finite(tensor: torch.Tensor, genome_id: str, name: str) -> None:
    if not _is_finite(tensor):
        raise _non_finite(genome_id, name)

"""One fused CPU pass for the linear merge: out = base + sum_e a_e (x_e - base), cast and checked.

Torch runs that merge as ~8 elementwise kernels (upcast, subtract, scale-add per expert, a sum
for the finiteness check, the downcast), each a pass over the data: on a CPU the merge becomes
compute-bound at a tenth of memory bandwidth. This kernel reads each input element once and
writes each output element once, everything in registers between.

It does the float32 arithmetic of `torch.add(b, x - b, alpha=a)` on a vectorising CPU, so
the results are bit-identical to the torch path: the exact upcast of bfloat16 (a 16-bit
shift), one rounded subtraction, one fused multiply-add per expert in the given order, then
round-to-nearest-even to bfloat16. Tensors are handed over as their bit patterns (bfloat16 as
uint16, float32 as uint32), which lets one body serve both dtypes.

numba compiles it on first use (cached on disk; ~1 s once per machine). Without numba, or with
CYCLEQD_FUSED_MERGE=0, `available()` is False and callers keep their torch path.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

_EXPONENT = 0x7F800000  # all ones: Inf or NaN
PARALLEL_MIN_ELEMENTS = 1 << 18  # per thread: below that, handing work over costs more
# torch dtype -> left shift that widens its bit pattern to float32's
_SHIFT = {"torch.bfloat16": 16, "torch.float32": 0}
_kernels: object = None  # compiled lazily: numba costs ~0.3 s to import, ~1 s to compile


def available() -> bool:
    """Whether the fused kernel can run here (numba importable and not disabled)."""
    return _load() is not None


def supports(*dtypes: torch.dtype) -> bool:
    """Whether tensors of these dtypes can go through the kernel (bfloat16 and float32)."""
    return all(str(d) in _SHIFT for d in dtypes)


def merge(
    base: torch.Tensor, experts: list[torch.Tensor], coeffs: list[float], out: torch.Tensor
) -> bool:
    """out = base + sum_e coeffs[e] * (experts[e] - base) over flat contiguous CPU tensors of
    one element count (base and experts: one dtype each; bfloat16 or float32 everywhere).
    Returns False when an element of the result is NaN or Inf (out must then be discarded)."""
    import numpy as np

    shifts = {_SHIFT[str(x.dtype)] for x in experts}
    if len(shifts) != 1:
        raise ValueError("the fused merge needs at least one expert, all of one dtype")
    with np.errstate(over="ignore"):  # a coefficient beyond float32 is Inf: reported below
        weights = np.asarray(coeffs, dtype=np.float32)
    kernel, shift, expert_shift = _load().merge, _SHIFT[str(base.dtype)], shifts.pop()
    sources, bits_out = [_bits(base), *(_bits(x) for x in experts)], _bits(out)

    def part(start: int, stop: int) -> bool:
        first, *rest = (a[start:stop] for a in sources)
        return kernel(
            first, shift, tuple(rest), expert_shift, weights, bits_out[start:stop], out.itemsize
        )

    return _in_parts(part, base.numel())


def _in_parts(part, numel: int) -> bool:
    """part(start, stop) over [0, numel), split across torch's intra-op thread count (the
    kernel releases the GIL; one core's loads do not saturate a server's memory); True when
    every part is."""
    import torch

    threads = min(torch.get_num_threads(), numel // PARALLEL_MIN_ELEMENTS)
    if threads <= 1:
        return part(0, numel)
    bounds = [numel * i // threads for i in range(threads + 1)]
    pool = _pool(threads - 1)
    others = [pool.submit(part, a, b) for a, b in itertools.pairwise(bounds[1:])]
    mine = part(bounds[0], bounds[1])
    return all([mine, *(f.result() for f in others)])


@functools.cache
def _pool_of(workers: int, pid: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(workers, thread_name_prefix="merge")


def _pool(workers: int) -> ThreadPoolExecutor:
    """A pool kept for the process (starting threads per tensor would cost more than small
    tensors' merges); one per size, in case torch's thread count changes, and per process: a
    forked child inherits the pool but not its threads."""
    return _pool_of(workers, os.getpid())


def finish(acc: torch.Tensor, out: torch.Tensor) -> bool:
    """out = acc (flat float32) in out's dtype, rounded to nearest even; False when an element
    is NaN or Inf."""
    kernel, bits_acc, bits_out = _load().finish, _bits(acc), _bits(out)
    return _in_parts(lambda a, b: kernel(bits_acc[a:b], bits_out[a:b], out.itemsize), acc.numel())


def _bits(tensor: torch.Tensor):
    """The tensor's bit patterns as a numpy array sharing its memory (no copy)."""
    import torch

    if not (tensor.device.type == "cpu" and tensor.is_contiguous()):
        raise ValueError("the fused merge takes contiguous CPU tensors")
    signed = {2: torch.int16, 4: torch.int32}[tensor.element_size()]
    return tensor.view(signed).numpy().view({2: "uint16", 4: "uint32"}[tensor.element_size()])


def _load():
    global _kernels
    if _kernels is None:
        _kernels = False
        if os.environ.get("CYCLEQD_FUSED_MERGE", "1") != "0":
            with contextlib.suppress(ImportError):  # numba not installed: torch path
                try:
                    _kernels = _compile(cache=True)
                except RuntimeError:  # nowhere writable to cache the compiled code
                    _kernels = _compile(cache=False)
    return _kernels or None


def _compile(cache: bool):
    import numba
    import numpy as np
    from llvmlite import ir
    from numba import types
    from numba.extending import intrinsic

    # numba has no scalar bit casts nor an explicit fma: two one-instruction intrinsics.
    @intrinsic
    def as_float(typingctx, bits):
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], ir.FloatType())

        return types.float32(types.uint32), codegen

    @intrinsic
    def as_bits(typingctx, value):
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], ir.IntType(32))

        return types.uint32(types.float32), codegen

    @intrinsic
    def fma(typingctx, a, b, c):
        def codegen(context, builder, signature, args):
            return builder.fma(*args)

        return types.float32(types.float32, types.float32, types.float32), codegen

    jit = numba.njit(cache=cache, nogil=True, boundscheck=False, error_model="numpy")
    exponent = np.uint32(_EXPONENT)
    bf16_exponent = np.uint32(_EXPONENT >> 16)
    half = np.uint32(0x7FFF)
    one = np.uint32(1)

    @jit
    def store(u, out, i, out_size):
        """Write float32 bits u at out[i] (bfloat16: round to nearest even); 1 if what was
        written is not finite (a float32 above bfloat16's largest value rounds to Inf)."""
        if out_size == 2:
            rounded = (u + half + ((u >> 16) & one)) >> 16
            out[i] = rounded
            return np.uint32((rounded & bf16_exponent) == bf16_exponent)
        out[i] = u
        return np.uint32((u & exponent) == exponent)

    @jit
    def merge_kernel(base, shift, experts, experts_shift, coeffs, out, out_size):
        bad = np.uint32(0)
        for i in range(base.shape[0]):
            b = as_float(np.uint32(base[i]) << shift)
            acc = b
            for e in range(len(experts)):
                x = as_float(np.uint32(experts[e][i]) << experts_shift)
                acc = fma(coeffs[e], x - b, acc)
            bad |= store(as_bits(acc), out, i, out_size)
        return bad == 0

    @jit
    def finish_kernel(acc, out, out_size):
        bad = np.uint32(0)
        for i in range(acc.shape[0]):
            bad |= store(acc[i], out, i, out_size)
        return bad == 0

    class Kernels:
        merge = staticmethod(merge_kernel)
        finish = staticmethod(finish_kernel)

    return Kernels

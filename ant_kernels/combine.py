"""out = w @ J: the weighted sum of the per-cluster gradients, written in place.

Maths: out[p] = sum_i w[i] J[i, p], accumulated in float32 and cast to out's dtype once.

Tiling: the grid runs over P in blocks of BLOCK_P columns. A program keeps a [BLOCK_P] float32
accumulator and adds the k rows one after the other (the row loop is unrolled, k being a
constexpr, so all k loads can be in flight); each w[i] is one scalar load. Every column is read
and written by the same program, and all of its loads come before its store, so ``out`` may
be one of J's rows (e.g. the flat buffer the parameters' ``.grad`` tensors alias).

Two launches when P % 16 != 0: one over the first P - P % 16 columns, whose bound Triton then
knows to be a multiple of 16 (vector loads; ``_dispatch.column_parts``), one over the rest.

Determinism: no reduction crosses programs and the row order is fixed, so the result is
bit-identical between runs. It is bit-identical to the sequential float32 loop
``acc = 0; acc = acc + w[i] * J[i]`` for i = 0..k-1 (each product and each sum rounded), on
the GPU as under the interpreter: the launch sets ``enable_fp_fusion=False``, since the
compiler would otherwise contract each multiply-add into one FMA (one rounding, other bits).
The reference ``combine_ref`` is a BLAS product, free to order and contract its sums: it
agrees to float32 rounding, not bit for bit. A bf16 ``out`` is the float32 sum rounded to
nearest even on a GPU; Triton 3.8's interpreter truncates bf16 stores (1 ulp off in about half
the values), so the CPU tests allow one bf16 ulp there.
"""

from __future__ import annotations

import torch

from ._dispatch import column_parts, interpreted, interpreting, jit, on_device, use_triton
from .reference import check_combine, combine_ref

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference serves everything then
    triton = tl = None

__all__ = ["combine"]


@jit
def _combine_kernel(
    p_w,
    p_J,
    p_out,
    P,
    s_w,
    s_k,
    s_p,
    s_o,
    K: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    i_p = tl.program_id(0)
    o_p = i_p.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    m_p = o_p < P
    # [BLOCK_P]
    b_acc = tl.zeros([BLOCK_P], dtype=tl.float32)
    p_row = p_J + o_p * s_p
    for i_k in tl.static_range(K):
        b_w = tl.load(p_w + i_k * s_w).to(tl.float32)
        # [BLOCK_P]
        b_j = tl.load(p_row, mask=m_p, other=0.0)
        b_acc += b_w * b_j.to(tl.float32)
        p_row += s_k  # pointer steps are 64-bit: no overflow when k * P > 2**31
    tl.store(p_out + o_p * s_o, b_acc.to(p_out.dtype.element_ty), mask=m_p)


def _config(k: int, interp: bool | None = None) -> tuple[int, int]:
    """(BLOCK_P, num_warps): fixed, no autotune (also under the interpreter).

    All k row loads of a block are in flight at once, k * BLOCK_P / 128 values per thread, so
    the block shrinks as k grows: sm_90 builds of these configurations keep every value in
    registers (no local-memory spills; ``python -m ant_kernels.aot``).
    """
    if interpreting() if interp is None else interp:
        return 32768, 4  # few, large blocks: the interpreter's cost is per program
    return (2048 if k <= 8 else 512 if k <= 16 else 256 if k <= 32 else 128), 4


def _plan(
    J: torch.Tensor, block_p: int | None = None, interp: bool | None = None
) -> tuple[int, dict]:
    """(number of programs, constexpr and launch options) for J [k, P]."""
    k, P = J.shape
    bp, warps = _config(k, interp)
    bp = block_p or bp
    # no FMA contraction: the same bits as the sequential loop (module docstring)
    return -(-P // bp), {"K": k, "BLOCK_P": bp, "num_warps": warps, "enable_fp_fusion": False}


def _args(w: torch.Tensor, J: torch.Tensor, out: torch.Tensor) -> tuple:
    """The kernel's runtime arguments, in order (shared with ``ant_kernels.aot``)."""
    return w, J, out, J.shape[1], w.stride(0), J.stride(0), J.stride(1), out.stride(0)


def combine_triton(
    w: torch.Tensor, J: torch.Tensor, out: torch.Tensor, block_p: int | None = None
) -> torch.Tensor:
    """Launch the Triton kernel (no dispatch). ``block_p`` overrides the tiling."""
    with on_device(J):
        for cols in column_parts(J.shape[1]):
            nprog, meta = _plan(J[:, cols], block_p, interpreted(J))
            _combine_kernel[(nprog,)](*_args(w, J[:, cols], out[cols]), **meta)
    return out


def combine(w: torch.Tensor, J: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted sum of the cluster gradients, ``out = w @ J``.

    Args:
        w: [k] weights (float32; other float dtypes are read and cast to float32).
        J: [k, P] float32/bf16/fp16, any strides.
        out: [P] any float dtype, any non-zero stride (an expanded tensor is refused); may be one
            of J's rows. None: a new float32
            tensor (float64 for a float64 J, which the reference serves; with
            ANT_KERNELS_BACKEND=triton it is refused).

    Returns:
        ``out``, holding w @ J accumulated in float32. No host sync.
    """
    check_combine(w, J, out)
    if use_triton("combine", J, w, *(() if out is None else (out,)), k=J.shape[0]):
        if out is None:
            out = torch.empty(J.shape[1], dtype=torch.float32, device=J.device)
        return combine_triton(w, J, out)
    return combine_ref(w, J, out)

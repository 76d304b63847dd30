"""G = J J^T for the per-cluster gradients J [k, P], in one pass over J.

Maths: G[i, j] = sum_p J[i, p] J[j, p], accumulated in float32 whatever J's dtype.

Tiling: the grid runs over P in spans of ``BLOCK_P * CHUNKS`` columns. A program loads its span
chunk by chunk as a [BK, BLOCK_P] tile (rows >= k and columns >= P masked to zero, so they
add nothing), and accumulates the partial Gram ``b b^T`` of each chunk into a [BK, BK] float32
register tile with ``tl.dot``. BK = next power of two >= max(k, 16), the smallest tile tl.dot
takes. float32 tiles use ``input_precision="ieee"`` (no TF32 rounding); bf16/fp16 tiles go to
tl.dot as they are on a GPU (their products are exact in float32 and the accumulator is float32)
and are cast to float32 first under the interpreter, which has no half-precision dot.

Determinism: each program writes its partial Gram to its own slot of a [nblocks, k, k]
workspace; a fixed-order ``torch.sum`` over the blocks then gives G. No atomics, so the same J
gives bit-identical G on every run. G is symmetrised at the end, so it is exactly symmetric.

Finiteness: a NaN or inf in row i of J makes G[i, i] (a sum of squares) NaN or inf, so
``finite = all(isfinite(diag(G)))`` needs no extra work in the kernel. It is also False when a
row's squared norm overflows float32, in which case G is unusable as well.
"""

from __future__ import annotations

import torch

from ._dispatch import interpreting, jit, next_pow2, use_triton
from .reference import check_J, gram_ref

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference serves everything then
    triton = tl = None

__all__ = ["gram"]

_HALF = (torch.bfloat16, torch.float16)


@jit
def _gram_kernel(
    p_J,
    p_W,
    K,
    P,
    s_k,
    s_p,
    BK: tl.constexpr,
    BLOCK_P: tl.constexpr,
    CHUNKS: tl.constexpr,
    NATIVE_DOT: tl.constexpr,
):
    i_p = tl.program_id(0)
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    # 64-bit offsets: k * P passes 2**31 for large models
    o_start = i_p.to(tl.int64) * (BLOCK_P * CHUNKS)
    p_rows = p_J + o_k.to(tl.int64)[:, None] * s_k
    # [BK, BK]
    b_acc = tl.zeros([BK, BK], dtype=tl.float32)
    for i_c in range(CHUNKS):
        o_p = o_start + i_c * BLOCK_P + tl.arange(0, BLOCK_P)
        m_p = o_p < P
        # [BK, BLOCK_P]
        b_j = tl.load(p_rows + o_p[None, :] * s_p, mask=m_k[:, None] & m_p[None, :], other=0.0)
        if NATIVE_DOT:
            b_acc += tl.dot(b_j, tl.trans(b_j), out_dtype=tl.float32)
        else:
            b_f = b_j.to(tl.float32)
            b_acc += tl.dot(b_f, tl.trans(b_f), input_precision="ieee")
    p_W = p_W + i_p.to(tl.int64) * K * K + o_k[:, None] * K + o_k[None, :]
    tl.store(p_W, b_acc, mask=m_k[:, None] & m_k[None, :])


def _config(k: int) -> tuple[int, int, int, int]:
    """(BK, BLOCK_P, CHUNKS, num_warps): fixed, no autotune (also under the interpreter)."""
    bk = next_pow2(k, 16)
    if interpreting():
        # few, large blocks: the interpreter's cost is per program and per op
        return bk, 16384, 4, 4
    # sm_90 builds keep the [BK, BK] accumulator and the tile in registers, no spills, for
    # every dtype and P (``python -m ant_kernels.aot``): (BLOCK_P, num_warps) per BK
    block_p, warps = {16: (256, 8), 32: (256, 4), 64: (64, 8)}[bk]
    return bk, block_p, 16384 // block_p, warps


def _plan(
    J: torch.Tensor, block_p: int | None = None, chunks: int | None = None
) -> tuple[int, dict]:
    """(number of programs, constexpr and launch options) for J [k, P]."""
    k, P = J.shape
    bk, bp, ch, warps = _config(k)
    bp, ch = block_p or bp, chunks or ch
    native = J.dtype in _HALF and not interpreting()
    meta = {"BK": bk, "BLOCK_P": bp, "CHUNKS": ch, "NATIVE_DOT": native, "num_warps": warps}
    return -(-P // (bp * ch)), meta


def _args(J: torch.Tensor, work: torch.Tensor) -> tuple:
    """The kernel's runtime arguments, in order (shared with ``ant_kernels.aot``)."""
    return J, work, J.shape[0], J.shape[1], J.stride(0), J.stride(1)


def gram_triton(
    J: torch.Tensor, block_p: int | None = None, chunks: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the Triton kernel (no dispatch). ``block_p``/``chunks`` override the tiling."""
    nblocks, meta = _plan(J, block_p, chunks)
    k = J.shape[0]
    work = torch.empty((nblocks, k, k), dtype=torch.float32, device=J.device)
    _gram_kernel[(nblocks,)](*_args(J, work), **meta)
    G = work.sum(0)  # fixed-order reduction over the blocks
    G = (G + G.T) * 0.5
    return G, torch.isfinite(G.diagonal()).all()


def gram(J: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gram matrix of the per-cluster gradients, in one pass over J.

    Args:
        J: [k, P] float32/bf16/fp16 (any strides, e.g. a view into a larger buffer).

    Returns:
        G: [k, k] float32 = J J^T accumulated in float32, exactly symmetric, deterministic.
        finite: 0-d bool, False if J has a NaN/inf entry (or a squared row norm overflows
            float32). Both on J's device; no host sync.
    """
    check_J(J)
    if use_triton("gram", J, k=J.shape[0]):
        return gram_triton(J)
    return gram_ref(J)

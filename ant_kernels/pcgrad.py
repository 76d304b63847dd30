"""PCGrad in Gram space: the weights w [k] with ``w @ J = sum_i g_i'``.

Maths: g_i' = sum_m C[i, m] g_m with C = I at the start. For t = 0..k-1 and j = orders[i, t]
(a permutation of all clusters, i itself included):
``d = g_i' . g_j = C[i] . G[:, j]``; if d < 0 and G[j, j] != 0, ``C[i, j] -= d / G[j, j]``.
Projections are always against the ORIGINAL g_j, so G is all that is needed, and
w = C.sum(0).

Tiling: a single program holding C as a [BK, BK] register tile. Rows are independent, so
step t advances all of them at once: j_i = orders[i, t] is loaded as a [BK] vector, the
columns G[:, j_i] and G[j_i, j_i] are gathered from memory (registers cannot be indexed by
data), d = rowwise sum of C * those columns, and C[i, j_i] -= d_i / G[j_i, j_i] is a masked
subtraction. k steps of O(BK^2) work: microseconds.

Determinism: one program, fixed loop order; the task order is an explicit input, so the kernel
and the reference make the same choices. The division is correctly rounded (``div_rn``) in
float32 as in float64, like the reference's; the sums d may still differ from the reference's
in the last bits (another summation order).
"""

from __future__ import annotations

import torch

from ._dispatch import jit, next_pow2, on_device, use_triton
from .reference import check_G, check_orders, pcgrad_weights_ref

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference serves everything then
    triton = tl = None

__all__ = ["pcgrad_weights"]


@jit
def _pcgrad_kernel(p_G, p_O, p_w, K, s_g0, s_g1, s_o0, s_o1, BK: tl.constexpr):
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    # [BK, BK] C, starting as the identity: row i holds g_i' in the basis of the g's
    b_C = tl.where(o_k[:, None] == o_k[None, :], 1.0, 0.0).to(p_G.dtype.element_ty)
    for t in range(K):
        # [BK] j_i = orders[i, t]; an entry outside range(k) reads zeros and is skipped
        # (the range test on the stored integer: an int64 2**32 + 1 cast first would wrap to 1)
        b_o = tl.load(p_O + o_k * s_o0 + t * s_o1, mask=m_k, other=-1)
        m_j = (b_o >= 0) & (b_o < K)
        b_j = tl.where(m_j, b_o, 0).to(tl.int32)
        # [BK, BK] row i holds column j_i of the original G
        b_g = tl.load(
            p_G + o_k[None, :] * s_g0 + b_j[:, None] * s_g1,
            mask=m_j[:, None] & m_k[None, :],
            other=0.0,
        )
        # [BK]
        b_gjj = tl.load(p_G + b_j * (s_g0 + s_g1), mask=m_j, other=0.0)
        b_d = tl.sum(b_C * b_g, axis=1)
        hit = (b_d < 0) & (b_gjj != 0)
        b_den = tl.where(b_gjj != 0, b_gjj, 1.0)
        if p_G.dtype.element_ty == tl.float64:  # fp64 `/` is correctly rounded already
            b_q = b_d / b_den
        else:  # Triton's fp32 `/` is approximate (div.full.f32): round it as torch does
            b_q = tl.math.div_rn(b_d, b_den)
        b_coef = tl.where(hit, b_q, 0.0)
        b_C = b_C - tl.where(o_k[None, :] == b_j[:, None], b_coef[:, None], 0.0)
    # NaN exactly when G has a NaN or inf entry (a NaN d fails d < 0: finite weights otherwise)
    b_G = tl.load(p_G + o_k[:, None] * s_g0 + o_k[None, :] * s_g1,
                  mask=m_k[:, None] & m_k[None, :], other=0.0)  # fmt: skip
    bad = tl.sum(tl.sum(b_G * 0.0, axis=1), axis=0)
    tl.store(p_w + o_k, tl.sum(b_C, axis=0) + bad, mask=m_k)


def _args(G: torch.Tensor, orders: torch.Tensor, w: torch.Tensor) -> tuple:
    """The kernel's runtime arguments, in order (shared with ``ant_kernels.aot``)."""
    k = G.shape[0]
    return G, orders, w, k, G.stride(0), G.stride(1), orders.stride(0), orders.stride(1)


def pcgrad_triton(G: torch.Tensor, orders: torch.Tensor) -> torch.Tensor:
    """Launch the Triton kernel (no dispatch)."""
    bk, warps = _config(G.shape[0])
    w = torch.empty(G.shape[0], dtype=G.dtype, device=G.device)
    with on_device(G):
        _pcgrad_kernel[(1,)](*_args(G, orders, w), BK=bk, num_warps=warps)
    return w


def _config(k: int) -> tuple[int, int]:
    """(BK, num_warps): one program; one warp up to BK = 32, eight for BK = 64 (one warp spills
    the [64, 64] tiles to local memory on sm_90; ``python -m ant_kernels.aot``)."""
    bk = next_pow2(k, 2)
    return bk, 8 if bk >= 64 else 1


def pcgrad_weights(G: torch.Tensor, orders: torch.Tensor) -> torch.Tensor:
    """PCGrad combination weights from the Gram matrix.

    Args:
        G: [k, k] Gram matrix of the cluster gradients, float32 or float64.
        orders: [k, k] int64 or int32; row i is the order in which g_i is projected against the
            clusters (a permutation of range(k), i included). Not validated, as that needs a
            host sync; the kernel skips an entry outside range(k) rather than read out of
            bounds, the reference raises an indexing error.

    Returns:
        w: [k] in G's dtype with ``w @ J = sum_i g_i'``; NaN everywhere if G has a NaN or inf
        entry. No host sync.
    """
    check_G(G)
    check_orders(G, orders)
    if use_triton("pcgrad", G, orders, k=G.shape[0]):
        return pcgrad_triton(G, orders)
    return pcgrad_weights_ref(G, orders)

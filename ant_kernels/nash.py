"""Nash-MTL weights: alpha > 0 with alpha * (G alpha) = 1, by damped Newton in float64.

Maths: alpha is the unique minimiser of the self-concordant f(a) = 0.5 a^T G a - sum log a_i
(G = J J^T divided by its Frobenius norm; without ``normalize`` the result is divided by
sqrt(||G||_F), the weights of G itself). Gradient g = G a - 1/a,
Hessian H = G + diag(1/a^2), step x = H^{-1} g, Newton decrement lambda = sqrt(g . x).
a <- a - x / (1 + lambda) while lambda >= 1/4 (stays inside a > 0, decreases f by a fixed
amount), a <- a - x after (quadratic convergence). Start: a_i = s / sqrt(G_ii) with the best
scale s along that ray, exact for orthogonal and for parallel gradients; from there the
worst case measured over random, badly scaled and nearly parallel (cosine 0.999+) G with
k <= 32 needs 9 steps for max|a (G a) - 1| < 1e-10, but gradients of mixed signs along a few
shared directions (k = 16-32, two factors) need up to 39, hence the fixed default of 40.

Degenerate input: clusters with G[i, i] <= 0 get an identity row and column and a_i = 1 in the
solve (zero gradient, zero step) and weight 0 on output. A non-finite G gives NaN weights, and
so does a solve that ends without a solution (some a_i <= 0 or max|a (G a) - 1| > NASH_TOL =
1e-6): one cluster's gradient nearly opposing the others' sum puts the solution far away (k = 8,
one row -(sum of the rest) + 1% noise: 40 steps), and a G that float32 rounding left slightly
indefinite may have none (a full Newton step went negative there). The engine keeps the last
weights for a step whose solve is NaN.

Tiling: a single program holds G as a [BK, BK] float64 register tile. Each Newton step solves
H x = g by Gauss-Jordan elimination without pivoting (H is symmetric positive definite), k
pivot steps in which row p and column p are pulled out of the tile with masked sums (registers
cannot be indexed by data). O(iters * k * BK^2) flops.

Determinism: one program, fixed iteration count, no data-dependent exit, no host sync.
"""

from __future__ import annotations

import torch

from ._dispatch import jit, next_pow2, on_device, use_triton
from .reference import NASH_TOL, check_G, nash_weights_ref

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference serves everything then
    triton = tl = None

__all__ = ["nash_weights"]


@jit
def _solve_spd(b_A, b_x, o_k, K, BK: tl.constexpr):
    """x = A^{-1} x for a symmetric positive definite [BK, BK] tile, by Gauss-Jordan."""
    for p in range(K):
        m_p = o_k == p
        # [BK] row p and column p of the partly reduced matrix
        b_row = tl.sum(tl.where(m_p[:, None], b_A, 0.0), axis=0)
        b_col = tl.sum(tl.where(m_p[None, :], b_A, 0.0), axis=1)
        piv = tl.sum(tl.where(m_p, b_row, 0.0), axis=0)
        x_p = tl.sum(tl.where(m_p, b_x, 0.0), axis=0)
        b_f = tl.where(m_p, 0.0, b_col / piv)
        b_A = b_A - b_f[:, None] * b_row[None, :]
        b_x = b_x - b_f * x_p
    b_diag = tl.sum(tl.where(o_k[:, None] == o_k[None, :], b_A, 0.0), axis=1)
    return b_x / b_diag


@jit
def _nash_kernel(
    p_G, p_a, K, ITERS, s_g0, s_g1, NORMALIZE: tl.constexpr, BK: tl.constexpr, TOL: tl.constexpr
):
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    m_eye = o_k[:, None] == o_k[None, :]
    # [BK, BK]
    b_G = tl.load(
        p_G + o_k[:, None] * s_g0 + o_k[None, :] * s_g1,
        mask=m_k[:, None] & m_k[None, :],
        other=0.0,
    ).to(tl.float64)
    # NaN exactly when G has a NaN or inf entry; added to the output at the end
    bad = tl.sum(tl.sum(b_G * 0.0, axis=1), axis=0)
    # solved on G / ||G||_F either way, the norm in two factors (max |G| and the norm of
    # G / max |G|, in [1, k]): no overflow or underflow at any scale
    big = tl.max(tl.max(tl.abs(b_G), axis=1), axis=0)
    big = tl.where(big > 0, big, 1.0)
    b_G = b_G / big
    rel = tl.sqrt(tl.sum(tl.sum(b_G * b_G, axis=1), axis=0))
    rel = tl.where(rel > 0, rel, 1.0)
    b_G = b_G / rel
    # [BK] diagonal; padding rows have 0 there and behave like inactive clusters
    b_d = tl.sum(tl.where(m_eye, b_G, 0.0), axis=1)
    m_act = b_d > 0
    b_Gt = tl.where(m_act[:, None] & m_act[None, :], b_G, tl.where(m_eye, 1.0, 0.0))
    b_u = tl.where(m_act, 1.0 / tl.sqrt(tl.where(m_act, b_d, 1.0)), 0.0)
    q = tl.sum(b_u * tl.sum(b_Gt * b_u[None, :], axis=1), axis=0)
    n = tl.sum(tl.where(m_act, 1.0, 0.0), axis=0)
    s = tl.sqrt(n / tl.where(q > 0, q, 1.0))
    b_a = tl.where(m_act, s * b_u, 1.0)
    for _ in range(ITERS):
        b_r = 1.0 / b_a
        b_g = tl.sum(b_Gt * b_a[None, :], axis=1) - b_r
        b_H = b_Gt + tl.where(m_eye, (b_r * b_r)[:, None], 0.0)
        b_x = _solve_spd(b_H, b_g, o_k, K, BK)
        lam = tl.sqrt(tl.maximum(tl.sum(b_g * b_x, axis=0), 0.0))
        step = tl.where(lam < 0.25, 1.0, 1.0 / (1.0 + lam))
        b_a = b_a - step * b_x
    # a solution or nothing (comparisons with NaN are False)
    b_res = tl.abs(b_a * tl.sum(b_Gt * b_a[None, :], axis=1) - 1.0)
    m_ok = ((b_res <= TOL) & (b_a > 0.0)) | ~m_act
    solved = tl.min(tl.where(m_ok, 1.0, 0.0), axis=0) > 0.5
    if not NORMALIZE:  # the weights of G itself: / sqrt(||G||_F)
        b_a = b_a / tl.sqrt(big) / tl.sqrt(rel)
    b_a = tl.where(solved, tl.where(m_act, b_a, 0.0), float("nan")) + bad
    tl.store(p_a + o_k, b_a, mask=m_k)


def _args(G: torch.Tensor, a: torch.Tensor, iters: int) -> tuple:
    """The kernel's runtime arguments, in order (shared with ``ant_kernels.aot``)."""
    return G, a, G.shape[0], iters, G.stride(0), G.stride(1)


def nash_triton(G: torch.Tensor, iters: int = 40, normalize: bool = True) -> torch.Tensor:
    """Launch the Triton kernel (no dispatch)."""
    bk, warps = _config(G.shape[0])
    a = torch.empty(G.shape[0], dtype=torch.float64, device=G.device)
    with on_device(G):
        _nash_kernel[(1,)](
            *_args(G, a, iters), NORMALIZE=normalize, BK=bk, TOL=NASH_TOL, num_warps=warps
        )
    return a


def _config(k: int) -> tuple[int, int]:
    """(BK, num_warps): one warp holds the [BK, BK] tiles in registers up to BK = 8; from
    BK = 16 they spill to local memory on sm_90 unless spread over 4 warps (``ant_kernels.aot``,
    with Triton 3.6 and 3.8: at BK = 16 one warp spilled fp32 tiles under 3.6, two warps fp64
    tiles under 3.8)."""
    bk = next_pow2(k, 2)
    return bk, 4 if bk >= 16 else 1


def nash_weights(G: torch.Tensor, iters: int = 40, normalize: bool = True) -> torch.Tensor:
    """Nash-MTL bargaining weights alpha > 0 with alpha * (G alpha) = 1.

    Args:
        G: [k, k] Gram matrix (float32 or float64). The Triton kernel takes k <= 32; larger
            k uses the reference under ``auto`` and raises under ``ANT_KERNELS_BACKEND=triton``.
        iters: fixed number of Newton steps (no early exit, no host sync); 40 covers every
            family measured (see the module docstring); a solve that ends without a solution
            is NaN.
        normalize: return the weights of G / ||G||_F; else those of G itself, the former
            divided by sqrt(||G||_F) (what ``antdiff.mtl.NashMTL`` uses, as Nash-MTL's authors
            do). Both are solved on G / ||G||_F (better conditioned, no overflow or underflow
            from subnormal entries to 1e308).

    Returns:
        alpha: [k] float64; 0 for clusters with G[i, i] <= 0; NaN everywhere if G is not finite
        or the fixed steps end without a solution (module docstring).
    """
    check_G(G)
    if not isinstance(iters, int) or isinstance(iters, bool) or iters < 0:
        raise ValueError(f"iters must be an int >= 0, got {iters!r}")
    if use_triton("nash", G, k=G.shape[0]):
        return nash_triton(G, iters, normalize)
    return nash_weights_ref(G, iters, normalize)

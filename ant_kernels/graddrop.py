"""GradDrop's update from J [k, P] in one pass, written in place: the fused form of the reference.

Maths (``ant_kernels.reference.graddrop_ref``): for column p, with g_i = J[i, p] over present
clusters (absent rows count as 0), purity P_p = 0.5 (1 + sum_i g_i / sum_i |g_i|), U_p = value p
of the counter-based stream ``uniform(seed, step)``, kept M_i = [P_p > U_p][g_i > 0] +
[P_p < U_p][g_i < 0], and out[p] = (sum_i (g_i if M_i else leak g_i)) / divisor, in float32.

Tiling: the grid runs over P in blocks of BLOCK_P columns (a multiple of 4: the 4 words of one
Philox counter are 4 adjacent columns). A program reads its k row segments twice (sums, then
the kept sum; the second read comes from L2), draws its U in registers (Philox4x32-10 on the
step counter loaded from device memory) and stores its columns once, after all its loads, so
``out`` may be one of J's rows. No temporaries in global memory: the only traffic is J and out.

Two launches when P % 16 != 0 (``_dispatch.column_parts``); the second one starts at a multiple
of 16, so its counters stay aligned.

Determinism: no reduction crosses programs and the row order is fixed, U is a pure function of
(seed, step, p), and both divisions are correctly rounded (``div_rn``; Triton's ``/`` is
approximate on a GPU): bit-identical between runs and equal to the reference and to antdiff's
C++ path (the products here feed comparisons and selections, so no multiply-add is contracted).
A bf16 ``out`` is rounded to nearest even on a GPU; Triton 3.8's interpreter truncates bf16
stores, so under it a bf16 result may be 1 ulp off (the tests allow that one ulp there).
"""

from __future__ import annotations

import torch

from ._dispatch import column_parts, interpreted, interpreting, jit, on_device, use_triton
from .reference import check_graddrop, check_uniform, graddrop_ref

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference serves everything then
    triton = tl = None

__all__ = ["graddrop"]


@jit
def _row(p_row, p_keep, i_k, m_p):
    """[BLOCK_P] float32 values of row i_k at p_row, 0 for an absent cluster (NaN included)."""
    b_g = tl.load(p_row, mask=m_p, other=0.0).to(tl.float32)
    return tl.where(tl.load(p_keep + i_k) != 0, b_g, 0.0)


@jit
def _graddrop_kernel(
    p_J,
    p_keep,
    p_step,
    p_div,
    p_out,
    P,
    col0,
    s_k,
    s_p,
    s_o,
    leak,
    seed,
    K: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    i_p = tl.program_id(0)
    o_p = i_p.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    m_p = o_p < P
    # [BLOCK_P]
    b_total = tl.zeros([BLOCK_P], dtype=tl.float32)
    b_mass = tl.zeros([BLOCK_P], dtype=tl.float32)
    p_row = p_J + o_p * s_p
    for i_k in tl.static_range(K):
        b_g = _row(p_row, p_keep, i_k, m_p)
        b_total += b_g
        b_mass += tl.abs(b_g)
        p_row += s_k  # pointer steps are 64-bit: (k - 1) * s_k may pass 2**31
    # correctly rounded divisions (a plain / is approximate on the GPU): the reference's values
    b_pur = 0.5 * (1.0 + tl.math.div_rn(b_total, tl.where(b_mass > 0, b_mass, 1.0)))
    # U of columns col0 + o_p: counter c holds columns 4 c .. 4 c + 3 (col0 % 4 == 0)
    b_step = tl.load(p_step).to(tl.uint64)
    o_c = (col0 // 4) + i_p.to(tl.int64) * (BLOCK_P // 4) + tl.arange(0, BLOCK_P // 4)
    c0 = (o_c & 0xFFFFFFFF).to(tl.uint32)
    c1 = (o_c >> 32).to(tl.uint32)
    c2 = tl.zeros([BLOCK_P // 4], dtype=tl.uint32) + (b_step & 0xFFFFFFFF).to(tl.uint32)
    c3 = tl.zeros([BLOCK_P // 4], dtype=tl.uint32) + (b_step >> 32).to(tl.uint32)
    w0, w1, w2, w3 = tl.philox(seed, c0, c1, c2, c3, 10)
    b_w = tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), [BLOCK_P])  # as in uniform
    b_u = (b_w >> 8).to(tl.float32) * (1.0 / 16777216.0)
    b_pos = b_pur > b_u
    b_neg = b_pur < b_u
    b_res = tl.zeros([BLOCK_P], dtype=tl.float32)
    p_row = p_J + o_p * s_p
    for i_k in tl.static_range(K):
        b_g = _row(p_row, p_keep, i_k, m_p)
        b_kept = (b_pos & (b_g > 0)) | (b_neg & (b_g < 0))
        b_res += tl.where(b_kept, b_g, leak * b_g)
        p_row += s_k
    b_div = tl.load(p_div).to(tl.float32)
    tl.store(p_out + o_p * s_o, tl.math.div_rn(b_res, b_div).to(p_out.dtype.element_ty), mask=m_p)


def _config(k: int, interp: bool | None = None) -> tuple[int, int]:
    """(BLOCK_P, num_warps): fixed, no autotune; the block shrinks as k grows (one row segment
    and the running sums in registers at a time)."""
    if interpreting() if interp is None else interp:
        return 32768, 4  # few, large blocks: the interpreter's cost is per program
    return (1024 if k <= 8 else 512 if k <= 16 else 256 if k <= 32 else 128), 4


def _args(J, keep, step, div, out, col0: int, leak: float, seed: int) -> tuple:
    """The kernel's runtime arguments, in order (shared with ``ant_kernels.aot``)."""
    return (J, keep, step, div, out, J.shape[1], col0, J.stride(0), J.stride(1), out.stride(0),
            float(leak), seed)  # fmt: skip


def graddrop_triton(
    J: torch.Tensor,
    keep: torch.Tensor,
    seed: int,
    step: torch.Tensor,
    leak: float,
    div: torch.Tensor,
    out: torch.Tensor,
    block_p: int | None = None,
) -> torch.Tensor:
    """Launch the Triton kernel (no dispatch). ``keep``: [k] float32 1 / 0; ``div``: one-element
    float32. ``block_p`` (a multiple of 4) overrides the tiling."""
    k, P = J.shape
    bp, warps = _config(k, interpreted(J))
    bp = block_p or bp
    with on_device(J):
        for cols in column_parts(P):
            n = cols.stop - cols.start
            if n:
                args = _args(J[:, cols], keep, step, div, out[cols], cols.start, leak, seed)
                _graddrop_kernel[(-(-n // bp),)](*args, K=k, BLOCK_P=bp, num_warps=warps)
    return out


def graddrop(
    J: torch.Tensor,
    present: torch.Tensor,
    seed: int,
    step: torch.Tensor,
    leak: float = 0.0,
    divisor: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """GradDrop's update of the per-cluster gradients (see the module docstring).

    Args:
        J: [k, P] float32/bf16/fp16 (the Triton kernel; float64 takes the reference), any
            strides.
        present: [k] bool; absent rows count as 0.
        seed, step: the counter-based stream of U (``uniform``): seed in [0, 2**64), step a
            one-element int64 tensor on J's device, read by the kernel, never by the host.
        leak: weight of the dropped entries, in [0, 1].
        divisor: one-element float tensor on J's device (None: 1), e.g. the number of present
            clusters for a mean.
        out: [P] float; may be one of J's rows. None: a new tensor of J's dtype.

    Returns:
        ``out``, accumulated in float32 (float64 for float64 J). No host sync.
    """
    if divisor is None:
        divisor = torch.ones((), device=J.device)
    check_graddrop(J, present, leak, divisor, out, step)
    check_uniform(seed, step, 0)
    k = J.shape[0]
    if not use_triton("graddrop", J, present, step, divisor, *(() if out is None else (out,)), k=k):
        return graddrop_ref(J, present, seed, step, leak, divisor, out)
    if out is None:
        out = torch.empty(J.shape[1], dtype=J.dtype, device=J.device)
    keep = present.to(torch.float32)
    div = divisor.reshape(1).to(torch.float32)
    return graddrop_triton(J, keep, seed, step, leak, div, out)

"""G = J J^T for the per-cluster gradients J [k, P], in one pass over J.

Maths: G[i, j] = sum_p J[i, p] J[j, p], accumulated in float32 for a float32 / bf16 / fp16 J
(products of bf16/fp16 values are exact in float32); a float64 J takes the reference in
float64 under ``auto`` (forced ``triton`` refuses it).

Why no tl.dot: k is small (5 in the paper), so the work is 2 * k^2 flops per column against
k * 4 bytes, far below what a GPU computes per byte it reads; the bound is memory. A matrix-unit
product of [16, BLOCK_P] tiles measured 75 GB/s (fp32, IEEE) and 645 GB/s (bf16) on an H200, the
tile transposed through shared memory every chunk, and its truncating fp32 accumulation missed
the 16-ulp accuracy bound of the tests by 10x. Plain FMAs on CUDA cores are exact and ordered:
on the H200 the kernels below reach 80-83% (fp32) and 65-68% (bf16) of the datasheet bandwidth
at k = 5 in two runs (benchmarks/results/gram_tilings_h200.md, kernels_h200.md).

Split kernel (2 < k <= 8, the default there): one program per span of ``BLOCK_P * CHUNKS``
columns loads every row once, as tile A (the first min(4, 2^floor(log2 k)) rows) and tile B (the
rest), and accumulates the products A A^T, A B^T and B B^T per column in float32 registers:
each thread owns VEC adjacent columns of every row, so the products need no data movement
between threads; FOLD sums a thread's columns as it goes, which keeps the accumulator small
enough for many programs to be in flight.

Row-tile kernel (k <= 2, k > 8): rows are split into T tiles of TB (a power of two); program
span * T^2 + pair computes the [TB, TB] block of G between row tiles ``ti <= tj``. Each chunk
loads the two row tiles as [TB, 1, BLOCK_P] and [1, TB, BLOCK_P] (the programs of one span have
adjacent ids and run side by side, so a tile read again comes from L2, not memory) and adds
their outer product to a [TB, TB, BLOCK_P] float32 accumulator, reduced over the columns once,
at the end. In both kernels rows >= k and columns >= P are masked to zero and add nothing.

Grid: one axis (CUDA allows 2^31 - 1 programs there, but only 65535 on axes 1 and 2, which the
spans of a 675M-parameter fp32 J already pass).

Two launches when P % 16 != 0: one over the first P - P % 16 columns, whose bound Triton then
knows to be a multiple of 16 (vector loads; ``_dispatch.column_parts``), one over the rest,
each into its own spans of the workspace.

Determinism: each program writes its block and its transpose (of a block on the diagonal, the
upper triangle both ways: G is exactly symmetric however the compiler contracts the products
into FMAs) to its span's slot of a [nspans, k, k] workspace; a fixed-order ``torch.sum`` over
the spans then gives G. No atomics: the same J gives a bit-identical G on every run.

Finiteness: a NaN or inf in row i of J makes G[i, i] (a sum of squares) NaN or inf, so
``finite = all(isfinite(diag(G)))`` needs no extra work in the kernel. It is also False when a
row's squared norm overflows float32, in which case G is unusable as well.
"""

from __future__ import annotations

import torch

from ._dispatch import (
    column_parts,
    interpreted,
    interpreting,
    jit,
    next_pow2,
    on_device,
    use_triton,
)
from .reference import check_J, gram_ref

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference serves everything then
    triton = tl = None

__all__ = ["gram"]


@jit
def _gram_kernel(
    p_J,
    p_W,
    K,
    P,
    s_k,
    s_p,
    T: tl.constexpr,
    TB: tl.constexpr,
    BLOCK_P: tl.constexpr,
    CHUNKS: tl.constexpr,
    STAGES: tl.constexpr,
):
    # one axis: span-major, pair-minor (``_plan``)
    i_s = tl.program_id(0) // (T * T)
    i_t = tl.program_id(0) % (T * T)
    ti = i_t // T
    tj = i_t % T
    if ti <= tj:  # the blocks below the diagonal are the transposes of those above
        o_a = ti * TB + tl.arange(0, TB)
        o_b = tj * TB + tl.arange(0, TB)
        m_a = o_a < K
        m_b = o_b < K
        # 64-bit offsets: k * P passes 2**31 for large models
        p_a = p_J + o_a.to(tl.int64)[:, None, None] * s_k
        p_b = p_J + o_b.to(tl.int64)[None, :, None] * s_k
        o_start = i_s.to(tl.int64) * (BLOCK_P * CHUNKS)
        # [TB, TB, BLOCK_P]
        b_acc = tl.zeros([TB, TB, BLOCK_P], dtype=tl.float32)
        for i_c in tl.range(CHUNKS, num_stages=STAGES):
            o_p = o_start + i_c * BLOCK_P + tl.arange(0, BLOCK_P)
            m_p = (o_p < P)[None, None, :]
            o_c = o_p[None, None, :] * s_p
            # [TB, 1, BLOCK_P] and [1, TB, BLOCK_P]
            b_a = tl.load(p_a + o_c, mask=m_a[:, None, None] & m_p, other=0.0)
            b_b = tl.load(p_b + o_c, mask=m_b[None, :, None] & m_p, other=0.0)
            b_acc += b_a.to(tl.float32) * b_b.to(tl.float32)
        # [TB, TB]
        b_g = tl.sum(b_acc, axis=2)
        # ti < tj puts every row of tile a above every row of tile b: only diagonal tiles lose
        # their lower triangle
        _store_sym(p_W + i_s.to(tl.int64) * K * K, K, o_a, o_b, b_g, m_a, m_b, True)


@jit
def _store_sym(p_W, K, o_r, o_c, g, m_r, m_c, DIAG: tl.constexpr):
    """Store the block g [R, C] of G at rows o_r and columns o_c of the k x k slot at p_W, and
    its transpose at (o_c, o_r). DIAG (a block on G's diagonal): only the entries with
    o_r <= o_c are stored, both ways. The compiler may contract g[i, j]'s products into FMAs
    differently from g[j, i]'s (it shares x_i x_j between them), so in fp32 the two can differ
    in the last bits: one of them, written to both places, keeps G exactly symmetric."""
    m = m_r[:, None] & m_c[None, :]
    if DIAG:
        m = m & (o_r[:, None] <= o_c[None, :])
    tl.store(p_W + o_r[:, None] * K + o_c[None, :], g, mask=m)
    tl.store(p_W + o_c[None, :] * K + o_r[:, None], g, mask=m)


@jit
def _fold(x, M: tl.constexpr, N: tl.constexpr, BF: tl.constexpr, FOLD: tl.constexpr):
    """[M, N, BF * FOLD] -> [M, N, BF]: sums of FOLD adjacent columns (within one thread)."""
    if FOLD == 1:
        return x
    return tl.sum(tl.reshape(x, [M, N, BF, FOLD]), axis=3)


@jit
def _chain(acc, p, M: tl.constexpr, N: tl.constexpr, BF: tl.constexpr, FOLD: tl.constexpr):
    """acc [M, N, BF] + the sums of each thread's FOLD adjacent columns of the products p
    [M, N, BF * FOLD], added one column at a time (the same grouping as ``_fold``): every
    product then has one use, which the compiler contracts with its add into one FMA, where
    ``_fold``'s sum tree needs a multiply and an add per product. FOLD <= 8."""
    if FOLD == 1:
        out = acc + p
    elif FOLD == 2:
        e, o = tl.split(tl.reshape(p, [M, N, BF, 2]))
        out = acc + e + o
    elif FOLD == 4:  # halves by column parity, twice: column c * FOLD + j ends in part j
        e, o = tl.split(tl.reshape(p, [M, N, 2 * BF, 2]))
        e0, e1 = tl.split(tl.reshape(e, [M, N, BF, 2]))
        o0, o1 = tl.split(tl.reshape(o, [M, N, BF, 2]))
        out = acc + e0 + e1 + o0 + o1
    else:
        e, o = tl.split(tl.reshape(p, [M, N, 4 * BF, 2]))
        e0, e1 = tl.split(tl.reshape(e, [M, N, 2 * BF, 2]))
        o0, o1 = tl.split(tl.reshape(o, [M, N, 2 * BF, 2]))
        e00, e01 = tl.split(tl.reshape(e0, [M, N, BF, 2]))
        e10, e11 = tl.split(tl.reshape(e1, [M, N, BF, 2]))
        o00, o01 = tl.split(tl.reshape(o0, [M, N, BF, 2]))
        o10, o11 = tl.split(tl.reshape(o1, [M, N, BF, 2]))
        out = acc + e00 + e01 + e10 + e11 + o00 + o01 + o10 + o11
    return out


@jit
def _acc(acc, x, y, M: tl.constexpr, N: tl.constexpr, BF: tl.constexpr, FOLD: tl.constexpr,
         CHAIN: tl.constexpr):  # fmt: skip
    """acc [M, N, BF] + the products x y (x [M, 1, BF * FOLD], y [1, N, BF * FOLD]) with each
    thread's FOLD adjacent columns summed: as a tree (``_fold``) or one by one (``_chain``)."""
    if CHAIN:
        out = _chain(acc, x * y, M, N, BF, FOLD)
    else:
        out = acc + _fold(x * y, M, N, BF, FOLD)
    return out


@jit
def _acc_halves(c0, c1, c2, x, W: tl.constexpr, BF: tl.constexpr, FOLD: tl.constexpr,
                CHAIN: tl.constexpr):  # fmt: skip
    """A 4-row tile's own products (x [4, 1, W]) with its rows in halves H0 = {0, 2}, H1 = {1, 3}:
    c0 += H0 H0^T, c1 += H0 H1^T, c2 += H1 H1^T ([2, 2, BF] each): 12 accumulators for the 10
    distinct sums of A A^T, where the whole [4, 4] needs 16 (a chain cannot share the
    symmetric products the way a sum tree does)."""
    h0, h1 = tl.split(tl.reshape(tl.permute(x, (1, 2, 0)), [1, W, 2, 2]))  # rows (0, 2), (1, 3)
    h0 = tl.permute(h0, (2, 0, 1))
    h1 = tl.permute(h1, (2, 0, 1))
    h0t = tl.permute(h0, (1, 0, 2))
    h1t = tl.permute(h1, (1, 0, 2))
    c0 = _acc(c0, h0, h0t, 2, 2, BF, FOLD, CHAIN)
    c1 = _acc(c1, h0, h1t, 2, 2, BF, FOLD, CHAIN)
    c2 = _acc(c2, h1, h1t, 2, 2, BF, FOLD, CHAIN)
    return c0, c1, c2


@jit
def _store_halves(p_W, K, base, c0, c1, c2):
    """Store ``_acc_halves``' blocks of the 4-row tile starting at row ``base`` (and the
    transpose of the off-diagonal one) into the k x k slot at p_W."""
    o_0 = base + tl.arange(0, 2) * 2
    o_1 = o_0 + 1
    m_0 = o_0 < K
    m_1 = o_1 < K
    _store_sym(p_W, K, o_0, o_0, tl.sum(c0, axis=2), m_0, m_0, True)
    # H0 x H1 holds each of its pairs once (with (2, 1) below the diagonal): all of it
    _store_sym(p_W, K, o_0, o_1, tl.sum(c1, axis=2), m_0, m_1, False)
    _store_sym(p_W, K, o_1, o_1, tl.sum(c2, axis=2), m_1, m_1, True)


@jit
def _bf16_pairs(w):
    """int32 words holding two bfloat16 values (little endian) -> the even and the odd column
    as float32: a shift and a mask (a bfloat16 is the top half of a float32)."""
    return (w << 16).to(tl.float32, bitcast=True), (w & -65536).to(tl.float32, bitcast=True)


@jit
def _gram_split_kernel(
    p_J,
    p_W,
    K,
    P,
    s_k,
    s_p,
    TA: tl.constexpr,
    TB: tl.constexpr,
    BLOCK_P: tl.constexpr,
    CHUNKS: tl.constexpr,
    STAGES: tl.constexpr,
    FOLD: tl.constexpr,
    CHAIN: tl.constexpr,
    PAIRS: tl.constexpr,
):
    """k <= 8 in one program per span, every row read once: rows [0, TA) form tile A and rows
    [TA, TA + TB) tile B (TB = 0: no B), so G = [[A A^T, A B^T], [B A^T, B B^T]] needs only the
    TA^2 + TA TB + TB^2 products per column (21 at k = 5 = 4 + 1, against 64 for one tile of 8).
    The transposed tiles are permutations of registers each thread already holds. FOLD > 1 sums
    each thread's FOLD adjacent columns into one accumulator column every chunk: FOLD times
    fewer accumulator registers (more programs in flight), the same fixed summation order.
    CHAIN = 1 adds the FOLD columns one by one (``_chain``: FMAs) instead of as a tree (and
    accumulates a 4-row tile's own products in three [2, 2] blocks: ``_acc_halves``).
    PAIRS = 1 (bfloat16 rows with unit column stride, an even row stride and P, 4-byte aligned)
    loads int32 words and converts each into its even and odd column with a shift and a mask.
    With CHAIN the additions are the column reads' in the same order (the same bits); with the
    sum tree the even columns' products are grouped apart from the odd ones' (equal to
    rounding). Either way the same J gives the same G."""
    BF: tl.constexpr = BLOCK_P // FOLD
    i_s = tl.program_id(0)
    o_a = tl.arange(0, TA)
    m_a = o_a < K
    p_a = p_J + o_a.to(tl.int64)[:, None, None] * s_k
    o_start = i_s.to(tl.int64) * (BLOCK_P * CHUNKS)
    # [TA, TA, BF] (and [TA, TB, BF], [TB, TB, BF])
    HALVES: tl.constexpr = CHAIN and TA == 4  # A A^T as three [2, 2] blocks (_acc_halves)
    HALVES_B: tl.constexpr = CHAIN and TB == 4  # and B B^T (k = 7, 8)
    if HALVES:
        b_h00 = tl.zeros([2, 2, BF], dtype=tl.float32)
        b_h01 = tl.zeros([2, 2, BF], dtype=tl.float32)
        b_h11 = tl.zeros([2, 2, BF], dtype=tl.float32)
    else:
        b_aa = tl.zeros([TA, TA, BF], dtype=tl.float32)
    if TB > 0:
        o_b = TA + tl.arange(0, TB)
        m_b = o_b < K
        p_b = p_J + o_b.to(tl.int64)[:, None, None] * s_k
        b_ab = tl.zeros([TA, TB, BF], dtype=tl.float32)
        if HALVES_B:  # B B^T as three [2, 2] blocks too
            b_k00 = tl.zeros([2, 2, BF], dtype=tl.float32)
            b_k01 = tl.zeros([2, 2, BF], dtype=tl.float32)
            b_k11 = tl.zeros([2, 2, BF], dtype=tl.float32)
        else:
            b_bb = tl.zeros([TB, TB, BF], dtype=tl.float32)
    if PAIRS:  # the rows as int32 words (two columns each)
        BW: tl.constexpr = BLOCK_P // 2
        p_wa = p_J.to(tl.pointer_type(tl.int32), bitcast=True) + o_a.to(tl.int64)[
            :, None, None] * (s_k // 2)  # fmt: skip
        if TB > 0:
            p_wb = p_J.to(tl.pointer_type(tl.int32), bitcast=True) + o_b.to(tl.int64)[
                :, None, None] * (s_k // 2)  # fmt: skip
    for i_c in tl.range(CHUNKS, num_stages=STAGES):
        if PAIRS:
            o_w = o_start // 2 + i_c * BW + tl.arange(0, BW)
            m_w = (o_w < P // 2)[None, None, :]
            # [TA, 1, BW] each: the even and the odd columns
            a_e, a_o = _bf16_pairs(tl.load(p_wa + o_w[None, None, :],
                                           mask=m_a[:, None, None] & m_w, other=0))  # fmt: skip
            if HALVES:
                b_h00, b_h01, b_h11 = _acc_halves(b_h00, b_h01, b_h11, a_e, BW, BF, FOLD // 2,
                                                  CHAIN)  # fmt: skip
                b_h00, b_h01, b_h11 = _acc_halves(b_h00, b_h01, b_h11, a_o, BW, BF, FOLD // 2,
                                                  CHAIN)  # fmt: skip
            else:
                b_aa = _acc(b_aa, a_e, tl.permute(a_e, (1, 0, 2)), TA, TA, BF, FOLD // 2, CHAIN)
                b_aa = _acc(b_aa, a_o, tl.permute(a_o, (1, 0, 2)), TA, TA, BF, FOLD // 2, CHAIN)
            if TB > 0:
                b_e, b_o = _bf16_pairs(tl.load(p_wb + o_w[None, None, :],
                                               mask=m_b[:, None, None] & m_w, other=0))  # fmt: skip
                b_et, b_ot = tl.permute(b_e, (1, 0, 2)), tl.permute(b_o, (1, 0, 2))
                b_ab = _acc(b_ab, a_e, b_et, TA, TB, BF, FOLD // 2, CHAIN)
                b_ab = _acc(b_ab, a_o, b_ot, TA, TB, BF, FOLD // 2, CHAIN)
                if HALVES_B:
                    b_k00, b_k01, b_k11 = _acc_halves(b_k00, b_k01, b_k11, b_e, BW, BF,
                                                      FOLD // 2, CHAIN)  # fmt: skip
                    b_k00, b_k01, b_k11 = _acc_halves(b_k00, b_k01, b_k11, b_o, BW, BF,
                                                      FOLD // 2, CHAIN)  # fmt: skip
                else:
                    b_bb = _acc(b_bb, b_e, b_et, TB, TB, BF, FOLD // 2, CHAIN)
                    b_bb = _acc(b_bb, b_o, b_ot, TB, TB, BF, FOLD // 2, CHAIN)
        else:
            o_p = o_start + i_c * BLOCK_P + tl.arange(0, BLOCK_P)
            m_p = (o_p < P)[None, None, :]
            o_c = o_p[None, None, :] * s_p
            # [TA, 1, BLOCK_P]
            b_a = tl.load(p_a + o_c, mask=m_a[:, None, None] & m_p, other=0.0).to(tl.float32)
            if HALVES:
                b_h00, b_h01, b_h11 = _acc_halves(b_h00, b_h01, b_h11, b_a, BLOCK_P, BF, FOLD,
                                                  CHAIN)  # fmt: skip
            else:
                b_aa = _acc(b_aa, b_a, tl.permute(b_a, (1, 0, 2)), TA, TA, BF, FOLD, CHAIN)
            if TB > 0:
                # [TB, 1, BLOCK_P]
                b_b = tl.load(p_b + o_c, mask=m_b[:, None, None] & m_p, other=0.0).to(tl.float32)
                b_bt = tl.permute(b_b, (1, 0, 2))
                b_ab = _acc(b_ab, b_a, b_bt, TA, TB, BF, FOLD, CHAIN)
                if HALVES_B:
                    b_k00, b_k01, b_k11 = _acc_halves(b_k00, b_k01, b_k11, b_b, BLOCK_P, BF,
                                                      FOLD, CHAIN)  # fmt: skip
                else:
                    b_bb = _acc(b_bb, b_b, b_bt, TB, TB, BF, FOLD, CHAIN)
    p_W = p_W + i_s.to(tl.int64) * K * K
    if HALVES:
        _store_halves(p_W, K, 0, b_h00, b_h01, b_h11)
    else:
        _store_sym(p_W, K, o_a, o_a, tl.sum(b_aa, axis=2), m_a, m_a, True)
    if TB > 0:
        _store_sym(p_W, K, o_a, o_b, tl.sum(b_ab, axis=2), m_a, m_b, False)
        if HALVES_B:
            _store_halves(p_W, K, TA, b_k00, b_k01, b_k11)
        else:
            _store_sym(p_W, K, o_b, o_b, tl.sum(b_bb, axis=2), m_b, m_b, True)


# (TB, VEC, CHUNKS, num_warps, STAGES[, FOLD[, CHAIN[, PAIRS]]]) configurations timed against
# each other on a GPU (benchmarks/bench_kernels.py::test_gram_tiling_cuda) and tested there;
# STAGES > 1 software-pipelines the chunk loads through shared memory. TB = 0 selects
# _gram_split_kernel (k <= 8; its tiles follow from k). Timed on an H200 except where noted
# (results/gram_tilings_h200.md).
TILINGS = [
    (4, 4, 16, 4, 1), (2, 4, 16, 4, 1), (2, 4, 16, 4, 3), (4, 4, 16, 4, 3), (2, 8, 16, 4, 1),
    (2, 8, 16, 4, 3), (2, 4, 32, 8, 3), (1, 8, 16, 4, 3), (4, 4, 32, 8, 2), (2, 4, 64, 4, 2),
    (0, 4, 16, 4, 1), (0, 2, 16, 4, 1), (0, 4, 32, 4, 1), (0, 4, 16, 8, 1), (0, 8, 16, 4, 1),
    (0, 4, 16, 4, 2), (0, 4, 8, 4, 1), (0, 2, 32, 8, 1), (0, 4, 64, 4, 1), (0, 8, 16, 8, 1),
    (0, 2, 16, 4, 3), (0, 8, 8, 4, 2), (0, 4, 16, 4, 1, 2), (0, 4, 16, 4, 1, 4),
    (0, 8, 16, 4, 1, 2), (0, 8, 16, 4, 1, 4), (0, 8, 16, 4, 1, 8), (0, 8, 8, 4, 2, 4),
    (0, 4, 16, 8, 1, 4), (0, 8, 16, 8, 1, 4), (0, 4, 16, 4, 3, 4),
    # not yet timed: 32-byte bf16 loads (two 16-byte loads per row and thread) for more bytes
    # in flight; bf16's loop issues 287 instructions per 80 bytes against fp32's 137 (sm_90
    # SASS: bf16 -> fp32 shifts, and twice the products per byte)
    (0, 16, 16, 4, 1, 16), (0, 16, 8, 4, 2, 16),
    # not yet timed: CHAIN = 1 adds the folded columns as FMAs and keeps A A^T in three [2, 2]
    # blocks. Static sm_90 SASS of the k = 5 loop with one 16-byte load per row and thread
    # (the first entry for fp32, the second for bf16): bf16 238 instructions against 287, 136
    # FFMA where the sum tree issues 60 FMUL + 60 FFMA + 66 FADD, 48 registers against 71;
    # fp32 110 against 137 (68 FFMA for 30 FMUL + 30 FFMA + 36 FADD). With
    # two loads per row (fp32 VEC = 8) or 8-byte loads (bf16 VEC = 4) the splits go through
    # shared memory: expect those two combinations to time slower. The last adds PAIRS = 1:
    # bf16 read as int32 words, a shift and a mask per two columns (the k = 5 loop: 221
    # instructions, 20 SHF + 20 LOP3 where the plain loads convert with 40 SHF + 20 PRMT;
    # fp32 ignores it). These counts hold for 16-byte aligned rows (the engine's buffer pads
    # them): a J starting 4 or 8 bytes in, or with a row stride that is not a multiple of 8
    # elements, sends CHAIN's splits through shared memory (468-616 loop instructions), so a
    # CHAIN default would need a fallback for such J.
    (0, 4, 16, 4, 1, 4, 1), (0, 8, 16, 4, 1, 8, 1), (0, 8, 16, 4, 1, 8, 1, 1),
]  # fmt: skip


def _config(k: int, element_size: int = 4, interp: bool | None = None) -> tuple[int, ...]:
    """(TB, VEC, CHUNKS, num_warps[, STAGES, FOLD]): fixed, no autotune (also under the
    interpreter).

    Chosen from the tilings timed side by side on an H200 (benchmarks/results/
    gram_tilings_h200.md, k = 5, P = 1e8). For 2 < k <= 8 the split kernel (every row read
    once) with 16-byte loads (VEC = 4 fp32, 8 bf16/fp16) and FOLD = VEC: 3844-3963 GB/s fp32
    (80-83% of the datasheet bandwidth, 92-94% of a copy) and 3129-3286 GB/s bf16 (65-68%;
    torch's own sum over J reaches 80%) in two runs, against 2558 and 1873 GB/s for the best
    row-tile configuration; without FOLD its 117-240 registers per thread left too few programs
    in flight. The other k <= 8 take the same configuration, timed at P = 1e8 in one run:
    3235-3869 GB/s fp32, 2366-3347 GB/s bf16 for k = 3, 4, 6, 7, 8. k <= 2 is one
    tile; k > 8 tiles of 8 (VEC = 1), as timed at P = 1e7. No configuration spills on sm_90
    (``python -m ant_kernels.aot``)."""
    if interpreting() if interp is None else interp:
        # few, large blocks: the interpreter's cost is per program and per op; row tiles of at
        # most 8 keep a [TB, TB, 4096] block under Triton's 2^20 elements for any k
        return min(next_pow2(k, 1), 8), 1, 4, 4
    if k <= 2:  # one tile; 8-wide fp16 rows that are not 16-byte aligned spilled here
        return next_pow2(k, 1), 4, 32, 4
    if k <= 8:
        vec = 16 // element_size
        return 0, vec, 16, 4, 1, vec
    return 8, 1, 32, 8


def _plan(
    J: torch.Tensor, block_p: int | None = None, chunks: int | None = None,
    config: tuple[int, ...] | None = None, interp: bool | None = None,
) -> tuple[tuple[int], dict]:  # fmt: skip
    """(grid, constexpr and launch options) for J [k, P]; ``config`` replaces ``_config``.
    The grid has one axis, spans x tile pairs (``_grid``; ``_spans`` recovers the spans).
    ``interp``: interpreter tiles (default: ``interpreting()``, the environment variable)."""
    k, P = J.shape
    if config is not None:
        _check_config(config)
    interp = interpreting() if interp is None else interp
    tb, vec, ch, warps, *rest = config or _config(k, J.dtype.itemsize, interp)
    stages, fold, chain, pairs = (*rest, *(1, 1, 0, 0)[len(rest) :])
    bp = block_p or (4096 if interp else 32 * warps * vec)
    ch = chunks or ch
    spans = -(-P // (bp * ch))
    if tb == 0:  # the split kernel: tile A = the largest power of two <= min(k, 4), B the rest
        if k > 8:
            raise ValueError(f"the split gram kernel serves k <= 8, got k={k}")
        ta = min(4, 1 << (k.bit_length() - 1))
        rest_b = k - ta
        meta = {"TA": ta, "TB": next_pow2(rest_b, 1) if rest_b else 0}
        if chain and fold > 8:
            raise ValueError(f"CHAIN serves FOLD <= 8, got config={config}")
        if pairs and fold < 2:
            raise ValueError(
                f"PAIRS needs FOLD >= 2 (a word holds two columns), got config={config}"
            )
        # word loads where the layout allows them (else the same kernel reads columns)
        pairs = int(bool(pairs) and J.dtype == torch.bfloat16 and _word_aligned(J))
        return _grid(spans, 1), {**meta, "BLOCK_P": bp, "CHUNKS": ch, "STAGES": stages,
                                 "FOLD": fold, "CHAIN": chain, "PAIRS": pairs,
                                 "num_warps": warps}  # fmt: skip
    if fold != 1 or chain or pairs:
        raise ValueError(
            f"FOLD, CHAIN and PAIRS apply to the split kernel (TB = 0) only, got config={config}"
        )
    t = -(-k // tb)
    meta = {"T": t, "TB": tb, "BLOCK_P": bp, "CHUNKS": ch, "STAGES": stages, "num_warps": warps}
    return _grid(spans, t * t), meta


_MAX_PROGRAMS = 2**31 - 1  # CUDA's limit on grid axis 0


def _grid(spans: int, pairs: int) -> tuple[int]:
    """The one-axis grid of ``spans * pairs`` programs (span-major), or a ValueError past
    CUDA's axis-0 limit (over 10^11 columns at the default tilings)."""
    if spans * pairs > _MAX_PROGRAMS:
        raise ValueError(
            f"gram needs {spans} column spans x {pairs} tile pairs = {spans * pairs} programs, "
            f"more than CUDA's {_MAX_PROGRAMS}: J has too many columns for this tiling"
        )
    return (spans * pairs,)


def _spans(grid: tuple[int], meta: dict) -> int:
    """The number of column spans (workspace slots) of a ``_plan``'s grid."""
    return grid[0] // (meta["T"] ** 2 if "T" in meta else 1)


def _check_config(config: tuple[int, ...]) -> None:
    """Raise unless ``config`` is (TB, VEC, CHUNKS, num_warps[, STAGES[, FOLD[, CHAIN[,
    PAIRS]]]]) with powers of two where the kernels reshape by them, 0/1 flags."""
    ok = isinstance(config, (tuple, list)) and 4 <= len(config) <= 8 and all(
        isinstance(v, int) and not isinstance(v, bool) for v in config)  # fmt: skip
    if ok:
        tb, vec, ch, warps, *rest = config
        stages = rest[0] if rest else 1
        fold = rest[1] if len(rest) > 1 else 1
        ok = (
            tb >= 0 and (tb == 0 or tb & (tb - 1) == 0) and vec >= 1 and vec & (vec - 1) == 0
            and min(ch, warps, stages) >= 1 and 1 <= fold <= 16 and fold & (fold - 1) == 0
            and all(f in (0, 1) for f in rest[2:])
        )  # fmt: skip
    if not ok:
        raise ValueError(
            "config must be (TB, VEC, CHUNKS, num_warps[, STAGES[, FOLD[, CHAIN[, PAIRS]]]]) "
            "of ints: TB 0 or a power of two, VEC and FOLD (<= 16) powers of two, CHUNKS, "
            f"num_warps and STAGES >= 1, CHAIN and PAIRS 0 or 1; got config={config!r}"
        )


def _word_aligned(J) -> bool:
    """Whether J's 2-byte rows can be read as 4-byte words: unit column stride, an even row
    stride and column count, a 4-byte aligned start."""
    k, P = J.shape
    return (
        J.stride(1) == 1 and (k == 1 or J.stride(0) % 2 == 0) and P % 2 == 0
        and J.data_ptr() % 4 == 0
    )  # fmt: skip


def _kernel(meta: dict):
    """The kernel a ``_plan`` is for (the split kernel's plans name its tile A)."""
    return _gram_split_kernel if "TA" in meta else _gram_kernel


def _args(J: torch.Tensor, work: torch.Tensor) -> tuple:
    """The kernel's runtime arguments, in order (shared with ``ant_kernels.aot``)."""
    return J, work, J.shape[0], J.shape[1], J.stride(0), J.stride(1)


def gram_triton(
    J: torch.Tensor, block_p: int | None = None, chunks: int | None = None,
    config: tuple[int, ...] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Launch the Triton kernel (no dispatch). ``block_p``/``chunks`` override the tiling,
    ``config`` = (TB, VEC, CHUNKS, num_warps[, STAGES[, FOLD[, CHAIN[, PAIRS]]]]) the whole
    configuration (PAIRS applies where ``_word_aligned``; other columns are read plainly)."""
    parts = [J[:, cols] for cols in column_parts(J.shape[1])]
    plans = [_plan(part, block_p, chunks, config, interpreted(J)) for part in parts]
    k = J.shape[0]
    spans = [_spans(*plan) for plan in plans]
    work = torch.empty((sum(spans), k, k), dtype=torch.float32, device=J.device)
    start = 0
    for part, (grid, meta), n in zip(parts, plans, spans):
        with on_device(part):
            _kernel(meta)[grid](*_args(part, work[start : start + n]), **meta)
        start += n
    G = work.sum(0)  # fixed-order reduction over the spans
    # Each span's block is symmetric, but the sum may add the spans in another order at [i, j]
    # than at [j, i] (vector lanes, tails): one triangle, mirrored, keeps G exactly symmetric.
    G = G.triu() + G.triu(1).mT
    return G, torch.isfinite(G.diagonal()).all()


def gram(J: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gram matrix of the per-cluster gradients, in one pass over J.

    Args:
        J: [k, P] float32/bf16/fp16 (any strides, e.g. a view into a larger buffer); a
            float64 J (a model in double precision) takes the torch reference in float64
            (under auto; forced triton refuses it).

    Returns:
        G: [k, k] = J J^T accumulated in float32 (float64 for a float64 J), exactly
            symmetric, deterministic.
        finite: 0-d bool, False if J has a NaN/inf entry (or a squared row norm overflows
            G's dtype). Both on J's device; no host sync.
    """
    check_J(J)
    if use_triton("gram", J, k=J.shape[0]):
        return gram_triton(J)
    return gram_ref(J)

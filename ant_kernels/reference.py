"""Pure-torch references for every ant_kernels op; they double as the CPU path.

They run on any device, never synchronise with the host (no ``.item()``, no Python branch on a
tensor value) and define the semantics the Triton kernels are tested against.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_J(J: torch.Tensor) -> None:
    """Raise unless ``J`` is a floating [k, P] tensor with k, P >= 1."""
    if not isinstance(J, torch.Tensor):
        raise TypeError(f"J must be a torch.Tensor, got {type(J).__name__}")
    if J.dim() != 2 or J.shape[0] < 1 or J.shape[1] < 1:
        raise ValueError(f"J must have shape [k, P] with k, P >= 1, got {tuple(J.shape)}")
    if J.dtype not in _FLOATS:
        raise ValueError(f"J must be a float tensor (fp16/bf16/fp32/fp64), got {J.dtype}")


def check_G(G: torch.Tensor) -> None:
    """Raise unless ``G`` is a floating [k, k] tensor with k >= 1."""
    if not isinstance(G, torch.Tensor):
        raise TypeError(f"G must be a torch.Tensor, got {type(G).__name__}")
    if G.dim() != 2 or G.shape[0] != G.shape[1] or G.shape[0] < 1:
        raise ValueError(f"G must have shape [k, k] with k >= 1, got {tuple(G.shape)}")
    if G.dtype not in _FLOATS:
        raise ValueError(f"G must be a float tensor, got {G.dtype}")


def check_out_distinct(out: torch.Tensor) -> None:
    """Raise if the [P] tensor ``out`` has a zero stride: its elements share one memory
    location, so a kernel would leave one of the P results there (torch refuses such writes)."""
    if out.numel() > 1 and out.stride(0) == 0:
        raise ValueError(
            "out has stride 0 (an expanded tensor): its elements share one memory location, so "
            "the P results cannot all be written; pass a tensor with one element per column "
            "(e.g. torch.empty(P) or out.clone())"
        )


def check_combine(w: torch.Tensor, J: torch.Tensor, out: torch.Tensor | None) -> None:
    """Raise unless ``w: [k]``, ``J: [k, P]`` and ``out: [P]`` (or None) fit together."""
    check_J(J)
    k, P = J.shape
    if not isinstance(w, torch.Tensor) or w.shape != (k,) or w.dtype not in _FLOATS:
        got = f"{tuple(w.shape)} {w.dtype}" if isinstance(w, torch.Tensor) else type(w).__name__
        raise ValueError(f"w must be a float tensor of shape [k]=[{k}], got {got}")
    if out is not None:
        if not isinstance(out, torch.Tensor) or out.shape != (P,) or out.dtype not in _FLOATS:
            got = (
                f"{tuple(out.shape)} {out.dtype}"
                if isinstance(out, torch.Tensor)
                else type(out).__name__
            )
            raise ValueError(f"out must be a float tensor of shape [P]=[{P}], got {got}")
        check_out_distinct(out)
    devices = {t.device for t in (w, J, out) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"w, J and out must share one device, got {sorted(map(str, devices))}")


def check_orders(G: torch.Tensor, orders: torch.Tensor) -> None:
    """Raise unless ``orders`` is an integer [k, k] tensor on G's device."""
    k = G.shape[0]
    if not isinstance(orders, torch.Tensor):
        raise TypeError(f"orders must be a torch.Tensor, got {type(orders).__name__}")
    if orders.shape != (k, k) or orders.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"orders must be an int64 or int32 tensor of shape [k, k]=[{k}, {k}], "
            f"got {tuple(orders.shape)} {orders.dtype}"
        )
    if orders.device != G.device:
        raise ValueError(f"orders is on {orders.device} but G is on {G.device}")


@contextlib.contextmanager
def ieee_fp32_matmul() -> Iterator[None]:
    """Full float32 matmuls inside the block whatever the caller set (TF32 on CUDA through
    ``allow_tf32`` or ``set_float32_matmul_precision("high")``, bf16 passes in oneDNN on the
    CPU through "medium"); the caller's settings are restored on exit. Host-side flags only
    (no sync); they are process-wide, so a matmul on another thread meanwhile sees them too."""
    matmul = getattr(torch.backends.mkldnn, "matmul", None)
    if matmul is not None and hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        # torch >= 2.9: per-backend settings, which never raise when read, unlike the legacy
        # getter after a mix of the two APIs
        backends = (torch.backends.cuda.matmul, matmul)
        saved = [b.fp32_precision for b in backends]
        try:
            for b in backends:
                b.fp32_precision = "ieee"
            yield
        finally:
            for b, value in zip(backends, saved):
                b.fp32_precision = value
    else:
        saved = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(saved)


_CHUNKED_FROM = 1 << 16  # columns; below this one product is as fast
_CHUNKS = 64


def _chunks(J: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: N803
    """[k, P] (any strides) -> (body [64, k, L], tail [k, P - 64 L]): 64 column blocks
    as one batch of products, and the columns left over."""
    k, P = J.shape  # noqa: N806
    L = P // _CHUNKS  # noqa: N806
    return J[:, : L * _CHUNKS].view(k, _CHUNKS, L).transpose(0, 1), J[:, L * _CHUNKS :]


def _chunked_gram(J: torch.Tensor) -> torch.Tensor:  # noqa: N803
    """J J^T as the sum of 64 partial Grams over column blocks (one batched product).

    A single [k, P] x [P, k] product with k << P keeps one long reduction per entry, which CPU
    BLAS runs slowly (about 5x slower at k = 5, P = 755009) and sums less accurately.
    """
    body, tail = _chunks(J)
    G = torch.bmm(body, body.transpose(1, 2)).sum(0)  # noqa: N806
    return G + tail @ tail.T if tail.shape[1] else G


def _chunked_combine(w: torch.Tensor, J: torch.Tensor) -> list[torch.Tensor]:  # noqa: N803
    """w @ J as [head, tail] temporaries over 64 column blocks (one batched product) and the
    columns left over: CPU BLAS runs the single [1, k] x [k, P] product on one long row, about
    4x slower at k = 5, P = 755009."""
    body, tail = _chunks(J)
    head = torch.bmm(w.expand(_CHUNKS, 1, -1), body).view(-1)  # blocks in column order
    return [head, w @ tail]


def gram_ref(J: torch.Tensor, upcast: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Gram matrix of the cluster gradients and a finiteness flag.

    Args:
        J: [k, P] per-cluster gradients, any float dtype, any strides.
        upcast: compute in float64 (test oracle) instead of float32.

    Returns:
        G: [k, k] = J J^T (float32; float64 with ``upcast`` or for a float64 J, whose Gram
            float32 would round: nearly parallel clusters' weights then move), exactly
            symmetric; float32 in full precision whatever the matmul precision setting
            (``ieee_fp32_matmul``).
        finite: 0-d bool, False if J has a NaN/inf entry (or a squared row norm overflows
            G's dtype, which makes G unusable too).
    """
    check_J(J)
    Jf = J.to(torch.float64 if upcast or J.dtype == torch.float64 else torch.float32)
    with ieee_fp32_matmul():  # the fp32 G the kernel is tested against, never TF32 or bf16
        chunked = Jf.shape[1] >= _CHUNKED_FROM
        G = _chunked_gram(Jf) if chunked else Jf @ Jf.T
    # one triangle, mirrored (as the kernel does): (G + G.T) / 2 overflowed entries above
    # FLT_MAX / 2 that fit, which read as a non-finite J
    G = G.triu() + G.triu(1).mT
    # a NaN/inf in row i makes the sum of squares G[i, i] NaN/inf: no second pass over J
    return G, torch.isfinite(G.diagonal()).all()


def combine_ref(w: torch.Tensor, J: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``out = w @ J`` accumulated in float32 (float64 for float64 J), in full float32 precision
    whatever the matmul precision setting (``ieee_fp32_matmul``). A BLAS product: its summation
    order (and FMA use) is the library's, so it matches the sequential loop over the clusters
    to rounding only.

    Args:
        w: [k] weights. J: [k, P]. out: [P] any float dtype, may be one of J's rows.

    Returns:
        ``out`` (written in place) or, when None, a new [P] tensor of the accumulation dtype.
    """
    check_combine(w, J, out)
    acc = torch.float64 if J.dtype == torch.float64 else torch.float32
    Ja, wa = J.to(acc), w.to(acc)
    with ieee_fp32_matmul():  # temporaries, so `out` may alias a row of J
        chunked = Ja.shape[1] >= _CHUNKED_FROM
        parts = _chunked_combine(wa, Ja) if chunked else [wa @ Ja]
    if out is None:
        return torch.cat(parts) if len(parts) > 1 else parts[0]
    for part, dst in zip(parts, out.split([p.shape[0] for p in parts])):
        dst.copy_(part)
    return out


def pcgrad_weights_ref(G: torch.Tensor, orders: torch.Tensor) -> torch.Tensor:
    """Gram-space PCGrad: weights w [k] with ``w @ J = sum_i g_i'``.

    Row i of C holds g_i' in the basis of the original g's. For t = 0..k-1 and
    j = orders[i, t]: d = C[i] . G[:, j]; if d < 0 and G[j, j] != 0, C[i, j] -= d / G[j, j].
    All rows advance together (they are independent), so there are k vectorised steps.

    Args:
        G: [k, k] Gram matrix (fp32 or fp64). orders: [k, k] int, each row a permutation.

    Returns:
        w = C.sum(0): [k] in G's dtype; NaN everywhere if G has a NaN or inf entry (a NaN
        dot product fails ``d < 0`` and would leave finite weights).
    """
    check_G(G)
    check_orders(G, orders)
    k = G.shape[0]
    orders = orders.long()
    C = torch.eye(k, dtype=G.dtype, device=G.device)
    diag = G.diagonal()
    for t in range(k):
        j = orders[:, t]  # [k]: the cluster each row projects against at step t
        cols = G.index_select(1, j)  # [k, k]: column i is G[:, j_i]
        d = (C * cols.T).sum(1)  # [k]
        g_jj = diag.index_select(0, j)
        hit = (d < 0) & (g_jj != 0)
        coef = torch.where(hit, d / torch.where(g_jj != 0, g_jj, torch.ones_like(g_jj)), 0.0)
        C.scatter_add_(1, j[:, None], -coef[:, None])
    return C.sum(0) + (G * 0).sum()


def nash_start(G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Active-cluster mask, masked Gram and the Newton start point (all float64).

    Inactive clusters (G[i, i] <= 0) get an identity row/column in ``Gt`` and a = 1, so they
    have zero gradient and a zero Newton step without any masking inside the loop. The start
    is a_i = s / sqrt(G_ii) with the scale s that is optimal along that direction; it is the
    exact solution for orthogonal and for parallel gradients.
    """
    k = G.shape[0]
    diag = G.diagonal()
    act = diag > 0
    both = act[:, None] & act[None, :]
    eye = torch.eye(k, dtype=torch.bool, device=G.device)
    Gt = torch.where(both, G, eye.to(G.dtype))
    u = torch.where(act, torch.where(act, diag, 1.0).rsqrt(), 0.0)
    q = u @ (Gt @ u)
    n = act.to(G.dtype).sum()
    s = (n / torch.where(q > 0, q, 1.0)).sqrt()
    return act, Gt, torch.where(act, s * u, 1.0)


NASH_TOL = 1e-6  # largest max_i |a_i (G a)_i - 1| (G normalised or not) accepted as a solution


def nash_weights_ref(G: torch.Tensor, iters: int = 40, normalize: bool = True) -> torch.Tensor:
    """Nash-MTL weights: alpha > 0 with alpha * (G alpha) = 1, solved in float64.

    alpha minimises f(a) = 0.5 a^T G a - sum_i log a_i (self-concordant). Each iteration takes
    the Newton step dx = -H^{-1} grad (H = G + diag(1/a^2)) scaled by 1/(1+lambda) while the
    Newton decrement lambda = sqrt(grad . H^{-1} grad) >= 1/4 (this keeps a > 0 and decreases f
    by a fixed amount), and a full step once lambda < 1/4 (quadratic convergence).

    Degenerate input: a cluster with G[i, i] <= 0 (no samples, zero gradient) gets weight 0 and
    is left out of the solve. A non-finite G gives an all-NaN result, and so does a solve that
    did not reach a solution: some a_i <= 0 or max_i |a_i (G a)_i - 1| > ``NASH_TOL`` after the
    fixed steps (also with ``iters=0`` unless the start solves G: orthogonal or parallel
    gradients). That happens where the active clusters nearly admit a > 0 with G a = 0 (one
    cluster's gradient opposing the others' sum: the solution is far away, and for a G that
    float32 rounding left slightly indefinite it may not exist); the engine then keeps the last
    weights for that step.

    Args:
        G: [k, k] Gram matrix. iters: fixed number of Newton steps (no early exit).
        normalize: return the weights of G / ||G||_F; else those of G itself (the former
            divided by sqrt(||G||_F)). Either is solved on G / ||G||_F, the norm taken in two
            factors (max |G| and the norm relative to it) so that no scale overflows or
            underflows, from subnormal entries to 1e308.

    Returns:
        alpha: [k] float64.
    """
    check_G(G)
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"iters must be an int >= 0, got {iters!r}")
    G64 = G.to(torch.float64)
    ok = torch.isfinite(G64).all()
    # solved on G / ||G||_F whatever ``normalize`` says (Newton's iterates are invariant under
    # G -> c G, a -> a / sqrt(c)), the norm taken in two factors so that neither overflows nor
    # underflows: max |G| and the norm of G / max |G| (in [1, k])
    big = G64.abs().amax()
    big = torch.where(big > 0, big, 1.0)
    G64 = G64 / big
    rel = torch.linalg.matrix_norm(G64)
    rel = torch.where(rel > 0, rel, 1.0)
    G64 = G64 / rel
    act, Gt, a = nash_start(G64)
    H = torch.empty_like(Gt)
    for _ in range(iters):
        r = a.reciprocal()
        grad = torch.mv(Gt, a).sub_(r)
        H.copy_(Gt).diagonal().addcmul_(r, r)  # H = G + diag(1/a^2)
        x = torch.linalg.solve_ex(H, grad)[0]  # solve_ex: no error check, so no host sync
        lam = torch.dot(grad, x).clamp_min_(0.0).sqrt_()
        step = torch.where(lam < 0.25, 1.0, (1.0 + lam).reciprocal())
        a = a - step * x
    res = (a * torch.mv(Gt, a) - 1.0).abs()
    solved = ((res <= NASH_TOL) & (a > 0)) | ~act  # False for NaN
    ok = ok & solved.all()
    if not normalize:  # a / sqrt(||G||_F) solves G itself
        a = a / big.sqrt() / rel.sqrt()
    return torch.where(ok, torch.where(act, a, 0.0), torch.nan)


_M32 = 0xFFFFFFFF
_PHILOX_MUL = (0xD2511F53, 0xCD9E8D57)  # round multipliers (Philox4x32)
_PHILOX_KEY = (0x9E3779B9, 0xBB67AE85)  # key increments
_TWO_M24 = 1.0 / (1 << 24)


def check_uniform(
    seed: int, step: torch.Tensor, n: int, out: torch.Tensor | None = None, offset: int = 0
) -> None:
    """Raise unless ``seed`` is in [0, 2**64), ``step`` a one-element int64 tensor, ``n`` and
    ``offset`` ints >= 0 and ``out`` (or None) a float32 [n] tensor on step's device."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 1 << 64:
        raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")
    if not isinstance(step, torch.Tensor) or step.numel() != 1 or step.dtype != torch.int64:
        got = f"{tuple(step.shape)} {step.dtype}" if isinstance(step, torch.Tensor) else step
        raise ValueError(f"step must be a one-element int64 tensor (the counter), got {got}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset < 1 << 62:
        raise ValueError(f"offset must be an int in [0, 2**62), got {offset!r}")
    if out is not None and (
        not isinstance(out, torch.Tensor) or out.shape != (n,) or out.dtype != torch.float32
        or out.device != step.device
    ):  # fmt: skip
        got = f"{tuple(out.shape)} {out.dtype} on {out.device}" if isinstance(
            out, torch.Tensor) else type(out).__name__  # fmt: skip
        raise ValueError(f"out must be a float32 [n]=[{n}] tensor on {step.device}, got {got}")


def _mul32(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of a * b for uint32 values a (held in int64) and b: the halves
    of b keep every partial product below 2**49, so int64 never overflows."""
    p_lo, p_hi = a * (b & 0xFFFF), a * (b >> 16)
    mid = p_lo + ((p_hi & 0xFFFF) << 16)
    return (p_hi >> 16) + (mid >> 32), mid & _M32


def philox_ref(counters: torch.Tensor, seed: int) -> torch.Tensor:
    """Philox4x32-10 (Salmon et al., SC 2011): the 4 output words of each counter.

    Args:
        counters: [m, 4] int64 holding uint32 words (c0, c1, c2, c3).
        seed: key (seed low, seed high), an int in [0, 2**64).

    Returns:
        [m, 4] int64 holding the uint32 output words.
    """
    c = list(counters.unbind(1))
    k0, k1 = seed & _M32, seed >> 32
    for _ in range(10):
        hi0, lo0 = _mul32(c[0], _PHILOX_MUL[0])
        hi2, lo2 = _mul32(c[2], _PHILOX_MUL[1])
        c = [hi2 ^ c[1] ^ k0, lo2, hi0 ^ c[3] ^ k1, lo0]
        k0, k1 = (k0 + _PHILOX_KEY[0]) & _M32, (k1 + _PHILOX_KEY[1]) & _M32
    return torch.stack(c, dim=1)


def uniform_ref(
    seed: int, step: torch.Tensor, n: int, out: torch.Tensor | None = None, offset: int = 0
) -> torch.Tensor:
    """Values offset .. offset + n - 1 of the counter-based uniform stream (seed, step).

    Value m is word m % 4 of ``philox_ref`` on the counter (m // 4 low, m // 4 high, step low,
    step high) under the key ``seed``, as (word >> 8) * 2**-24: 24 random bits, exact in
    float32, never 1.0. It depends on (seed, step, m) only, so a stream indexed by a step counter
    on the device resumes exactly from (seed, step) and skips nothing when a step does not
    advance the counter, and any range of it can be drawn on its own. No host sync: ``step``
    stays a tensor.

    Args:
        seed: key in [0, 2**64). step: one-element int64 tensor (>= 0) on the output's device.
        n: number of values. out: optional float32 [n] on step's device. offset: first value.

    Returns:
        [n] float32 (``out`` when given).
    """
    check_uniform(seed, step, n, out, offset)
    first = offset // 4
    blocks = torch.arange(first, (offset + n + 3) // 4, dtype=torch.int64, device=step.device)
    s = step.reshape(()).to(torch.int64)
    counters = torch.stack([blocks & _M32, blocks >> 32, (s & _M32).expand_as(blocks),
                            ((s >> 32) & _M32).expand_as(blocks)], dim=1)  # fmt: skip
    words = philox_ref(counters, seed).reshape(-1)[offset - 4 * first :][:n]
    u = (words >> 8).to(torch.float32) * _TWO_M24
    return u if out is None else out.copy_(u)


_GRADDROP_CHUNK = 8192  # columns per pass of the reference: temporaries of (k + 8) * 8192 values


def check_graddrop(
    J: torch.Tensor,
    present: torch.Tensor,
    leak: float,
    divisor: torch.Tensor,
    out: torch.Tensor | None,
    step: torch.Tensor | None = None,
) -> None:
    """Raise unless J [k, P], present [k] bool, leak in [0, 1], divisor a one-element float
    tensor, out (or None) a float [P] tensor and the stream's step (or None) fit together on
    one device."""
    check_J(J)
    k, P = J.shape
    ok = isinstance(present, torch.Tensor) and present.shape == (k,)
    if not ok or present.dtype != torch.bool:
        got = f"{tuple(present.shape)} {present.dtype}" if isinstance(
            present, torch.Tensor) else type(present).__name__  # fmt: skip
        raise ValueError(f"present must be a bool tensor of shape [k]=[{k}], got {got}")
    if isinstance(leak, bool) or not isinstance(leak, (int, float)) or not 0 <= leak <= 1:
        raise ValueError(f"leak must be a number in [0, 1], got {leak!r}")
    if not isinstance(divisor, torch.Tensor) or divisor.numel() != 1 or (
        divisor.dtype not in _FLOATS):  # fmt: skip
        raise ValueError(f"divisor must be a one-element float tensor, got {divisor!r}")
    if out is not None and (
        not isinstance(out, torch.Tensor) or out.shape != (P,) or out.dtype not in _FLOATS
    ):
        got = f"{tuple(out.shape)} {out.dtype}" if isinstance(
            out, torch.Tensor) else type(out).__name__  # fmt: skip
        raise ValueError(f"out must be a float tensor of shape [P]=[{P}], got {got}")
    if out is not None:
        check_out_distinct(out)
    devices = {t.device for t in (J, present, divisor, out, step) if isinstance(t, torch.Tensor)}
    if len(devices) > 1:
        raise ValueError(
            "J, present, divisor, out and step must share one device, got "
            f"{sorted(map(str, devices))}"
        )


def graddrop_ref(
    J: torch.Tensor,
    present: torch.Tensor,
    seed: int,
    step: torch.Tensor,
    leak: float = 0.0,
    divisor: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    chunk: int | None = None,
) -> torch.Tensor:
    """GradDrop's update, column by column (Chen et al. 2020, "Just Pick a Sign").

    With g_i = J[i, p] for present clusters (absent rows count as 0): purity
    P_p = 0.5 (1 + sum_i g_i / sum_i |g_i|) (0.5 where all are 0), U_p = value p of
    ``uniform_ref(seed, step)``, kept M_i = [P_p > U_p][g_i > 0] + [P_p < U_p][g_i < 0], and
    out[p] = (sum_i (g_i if M_i else leak g_i)) / divisor. Sums run over i in order, in float32
    (float64 for float64 J). The columns are processed in chunks, so the temporaries stay
    O(k * chunk) whatever P, and ``out`` may be one of J's rows.

    Args:
        J: [k, P]. present: [k] bool. seed, step: the stream of U (``uniform_ref``).
        leak: the weight of dropped entries, in [0, 1]. divisor: one-element float tensor
            (None: 1), e.g. the number of present clusters. out: [P] float (None: J's dtype).
        chunk: columns per pass (None: 8192 on the CPU, at least P / 32 elsewhere).

    Returns:
        ``out`` (written) or a new [P] tensor.
    """
    if divisor is None:
        divisor = torch.ones((), device=J.device)
    check_graddrop(J, present, leak, divisor, out, step)
    check_uniform(seed, step, 0)
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"chunk must be a positive int (columns per pass) or None, got {chunk!r}")
    k, P = J.shape
    acc = torch.float64 if J.dtype == torch.float64 else torch.float32
    out = torch.empty(P, dtype=J.dtype, device=J.device) if out is None else out
    div = divisor.reshape(()).to(acc)
    wide = max(_GRADDROP_CHUNK, -(-P // 32))  # off the CPU: at most 32 passes of launches
    size = chunk or (_GRADDROP_CHUNK if J.device.type == "cpu" else wide)
    for a in range(0, P, size):
        b = min(P, a + size)
        g = torch.where(present[:, None], J[:, a:b].to(acc), 0.0)
        total, mass = torch.zeros(b - a, dtype=acc, device=J.device), torch.zeros(
            b - a, dtype=acc, device=J.device)  # fmt: skip
        for i in range(k):
            total += g[i]
            mass += g[i].abs()
        purity = 0.5 * (1.0 + total / torch.where(mass > 0, mass, 1.0))
        u = uniform_ref(seed, step, b - a, offset=a).to(acc)
        pos, neg = purity > u, purity < u
        res = torch.zeros_like(total)
        for i in range(k):
            kept = (pos & (g[i] > 0)) | (neg & (g[i] < 0))
            res += torch.where(kept, g[i], leak * g[i])
        out[a:b] = res / div
    return out

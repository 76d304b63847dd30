"""PCGrad and Nash-MTL weights for Gram matrices on the CPU: the C++ solvers of antdiff._C.

On a GPU the Triton kernels of ant_kernels compute these weights without a host sync. On the CPU
the host is the device, and the per-step cost of the [k, k] problems is the number of operators:
the torch references issue about 100 (PCGrad) and 800 (Nash-MTL, 40 Newton steps) tiny
operators, 0.2 and 0.7-0.85 ms at k = 5 on a 2-core machine, 3-5% of a small model's training step.
The C++ versions do the same arithmetic in float64 in one call.

``pcgrad_weights`` and ``nash_weights`` route CPU tensors here when the kernel policy
(``ANT_KERNELS_BACKEND``) is ``auto``, Triton does not serve them (it does under the interpreter,
``TRITON_INTERPRET=1``) and the extension is built; everything else goes to ant_kernels. For
positive semidefinite G (every Gram matrix) results agree with the float64 references to
rounding (tests/test_native.py). The Nash solve factors H = G + diag(1/a^2) by Cholesky (NaN
where H is not definite); a solve that ends without a solution is NaN in every implementation.
"""

from __future__ import annotations

import warnings

import torch

import ant_kernels
from ant_kernels._dispatch import backend, backend_reasons
from ant_kernels.reference import check_G, check_graddrop, check_orders, check_uniform
from antdiff.interval_dp import BUILD_HINT, import_extension

try:
    _C = import_extension()
except ImportError as _exc:  # not built: ant_kernels serves every device
    _C = None
    if "stale" in str(_exc):  # built from older sources: say so once, then use the references
        warnings.warn(f"{_exc} ({BUILD_HINT}); using the torch references meanwhile",
                      RuntimeWarning, stacklevel=2)  # fmt: skip


def _cpu_cpp(op: str, *tensors, k: int | None = None) -> bool:
    """Whether C++ serves ``op`` for these tensors: the extension is built, torch is not tracing,
    every one is a CPU tensor, the policy is ``auto`` and no Triton kernel serves the first."""
    return (
        _C is not None
        and not torch.compiler.is_compiling()
        and all(isinstance(t, torch.Tensor) and t.device.type == "cpu" for t in tensors)
        and backend() == "auto"
        and len(backend_reasons(op, tensors[0], k=k)) > 0
    )


def serves(op: str, G: torch.Tensor) -> bool:
    """Whether the C++ solver of ``op`` ("pcgrad", "nash") takes this Gram matrix: a CPU tensor
    under the ``auto`` policy that no Triton kernel serves, with the extension built."""
    return _cpu_cpp(op, G, k=G.shape[0] if isinstance(G, torch.Tensor) and G.dim() == 2 else None)


def _host64(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A C-contiguous dense copy (or x itself) whose memory holds x's values in ``dtype``."""
    if x.layout != torch.strided:
        raise ValueError(f"expected a dense (strided) tensor, got layout {x.layout}")
    return x.detach().resolve_neg().resolve_conj().to(dtype).contiguous()


def pcgrad_weights(G: torch.Tensor, orders: torch.Tensor) -> torch.Tensor:
    """``ant_kernels.pcgrad_weights``, in C++ for CPU tensors; float64 [k]."""
    if not isinstance(G, torch.Tensor) or not serves("pcgrad", G):
        return ant_kernels.pcgrad_weights(G, orders).to(torch.float64)
    check_G(G)
    check_orders(G, orders)
    k = G.shape[0]
    g, o = _host64(G, torch.float64), _host64(orders, torch.int64)
    w = torch.empty(k, dtype=torch.float64)
    _C._pcgrad_weights_at(g.data_ptr(), o.data_ptr(), k, w.data_ptr())
    return w


def nash_weights(G: torch.Tensor, iters: int = 40, normalize: bool = True) -> torch.Tensor:
    """``ant_kernels.nash_weights``, in C++ for CPU tensors; float64 [k]."""
    if not isinstance(G, torch.Tensor) or not serves("nash", G):
        return ant_kernels.nash_weights(G, iters=iters, normalize=normalize).to(torch.float64)
    check_G(G)
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"iters must be an integer >= 0, got {iters!r}")
    k = G.shape[0]
    g = _host64(G, torch.float64)
    alpha = torch.empty(k, dtype=torch.float64)
    _C._nash_weights_at(g.data_ptr(), k, iters, normalize, alpha.data_ptr())
    return alpha


def serves_uw(*tensors: torch.Tensor) -> bool:
    """Whether UW's reduction runs in C++ for these tensors: the extension is built, torch is
    not tracing (torch.compile), every tensor is a C-contiguous CPU tensor, int64 for the
    cluster ids (the third), else float32. (Not tied to the kernel policy: no Triton kernel
    does this reduction.)"""
    if _C is None or torch.compiler.is_compiling():
        return False
    return all(_host_layout(x, torch.int64 if i == 2 else torch.float32)
               for i, x in enumerate(tensors))  # fmt: skip


def _host_layout(x: object, want: torch.dtype) -> bool:
    """A C-contiguous CPU tensor of dtype ``want``: what the C++ reads through a raw pointer."""
    return (isinstance(x, torch.Tensor) and x.device.type == "cpu" and x.dtype == want
            and x.is_contiguous() and not x.is_neg())  # fmt: skip


_HOST32 = {"dtype": torch.float32, "device": "cpu"}  # whatever torch's defaults are


def _check_uw(fn, **tensors: torch.Tensor) -> None:
    """The C++ reads raw pointers: refuse what ``serves_uw`` would not serve, naming it."""
    if _C is None:
        raise RuntimeError(f"{fn.__name__}: the C++ extension antdiff._C is not built")
    for name, x in tensors.items():
        want = torch.int64 if name == "cid" else torch.float32
        if not _host_layout(x, want):
            got = (f"{x.dtype} on {x.device}, contiguous={x.is_contiguous()}"
                   + (", a negative view (resolve_neg() first)" if x.is_neg() else "")
                   if isinstance(x, torch.Tensor) else type(x).__name__)  # fmt: skip
            raise ValueError(
                f"{fn.__name__}: {name} must be a contiguous CPU {want} tensor, got {got} "
                "(check with serves_uw first)"
            )


def uw_forward(per, s, cid, inv, present, *, checked: bool = True) -> tuple[torch.Tensor, ...]:
    """UW's reduction of per-sample losses ``per`` [B] in clusters ``cid`` [B] with 1 / counts
    ``inv`` [k], presence ``present`` [k] (float 1 / 0) and log-variances ``s`` [k] (tensors
    that ``serves_uw`` accepts): total (0-d), L, c, coef, ds [k] (csrc/step_ops.h). Three
    separate tensors: the total, L and c (the caller's), coef and ds (for the backward).
    ``checked=False`` skips the dtype / device / layout checks (a caller that asked
    ``serves_uw`` first: UW's autograd node, every CPU step)."""
    if checked:
        _check_uw(uw_forward, per=per, s=s, cid=cid, inv=inv, present=present)
    k, B = inv.shape[0], per.shape[0]  # noqa: N806
    if (per.shape != (B,) or cid.shape != (B,) or s.shape != (k,) or inv.shape != (k,)
            or present.shape != (k,)):  # fmt: skip
        raise ValueError(
            f"uw_forward needs per, cid [B] and s, inv, present [k]; got per "
            f"{tuple(per.shape)}, cid {tuple(cid.shape)}, s {tuple(s.shape)}, inv "
            f"{tuple(inv.shape)}, present {tuple(present.shape)}"
        )
    total = torch.empty((), **_HOST32)
    Lc, saved = torch.empty(2 * k, **_HOST32), torch.empty(2 * k, **_HOST32)  # noqa: N806
    _C._uw_forward_at(
        per.data_ptr(), cid.data_ptr(), B, inv.data_ptr(), present.data_ptr(), s.data_ptr(),
        k, total.data_ptr(), Lc.data_ptr(), saved.data_ptr(),
    )  # fmt: skip
    L, c = Lc.split(k)  # noqa: N806
    coef, ds = saved.split(k)
    return total, L, c, coef, ds


def uw_backward(g, coef, cid, *, checked: bool = True) -> torch.Tensor:
    """d per_n = g * coef[cid_n] (float32 [B]; g 0-d, coef [k], cid [B] in [0, k), as for
    uw_forward; the C++ checks the ids as it reads them; ``checked`` as for uw_forward)."""
    if checked:
        _check_uw(uw_backward, g=g, coef=coef, cid=cid)
    if g.dim() != 0 or coef.dim() != 1 or cid.dim() != 1:
        raise ValueError(
            f"uw_backward needs g 0-d, coef [k] and cid [B]; got g {tuple(g.shape)}, coef "
            f"{tuple(coef.shape)}, cid {tuple(cid.shape)}"
        )
    d_per = torch.empty(cid.shape[0], **_HOST32)
    _C._uw_backward_at(
        g.data_ptr(), coef.data_ptr(), coef.shape[0], cid.data_ptr(), cid.shape[0], d_per.data_ptr()
    )
    return d_per


def uniform(seed: int, step: torch.Tensor, n: int, offset: int = 0) -> torch.Tensor:
    """``ant_kernels.uniform`` (float32 [n], bit-identical everywhere), in C++ for a CPU counter
    under the ``auto`` policy that no Triton kernel serves: one call that reads the counter from
    host memory (about 2 ms for 755k values on 2 cores, against 26 ms for the reference's int64
    arithmetic)."""
    if not _cpu_cpp("uniform", torch.empty(0, **_HOST32), step):
        return ant_kernels.uniform(seed, step, n, offset=offset)
    check_uniform(seed, step, n, offset=offset)
    out = torch.empty(n, **_HOST32)
    s = step.detach().resolve_neg().reshape(1).contiguous()
    _C._philox_uniform_at(seed, s.data_ptr(), offset, n, out.data_ptr())
    return out


def graddrop(J, present, seed, step, leak, divisor, out=None) -> torch.Tensor:
    """``ant_kernels.graddrop``, in C++ for float32 CPU tensors (J with contiguous columns, out
    contiguous or None) under the ``auto`` policy that no Triton kernel serves: one pass over
    J, no temporaries, bit-identical to the reference."""
    cpp = (
        _cpu_cpp("graddrop", J, present, step, divisor, *(() if out is None else (out,)))
        and J.dtype == torch.float32
        and not J.is_neg()  # a negative view's memory holds -J
        and J.dim() == 2
        and (J.shape[1] <= 1 or J.stride(1) == 1)
        and (J.shape[0] == 1 or J.stride(0) >= J.shape[1])  # rows apart (not an expand)
        and (out is None or (out.dtype == torch.float32 and out.is_contiguous()
                             and not out.is_neg()))
    )
    if not cpp:  # ant_kernels checks the arguments and names what does not fit
        return ant_kernels.graddrop(J, present, seed, step, leak, divisor, out)
    check_graddrop(J, present, leak, divisor, out, step)
    check_uniform(seed, step, 0)
    k, P = J.shape  # noqa: N806
    out = torch.empty(P, **_HOST32) if out is None else out
    keep = present.to(torch.float32).contiguous()
    div = divisor.detach().resolve_neg().reshape(1).to(torch.float32).contiguous()
    s = step.detach().resolve_neg().reshape(1).contiguous()
    _C._graddrop_at(J.data_ptr(), k, P, J.stride(0) if k > 1 else P, keep.data_ptr(), seed,
                s.data_ptr(), float(leak), div.data_ptr(), out.data_ptr())  # fmt: skip
    return out

"""Backend choice for ant_kernels: Triton kernel or pure-torch reference.

``ANT_KERNELS_BACKEND`` selects the policy (read at call time, never cached):

- ``auto`` (default): Triton when it can serve the tensors, else the reference;
- ``triton``: Triton or a RuntimeError that lists every reason it cannot;
- ``torch``: always the reference.

Triton serves CUDA tensors, and CPU tensors only under the interpreter (``TRITON_INTERPRET=1``
set before triton was imported, because ``triton.jit`` picks interpreter or compiler when a
kernel is decorated). The backend choice queries nothing from CUDA (``Tensor.is_cuda`` is a
property of the tensor); ``on_device`` asks for the current device when a tensor is on CUDA.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

import torch

try:
    import triton
except ImportError:  # triton is an optional dependency
    triton = None

HAS_TRITON = triton is not None
BACKENDS = ("auto", "triton", "torch")

# Largest k each Triton kernel is built for (register tiles are [BK, BK] or [BK, BP]).
MAX_K = {"gram": 64, "combine": 64, "pcgrad": 64, "nash": 32, "graddrop": 64, "uniform": None}
# dtypes each op's Triton kernel reads; other dtypes go to the reference.
DTYPES = {
    "gram": (torch.float32, torch.bfloat16, torch.float16),
    "combine": (torch.float32, torch.bfloat16, torch.float16),
    "pcgrad": (torch.float32, torch.float64),
    "nash": (torch.float32, torch.float64),
    "graddrop": (torch.float32, torch.bfloat16, torch.float16),
    "uniform": (torch.float32,),  # the output
}

# Whether the kernels were decorated under the interpreter (set by `jit` below).
_jit_interpreted: set[bool] = set()


def _interpret_env() -> bool:
    """``TRITON_INTERPRET`` as Triton reads it (1, true, on or yes, in any case): "true" ran
    Triton's interpreter while the dispatch refused CPU tensors as not interpreted."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def jit(fn: Callable) -> Callable:
    """``triton.jit`` that records the interpreter mode; identity when triton is missing."""
    if triton is None:
        return fn
    _jit_interpreted.add(_interpret_env())
    return triton.jit(fn)


def backend() -> str:
    """The policy from ``ANT_KERNELS_BACKEND`` (default ``auto``)."""
    value = os.environ.get("ANT_KERNELS_BACKEND", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"ANT_KERNELS_BACKEND={value!r} is not valid; use one of {BACKENDS}")
    return value


def interpreting() -> bool:
    """True when Triton kernels run under the CPU interpreter."""
    return _interpret_env()


def interpreted(t: torch.Tensor) -> bool:
    """Whether a launch on ``t`` runs under the CPU interpreter, and so takes its few, large
    blocks: CPU tensors only reach Triton there, CUDA tensors when the kernels were built with
    ``TRITON_INTERPRET=1``. Not the variable at launch time: set after the import on a GPU, it
    gave compiled kernels the interpreter's tiles (18 KB of spills a thread in gram)."""
    return not t.is_cuda or True in _jit_interpreted


def backend_reasons(op: str, *tensors: torch.Tensor, k: int | None = None) -> list[str]:
    """Every reason the Triton kernel of ``op`` cannot serve ``tensors``; empty if it can.

    Args:
        op: one of ``gram``, ``combine``, ``pcgrad``, ``nash``, ``graddrop``, ``uniform``.
        *tensors: the op's tensor inputs (and ``out``); the first one's dtype is checked.
        k: number of clusters, checked against the kernel's largest tile.

    Returns:
        Human-readable reasons, in a fixed order.
    """
    if op not in MAX_K:
        raise ValueError(f"op={op!r} is not valid; use one of {tuple(MAX_K)}")
    reasons = []
    if backend() == "torch":
        reasons.append("ANT_KERNELS_BACKEND=torch forces the reference")
    if not HAS_TRITON:
        reasons.append("triton is not installed")
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        reasons.append(f"tensors are on several devices: {sorted(map(str, devices))}")
    others = sorted({str(t.device) for t in tensors if t.device.type not in ("cuda", "cpu")})
    if others:  # meta, mps, xpu, ...: neither a GPU kernel nor the interpreter reads them
        reasons.append(f"tensors on {', '.join(others)}: Triton runs CUDA tensors (or CPU ones "
                       "under TRITON_INTERPRET=1)")  # fmt: skip
    elif any(not t.is_cuda for t in tensors):
        if not interpreting():
            reasons.append("tensors are not on CUDA and TRITON_INTERPRET!=1")
        elif HAS_TRITON and True not in _jit_interpreted:
            reasons.append(
                "kernels were built without the interpreter: set TRITON_INTERPRET=1 "
                "before importing ant_kernels"
            )
    if any(t.is_neg() or t.is_conj() for t in tensors):  # a lazy view: the raw memory lacks it
        reasons.append(
            "a tensor carries torch's lazy negation or conjugation bit, which a kernel reading "
            "its memory would not apply: call .resolve_neg() / .resolve_conj() on it"
        )
    if tensors and tensors[0].dtype not in DTYPES[op]:
        names = ", ".join(str(d) for d in DTYPES[op])
        reasons.append(f"{op}: dtype {tensors[0].dtype} is not supported (supported: {names})")
    if k is not None and MAX_K[op] is not None and k > MAX_K[op]:
        reasons.append(f"{op}: k={k} exceeds the kernel's limit {MAX_K[op]}")
    return reasons


def use_triton(op: str, *tensors: torch.Tensor, k: int | None = None) -> bool:
    """Apply the policy: True for Triton, False for the reference, or raise if forced."""
    reasons = backend_reasons(op, *tensors, k=k)
    if not reasons:
        return True
    if backend() == "triton":
        raise RuntimeError(
            f"ANT_KERNELS_BACKEND=triton but Triton cannot run {op}: " + "; ".join(reasons)
            + ". Unset ANT_KERNELS_BACKEND (or set it to auto) to fall back to the torch "
            "reference there, or to torch to use the references everywhere"
        )
    return False


def on_device(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """The context a launch on ``t`` runs in: Triton launches on the current CUDA device and
    its current stream, whatever device the pointers belong to, so a tensor on another device
    than the current one makes its device current for the launch. A no-op for CPU tensors and
    for tensors on the current device (one ``current_device`` query, no sync)."""
    if t.is_cuda and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def next_pow2(n: int, floor: int = 1) -> int:
    """Smallest power of two >= max(n, floor)."""
    n = max(int(n), floor)
    return 1 << (n - 1).bit_length()


def column_parts(P: int) -> list[slice]:
    """Column ranges to launch a P-wide kernel over: [0, P - P % 16) and the rest.

    Triton marks an integer argument divisible by 16 when it is, and only then can it prove a
    ``columns < P`` mask constant over a thread's adjacent columns and load them as one vector;
    a model's parameter count rarely is (P = 755009 compiles to scalar loads and twice the
    registers). The first launch gets the divisible bound, the second the < 16 remaining
    columns (same kernel, same arithmetic per column)."""
    main = P - P % 16
    return [slice(0, main), slice(main, P)] if 0 < main < P else [slice(0, P)]

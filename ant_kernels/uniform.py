"""Counter-based uniforms: u = uniform(seed, step, n) without a host sync or a host-side state.

Maths: value m of the stream (seed, step) is word m % 4 of Philox4x32-10 (Salmon et al., SC
2011) on the counter (m // 4 low, m // 4 high, step low, step high) under the key (seed low,
seed high), as (word >> 8) * 2**-24 in [0, 1). ``step`` is read from device memory, so a
method can keep its step counter on the device, advance it by a step's validity flag, and a
skipped step leaves the stream exactly where it was; (seed, step) is the whole state.

Tiling: the grid runs over the counters in blocks of BLOCK; a program computes the 4 words of
each of its counters (10 rounds of 32-bit multiplies, in registers) and stores the 4 * BLOCK
values it owns as one contiguous block.

Determinism: every value is a pure function of (seed, step, m): bit-identical on every device,
for every block size, in the torch reference (ant_kernels.reference.uniform_ref) and in
antdiff's C++ path for CPU tensors.
"""

from __future__ import annotations

import torch

from ._dispatch import interpreted, interpreting, jit, on_device, use_triton
from .reference import check_uniform, uniform_ref

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference serves everything then
    triton = tl = None

__all__ = ["uniform"]


@jit
def _uniform_kernel(p_step, p_out, N, offset, seed, BLOCK: tl.constexpr):
    i_b = tl.program_id(0)
    first = offset // 4 + i_b.to(tl.int64) * BLOCK
    o_c = first + tl.arange(0, BLOCK)  # counters of this program
    b_step = tl.load(p_step).to(tl.uint64)
    c0 = (o_c & 0xFFFFFFFF).to(tl.uint32)
    c1 = (o_c >> 32).to(tl.uint32)
    c2 = tl.zeros([BLOCK], dtype=tl.uint32) + (b_step & 0xFFFFFFFF).to(tl.uint32)
    c3 = tl.zeros([BLOCK], dtype=tl.uint32) + (b_step >> 32).to(tl.uint32)
    w0, w1, w2, w3 = tl.philox(seed, c0, c1, c2, c3, 10)
    # join stacks on a new last axis: [BLOCK, 2, 2] holds word 2 a + b at [c, a, b], so the
    # flat [4 * BLOCK] has word j of counter c at 4 c + j
    b_w = tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), [4 * BLOCK])
    b_u = (b_w >> 8).to(tl.float32) * (1.0 / 16777216.0)
    o_v = first * 4 + tl.arange(0, 4 * BLOCK) - offset  # positions in out
    tl.store(p_out + o_v, b_u, mask=(o_v >= 0) & (o_v < N))


def _config(interp: bool | None = None) -> tuple[int, int]:
    """(BLOCK counters, num_warps): fixed, no autotune."""
    if interpreting() if interp is None else interp:
        return 16384, 4  # few, large blocks: the interpreter's cost is per program
    return 256, 4


def _args(step: torch.Tensor, out: torch.Tensor, n: int, seed: int, offset: int = 0) -> tuple:
    """The kernel's runtime arguments, in order (shared with ``ant_kernels.aot``)."""
    return step, out, n, offset, seed


def uniform_triton(
    seed: int,
    step: torch.Tensor,
    n: int,
    out: torch.Tensor,
    block: int | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """Launch the Triton kernel (no dispatch). ``block`` overrides the counters per program."""
    bc, warps = _config(interpreted(out))
    bc = block or bc
    if n > 0:
        blocks = (offset + n + 3) // 4 - offset // 4
        nprog = -(-blocks // bc)
        args = _args(step, out, n, seed, offset)
        with on_device(out):
            _uniform_kernel[(nprog,)](*args, BLOCK=bc, num_warps=warps)
    return out


def uniform(
    seed: int, step: torch.Tensor, n: int, out: torch.Tensor | None = None, offset: int = 0
) -> torch.Tensor:
    """Values offset .. offset + n - 1 of the counter-based uniform stream (seed, step) (see the
    module docstring).

    Args:
        seed: key in [0, 2**64).
        step: one-element int64 tensor (>= 0) on the output's device; read by the kernel, never
            by the host.
        n: number of values.
        out: optional float32 [n] on step's device.
        offset: the first value's position in the stream (>= 0).

    Returns:
        [n] float32 (``out`` when given). Bit-identical across backends and devices.
    """
    check_uniform(seed, step, n, out, offset)
    target = out if out is not None else torch.empty(0, dtype=torch.float32, device=step.device)
    if not use_triton("uniform", target, step):
        return uniform_ref(seed, step, n, out, offset)
    fresh = out is None or not out.is_contiguous()
    dst = torch.empty(n, dtype=torch.float32, device=step.device) if fresh else out
    uniform_triton(seed, step, n, dst, offset=offset)
    return dst if out is None or dst is out else out.copy_(dst)

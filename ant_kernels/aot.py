"""Ahead-of-time builds of every kernel for a CUDA architecture, on a machine without a GPU.

Triton lowers a kernel to PTX and assembles it with the ptxas shipped in its wheel; neither step
needs a device. Building each kernel in the configurations the launchers choose (``_config``)
catches what the CPU interpreter cannot: code that does not lower for the GPU, and register
pressure that spills to local memory (a bandwidth loss for gram / combine). The report lists
registers, spill stack and shared memory per configuration, as ptxas assigned them.

    python -m ant_kernels.aot [--arch 90] [--json]

Run without ``TRITON_INTERPRET=1`` (the kernels must be compiled functions, not interpreted).
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import math
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

K_VALUES = (2, 5, 8, 16, 32, 64)
# P a multiple of 16 (vectorisable rows) and not (755009: the benchmark UNet's P)
P_VALUES = (2**20, 755009)
_DIV16 = [["tt.divisibility", 16]]
# launch options among a plan's keyword arguments (the rest are constexprs)
_OPTIONS = ("num_warps", "enable_fp_fusion")
_DT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
       "fp64": torch.float64}  # fmt: skip


class _Mock:
    """A 16-byte aligned CUDA tensor, as far as Triton's specialiser looks: contiguous, or with
    rows ``row`` elements apart (a column range of a wider tensor)."""

    def __init__(self, dtype: torch.dtype, *shape: int, row: int | None = None) -> None:
        self.dtype, self.shape, self.row = dtype, shape, row

    def stride(self, dim: int) -> int:
        if dim == 0 and self.row is not None:
            return self.row
        return math.prod(self.shape[dim + 1 :])

    def data_ptr(self) -> int:
        return 0


def _launches() -> list[tuple[str, Any, tuple, dict]]:
    """(name, kernel, runtime arguments, constexprs + num_warps) of each launch to build.

    The arguments come from the launchers' own ``_args`` and the options from their ``_plan``
    / ``_config``, applied to stand-in tensors: what ``kernel[grid](...)`` would receive.
    """
    names = ("gram", "combine", "pcgrad", "nash", "graddrop", "uniform", "_dispatch")
    mod = {m: importlib.import_module(f"{__package__}.{m}") for m in names}
    gram, combine, pcgrad, nash = (mod[m] for m in ("gram", "combine", "pcgrad", "nash"))
    max_k = mod["_dispatch"].MAX_K
    out = []
    # the launchers' column parts of J [k, P] with rows padded to 16 elements (the engine's
    # buffer): a part of width divisible by 16, then the rest
    parts = [(P, c.stop - c.start) for P in P_VALUES for c in mod["_dispatch"].column_parts(P)]
    for k, dt, (P, n) in itertools.product(K_VALUES, ("fp32", "bf16", "fp16"), parts):
        J = _Mock(_DT[dt], k, n, row=-(-P // 16) * 16)
        if k <= max_k["gram"]:
            grid, meta = gram._plan(J)
            args = gram._args(J, _Mock(torch.float32, gram._spans(grid, meta), k, k))
            out.append((f"gram k={k} {dt} P={n}", gram._kernel(meta), args, meta))
        if k <= max_k["combine"]:
            for out_dt in {dt, "fp32"}:  # out = a row of J (the engine), or a new fp32 tensor
                args = combine._args(_Mock(torch.float32, k), J, _Mock(_DT[out_dt], n))
                out.append((f"combine k={k} {dt}->{out_dt} P={n}", combine._combine_kernel, args,
                            combine._plan(J)[1]))  # fmt: skip
    for cfg, dt in itertools.product(gram.TILINGS, ("fp32", "bf16")):  # the benchmark's
        J = _Mock(_DT[dt], 5, 2**20)
        grid, meta = gram._plan(J, config=cfg)
        args = gram._args(J, _Mock(torch.float32, gram._spans(grid, meta), 5, 5))
        out.append((f"gram tiling {cfg} k=5 {dt}", gram._kernel(meta), args, meta))
    for k, dt in itertools.product(K_VALUES, ("fp32", "fp64")):
        G = _Mock(_DT[dt], k, k)
        if k <= max_k["pcgrad"]:
            bk, warps = pcgrad._config(k)
            args = pcgrad._args(G, _Mock(torch.int64, k, k), _Mock(_DT[dt], k))
            out.append((f"pcgrad k={k} {dt}", pcgrad._pcgrad_kernel, args,
                        {"BK": bk, "num_warps": warps}))  # fmt: skip
        if k <= max_k["nash"]:
            bk, warps = nash._config(k)
            args = nash._args(G, _Mock(torch.float64, k), 20)
            out.append((f"nash k={k} {dt}", nash._nash_kernel, args,
                        {"NORMALIZE": True, "BK": bk, "TOL": nash.NASH_TOL,
                         "num_warps": warps}))  # fmt: skip
    graddrop = mod["graddrop"]
    for k, dt, (P, n) in itertools.product(K_VALUES, ("fp32", "bf16"), parts):
        if k <= max_k["graddrop"]:
            J = _Mock(_DT[dt], k, n, row=-(-P // 16) * 16)
            bp, warps = graddrop._config(k)
            args = graddrop._args(J, _Mock(torch.float32, k), _Mock(torch.int64, 1),
                                  _Mock(torch.float32, 1), _Mock(_DT[dt], n), P - n, 0.0, 3)
            out.append((f"graddrop k={k} {dt} P={n}", graddrop._graddrop_kernel, args,
                        {"K": k, "BLOCK_P": bp, "num_warps": warps}))  # fmt: skip
    uniform = mod["uniform"]
    bc, warps = uniform._config()
    for n, seed in itertools.product(P_VALUES, (1, 3, 2**40 + 3, 2**64 - 1)):  # 1 is a constant
        args = uniform._args(_Mock(torch.int64, 1), _Mock(torch.float32, n), n, seed)
        out.append((f"uniform n={n} seed={seed}", uniform._uniform_kernel, args,
                    {"BLOCK": bc, "num_warps": warps}))  # fmt: skip
    return out


def _source(fn: Any, args: tuple, meta: dict) -> Any:
    """The ASTSource Triton's launcher would compile for ``fn[grid](*args, **meta)``: each
    runtime argument specialised as Triton does (ints equal to 1 become constants, multiples
    of 16 and 16-byte aligned pointers are marked divisible)."""
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.compiler import ASTSource
    from triton.runtime.jit import native_specialize_impl

    names = [n for n in fn.arg_names if n not in meta]
    if len(names) != len(args):
        raise RuntimeError(f"{fn.__name__}: {len(args)} arguments for parameters {names}")
    signature, constexprs, attrs = {}, {}, {}
    for name, arg in zip(names, args):
        ty, spec = native_specialize_impl(CUDABackend, arg, False, True, True)
        if ty == "constexpr":
            constexprs[name] = spec
        else:
            signature[name] = ty
            if spec == "D":
                attrs[(fn.arg_names.index(name),)] = _DIV16
    for name, value in meta.items():
        if name not in _OPTIONS:
            constexprs[name] = value
    signature = {n: signature.get(n, "constexpr") for n in fn.arg_names}
    return ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)


def _usage(cubin: bytes, tool: Path) -> dict[str, int]:
    """REG / STACK / SHARED / LOCAL of the (single) kernel in ``cubin``, from cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run(
            [str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True,
            check=True,
        ).stdout  # fmt: skip
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text))
    if "REG" not in fields:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{text}")
    return {key.lower(): int(v) for key, v in fields.items()}


def build_all(arch: int = 90) -> list[dict[str, Any]]:
    """Compile every kernel configuration for sm_<arch>; their ptxas resource usage."""
    from ._dispatch import interpreting

    if interpreting():
        raise RuntimeError("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    import triton
    from triton.backends.compiler import GPUTarget

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        raise RuntimeError(f"{tool} is missing: this triton wheel ships no CUDA tools")
    target = GPUTarget("cuda", arch, 32)
    rows = []
    for name, fn, args, meta in _launches():
        options = {key: value for key, value in meta.items() if key in _OPTIONS}
        compiled = triton.compile(_source(fn, args, meta), target=target, options=options)
        rows.append({"kernel": name, "num_warps": meta["num_warps"],
                     **_usage(compiled.asm["cubin"], tool)})  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m ant_kernels.aot", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (90: H100)")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = ap.parse_args(argv)
    rows = build_all(args.arch)
    if args.json:
        print(json.dumps(rows))
        return 0
    for r in rows:
        print(f"{r['kernel']:<34} warps={r['num_warps']} reg={r['reg']:<4} stack={r['stack']:<5} "
              f"shared={r['shared']}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

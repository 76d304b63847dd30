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
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

K_VALUES = (2, 5, 8, 16, 32, 64)
_DIV16 = [["tt.divisibility", 16]]


def _specs() -> list[tuple[str, Any, dict, dict, list[str], int]]:
    """(name, kernel, runtime signature, constexprs, 16-divisible args, num_warps) per build.

    The signatures are what Triton's launcher specialises for a contiguous, 16-byte aligned J
    whose P is a multiple of 16 (unit strides become constants).
    """
    # the package re-exports functions under the module names: fetch the modules themselves
    mod = {m: importlib.import_module(f"{__package__}.{m}") for m in ("gram", "combine", "pcgrad",
                                                                      "nash")}  # fmt: skip
    gram, combine, pcgrad, nash = (mod[m] for m in ("gram", "combine", "pcgrad", "nash"))
    from . import _dispatch

    out = []
    for k in K_VALUES:
        if k <= _dispatch.MAX_K["gram"]:
            bk, bp, ch, warps = gram._config(k)
            for dt in ("fp32", "bf16", "fp16"):
                sig = {"p_J": f"*{dt}", "p_W": "*fp32", "K": "i32", "P": "i32", "s_k": "i32"}
                const = {"s_p": 1, "BK": bk, "BLOCK_P": bp, "CHUNKS": ch,
                         "NATIVE_DOT": dt != "fp32"}  # fmt: skip
                out.append((f"gram k={k} {dt}", gram._gram_kernel, sig, const,
                            ["p_J", "p_W", "P", "s_k"], warps))  # fmt: skip
        if k <= _dispatch.MAX_K["combine"]:
            bp, warps = combine._config(k)
            for dt in ("fp32", "bf16"):
                sig = {"p_w": "*fp32", "p_J": f"*{dt}", "p_out": "*fp32", "P": "i32",
                       "s_w": "i32", "s_k": "i32"}  # fmt: skip
                const = {"s_p": 1, "s_o": 1, "K": k, "BLOCK_P": bp}
                out.append((f"combine k={k} {dt}", combine._combine_kernel, sig, const,
                            ["p_w", "p_J", "p_out", "P", "s_k"], warps))  # fmt: skip
        if k <= _dispatch.MAX_K["pcgrad"]:
            bk, warps = pcgrad._config(k)
            sig = {"p_G": "*fp32", "p_O": "*i64", "p_w": "*fp32", "K": "i32", "s_g0": "i32",
                   "s_g1": "i32", "s_o0": "i32", "s_o1": "i32"}  # fmt: skip
            out.append((f"pcgrad k={k}", pcgrad._pcgrad_kernel, sig, {"BK": bk}, [], warps))
        if k <= _dispatch.MAX_K["nash"]:
            bk, warps = nash._config(k)
            sig = {"p_G": "*fp32", "p_a": "*fp64", "K": "i32", "ITERS": "i32", "s_g0": "i32",
                   "s_g1": "i32"}  # fmt: skip
            const = {"NORMALIZE": True, "BK": bk}
            out.append((f"nash k={k}", nash._nash_kernel, sig, const, [], warps))
    return out


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
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        raise RuntimeError(f"{tool} is missing: this triton wheel ships no CUDA tools")
    target = GPUTarget("cuda", arch, 32)
    rows = []
    for name, fn, sig, const, div16, warps in _specs():
        src = ASTSource(
            fn=fn,
            signature={**sig, **{c: "constexpr" for c in const}},
            constexprs=const,
            attrs={(fn.arg_names.index(a),): _DIV16 for a in div16},
        )
        compiled = triton.compile(src, target=target, options={"num_warps": warps})
        rows.append({"kernel": name, "num_warps": warps, **const,
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
        print(f"{r['kernel']:<22} warps={r['num_warps']} reg={r['reg']:<4} stack={r['stack']:<5} "
              f"shared={r['shared']}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

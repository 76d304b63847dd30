"""``antdiff info`` (or ``python -m antdiff.info``): versions, the C++ extension, Triton /
CUDA, ANT_* settings."""

from __future__ import annotations

import importlib
import os
import platform
import sys

# Every environment variable antdiff and its benchmarks read, with its meaning (also listed in
# the README).
ENV_VARS = {
    "ANT_REQUIRE_CPP": "1 = error instead of the numpy DP fallback when antdiff._C is missing",
    "ANT_KERNELS_BACKEND": "auto | triton | torch: which implementation serves the kernels",
    "ANT_INCEPTION": "path of the FID Inception TorchScript file",
    "TRITON_INTERPRET": "1 = run Triton kernels on CPU tensors through the interpreter (tests)",
    "ANT_PEAK_BW": "benchmarks: the GPU's peak memory bandwidth in B/s (bench_kernels.py)",
    "ANT_BENCH_THREADS": "benchmarks: torch threads of bench_step.py (2)",
    "ANT_BENCH_ROUNDS": "benchmarks: timed rounds per bench_step.py case (10)",
    "ANT_GIT_SHA": "benchmarks, study, ntg: the commit recorded in results where there is no .git",
    "ANT_GPU_WORK": "scripts/gpu_check.sh: its work folder (/tmp/ant_gpu)",
    "ANT_GPU_TESTS_K": "scripts/gpu_check.sh: a pytest -k selection replacing the test stage's",
    "ANT_GPU_TEST_LIMIT": "scripts/gpu_check.sh: each test stage's time limit in s (540)",
    "ANT_GPU_DEADLINE": "scripts/gpu_check.sh: s after its start by which every stage must end "
    "(unset: none)",
    "ANT_GPU_KERNELS_K": "scripts/gpu_check.sh: the kernels stage's pytest -k selection (cuda)",
    "ANT_GPU_STEP_PARTS": "scripts/gpu_check.sh: the step stage's parts (small tiny; paper)",
    "ANT_DIST_TIMEOUT": "torchrun training: minutes a collective (a checkpoint's barrier) waits "
    "(30)",
}


def _version(mod: str) -> str:
    try:
        m = importlib.import_module(mod)
    except Exception as exc:  # noqa: BLE001 - report any import failure as text
        return f"not available ({type(exc).__name__}: {exc})"
    return getattr(m, "__version__", "installed")


def collect() -> dict[str, str]:
    import antdiff

    info = {
        "antdiff": antdiff.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "numpy": _version("numpy"),
        "torch": _version("torch"),
        "triton": _version("triton"),
    }
    from antdiff.interval_dp import BUILD_HINT, import_extension

    try:
        info["antdiff._C"] = f"built ({import_extension().__file__})"
    except ImportError as exc:
        info["antdiff._C"] = f"NOT usable ({exc}); {BUILD_HINT}"
    try:
        import torch

        if torch.cuda.is_available():
            names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            info["cuda"] = f"{torch.version.cuda}, devices: {', '.join(names)}"
        else:
            info["cuda"] = (
                "no CUDA device (gram/combine: torch references; PCGrad/Nash-MTL weights, "
                "GradDrop and the random streams: C++ in antdiff._C when built)"
            )
    except ImportError:
        pass
    from antdiff.utils import available_host_bytes, cgroup_free_bytes

    limit = cgroup_free_bytes()
    info["host memory"] = f"{available_host_bytes() / 2**30:.1f} GiB available" + (
        "" if limit is None else f" (the memory cgroup's limit leaves {limit / 2**30:.1f} GiB)"
    )
    for k in ENV_VARS:
        info[k] = os.environ.get(k, "(unset)")
    if "ANT_KERNELS_BACKEND" in os.environ:  # a bad value fails the first kernel call: say so
        try:
            from ant_kernels._dispatch import BACKENDS, backend
        except Exception:  # noqa: BLE001 -- a diagnostic must not fail (a broken Triton)
            pass
        else:
            try:
                backend()
            except ValueError:
                info["ANT_KERNELS_BACKEND"] += f"  (NOT valid: use one of {', '.join(BACKENDS)})"
    return info


def add_arguments(p) -> None:  # noqa: ARG001  (``antdiff info`` takes no options)
    pass


def run(args) -> int:  # noqa: ARG001
    main()
    return 0


def main() -> None:
    info = collect()
    width = max(map(len, info))
    for k, v in info.items():
        print(f"{k:<{width}}  {v}")


if __name__ == "__main__":
    main()

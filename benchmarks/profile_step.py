"""Where one training step's time goes: torch.profiler over a few steps of a bench_step scenario.

    python benchmarks/profile_step.py MODEL SCENARIO [SCENARIO ...] [--steps N] [--rows R]
    python benchmarks/profile_step.py MODEL SCENARIO [SCENARIO ...] --syncs

MODEL and SCENARIO are bench_step.py's names (e.g. ``adm-small ours-pcgrad-onepass``); on a GPU
the model runs on CUDA. Prints, per scenario, the mean step time and the operators with the
largest self time on the device (CUDA) or the CPU, averaged per step. ``--syncs`` (CUDA) instead
prints the Python stack of every host synchronisation in one step, as reported by
``torch.cuda.set_sync_debug_mode("warn")``.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "python")]  # noqa: E501

from benchmarks.bench_step import MODELS, THREADS, Setup, make_step  # noqa: E402


def profile(model: str, scenario: str, steps: int, rows: int) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    s = Setup(model, device)
    step = make_step(scenario, s)
    for _ in range(3):  # warm-up: compilation, buffers, the allocator's cache
        step()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    per_step = (time.perf_counter() - t0) / steps
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync()
    key = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    print(f"\n== {model} {scenario} on {device}: {1e3 * per_step:.2f} ms per step "
          f"(mean of {steps}); profiler totals are over {steps} steps")  # fmt: skip
    print(prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60))


def where_syncs(model: str, scenario: str) -> None:
    """Print the stack of each host sync in one step of ``scenario`` (CUDA only)."""
    s = Setup(model, "cuda")
    step = make_step(scenario, s)
    for _ in range(2):
        step()
    torch.cuda.synchronize()
    stacks = []

    def record(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ARG001
        if "called a synchronizing CUDA operation" in str(message):  # not the mode's notice
            stacks.append((str(message).splitlines()[0], traceback.format_stack()[:-2]))

    with warnings.catch_warnings():  # restores showwarning and the filters on exit
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    print(f"\n== {model} {scenario}: {len(stacks)} host sync(s) in one step")
    for n, (msg, stack) in enumerate(stacks, 1):
        frames = [f for f in stack if "site-packages" not in f][-6:]
        print(f"-- sync {n}: {msg}\n" + "".join(frames))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", choices=sorted(MODELS), help="a bench_step model")
    ap.add_argument("scenarios", nargs="+")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rows", type=int, default=15)
    ap.add_argument("--syncs", action="store_true", help="stacks of the host syncs (CUDA)")
    args = ap.parse_args()
    torch.set_num_threads(THREADS)  # as the benchmark runs
    for scenario in args.scenarios:
        if args.syncs:
            where_syncs(args.model, scenario)
        else:
            profile(args.model, scenario, args.steps, args.rows)


if __name__ == "__main__":
    main()

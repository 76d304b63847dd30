"""Interval-clustering DP: C++ vs numpy vs the naive O(k T^3) loop, side by side in one run.

Grid: every cost, T in {1000, 4000, 10000}, k in {2, 5, 8}, with and without the default
limits [T // (2k), 2T // k], algorithm "quadratic" (the same DP for every backend). The naive
loop runs at T = 1000 only (k = 5 always, k = 2 and 8 with limits), one round each. Plus the
divide-and-conquer DP at T = 100000, k = 5 for "l1" and "l2" on sorted log-SNR values.

    pytest benchmarks/bench_interval_dp.py --benchmark-json=raw.json [--quick]
        [--benchmark-timer time.process_time]   # on a shared machine (the committed results)
    python benchmarks/bench_interval_dp.py raw.json benchmarks/results/interval_dp_cpu
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

BACKENDS = ("cpp", "numpy", "naive")
MACHINE_KEYS = ("device", "cpu_model", "cpu_cores", "python", "numpy", "torch", "triton", "git_sha")


def _log_snr(T: int) -> np.ndarray:
    """[T] log-SNR of the linear schedule (betas rescaled by 1000 / T), decreasing."""
    a = np.cumprod(1.0 - np.linspace(1e-4, 0.02, T) * (1000.0 / T))
    return np.log(a) - np.log1p(-a)


def _make_input(kind: str, T: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(T)
    if kind == "l1":
        return {"values": _log_snr(T)}
    if kind == "l2":
        return {"values": rng.normal(size=T)}  # any order: the quadratic DP
    if kind == "l2-sorted":
        return {"values": _log_snr(T)}
    if kind == "affinity":  # affinity decays with |i - j|, plus noise
        t = np.arange(T, dtype=np.float64)
        a = np.exp(-np.abs(t[:, None] - t[None, :]) / (0.1 * T))
        a += 0.01 * rng.standard_normal((T, T))
        return {"matrix": a}
    return {"matrix": rng.random((T, T))}  # cost matrix C[l, r], upper triangle read


_CACHE: dict[tuple[str, int], dict[str, np.ndarray]] = {}


def _input(kind: str, T: int) -> dict[str, np.ndarray]:
    """One input alive at a time: a T = 10000 matrix is 800 MB."""
    if (kind, T) not in _CACHE:
        _CACHE.clear()
        _CACHE[(kind, T)] = _make_input(kind, T)
    return _CACHE[(kind, T)]


def _rounds(backend: str, T: int) -> int:
    if backend == "cpp":
        return 20 if T <= 4000 else 5
    if backend == "numpy":
        return {1000: 5, 4000: 2}.get(T, 1)
    return 1


def _grid() -> list[Any]:
    cases = []
    for kind in ("l1", "l2", "affinity", "matrix"):
        for T in (1000, 4000, 10000):
            for k in (2, 5, 8):
                for limited in (False, True):
                    for backend in BACKENDS:
                        if backend == "naive" and (T > 1000 or (k != 5 and not limited)):
                            continue
                        lim = "limits" if limited else "free"
                        quick = T == 1000 and k == 5 and limited and kind in ("l1", "affinity")
                        marks = [pytest.mark.quick] if quick and backend != "naive" else []
                        cases.append(
                            pytest.param(
                                kind, T, k, limited, backend,
                                id=f"{kind}-T{T}-k{k}-{lim}-{backend}", marks=marks,
                            )
                        )  # fmt: skip
    return cases


def _run(bench: Any, kind: str, T: int, k: int, limited: bool, backend: str, algo: str) -> None:
    from antdiff.interval_dp import solve_intervals  # here: the summariser runs without it

    data = _input(kind, T)
    lo, hi = (T // (2 * k), 2 * T // k) if limited else (None, None)
    cost = kind.split("-")[0]
    bench.group = f"{kind}-T{T}-k{k}-{'limits' if limited else 'free'}-{algo}"
    bench.extra_info.update(
        kind=kind, T=T, k=k, min_size=lo, max_size=hi, backend=backend, algorithm=algo
    )

    def solve() -> tuple[np.ndarray, float]:
        return solve_intervals(
            cost, k, **data, min_size=lo, max_size=hi, backend=backend, algorithm=algo
        )

    bounds, _ = bench.pedantic(solve, rounds=_rounds(backend, T), iterations=1, warmup_rounds=0)
    assert bounds[0] == 0 and bounds[-1] == T


@pytest.mark.parametrize(("kind", "T", "k", "limited", "backend"), _grid())
def test_interval_dp(bench: Any, kind: str, T: int, k: int, limited: bool, backend: str) -> None:
    _run(bench, kind, T, k, limited, backend, "quadratic")


@pytest.mark.parametrize("backend", ["cpp", "numpy"])
@pytest.mark.parametrize("limited", [False, True], ids=["free", "limits"])
@pytest.mark.parametrize("kind", ["l1", "l2-sorted"])
def test_interval_dp_large(bench: Any, kind: str, limited: bool, backend: str) -> None:
    bench.extra_info["rounds_note"] = "divide and conquer"
    _run(bench, kind, 100_000, 5, limited, backend, "dc")


def summarize(raw_json: str, out_stem: str) -> dict[str, Any]:
    """Reduce a --benchmark-json file to <out_stem>.json (medians, ratios) and <out_stem>.md."""
    raw = json.loads(Path(raw_json).read_text())
    cases: dict[str, dict[str, Any]] = {}
    machine: dict[str, Any] = {}
    for b in raw["benchmarks"]:
        info = dict(b["extra_info"])
        machine = {key: info.pop(key) for key in MACHINE_KEYS}
        backend = info.pop("backend")
        case = cases.setdefault(b["group"], {**info, "median_s": {}, "rounds": {}})
        case["median_s"][backend] = b["stats"]["median"]
        case["rounds"][backend] = b["stats"]["rounds"]
    for case in cases.values():
        med = case["median_s"]
        for peer in ("numpy", "naive"):
            if "cpp" in med and peer in med:
                case[f"cpp_speedup_vs_{peer}"] = med[peer] / med["cpp"]
    # process_time is the honest timer on a shared machine: single-threaded work, no waiting.
    timer = raw["benchmarks"][0]["options"]["timer"] if raw["benchmarks"] else "unknown"
    summary = {"machine": machine, "timer": timer, "cases": list(cases.values())}
    Path(out_stem + ".json").write_text(json.dumps(summary, indent=1) + "\n")
    Path(out_stem + ".md").write_text(_markdown(summary))
    return summary


def _markdown(summary: dict[str, Any]) -> str:
    m = summary["machine"]
    lines = [
        "# Interval-clustering DP benchmark",
        "",
        f"{m['device']} ({m['cpu_model']}); numpy {m['numpy']}, torch {m['torch']}, "
        f"triton {m['triton']}, python {m['python']}; git {m['git_sha']}.",
        "All backends measured side by side in one run; median seconds per solve (rounds in "
        f"the JSON), timer {summary['timer']}. Limits = [T // (2k), 2T // k]. C++ times include "
        "the input checks and prefix sums (an O(T^2) pass for affinity/matrix).",
        "",
        "| cost | T | k | limits | algorithm | C++ s | numpy s | naive s | C++ vs numpy | "
        "C++ vs naive |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in summary["cases"]:
        med = c["median_s"]
        cells = [f"{med[b]:.4g}" if b in med else "-" for b in BACKENDS]
        ratios = [
            f"{c[key]:.0f}x" if key in c else "-"
            for key in ("cpp_speedup_vs_numpy", "cpp_speedup_vs_naive")
        ]
        limits = f"[{c['min_size']}, {c['max_size']}]" if c["min_size"] else "none"
        lines.append(
            f"| {c['kind']} | {c['T']} | {c['k']} | {limits} | {c['algorithm']} | "
            + " | ".join(cells + ratios)
            + " |"
        )
    speedups = [c["cpp_speedup_vs_numpy"] for c in summary["cases"] if "cpp_speedup_vs_numpy" in c]
    if speedups:
        lines += [
            "",
            f"Median C++ speedup over numpy across cases: {statistics.median(speedups):.0f}x.",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    summarize(sys.argv[1], sys.argv[2])

"""Exact constrained interval clustering: split T timesteps into k contiguous clusters.

Minimises sum_m cost([b_m, b_{m+1})) over bounds 0 = b_0 < b_1 < ... < b_k = T (half-open
intervals), optionally with min_size <= b_{m+1} - b_m <= max_size. With c = l + (r - l - 1) // 2
(the middle index of [l, r)) the costs are:

- "l1": values v [T], monotone: sum_{t in [l, r)} |v_t - v_c| (v_c is a median of sorted v).
- "l2": values v [T], any order: sum of squared deviations from the interval mean.
- "affinity": matrix A [T, T]: -sum_{t in [l, r)} A[c, t].
- "matrix": matrix C [T, T]: C[l, r - 1] (inclusive indices; only the upper triangle is read).

Each is O(1) per interval after prefix sums, so the DP is O(k T^2) ("quadratic"), less inside
the size window; "dc" (divide and conquer over monotone argmins, O(k T log T)) serves the costs
with the quadrangle inequality: "l1", and "l2" on monotone values. Ties go to the smallest split
index: at each (m, i) the smallest j among the minimisers, so the returned optimum is the one
whose split points, read from the last backwards, are lexicographically smallest. That holds
among costs as computed in floating point: where two splits tie exactly in real arithmetic but
their costs round differently (non-integer data), "dc" and "quadratic", or the naive
reference (which sums each interval directly), may return different optima, equal up to
rounding. On exact data (small integers) "l1", "matrix" and "affinity" return the same split
with every method; "l2" divides by the interval length, so its costs are not exact there.

Backends: the C++ extension antdiff._C (GIL released), its numpy twin (bit-identical tables)
and the naive O(k T^3) reference. A missing extension falls back to numpy with one warning;
ANT_REQUIRE_CPP=1 makes that an error.
"""

from __future__ import annotations

import math
import operator
import os
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from antdiff import _dp_numpy
from antdiff.utils import available_host_bytes

__all__ = ["COSTS", "cpp_available", "interval_cost", "solve_intervals"]

COSTS = ("l1", "l2", "affinity", "matrix")
BACKENDS = ("auto", "cpp", "numpy", "naive")
ALGORITHMS = ("auto", "quadratic", "dc")
AUTO_DC_MIN_T = 4096  # "auto" uses "dc" when it is valid and T > this (as the C++ does)

def _build_hint() -> str:
    """How to (re)build antdiff._C: from the source checkout this package runs from, else (an
    installed wheel or sdist, with no repository root) by reinstalling the package."""
    root = Path(__file__).resolve().parents[2]
    if (root / "setup.py").is_file() and (root / "csrc").is_dir():
        return (f"build it with `make build` or `python setup.py build_ext --inplace` in {root}")
    return ("reinstall antdiff from what you installed it from to build it: `pip install "
            "--force-reinstall --no-deps <its wheel, sdist or source folder>`")


BUILD_HINT = _build_hint()

# The bindings this code calls; csrc/bindings.cpp sets the same number on the module.
# 2: NaN from nash_weights without a solution and pcgrad_weights of a non-finite G;
# 3: the address-taking solvers are private (_C._pcgrad_weights_at, ...) and refuse null;
# 4: solve_intervals refuses costs that overflow float64 (no Python check for it here)
ABI_VERSION = 5

_cpp: dict[str, Any] = {"tried": False, "module": None, "error": None, "warned": False}


def import_extension() -> ModuleType:
    """antdiff._C, or ImportError if it is missing or was built from other sources (a stale
    build after a pull without `make build`: it imported, then failed mid-step)."""
    from antdiff import _C

    built = getattr(_C, "ABI_VERSION", 0)
    if built != ABI_VERSION:
        raise ImportError(
            f"antdiff._C at {_C.__file__} is stale: built with bindings version {built}, this "
            f"code needs {ABI_VERSION}; rebuild it"
        )
    return _C


def _load_cpp() -> ModuleType | None:
    if not _cpp["tried"]:
        _cpp["tried"] = True
        try:
            _cpp["module"] = import_extension()
        except ImportError as exc:
            _cpp["error"] = exc
    return _cpp["module"]


def cpp_available() -> bool:
    """Whether the compiled extension antdiff._C can be imported."""
    return _load_cpp() is not None


def _require_cpp() -> ModuleType:
    module = _load_cpp()
    if module is None:
        raise ImportError(
            f"the C++ extension antdiff._C is missing ({_cpp['error']}); {BUILD_HINT}"
        )
    return module


def _pick_backend(backend: str) -> str:
    if backend in ("numpy", "naive"):
        return backend
    if backend == "cpp" or os.environ.get("ANT_REQUIRE_CPP", "0") == "1":
        _require_cpp()
        return "cpp"
    if _load_cpp() is not None:
        return "cpp"
    if not _cpp["warned"]:
        _cpp["warned"] = True
        warnings.warn(
            "antdiff._C (the C++ interval DP) is missing, using the slower numpy DP; "
            f"{BUILD_HINT} (set ANT_REQUIRE_CPP=1 to make this an error)",
            RuntimeWarning,
            stacklevel=3,
        )
    return "numpy"


def _check_choice(name: str, value: Any, valid: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in valid:
        shown = f"'{value}'" if isinstance(value, str) else repr(value)
        raise ValueError(f"{name} must be one of {', '.join(map(repr, valid))}; got {shown}")
    return value


def _monotone_direction(v: np.ndarray) -> tuple[int, int, int]:
    """(+1 non-decreasing | -1 non-increasing, not constant | 0, first rise t, first fall t)."""
    dv = np.diff(v)
    up, down = np.flatnonzero(dv > 0), np.flatnonzero(dv < 0)
    first_up, first_down = (int(up[0]) if up.size else -1), (int(down[0]) if down.size else -1)
    direction = 1 if first_down < 0 else (-1 if first_up < 0 else 0)
    return direction, first_up, first_down


def _validate_data(cost: str, values: Any, matrix: Any) -> tuple[np.ndarray, int]:
    """Returns (C-contiguous float64 data, monotone direction); the C++ checks the same.

    A matrix is not yet checked for NaN/inf: that O(T^2) pass is left to the caller.
    """
    _check_choice("cost", cost, COSTS)
    one_d = cost in ("l1", "l2")
    name, given, other, other_name = (
        ("values", values, matrix, "matrix") if one_d else ("matrix", matrix, values, "values")
    )
    if other is not None:
        raise ValueError(f"cost='{cost}' reads {name}=, not {other_name}=; got {other_name} too")
    if given is None:
        shape = "[T]" if one_d else "[T, T]"
        raise ValueError(f"cost='{cost}' needs {name}={shape}; got {name}=None")
    if hasattr(given, "detach"):  # a torch tensor, without importing torch
        if given.is_complex():
            raise ValueError(f"{name} must be real; got a complex tensor")
        given = given.detach().cpu().double().numpy()
    if np.iscomplexobj(given):  # the cast would drop the imaginary part with a mere warning
        raise ValueError(f"{name} must be real; got a complex array")
    data = np.asarray(given, dtype=np.float64)  # its shape checked before the copy below
    if one_d and (data.ndim != 1 or data.shape[0] < 1):
        raise ValueError(f"values must be a 1-D array [T] with T >= 1; got shape {data.shape}")
    if not one_d and (data.ndim != 2 or data.shape[0] != data.shape[1] or data.shape[0] < 1):
        raise ValueError(
            f"matrix must be a square 2-D array [T, T] with T >= 1; got shape {data.shape}"
        )
    data = np.ascontiguousarray(data)  # (which would make a scalar 1-D)
    direction = 0
    if one_d:
        _check_finite(cost, data)
        direction, up, down = _monotone_direction(data)
        if cost == "l1" and direction == 0:
            raise ValueError(
                "values must be monotone (non-decreasing or non-increasing) for cost='l1': "
                f"values[{up + 1}] > values[{up}] but values[{down + 1}] < values[{down}]; "
                "sort them or use cost='l2'"
            )
    return data, direction


def _check_finite(cost: str, data: np.ndarray) -> None:
    if np.isfinite(data).all():
        return
    bad = ~np.isfinite(data)
    if cost == "matrix":  # only the upper triangle is read, so only it must be finite
        bad = np.triu(bad)
        if not bad.any():
            return
    where = np.argwhere(bad)[0]
    if data.ndim == 1:
        raise ValueError(
            f"values contains NaN or inf at index {where[0]}; every entry must be finite"
        )
    raise ValueError(
        f"matrix contains NaN or inf at [{where[0]}, {where[1]}]; every entry must be finite"
    )


def validate_sizes(T: int, k: Any, min_size: Any, max_size: Any) -> tuple[int, int, int]:
    """Returns (k, resolved min size, resolved max size <= T)."""
    k = _as_int("k", k)
    if k < 1:
        raise ValueError(f"k must be >= 1; got {k}")
    if k > T:
        raise ValueError(f"k must be <= T = {T} (at least one timestep per cluster); got {k}")
    lo = None if min_size is None else _as_int("min_size", min_size)
    hi = None if max_size is None else _as_int("max_size", max_size)
    for name, size in (("min_size", lo), ("max_size", hi)):
        if size is not None and size < 1:
            raise ValueError(f"{name} must be >= 1 or None (no limit); got {size}")
    # feasible sizes satisfy min_size <= T // k <= ceil(T / k) <= max_size, so min <= max
    # too: checked this way, the message names the size that is out (a default one was named)
    where = f"is infeasible for k={k}, T={T}"
    if lo is not None and lo > T // k:
        raise ValueError(
            f"min_size={lo} {where} (k * min_size > T); use min_size <= T // k = {T // k} or None"
        )
    ceil_t_k = -(-T // k)
    if hi is not None and hi < ceil_t_k:
        raise ValueError(
            f"max_size={hi} {where} (k * max_size < T); use max_size >= ceil(T / k) = "
            f"{ceil_t_k} or None"
        )
    return k, 1 if lo is None else lo, T if hi is None else min(hi, T)


def _as_int(name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int; got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int; got {value!r}") from None


def _resolve_algorithm(algorithm: Any, cost: str, direction: int, T: int) -> bool:
    """True for divide and conquer."""
    _check_choice("algorithm", algorithm, ALGORITHMS)
    monge = cost == "l1" or (cost == "l2" and direction != 0)
    if algorithm == "dc" and not monge:
        got = "cost='l2' with non-monotone values" if cost == "l2" else f"cost='{cost}'"
        raise ValueError(
            "algorithm='dc' needs the quadrangle inequality: cost='l1', or cost='l2' with "
            f"monotone values; got {got}"
        )
    return algorithm == "dc" or (algorithm == "auto" and monge and T > AUTO_DC_MIN_T)


def solve_intervals(
    cost: str,
    k: int,
    *,
    values: Any = None,
    matrix: Any = None,
    min_size: int | None = None,
    max_size: int | None = None,
    backend: str = "auto",
    algorithm: str = "auto",
) -> tuple[np.ndarray, float]:
    """Optimal split of T timesteps into k contiguous clusters.

    Args:
        cost: "l1" | "l2" (give values) or "affinity" | "matrix" (give matrix).
        k: number of clusters, 1 <= k <= T.
        values: [T] array for "l1" (monotone) and "l2".
        matrix: [T, T] array: the affinity A, or the cost matrix C[l, r] of timesteps l..r.
        min_size, max_size: cluster-size limits (None = no limit).
        backend: "auto" (C++ if built, else numpy), "cpp", "numpy", "naive" (O(k T^3)).
        algorithm: "auto" ("dc" where valid and T > 4096), "quadratic", "dc".

    Returns:
        bounds: int64 [k + 1], bounds[0] = 0, bounds[k] = T; cluster m is [bounds[m], bounds[m+1]).
        total: the optimal summed cost (float).

    Raises:
        ValueError: bad input, naming the argument, the value and what is valid; l1 / l2
            values whose interval costs float64 cannot resolve (the split would not be sure
            to be optimal).
        ImportError: backend="cpp" (or ANT_REQUIRE_CPP=1) and the extension is not built.
    """
    _check_choice("backend", backend, BACKENDS)
    data, direction = _validate_data(cost, values, matrix)
    T = data.shape[0]
    k, lo, hi = validate_sizes(T, k, min_size, max_size)
    dc = _resolve_algorithm(algorithm, cost, direction, T)
    chosen = _pick_backend(backend)
    if chosen != "cpp":  # the C++ makes these checks itself, as fast
        if data.ndim == 2:
            _check_finite(cost, data)
        _check_magnitude(cost, data, k)
    _check_table_memory(T, k)
    if chosen == "cpp":
        algo = "dc" if dc else "quadratic"
        bounds, total = _require_cpp().solve_intervals(cost, data, k, lo, hi, algo)
    elif chosen == "numpy":
        bounds, total = _dp_numpy.solve_numpy(cost, data, k, lo, hi, direction, dc)
    else:
        bounds, total = _dp_numpy.solve_naive(cost, data, k, lo, hi)
    bounds = np.asarray(bounds, dtype=np.int64)
    if cost in ("l1", "l2") and chosen != "naive":
        _check_precision(cost, data, bounds, float(total))
    return bounds, float(total)


# a split is trusted when the estimated rounding error of its cost is below this share of it
PRECISION = 1e-4


def _check_precision(cost: str, data: np.ndarray, bounds: np.ndarray, total: float) -> None:
    """Refuse a split whose interval costs the DP could not resolve in float64.

    The l1 / l2 cost of an interval is a difference of prefix sums over the centred values x
    (of x for l1, of x^2 for l2). Their rounding error grows with the largest prefix S (the
    sum of |x| or of x^2) and the steps summed: about eps S per cost in the final formula,
    plus eps S sqrt(T) accumulated along the sums (nothing on integer data, whose sums are
    exact below 2^53; l1 on such data has exact costs and is never refused). Values far apart
    at the scale of the clusters' own spread (two groups 1e8 apart, each of unit spread) make
    it exceed the costs being compared: the split is then not the optimal one, and the total
    not its cost. This estimates the error over the k clusters and refuses a split whose cost
    it does not leave resolved to 1e-4."""
    T = data.shape[0]
    x = data - (data[int(np.argmin(np.abs(data - data.sum() / T)))] if cost == "l2"
                else data[(T - 1) // 2])  # fmt: skip
    scale = float((x * x).sum()) if cost == "l2" else float(np.abs(x).sum())
    exact = scale < 2.0**53 and bool(np.all(data == np.round(data)))
    if exact and cost == "l1" and 8.0 * scale < 2.0**53:
        # integers throughout: the l1 formula adds, subtracts and multiplies them (its terms
        # stay within 4 scale, the DP's sums within 8), so every cost and total is exact
        return
    err = len(bounds) * np.finfo(np.float64).eps * scale * (1.0 if exact else math.sqrt(T))
    if err <= PRECISION * total:  # then the total is the split's cost, resolved
        return
    true = sum(_dp_numpy.direct_cost(cost, data, int(a), int(b))
               for a, b in zip(bounds[:-1], bounds[1:], strict=True))  # fmt: skip
    if true <= 0.0 or err <= PRECISION * true:  # a split of zero cost is optimal anyway
        return
    raise ValueError(
        f"interval DP ({cost}): float64 cannot resolve these values' interval costs: the "
        f"prefix sums' rounding error (about {err:.3g}) is not small against the split's cost "
        f"({true:.6g}; the DP's total read {total:.6g}), so the split may not be optimal. The "
        "values span a range far wider than the clusters' own spread: transform them (e.g. "
        "take logs), or pass the interval costs computed directly as cost='matrix'"
    )


def _check_table_memory(T: int, k: int) -> None:
    """The DP keeps a cost and a split table of (k + 1) x (T + 1) entries (16 bytes each):
    refused up front when it exceeds the memory available, a container's cgroup limit included
    (the kernel's OOM killer would end the process instead of an error)."""
    need = 16 * (k + 1) * (T + 1)
    have = available_host_bytes()
    if need > have:
        raise ValueError(
            f"the interval DP for k={k}, T={T} needs {need / 2**30:.1f} GiB of tables "
            f"((k + 1) (T + 1) x 16 bytes) and {have / 2**30:.1f} GiB is available: use "
            "fewer clusters, or bins of timesteps (a coarser T)"
        )


def _check_magnitude(cost: str, data: np.ndarray, k: int) -> None:
    """Refuse values whose interval costs or sums could overflow float64 somewhere in the DP:
    an overflowed candidate would be skipped and the split silently not optimal."""
    T = data.shape[0]  # noqa: N806
    read = np.triu(data) if cost == "matrix" else data  # the matrix cost reads one triangle
    with np.errstate(over="ignore", invalid="ignore"):
        finite = np.abs(read[np.isfinite(read)])  # inf/NaN get their own error (or are unread)
        top = float(finite.max()) if finite.size else 0.0
        # bounds of the largest intermediate: n * sum(x^2) (l2), prefix sums, k summed costs
        bound = {"l2": T * T * top * top, "l1": 4.0 * T * top, "affinity": 2.0 * T * T * top,
                 "matrix": 2.0 * k * top}[cost]  # fmt: skip
    if not bound < 1e300:
        raise ValueError(
            f"interval DP ({cost}): the costs overflow float64 (the largest |value| is "
            f"{top:.3g}); rescale the input"
        )


def interval_cost(cost: str, bounds: Any, *, values: Any = None, matrix: Any = None) -> float:
    """Total cost of a given split, each interval recomputed from the definition.

    Args:
        cost, values, matrix: as for :func:`solve_intervals`.
        bounds: int [k + 1], 0 = bounds[0] < bounds[1] < ... < bounds[k] = T.

    Returns:
        sum over clusters of cost([bounds[m], bounds[m+1])).
    """
    data, _ = _validate_data(cost, values, matrix)
    if data.ndim == 2:
        _check_finite(cost, data)
    T = data.shape[0]
    b = np.asarray(bounds)
    if b.ndim != 1 or b.size < 2 or not np.issubdtype(b.dtype, np.integer):
        raise ValueError(f"bounds must be a 1-D int array [k + 1] with k >= 1; got {bounds!r}")
    if b[0] != 0 or b[-1] != T or np.any(np.diff(b) <= 0):
        raise ValueError(f"bounds must increase strictly from 0 to T = {T}; got {b.tolist()}")
    return float(
        sum(
            _dp_numpy.direct_cost(cost, data, int(l), int(r))
            for l, r in zip(b[:-1], b[1:], strict=True)
        )
    )

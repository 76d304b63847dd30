"""Tests for antdiff.interval_dp: C++ == numpy, both == brute force, dc == quadratic, goldens.

The extension must be built (`python setup.py build_ext --inplace`): importing antdiff._C
below fails loudly on purpose (CI sets ANT_REQUIRE_CPP=1, so a broken build cannot hide).
"""

from __future__ import annotations

import itertools
import math
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from antdiff import _C, interval_dp
from antdiff.interval_dp import interval_cost, solve_intervals

KINDS = ("l1", "l2", "affinity", "matrix")


def _data(kind: str, T: int, rng: np.random.Generator, integer: bool = False) -> dict:
    """Random input; integer=True gives small integers (exact sums, so many exact ties)."""
    if kind in ("l1", "l2"):
        v = rng.integers(-3, 4, size=T).astype(float) if integer else rng.normal(size=T)
        if kind == "l1":
            v = np.sort(v)[:: rng.choice([-1, 1])]
        return {"values": v}
    m = rng.integers(-3, 4, size=(T, T)).astype(float) if integer else rng.normal(size=(T, T))
    if kind == "matrix":
        m = np.abs(m)
        m[np.tril_indices(T, -1)] = np.nan  # never read: a NaN there would poison the result
    return {"matrix": m}


def _ref_cost(kind: str, x: np.ndarray, l: int, r: int) -> float:
    """Cost of [l, r) from its definition with plain Python sums (exact on small integers)."""
    c = l + (r - l - 1) // 2
    if kind == "l1":
        return sum(abs(float(x[t]) - float(x[c])) for t in range(l, r))
    if kind == "l2":
        mean = sum(float(x[t]) for t in range(l, r)) / (r - l)
        return sum((float(x[t]) - mean) ** 2 for t in range(l, r))
    if kind == "affinity":
        return -sum(float(x[c, t]) for t in range(l, r))
    return float(x[l, r - 1])


def _brute_force(kind: str, x: np.ndarray, k: int, lo: int | None, hi: int | None):
    """Min over all splits of (total, split points read backwards): the documented tie rule."""
    T = x.shape[0]
    best = None
    for splits in itertools.combinations(range(1, T), k - 1):
        b = (0, *splits, T)
        sizes = np.diff(b)
        if (lo is not None and sizes.min() < lo) or (hi is not None and sizes.max() > hi):
            continue
        total = 0.0
        for l, r in zip(b[:-1], b[1:], strict=True):
            total += _ref_cost(kind, x, l, r)
        key = (total, tuple(reversed(splits)), b)
        best = key if best is None or key[:2] < best[:2] else best
    return best


def _default_limits(T: int, k: int) -> tuple[int, int]:
    return max(1, T // (2 * k)), max(math.ceil(T / k), 2 * T // k)


def _runs(kind: str, data: dict) -> list[tuple[str, str]]:
    """(backend, algorithm) pairs valid for this input."""
    runs = [("cpp", "quadratic"), ("numpy", "quadratic"), ("naive", "quadratic")]
    v = data.get("values")
    monotone = v is not None and (np.all(np.diff(v) >= 0) or np.all(np.diff(v) <= 0))
    if kind == "l1" or (kind == "l2" and monotone):
        runs += [("cpp", "dc"), ("numpy", "dc")]
    return runs


@pytest.mark.parametrize("limits", [(None, None), (2, None), (None, 4), (2, 5), (3, 3)])
@pytest.mark.parametrize("kind", ["l1", "l2", "l2-sorted", "affinity", "matrix"])
def test_matches_brute_force(kind: str, limits: tuple) -> None:
    rng = np.random.default_rng(zlib.crc32(repr((kind, limits)).encode()))
    base = kind.split("-")[0]
    lo, hi = limits
    for T in range(1, 13):
        # Integer data makes exact ties common, so the tie rule is exercised; l2 divides by n,
        # which is not exact, so it uses continuous values (unique optima) instead.
        data = _data(base, T, rng, integer=base != "l2")
        if kind == "l2-sorted":
            data["values"] = np.sort(data["values"])
        x = next(iter(data.values()))
        for k in range(1, min(4, T) + 1):
            expected = _brute_force(base, x, k, lo, hi)
            for backend, algorithm in _runs(base, data):
                args = dict(min_size=lo, max_size=hi, backend=backend, algorithm=algorithm)
                where = f"{kind} T={T} k={k} limits={limits} {backend}/{algorithm}"
                if expected is None:
                    with pytest.raises(ValueError, match="infeasible"):
                        solve_intervals(base, k, **data, **args)
                    continue
                bounds, total = solve_intervals(base, k, **data, **args)
                assert bounds.tolist() == list(expected[2]), f"{where}: {bounds} vs {expected}"
                assert total == pytest.approx(expected[0], rel=1e-9, abs=1e-9), where


@pytest.mark.parametrize("algorithm", ["quadratic", "dc"])
@pytest.mark.parametrize("limited", [False, True], ids=["free", "limits"])
@pytest.mark.parametrize("kind", KINDS)
def test_cpp_matches_numpy(kind: str, limited: bool, algorithm: str) -> None:
    if algorithm == "dc" and kind not in ("l1", "l2"):
        pytest.raises(ValueError, solve_intervals, kind, 1, matrix=np.eye(3), algorithm="dc")
        return
    rng = np.random.default_rng(7)
    for T, k, integer in itertools.product((1, 2, 7, 31, 97, 211), (1, 2, 3, 5, 8), (0, 1)):
        if k > T:
            continue
        data = _data(kind, T, rng, integer=bool(integer))
        if algorithm == "dc" and kind == "l2":
            data["values"] = np.sort(data["values"])
        lo, hi = _default_limits(T, k) if limited else (None, None)
        args = dict(min_size=lo, max_size=hi, algorithm=algorithm)
        b_cpp, c_cpp = solve_intervals(kind, k, **data, backend="cpp", **args)
        b_np, c_np = solve_intervals(kind, k, **data, backend="numpy", **args)
        assert b_cpp.tolist() == b_np.tolist(), f"T={T} k={k} int={integer}"
        # the same operations in the same order (interval_dp.h; -ffp-contract=off): bit-equal
        assert c_cpp == c_np, f"T={T} k={k} int={integer}"
        assert c_cpp == pytest.approx(interval_cost(kind, b_cpp, **data), rel=1e-9, abs=1e-9)
        sizes = np.diff(b_cpp)
        assert b_cpp[0] == 0 and b_cpp[-1] == T and sizes.min() >= (lo or 1)
        assert sizes.max() <= (hi or T)


@pytest.mark.parametrize("limited", [False, True], ids=["free", "limits"])
@pytest.mark.parametrize("kind", ["l1", "l2"])
def test_dc_matches_quadratic(kind: str, limited: bool) -> None:
    rng = np.random.default_rng(11)
    for T, k, shape in itertools.product((2, 17, 500, 1999), (1, 2, 5, 8), ("normal", "ties")):
        if k > T:
            continue
        v = rng.normal(size=T) if shape == "normal" else rng.integers(0, 6, size=T).astype(float)
        v = np.sort(v)[:: rng.choice([-1, 1])]
        lo, hi = _default_limits(T, k) if limited else (None, None)
        args = dict(values=v, min_size=lo, max_size=hi)
        b_q, c_q = solve_intervals(kind, k, backend="cpp", algorithm="quadratic", **args)
        b_dc, c_dc = solve_intervals(kind, k, backend="cpp", algorithm="dc", **args)
        assert b_dc.tolist() == b_q.tolist(), f"T={T} k={k} {shape}"
        assert c_dc == c_q
        if T <= 500:
            b_ndc, _ = solve_intervals(kind, k, backend="numpy", algorithm="dc", **args)
            assert b_ndc.tolist() == b_q.tolist(), f"numpy dc T={T} k={k} {shape}"


def _linear_log_snr(T: int = 1000) -> np.ndarray:
    a = np.cumprod(1.0 - np.linspace(1e-4, 0.02, T))
    return np.log(a) - np.log1p(-a)


@pytest.mark.parametrize("backend", ["cpp", "numpy"])
@pytest.mark.parametrize("algorithm", ["quadratic", "dc"])
def test_golden_log_snr_l1(backend: str, algorithm: str) -> None:
    v = _linear_log_snr()
    bounds, total = solve_intervals("l1", 5, values=v, backend=backend, algorithm=algorithm)
    assert bounds.tolist() == [0, 153, 394, 624, 823, 1000]
    assert total == pytest.approx(781.7405, abs=1e-4)
    assert total == pytest.approx(interval_cost("l1", bounds, values=v), rel=1e-12)


@pytest.mark.parametrize("backend", ["cpp", "numpy"])
@pytest.mark.parametrize("limits", [(None, None), (100, 400)])
def test_golden_timestep_l2(backend: str, limits: tuple) -> None:
    v = np.arange(1000.0)
    lo, hi = limits
    bounds, total = solve_intervals("l2", 5, values=v, min_size=lo, max_size=hi, backend=backend)
    assert bounds.tolist() == [0, 200, 400, 600, 800, 1000]
    assert total == pytest.approx(5 * (200**3 - 200) / 12, rel=1e-12)  # 5 * n (n^2 - 1) / 12


def test_timestep_l1_ties_reach_uniform_cost() -> None:
    v = np.arange(1000.0)
    uniform = interval_cost("l1", [0, 200, 400, 600, 800, 1000], values=v)
    for backend in ("cpp", "numpy"):
        bounds, total = solve_intervals("l1", 5, values=v, backend=backend)
        assert total == uniform == 5 * (4950 + 5050)
        assert interval_cost("l1", bounds, values=v) == total


def test_all_zero_costs_pick_smallest_splits() -> None:
    zero = np.zeros((10, 10))
    for backend in ("cpp", "numpy", "naive"):
        assert solve_intervals("matrix", 3, matrix=zero, backend=backend)[0].tolist() == [
            0,
            1,
            2,
            10,
        ]
        got = solve_intervals("matrix", 3, matrix=zero, min_size=2, backend=backend)[0]
        assert got.tolist() == [0, 2, 4, 10]
        got = solve_intervals("matrix", 3, matrix=zero, min_size=2, max_size=4, backend=backend)[0]
        assert got.tolist() == [0, 2, 6, 10]


V5 = np.arange(5.0)
# (arguments, the name the message must contain, whether antdiff._C can be handed the same case)
BAD_INPUTS = [
    (dict(cost="l3", k=2, values=V5), "cost", True),
    (dict(cost="l1", k=0, values=V5), "k", True),
    (dict(cost="l1", k=6, values=V5), "k", True),
    (dict(cost="l1", k=2, values=V5, min_size=0), "min_size", True),
    (dict(cost="l1", k=2, values=V5, max_size=0), "max_size", True),
    (dict(cost="l1", k=2, values=V5, min_size=3, max_size=2), "min_size", True),
    (dict(cost="l1", k=2, values=V5, min_size=3), "min_size", True),
    (dict(cost="l1", k=2, values=V5, max_size=2), "max_size", True),
    (dict(cost="l1", k=2, values=np.array([0.0, 2.0, 1.0])), "values", True),
    (dict(cost="l1", k=2, values=np.array([0.0, np.nan, 1.0])), "values", True),
    (dict(cost="l2", k=2, values=np.array([0.0, np.inf, 1.0])), "values", True),
    (dict(cost="l2", k=2, values=np.ones((3, 3))), "values", True),
    (dict(cost="l2", k=1, values=np.ones(0)), "values", True),
    (dict(cost="l2", k=1, values=None), "values", False),
    (dict(cost="l2", k=1, values=V5, matrix=np.eye(5)), "matrix", False),
    (dict(cost="affinity", k=2, matrix=np.ones((3, 4))), "matrix", True),
    (dict(cost="matrix", k=2, matrix=np.ones(3)), "matrix", True),
    (dict(cost="affinity", k=2, matrix=np.tril(np.full((3, 3), np.nan), -1)), "matrix", True),
    (dict(cost="matrix", k=2, matrix=np.triu(np.full((3, 3), np.inf))), "matrix", True),
    (dict(cost="affinity", k=2, values=V5), "matrix", False),
    (dict(cost="l1", k=2, values=V5, algorithm="fast"), "algorithm", True),
    (dict(cost="affinity", k=2, matrix=np.eye(3), algorithm="dc"), "algorithm", True),
    (dict(cost="l2", k=2, values=np.array([0.0, 2.0, 1.0]), algorithm="dc"), "algorithm", True),
    (dict(cost="l1", k=2, values=V5, backend="gpu"), "backend", False),
]
BAD_IDS = [f"{i}-{name}" for i, (_, name, _) in enumerate(BAD_INPUTS)]


@pytest.mark.parametrize("backend", ["cpp", "numpy"])
@pytest.mark.parametrize(("kwargs", "name", "cpp_ok"), BAD_INPUTS, ids=BAD_IDS)
def test_bad_input_raises(kwargs: dict, name: str, cpp_ok: bool, backend: str) -> None:
    kwargs = {"backend": backend, **kwargs}
    cost, k = kwargs.pop("cost"), kwargs.pop("k")
    with pytest.raises(ValueError, match=name) as info:
        solve_intervals(cost, k, **kwargs)
    if not cpp_ok:
        return
    # The C++ core checks the same things on its own and says so in the same words.
    data = kwargs["values"] if "values" in kwargs else kwargs["matrix"]
    with pytest.raises(ValueError) as cpp_info:
        _C.solve_intervals(
            cost,
            data,
            k,
            kwargs.get("min_size"),
            kwargs.get("max_size"),
            kwargs.get("algorithm", "auto"),
        )
    assert str(cpp_info.value) == str(info.value)


def test_non_integer_k_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="k"):
        solve_intervals("l1", 2.0, values=V5)
    with pytest.raises(TypeError, match="min_size"):
        solve_intervals("l1", 2, values=V5, min_size=1.5)


def test_complex_values_and_tables_beyond_memory_are_refused(monkeypatch) -> None:
    """A complex array lost its imaginary part with only a ComplexWarning; a k x T table past
    the memory available (k = 20000 at T = 1e5: 30 GiB) met the OOM killer, not an error."""
    import torch

    for bad in (np.array([1 + 1j, 2.0]), torch.tensor([1 + 1j, 2.0])):
        with pytest.raises(ValueError, match="values must be real"):
            solve_intervals("l1", 1, values=bad)
    monkeypatch.setattr(interval_dp, "available_host_bytes", lambda: 1 << 20)
    for backend in ("numpy", "cpp"):
        with pytest.raises(ValueError, match=r"k=20, T=10000 needs 0.0 GiB .* fewer clusters"):
            solve_intervals("l1", 20, values=np.arange(10000.0), backend=backend)
    solve_intervals("l1", 2, values=np.arange(1000.0))  # 32 KiB of tables: within the 1 MiB


def test_interval_cost_checks_bounds() -> None:
    with pytest.raises(ValueError, match="bounds"):
        interval_cost("l1", [0, 3, 2, 5], values=V5)
    with pytest.raises(ValueError, match="bounds"):
        interval_cost("l1", [0, 4], values=V5)
    assert interval_cost("l1", [0, 2, 5], values=V5) == 1.0 + 2.0


@pytest.mark.parametrize("kind", ["l1", "l2"])
def test_large_T(kind: str) -> None:
    T = 100_000
    v = np.sort(np.random.default_rng(3).normal(size=T))
    bounds, total = solve_intervals(kind, 5, values=v, backend="cpp")  # auto -> dc
    assert bounds[0] == 0 and bounds[-1] == T and np.all(np.diff(bounds) > 0)
    assert total == pytest.approx(interval_cost(kind, bounds, values=v), rel=1e-9)
    # Independent local check: moving any one split point by a step never lowers the total.
    for m, step in itertools.product(range(1, 5), (-1, 1, -50, 50)):
        moved = bounds.copy()
        moved[m] += step
        assert interval_cost(kind, moved, values=v) >= total * (1 - 1e-12)
    b_np, _ = solve_intervals(kind, 5, values=v, backend="numpy")
    assert b_np.tolist() == bounds.tolist()


def test_threads_solve_concurrently() -> None:
    rng = np.random.default_rng(5)
    jobs = [np.sort(rng.normal(size=3000)) for _ in range(4)]

    def solve(v: np.ndarray) -> list[int]:
        return solve_intervals("l1", 5, values=v, backend="cpp", algorithm="quadratic")[0].tolist()

    with ThreadPoolExecutor(max_workers=2) as pool:
        parallel = list(pool.map(solve, jobs))
    assert parallel == [solve(v) for v in jobs]


def test_missing_extension_falls_back_once(monkeypatch: pytest.MonkeyPatch) -> None:
    state = {"tried": True, "module": None, "error": ImportError("no _C"), "warned": False}
    for key, value in state.items():
        monkeypatch.setitem(interval_dp._cpp, key, value)
    monkeypatch.delenv("ANT_REQUIRE_CPP", raising=False)
    assert not interval_dp.cpp_available()
    v = np.array([0.0, 1.0, 2.0, 10.0, 11.0])
    with pytest.warns(RuntimeWarning, match="build_ext --inplace"):
        bounds, _ = solve_intervals("l2", 2, values=v)
    assert bounds.tolist() == [0, 3, 5]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        solve_intervals("l2", 2, values=V5)  # second call: silent
    with pytest.raises(ImportError, match="build_ext --inplace"):
        solve_intervals("l2", 2, values=V5, backend="cpp")
    monkeypatch.setenv("ANT_REQUIRE_CPP", "1")
    with pytest.raises(ImportError, match="make build"):
        solve_intervals("l2", 2, values=V5)
    assert solve_intervals("l2", 2, values=V5, backend="numpy")[0][0] == 0


def test_build_hint_fits_where_the_package_runs_from(tmp_path, monkeypatch) -> None:
    """From the source checkout: make build there. From an installed wheel or sdist (no
    repository root), reinstalling is the way to rebuild."""
    assert "make build" in interval_dp.BUILD_HINT
    assert str(Path(interval_dp.__file__).resolve().parents[2]) in interval_dp.BUILD_HINT
    site = tmp_path / "site-packages" / "antdiff"
    site.mkdir(parents=True)
    monkeypatch.setattr(interval_dp, "__file__", str(site / "interval_dp.py"))
    hint = interval_dp._build_hint()
    assert "pip install --force-reinstall --no-deps <its wheel" in hint and "make" not in hint


def test_cpp_available() -> None:
    assert interval_dp.cpp_available()


@pytest.mark.parametrize("backend", ["cpp", "numpy", "naive"])
@pytest.mark.parametrize(
    ("cost", "data"),
    [
        ("matrix", {"matrix": np.full((4, 4), 1e308)}),
        ("affinity", {"matrix": np.full((4, 4), 1e308)}),
        ("l2", {"values": np.array([-1e300, 0.0, 1e300, 5.0])}),
        ("l1", {"values": np.array([-1e308, -1e308, 1e308, 1e308])}),
        ("l2", {"values": np.array([1.0, -2.0, 3.0, 1e153, -1e153, 2e153, 5.0])}),
    ],
)
def test_finite_inputs_whose_costs_overflow_are_refused(backend, cost, data):
    """Finite values whose sums overflow float64 used to give an internal 'broken backtrack'
    error (C++) or arbitrary bounds with an inf / NaN total (numpy). Values whose sums could
    overflow somewhere in the DP are refused too, even when the optimum's own total is finite:
    an overflowed candidate was skipped and the split silently not optimal (l2 at 1e153)."""
    with pytest.raises(ValueError, match=f"interval DP \\({cost}\\): the costs overflow float64"):
        solve_intervals(cost, 2, backend=backend, **data)


@pytest.mark.parametrize(
    ("cost", "data"),
    [("l2", np.array([1.0, -2.0, 3.0, 1e153, -1e153, 2e153, 5.0])),
     ("matrix", np.full((4, 4), 1e308))],
)  # fmt: skip
def test_the_extension_refuses_overflowing_costs_itself(cost, data):
    """antdiff._C.solve_intervals called directly (not through interval_dp) answered an
    overflow with an internal 'broken backtrack' error, or a split that skipped overflowed
    candidates."""
    with pytest.raises(ValueError, match=f"interval DP \\({cost}\\): the costs overflow float64"):
        _C.solve_intervals(cost, data, 2, None, None, "quadratic")


@pytest.mark.parametrize("backend", ["cpp", "numpy", "naive"])
def test_an_unread_triangle_of_the_cost_matrix_may_be_large(backend):
    """cost='matrix' reads C[l, r] for l <= r only: huge entries below the diagonal are not
    costs of any interval and do not count as an overflow."""
    m = np.triu(np.ones((6, 6))) + np.tril(np.full((6, 6), 1e308), -1)
    bounds, total = solve_intervals("matrix", 2, matrix=m, backend=backend)
    assert total == 2.0 and bounds[0] == 0 and bounds[-1] == 6


def test_a_scalar_is_not_taken_for_one_timestep():
    """np.ascontiguousarray makes a 0-d array 1-D: a scalar passed as values was solved as
    T = 1 (the C++ entry point refuses it)."""
    with pytest.raises(ValueError, match=r"values must be a 1-D array \[T\].*shape \(\)"):
        solve_intervals("l1", 1, values=3.0)


@pytest.mark.parametrize("backend", ["cpp", "numpy"])
def test_values_float64_cannot_resolve_are_refused(backend):
    """Two groups 1e8 apart, each of unit spread: the l2 prefix sums' rounding swamps the
    clusters' costs, and the DP returned a split that is not optimal (cost 63.9 against 38.1)
    with a total of 0. Refused with the reason; one group alone still solves, and so do
    exact or well-scaled values with many clusters (timesteps, log-SNR at T = 20000)."""
    rng = np.random.default_rng(0)
    v = np.r_[np.sort(rng.normal(0, 1, 40)), np.sort(rng.normal(0, 1, 40)) + 1e8]
    with pytest.raises(ValueError, match="float64 cannot resolve.*cost='matrix'"):
        solve_intervals("l2", 3, values=v, backend=backend)
    bounds, total = solve_intervals("l2", 3, values=v[:40], backend=backend)
    assert total == pytest.approx(interval_cost("l2", bounds, values=v[:40]), rel=1e-9)
    if backend == "numpy":  # (the check runs after either backend; numpy's DP is slow here)
        return
    T = 20000
    a = np.cumprod(1.0 - np.linspace(1e-4, 0.02, T) * (1000.0 / T))
    for values, k in ((np.arange(float(T)), 500), (np.log(a) - np.log1p(-a), 300)):
        bounds, total = solve_intervals("l2", k, values=values, backend=backend)
        assert total == pytest.approx(interval_cost("l2", bounds, values=values), rel=1e-7)


def test_an_infeasible_min_size_is_named_not_the_default_max_size():
    """min_size=500 with k = 5, T = 1000 said "min_size (500) must be <= max_size (400)": a
    max_size the caller never set (the default 2T/k), and no fix."""
    from antdiff.interval_dp import validate_sizes

    with pytest.raises(ValueError, match=r"min_size=500 is infeasible .* use min_size <= T // k"):
        validate_sizes(1000, 5, 500, 400)
    with pytest.raises(ValueError, match=r"max_size=150 is infeasible .* >= ceil\(T / k\)"):
        validate_sizes(1000, 5, 180, 150)


@pytest.mark.parametrize(
    ("cost", "data"),
    [("l2", {"values": np.array([0.0, 3e149, -3e149, 1.0])}),
     ("l1", {"values": np.array([-1e299, 0.0, 1.0, 1e299])}),
     ("affinity", {"matrix": np.full((4, 4), 1e299)}),
     ("matrix", {"matrix": np.full((4, 4), 3e299)})],
    ids=["l2", "l1", "affinity", "matrix"],
)  # fmt: skip
def test_both_backends_refuse_costs_that_overflow(cost, data):
    """Just past each bound (n^2 max^2 for l2, 4 n max for l1, 2 n^2 max for affinity, 2 k max
    for matrix, against 1e300): the C++ checks its own input (Python does not for it)."""
    for backend in ("numpy", "cpp"):
        with pytest.raises(ValueError, match="costs overflow float64"):
            solve_intervals(cost, 2, backend=backend, algorithm="quadratic", **data)


@pytest.mark.parametrize("algorithm", ["quadratic", "dc"])
def test_a_max_size_past_T_is_T(algorithm):
    free = _C.solve_intervals("l1", np.arange(5.0), 2, None, None, algorithm)
    assert free[1] == 3.0  # {0, 1} + {2, 3, 4} (or {0, 1, 2} + {3, 4}): 1 + 2
    for hi in (5, 6, 2**40, 2**62):  # 2**62 overflowed the layer ranges
        b, total = _C.solve_intervals("l1", np.arange(5.0), 2, None, hi, algorithm)
        assert b.tolist() == free[0].tolist() and total == 3.0


def test_l2_costs_round_as_the_numpy_twin_and_stay_non_negative():
    # the mean -0.8 is as near to -1.1 as to -0.5: the first nearest value centres the sums
    (_, c_cpp), (_, c_np) = (solve_intervals("l2", 1, values=np.array([-1.1, -0.5, 0.1, -1.7]),
                                             backend=b) for b in ("cpp", "numpy"))  # fmt: skip
    assert c_cpp == c_np and c_cpp == pytest.approx(1.8)
    # one value per interval: every cost is 0; prefix sums round, the clamp keeps them >= 0
    v = np.array([0.013664634705496859, -0.0066519467348661356, 0.0035151007009301973,
                  0.009034701816518087, 0.0009401229776087456, -0.007434992493538084])
    for backend in ("cpp", "numpy"):
        assert solve_intervals("l2", 6, values=v, backend=backend)[1] >= 0.0


def test_auto_uses_divide_and_conquer_only_where_the_cost_allows_it():
    """Unsorted l2 values break the quadrangle inequality: past AUTO_DC_MIN_T, "auto" must
    still solve exactly (quadratic), not take divide and conquer."""
    v = np.random.default_rng(0).normal(size=_C.AUTO_DC_MIN_T + 1)
    auto = _C.solve_intervals("l2", v, 4, None, None, "auto")
    exact = _C.solve_intervals("l2", v, 4, None, None, "quadratic")
    assert auto[0].tolist() == exact[0].tolist() and auto[1] == exact[1]


# -- argument checks, backends, exact integer data, precision edges ----------------------------


def test_naive_backend_needs_no_extension(monkeypatch: pytest.MonkeyPatch) -> None:
    """backend='naive' is pure Python: it runs (and gives the brute-force split) without the
    extension even under ANT_REQUIRE_CPP=1, like backend='numpy'."""
    state = {"tried": True, "module": None, "error": ImportError("no _C"), "warned": True}
    for key, value in state.items():
        monkeypatch.setitem(interval_dp._cpp, key, value)
    monkeypatch.setenv("ANT_REQUIRE_CPP", "1")
    v = np.array([0.0, 1.0, 1.0, 4.0, 5.0, 9.0])
    expected = _brute_force("l1", v, 3, None, None)
    bounds, total = solve_intervals("l1", 3, values=v, backend="naive")
    assert bounds.tolist() == list(expected[2]) and total == expected[0]


def test_bool_k_and_sizes_are_type_errors() -> None:
    for kwargs, name in ((dict(k=True), "k"), (dict(k=2, min_size=True), "min_size"),
                         (dict(k=2, max_size=False), "max_size")):
        with pytest.raises(TypeError, match=f"{name} must be an int; got (True|False)"):
            solve_intervals("l1", values=V5, **kwargs)


def test_a_missing_matrix_is_named() -> None:
    for cost in ("affinity", "matrix"):
        with pytest.raises(ValueError, match=r"needs matrix=\[T, T\]; got matrix=None"):
            solve_intervals(cost, 2)


def test_auto_through_solve_intervals_keeps_unsorted_l2_exact() -> None:
    """The Python entry point resolves algorithm='auto' itself: past AUTO_DC_MIN_T, unsorted
    l2 values (no quadrangle inequality) must still get the quadratic DP's optimum."""
    assert interval_dp.AUTO_DC_MIN_T == _C.AUTO_DC_MIN_T
    v = np.random.default_rng(0).normal(size=interval_dp.AUTO_DC_MIN_T + 1)
    auto = solve_intervals("l2", 4, values=v, backend="cpp")
    exact = solve_intervals("l2", 4, values=v, backend="cpp", algorithm="quadratic")
    assert auto[0].tolist() == exact[0].tolist() and auto[1] == exact[1]


@pytest.mark.parametrize("backend", ["cpp", "numpy"])
def test_resolved_values_far_apart_are_not_refused(backend) -> None:
    """The precision check refuses only what float64 cannot resolve. Integer l2 values (exact
    prefix sums: no sqrt(T) growth, per _check_precision's docstring) 5e6 apart, and l1 values
    with one far outlier (the sums are centred on the middle element, so the outlier counts
    once) solve, to the split the directly summed naive DP finds."""
    integer_groups = np.r_[np.arange(50.0), 5e6 + np.arange(50.0)]
    outlier = np.r_[-1e12, 0.1 + 0.5 * np.arange(100.0)]
    for cost, v in (("l2", integer_groups), ("l1", outlier)):
        bounds, total = solve_intervals(cost, 2, values=v, backend=backend)
        b_ref, t_ref = solve_intervals(cost, 2, values=v, backend="naive")
        assert bounds.tolist() == b_ref.tolist(), cost
        assert total == pytest.approx(t_ref, rel=interval_dp.PRECISION), cost


def test_interval_cost_refuses_non_integer_or_repeated_bounds_and_nan_matrices() -> None:
    for bounds in ([0, 2.5, 5], np.array([0.0, 2.0, 5.0]), [0, 2, 2, 5]):
        with pytest.raises(ValueError, match="bounds"):
            interval_cost("l1", bounds, values=V5)
    m = np.ones((3, 3))
    m[1, 1] = np.nan
    for cost in ("affinity", "matrix"):
        with pytest.raises(ValueError, match=r"NaN or inf at \[1, 1\]"):
            interval_cost(cost, [0, 1, 3], matrix=m)
    m = np.triu(np.ones((3, 3))) + np.tril(np.full((3, 3), np.nan), -1)  # unread by 'matrix'
    assert interval_cost("matrix", [0, 1, 3], matrix=m) == 2.0


def test_build_hint_needs_the_sources_not_just_a_setup_py(tmp_path, monkeypatch) -> None:
    """A folder with a setup.py but no csrc/ (another project's) is not antdiff's checkout."""
    (tmp_path / "setup.py").write_text("")
    pkg = tmp_path / "python" / "antdiff"
    pkg.mkdir(parents=True)
    monkeypatch.setattr(interval_dp, "__file__", str(pkg / "interval_dp.py"))
    assert "pip install --force-reinstall" in interval_dp._build_hint()
    (tmp_path / "csrc").mkdir()
    assert f"make build` or `python setup.py build_ext --inplace` in {tmp_path}" in (
        interval_dp._build_hint()
    )


def test_table_memory_is_16_bytes_per_entry(monkeypatch) -> None:
    """(k + 1) (T + 1) entries of 16 bytes (the docstring): one byte short is refused."""
    T, k = 10, 2  # noqa: N806
    need = 16 * (k + 1) * (T + 1)
    monkeypatch.setattr(interval_dp, "available_host_bytes", lambda: need - 1)
    with pytest.raises(ValueError, match="fewer clusters"):
        solve_intervals("l1", k, values=np.arange(float(T)), backend="numpy")
    monkeypatch.setattr(interval_dp, "available_host_bytes", lambda: need)
    assert solve_intervals("l1", k, values=np.arange(float(T)), backend="numpy")[0][-1] == T


def test_both_backends_refuse_a_cost_bound_of_exactly_1e300() -> None:
    """The refusal is 'not below 1e300' in the C++ (interval_dp.cpp); numpy's check must agree
    at equality: 2 k max = 2 * 2 * 2.5e299 is 1e300 exactly in float64."""
    m = np.full((4, 4), 2.5e299)
    assert 2.0 * 2 * 2.5e299 == 1e300
    for backend in ("cpp", "numpy"):
        with pytest.raises(ValueError, match="costs overflow float64"):
            solve_intervals("matrix", 2, matrix=m, backend=backend)


@pytest.mark.parametrize("backend", ["cpp", "numpy"])
def test_exact_integer_l1_values_are_not_refused(backend) -> None:
    """Integer l1 values whose prefix sums stay below 2^53 have exact interval costs (the
    l1 formula only adds, subtracts and multiplies integers), so the DP's split is optimal;
    the module docstring says every method returns the same split on exact data. Two groups
    1e12 apart were refused as 'float64 cannot resolve' though the naive DP agrees."""
    v = np.r_[np.arange(4.0), 1e12 + np.arange(4.0)]
    expected = _brute_force("l1", v, 2, None, None)
    bounds, total = solve_intervals("l1", 2, values=v, backend=backend)
    assert bounds.tolist() == list(expected[2]) and total == expected[0]

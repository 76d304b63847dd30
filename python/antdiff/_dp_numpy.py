"""numpy twin of the C++ interval-clustering DP (csrc/interval_dp.cpp), plus the naive reference.

Inputs arrive validated by :mod:`antdiff.interval_dp`. The prefix sums and the per-interval
arithmetic repeat the C++ operation for operation (sequential cumsum, same centring, same
operand order), so both backends fill bit-identical tables and break ties the same way: for
each (m, i) the smallest j among the minimisers of D[m-1][j] + cost([j, i)) (``np.argmin``
returns the first minimum). Intervals are half-open, [l, r).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

__all__ = ["direct_cost", "make_cost", "solve_naive", "solve_numpy"]

# cost(l, r) for an array of l (or of r) and a scalar partner: [n] float64.
CostFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


def make_cost(kind: str, data: np.ndarray, direction: int) -> CostFn:
    """Vectorised O(1)-per-interval cost of [l, r) after prefix sums.

    Args:
        kind: "l1" | "l2" | "affinity" | "matrix".
        data: values [T] or matrix [T, T], float64, finite.
        direction: +1 / -1 if values are non-decreasing / non-increasing, else 0.
    """
    T = data.shape[0]
    if kind == "l1":
        # Shift by an element (exact on integer data) and flip: |v_t - v_c| is unchanged.
        x = data - data[(T - 1) // 2]
        if direction < 0:
            x = -x
        p = _prefix(x)

        def l1(l: np.ndarray, r: np.ndarray) -> np.ndarray:
            c = l + (r - l - 1) // 2
            xc = x[c]
            left = xc * (c - l) - (p[c] - p[l])
            right = (p[r] - p[c + 1]) - xc * (r - c - 1)
            return left + right

        return l1
    if kind == "l2":
        # Centre on the element nearest the mean (exact on integer data); sequential sum.
        mean = np.cumsum(data)[-1] / T
        x = data - data[int(np.argmin(np.abs(data - mean)))]
        s1, s2 = _prefix(x), _prefix(x * x)

        def l2(l: np.ndarray, r: np.ndarray) -> np.ndarray:
            n = r - l
            s = s1[r] - s1[l]
            q = s2[r] - s2[l]
            return np.maximum((n * q - s * s) / n, 0.0)

        return l2
    if kind == "affinity":
        rows = np.zeros((T, T + 1))
        np.cumsum(data, axis=1, out=rows[:, 1:])

        def affinity(l: np.ndarray, r: np.ndarray) -> np.ndarray:
            c = l + (r - l - 1) // 2
            return -(rows[c, r] - rows[c, l])

        return affinity
    if kind == "matrix":
        return lambda l, r: data[l, r - 1]
    raise ValueError(f"cost must be one of 'l1', 'l2', 'affinity', 'matrix'; got '{kind}'")


def _prefix(x: np.ndarray) -> np.ndarray:
    out = np.zeros(x.shape[0] + 1)
    np.cumsum(x, out=out[1:])
    return out


def direct_cost(kind: str, data: np.ndarray, l: int, r: int) -> float:
    """Cost of [l, r) recomputed from its definition (what a straightforward script does)."""
    c = l + (r - l - 1) // 2
    if kind == "l1":
        return float(np.abs(data[l:r] - data[c]).sum())
    if kind == "l2":
        seg = data[l:r]
        return float(((seg - seg.mean()) ** 2).sum())
    if kind == "affinity":
        return float(-data[c, l:r].sum())
    return float(data[l, r - 1])


def _layers(T: int, k: int, lo_size: int, hi_size: int) -> list[tuple[int, int]]:
    """[k + 1] ranges of i that lie on a feasible split with m clusters before i."""
    return [
        (max(m * lo_size, T - (k - m) * hi_size), min(m * hi_size, T - (k - m) * lo_size))
        for m in range(k + 1)
    ]


def _backtrack(arg: np.ndarray, T: int, k: int) -> np.ndarray:
    bounds = np.empty(k + 1, dtype=np.int64)
    bounds[k] = T
    for m in range(k, 0, -1):
        bounds[m - 1] = arg[m, bounds[m]]
    return bounds


def solve_numpy(
    kind: str, data: np.ndarray, k: int, lo_size: int, hi_size: int, direction: int, dc: bool
) -> tuple[np.ndarray, float]:
    """The DP with vectorised cost evaluation: bounds int64 [k + 1] and the optimal total.

    Args:
        kind, data, direction: as for :func:`make_cost`.
        k: number of clusters; lo_size, hi_size: resolved size limits (1 and T when unset).
        dc: the divide-and-conquer layer solver (costs with the quadrangle inequality only).
    """
    T = data.shape[0]
    cost = make_cost(kind, data, direction)
    d = np.full((k + 1, T + 1), np.inf)
    arg = np.full((k + 1, T + 1), -1, dtype=np.int64)
    d[0, 0] = 0.0
    layers = _layers(T, k, lo_size, hi_size)
    for m in range(1, k + 1):
        (p_lo, p_hi), (c_lo, c_hi) = layers[m - 1], layers[m]
        if dc:
            _dc_layer(cost, d[m - 1], d[m], arg[m], (p_lo, p_hi), (c_lo, c_hi), lo_size, hi_size)
            continue
        for i in range(c_lo, c_hi + 1):
            j = np.arange(max(p_lo, i - hi_size), min(p_hi, i - lo_size) + 1)
            vals = d[m - 1, j] + cost(j, i)
            best = int(np.argmin(vals))
            d[m, i] = vals[best]
            arg[m, i] = j[best]
    return _backtrack(arg, T, k), float(d[k, T])


def _dc_layer(
    cost: CostFn,
    prev: np.ndarray,
    cur: np.ndarray,
    arg: np.ndarray,
    p_range: tuple[int, int],
    c_range: tuple[int, int],
    lo_size: int,
    hi_size: int,
) -> None:
    """Divide and conquer over i, one recursion level at a time (all its nodes vectorised).

    Every node (lo, hi, opt_lo, opt_hi) solves its middle i over j in [opt_lo, opt_hi] (cut to
    the size window) and hands [opt_lo, j*] / [j*, opt_hi] to its halves: the same nodes and
    candidates as the recursive C++, visited breadth first.
    """
    lo, hi = np.array([c_range[0]]), np.array([c_range[1]])
    opt_lo, opt_hi = np.array([p_range[0]]), np.array([p_range[1]])
    while lo.size:
        mid = lo + (hi - lo) // 2
        j_lo = np.maximum(np.maximum(opt_lo, p_range[0]), mid - hi_size)
        j_hi = np.minimum(np.minimum(opt_hi, p_range[1]), mid - lo_size)
        counts = j_hi - j_lo + 1  # >= 1 by the monotone-argmin argument in interval_dp.h
        starts = np.cumsum(counts) - counts
        node = np.repeat(np.arange(mid.size), counts)
        j = np.arange(counts.sum()) - starts[node] + j_lo[node]
        vals = prev[j] + cost(j, mid[node])
        seg_min = np.minimum.reduceat(vals, starts)
        hits = np.flatnonzero(vals == seg_min[node])
        first = hits[np.r_[True, node[hits[1:]] != node[hits[:-1]]]]  # smallest j per node
        best_j = j[first]
        cur[mid] = vals[first]
        arg[mid] = best_j
        lo, hi = np.r_[lo, mid + 1], np.r_[mid - 1, hi]
        opt_lo, opt_hi = np.r_[opt_lo, best_j], np.r_[best_j, opt_hi]
        keep = lo <= hi
        lo, hi, opt_lo, opt_hi = lo[keep], hi[keep], opt_lo[keep], opt_hi[keep]


def solve_naive(
    kind: str, data: np.ndarray, k: int, lo_size: int, hi_size: int
) -> tuple[np.ndarray, float]:
    """O(k T^3) reference: the same DP, every interval cost recomputed from scratch.

    Only for benchmarks and small tests. Same smallest-j tie rule (strict `<`, j ascending),
    on its own directly summed costs, which can round differently from the prefix-sum ones.
    """
    T = data.shape[0]
    d = np.full((k + 1, T + 1), np.inf)
    arg = np.full((k + 1, T + 1), -1, dtype=np.int64)
    d[0, 0] = 0.0
    layers = _layers(T, k, lo_size, hi_size)
    for m in range(1, k + 1):
        (p_lo, p_hi), (c_lo, c_hi) = layers[m - 1], layers[m]
        for i in range(c_lo, c_hi + 1):
            best, best_j = np.inf, -1
            for j in range(max(p_lo, i - hi_size), min(p_hi, i - lo_size) + 1):
                v = d[m - 1, j] + direct_cost(kind, data, j, i)
                if v < best:
                    best, best_j = v, j
            d[m, i], arg[m, i] = best, best_j
    return _backtrack(arg, T, k), float(d[k, T])

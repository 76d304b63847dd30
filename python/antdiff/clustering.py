"""Interval clustering of the T diffusion timesteps into k contiguous clusters.

Three objectives (the paper's section 4.1 and Appendix G), all solved exactly by the interval DP in
:mod:`antdiff.interval_dp`:

- ``"timestep"``: squared deviations of t, whose optimum is the uniform split;
- ``"snr"``: sum |v_t - v_c| on v = log-SNR (default) or raw SNR, c the interval's middle index;
- ``"gradient"``: -sum_{t in I} A[c, t] on a task-affinity matrix A (per timestep, or per bin with
  its bin edges).

Intervals are half-open: ``bounds[0] = 0 < bounds[1] < ... < bounds[k] = T``; cluster i holds the
timesteps ``bounds[i] <= t < bounds[i + 1]`` (t = 0 is the least noisy).
"""

from __future__ import annotations

import json
import math
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .interval_dp import solve_intervals, validate_sizes
from .schedules import Schedule, as_schedule, make_schedule
from .utils import atomic_write, load_npy, user_stacklevel

__all__ = ["Clusters", "cluster_timesteps", "default_limits", "load_affinity", "plot_clusters"]

OBJECTIVES = ("timestep", "snr", "gradient")
_DEFAULT = "default"


@dataclass(frozen=True)
class Clusters:
    """k contiguous timestep clusters.

    Attributes:
        bounds: k + 1 increasing ints, bounds[0] = 0 and bounds[k] = T.
        objective: how they were found ("timestep", "snr", "gradient", "uniform" or "custom").
        cost: the optimal objective value, when a DP produced them.
        meta: free-form provenance (schedule, limits, snr kind, ...), JSON-serialisable.
    """

    bounds: tuple[int, ...]
    objective: str = "custom"
    cost: float | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if any(isinstance(x, bool) or int(x) != x for x in self.bounds):
            raise ValueError(f"bounds must be integers (timestep indices), got {list(self.bounds)}")
        b = tuple(int(x) for x in self.bounds)
        if len(b) < 2:
            raise ValueError(f"bounds needs at least 2 entries (0 and T), got {list(b)}")
        if b[0] != 0:
            raise ValueError(f"bounds[0] must be 0, got {b[0]}")
        if any(r <= l for l, r in zip(b[:-1], b[1:])):
            raise ValueError(
                f"bounds must be strictly increasing (no empty cluster), got {list(b)}"
            )
        object.__setattr__(self, "bounds", b)
        object.__setattr__(self, "_cache", {})

    @property
    def k(self) -> int:
        return len(self.bounds) - 1

    @property
    def T(self) -> int:  # noqa: N802
        return self.bounds[-1]

    @property
    def sizes(self) -> np.ndarray:
        """[k] number of timesteps in each cluster."""
        return np.diff(np.asarray(self.bounds, dtype=np.int64))

    @property
    def intervals(self) -> list[tuple[int, int]]:
        """[(start, stop)] half-open interval of every cluster."""
        return list(zip(self.bounds[:-1], self.bounds[1:]))

    def cluster_of(self, t: Any) -> Any:
        """Cluster index of each timestep.

        Args:
            t: an int, a numpy array or a torch tensor of timesteps in [0, T) (any device).

        Returns:
            The same kind of object, int64, holding indices in [0, k). Torch tensors stay on their
            device and no host sync happens (the boundary tensor is cached per device), so
            they are not range-checked: t < 0 maps to cluster 0 and t >= T to cluster k - 1
            (the engine checks its timesteps itself). Ints and numpy arrays outside [0, T)
            raise ValueError.
        """
        torch = sys.modules.get("torch")
        if torch is not None and isinstance(t, torch.Tensor):
            inner = self._inner_bounds(t.device)
            return torch.bucketize(t, inner, right=True)
        arr = np.asarray(t)
        if np.any((arr < 0) | (arr >= self.T)):
            raise ValueError(
                f"timesteps must lie in [0, {self.T}), got range [{arr.min()}, {arr.max()}]"
            )
        out = np.searchsorted(np.asarray(self.bounds[1:-1]), arr, side="right").astype(np.int64)
        return int(out) if np.ndim(t) == 0 else out

    def _inner_bounds(self, device: Any) -> Any:
        import torch

        key = str(device)
        cache = self._cache  # type: ignore[attr-defined]
        if key not in cache:
            cache[key] = torch.tensor(self.bounds[1:-1], dtype=torch.int64).to(device)
        return cache[key]

    # -- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "k": self.k,
            "T": self.T,
            "bounds": list(self.bounds),
            "sizes": self.sizes.tolist(),
            "objective": self.objective,
            "cost": self.cost,
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Clusters:
        bounds = d.get("bounds") if isinstance(d, dict) else None
        if not isinstance(bounds, (list, tuple, np.ndarray)) or np.ndim(bounds) != 1:
            raise ValueError("a Clusters dict needs a 'bounds' list (what to_dict() returns)")
        bounds = bounds.tolist() if isinstance(bounds, np.ndarray) else bounds
        if any(not isinstance(x, (int, float, np.integer, np.floating)) for x in bounds):
            raise ValueError(f"bounds must be integers (timestep indices), got {bounds!r}")
        objective, cost = d.get("objective", "custom"), d.get("cost")
        meta = {} if d.get("meta") is None else d["meta"]
        if not isinstance(objective, str) or not isinstance(meta, dict):
            raise ValueError(
                f"a Clusters dict's objective must be text and its meta a mapping; got "
                f"{objective!r} and {type(meta).__name__}"
            )
        finite = isinstance(cost, (int, float, np.integer, np.floating)) and math.isfinite(cost)
        if cost is not None and (isinstance(cost, bool) or not finite):
            raise ValueError(f"a Clusters dict's cost must be a finite number or None: {cost!r}")
        out = cls(tuple(bounds), objective, None if cost is None else float(cost), meta)
        for key, have in (("k", out.k), ("T", out.T), ("sizes", out.sizes.tolist())):
            if key in d and np.asarray(d[key]).tolist() != have:
                raise ValueError(
                    f"a Clusters dict's {key}={d[key]!r} does not match its bounds "
                    f"{list(out.bounds)} ({key} = {have!r}): the dict was edited or corrupted"
                )
        return out

    def to_json(self, indent: int | None = 2) -> str:
        """The clusters as JSON text (what ``antdiff cluster --json FILE`` writes)."""
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, s: str) -> Clusters:
        """Clusters from JSON text; :meth:`load` reads a file."""
        if isinstance(s, os.PathLike) or (isinstance(s, str) and s.lower().endswith(".json")):
            raise ValueError(
                f"Clusters.from_json takes JSON text, got {str(s)[:80]!r}: for a file use "
                "Clusters.load(path)"
            )
        return cls.from_dict(json.loads(s))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Clusters:
        """Clusters from a JSON file (``antdiff cluster --json FILE``, or :meth:`to_json`)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"clusters file {path} " + ("is a folder" if path.is_dir() else "does not exist")
                + f" (write one with antdiff cluster --json {path.name})"
            )
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise ValueError(
                f"{path} is not a clusters JSON file (antdiff cluster --json writes one): {e}"
            ) from e

    @classmethod
    def uniform(cls, T: int, k: int) -> Clusters:  # noqa: N803
        """Near-equal split (sizes differ by at most one), without a DP."""
        _check_k(k, T)
        return cls(tuple((i * T) // k for i in range(k + 1)), "uniform")

    def __repr__(self) -> str:
        spans = " ".join(f"[{l},{r})" for l, r in self.intervals)
        cost = "" if self.cost is None else f", cost={self.cost:.4f}"
        return f"Clusters(k={self.k}, T={self.T}, objective={self.objective!r}{cost}): {spans}"


def default_limits(T: int, k: int) -> tuple[int, int]:  # noqa: N803
    """[T/(2k), 2T/k], rounded outwards so the limits are always feasible."""
    return max(1, math.floor(T / (2 * k))), math.ceil(2 * T / k)


def cluster_timesteps(
    schedule: Any,
    k: int,
    objective: str = "snr",
    *,
    snr: str = "log",
    affinity: Any = None,
    bin_edges: Any = None,
    min_size: int | str | None = _DEFAULT,
    max_size: int | str | None = _DEFAULT,
    backend: str = "auto",
) -> Clusters:
    """Group the schedule's T timesteps into k contiguous clusters, exactly.

    Args:
        schedule: a :class:`Schedule`, a schedule name, or an alphas_cumprod array [T].
        k: number of clusters, 1 <= k <= T.
        objective: "timestep", "snr" or "gradient".
        snr: "log" (default) or "raw" for the "snr" objective.
        affinity: for "gradient": [T, T] task affinity, or [nb, nb] per bin with ``bin_edges``,
            or the path of a file that :func:`load_affinity` reads (its bin edges with it).
        bin_edges: [nb + 1] increasing ints from 0 to T when ``affinity`` is binned.
        min_size, max_size: cluster size limits in timesteps; "default" = [T/(2k), 2T/k]
            (rounded outwards), None = no limit.
        backend: "auto", "cpp" or "numpy" (see :func:`antdiff.interval_dp.solve_intervals`).

    Returns:
        The optimal :class:`Clusters`.
    """
    sched = as_schedule(schedule)
    T = sched.T  # noqa: N806
    _check_k(k, T)
    lo, hi = _resolve_limits(T, k, min_size, max_size)
    if objective != "gradient" and (affinity is not None or bin_edges is not None):
        raise ValueError(
            f"affinity / bin_edges apply to objective='gradient' only (got objective="
            f"{objective!r}, which would ignore them)"
        )
    if isinstance(affinity, (str, os.PathLike)):
        if bin_edges is not None:
            raise ValueError(
                "affinity is a file, which holds its own bin edges: leave bin_edges out"
            )
        affinity, bin_edges = load_affinity(affinity, schedule=sched)
    meta: dict[str, Any] = {"schedule": sched.name, "min_size": lo, "max_size": hi}
    if objective == "timestep":
        # the L2 cost of n consecutive timesteps, n (n^2 - 1) / 12, is convex in n: the
        # near-equal split is optimal under any feasible limits (lo <= T // k <= hi). Taken
        # as is, it is the split of Clusters.uniform and NTG's intervals also where T % k
        # leaves several optima (the DP's tie-break picked another at T = 1003, k = 5).
        validate_sizes(T, k, lo, hi)  # limits no split meets are refused as the DP refused them
        bounds = Clusters.uniform(T, k).bounds
        cost = sum(n * (n * n - 1) / 12 for n in np.diff(bounds).tolist())
    elif objective == "snr":
        if snr not in ("log", "raw"):
            raise ValueError(f"snr must be 'log' or 'raw', got {snr!r}")
        values = sched.log_snr if snr == "log" else sched.snr
        meta["snr"] = snr
        bounds, cost = solve_intervals(
            "l1", k, values=values, min_size=lo, max_size=hi, backend=backend
        )
    elif objective == "gradient":
        if affinity is None:
            raise ValueError(
                "objective='gradient' needs affinity=[T, T] (or a binned [nb, nb] matrix with "
                "bin_edges); compute one with `antdiff affinity`"
            )
        bounds, cost = _gradient_clusters(affinity, bin_edges, T, k, lo, hi, backend)
        meta["binned"] = bin_edges is not None
    else:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    return Clusters(tuple(int(b) for b in bounds), objective, float(cost), meta)


def _check_k(k: Any, T: int) -> None:  # noqa: N803
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise ValueError(f"k must be an integer in [1, T={T}], got {k!r}")
    if not 1 <= k <= T:
        raise ValueError(f"k must be in [1, T={T}], got k={k}")


def _resolve_limits(T: int, k: int, lo: Any, hi: Any) -> tuple[int | None, int | None]:  # noqa: N803
    dlo, dhi = default_limits(T, k)
    lo = dlo if lo == _DEFAULT else lo
    hi = dhi if hi == _DEFAULT else hi
    for name, v in (("min_size", lo), ("max_size", hi)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1):
            raise ValueError(f"{name} must be a positive integer, None or 'default', got {v!r}")
    # plain ints: numpy integers broke to_json and torch.load(weights_only=True) of the meta
    return (None if lo is None else int(lo)), (None if hi is None else int(hi))


def _gradient_clusters(affinity, bin_edges, T, k, lo, hi, backend):  # noqa: N803
    if np.iscomplexobj(affinity):  # the float64 cast below would drop the imaginary part
        raise ValueError("affinity must be a real matrix; got a complex array")
    A = np.asarray(affinity, dtype=np.float64)  # noqa: N806
    if bin_edges is None:
        if A.shape != (T, T):
            raise ValueError(
                f"affinity must be [T, T] = [{T}, {T}] for this schedule, got {list(A.shape)}; "
                "for a binned matrix pass bin_edges too"
            )
        return solve_intervals("affinity", k, matrix=A, min_size=lo, max_size=hi, backend=backend)
    raw = np.asarray(bin_edges)
    if raw.dtype.kind not in "iuf" or (raw.dtype.kind == "f" and not np.all(raw == np.round(raw))):
        raise ValueError(f"bin_edges must be integers (timestep indices), got {raw.tolist()[:8]}")
    edges = raw.astype(np.int64)
    nb = edges.size - 1
    if edges.ndim != 1 or nb < 1 or edges[0] != 0 or edges[-1] != T or np.any(np.diff(edges) <= 0):
        raise ValueError(
            f"bin_edges must be strictly increasing ints from 0 to T={T}, "
            f"got {edges.tolist()[:8]}..."
        )
    if A.shape != (nb, nb):
        raise ValueError(f"binned affinity must be [nb, nb] = [{nb}, {nb}], got {list(A.shape)}")
    if not np.all(np.isfinite(A)):
        raise ValueError("affinity contains NaN or inf; recompute it or drop the bad bins")
    if k > nb:
        raise ValueError(f"k={k} exceeds the number of bins ({nb}); use finer bins or a smaller k")
    validate_sizes(T, k, lo, hi)  # limits no split of [0, T) meets: not the bins' fault
    C = _binned_cost_matrix(A, edges, lo, hi)  # noqa: N806
    bins, cost = solve_intervals("matrix", k, matrix=C, backend=backend)
    bounds = edges[bins]
    sizes = np.diff(bounds)
    if (lo is not None and sizes.min() < lo) or (hi is not None and sizes.max() > hi):
        raise ValueError(
            f"no split on these bin edges satisfies the size limits [{lo}, {hi}]; use finer bins "
            "or wider limits"
        )
    return bounds, cost


def _binned_cost_matrix(A, edges, lo, hi):  # noqa: N803
    """C[l, r] (inclusive bins) = -sum_{t in bins l..r} A[bin(c), bin(t)], c the middle timestep.

    Bin-intervals whose length in timesteps breaks the limits get a penalty far above any real
    cost, so the DP avoids them whenever a feasible split exists.
    """
    nb = A.shape[0]
    width = np.diff(edges).astype(np.float64)
    weighted = np.concatenate([np.zeros((nb, 1)), np.cumsum(A * width[None, :], axis=1)], axis=1)
    l_idx, r_idx = np.triu_indices(nb)
    start, stop = edges[l_idx], edges[r_idx + 1]
    mid_t = start + (stop - start - 1) // 2
    c = np.searchsorted(edges, mid_t, side="right") - 1
    C = np.zeros((nb, nb))  # noqa: N806
    C[l_idx, r_idx] = -(weighted[c, r_idx + 1] - weighted[c, l_idx])
    length = stop - start
    bad = np.zeros(length.shape, dtype=bool)
    if lo is not None:
        bad |= length < lo
    if hi is not None:
        bad |= length > hi
    penalty = 1e6 * (1.0 + np.abs(C).sum())
    C[l_idx[bad], r_idx[bad]] = penalty
    return C


def load_affinity(
    path: str | Path, schedule: Schedule | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Affinity matrix and its bin edges (None when per timestep) from a file.

    Accepts the .npz that ``antdiff affinity`` writes ('affinity' + 'bin_edges'), a .npy (with an
    optional sibling '<stem>_edges.npy'), or a .pt tensor. With ``schedule`` (the one the
    clusters are for), a .npz that records where it was measured is checked against it: another
    number of timesteps is an error, another schedule a warning (its timesteps mean other noise
    levels).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"affinity file {path} does not exist (make one: antdiff affinity)")
    if path.suffix == ".npz":
        with load_npy(path, "an affinity [T, T] and its bin_edges") as z:
            if "affinity" not in z:
                raise ValueError(f"{path} has no 'affinity' array (keys: {sorted(z.files)})")
            a, edges = z["affinity"], (z["bin_edges"] if "bin_edges" in z else None)
            meta = _read_meta(z)
        if schedule is not None:
            check_affinity_source(path, meta, schedule)
    elif path.suffix == ".pt":
        import torch

        a = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(a, torch.Tensor):
            raise ValueError(
                f"{path} must hold the affinity matrix as one tensor, got {type(a).__name__} "
                "(the .npz that antdiff affinity writes holds its bin edges too)"
            )
        a, edges = a.double().numpy(), None
    else:
        edges_path = path.with_name(path.stem + "_edges.npy")
        edges = load_npy(edges_path, "bin edges [nb + 1]") if edges_path.is_file() else None
        a = load_npy(path, "an affinity matrix [T, T] or [nb, nb]")
    if a.ndim != 2 or a.shape[0] != a.shape[1]:  # before anything reads its side as T
        raise ValueError(
            f"{path}: the affinity must be a square matrix [T, T] (or [nb, nb] with bin edges), "
            f"got shape {list(a.shape)}"
        )
    return a, edges


def _read_meta(z: Any) -> dict[str, Any]:
    """The provenance an ``antdiff affinity`` .npz records ({} where there is none or it is not
    JSON: a file made elsewhere)."""
    try:
        meta = json.loads(str(z["meta"])) if "meta" in z else {}
    except json.JSONDecodeError:
        return {}
    return meta if isinstance(meta, dict) else {}


def affinity_meta(path: str | Path) -> dict[str, Any]:
    """What an affinity file records of where it was measured (schedule, T, ...); {} for a .npy,
    a .pt or a file without a record."""
    if Path(path).suffix != ".npz":
        return {}
    with load_npy(path, "an affinity [T, T] and its bin_edges") as z:
        return _read_meta(z)


def check_affinity_source(path: str | Path, meta: dict[str, Any], schedule: Schedule) -> None:
    """Compare an affinity file's recorded schedule (``meta``) with ``schedule``."""
    T = meta.get("T")  # noqa: N806
    if isinstance(T, int) and T != schedule.T:
        raise ValueError(
            f"{path} was measured with T={T} timesteps, the schedule here has T={schedule.T}: "
            f"use the T it was measured with, or measure one for T={schedule.T} "
            "(antdiff affinity)"
        )
    said = meta.get("schedule")  # a named schedule's label, e.g. "cosine(T=1000)"
    if _other_schedule(said, schedule):
        warnings.warn(
            f"{path} was measured on the {said} schedule, and the clusters here are for another "
            f"({schedule.name}): the same timestep is another noise level there. Measure the "
            "affinity on this schedule (antdiff affinity) unless that is what you want",
            stacklevel=user_stacklevel(),
        )


def check_clusters_source(clusters: Clusters, schedule: Schedule, where: str = "clusters") -> None:
    """Warn when ``clusters`` were found on a named schedule (``meta["schedule"]``) other than
    ``schedule``: their SNR or gradient bounds then group other noise levels. The uniform split
    ("timestep") does not depend on the schedule; a custom one (an array) has no record."""
    said = clusters.meta.get("schedule")
    if clusters.objective not in ("timestep", "uniform") and _other_schedule(said, schedule):
        warnings.warn(
            f"{where} were found on the {said} schedule ({clusters.objective} objective), and "
            f"this schedule is another ({schedule.name}): the same timestep is another noise "
            "level there, so the clusters do not group the noise levels they were found for. "
            "Cluster on this schedule (antdiff cluster --schedule ...) unless that is what you "
            "want",
            stacklevel=user_stacklevel(),
        )


def _other_schedule(said: Any, schedule: Schedule) -> bool:
    """Whether the named schedule ``said`` (a label such as "cosine(T=1000)"), rebuilt with
    ``schedule``'s T, differs from ``schedule``; False for a custom one or no record."""
    base = said.split("(")[0] if isinstance(said, str) else None
    try:
        recorded = make_schedule(base, schedule.T).alphas_cumprod
    except (ValueError, TypeError):
        return False  # a custom schedule (or no record): nothing to rebuild and compare
    # float32 copies of a schedule (a diffusers scheduler's) read as the same one
    return not np.allclose(recorded, schedule.alphas_cumprod, rtol=1e-3, atol=1e-6)


def plot_clusters(clusters: Clusters, schedule: Schedule | Any, path: str | Path) -> Path:
    """PNG of log-SNR against t with the cluster boundaries and sizes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sched = as_schedule(schedule)
    if sched.T != clusters.T:
        raise ValueError(f"schedule has T={sched.T} but the clusters cover T={clusters.T}")
    t = np.arange(sched.T)
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=120)
    ax.plot(t, sched.log_snr, color="black", lw=1.5, label="log-SNR(t)")
    colors = plt.get_cmap("viridis")(np.linspace(0.1, 0.9, clusters.k))
    for i, (l, r) in enumerate(clusters.intervals):
        ax.axvspan(l - 0.5, r - 0.5, color=colors[i], alpha=0.25, lw=0)
        ax.text(
            (l + r) / 2, ax.get_ylim()[1], f"I{i + 1}\n{r - l}", ha="center", va="top", fontsize=8
        )
    for b in clusters.bounds[1:-1]:
        ax.axvline(b - 0.5, color="crimson", lw=1, ls="--")
    ax.set_xlabel("timestep t (0 = least noise)")
    ax.set_ylabel("log SNR")
    ax.set_title(
        f"{clusters.k} clusters, objective={clusters.objective}, {sched.name}", fontsize=10
    )
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    try:
        return atomic_write(path, lambda f: fig.savefig(f, format="png"))
    finally:
        plt.close(fig)

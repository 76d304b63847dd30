"""Figures of a training run from its logs (the paper's Figs. 3-4 and 7-8).

Reads ``metrics.csv`` (per-cluster losses and weights every ``train.log_every`` steps) and
``telemetry.jsonl`` (the engine's ``ant.stats()`` at the same steps: running PCGrad conflict
rates and mean cosines between the cluster gradients) and writes, atomically:

- ``losses.png``: per-cluster losses L_i over iterations (raw and a moving average);
- ``weights.png``: the method's per-cluster weights over iterations (UW: the slopes
  c_i = dT_i/dL_i of its loss terms; Nash-MTL / PCGrad: the gradient weights);
- ``conflict.png``: the rate at which the gradients of clusters i and j conflict
  (g_i . g_j < 0, the pairs PCGrad projects), averaged over the steps that computed the Gram
  (every step, or with update_every > 1 the recomputation steps only);
- ``cosine.png``: the mean cosine between cluster gradients.

The two matrices exist only for gradient methods (pcgrad, nash, ...), whose steps compute the
Gram matrix; other runs get the two curve figures.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from ..utils import atomic_write

__all__ = ["load_run_logs", "plot_cluster_curves", "plot_matrix", "plot_run"]

WEIGHT_NAMES = {
    "uw": "UW loss weights (slope of each cluster's loss term)",
    "nash": "Nash-MTL gradient weights",
    "pcgrad": "PCGrad weights (projected combination of cluster gradients)",
    "vanilla": "vanilla (each cluster's share of the batch)",
}


def load_run_logs(run_dir: str | Path) -> dict[str, Any]:
    """The logged curves of a run directory.

    Returns:
        {"steps": [n], "loss": [n], "cluster_loss": [n, k], "weight": [n, k] (float64 arrays),
        "k", "method", "bounds" (list or None), "telemetry": list of ant.stats() dicts, their
        "loss" the means over each row's interval}.
    """
    d = Path(run_dir)
    if d.exists() and not d.is_dir():
        raise NotADirectoryError(
            f"run directory {str(d)!r} is a file: give the run's folder (the train.out_dir "
            "holding metrics.csv)"
        )
    if not d.is_dir():
        raise FileNotFoundError(f"run directory {str(d)!r} does not exist")
    path = d / "metrics.csv"
    if not path.is_file():
        raise FileNotFoundError(
            f"{str(path)!r} not found: is {str(d)!r} an antdiff train output directory?"
        )
    with open(path, newline="") as f:
        # a run killed mid-write may leave a cut-off last row: skip incomplete rows
        rows = [r for r in csv.DictReader(f) if None not in r.values() and "" not in r.values()]
    if not rows:
        raise ValueError(f"{str(path)!r} has no logged steps yet")
    k = sum(1 for c in rows[0] if c.startswith("loss_c"))

    def col(name: str) -> np.ndarray:
        return np.array([float(r[name]) for r in rows], dtype=np.float64)

    tele = _read_jsonl(d / "telemetry.jsonl")
    method = tele[-1].get("method") if tele else None
    if method is None and (d / "config.yaml").is_file():
        import yaml

        saved = yaml.safe_load((d / "config.yaml").read_text()) or {}
        method = saved.get("ant", {}).get("method")
    return {
        "steps": col("step"),
        "loss": col("loss"),
        "cluster_loss": np.stack([col(f"loss_c{i + 1}") for i in range(k)], axis=1),
        "weight": np.stack([col(f"weight_c{i + 1}") for i in range(k)], axis=1),
        "k": k,
        "method": method or "unknown method",
        "bounds": tele[-1].get("bounds") if tele else None,
        "telemetry": tele,
    }


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:  # a run killed mid-write leaves a short last line
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def _labels(k: int, bounds: list[int] | None) -> list[str]:
    if bounds is None or len(bounds) != k + 1:
        return [f"I{i + 1}" for i in range(k)]
    return [f"I{i + 1} [{bounds[i]}, {bounds[i + 1]})" for i in range(k)]


def _moving_average(y: np.ndarray, window: int) -> np.ndarray:
    """Centred mean over ``window`` rows (made odd: an even one is off centre by half a row)
    that ignores NaNs (y: [n])."""
    ok = np.isfinite(y)
    kern = np.ones(window | 1)
    num = np.convolve(np.where(ok, y, 0.0), kern, mode="same")
    den = np.convolve(ok.astype(np.float64), kern, mode="same")
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.maximum(den, 1), np.nan)


def _save(fig: Any, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        return atomic_write(path, lambda f: fig.savefig(f, format="png"))
    finally:
        plt.close(fig)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_cluster_curves(
    steps: np.ndarray,
    values: np.ndarray,
    labels: list[str],
    path: str | Path,
    *,
    title: str,
    ylabel: str,
    logy: bool = False,
) -> Path:
    """One line per cluster: ``values`` [n, k] against ``steps`` [n] (raw faint, smoothed)."""
    plt = _pyplot()
    v = np.asarray(values, dtype=np.float64)
    if logy:
        v = np.where(v > 0, v, np.nan)  # no log of 0 (an absent cluster logs NaN already)
    window = max(1, len(steps) // 20) | 1  # odd, as _moving_average averages (the title's)
    fig, ax = plt.subplots(figsize=(6.4, 3.9), dpi=120)
    colors = plt.get_cmap("viridis")(np.linspace(0.0, 0.9, v.shape[1]))
    for i, label in enumerate(labels):
        if window > 1:
            ax.plot(steps, v[:, i], color=colors[i], alpha=0.25, lw=0.8)
        ax.plot(steps, _moving_average(v[:, i], window), color=colors[i], lw=1.6, label=label,
                marker="o" if len(steps) < 2 else None)  # one point draws no line: mark it
    if logy and np.isfinite(v).any():
        ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel(ylabel)
    ax.set_title(title + (f"\n(lines: moving average of {window} logs)" if window > 1 else ""),
                 fontsize=9)  # fmt: skip
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_matrix(
    M: np.ndarray,  # noqa: N803
    labels: list[str],
    path: str | Path,
    *,
    title: str,
    cbar: str,
    vmin: float,
    vmax: float,
    cmap: str = "Reds",
) -> Path:
    """Annotated heat map of a [k, k] cluster-pair matrix."""
    plt = _pyplot()
    A = np.asarray(M, dtype=np.float64)  # noqa: N806
    k = A.shape[0]
    fig, ax = plt.subplots(figsize=(1.0 * k + 2.4, 0.85 * k + 1.6), dpi=120)
    im = ax.imshow(A, cmap=cmap, vmin=vmin, vmax=vmax)
    short = [lab.split(" ")[0] for lab in labels]
    ax.set_xticks(range(k), short)
    ax.set_yticks(range(k), labels, fontsize=8)
    for i in range(k):
        for j in range(k):
            if math.isfinite(A[i, j]):
                r, g, b, _ = im.cmap(im.norm(A[i, j]))
                color = "white" if 0.299 * r + 0.587 * g + 0.114 * b < 0.5 else "black"
                ax.text(j, i, f"{A[i, j]:.2f}", ha="center", va="center", fontsize=8, color=color)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label=cbar, fraction=0.046, pad=0.04)
    return _save(fig, path)


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> dict[str, Any]:
    """All figures of a run into ``out_dir`` (default ``<run_dir>/plots``).

    Returns:
        {"losses", "weights", "conflict", "cosine": PNG paths (None when not logged),
        "method", "k", "last_step"}.
    """
    logs = load_run_logs(run_dir)
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "plots"
    k, method, steps = logs["k"], logs["method"], logs["steps"]
    labels = _labels(k, logs["bounds"])
    res: dict[str, Any] = {"method": method, "k": k, "last_step": int(steps[-1])}
    res["losses"] = str(plot_cluster_curves(
        steps, logs["cluster_loss"], labels, out / "losses.png", logy=True,
        title=f"per-cluster losses ({method})", ylabel="cluster loss L_i",
    ))  # fmt: skip
    name = WEIGHT_NAMES.get(method, f"{method} cluster weights")
    w = logs["weight"][np.isfinite(logs["weight"])]
    wide = w.size > 0 and w.min() > 0 and w.max() > 10 * w.min()  # e.g. UW's exp(-s_i) spread
    res["weights"] = str(plot_cluster_curves(
        steps, logs["weight"], labels, out / "weights.png", logy=bool(wide),
        title=name, ylabel="weight of cluster i",
    ))  # fmt: skip
    last = next((t for t in reversed(logs["telemetry"]) if "conflict_rate" in t), None)
    res["conflict"] = res["cosine"] = None
    if last is None:  # a loss-space run: no matrices, and none of another run's left in `out`
        for name in ("conflict.png", "cosine.png"):
            (out / name).unlink(missing_ok=True)
    else:
        upto = int(last.get("step", steps[-1]))  # the telemetry record's own step
        n = f"{method}, mean over the Gram steps up to step {upto}"
        rate = np.array(last["conflict_rate"], dtype=np.float64)  # null (unmeasured): NaN
        cos = np.array(last["cosine_mean"], dtype=np.float64)
        res["conflict"] = str(plot_matrix(
            rate, labels, out / "conflict.png", vmin=0.0, vmax=1.0,
            title=f"conflict rate P(g_i . g_j < 0) between clusters\n({n})", cbar="rate",
        ))  # fmt: skip
        res["cosine"] = str(plot_matrix(
            cos, labels, out / "cosine.png", vmin=-1.0, vmax=1.0,
            cmap="RdBu_r", title=f"mean cosine of cluster gradients\n({n})", cbar="cosine",
        ))  # fmt: skip
    return res

"""Heat maps of a task-affinity matrix against timestep and against log-SNR (the paper's Fig. 1).

Each bin [e_b, e_{b+1}) is drawn over its true extent: in timesteps its cell spans the bin's
edges; in log-SNR it spans log-SNR interpolated at t = e_b - 1/2 and e_{b+1} - 1/2 (clamped to
the first and last timestep), so unequal bins and the schedule's non-linearity show as they are.
PNGs are written atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..schedules import as_schedule
from ..utils import atomic_write

__all__ = ["logsnr_edges", "plot_affinity", "plot_affinity_figures"]


def logsnr_edges(bin_edges: np.ndarray, schedule: Any) -> np.ndarray:
    """[nb + 1] log-SNR at the bin boundaries (decreasing, as t increases)."""
    sched = as_schedule(schedule)
    edges = np.asarray(bin_edges, dtype=np.float64)
    if edges[-1] != sched.T:
        raise ValueError(f"bin edges end at {edges[-1]:.0f} but the schedule has T={sched.T}")
    return np.interp(edges - 0.5, np.arange(sched.T, dtype=np.float64), sched.log_snr)


def plot_affinity(
    affinity: np.ndarray,
    bin_edges: np.ndarray,
    path: str | Path,
    *,
    schedule: Any = None,
    axis: str = "timestep",
    title: str | None = None,
) -> Path:
    """One heat map PNG of ``affinity`` [nb, nb].

    Args:
        affinity: [nb, nb] cosine similarities.
        bin_edges: [nb + 1] timestep edges.
        path: the PNG to write.
        schedule: needed for ``axis="logsnr"``.
        axis: "timestep" or "logsnr".
        title: figure title (default: a description of the axes).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    A = np.asarray(affinity, dtype=np.float64)  # noqa: N806
    edges = np.asarray(bin_edges)
    if A.ndim != 2 or A.shape[0] != A.shape[1] or A.shape[0] != edges.size - 1:
        raise ValueError(
            f"affinity must be [nb, nb] with nb = len(bin_edges) - 1 = {edges.size - 1}, "
            f"got {list(A.shape)}"
        )
    if axis == "timestep":
        coords, label = edges.astype(np.float64), "timestep t"
    elif axis == "logsnr":
        if schedule is None:
            raise ValueError("axis='logsnr' needs the schedule")
        coords, label = logsnr_edges(edges, schedule), "log SNR"
    else:
        raise ValueError(f"axis must be 'timestep' or 'logsnr', got {axis!r}")
    fig, ax = plt.subplots(figsize=(5.4, 4.6), dpi=120)
    mesh = ax.pcolormesh(coords, coords, A, cmap="viridis", shading="flat")
    # little noise (t = 0, high log-SNR) at the top left in both figures, like a matrix print
    if axis == "logsnr":
        ax.invert_xaxis()
    else:
        ax.invert_yaxis()
    ax.set_xlabel(label)
    ax.set_ylabel(label)
    ax.set_aspect("equal")
    ax.set_title(title or f"task affinity (cosine of bin gradients) vs {label}", fontsize=9)
    fig.colorbar(mesh, ax=ax, label="cosine similarity")
    fig.tight_layout()
    try:
        return atomic_write(path, lambda f: fig.savefig(f, format="png"))
    finally:
        plt.close(fig)


def plot_affinity_figures(result: Any, schedule: Any, prefix: str | Path) -> list[Path]:
    """``<prefix>_timestep.png`` and ``<prefix>_logsnr.png`` for an AffinityResult."""
    prefix = Path(prefix)
    n = f"{result.n_checkpoints} checkpoint(s), {result.n_samples} samples/bin"
    out = []
    for axis, name in (("timestep", "timestep"), ("logsnr", "log-SNR")):
        path = prefix.with_name(f"{prefix.name}_{axis}.png")
        title = f"task affinity vs {name}\n{result.nb} bins, {n}"
        out.append(
            plot_affinity(
                result.affinity, result.bin_edges, path, schedule=schedule, axis=axis, title=title
            )
        )
    return out

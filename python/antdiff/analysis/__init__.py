"""Analyses of trained diffusion models: task affinity between timestep bins, and its plots."""

from __future__ import annotations

from .affinity import (
    AffinityResult,
    AffinityTasks,
    load_affinity_checkpoint,
    make_bin_edges,
    task_affinity,
)
from .plots import logsnr_edges, plot_affinity, plot_affinity_figures

__all__ = [
    "AffinityResult",
    "AffinityTasks",
    "load_affinity_checkpoint",
    "logsnr_edges",
    "make_bin_edges",
    "plot_affinity",
    "plot_affinity_figures",
    "task_affinity",
]

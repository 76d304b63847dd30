"""antdiff: exact, cheap ANT (Addressing Negative Transfer in Diffusion Models) for any trainer.

Public names are imported lazily so that ``import antdiff`` stays fast and does not pull in
torch for users who only need the clustering tools.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "ANT": "antdiff.engine",
    "Clusters": "antdiff.clustering",
    "cluster_timesteps": "antdiff.clustering",
    "Schedule": "antdiff.schedules",
    "as_schedule": "antdiff.schedules",
    "linear_schedule": "antdiff.schedules",
    "cosine_schedule": "antdiff.schedules",
    "make_schedule": "antdiff.schedules",
    "solve_intervals": "antdiff.interval_dp",
    "make_method": "antdiff.mtl",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'antdiff' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)

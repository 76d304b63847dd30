"""Triton kernels (with pure-torch references) for ANT's Gram-space multi-task step.

The engine computes J [k, P] (per-cluster gradients), then ``G, finite = gram(J)``, weights
``w`` from G (``pcgrad_weights``, ``nash_weights``, ...), and ``combine(w, J, out)``: two passes
over J. ``graddrop`` combines J elementwise, with U from the counter-based stream ``uniform``.
Each op runs a Triton kernel for CUDA tensors (or CPU tensors under ``TRITON_INTERPRET=1``) and
its torch reference otherwise; ``ANT_KERNELS_BACKEND`` =
auto|triton|torch overrides the choice (see ``backend_reasons``). Depends on torch and,
optionally, triton; never on antdiff.
"""

from __future__ import annotations

from ._dispatch import HAS_TRITON, backend, backend_reasons
from .combine import combine
from .graddrop import graddrop
from .gram import gram
from .nash import nash_weights
from .pcgrad import pcgrad_weights
from .reference import (
    combine_ref,
    graddrop_ref,
    gram_ref,
    nash_weights_ref,
    pcgrad_weights_ref,
    uniform_ref,
)
from .uniform import uniform

__all__ = [
    "HAS_TRITON",
    "backend",
    "backend_reasons",
    "combine",
    "combine_ref",
    "graddrop",
    "graddrop_ref",
    "gram",
    "gram_ref",
    "nash_weights",
    "nash_weights_ref",
    "pcgrad_weights",
    "pcgrad_weights_ref",
    "uniform",
    "uniform_ref",
]

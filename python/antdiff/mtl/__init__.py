"""MTL methods applied to the k per-cluster losses or gradients (ANT, the paper's section 4.2).

``make_method(name, k)`` returns a ``Composite`` of at most one ``LossMethod`` (loss space:
cluster losses -> terms whose sum is the loss) and one ``GramMethod`` (gradient space:
Gram [k, k] -> weights [k]; the engine computes J, G and applies w @ J). Scaling conventions
are documented in ``antdiff.mtl.base``.
"""

from __future__ import annotations

from .base import GramMethod, LossMethod
from .graddrop import GradDrop
from .gram_methods import IMTLG, MGDA, CAGrad, MeanGram, NashMTL, PCGrad
from .loss_methods import DWA, FAMO, LS, RLW, UW
from .registry import GRAD_METHODS, LOSS_METHODS, Composite, available_methods, make_method

__all__ = [
    "CAGrad",
    "Composite",
    "DWA",
    "FAMO",
    "GRAD_METHODS",
    "GradDrop",
    "GramMethod",
    "IMTLG",
    "LOSS_METHODS",
    "LS",
    "LossMethod",
    "MGDA",
    "MeanGram",
    "NashMTL",
    "PCGrad",
    "RLW",
    "UW",
    "available_methods",
    "make_method",
]

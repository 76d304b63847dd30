"""Noise schedules: linear and cosine betas, or any alphas_cumprod array.

A :class:`Schedule` is the single description of the forward process that every other part of
antdiff reads (clustering, timestep sampling, losses, samplers). It is built from
``alphas_cumprod`` so schedules from other libraries (diffusers' ``scheduler.alphas_cumprod``,
DiT's ``gaussian_diffusion``) plug in unchanged.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from .utils import user_stacklevel

__all__ = [
    "Schedule",
    "as_schedule",
    "cosine_schedule",
    "linear_schedule",
    "make_schedule",
]


@dataclass(frozen=True, eq=False)
class Schedule:
    """A discrete diffusion schedule of T timesteps (t = 0 .. T-1, t = 0 least noisy).

    Attributes:
        alphas_cumprod: [T] float64, strictly decreasing, in (0, 1).
        name: a label for logs and reprs.
    """

    alphas_cumprod: np.ndarray
    name: str = "custom"

    def __post_init__(self) -> None:
        a = np.asarray(self.alphas_cumprod, dtype=np.float64)
        if a.ndim != 1 or a.size < 1:
            raise ValueError(
                f"alphas_cumprod must be a 1-D array with at least one entry, got shape {a.shape}"
            )
        if not np.all(np.isfinite(a)):
            raise ValueError("alphas_cumprod contains NaN or inf; every entry must be in (0, 1)")
        if np.any(a <= 0.0) or np.any(a >= 1.0):
            raise ValueError(
                "alphas_cumprod must lie strictly inside (0, 1); got range "
                f"[{a.min():.3g}, {a.max():.3g}]. Clip the schedule (e.g. to [1e-12, 1 - 1e-12])."
            )
        if a.size > 1 and np.any(np.diff(a) >= 0.0):
            raise ValueError(
                "alphas_cumprod must be strictly decreasing in t (more noise at larger t)"
            )
        a = a.copy()
        a.setflags(write=False)
        object.__setattr__(self, "alphas_cumprod", a)

    @property
    def T(self) -> int:  # noqa: N802 - T is the field's name for the number of timesteps
        return int(self.alphas_cumprod.shape[0])

    @property
    def betas(self) -> np.ndarray:
        """[T] betas recovered from alphas_cumprod."""
        prev = np.concatenate([[1.0], self.alphas_cumprod[:-1]])
        return 1.0 - self.alphas_cumprod / prev

    @property
    def snr(self) -> np.ndarray:
        """[T] signal-to-noise ratio alpha_bar / (1 - alpha_bar), decreasing in t."""
        a = self.alphas_cumprod
        return a / (1.0 - a)

    @property
    def log_snr(self) -> np.ndarray:
        """[T] natural log of the SNR, computed without cancellation."""
        a = self.alphas_cumprod
        return np.log(a) - np.log1p(-a)

    def __len__(self) -> int:
        return self.T

    def __repr__(self) -> str:
        ls = self.log_snr
        return f"Schedule({self.name}, T={self.T}, logSNR {ls[0]:.2f} -> {ls[-1]:.2f})"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "alphas_cumprod": self.alphas_cumprod.tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Schedule:
        return cls(np.asarray(d["alphas_cumprod"], dtype=np.float64), name=d.get("name", "custom"))


def linear_schedule(T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Schedule:  # noqa: N803
    """DDPM's linear betas. For T != 1000 the endpoints are rescaled by 1000 / T (as in ADM)."""
    _check_T(T)
    scale = 1000.0 / T
    betas = np.linspace(beta_start * scale, beta_end * scale, T, dtype=np.float64)
    if np.any(betas >= 1.0):
        least = math.floor(max(beta_start, beta_end) * 1000) + 1  # first T with every beta < 1
        raise ValueError(
            f"T={T} is too small for the linear schedule: its betas, rescaled by 1000 / T, "
            f"would reach 1; use T >= {least}, or the cosine schedule (any T)"
        )
    return Schedule(np.cumprod(1.0 - betas), name=f"linear(T={T})")


def scaled_linear_schedule(
    T: int = 1000, beta_start: float = 0.0015, beta_end: float = 0.0195  # noqa: N803
) -> Schedule:
    """Latent diffusion's schedule: betas linear in sqrt(beta), from beta_start to beta_end
    (0.0015 and 0.0195 in the LDM FFHQ / CelebA-HQ configs; log-SNR from 6.5 to -8.9 at
    T = 1000). For T != 1000 the endpoints are rescaled by 1000 / T, as ``linear_schedule``
    does."""
    _check_T(T)
    scale = 1000.0 / T
    betas = np.linspace(math.sqrt(beta_start * scale), math.sqrt(beta_end * scale), T) ** 2
    if np.any(betas >= 1.0):
        raise ValueError(f"T={T} is too small for the scaled_linear schedule: beta would reach 1")
    return Schedule(np.cumprod(1.0 - betas), name=f"scaled_linear(T={T})")


def cosine_schedule(T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> Schedule:  # noqa: N803
    """Nichol & Dhariwal's cosine schedule, betas clipped at max_beta."""
    _check_T(T)

    def f(t: np.ndarray) -> np.ndarray:
        return np.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2

    t = np.arange(T + 1, dtype=np.float64)
    ab = f(t)
    betas = np.minimum(1.0 - ab[1:] / ab[:-1], max_beta)
    return Schedule(np.cumprod(1.0 - betas), name=f"cosine(T={T})")


def make_schedule(name: str, T: int = 1000) -> Schedule:  # noqa: N803
    """Named schedule: "linear" (DDPM / ADM), "scaled_linear" (latent diffusion) or "cosine"
    (also under diffusers' name "squaredcos_cap_v2", the same schedule)."""
    makers = {"linear": linear_schedule, "scaled_linear": scaled_linear_schedule,
              "cosine": cosine_schedule, "squaredcos_cap_v2": cosine_schedule}  # fmt: skip
    if name not in makers:
        raise ValueError(f"unknown schedule {name!r}; valid: {sorted(makers)}")
    return makers[name](T)


def as_schedule(x: Any) -> Schedule:
    """Accept a Schedule, a schedule name, or any alphas_cumprod array / tensor."""
    if isinstance(x, Schedule):
        return x
    if isinstance(x, str):
        return make_schedule(x)
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().cpu().double().numpy()
    sched = Schedule(np.asarray(x, dtype=np.float64))
    if sched.alphas_cumprod[-1] > 0.5:  # every real schedule ends near pure noise
        warnings.warn(
            f"alphas_cumprod ends at {sched.alphas_cumprod[-1]:.3g}: its noisiest timestep keeps "
            "most of the signal. If this array is the per-step alphas (a diffusers scheduler's "
            "`.alphas`), pass `scheduler.alphas_cumprod` instead: the clusters and timestep "
            "weights are computed from alphas_cumprod. A schedule meant to stop short of noise "
            "(a low-noise slice) is used as it is, without this check, when passed as "
            "antdiff.Schedule(array)",
            stacklevel=user_stacklevel(),
        )
    return sched


def _check_T(T: int) -> None:  # noqa: N802, N803
    if isinstance(T, bool) or not isinstance(T, (int, np.integer)) or T < 1:
        raise ValueError(f"T must be a positive integer, got {T!r}")

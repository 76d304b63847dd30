"""Frechet distance between Gaussian fits of two feature sets (FID for Inception pool3 features).

    FID = ||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^{1/2})

Everything runs in float64 numpy. The only delicate term is Tr((S1 S2)^{1/2}). S1 S2 is not
symmetric, but with R = S1^{1/2} (the symmetric PSD root) it is similar to M = R S2 R, which is
symmetric PSD: R^{-1} (S1 S2) R = R S2 R when R is invertible, and the eigenvalues agree by
continuity when it is not. So Tr((S1 S2)^{1/2}) = sum_i sqrt(lambda_i(M)). Both steps are
symmetric eigendecompositions (backward stable, real eigenvalues, no complex round-off to
discard, no eps * I added to the covariances); eigenvalues that round-off pushes slightly below
zero are clipped to 0 before the square root.

Sample covariances of N points have rank <= N - 1, so with N <= dim the Gaussian fit is
degenerate and FID is biased and unreliable: those inputs raise unless the caller passes
``allow_rank_deficient=True`` (meant for small-data runs on low-dimensional domain features).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def as_features(x: Any, name: str) -> np.ndarray:
    """Return ``x`` as a float64 numpy array ``[N, D]`` (accepts numpy arrays and torch tensors).

    Raises:
        ValueError: ``x`` is not 2-D, is empty or holds non-finite values.
    """
    if hasattr(x, "detach"):  # a torch tensor, possibly on an accelerator
        x = x.detach().to("cpu").double().numpy()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty 2-D array [N, D]; got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} holds NaN or inf values; features must be finite")
    return arr


def min_samples(dim: int) -> int:
    """Fewest samples whose covariance can have full rank ``dim`` (rank <= N - 1)."""
    return dim + 1


def check_enough_samples(
    n: int, dim: int, name: str, allow_rank_deficient: bool, api: bool = True
) -> None:
    """Raise ValueError when ``n`` samples cannot give a full-rank ``dim``-dim covariance
    (``api``: the message mentions the allow_rank_deficient argument, which the CLI lacks)."""
    if n < 2:
        raise ValueError(f"{name}: a covariance needs at least 2 samples; got {n}")
    if n < min_samples(dim) and not allow_rank_deficient:
        raise ValueError(
            f"{name}: {n} samples of {dim}-dim features give a rank-deficient covariance "
            f"(rank <= N - 1 = {n - 1} < {dim}), so FID is undefined/unreliable. Use at least "
            f"{min_samples(dim)} samples (published FIDs use 10K-50K)"
            + (
                ", or pass allow_rank_deficient=True for small-data domain features (the value "
                "is then biased and comparable only to runs with the same N)."
                if api
                else "."
            )
        )


def feature_stats(features: Any) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance of a feature set.

    Args:
        features: ``[N, D]`` numpy array or tensor, N >= 2.

    Returns:
        ``(mu [D], sigma [D, D])`` in float64.
    """
    f = as_features(features, "features")
    if f.shape[0] < 2:
        raise ValueError(f"features: a covariance needs at least 2 samples; got {f.shape[0]}")
    return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    """Symmetric PSD square root of a symmetric matrix via eigh (negative round-off clipped)."""
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """Tr((S1 S2)^{1/2}) for symmetric PSD S1, S2 ``[D, D]`` (see the module docstring)."""
    r = _psd_sqrt(sigma1)
    m = r @ sigma2 @ r
    m = 0.5 * (m + m.T)  # the product is symmetric in exact arithmetic only
    return float(np.sqrt(np.clip(np.linalg.eigvalsh(m), 0.0, None)).sum())


def _check_stats(mu: Any, sigma: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    mu = np.asarray(mu, dtype=np.float64)
    sigma = np.asarray(sigma, dtype=np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(
            f"{name}: need mu [D] and sigma [D, D]; got mu {mu.shape} and sigma {sigma.shape}"
        )
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{name}: mu/sigma hold NaN or inf values")
    scale = max(float(np.abs(sigma).max()), 1e-300)
    if float(np.abs(sigma - sigma.T).max()) > 1e-6 * scale:
        raise ValueError(f"{name}: sigma is not symmetric, so it is not a covariance matrix")
    sigma = 0.5 * (sigma + sigma.T)
    lowest = float(np.linalg.eigvalsh(sigma).min())
    if lowest < -1e-6 * scale:  # round-off leaves tiny negative eigenvalues, nothing more
        raise ValueError(
            f"{name}: sigma has a negative eigenvalue ({lowest:.3g}), so it is not a covariance "
            "matrix (a precision matrix or the wrong array of the stats file?)"
        )
    return mu, sigma


def fid_from_stats(
    mu1: Any,
    sigma1: Any,
    mu2: Any,
    sigma2: Any,
    *,
    n1: int | None = None,
    n2: int | None = None,
    allow_rank_deficient: bool = False,
) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2).

    Args:
        mu1, mu2: ``[D]`` means.
        sigma1, sigma2: ``[D, D]`` covariances.
        n1, n2: sample counts behind each fit, when known; used to refuse rank-deficient fits.
        allow_rank_deficient: compute even when n < D + 1 (small-data domain features only).

    Returns:
        The distance (float64, clipped at 0 against round-off).
    """
    mu1, sigma1 = _check_stats(mu1, sigma1, "stats 1")
    mu2, sigma2 = _check_stats(mu2, sigma2, "stats 2")
    if mu1.shape != mu2.shape:
        raise ValueError(f"feature dims differ: {mu1.shape[0]} vs {mu2.shape[0]}")
    dim = mu1.shape[0]
    for n, name in ((n1, "set 1"), (n2, "set 2")):
        if n is not None:
            check_enough_samples(int(n), dim, name, allow_rank_deficient)
    diff = mu1 - mu2
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2)
    value -= 2.0 * trace_sqrt_product(sigma1, sigma2)
    return max(float(value), 0.0)


def fid_from_features(f1: Any, f2: Any, *, allow_rank_deficient: bool = False) -> float:
    """FID between two feature sets ``f1: [N1, D]`` and ``f2: [N2, D]`` (numpy or torch).

    Raises:
        ValueError: shapes disagree, or N < D + 1 without ``allow_rank_deficient``.
    """
    a = as_features(f1, "f1")
    b = as_features(f2, "f2")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"f1 and f2 must share the feature dim; got {a.shape[1]} vs {b.shape[1]}")
    check_enough_samples(a.shape[0], a.shape[1], "f1", allow_rank_deficient)
    check_enough_samples(b.shape[0], b.shape[1], "f2", allow_rank_deficient)
    mu1, s1 = feature_stats(a)
    mu2, s2 = feature_stats(b)
    return fid_from_stats(mu1, s1, mu2, s2)

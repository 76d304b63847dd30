"""Improved precision and recall (Kynkaanniemi et al., 2019) with k-NN balls, blockwise.

Each real feature r_i gets a ball whose radius is the distance to its k-th nearest *other*
real feature; the real manifold is the union of those balls. Precision is the fraction of fake
features inside the real manifold; recall is the fraction of real features inside the fake
manifold (same construction on the fake set). A set against itself gives 1 / 1, since every
point lies at distance 0 from its own centre.

Memory: distances are computed a ``[block, block]`` tile at a time. Radii keep a running list
of the k smallest distances per row across column tiles; membership keeps a running OR.
Nothing of size N x N is ever held. Squared distances are compared throughout (no sqrt).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def _as_tensor(x: Any, name: str, device: torch.device) -> torch.Tensor:
    """[N, D] on ``device`` in its own floating dtype (at least float32), checked."""
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    if t.ndim != 2 or t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty 2-D [N, D] array; got shape {tuple(t.shape)}")
    wide = torch.promote_types(t.dtype, torch.float32) if t.is_floating_point() else torch.float64
    t = t.detach().to(device=device, dtype=wide)
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} holds NaN or inf values; features must be finite")
    return t


def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances ``[Na, Nb]`` via |a|^2 + |b|^2 - 2 a.b, clamped at 0."""
    d = (a * a).sum(1, keepdim=True) + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    return d.clamp_min_(0.0)


def knn_sq_radii(x: torch.Tensor, k: int, block: int) -> torch.Tensor:
    """Squared distance from each row of ``x: [N, D]`` to its k-th nearest other row: ``[N]``."""
    n = x.shape[0]
    radii = torch.empty(n, dtype=x.dtype, device=x.device)
    for i0 in range(0, n, block):
        rows = x[i0 : i0 + block]
        best = torch.full((rows.shape[0], k), float("inf"), dtype=x.dtype, device=x.device)
        for j0 in range(0, n, block):
            d = _sq_dists(rows, x[j0 : j0 + block])
            # A point is not its own neighbour: drop the diagonal where the tiles overlap.
            idx = torch.arange(rows.shape[0], device=x.device)
            cols = idx + (i0 - j0)
            inside = (cols >= 0) & (cols < d.shape[1])
            d[idx[inside], cols[inside]] = float("inf")
            best = torch.cat([best, d], dim=1).topk(k, dim=1, largest=False).values
        radii[i0 : i0 + block] = best[:, k - 1]
    return radii


def inside_manifold(
    queries: torch.Tensor, support: torch.Tensor, sq_radii: torch.Tensor, block: int
) -> torch.Tensor:
    """Whether each query ``[Nq, D]`` lies in some ball (support ``[Ns, D]``, ``sq_radii [Ns]``)."""
    hit = torch.zeros(queries.shape[0], dtype=torch.bool, device=queries.device)
    for i0 in range(0, queries.shape[0], block):
        q = queries[i0 : i0 + block]
        acc = torch.zeros(q.shape[0], dtype=torch.bool, device=queries.device)
        for j0 in range(0, support.shape[0], block):
            d = _sq_dists(q, support[j0 : j0 + block])
            acc |= (d <= sq_radii[None, j0 : j0 + block]).any(dim=1)
        hit[i0 : i0 + block] = acc
    return hit


def precision_recall(
    real_features: Any,
    fake_features: Any,
    k: int = 3,
    block: int = 2048,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    features: str = "caller-supplied features (network not recorded)",
) -> dict[str, Any]:
    """Improved precision / recall of ``fake_features`` against ``real_features``.

    Args:
        real_features: ``[Nr, D]`` numpy array or tensor.
        fake_features: ``[Nf, D]``.
        k: neighbour rank that sets each ball's radius (3 in the paper and in ANT's tables).
        block: tile edge; peak extra memory is about ``block * (block + k)`` distances.
        device: where to compute; default the real tensor's device (CPU for numpy input).
        dtype: ``torch.float32`` (usual) or ``torch.float64``.
        features: which network produced the features, copied into the result.

    Returns:
        ``{"precision", "recall", "k", "n_real", "n_fake", "features"}``.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive int; got {k!r}")
    if isinstance(block, bool) or not isinstance(block, (int, np.integer)) or block < 1:
        raise ValueError(f"block must be a positive int; got {block!r}")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64; got {dtype}")
    if device is None:
        on = real_features.device if isinstance(real_features, torch.Tensor) else "cpu"
        device = torch.device(on)
    dev = torch.device(device)
    real = _as_tensor(real_features, "real_features", dev)
    fake = _as_tensor(fake_features, "fake_features", dev)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(
            f"real and fake features must share the dim; got {real.shape[1]} vs {fake.shape[1]}"
        )
    # distances do not change under a shift: centring on the real mean, in the inputs' own
    # precision, keeps |a|^2 + |b|^2 - 2 a.b from cancelling in ``dtype`` when the features sit
    # far from the origin relative to their spread
    centre = real.mean(0, dtype=torch.float64)
    real = (real - centre.to(real.dtype)).to(dtype)
    fake = (fake - centre.to(fake.dtype)).to(dtype)
    for t, name in ((real, "real_features"), (fake, "fake_features")):
        if t.shape[0] <= k:
            raise ValueError(
                f"{name}: k={k} neighbours need at least {k + 1} rows; got {t.shape[0]}"
            )
    precision = inside_manifold(fake, real, knn_sq_radii(real, k, block), block)
    recall = inside_manifold(real, fake, knn_sq_radii(fake, k, block), block)
    return {
        "precision": float(precision.double().mean()),
        "recall": float(recall.double().mean()),
        "k": int(k),  # a numpy integer k: json cannot write it
        "n_real": int(real.shape[0]),
        "n_fake": int(fake.shape[0]),
        "features": features,
    }

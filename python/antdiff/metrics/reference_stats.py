"""Reference statistics (mu, sigma, n) of a dataset's features, computed once and cached.

Cache files are ``<cache_dir>/<dataset>__<extractor>__<data hash>.npz``: the key holds the
dataset label, the extractor's name (so different networks never share statistics) and the first
16 hex digits of a SHA-256 over the images (so edited data never hits a stale file). Files are
written atomically and hold the full extractor name and hash, which are checked on load.
"""

from __future__ import annotations

import hashlib
import re
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from antdiff.metrics.features import (
    FeatureExtractor,
    default_cache_dir,
    digits_images,
    image_floats,
)
from antdiff.metrics.fid import feature_stats
from antdiff.utils import atomic_write

DATASETS: dict[str, Callable[[], torch.Tensor]] = {
    "digits": lambda: digits_images("all")[0],
    "digits-train": lambda: digits_images("train")[0],
    "digits-test": lambda: digits_images("test")[0],
}


class ReferenceStats(NamedTuple):
    """Gaussian fit of a dataset's features: ``mu [D]``, ``sigma [D, D]``, ``n`` samples, and
    the ``extractor`` name that produced the features."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int
    extractor: str


def _slug(text: str) -> str:
    return re.sub(r"[^0-9A-Za-z.-]+", "_", text).strip("_")[:80] or "x"


def data_hash(images: torch.Tensor, chunk_bytes: int = 1 << 26) -> str:
    """SHA-256 (hex) of the shape and float32 bytes of ``images`` (uint8 pixels as the floats
    in [-1, 1] they stand for), read ``chunk_bytes`` at a time: a memory-mapped reference set
    is hashed without being loaded whole."""
    h = hashlib.sha256(repr(tuple(images.shape)).encode())
    n = int(images.shape[0])
    rows = max(1, chunk_bytes // max(1, 4 * images[:1].numel()))
    for i in range(0, n, rows):
        x = image_floats(images[i : i + rows].detach().cpu()).contiguous()
        h.update(x.numpy().tobytes())
    return h.hexdigest()


def _resolve(dataset: Any, label: str | None) -> tuple[str, torch.Tensor]:
    if isinstance(dataset, str):
        if dataset not in DATASETS:
            raise ValueError(f"unknown dataset {dataset!r}; known names: {sorted(DATASETS)}")
        return label or dataset, DATASETS[dataset]()
    x = dataset if isinstance(dataset, torch.Tensor) else torch.as_tensor(np.asarray(dataset))
    if x.ndim != 4:
        raise ValueError(
            f"dataset must be a known name {sorted(DATASETS)} or images [N, C, H, W]; "
            f"got an array of shape {tuple(x.shape)}"
        )
    return label or "images", x


def cache_path(label: str, extractor_name: str, digest: str, cache_dir: str | Path) -> Path:
    """Where the statistics of (dataset, extractor, data hash) live."""
    return Path(cache_dir) / f"{_slug(label)}__{_slug(extractor_name)}__{digest[:16]}.npz"


# what reading a truncated, corrupt or foreign .npz cache file raises
UNREADABLE = (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile)


def _load(path: Path, extractor_name: str, digest: str) -> ReferenceStats | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["extractor"]) != extractor_name or str(z["data_sha256"]) != digest:
                return None
            return ReferenceStats(z["mu"], z["sigma"], int(z["n"]), extractor_name)
    except UNREADABLE:
        return None  # unreadable or foreign file: recompute and overwrite


def reference_stats(
    dataset: str | Any,
    extractor: FeatureExtractor,
    cache_dir: str | Path | None = None,
    *,
    label: str | None = None,
    refresh: bool = False,
) -> ReferenceStats:
    """Feature statistics of a dataset, from the cache when present.

    Args:
        dataset: a name in ``DATASETS`` ("digits", "digits-train", "digits-test") or images
            ``[N, C, H, W]`` in [-1, 1] (numpy or torch).
        extractor: the FeatureExtractor; its ``name`` is part of the cache key.
        cache_dir: default ``~/.cache/antdiff/reference_stats``.
        label: dataset label in the file name (default: the name, or "images").
        refresh: recompute and overwrite even when a cached file exists.

    Returns:
        ``ReferenceStats(mu [D], sigma [D, D], n, extractor name)``.
    """
    if not isinstance(extractor, FeatureExtractor):
        raise TypeError(f"extractor must be a FeatureExtractor; got {type(extractor).__name__}")
    label, images = _resolve(dataset, label)
    digest = data_hash(images)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "reference_stats"
    path = cache_path(label, extractor.name, digest, root)
    if not refresh and path.is_file():
        hit = _load(path, extractor.name, digest)
        if hit is not None:
            return hit
    mu, sigma = feature_stats(extractor(images))
    n = int(images.shape[0])
    record = {
        "mu": mu,
        "sigma": sigma,
        "n": np.int64(n),
        "extractor": np.str_(extractor.name),
        "dataset": np.str_(label),
        "data_sha256": np.str_(digest),
    }
    atomic_write(path, lambda f: np.savez(f, **record))
    return ReferenceStats(mu, sigma, n, extractor.name)

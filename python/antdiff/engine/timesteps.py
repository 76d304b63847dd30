"""Timestep sampling that knows, on the host, how many samples each cluster gets.

Every mode first decides the per-cluster counts n [k] on the host (from B and the cluster sizes,
plus a host RNG where randomness is needed), then draws t uniformly inside each cluster on the
device. The batch comes back sorted by cluster, so the engine can cut the cluster sub-batches
with Python slices and never has to read a count back from the device.

Modes:
    "proportional": n_i ~ B * |I_i| / T, remainders assigned by systematic sampling so that
        E[n_i] = B |I_i| / T exactly: the marginal of t is uniform over [0, T) (the default).
    "equal": n_i ~ B / k (stratified like the paper's code, but any B works).
    "uniform": n ~ Multinomial(B, |I_i| / T): the same law as B i.i.d. uniform timesteps; a
        cluster may get no sample in a step.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ..clustering import Clusters

MODES = ("proportional", "equal", "uniform")
_MAX_PLACEMENTS = 256  # cached count vectors per sampler (batch sizes x remainder patterns)


def allocate(B: int, shares: np.ndarray, mode: str, rng: np.random.Generator) -> np.ndarray:  # noqa: N803
    """Per-cluster sample counts [k] (int64, sum B) for one step.

    Plain Python over the k clusters and one numpy draw: right after a training step (cold
    caches, 2-core CPU) this took 0.17 ms where the same steps as numpy array calls took 0.3 ms.
    """
    if mode == "uniform":
        return rng.multinomial(B, shares).astype(np.int64)
    k = len(shares)
    quota = [B / k] * k if mode == "equal" else [B * float(s) for s in shares]
    counts = [math.floor(q) for q in quota]
    extra = B - sum(counts)
    if extra > 0:
        # systematic sampling: inclusion probability of cluster i is exactly its fraction
        edges = list(itertools.accumulate(q - c for q, c in zip(quota, counts)))
        start = rng.random()
        for j in range(extra):
            counts[min(bisect.bisect_right(edges, start + j), k - 1)] += 1
    return np.array(counts, dtype=np.int64)


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host tensor -> device; on CUDA through pinned memory with non_blocking (no stream sync)."""
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def _placement(lo: np.ndarray, size: np.ndarray, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Per-sample first timestep, interval length and last offset on ``device`` (one copy)."""
    parts = to_device(torch.from_numpy(np.stack([lo, size, size - 1])), device)
    return parts[0], parts[1], parts[2]


def _place_on(u: torch.Tensor, parts: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """t = lo + floor(u * size), at most lo + size - 1 (float64 u [B]; ``_placement``'s parts)."""
    lo, size, last = parts
    return lo + torch.minimum((u * size).long(), last)


def _version(t: torch.Tensor) -> int:
    """In-place change counter of ``t`` (inference tensors have none, and cannot be changed in
    place outside inference mode: -1)."""
    return -1 if t.is_inference() else t._version


class TimestepSampler:
    """Draws cluster-sorted timesteps and remembers the host-side counts of the last draw."""

    def __init__(self, clusters: Clusters, mode: str = "proportional", seed: int = 0) -> None:
        if mode not in MODES:
            raise ValueError(f"sampling must be one of {MODES}, got {mode!r}")
        self.clusters = clusters
        self.mode = mode
        self.rng = np.random.default_rng(seed)
        self.shares = clusters.sizes / clusters.T
        bounds = np.asarray(clusters.bounds, dtype=np.int64)
        self._lo, self._size = bounds[:-1], bounds[1:] - bounds[:-1]
        self.last: tuple[torch.Tensor, np.ndarray, int] | None = None
        # device tensors per (count vector, device, use): see _cached
        self._placements: dict[tuple, tuple[tuple[torch.Tensor, ...], Any]] = {}

    def sample(
        self,
        B: int,
        device: Any = None,
        generator: torch.Generator | None = None,  # noqa: N803
    ) -> tuple[torch.Tensor, np.ndarray]:
        """t: [B] int64 on ``device`` sorted by cluster; counts: [k] host int64."""
        if isinstance(B, bool) or not isinstance(B, (int, np.integer)) or B < 1:
            raise ValueError(f"batch size B must be a positive integer, got {B!r}")
        device = torch.device(device) if device is not None else torch.device("cpu")
        counts = allocate(int(B), self.shares, self.mode, self.rng)
        u = torch.rand(int(B), device=device, generator=generator, dtype=torch.float64)

        def build() -> tuple[torch.Tensor, ...]:
            # per sample: the first timestep and the length of its cluster's interval
            lo, size = np.repeat(self._lo, counts), np.repeat(self._size, counts)
            return _placement(lo, size, u.device)

        t = _place_on(u, self._cached((counts.tobytes(), u.device, "place"), build))
        self.remember(t, counts)
        return t, counts

    def inverse_counts(self, counts: np.ndarray, device: torch.device) -> tuple[torch.Tensor, ...]:
        """1 / max(counts, 1) [k] float32 (cached per count vector like the placements: use it,
        never hand it out) and counts > 0 [k] bool (a fresh tensor) on ``device``."""

        def build() -> tuple[torch.Tensor, ...]:
            both = np.stack([1.0 / np.maximum(counts, 1), counts > 0]).astype(np.float32)
            return (to_device(torch.from_numpy(both), device),)

        (both,) = self._cached((counts.tobytes(), device, "inverse"), build)
        return both[0], both[1] > 0

    def _cached(self, key: tuple, build: Callable[[], tuple[torch.Tensor, ...]]):
        """Device tensors for ``key``: built once per count vector ("proportional" and "equal"
        draw from a handful of them), so a step reuses them instead of building and copying.

        Not cached: "uniform" counts (too many vectors) and tensors built in inference mode. On
        CUDA an event marks the end of the copy; a step on another stream waits for it there.
        """
        hit = self._placements.get(key)
        if hit is not None:
            tensors, event = hit
            if event is not None and torch.cuda.current_stream(key[1]) != event[1]:
                torch.cuda.current_stream(key[1]).wait_event(event[0])
            return tensors
        tensors = build()
        cache = self.mode != "uniform" and not torch.is_inference_mode_enabled()
        if cache and len(self._placements) < _MAX_PLACEMENTS:
            event = None
            if key[1].type == "cuda":
                stream = torch.cuda.current_stream(key[1])
                event = (torch.cuda.Event(), stream)
                event[0].record(stream)
            self._placements[key] = (tensors, event)
        return tensors

    def __getstate__(self) -> dict[str, Any]:
        # copies and pickles rebuild the device cache (CUDA events do not pickle)
        return {**self.__dict__, "_placements": {}}

    def remember(self, t: torch.Tensor, counts: np.ndarray) -> None:
        """Record ``t`` (cluster-sorted, in [0, T)) and its host counts [k] as the last draw."""
        self.last = (t, counts, _version(t))

    def counts_for(self, t: torch.Tensor) -> np.ndarray | None:
        """The host counts of ``t`` if it is the tensor this sampler produced last, unchanged
        since (then its values are also known to lie in [0, T))."""
        if self.last is not None and self.last[0] is t and _version(t) == self.last[2]:
            return self.last[1]
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("mode") != self.mode:
            raise ValueError(
                f"checkpoint sampled timesteps with mode {state.get('mode')!r}, this engine uses "
                f"{self.mode!r}; construct ANT(..., sampling={state.get('mode')!r})"
            )
        self.rng.bit_generator.state = state["rng"]

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
import copy
import itertools
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ..clustering import Clusters

MODES = ("proportional", "equal", "uniform")
_MAX_PLACEMENTS = 256  # cached count vectors per sampler (batch sizes x remainder patterns)
_HOST_DRAWS = 64  # host uniforms drawn per numpy call


def allocate(B: int, sizes: np.ndarray, mode: str, rng: np.random.Generator) -> np.ndarray:  # noqa: N803
    """Per-cluster sample counts [k] (int64, sum B) for one step; ``sizes`` are the clusters'
    interval lengths (positive integers: the quotas B |I_i| / T are exact fractions)."""
    if mode == "uniform":
        return rng.multinomial(B, sizes / sizes.sum()).astype(np.int64)
    start = rng.random() if _extra(B, sizes, mode) else 0.0  # a draw only where one is needed
    return np.array(_systematic(B, sizes, mode, start), dtype=np.int64)


def _quota(B: int, sizes: np.ndarray, mode: str) -> tuple[list[int], int]:  # noqa: N803
    """The quotas as integer numerators over one denominator D: B / k ("equal") or
    B |I_i| / T ("proportional"), in integers so that every floor and remainder is exact
    (B * float(|I_i| / T) floors to one less where the product is whole: 1500 * 18 / 1000)."""
    k = len(sizes)
    if mode == "equal":
        return [B] * k, k
    return [B * int(s) for s in sizes], sum(int(s) for s in sizes)


def _extra(B: int, sizes: np.ndarray, mode: str) -> int:  # noqa: N803
    """Samples left after every cluster's floor(quota): those systematic sampling places."""
    num, den = _quota(B, sizes, mode)
    return B - sum(n // den for n in num)


def _systematic(B: int, sizes: np.ndarray, mode: str, start: float) -> list[int]:  # noqa: N803
    """Counts [k] of B samples from floor(quota) plus the remainders by systematic sampling
    from ``start`` in [0, 1): the inclusion probability of cluster i is exactly its fraction.

    The cumulative remainders are integers over D; the points start + j are compared as
    (start + j) D, where only the rounding of that product (relative 1e-16) can move a pick.
    """
    num, den = _quota(B, sizes, mode)
    counts = [n // den for n in num]
    edges = list(itertools.accumulate(n % den for n in num))
    k = len(counts)
    for j in range(B - sum(counts)):
        counts[min(bisect.bisect_right(edges, (start + j) * den), k - 1)] += 1
    return counts


class _Allocations:
    """``allocate`` for one batch size ("proportional" / "equal") as a table lookup.

    The counts are a step function of the systematic-sampling start u ~ U[0, 1): they change
    only where u + j crosses a cumulative remainder, at most k places. The table holds the
    count vector of each piece (built by ``_systematic`` at the piece's midpoint; the two differ
    only for u within the rounding of (u + j) D, about 1e-16 relative, of a piece's end), so a
    step draws u and bisects instead of running the allocation in Python (0.13 ms in a
    training step on a 2-core CPU, where caches are cold).
    """

    def __init__(self, B: int, sizes: np.ndarray, mode: str) -> None:  # noqa: N803
        self.extra = _extra(B, sizes, mode)  # 0: no draw (as ``allocate``)
        num, den = _quota(B, sizes, mode)
        edges = itertools.accumulate(n % den for n in num)
        self.breaks = sorted({(e % den) / den for e in edges if e % den})
        ends = [0.0, *self.breaks, 1.0]
        self.counts = []
        for a, b in zip(ends, ends[1:]):
            self.counts.append(np.array(_systematic(B, sizes, mode, (a + b) / 2), np.int64))

    def draw(self, u: float) -> np.ndarray:
        """The counts for start u in [0, 1) (a fresh array)."""
        return self.counts[bisect.bisect_right(self.breaks, u)].copy()


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host tensor -> device; on CUDA through pinned memory with non_blocking (no stream sync)."""
    if device.type == "cuda" and x.device.type == "cpu":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def _placement(*rows: np.ndarray, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Per-sample int64 rows (first timestep, interval length, cluster id) on ``device`` in one
    copy."""
    parts = to_device(torch.from_numpy(np.stack(rows)), device)
    return tuple(parts.unbind(0))


def _place_on(r: torch.Tensor, parts: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """t = lo + r mod size for uniform int64 r in [0, 2^62) (``_placement``'s first two rows):
    each timestep of an interval has probability 1 / size up to less than 2^-62."""
    return parts[0] + r % parts[1]


_DRAW_HIGH = 2**62  # r ~ U{0, ..., 2^62 - 1} for _place_on


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
        self.sizes = np.asarray(clusters.sizes, dtype=np.int64)
        bounds = np.asarray(clusters.bounds, dtype=np.int64)
        self._lo, self._size = bounds[:-1], bounds[1:] - bounds[:-1]
        self.last: tuple[torch.Tensor, np.ndarray, int, torch.Tensor | None] | None = None
        # device tensors per (count vector, device, use): see _cached
        self._placements: dict[tuple, tuple[tuple[torch.Tensor, ...], Any]] = {}
        self._allocations: dict[int, _Allocations] = {}  # per batch size (not "uniform")
        # host uniforms drawn _HOST_DRAWS at a time (the same sequence as one call per step),
        # the rng state before the batch, and how many of it were used
        self._draws: list[float] = []
        self._draws_state: dict[str, Any] | None = None
        self._used = 0
        # each rank draws its own batch (no global draw sliced by ANT.shard): with the shared
        # seed the ranks' allocations were identical; set by the engine when it sees one
        self.per_rank = False

    def sample(
        self,
        B: int,
        device: Any = None,
        generator: torch.Generator | None = None,  # noqa: N803
        rank: tuple[int, int] | None = None,
    ) -> tuple[torch.Tensor, np.ndarray]:
        """t: [B] int64 on ``device`` sorted by cluster; counts: [k] host int64.

        ``rank`` (r, W): rank r of W draws its own batch from the stream all ranks share
        (``per_rank``). "uniform": its counts come from a generator seeded by the stream's next
        integer and r, so the ranks' counts are independent (their sum has the law of one
        draw of W B); "proportional" / "equal": its systematic start is the shared one plus
        r / W, so with equal local batches the ranks' allocations add up to the systematic
        allocation of the global batch. The stream advances alike on every rank.
        """
        if isinstance(B, bool) or not isinstance(B, (int, np.integer)) or B < 1:
            raise ValueError(f"batch size B must be a positive integer, got {B!r}")
        device = torch.device(device) if device is not None else torch.device("cpu")
        r, world = rank if rank is not None and rank[1] > 1 else (0, 1)
        if self.mode == "uniform":
            rng = self.rng
            if world > 1:
                rng = np.random.default_rng([int(self.rng.integers(1 << 62)), r])
            counts = allocate(int(B), self.sizes, self.mode, rng)
        else:
            table = self._allocations.get(int(B))
            if table is None and len(self._allocations) < _MAX_PLACEMENTS:
                table = self._allocations[int(B)] = _Allocations(int(B), self.sizes, self.mode)
            extra = table.extra if table is not None else _extra(int(B), self.sizes, self.mode)
            u = (self._uniform() + r / world) % 1.0 if extra else 0.0
            if table is not None:
                counts = table.draw(u)
            else:  # too many batch sizes to keep tables for: one allocation
                counts = np.array(_systematic(int(B), self.sizes, self.mode, u), np.int64)

        def build() -> tuple[torch.Tensor, ...]:
            # per sample: the first timestep and the length of its cluster's interval, its cluster
            lo, size = np.repeat(self._lo, counts), np.repeat(self._size, counts)
            cid = np.repeat(np.arange(len(counts)), counts)
            return _placement(lo, size, cid, device=draw.device)

        # a normal tensor also under torch.inference_mode: an inference tensor has no in-place
        # change counter, so a change after the draw (t.zero_()) would keep its stale counts
        with torch.inference_mode(False):
            draw = torch.randint(0, _DRAW_HIGH, (int(B),), device=device, generator=generator)
            parts = self._cached((counts.tobytes(), draw.device, "place"), build)
            t = _place_on(draw, parts)
        self.remember(t, counts, parts[2])
        return t, counts

    def _uniform(self) -> float:
        """The next host uniform of ``rng`` (a numpy call per step costs ~50 us in a CPU
        training step; a list lookup almost nothing)."""
        if self._used == len(self._draws):
            self._draws_state = self.rng.bit_generator.state
            self._draws, self._used = self.rng.random(_HOST_DRAWS).tolist(), 0
        self._used += 1
        return self._draws[self._used - 1]

    def inverse_counts(self, counts: np.ndarray, device: torch.device) -> tuple[torch.Tensor, ...]:
        """1 / max(counts, 1) and presence counts > 0 as float32 [k] (both cached per count
        vector like the placements: use them, never hand them out or write them), and
        presence as a fresh bool [k] tensor, on ``device``."""

        def build() -> tuple[torch.Tensor, ...]:
            both = np.stack([1.0 / np.maximum(counts, 1), counts > 0]).astype(np.float32)
            both = to_device(torch.from_numpy(both), device)
            return both[0], both[1]

        inv, present = self._cached((counts.tobytes(), device, "inverse"), build)
        return inv, present, present > 0

    def _cached(self, key: tuple, build: Callable[[], tuple[torch.Tensor, ...]]):
        """Device tensors for ``key``: built once per count vector ("proportional" and "equal"
        draw from a handful of them), so a step reuses them instead of building and copying.

        Not cached: "uniform" counts (too many vectors) and tensors built in inference mode
        (``sample`` builds its own outside it, as normal tensors). On
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

    def remember(
        self, t: torch.Tensor, counts: np.ndarray, cid: torch.Tensor | None = None,
        sliced: bool = False,
    ) -> None:
        """Record ``t`` (cluster-sorted, in [0, T)), its host counts [k] and, if given, its
        cluster ids (a read-only [B] tensor on t's device) as the last draw; ``sliced``: a
        rank's slice of a global draw (``local_slice``)."""
        self.last = (t, counts, _version(t), cid, sliced)

    def whole_draw(self, t: torch.Tensor) -> bool:
        """Whether ``t`` is this sampler's last draw itself, not a rank's slice of it."""
        return self.counts_for(t) is not None and not self.last[4]

    def local_slice(self, t: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """``t[start:stop]``, with its host counts remembered when ``t`` is this sampler's last
        draw (a rank's slice of a global batch: its sub-batches need no device read)."""
        local = t[start:stop]
        counts = self.counts_for(t)
        if counts is not None:
            edges = np.concatenate([[0], np.cumsum(counts)])
            inside = np.minimum(edges[1:], stop) - np.maximum(edges[:-1], start)
            self.remember(local, np.clip(inside, 0, None).astype(np.int64), sliced=True)
        return local

    def cid_for(self, t: torch.Tensor) -> torch.Tensor | None:
        """The cluster ids of ``t`` if ``counts_for(t)`` knows it and they were recorded (read
        them, never write them: they are cached for later draws with the same counts)."""
        return self.last[3] if self.counts_for(t) is not None else None

    def counts_for(self, t: torch.Tensor) -> np.ndarray | None:
        """The host counts of ``t`` if it is the tensor this sampler produced last, unchanged
        since (then its values are also known to lie in [0, T))."""
        if self.last is not None and self.last[0] is t and _version(t) == self.last[2]:
            return self.last[1]
        return None

    def state_dict(self) -> dict[str, Any]:
        if self._used < len(self._draws):  # mid-batch: the state before it, and the position
            d = {"mode": self.mode, "rng": copy.deepcopy(self._draws_state), "used": self._used}
        else:
            d = {"mode": self.mode, "rng": self.rng.bit_generator.state, "used": 0}
        return {**d, "per_rank": self.per_rank}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("mode") != self.mode:
            raise ValueError(
                f"checkpoint sampled timesteps with mode {state.get('mode')!r}, this engine uses "
                f"{self.mode!r}; construct ANT(..., sampling={state.get('mode')!r})"
            )
        used = state.get("used", 0)
        if isinstance(used, bool) or not isinstance(used, int) or not 0 <= used < _HOST_DRAWS:
            raise ValueError(
                f"sampler state 'used' must be an int in [0, {_HOST_DRAWS}), got {used!r}: the "
                "checkpoint was not written by this version's sampler"
            )
        self.rng.bit_generator.state = state["rng"]
        self.per_rank = bool(state.get("per_rank", False))  # absent: saved before it existed
        self._draws, self._used = [], 0
        if used:
            self._uniform()
            self._used = used

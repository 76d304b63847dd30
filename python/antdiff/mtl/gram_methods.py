"""Gradient-space MTL methods: Gram G [k, k] -> weights w [k], update = w @ J.

Every method here works from the k x k Gram alone, in float64, with a fixed amount of work
(no data-dependent loop, no host sync). Inactive clusters (absent, or with an exactly zero
gradient) have their rows and columns of G zeroed before the method sees it and get weight 0.
Scaling: see ``antdiff.mtl.base`` (``reduction`` "mean" on raw cluster-loss gradients,
"sum" on gradients of terms that already carry the 1/k). PCGrad and Nash-MTL solve on the
GPU with ant_kernels' Triton kernels and on the CPU with the C++ solvers of ``antdiff.mtl.native``
(the torch references where neither serves).

- ``MeanGram`` ("mean"): equal weights 1/k_present.
- ``PCGrad`` ("pcgrad", Yu et al. 2020): native "sum": w = C.sum(0) where row i of C expresses
  the projected g_i' in the basis of the original g's (``ant_kernels.pcgrad_weights``).
- ``NashMTL`` ("nash", Navon et al. 2022): native "sum": alpha > 0 with alpha * (G alpha) = 1,
  solved on G_n = G / ||G||_F for conditioning (``ant_kernels.nash_weights``) and scaled back by
  1 / sqrt(||G||_F), as its authors' solver does: the update alpha @ J has norm sqrt(k_active)
  whatever the gradients' scale (divided by k_present with "mean"). The engine recomputes w every
  ``update_every`` (25) steps and reuses it in between, so on- and off-steps both apply
  ``alpha_i / k_present`` to the raw cluster losses (ANT's sum_i alpha_i L_i / k).
- ``IMTLG`` ("imtl", Liu et al. 2021): native "mean": sum w = 1 and the update has the same
  projection onto every unit gradient u_i, i.e. G w = c * sqrt(diag G): w ∝ G^{-1} sqrt(diag G).
- ``MGDA`` ("mgda", Sener & Koltun 2018): native "mean": the min-norm point of the convex hull,
  w = argmin_{w in simplex} w^T G w, solved exactly by trying every support (k <= 12).
- ``CAGrad`` ("cagrad", Liu et al. 2021): native "mean": d = g0 + (c |g0| / |g_w|) g_w with
  w = argmin_{w in simplex} g_w . g0 + c |g0| |g_w| (the dual), solved exactly per support;
  the update is divided by 1 + c^2 (``rescale=1``), 1 + c (2) or not at all (0).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from . import native
from .base import (
    GramMethod,
    check_int,
    check_saved_k,
    commit,
    n_present,
    pick_rows,
    real_or_none,
    subset_masks,
    subset_solve,
)
from .stream import saved_steps

MAX_SUBSET_K = 12  # 2^k - 1 supports of k x k systems: 4095 tiny solves at k = 12
_RIDGE = 1e-12  # relative to the mean active diagonal: keeps every support's system definite
_FEAS_TOL = 1e-9


def _normalised(G: Tensor, active: Tensor) -> Tensor:
    """G divided by its mean active diagonal (all these methods are invariant to that scale)."""
    # divided before the sum: a sum of finite entries near the dtype's maximum would be inf
    scale = (G.diagonal() / active.sum().clamp(min=1)).sum()
    return G / scale.clamp(min=torch.finfo(G.dtype).tiny)


def _check_subset_k(name: str, k: int) -> None:
    if k > MAX_SUBSET_K:
        raise ValueError(
            f"{name} solves its simplex problem exactly over all supports and supports "
            f"k <= {MAX_SUBSET_K}, got k={k}"
        )


class MeanGram(GramMethod):
    """Equal weights over present clusters (the loss-space LS, in gradient space)."""

    name = "mean"
    native = "mean"

    def _weights(self, G: Tensor, active: Tensor, present: Tensor) -> Tensor:
        return present.to(G.dtype) / n_present(present, G.dtype)


class PCGrad(GramMethod):
    """PCGrad in Gram space with random projection orders looked up on G's device.

    The orders of a step are a function of the seed and of the number of valid (finite) steps
    so far, a counter kept on the device: two tables of M random order matrices (drawn once
    from the seed on the host), row i of step n's orders being table one's row i at n mod M
    composed with table two's at (n // M) mod M, a period of M^2 steps (M = 1024 at k <= 45).
    A skipped step leaves the counter, so the next valid step uses the orders the skipped one
    would have, as if it had never run, and no host sync is needed.

    Args:
        k: number of clusters.
        reduction: "mean" (w = sum_i C[i] / k_present) or "sum" (w = sum_i C[i]).
        seed: seed of the order tables (the counter is in ``state_dict``).
    """

    name = "pcgrad"
    native = "sum"
    _TABLE_BYTES = 1 << 22  # both tables (uint8 entries up to k = 256, int16 above)

    def __init__(self, k: int, *, reduction: str = "mean", seed: int = 2) -> None:
        super().__init__(k, reduction=reduction)
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
            raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
        self.seed = seed
        dtype = torch.uint8 if k <= 256 else torch.int16
        self.period = max(16, min(1024, self._TABLE_BYTES // (2 * k * k * dtype.itemsize)))
        self._host_tables = self._draw_tables(dtype)  # [2, M, k, k]
        self._tables: tuple[Tensor, Tensor] | None = None  # [M, k, k] each, on the device
        self._count: Tensor | None = None  # [1] int64 there: valid steps so far
        # the counter from a checkpoint, until the first step picks the device (a host int: the
        # counter is then made there by a fill, not copied, which would synchronise)
        self._count_saved = 0
        self.last_orders: Tensor | None = None

    def _draw_tables(self, dtype: torch.dtype) -> Tensor:
        """Both tables from the seed, on the host. Built at construction and load, outside any
        training step, because the sort's temporaries are 20x the size of the tables."""
        gen = torch.Generator().manual_seed(self.seed)
        draws = torch.rand(2, self.period, self.k, self.k, generator=gen)
        return torch.argsort(draws, dim=3).to(dtype)

    def _on(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """The two order tables and the step counter on ``device`` (moved on first use)."""
        if self._tables is None or self._tables[0].device != device:
            pinned = device.type == "cuda"  # no stream sync for the one copy
            tables = self._host_tables.pin_memory() if pinned else self._host_tables
            tables = tables.to(device, non_blocking=pinned)
            self._tables = (tables[0], tables[1])
            if self._count is None:
                self._count = torch.full((1,), self._count_saved, dtype=torch.int64,
                                         device=device)  # fmt: skip
            else:  # a move between devices (not in a training step's loop)
                self._count = self._count.to(device)
        return (*self._tables, self._count)

    def _weights(self, G: Tensor, active: Tensor, present: Tensor) -> Tensor:
        first, second, n = self._on(G.device)
        m = self.period
        # row i: the order in which g_i' is projected against all clusters (itself included)
        pick = second.index_select(0, n // m % m).long()
        orders = torch.gather(first.index_select(0, n % m), 2, pick)
        self.last_orders = orders[0].long()
        return native.pcgrad_weights(G, self.last_orders)

    def _commit(self, valid: Tensor) -> None:
        self._count = self._count + valid.to(self._count.device)  # a bool adds 0 or 1

    def state_dict(self) -> dict[str, Any]:
        count = self._count if self._count is not None else torch.tensor(self._count_saved)
        return {**super().state_dict(), "seed": self.seed, "steps": count.reshape(()).clone()}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        super().load_state_dict(d)
        if "steps" not in d:  # a checkpoint from the generator-based orders
            warnings.warn(
                "PCGrad state without 'steps' (an older checkpoint): the projection orders "
                "restart from step 0 of their sequence",
                stacklevel=2,
            )
        steps = saved_steps(d, "PCGrad state")
        seed = int(d.get("seed", self.seed))
        if seed != self.seed:
            self.seed = seed
            self._host_tables = self._draw_tables(self._host_tables.dtype)
        self._tables, self._count = None, None
        self._count_saved = steps


class NashMTL(GramMethod):
    """Nash-MTL bargaining weights, recomputed every ``update_every`` steps by the engine.

    alpha > 0 solves alpha_i (G alpha)_i = 1 on the raw Gram of the cluster-loss gradients, so
    the weights scale as 1 / |g| and the update sum_i alpha_i g_i has norm sqrt(k_active) (the
    authors' normalisation of G only conditions their solver). ``last_alpha`` holds alpha.

    Args:
        k: number of clusters.
        reduction: "mean" (w = alpha / k_present) or "sum" (w = alpha).
        update_every: steps between recomputations (25, as in the paper's experiments).
        iters: Newton iterations of the solver (fixed, no host sync; 40). A solve that ends
            without a solution gives NaN weights: the engine keeps the last weights for that
            step and ``ant.stats()`` warns. Gradients that nearly cancel may need more.
    """

    name = "nash"
    native = "sum"

    def __init__(
        self, k: int, *, reduction: str = "mean", update_every: int = 25, iters: int = 40
    ) -> None:
        super().__init__(k, reduction=reduction, update_every=update_every)
        self.iters = check_int("iters", iters)
        self.last_alpha: Tensor | None = None
        self._alpha: Tensor | None = None  # the last solve's, until _commit
        # a loaded state whose weights are on another scale (see load_state_dict): the engine
        # recomputes them at its next step and clears this
        self.stale_weights = False

    def _weights(self, G: Tensor, active: Tensor, present: Tensor) -> Tensor:
        # alpha * (G alpha) = 1 on G itself (solved on G / ||G||_F for conditioning, then
        # scaled back), the bargaining solution of Nash-MTL's authors (whose solver also
        # normalises G and multiplies the norm back into its constraint). Its update alpha @ J
        # has norm sqrt(k) whatever the gradients' scale.
        self._alpha = native.nash_weights(G, iters=self.iters, normalize=False)
        return self._alpha  # NaN: the steps ended without a solution

    def _commit(self, valid: Tensor) -> None:
        self.last_alpha = commit(self.last_alpha, self._alpha, valid)

    def state_dict(self) -> dict[str, Any]:
        alpha = None if self.last_alpha is None else self.last_alpha.clone()
        return {**super().state_dict(), "last_alpha": alpha, "alpha_scale": "raw",
                "reduction": self.reduction}  # fmt: skip

    def load_state_dict(self, d: dict[str, Any]) -> None:
        super().load_state_dict(d)
        alpha = d["last_alpha"]
        check_saved_k(self.name, "last_alpha", alpha, self.k)
        self.last_alpha = None if alpha is None else alpha.clone()
        if d.get("alpha_scale") != "raw" or d.get("reduction", self.reduction) != self.reduction:
            # saved before the weights solved alpha * (G alpha) = 1 on the raw Gram (they were
            # sqrt(||G||_F) times larger; "uw+nash" also divided by k once less), or with another
            # reduction: the kept weights are not this method's
            self.stale_weights = True
            warnings.warn(
                "Nash-MTL state from an earlier antdiff: its weights solved G / ||G||_F (a step "
                "sqrt(||G||_F) times the authors'), these solve G itself; the engine recomputes "
                "them at the next step. The optimiser's moments saw the old step sizes: expect "
                "a transient (a fresh optimiser state or a short warm-up avoids it)",
                stacklevel=2,
            )


class IMTLG(GramMethod):
    """IMTL-G: the weights (sum 1) whose update projects equally onto every unit gradient."""

    name = "imtl"
    native = "mean"

    def _weights(self, G: Tensor, active: Tensor, present: Tensor) -> Tensor:
        # w ∝ N^-1 C^-1 1 (N the gradient norms, C their cosine matrix): solved on C, whose unit
        # diagonal makes the ridge weigh alike on every cluster whatever their norms' spread.
        # The ridge is at least the Gram's own rounding (2 k eps of its dtype): nearly parallel
        # gradients (the diffusion case) make C nearly singular, and a float32 Gram solved as
        # exact gave weights of its rounding noise (0.67 / 0.12 / 0.21 where float64 gives
        # 0.32 / 0.30 / 0.37); at that ridge they tend to 1 / N, IMTL-G's parallel limit.
        # But rounding can also leave C indefinite (lambda_min ~ -5e-7 for a float32 Gram of
        # gradients with cosines >= 1 - 5e-8): a ridge of that size then amplified the rounding
        # (weights 7.9 / -3.3 / -0.7 / -2.1 / -0.8, an update uphill for every cluster, or 30x
        # the float64 update's norm). So the ridges r0, 10 r0, ..., 1e6 r0 (r0 = 2 k eps) are
        # solved at once and the smallest one is kept that is at least 4 times the rounding's
        # negative eigenvalue (C + r / 4 is definite: the noise then moves the solution by a
        # third at most); where none is, the parallel limit 1 / N. Over 1440 noisy nearly
        # parallel float32 cases (k 3-8, P 4096 and 65536) the update's norm stays within 2x of
        # float64's and projects positively on every cluster gradient. A definite C (a float64
        # Gram) keeps r0: IMTL-G's own solution, also where its equal projections are negative.
        ridge = max(_RIDGE, 2 * self.k * self._g_eps)
        d = G.diagonal().clamp(min=0).sqrt()
        ok = active & (d > 0)  # a zero gradient (or an inactive cluster) gets weight 0
        dd = torch.where(ok, d, 1.0)
        okd = ok.to(G.dtype)
        C = G / (dd[:, None] * dd[None, :]) * (okd[:, None] * okd[None, :]) + torch.diag(1 - okd)
        r = (ridge * torch.logspace(0, 6, 7, dtype=G.dtype, device=G.device))[:, None, None]
        eye = torch.eye(self.k, dtype=G.dtype, device=G.device)
        u = torch.linalg.solve_ex(C + r * eye, okd.expand(len(r), -1)[..., None])[0][..., 0]
        v = torch.where(ok, u / dd, 0.0)  # [m, k]
        fine = torch.linalg.cholesky_ex(C + r / 4 * eye)[1] == 0  # [m]; no host sync
        limit = torch.where(ok, 1 / dd, 0.0)  # the parallel limit as the last candidate
        first = torch.cat([fine, fine.new_ones(1)]).to(torch.int8).argmax()  # the first True
        v = pick_rows(torch.cat([v, limit[None]]), first)
        s = v.sum()
        return v / torch.where(s.abs() > torch.finfo(G.dtype).tiny, s, 1.0)


class MGDA(GramMethod):
    """MGDA: the min-norm convex combination of the cluster gradients (exact, k <= 12).

    MGDA-UB (Sener and Koltun, 2018) runs MGDA on gradients with respect to a shared
    representation, an upper bound chosen because full parameter gradients are costly; here
    the Gram of the full cluster gradients comes with every step, so this solves the exact
    problem that MGDA-UB bounds."""

    name = "mgda"
    native = "mean"

    def __init__(self, k: int, *, reduction: str = "mean") -> None:
        super().__init__(k, reduction=reduction)
        _check_subset_k(self.name, self.k)

    def _weights(self, G: Tensor, active: Tensor, present: Tensor) -> Tensor:
        Gn = _normalised(G, active)
        masks = subset_masks(self.k, G.device)
        # on support S the KKT system G_SS w_S = lambda 1 gives w_S ∝ G_SS^{-1} 1
        u = subset_solve(Gn, masks, masks.to(G.dtype)[:, :, None], _RIDGE)[:, :, 0]
        s = u.sum(1)
        w = u / torch.where(s > 0, s, 1.0)[:, None]
        ok = ~(masks & ~active).any(1) & (s > 0) & (w >= -_FEAS_TOL).all(1)
        obj = torch.einsum("nk,kl,nl->n", w, Gn, w)
        # every feasible candidate lies in the simplex, so the smallest objective is optimal
        best = torch.where(ok, obj, float("inf")).argmin()
        w = pick_rows(w, best).clamp(min=0)
        return w / w.sum().clamp(min=torch.finfo(G.dtype).tiny)


class CAGrad(GramMethod):
    """CAGrad: conflict-averse update within a ball of radius c |g0| around the mean gradient.

    Args:
        k: number of clusters (<= 12).
        reduction: "mean" or "sum" (see ``antdiff.mtl.base``).
        c: radius of the ball relative to |g0| (0.4).
        rescale: 0 none, 1 divide the update by 1 + c^2 (default), 2 by 1 + c.
    """

    name = "cagrad"
    native = "mean"

    def __init__(self, k: int, *, reduction: str = "mean", c: float = 0.4, rescale: int = 1):
        super().__init__(k, reduction=reduction)
        _check_subset_k(self.name, self.k)
        if (v := real_or_none(c)) is None or not 0 <= v < float("inf"):
            raise ValueError(f"c must be a finite number >= 0, got {c!r}")
        if rescale not in (0, 1, 2):
            raise ValueError(f"rescale must be 0, 1 or 2, got {rescale!r}")
        self.c = v
        self.rescale = rescale

    def dual_weights(self, Gn: Tensor, b: Tensor, active: Tensor) -> Tensor:
        """argmin over the simplex (on active clusters) of w^T Gn b + c |g0| sqrt(w^T Gn w).

        On a support S the stationarity conditions reduce to one quadratic in the multiplier:
        with u = G_SS^{-1} 1, v = G_SS^{-1} (G b)_S, a = sum u, beta = sum v,
        gamma = v . (G b)_S and disc = beta^2 - a (gamma - c^2 |g0|^2), the solution is
        w_S = (lambda u - v) / sqrt(disc) with lambda = (beta + sqrt(disc)) / a.
        """
        tiny = torch.finfo(Gn.dtype).tiny
        Gb = Gn @ b
        cn = self.c * (b @ Gb).clamp(min=0).sqrt()
        masks = subset_masks(self.k, Gn.device)
        m = masks.to(Gn.dtype)
        rhs = torch.stack([m, m * Gb], dim=2)
        uv = subset_solve(Gn, masks, rhs, _RIDGE)
        u, v = uv[:, :, 0], uv[:, :, 1]
        a, beta, gamma = u.sum(1), v.sum(1), (v * Gb).sum(1)
        disc = beta * beta - a * (gamma - cn * cn)
        sd = disc.clamp(min=tiny).sqrt()
        lam = (beta + sd) / torch.where(a > 0, a, 1.0)
        w = (lam[:, None] * u - v) / sd[:, None]
        ok = ~(masks & ~active).any(1) & (disc > 0) & (a > 0) & (w >= -_FEAS_TOL).all(1)
        w = torch.where(ok[:, None], w, 0.0)
        quad = torch.einsum("nk,kl,nl->n", w, Gn, w).clamp(min=0)
        obj = w @ Gb + cn * quad.sqrt()
        best = torch.where(ok, obj, float("inf")).argmin()
        w = pick_rows(w, best).clamp(min=0)
        return w / w.sum().clamp(min=tiny)

    def _weights(self, G: Tensor, active: Tensor, present: Tensor) -> Tensor:
        b = present.to(G.dtype) / n_present(present, G.dtype)
        if self.c == 0.0:
            return b
        Gn = _normalised(G, active)
        w = self.dual_weights(Gn, b, active)
        gw = (w @ Gn @ w).clamp(min=0).sqrt()
        cn = self.c * (b @ Gn @ b).clamp(min=0).sqrt()
        lam = cn / gw.clamp(min=torch.finfo(G.dtype).tiny)
        d = b + lam * w
        div = {0: 1.0, 1: 1.0 + self.c**2, 2: 1.0 + self.c}[self.rescale]
        return d / div

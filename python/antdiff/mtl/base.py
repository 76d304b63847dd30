"""Base classes and shared helpers of the MTL methods.

Two families act on the k cluster losses L: [k] of one training step:

- ``LossMethod`` (loss space): maps L to k transformed terms whose sum is the training loss.
- ``GramMethod`` (gradient space): maps the Gram matrix G = J J^T: [k, k] of the per-cluster
  gradients J: [k, P] to weights w: [k]; the engine writes the update w @ J. The engine alone
  computes J and G and applies w (TorchJD's "Gram -> weights" split).

Scaling conventions (every method):

- The equal-weight baseline is the mean over PRESENT clusters: total = sum_i L_i / k_present.
  An empty cluster just drops out; with every cluster present this is ANT's
  "cluster losses pre-divided by k".
- A ``GramMethod`` with ``reduction="mean"`` (the default when it stands alone) expects the rows
  of J to be gradients of the raw cluster losses L_i; its weights are on the scale of
  1 / k_present (equal weights give the mean). With ``reduction="sum"`` (what ``make_method``
  sets after a loss method, e.g. "uw+pcgrad"; Nash-MTL keeps "mean" there on the terms'
  gradients: its weights absorb any per-cluster scale, and the engine's equal-weight fallback
  after a loss method is 1 per term, the loss method's own update) the rows are gradients of
  the transformed terms,
  which already carry the 1/k, and equal weights are 1 (the update is a sum, ANT's
  "update = sum_i g_i'"). Each method states its native convention; the base class rescales.
- Absent clusters get weight exactly 0. So do clusters whose gradient is exactly zero
  (G[i, i] == 0), which the gradient methods cannot place.

Nothing here synchronises with the host: no ``.item()``, no Python branch on a tensor value.
"""

from __future__ import annotations

import numbers
from typing import Any, ClassVar

import torch
from torch import Tensor

_REDUCTIONS = ("mean", "sum")


def check_int(name: str, value: Any, minimum: int = 1) -> int:
    """``value`` as an int (numpy integers too), or a ValueError if it is not an integer >=
    ``minimum`` (bools are refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def real_or_none(value: Any) -> float | None:
    """``value`` as a float if it is a real number (numpy scalars too, not bools), else None."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value)


def check_k(k: Any) -> int:
    """Return ``k`` as an int, or raise if it is not an integer >= 1."""
    return check_int("k", k)


def check_losses(L: Tensor, present: Tensor, k: int) -> None:
    """Raise unless ``L: [k]`` is a float tensor and ``present: [k]`` a bool tensor."""
    if not isinstance(L, Tensor) or L.shape != (k,) or not L.is_floating_point():
        got = f"{tuple(L.shape)} {L.dtype}" if isinstance(L, Tensor) else type(L).__name__
        raise ValueError(f"L must be a float tensor of shape [k]=[{k}], got {got}")
    check_present(present, k, L.device)


def check_present(present: Tensor, k: int, device: torch.device) -> None:
    """Raise unless ``present`` is a bool [k] tensor on ``device``."""
    if not isinstance(present, Tensor) or present.shape != (k,) or present.dtype != torch.bool:
        got = (
            f"{tuple(present.shape)} {present.dtype}"
            if isinstance(present, Tensor)
            else type(present).__name__
        )
        raise ValueError(f"present must be a bool tensor of shape [k]=[{k}], got {got}")
    if present.device != device:
        raise ValueError(f"present is on {present.device} but the losses/Gram on {device}")


def check_gram(G: Tensor, present: Tensor, k: int) -> None:
    """Raise unless ``G: [k, k]`` is a float tensor and ``present: [k]`` a bool tensor."""
    if not isinstance(G, Tensor) or G.shape != (k, k) or not G.is_floating_point():
        got = f"{tuple(G.shape)} {G.dtype}" if isinstance(G, Tensor) else type(G).__name__
        raise ValueError(f"G must be a float tensor of shape [k, k]=[{k}, {k}], got {got}")
    check_present(present, k, G.device)


def n_present(present: Tensor, dtype: torch.dtype) -> Tensor:
    """Number of present clusters as a 0-d tensor, at least 1 (so dividing by it is safe)."""
    return present.sum().clamp(min=1).to(dtype)


def masked_softmax(logits: Tensor, mask: Tensor) -> Tensor:
    """Softmax over the entries where ``mask`` is True; exactly 0 elsewhere (0 if none)."""
    top = torch.where(mask, logits, float("-inf")).amax()
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    e = torch.where(mask, torch.exp(torch.where(mask, logits - top, 0.0)), 0.0)
    return e / e.sum().clamp(min=torch.finfo(e.dtype).tiny)


class LossMethod(torch.nn.Module):
    """Loss-space method: k cluster losses -> k transformed terms whose sum is the total loss.

    Subclasses implement ``transform``; stateful ones also ``observe``. ``transform`` is a pure
    function of (L, present, state): the state moves only in ``observe``, which the engine calls
    once per completed (finite) step, so calling ``transform`` twice in a step is harmless.
    """

    name: ClassVar[str] = ""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = check_k(k)

    def transform(self, L: Tensor, present: Tensor) -> Tensor:
        """Transformed per-cluster terms.

        Args:
            L: [k] mean per-sample loss of each cluster (0 where absent).
            present: [k] bool, which clusters have samples this step.

        Returns:
            [k] terms; their sum is the total loss; absent clusters give exactly 0 and no
            gradient to anything.
        """
        raise NotImplementedError

    def nonfinite_cause(self, L: Tensor, present: Tensor) -> tuple[Tensor, str] | None:
        """Where the method can tell why finite cluster losses ``L`` gave a non-finite step:
        the [k] bool mask of the clusters at fault and a message whose ``{values}`` the
        engine replaces with their losses (it reads the mask on a skipped step only, once the
        host has the verdict); else None."""
        return None

    def forward(self, L: Tensor, present: Tensor) -> Tensor:
        """Total loss: ``transform(L, present).sum()``."""
        return self.transform(L, present).sum()

    def slopes(self, L: Tensor, present: Tensor) -> Tensor:
        """dT_i/dL_i at ``L`` (the transforms are elementwise in L): the weight each cluster's
        loss gets this step, detached. By autograd; subclasses may give the closed form."""
        with torch.enable_grad():
            Lr = L.detach().clone().requires_grad_(True)  # noqa: N806
            (c,) = torch.autograd.grad(self.transform(Lr, present).sum(), Lr, allow_unused=True)
        return torch.zeros_like(L) if c is None else c.detach()

    def grads(self, L: Tensor, present: Tensor) -> tuple[Tensor, list[Tensor | None]]:
        """The slopes dT/dL [k] and dT/dp for each parameter p of ``parameters()`` that requires
        grad (None where T does not depend on p), at ``L``, detached: what a gradient-method
        step needs from the loss method. By autograd; subclasses may give the closed form."""
        params = [p for p in self.parameters() if p.requires_grad]
        with torch.enable_grad():
            Lr = L.detach().clone().requires_grad_(True)  # noqa: N806
            total = self.transform(Lr, present).sum()
            out = torch.autograd.grad(total, [Lr, *params], allow_unused=True)
        c = torch.zeros_like(L) if out[0] is None else out[0].detach()
        return c, [None if g is None else g.detach() for g in out[1:]]

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimiser groups for learnable parameters ([] when there are none)."""
        return []

    def observe(self, L: Tensor, present: Tensor) -> None:
        """Update the state after a completed step (``L`` detached). Default: stateless."""
        check_losses(L, present, self.k)

    # Optional: ``fused_total(per, cid, inv, present) -> (total, L, slopes)``, the engine's
    # whole reduction (cluster means of the per-sample losses ``per`` [B] with clusters ``cid``
    # [B], 1 / counts ``inv`` [k] and presence ``present`` [k] as float32 (1.0 / 0.0; both
    # read-only), then the transform) as one autograd node; ``ANT.reduce`` uses it outside
    # DDP, and takes the total's finiteness as the step's (so ``total`` must be inf/NaN
    # whenever a present cluster mean is). None: the engine composes torch operators.
    fused_total = None

    @property
    def observes(self) -> bool:
        """Whether this class overrides ``observe`` (the engine skips the call otherwise)."""
        return type(self).observe is not LossMethod.observe

    def extra_repr(self) -> str:
        return f"k={self.k}"


class GramMethod:
    """Gradient-space method: Gram [k, k] -> weights [k] (the update is w @ J).

    Subclasses set ``native`` ("mean" when their raw weights sum to ~1, "sum" when equal weights
    are 1) and implement ``_weights`` on a float64 Gram with inactive rows and columns zeroed.
    """

    name: ClassVar[str] = ""
    needs: ClassVar[str] = "gram"
    native: ClassVar[str] = "mean"

    def __init__(self, k: int, *, reduction: str = "mean", update_every: int = 1) -> None:
        self.k = check_k(k)
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        self.reduction = reduction
        self.update_every = check_int("update_every", update_every)
        # the last weights returned (for inspection; the engine keeps and saves its own copy)
        self.last_weights: Tensor | None = None
        self._g_eps = torch.finfo(torch.float64).eps  # the current call's Gram precision

    def weights(self, G: Tensor, present: Tensor, valid: Tensor | None = None) -> Tensor:
        """Weights of the per-cluster gradients.

        Args:
            G: [k, k] fp32 or fp64 Gram matrix of the rows of J.
            present: [k] bool on G's device.
            valid: optional 0-d bool tensor; where False (a non-finite step) the method's saved
                state keeps its previous value (PCGrad's order counter included). No host
                sync.

        Returns:
            w: [k] float32 on G's device; the update is w @ J; 0 for absent clusters.
            A cluster whose diagonal entry of G is not finite (its gradient holds NaN or inf)
            gets weight 0 and the others' weights are those without it (a "mean" reduction
            still divides by the clusters present), without a word, since telling would read G
            on the host: check ``isfinite(G)`` yourself (the engine does, and skips such a
            step) or pass ``valid``. All weights are NaN where the method has no solution
            (the saved state then keeps its previous value, as for ``valid`` False): a NaN or inf
            off the diagonal between finite clusters (which a Gram of finite rows cannot
            hold), a solver that ended without one, weights out of float32's range (inf, or
            all rounded to 0).
        """
        check_gram(G, present, self.k)
        self._g_eps = torch.finfo(G.dtype).eps  # the Gram's own rounding, before the upcast
        G64 = G.detach().to(torch.float64)
        G64 = 0.5 * G64 + 0.5 * G64.T  # halves first: a finite G near 1.8e308 stays finite
        # a cluster whose gradient has NaN or inf (its diagonal entry does) is left out like an
        # absent one; its row and column are masked below (diag > 0 alone kept an inf)
        diag = G64.diagonal()
        active = present & (diag > 0) & torch.isfinite(diag)
        both = active[:, None] & active[None, :]
        Gm = torch.where(both, G64, 0.0)
        # NaN or inf off the diagonal between finite clusters (no Gram of finite rows has it):
        # NaN weights, since some solvers would pass over it to finite but arbitrary weights
        odd = torch.where(torch.isfinite(Gm).all(), 0.0, torch.nan)
        w = self._weights(Gm, active, present) + odd
        w = torch.where(active, w, 0.0) * self._scale(present)
        w32 = w.to(torch.float32)
        # NaN: a solver without a solution (weights unused); also weights out of float32's
        # range (inf; or all rounded to 0, a silent zero update: Nash-MTL's scale as
        # 1 / sqrt(||G||), out of range for a float64 Gram of norm beyond ~1e90 or below ~1e-76)
        lost = ((w32.abs().amax() == 0) & (w.abs().amax() > 0)) | ~torch.isfinite(w32).all()
        w = torch.where(lost, torch.nan, w32)
        solved = torch.isfinite(w).all()
        valid = solved if valid is None else valid.to(solved.device) & solved
        self.last_weights = commit(self.last_weights, w, valid)
        self._commit(valid)
        return w

    def _weights(self, G: Tensor, active: Tensor, present: Tensor) -> Tensor:
        """Native float64 weights [k] from the masked Gram (inactive rows/cols are 0). A
        stateful method keeps its new state aside for :meth:`_commit`."""
        raise NotImplementedError

    def _commit(self, valid: Tensor) -> None:
        """Take the state the last ``_weights`` computed where ``valid`` (0-d bool: the step is
        finite and its weights solved, all of them in float32's range), else keep the old."""

    def _scale(self, present: Tensor) -> Tensor | float:
        if self.native == self.reduction:
            return 1.0
        kp = n_present(present, torch.float64)
        return 1.0 / kp if self.reduction == "mean" else kp

    def state_dict(self) -> dict[str, Any]:
        """The last weights returned (None before the first call); subclasses add theirs."""
        last = None if self.last_weights is None else self.last_weights.clone()
        return {"last_weights": last}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        if "last_weights" not in d:
            raise ValueError(f"{self.name} state needs 'last_weights', got keys {sorted(d)}")
        last = d["last_weights"]
        check_saved_k(self.name, "last_weights", last, self.k)
        self.last_weights = None if last is None else last.clone()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(k={self.k}, reduction={self.reduction!r})"


def check_saved_k(name: str, key: str, value: Any, k: int) -> None:
    """A saved [k] vector of a method state, or None; else a ValueError naming both k."""
    if value is not None and (not isinstance(value, Tensor) or tuple(value.shape) != (k,)):
        got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(
            f"{name} state: {key!r} has shape {got}, but this method has k={k} clusters: the "
            "state was saved with another k"
        )


def commit(old: Tensor | None, new: Tensor, valid: Tensor | None) -> Tensor:
    """``new``, or ``old`` where the 0-d ``valid`` is False (no host sync)."""
    if valid is None or old is None:
        return new
    return torch.where(valid.to(new.device), new, old.to(new.device))


def subset_masks(k: int, device: torch.device) -> Tensor:
    """All 2^k - 1 non-empty subsets of the k clusters as a bool [2^k - 1, k] tensor."""
    codes = torch.arange(1, 1 << k, device=device)
    return ((codes[:, None] >> torch.arange(k, device=device)) & 1).bool()


def subset_solve(G: Tensor, masks: Tensor, rhs: Tensor, ridge: float) -> Tensor:
    """Solve G_SS x_S = rhs_S on every support S at once (x = 0 off S).

    Solved as C_SS y_S = (rhs / d)_S, x = y / d, with d = sqrt(diag G) and C = G / (d d^T) the
    cosine matrix: the same solution, but ``ridge`` (on C's unit diagonal, identity off S)
    weighs the same against every cluster, however far apart their gradient norms are. The
    matrix is symmetric positive definite for any PSD G and the solve never fails.

    Args:
        G: [k, k] float64 PSD. masks: [n, k] bool supports. rhs: [n, k, m].

    Returns:
        x: [n, k, m].
    """
    m = masks.to(G.dtype)
    d = G.diagonal().clamp(min=0).sqrt()
    d = torch.where(d > 0, d, 1.0)  # a zero gradient: its row of C stays zero
    C = G / (d[:, None] * d[None, :])
    eye = torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
    A = C * (m[:, :, None] * m[:, None, :]) + torch.diag_embed(1.0 - m) + ridge * eye
    y, _ = torch.linalg.solve_ex(A, rhs * (m / d)[:, :, None])
    return y * (m / d)[:, :, None]


def pick_rows(values: Tensor, index: Tensor) -> Tensor:
    """``values[index]`` for a 0-d device index without a host sync (-> values.shape[1:])."""
    return values.index_select(0, index.reshape(1))[0]

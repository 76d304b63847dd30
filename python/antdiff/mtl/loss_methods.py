"""Loss-space MTL methods: k cluster losses L [k] -> k terms whose sum is the training loss.

Scaling (see ``antdiff.mtl.base``): the equal-weight baseline is sum_i L_i / k_present, so every
method's effective weights d(total)/dL_i sum to 1 over present clusters, except UW, which is
exactly ANT's formula with the fixed k.

- ``LS`` ("ls", "mean"): L_i / k_present.
- ``UW`` ("uw", Kendall et al. 2018): 0.5 * (exp(-s_i) L_i / k + s_i), s_i learnable (init 0),
  own optimiser group (AdamW lr 0.025, weight decay 0). The total may be negative.
- ``RLW`` ("rlw", Lin et al. 2021): softmax over present clusters of standard normal draws,
  times L_i. The draw for the next step is made in ``observe`` (so ``transform`` is pure),
  by Box-Muller from a counter-based stream that only a step with a present cluster advances.
- ``DWA`` ("dwa", Liu et al. 2019): softmax over present clusters of r_i / T with
  r_i = L_i(t-1) / L_i(t-2), the last two averages of cluster i's loss (1 until it has two),
  T = 2. The paper averages over epochs; here over ``window`` steps (1 by default: single
  steps). The paper's weights sum to K on a summed loss; ours sum to 1 on the same losses.
- ``FAMO`` ("famo", Liu et al. 2023): z = softmax(xi) over present clusters, term
  z_i log(L_i - min_i + eps) / c with c = sum_j z_j / (L_j - min_j + eps) held constant, so the
  effective weights z_i / (c (L_i - min_i + eps)) sum to 1. ``observe`` moves xi by Adam
  (lr 0.025, L2 decay 0.01) on the gradient of z . (log D_prev - log D_now): the decrease of
  each cluster's log loss between consecutive observed steps (different batches, unlike the
  paper's re-evaluation of the same batch, which would cost a second forward pass).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import native
from .base import LossMethod, check_losses, masked_softmax, n_present, real_or_none
from .stream import StepStream


def _check_positive(name: str, value: Any) -> float:
    if (v := real_or_none(value)) is None or not 0 < v < math.inf:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return v


class LS(LossMethod):
    """Linear scalarisation: the mean of the present clusters' losses."""

    name = "ls"

    def transform(self, L: Tensor, present: Tensor) -> Tensor:
        check_losses(L, present, self.k)
        return torch.where(present, L, 0.0) / n_present(present, L.dtype)


class UW(LossMethod):
    """Uncertainty weighting with one learnable log-variance s_i per cluster.

    Args:
        k: number of clusters.
        lr: learning rate of the s group (AdamW, weight decay 0).
    """

    name = "uw"

    def __init__(self, k: int, *, lr: float = 0.025) -> None:
        super().__init__(k)
        self.lr = _check_positive("lr", lr)
        self.s = torch.nn.Parameter(torch.zeros(self.k))

    def transform(self, L: Tensor, present: Tensor) -> Tensor:
        check_losses(L, present, self.k)
        s = self.s.to(L.dtype)
        term = 0.5 * (torch.exp(-s) * torch.where(present, L, 0.0) / self.k + s)
        return torch.where(present, term, 0.0)

    def slopes(self, L: Tensor, present: Tensor) -> Tensor:
        check_losses(L, present, self.k)
        return torch.where(present, torch.exp(-self.s.detach().to(L.dtype)), 0.0) * (0.5 / self.k)

    def grads(self, L: Tensor, present: Tensor) -> tuple[Tensor, list[Tensor | None]]:
        """Closed form: slopes c_i and d T / d s_i = 1/2 - c_i L_i (0 where absent)."""
        c = self.slopes(L, present)
        return c, [torch.where(present, 0.5 - c * L, 0.0).to(self.s.dtype)]

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": [self.s], "lr": self.lr, "weight_decay": 0.0}]

    def fused_total(
        self, per: Tensor, cid: Tensor, inv: Tensor, present: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The engine's reduction in one autograd node: total, cluster means L [k], slopes [k].

        Same value and gradients as ``transform`` on the cluster means: the graph of about
        twenty small operators becomes one node of about a dozen, whose backward is the closed
        form d total / d per_n = slopes[cid_n] / N[cid_n], d total / d s_i = present_i 0.5 -
        slopes_i L_i (the UW overhead on a small model is those operators' launch cost). The
        backward is not differentiable again (double backward raises). ``present`` is float32
        (1.0 / 0.0). The total is inf/NaN whenever a present cluster mean is: its slope
        exp(-s_i) / 2k multiplies it, and a slope that is 0 or inf makes the product NaN. It is
        also NaN where s_i is not finite or exp(-s_i) overflows (s_i < -87), present or not: the
        engine then skips the step as non-finite. CPU float32 inputs take one C++ call
        (csrc/step_ops.h, cluster sums in float64), everything else torch operators (float32
        sums): the same values up to rounding.
        """
        if present.shape != (self.k,) or present.dtype != torch.float32:
            raise ValueError(
                f"present must be float32 [k]=[{self.k}] here, got {tuple(present.shape)} "
                f"{present.dtype}"
            )
        if inv.shape != (self.k,) or cid.shape != per.shape:
            raise ValueError(
                f"inv must be [k]=[{self.k}] and cid shaped like per {tuple(per.shape)}, got "
                f"{tuple(inv.shape)} and {tuple(cid.shape)}"
            )
        return _UWTotal.apply(per, self.s, cid, inv, present)


class _UWTotal(torch.autograd.Function):
    """UW.fused_total's node; L and the slopes come out detached."""

    @staticmethod
    def forward(ctx, per: Tensor, s: Tensor, cid: Tensor, inv: Tensor, present: Tensor):
        ctx.dtypes = per.dtype, s.dtype
        ctx.set_materialize_grads(False)  # no zero tensors for L's and c's gradients
        if native.serves_uw(per, s, cid, inv, present):  # CPU float32: one C++ call
            total, L, c, coef, ds = native.uw_forward(  # noqa: N806
                per, s, cid, inv, present, checked=False
            )
            ctx.save_for_backward(coef, ds, cid)
            ctx.mark_non_differentiable(L, c)
            return total, L, c
        k = inv.shape[0]
        sums = torch.zeros(k, device=per.device, dtype=torch.float32)
        L = sums.index_add_(0, cid, per.float()).mul_(inv)  # noqa: N806
        s32 = s.float()
        c = torch.exp(math.log(0.5 / k) - s32).mul_(present)  # d total / d L_i, 0 if absent
        cl = c * L
        total = torch.addcmul(cl, s32, present, value=0.5).sum()
        ctx.save_for_backward(c * inv, present.mul(0.5).sub_(cl), cid)
        ctx.mark_non_differentiable(L, c)
        return total, L, c

    @staticmethod
    @once_differentiable  # the closed form is not itself differentiable: say so if asked
    def backward(ctx, g: Tensor, _gL: Tensor, _gc: Tensor):  # noqa: N803
        per_sample, ds, cid = ctx.saved_tensors
        d_per, d_s = ctx.dtypes
        if d_per == torch.float32 and native.serves_uw(per_sample, g, cid):
            grad_per = native.uw_backward(g, per_sample, cid, checked=False)
            return grad_per, (g * ds).to(d_s), None, None, None
        return (g * per_sample)[cid].to(d_per), (g * ds).to(d_s), None, None, None


class RLW(LossMethod):
    """Random loss weighting: fresh softmax-of-normal weights every step.

    Args:
        k: number of clusters.
        seed: seed of the counter-based stream of the draws, in [0, 2**64) (its step counter is
            saved as the module's extra state).
    """

    name = "rlw"

    def __init__(self, k: int, *, seed: int = 1) -> None:
        super().__init__(k)
        self.stream = StepStream(seed, tag=2)
        # the first step's draw comes from a stream independent of the per-step one
        init = torch.Generator().manual_seed(seed ^ 0x5EED_F1E7)
        self.register_buffer("draw", torch.randn(self.k, generator=init, dtype=torch.float64))

    def transform(self, L: Tensor, present: Tensor) -> Tensor:
        check_losses(L, present, self.k)
        w = masked_softmax(self.draw, present).to(L.dtype)
        return w * torch.where(present, L, 0.0)

    def observe(self, L: Tensor, present: Tensor) -> None:
        check_losses(L, present, self.k)
        u = self.stream.uniform(2 * self.k, self.draw.device).to(torch.float64)
        # Box-Muller; 1 - u is in (0, 1], so the logarithm is finite
        radius = torch.sqrt(-2.0 * torch.log1p(-u[: self.k]))
        new = (radius * torch.cos(2.0 * math.pi * u[self.k :])).to(self.draw.dtype)
        # a step with no (finite) cluster keeps the current draw and the stream's position
        seen = present.any()
        self.draw.copy_(torch.where(seen, new, self.draw))
        self.stream.advance(seen)

    def get_extra_state(self) -> dict[str, Any]:
        return {"stream": self.stream.state_dict()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state["stream"] if "stream" in state else state["rng"])


class DWA(LossMethod):
    """Dynamic weight average: w = softmax(r / T) over the present clusters, r_i the ratio of
    cluster i's last two observed loss averages (1 until two are known).

    DWA as published averages each task's loss over an epoch and compares the last two epochs.
    ``window`` is that period in steps here: each cluster's losses are averaged over the
    ``window`` steps observed (its steps without samples left out; a step skipped as non-finite
    is not observed) and the weights move once a window closes. ``window=1`` (the default)
    compares single steps, whose cluster losses carry the batch's sampling noise; steps per
    epoch (data size / batch size) gives the published scheme.

    Args:
        k: number of clusters.
        temperature: softmax temperature T (2).
        window: steps per loss average (1).
    """

    name = "dwa"

    def __init__(self, k: int, *, temperature: float = 2.0, window: int = 1) -> None:
        super().__init__(k)
        self.temperature = _check_positive("temperature", temperature)
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be an int >= 1 (steps per loss average), got {window!r}")
        self.window = window
        self.register_buffer("last", torch.zeros(self.k, dtype=torch.float64))
        self.register_buffer("prev", torch.zeros(self.k, dtype=torch.float64))
        self.register_buffer("count", torch.zeros(self.k, dtype=torch.int64))  # averages known
        # the window in progress: sums and counts of each cluster's losses, steps observed
        self.register_buffer("acc", torch.zeros(self.k, dtype=torch.float64))
        self.register_buffer("n", torch.zeros(self.k, dtype=torch.int64))
        self.register_buffer("seen", torch.zeros((), dtype=torch.int64))

    def cluster_weights(self, present: Tensor) -> Tensor:
        """[k] float64 weights (sum 1 over present clusters) for the next step."""
        known = (self.count >= 2) & (self.prev > 0)
        ratio = torch.where(known, self.last / torch.where(known, self.prev, 1.0), 1.0)
        return masked_softmax(ratio / self.temperature, present)

    def transform(self, L: Tensor, present: Tensor) -> Tensor:
        check_losses(L, present, self.k)
        w = self.cluster_weights(present).to(L.dtype)
        return w * torch.where(present, L, 0.0)

    def observe(self, L: Tensor, present: Tensor) -> None:
        check_losses(L, present, self.k)
        L = L.detach().to(self.last)
        self.acc.add_(torch.where(present, L, 0.0))
        self.n.add_(present.to(self.n.dtype))
        counted = present.any()  # the engine observes a skipped step with none present: no step
        self.seen.add_(counted.to(self.seen.dtype))
        end = counted & (self.seen % self.window == 0)  # 0-d, on the device: no host read
        close = end & (self.n > 0)  # a cluster with no samples in the window keeps its averages
        self.prev.copy_(torch.where(close, self.last, self.prev))
        self.last.copy_(torch.where(close, self.acc / self.n.clamp(min=1), self.last))
        self.count.add_(close.to(self.count.dtype))
        keep = (~end).to(self.acc.dtype)
        self.acc.mul_(keep)
        self.n.mul_(keep.to(self.n.dtype))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # states saved before the window existed compared single steps: an empty window
        for key in ("acc", "n", "seen"):
            if prefix + key not in state_dict and prefix + "last" in state_dict:
                state_dict[prefix + key] = torch.zeros_like(getattr(self, key))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"k={self.k}, temperature={self.temperature}, window={self.window}"


class FAMO(LossMethod):
    """Fast adaptive multitask optimisation on the cluster losses.

    Args:
        k: number of clusters.
        lr: Adam learning rate of the logits xi (0.025).
        gamma: L2 decay of the logits, added to their gradient as in Adam (0.01).
        eps: added to L_i - min_i before the log (1e-8).
        min_loss: lower bound of every cluster loss (0 for the diffusion loss).
    """

    name = "famo"
    _BETAS = (0.9, 0.999)
    _ADAM_EPS = 1e-8

    def __init__(
        self,
        k: int,
        *,
        lr: float = 0.025,
        gamma: float = 0.01,
        eps: float = 1e-8,
        min_loss: float = 0.0,
    ) -> None:
        super().__init__(k)
        self.lr = _check_positive("lr", lr)
        if (g := real_or_none(gamma)) is None or not 0 <= g < math.inf:
            raise ValueError(f"gamma must be a finite number >= 0, got {gamma!r}")
        self.gamma = g
        self.eps = _check_positive("eps", eps)
        if (m := real_or_none(min_loss)) is None or not math.isfinite(m):
            raise ValueError(f"min_loss must be a finite number, got {min_loss!r}")
        self.min_loss = m
        for name in ("xi", "exp_avg", "exp_avg_sq", "prev_log"):
            self.register_buffer(name, torch.zeros(self.k, dtype=torch.float64))
        self.register_buffer("steps", torch.zeros(self.k, dtype=torch.float64))
        self.register_buffer("has_prev", torch.zeros(self.k, dtype=torch.bool))

    def _shifted(self, L: Tensor, present: Tensor) -> Tensor:
        return torch.where(present, L - self.min_loss, 1.0) + self.eps

    def transform(self, L: Tensor, present: Tensor) -> Tensor:
        check_losses(L, present, self.k)
        z = masked_softmax(self.xi, present).to(L.dtype)
        D = self._shifted(L, present)
        c = (z / D).sum().detach().clamp(min=torch.finfo(D.dtype).tiny)  # 0 if none present
        return torch.where(present, z * torch.log(D), 0.0) / c

    def observe(self, L: Tensor, present: Tensor) -> None:
        check_losses(L, present, self.k)
        log_now = torch.log(self._shifted(L.detach().to(self.xi), present))
        both = present & self.has_prev
        delta = torch.where(both, self.prev_log - log_now, 0.0)
        z = masked_softmax(self.xi, both)
        grad = z * (delta - (z * delta).sum()) + self.gamma * self.xi
        self._adam(grad, both)
        self.prev_log.copy_(torch.where(present, log_now, self.prev_log))
        self.has_prev.logical_or_(present)

    def _adam(self, grad: Tensor, mask: Tensor) -> None:
        """One Adam step on the logits where ``mask`` holds (per-entry step counts)."""
        b1, b2 = self._BETAS
        steps = self.steps + mask.to(self.steps.dtype)
        m = b1 * self.exp_avg + (1 - b1) * grad
        v = b2 * self.exp_avg_sq + (1 - b2) * grad * grad
        safe = steps.clamp(min=1)
        denom = (v / (1 - b2**safe)).sqrt() + self._ADAM_EPS
        xi = self.xi - self.lr * (m / (1 - b1**safe)) / denom
        self.xi.copy_(torch.where(mask, xi, self.xi))
        self.exp_avg.copy_(torch.where(mask, m, self.exp_avg))
        self.exp_avg_sq.copy_(torch.where(mask, v, self.exp_avg_sq))
        self.steps.copy_(steps)

    def cluster_weights(self, present: Tensor) -> Tensor:
        """[k] float64 softmax weights z over present clusters."""
        return masked_softmax(self.xi, present)

    def nonfinite_cause(self, L: Tensor, present: Tensor) -> tuple[Tensor, str] | None:
        low = present & torch.isfinite(L) & (L.double() - self.min_loss + self.eps <= 0)
        return low, (
            f"cluster loss(es) {{values}} at or below FAMO's min_loss={self.min_loss:g}, whose "
            "log (of L - min_loss) is not finite: pass method_kwargs={'min_loss': m} with m "
            "below every cluster loss"
        )

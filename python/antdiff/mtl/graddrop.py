"""GradDrop (Chen et al. 2020, "Just Pick a Sign") on the per-cluster parameter gradients.

For every parameter element p, with g_i = J[i, p] over present clusters:
purity P = 0.5 * (1 + sum_i g_i / sum_i |g_i|) in [0, 1] (0.5 where every g_i is 0);
draw U ~ Uniform(0, 1); keep the positive entries if P > U, else the negative ones:
M_i = [P > U] [g_i > 0] + [P < U] [g_i < 0]. The update is sum_i (leak + (1 - leak) M_i) g_i,
divided by k_present with ``reduction="mean"`` (native convention: "sum"). It needs J itself,
not only its Gram (``needs = "grads"``), and acts on parameter gradients rather than on
activation gradients (the ANT models have no shared-trunk/heads split).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import GramMethod, check_present, n_present
from .stream import StepStream


class GradDrop(GramMethod):
    """Sign-consistent random masking of the per-cluster gradients.

    Args:
        k: number of clusters.
        reduction: "mean" (divide the combined gradient by k_present) or "sum".
        leak: fraction of every gradient that always passes (0 = pure GradDrop).
        seed: seed of the counter-based stream drawing U, in [0, 2**64). U depends on the seed
            and the number of valid steps only, so a skipped step draws nothing.
    """

    name = "graddrop"
    needs = "grads"
    native = "sum"

    def __init__(
        self, k: int, *, reduction: str = "mean", leak: float = 0.0, seed: int = 3
    ) -> None:
        super().__init__(k, reduction=reduction)
        if isinstance(leak, bool) or not isinstance(leak, (int, float)) or not 0 <= leak <= 1:
            raise ValueError(f"leak must be a number in [0, 1], got {leak!r}")
        self.leak = float(leak)
        self.stream = StepStream(seed)

    def weights(self, G: Tensor, present: Tensor) -> Tensor:
        raise TypeError("graddrop needs the gradients themselves: call combine_grads(J, present)")

    def combine_grads(self, J: Tensor, present: Tensor, valid: Tensor | None = None) -> Tensor:
        """Combined update.

        Args:
            J: [k, P] per-cluster gradients (rows of absent clusters are ignored).
            present: [k] bool on J's device.
            valid: optional 0-d bool tensor; where False (a non-finite step) the stream of U
                stays where it was, so the next valid step draws what it would have drawn
                without this one. No host sync.

        Returns:
            [P] update in J's dtype (float32 accumulation for half-precision J).
        """
        if not isinstance(J, Tensor) or J.dim() != 2 or J.shape[0] != self.k:
            got = f"{tuple(J.shape)}" if isinstance(J, Tensor) else type(J).__name__
            raise ValueError(f"J must be a tensor of shape [k, P] with k={self.k}, got {got}")
        if not J.is_floating_point():
            raise ValueError(f"J must be a float tensor, got {J.dtype}")
        check_present(present, self.k, J.device)
        acc = torch.float64 if J.dtype == torch.float64 else torch.float32
        keep = present.to(acc)
        total = torch.zeros(J.shape[1], dtype=acc, device=J.device)
        mass = torch.zeros_like(total)
        for i in range(self.k):  # row by row: O(P) extra memory instead of O(kP)
            row = J[i].to(acc) * keep[i]
            total += row
            mass += row.abs()
        purity = 0.5 * (1.0 + total / torch.where(mass > 0, mass, 1.0))
        u = self.stream.uniform(J.shape[1], J.device).to(acc)
        self.stream.advance(valid)
        pick_pos = purity > u
        pick_neg = purity < u
        out = torch.zeros_like(total)
        for i in range(self.k):
            row = J[i].to(acc) * keep[i]
            m = (pick_pos & (row > 0)) | (pick_neg & (row < 0))
            out += (self.leak + (1.0 - self.leak) * m.to(acc)) * row
        if self.reduction == "mean":
            out = out / n_present(present, acc)
        return out.to(J.dtype)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "stream": self.stream.state_dict()}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        super().load_state_dict(d)
        self.stream.load_state_dict(d["stream"] if "stream" in d else d["rng"])

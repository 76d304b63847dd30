"""GradDrop (Chen et al. 2020, "Just Pick a Sign") on the per-cluster parameter gradients.

For every parameter element p, with g_i = J[i, p] over present clusters:
purity P = 0.5 * (1 + sum_i g_i / sum_i |g_i|) in [0, 1] (0.5 where every g_i is 0);
draw U ~ Uniform(0, 1) (value p of a counter-based stream indexed by the valid steps); keep the
positive entries if P > U, else the negative ones: M_i = [P > U] [g_i > 0] + [P < U] [g_i < 0].
The update is sum_i (g_i if M_i else leak g_i), divided by k_present with ``reduction="mean"``
(native convention: "sum"). It needs J itself, not only its Gram (``needs = "grads"``), and acts
on parameter gradients rather than on activation gradients (the ANT models have no
shared-trunk/heads split). The computation is ``ant_kernels.graddrop``: one pass over J.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import native
from .base import GramMethod, check_present, n_present, real_or_none
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
        if (v := real_or_none(leak)) is None or not 0 <= v <= 1:
            raise ValueError(f"leak must be a number in [0, 1], got {leak!r}")
        self.leak = v
        self.stream = StepStream(seed, tag=1)

    def weights(self, G: Tensor, present: Tensor) -> Tensor:
        raise TypeError("graddrop needs the gradients themselves: call combine_grads(J, present)")

    def combine_grads(
        self,
        J: Tensor,
        present: Tensor,
        valid: Tensor | None = None,
        out: Tensor | None = None,
    ) -> Tensor:
        """Combined update: ``ant_kernels.graddrop`` (one pass over J, no P-sized temporaries;
        in C++ for float32 CPU tensors).

        Args:
            J: [k, P] per-cluster gradients (rows of absent clusters are ignored).
            present: [k] bool on J's device.
            valid: optional 0-d bool tensor; where False (a non-finite step) the stream of U
                stays where it was, so the next valid step draws what it would have drawn
                without this one. No host sync.
            out: optional [P] float tensor for the result; may be one of J's rows (the engine
                passes row 0, so GradDrop needs no memory beyond J).

        Returns:
            ``out``, or a new [P] tensor in J's dtype (float32 accumulation for half-precision
            J, float64 for float64).
        """
        if not isinstance(J, Tensor) or J.dim() != 2 or J.shape[0] != self.k:
            got = f"{tuple(J.shape)}" if isinstance(J, Tensor) else type(J).__name__
            raise ValueError(f"J must be a tensor of shape [k, P] with k={self.k}, got {got}")
        if not J.is_floating_point():
            raise ValueError(f"J must be a float tensor, got {J.dtype}")
        check_present(present, self.k, J.device)
        acc = torch.float64 if J.dtype == torch.float64 else torch.float32
        divisor = n_present(present, acc) if self.reduction == "mean" else torch.ones(
            (), dtype=acc, device=J.device)  # fmt: skip
        step = self.stream.counter(J.device)
        res = native.graddrop(J, present, self.stream.key, step, self.leak, divisor, out)
        self.stream.advance(valid)
        return res

    def state_dict(self) -> dict[str, Any]:
        # k is saved because nothing else in the state has a k-shaped entry to check
        return {**super().state_dict(), "k": self.k, "stream": self.stream.state_dict()}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        if d.get("k", self.k) != self.k:  # states saved before k was recorded have no "k"
            raise ValueError(
                f"{self.name} state was saved with k={d['k']} clusters, but this method has "
                f"k={self.k}"
            )
        super().load_state_dict(d)
        self.stream.load_state_dict(d["stream"] if "stream" in d else d["rng"])

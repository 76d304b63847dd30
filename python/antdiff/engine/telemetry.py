"""Per-step engine telemetry kept on the device; read back only when someone asks (logging)."""

from __future__ import annotations

from typing import Any

import torch


class Telemetry:
    """Cluster losses, weights, cosine matrix and PCGrad conflict counts.

    ``update`` only queues device ops; ``snapshot`` (called by loggers, outside the step) is the
    one place that copies to the host.
    """

    def __init__(self, k: int) -> None:
        self.k = k
        self.t: dict[str, torch.Tensor] = {}
        self.steps = 0

    def _acc(self, name: str, value: torch.Tensor) -> None:
        prev = self.t.get(name)
        if prev is None:
            self.t[name] = value
            return
        if prev.device != value.device:  # a resumed run loads its running sums on the CPU
            prev = prev.to(value.device)
        self.t[name] = prev + value

    def update(
        self,
        L: torch.Tensor,  # noqa: N803
        w: torch.Tensor,
        present: torch.Tensor,
        finite: torch.Tensor,
        G: torch.Tensor | None = None,  # noqa: N803
    ) -> None:
        """Record one step. L, w, present: [k]; finite: 0-d bool; G: [k, k] or None."""
        self.steps += 1
        L = self.t["loss"] = L.detach().float()  # noqa: N806
        self.t["weight"] = w.detach().float()
        self.t["present"] = present
        self.t["finite"] = finite
        counted = present & finite
        self._acc("nonfinite_steps", (~finite).float())
        self._acc("loss_sum", torch.where(counted, L, 0.0))
        self._acc("loss_count", counted.float())
        if G is None:
            return
        d = G.diagonal().clamp(min=1e-30).sqrt()
        cos = (G / (d[:, None] * d[None, :])).float()
        both = (present[:, None] & present[None, :] & finite).float()
        self.t["cosine"] = cos
        self._acc("cosine_sum", torch.where(both > 0, cos, 0.0))
        self._acc("conflict_count", both * (cos < 0).float())
        self._acc("pair_count", both)

    def count_nonfinite(self, before: torch.Tensor, after: torch.Tensor) -> None:
        """The last step's finite flag went from ``before`` to ``after`` (0-d bools, after
        implies before): its gradients were found non-finite after ``update`` recorded it."""
        self._acc("nonfinite_steps", (before ^ after).float())
        self.t["finite"] = after

    def snapshot(self) -> dict[str, Any]:
        """Host copies: last-step values and running means (a sync; call outside the step)."""
        out: dict[str, Any] = {"steps": self.steps}
        for name in ("loss", "weight", "cosine"):
            if name in self.t:
                out[name] = self.t[name].cpu().tolist()
        if "loss_sum" in self.t:
            out["loss_mean"] = (
                (self.t["loss_sum"] / self.t["loss_count"].clamp(min=1)).cpu().tolist()
            )
            out["nonfinite_steps"] = int(self.t["nonfinite_steps"].cpu())
        if "pair_count" in self.t:
            pairs = self.t["pair_count"].clamp(min=1)
            out["conflict_rate"] = (self.t["conflict_count"] / pairs).cpu().tolist()
            out["cosine_mean"] = (self.t["cosine_sum"] / pairs).cpu().tolist()
        return out

    def reset_running(self) -> None:
        for name in ("loss_sum", "loss_count", "cosine_sum", "conflict_count", "pair_count"):
            self.t.pop(name, None)

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "t": {k: v.detach().cpu() for k, v in self.t.items()}}

    def load_state_dict(self, d: dict[str, Any], device: Any = None) -> None:
        self.steps = int(d["steps"])
        self.t = {k: v.to(device) if device is not None else v for k, v in d["t"].items()}

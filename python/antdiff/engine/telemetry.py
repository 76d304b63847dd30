"""Per-step engine telemetry kept on the device; read back only when someone asks (logging)."""

from __future__ import annotations

from typing import Any

import torch

# steps whose tensors are kept before their running sums are folded in (a handful of batched
# operators every FOLD steps instead of about ten small ones per step)
FOLD = 32
TAIL = 1024  # folded micro-batches of one optimiser step that its verdict can still reach


class Telemetry:
    """Cluster losses, weights, cosine matrix and PCGrad conflict counts.

    ``update`` queues no device work: it keeps the step's tensors (fresh ones that the engine
    never writes again; ``ant.last``'s tensors are read-only for the same reason) and folds
    them into the running sums every ``FOLD`` steps, or when ``snapshot`` asks (called by
    loggers, outside the step; the one place that copies to the host besides ``state_dict``,
    which saves the unfolded steps as they are).
    """

    def __init__(self, k: int) -> None:
        self.k = k
        self.t: dict[str, torch.Tensor] = {}
        self.steps = 0
        # per step not yet folded: [L, present, finite, G or None]
        self._pending: list[list[Any]] = []
        # steps folded since the last optimiser step (``close``): micro-batches whose gradients
        # ant.step may still find non-finite (a fold can fall between them and the step)
        self._tail: list[list[Any]] = []
        self._unsolved: list[torch.Tensor] = []  # count_unsolved's flags not yet folded

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
        if len(self._pending) >= FOLD:
            self._fold()
        self.steps += 1
        L = L.detach() if L.requires_grad else L  # noqa: N806
        self.t["loss"] = L
        self.t["weight"] = w.detach() if w.requires_grad else w
        self.t["present"] = present
        self._pending.append([L, present, finite, G])

    def count_nonfinite(self, after: torch.Tensor, n: int = 1) -> None:
        """ant.step's verdict ``after`` (0-d bool; it implies the last step's own flag) on the
        gradients of the last ``n`` recorded steps, the micro-batches of one optimiser step:
        each one's flag becomes its own and ``after``, also where it was folded already (a
        ``stats`` call or a fold between the micro-batches and the step)."""
        m = min(n, len(self._pending))
        if m:  # the running sums fold the final flag of every step
            self._pending[-1][2] = after
            for p in self._pending[len(self._pending) - m : -1]:  # earlier micro-batches
                p[2] = p[2] & after.to(p[2].device)
        gone = self._tail[len(self._tail) - min(n - m, len(self._tail)) :] if n > m else []
        if gone:  # folded: take what they added out of the running sums
            dev = gone[-1][0].device
            L = torch.stack([g[0].to(dev).float() for g in gone])  # noqa: N806
            present = torch.stack([g[1].to(dev) for g in gone])
            was = torch.stack([g[2].to(dev).reshape(()) for g in gone])
            now = was & after.to(dev)
            out = present & (was & ~now)[:, None]
            self._acc("nonfinite_steps", (was & ~now).float().sum())
            self._acc("loss_sum", -torch.where(out, L, 0.0).sum(0))
            self._acc("loss_count", -out.float().sum(0))
            for g, f in zip(gone, now.unbind()):
                g[2] = f

    def close(self) -> None:
        """An optimiser step ended: its steps' flags are final."""
        self._tail = []

    def count_unsolved(self, flag: torch.Tensor) -> None:
        """A weight step whose solver ended without a solution (0-d bool): kept, and summed when
        the steps are folded (no operator in the step)."""
        self._unsolved.append(flag)

    def unsolved(self, fold: bool = True) -> int:
        """The count so far (a host read: outside the step). ``fold=False`` counts the steps
        not yet folded without folding them (a fold changes how later sums group)."""
        if fold:
            self._fold()
        t = self.t.get("unsolved_steps")
        n = 0 if t is None else int(t.cpu())
        return n + sum(int(f.cpu()) for f in self._unsolved)

    def nonfinite(self) -> int:
        """Steps skipped as non-finite so far, without folding the kept steps (a host read:
        outside the step; a fold changes how later sums group)."""
        t = self.t.get("nonfinite_steps")
        n = 0 if t is None else int(t.cpu())
        return n + sum(int((~p[2].reshape(())).cpu()) for p in self._pending)

    @staticmethod
    def _cosine(G: torch.Tensor) -> torch.Tensor:  # noqa: N803
        """Cosines of Gram matrices [..., k, k] (0 rows/columns stay 0)."""
        d = G.diagonal(dim1=-2, dim2=-1).clamp(min=1e-30).sqrt()
        return (G / (d[..., :, None] * d[..., None, :])).float()

    def _fold(self) -> None:
        """Add the kept steps to the running sums (batched over the steps)."""
        if self._unsolved:
            flags, self._unsolved = self._unsolved, []
            dev = flags[-1].device
            stacked = torch.stack([f.to(dev).reshape(()) for f in flags])
            self._acc("unsolved_steps", stacked.sum(0).float())
        pending, self._pending = self._pending, []
        if not pending:
            return
        dev = pending[-1][0].device
        L = torch.stack([p[0].to(dev).float() for p in pending])  # noqa: N806
        present = torch.stack([p[1].to(dev) for p in pending])
        finite = torch.stack([p[2].to(dev).reshape(()) for p in pending])
        counted = present & finite[:, None]
        self._acc("nonfinite_steps", (~finite).float().sum())
        self._acc("loss_sum", torch.where(counted, L, 0.0).sum(0))
        self._acc("loss_count", counted.float().sum(0))
        # (bounded: a trainer that never calls ant.step never closes a step)
        self._tail = [*self._tail, *(p[:3] for p in pending)][-TAIL:]
        grams = [p for p in pending if p[3] is not None]
        if not grams:
            return
        Gs = torch.stack([p[3].to(dev) for p in grams])  # noqa: N806
        cos = self._cosine(Gs)
        pres, fin = present, finite
        if len(grams) < len(pending):  # stacked again: indexing with a list would copy the
            # index to the device, a host sync on CUDA
            pres = torch.stack([p[1].to(dev) for p in grams])
            fin = torch.stack([p[2].to(dev).reshape(()) for p in grams])
        # a pair counts where both clusters were present with a nonzero gradient (a zero one
        # has no direction: its "cosine 0" would pull the means to 0 and the diagonal below 1)
        pres = pres & (Gs.diagonal(dim1=-2, dim2=-1) > 0)
        both = (pres[:, :, None] & pres[:, None, :] & fin[:, None, None]).float()
        self._acc("cosine_sum", torch.where(both > 0, cos, 0.0).sum(0))
        self._acc("conflict_count", (both * (cos < 0).float()).sum(0))
        self._acc("pair_count", both.sum(0))
        # of the last step with a Gram (a new tensor, not a view of all); NaN for a pair with an
        # absent or zero-gradient cluster, and all NaN when that step was skipped (not finite)
        last = pres[-1][:, None] & pres[-1][None, :] & fin[-1]
        self.t["cosine"] = torch.where(last, cos[-1], float("nan"))

    def snapshot(self) -> dict[str, Any]:
        """Host copies: last-step values and running means (a sync; call outside the step)."""
        self._fold()
        out: dict[str, Any] = {"steps": self.steps}
        for name in ("loss", "weight", "cosine"):
            if name in self.t:
                value = self.t[name].float()
                if name == "loss" and "present" in self.t:  # an absent cluster has no loss this
                    # step (NaN, as in loss_mean), not 0; its weight is 0
                    value = torch.where(self.t["present"].to(value.device), value, float("nan"))
                out[name] = value.cpu().tolist()
        if "loss_sum" in self.t:
            c = self.t["loss_count"]  # a cluster never measured has no mean (NaN), not 0
            mean = torch.where(c > 0, self.t["loss_sum"] / c.clamp(min=1), float("nan"))
            out["loss_mean"] = mean.cpu().tolist()
            out["nonfinite_steps"] = int(self.t["nonfinite_steps"].cpu())
        if "unsolved_steps" in self.t:
            out["unsolved_weight_steps"] = self.unsolved()
        if "pair_count" in self.t:
            # a pair never measured together is unknown (NaN), not "0 conflicts, cosine 0"
            n = self.t["pair_count"]
            seen = n > 0
            nan = torch.full_like(n, float("nan"))
            rate = torch.where(seen, self.t["conflict_count"] / n.clamp(min=1), nan)
            out["conflict_rate"] = rate.cpu().tolist()
            out["cosine_mean"] = torch.where(seen, self.t["cosine_sum"] / n.clamp(min=1), nan)
            out["cosine_mean"] = out["cosine_mean"].cpu().tolist()
        return out

    def state_dict(self) -> dict[str, Any]:
        """Running sums and the steps not yet folded into them, kept apart: a fold at a
        checkpoint would group the steps otherwise than an unbroken run does, and float sums
        differ with the grouping (by an ulp: a resumed run's logs were not bit-exact)."""

        def host(v: Any) -> Any:
            return v.detach().cpu() if isinstance(v, torch.Tensor) else v

        return {
            "steps": self.steps,
            "t": {k: host(v) for k, v in self.t.items()},
            "pending": [[host(v) for v in p] for p in self._pending],
            "unsolved": [host(f) for f in self._unsolved],
            "tail": [[host(v) for v in p] for p in self._tail],
        }

    def load_state_dict(self, d: dict[str, Any], device: Any = None) -> None:
        def moved(v: Any) -> Any:
            return v.to(device) if device is not None and isinstance(v, torch.Tensor) else v

        self.steps = int(d["steps"])
        self.t = {k: moved(v) for k, v in d["t"].items()}
        # checkpoints written before the pending steps were saved had folded them
        self._pending = [[moved(v) for v in p] for p in d.get("pending", [])]
        self._unsolved = [moved(f) for f in d.get("unsolved", [])]
        self._tail = [[moved(v) for v in p] for p in d.get("tail", [])]  # (not in old states)

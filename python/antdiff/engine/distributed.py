"""The few collectives the engine needs under torch.distributed (none when single-process).

Cluster losses are formed as ``local_sum_i / N_i`` with N_i the GLOBAL sample count of cluster
i, so summing any per-rank quantity across ranks yields the global-batch value exactly:
per-cluster gradients (J), loss sums and counts.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class Comm:
    """Sum-reductions over a process group, or the identity in a single process."""

    def __init__(self, enabled: bool | str = "auto", group: object = None) -> None:
        # by identity: 0 / 1 equal False / True, but would act as "auto" below
        if enabled is not True and enabled is not False and not (
            isinstance(enabled, str) and enabled == "auto"
        ):  # fmt: skip
            raise ValueError(f"distributed must be 'auto', True or False, got {enabled!r}")
        self.enabled, self.group = enabled, group
        self.active, self.world = False, 1
        self.resolve()

    def resolve(self) -> None:
        """Decide (again) whether to reduce: "auto" turns on once torch.distributed is
        initialised, so an engine built before ``init_process_group`` still reduces."""
        if self.active or self.enabled is False:
            return
        active = dist.is_available() and dist.is_initialized()
        if self.enabled is True and not active:
            raise ValueError(
                "distributed=True but torch.distributed is not initialised; call "
                "torch.distributed.init_process_group() first (torchrun does the rendezvous)"
            )
        if active:
            self.active, self.world = True, dist.get_world_size(self.group)

    def sum_(self, x: torch.Tensor) -> torch.Tensor:
        """All-reduce (sum) in place; returns x."""
        if self.active:
            dist.all_reduce(x, op=dist.ReduceOp.SUM, group=self.group)
        return x

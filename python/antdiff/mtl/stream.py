"""Random numbers for the MTL methods that survive a skipped step exactly.

``StepStream`` gives the uniforms of step s as a pure function of (seed, s, position)
(Philox4x32-10, ``ant_kernels.uniform``), where s counts the VALID steps on the device. A method
advances s by the step's validity flag, a device tensor, so no host sync is needed, and a
non-finite step that the engine skips leaves the stream where it was: the values drawn after it
are those a run without that step draws. Its state is (seed, s), which restores exactly on any
device (the values do not depend on the device or the backend).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from . import native


class StepStream:
    """Counter-based uniforms indexed by a device counter of valid steps.

    Args:
        seed: key of the stream, an int in [0, 2**64).
    """

    def __init__(self, seed: int) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 1 << 64:
            raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")
        self.seed = seed
        self._count: Tensor | None = None  # [1] int64 on the device of use: valid steps so far
        self._saved = torch.zeros((), dtype=torch.int64)  # the count until a device is known

    def counter(self, device: torch.device) -> Tensor:
        """The step counter [1] int64 on ``device`` (moved there on first use)."""
        if self._count is None:
            self._count = self._saved.to(device).reshape(1).clone()
        elif self._count.device != device:  # a move between devices, not a step of a loop
            self._count = self._count.to(device)
        return self._count

    def uniform(self, n: int, device: torch.device) -> Tensor:
        """[n] float32 uniforms in [0, 1) of the current step; the same until ``advance``."""
        return native.uniform(self.seed, self.counter(torch.device(device)), n)

    def advance(self, valid: Tensor | None = None) -> None:
        """Count the step: +1, or + ``valid`` (0-d bool tensor) so a skipped step counts 0."""
        c = self._count if self._count is not None else self.counter(torch.device("cpu"))
        self._count = c + (1 if valid is None else valid.to(c.device, torch.int64))

    def state_dict(self) -> dict[str, Any]:
        count = self._count if self._count is not None else self._saved
        return {"seed": self.seed, "steps": count.reshape(()).clone()}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        if "steps" not in d and "state" in d:  # saved by a generator-based stream
            warnings.warn(
                "random state from a generator-based checkpoint: the stream restarts from step 0 "
                f"of seed {d.get('seed')}",
                stacklevel=3,
            )
        steps = d.get("steps", torch.zeros((), dtype=torch.int64))
        if not isinstance(steps, Tensor) or steps.numel() != 1 or steps.is_floating_point():
            raise ValueError(f"random stream 'steps' must be a 0-d integer tensor, got {steps!r}")
        seed = d.get("seed", self.seed)
        StepStream(seed)  # validates
        self.seed = int(seed)
        self._count = None
        self._saved = steps.detach().to("cpu", torch.int64).reshape(()).clone()

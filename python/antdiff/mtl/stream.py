"""Random numbers for the MTL methods that survive a skipped step exactly.

``StepStream`` gives the uniforms of step s as a pure function of (seed, s, position)
(Philox4x32-10, ``ant_kernels.uniform``), where s counts the VALID steps on the device. A method
advances s by the step's validity flag, a device tensor, so no host sync is needed, and a
non-finite step that the engine skips leaves the stream where it was: the values drawn after it
are those a run without that step draws. Its state is (seed, s), which restores exactly on any
device (the uniforms do not depend on the device or the backend).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from . import native

_GOLDEN = 0x9E3779B97F4A7C15  # odd: distinct tags give distinct keys for one seed


def saved_steps(d: dict[str, Any], what: str) -> int:
    """The step counter a state dict saved under "steps" (0 when absent), read on the host at
    load time; ValueError naming ``what`` unless it is a one-element integer tensor >= 0."""
    steps = d.get("steps", torch.zeros((), dtype=torch.int64))
    ok = isinstance(steps, Tensor) and steps.numel() == 1 and not steps.is_floating_point()
    if not ok or steps.dtype == torch.bool or int(steps) < 0:
        raise ValueError(f"{what} 'steps' must be a one-element integer tensor >= 0, got {steps!r}")
    return int(steps)


class StepStream:
    """Counter-based uniforms indexed by a device counter of valid steps.

    Args:
        seed: the user's seed, an int in [0, 2**64).
        tag: which method draws (GradDrop 1, RLW 2, ...): the Philox key is
            (seed + tag * 0x9E3779B97F4A7C15) mod 2**64, so two methods given one seed (as in
            "rlw+graddrop") draw from independent streams.
    """

    def __init__(self, seed: int, tag: int = 0) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 1 << 64:
            raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")
        self.seed, self.tag = seed, tag
        self._count: Tensor | None = None  # [1] int64 on the device of use: valid steps so far
        self._saved = 0  # the count until a device is known (a host int: no copy to make)

    @property
    def key(self) -> int:
        """The Philox key of this stream."""
        return (self.seed + self.tag * _GOLDEN) % (1 << 64)

    def counter(self, device: torch.device) -> Tensor:
        """The step counter [1] int64 on ``device`` (made there on first use, without a copy)."""
        if self._count is None:
            self._count = torch.full((1,), self._saved, dtype=torch.int64, device=device)
        elif self._count.device != device:  # a move between devices, not a step of a loop
            self._count = self._count.to(device)
        return self._count

    def uniform(self, n: int, device: torch.device) -> Tensor:
        """[n] float32 uniforms in [0, 1) of the current step; the same until ``advance``."""
        return native.uniform(self.key, self.counter(torch.device(device)), n)

    def advance(self, valid: Tensor | None = None) -> None:
        """Count the step: +1, or + ``valid`` (0-d bool tensor) so a skipped step counts 0."""
        c = self._count if self._count is not None else self.counter(torch.device("cpu"))
        self._count = c + (1 if valid is None else valid.to(c.device, torch.int64))

    def state_dict(self) -> dict[str, Any]:
        count = self._count if self._count is not None else torch.tensor(self._saved)
        return {"seed": self.seed, "steps": count.reshape(()).clone()}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        if "steps" not in d and d.get("state") is not None:  # a used generator-based stream
            warnings.warn(
                "random state from a generator-based checkpoint: the stream restarts from step 0 "
                f"of seed {d.get('seed')}",
                stacklevel=3,
            )
        steps = saved_steps(d, "random stream")
        seed = d.get("seed", self.seed)
        StepStream(seed)  # validates
        self.seed = int(seed)
        self._count = None
        self._saved = steps

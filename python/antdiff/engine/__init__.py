"""The engine other trainers import: ``antdiff.ANT``."""

from __future__ import annotations

from .core import ANT, StepOutput
from .timesteps import TimestepSampler, allocate

__all__ = ["ANT", "StepOutput", "TimestepSampler", "allocate"]

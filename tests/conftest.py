"""Shared test setup: the Triton interpreter on CPU-only machines, and per-test seeding.

The markers gpu / interpret / slow are registered in pyproject.toml, not here.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    # Must happen before anything imports triton: triton.jit picks interpreter or compiler
    # when a kernel is decorated, i.e. when ant_kernels is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    """Every test starts from the same seeds, whatever ran before it."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _reference_kernels(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside the kernels' own tests the (fast) torch references serve the kernels on CPU;
    tests marked ``interpret`` keep the default dispatch (Triton through the interpreter)."""
    if request.node.get_closest_marker("interpret") is None:
        monkeypatch.setenv("ANT_KERNELS_BACKEND", "torch")


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread for a module of tiny models: on a shared 2-core machine, extra OpenMP
    threads only spin. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def one_rank_group(tmp_path: Path) -> Iterator[Any]:
    """torch.distributed initialised as a gloo group of one rank (this process) for the test."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0,
                            world_size=1)  # fmt: skip
    try:
        yield dist
    finally:
        dist.destroy_process_group()


@pytest.fixture
def kernel_device() -> torch.device:
    """Where Triton kernels run: CUDA when present, else the CPU under the interpreter."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def force_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    """Force the Triton backend, so a test fails rather than fall back to the reference."""
    monkeypatch.setenv("ANT_KERNELS_BACKEND", "triton")


@pytest.fixture
def solver_on(monkeypatch: pytest.MonkeyPatch, kernel_device: torch.device):
    """``pick(backend, op)`` -> (solver, device) for op "pcgrad" or "nash": backend "triton" or
    "torch" (ant_kernels under that policy), or "native" (the C++ solver a CPU step calls)."""

    def pick(backend: str, op: str):
        import ant_kernels
        from antdiff.mtl import native

        if backend == "native":
            monkeypatch.setenv("TRITON_INTERPRET", "0")  # CPU G: the C++ solver
            monkeypatch.setenv("ANT_KERNELS_BACKEND", "auto")
            assert native._C is not None, "antdiff._C is not built: run `make build`"
            return getattr(native, f"{op}_weights"), torch.device("cpu")
        monkeypatch.setenv("ANT_KERNELS_BACKEND", backend)
        return getattr(ant_kernels, f"{op}_weights"), kernel_device

    return pick

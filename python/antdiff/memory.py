"""Peak tensor memory of a piece of work, on CPU as on CUDA.

On CUDA the caching allocator keeps the statistic (``torch.cuda.max_memory_allocated``). On CPU
torch's allocator reports each allocation and free it sees while the profiler runs
(``profile_memory=True``) with its running total of live bytes; the peak of that total over the
run is the same quantity: bytes held by tensors (including those an operator allocates
internally through torch's allocator), not the process's resident set, which also counts what
glibc keeps after a free.

Limits of the CPU figure: only allocations on threads the profiler follows count, a block
allocated before profiling started is not subtracted when the run frees it (so build the work
inside ``build``), and the profiler interface used is torch's experimental event tree.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

_MARK = "antdiff.peak_allocated"


def peak_allocated(
    build: Callable[[], Callable[[], Any]], device: torch.device | str = "cpu", repeat: int = 2
) -> int:
    """Peak allocated bytes above the starting level while ``build()``'s callable runs.

    Args:
        build: makes everything the work needs (model, optimiser, batch) and returns the work,
            e.g. one training step. It runs under the same accounting, so blocks it allocates
            and the work later frees are subtracted when they are freed.
        device: where the tensors live ("cpu" or a CUDA device).
        repeat: calls of the work (2 covers a step's lazily built state and a steady step).

    Returns:
        max over the calls of (allocated bytes) - (allocated bytes when the first call starts).
    """
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    device = torch.device(device)
    if device.type == "cuda":
        work = build()
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(repeat):
            work()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    if device.type != "cpu":
        raise ValueError(f"device must be 'cpu' or a CUDA device, got {device}")
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        work = build()
        with record_function(_MARK):
            for _ in range(repeat):
                work()
    return _peak_in_mark(prof)


def _peak_in_mark(prof: Any) -> int:
    from torch._C._profiler import _EventType

    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        events.append(e)
        stack.extend(e.children)
    mark = next((e for e in events if e.name == _MARK), None)
    if mark is None:
        raise RuntimeError("the profiler recorded no marker event: cannot locate the run")
    # (time, live bytes after the event, change), in time order; the running total is
    # process-wide, so the level before the run is the total after the last earlier event, or,
    # if there is none, the run's first total minus that event's own change
    allocs = sorted(
        (
            (e.start_time_ns, e.extra_fields.total_allocated, e.extra_fields.alloc_size)
            for e in events
            if e.tag == _EventType.Allocation and e.start_time_ns <= mark.end_time_ns
        ),
        key=lambda a: a[0],
    )
    before = [a for a in allocs if a[0] < mark.start_time_ns]
    inside = [a for a in allocs if a[0] >= mark.start_time_ns]
    if not inside:
        return 0
    base = before[-1][1] if before else inside[0][1] - inside[0][2]
    return max(max(total for _, total, _ in inside) - base, 0)

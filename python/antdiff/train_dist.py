"""Multi-process training (torchrun / torch.distributed) for every method, equal to one process.

Launch the ordinary trainer under torchrun; each process reads RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT from the environment torchrun sets::

    torchrun --nproc_per_node 4 -m antdiff train --config digits_adm --ant.method pcgrad
    torchrun --no-python --nproc_per_node 4 antdiff train --config digits_adm --resume

Backend nccl with device cuda:LOCAL_RANK when train.device is auto/cuda and CUDA is present,
else gloo on the CPU. ``train.batch_size`` is the GLOBAL batch: each of the W processes trains
on B / W samples (B must be divisible by W).

Why the result equals one process training on the global batch (same seed, to float rounding):
every rank draws the SAME global batch indices, timesteps and noise (same seeds, a dedicated
generator), and keeps only its contiguous slice of the cluster-sorted global batch. So the
multiset of (sample, t, noise) triples across ranks is the single-process one, the engine's
global cluster counts, cluster losses, J [k, P] and weights are the single-process ones, and
the all-reduced gradient is the same on every rank, as are the optimiser steps and weights.
Models that draw random numbers in their forward (dropout, label dropout) get a per-rank
stream instead, so for them the runs agree in distribution, not bit for bit.

Rank 0 alone keeps the EMA, logs, writes sample grids and checkpoints (the others wait at a
barrier after each checkpoint, up to ANT_DIST_TIMEOUT minutes, default 30). A resume loads the
same checkpoint on every rank, so on several nodes train.out_dir must be on a shared file
system; checkpoints hold the plain model's weights, so a run may resume with another world size
(or one process). Every rank loads the whole global batch and draws its noise, then keeps its
slice: that is what makes the run equal one process, at B / W times the data loading.
"""

from __future__ import annotations

import datetime
import inspect
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistContext:
    """This process's place in the process group."""

    rank: int
    world: int
    local_rank: int
    device: torch.device
    owns_group: bool  # init_distributed created the group, so close() destroys it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def check_batch(self, batch_size: int, micro_batch: int = 0, least: int = 1) -> None:
        """Sizes that divide among the processes; a suggested micro-batch is at least ``least``
        (ant.k under stratified sampling, which the config then requires)."""
        w = self.world
        if batch_size % w:
            lo = batch_size // w * w or w
            if lo < least:  # the smallest multiple of the processes that the config takes
                lo = -(-least // w) * w
            raise ValueError(
                f"train.batch_size={batch_size} is GLOBAL (every rank trains on its slice) and "
                f"must be divisible by the number of processes ({w}); use e.g. {lo} or {lo + w}"
            )
        if micro_batch % w:
            # the nearest sizes that both divide the batch and divide among the processes
            fits = sorted((m for m in range(w, batch_size + 1, w)
                           if batch_size % m == 0 and m >= least),
                          key=lambda m: abs(m - micro_batch))[:2]  # fmt: skip
            raise ValueError(
                f"train.micro_batch={micro_batch} is GLOBAL (every rank trains on its slice) and "
                f"must be divisible by the number of processes ({w}); use e.g. "
                + " or ".join(map(str, sorted(fits)))
            )

    def bounds(self, batch_size: int) -> tuple[int, int]:
        """[a, b): this rank's positions in the global batch of ``batch_size`` samples."""
        per = batch_size // self.world
        return self.rank * per, (self.rank + 1) * per

    def wrap(self, model: nn.Module) -> nn.parallel.DistributedDataParallel:
        """DDP for the engine: no buffer broadcasts (ranks may run different numbers of
        per-cluster passes), grads not bucket views (the engine points .grad into J)."""
        ddp = nn.parallel.DistributedDataParallel
        # newer torch renamed the flag (the old name warns); syncing buffers once at init is fine
        new_flag = "forward_sync_buffers" in inspect.signature(ddp.__init__).parameters
        flags = {"forward_sync_buffers" if new_flag else "broadcast_buffers": False}
        ids = [self.device.index] if self.device.type == "cuda" else None
        return ddp(model, device_ids=ids, output_device=ids[0] if ids else None, **flags)

    def shard(
        self, batch: dict[str, torch.Tensor], t: torch.Tensor, sampler: Any
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """This rank's slice of the cluster-sorted global batch (every entry [B, ...]) and t [B].

        ``sampler`` (the engine's TimestepSampler) learns the slice's host-side cluster counts,
        so the engine cuts its cluster sub-batches without reading counts from the device.
        """
        a, b = self.bounds(t.shape[0])
        return {key: v[a:b] for key, v in batch.items()}, sampler.local_slice(t, a, b)

    def seed_model_rng(self, seed: int, step: int) -> None:
        """A per-rank global RNG for random ops inside the model (dropout): without it every
        rank would draw the same masks for its slice."""
        torch.manual_seed(((seed * 1_000_003 + step) * 1_009 + self.rank + 1) % 2**63)

    def barrier(self) -> None:
        if self.device.type == "cuda":
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {raw!r}") from None


def rank_device(name: str, local_rank: int) -> torch.device:
    """cuda:LOCAL_RANK for train.device auto (with CUDA) or cuda; cpu for cpu / no CUDA."""
    if name.startswith("cuda:"):
        raise ValueError(
            f"train.device={name!r}: under torchrun every process uses cuda:LOCAL_RANK; set "
            "train.device to cuda or auto (or restrict the GPUs with CUDA_VISIBLE_DEVICES)"
        )
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"train.device={name!r} but CUDA is not available; use cpu or auto")
    if local_rank >= torch.cuda.device_count():
        raise ValueError(
            f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPUs are visible: "
            "use --nproc_per_node <= the number of GPUs"
        )
    return torch.device("cuda", local_rank)


def init_distributed(device: str) -> DistContext | None:
    """Join the process group torchrun describes (or the one the caller initialised).

    Args:
        device: train.device ("auto", "cpu" or "cuda").

    Returns:
        None when there is a single process (no WORLD_SIZE > 1 and no initialised group of
        more than one process): the trainer then runs without DDP or collectives.
    """
    owns = not (dist.is_available() and dist.is_initialized())
    if owns:
        world, rank = _env_int("WORLD_SIZE", 1), _env_int("RANK", 0)
    else:
        world, rank = dist.get_world_size(), dist.get_rank()
    if world <= 1:
        return None
    if owns and not dist.is_available():
        raise ValueError(f"WORLD_SIZE={world} but this torch build has no torch.distributed")
    local_rank = _env_int("LOCAL_RANK", rank)
    dev = rank_device(device, local_rank)
    if owns:
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=_timeout())
    return DistContext(rank, world, local_rank, dev, owns)


def _timeout() -> datetime.timedelta:
    """How long a collective waits (ANT_DIST_TIMEOUT minutes, default 30): the other ranks wait
    at a barrier while rank 0 writes a checkpoint, which for a large model (weights, EMA and
    Adam's moments) on a slow file system can outlast NCCL's 10-minute default."""
    raw = os.environ.get("ANT_DIST_TIMEOUT", "30")
    try:
        minutes = float(raw)
    except ValueError:
        minutes = float("nan")
    try:  # inf and values past timedelta's range (1e20) raise OverflowError
        wait = datetime.timedelta(minutes=minutes) if minutes > 0 else None
    except OverflowError:
        wait = None
    if wait is None or wait < datetime.timedelta(seconds=1):  # 1e-9 rounded to no wait at all
        raise ValueError(
            f"ANT_DIST_TIMEOUT must be a positive number of minutes (from 1 second to about "
            f"1e12 minutes), got {raw!r}"
        )
    return wait


class QuietLogger:
    """Stands in for RunLogger on ranks other than 0: accepts every call, writes nothing."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None

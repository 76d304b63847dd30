"""The antdiff trainer: any registered model + GaussianDiffusion + the ANT engine, resumable.

``train(load_config("digits_adm", ["--ant.method", "pcgrad"]))`` or
``antdiff train --config digits_adm --ant.method pcgrad [--resume [PATH]]``.

One step: t = ant.sample_timesteps(B); gradient methods call ant.backward(loss_fn, batch, t)
(the batch dict carries the labels, so the engine slices them with the images), loss-space
methods and vanilla call ant.reduce(per_sample_loss, t).backward(); then grad-norm clipping,
ant.step(optimizer) (skips non-finite steps: on the device with the fused AdamW used where torch
has one, so the step reads nothing back) and the EMA update (a device-side no-op for a skipped
step). A resumed run continues the exact sequence of batches, timesteps, noise and method
states (bit-for-bit on CPU). Timesteps and noise come from the run's own generator, drawn for
the whole (global) batch. With ``train.micro_batch`` the batch goes through in micro-batches of
that size, each with its own timesteps and noise, accumulated into one optimiser step
(``ant.backward(..., accumulate=True)``; loss-space methods: each micro-batch's
``ant.reduce(...) / n``).

Under torchrun (``torchrun --nproc_per_node N -m antdiff train ...``) the same code trains on N
processes with DDP and gives the single-process result: see :mod:`antdiff.train_dist`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import errno
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import (
    FORMAT,
    capture_rng,
    list_checkpoints,
    load_model_state,
    restore_rng,
    resume_checkpoint,
    save_checkpoint,
)
from .clustering import load_affinity
from .config import Config, dump_config
from .data import BatchIterator, Dataset, MissingLabels, check_square, get_batch, load_dataset
from .diffusion import GaussianDiffusion
from .engine import ANT
from .logging_utils import RunLogger, write_samples
from .sampling import check_guidance_trained
from .schedules import make_schedule
from .train_dist import DistContext, QuietLogger, init_distributed
from .utils import TrainingDiverged, atomic_write_text, check_device, seed_everything

log = logging.getLogger("antdiff.train")


_EMA_CHUNK = 1 << 24  # elements of the EMA's temporary (64 MiB in float32)


class EMA:
    """Exponential moving average of a model's parameters (buffers are copied)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self._ema = list(self.model.parameters())
        self._src = list(model.parameters())
        self._ema_buf, self._src_buf = list(self.model.buffers()), list(model.buffers())

    def _chunks(self):
        """(ema, src) lists of consecutive parameters, each of at most _EMA_CHUNK elements
        (a larger parameter alone)."""
        start, size = 0, 0
        for i, p in enumerate(self._ema):
            if size and size + p.numel() > _EMA_CHUNK:
                yield self._ema[start:i], self._src[start:i]
                start, size = i, 0
            size += p.numel()
        if size:
            yield self._ema[start:], self._src[start:]

    @torch.no_grad()
    def update(self, taken: torch.Tensor | None = None) -> None:
        """One EMA step; ``taken`` (0-d bool on the device): whether the optimiser step was
        taken (a fused optimiser skips a non-finite one on the device): False leaves the EMA
        as it was, without a host read."""
        if taken is None:
            torch._foreach_lerp_(self._ema, self._src, 1.0 - self.decay)
            for e, s in zip(self._ema_buf, self._src_buf):
                e.copy_(s)
            return
        # ema += w (src - ema) with w a device tensor (torch reads a tensor lerp weight on the
        # host), through a temporary of at most _EMA_CHUNK elements at a time
        w = taken.float() * (1.0 - self.decay)
        for ema, src in self._chunks():
            step = torch._foreach_sub(src, ema)
            torch._foreach_mul_(step, w)
            torch._foreach_add_(ema, step)
        for e, s in zip(self._ema_buf, self._src_buf):
            e.copy_(torch.where(taken, s, e))


@dataclass
class Run:
    """Everything a training process holds."""

    cfg: Config
    device: torch.device
    data: Dataset
    batches: BatchIterator
    model: nn.Module
    forward: nn.Module  # the model (DDP-wrapped under torchrun), or its torch.compile wrapper
    ema: EMA | None  # None on ranks other than 0
    diffusion: GaussianDiffusion
    ant: ANT
    opt: torch.optim.Optimizer
    gen: torch.Generator  # the timesteps and noise of every step (same on every rank)
    dist: DistContext | None = None  # None in a single process
    step: int = 0
    # what the last step's engine calls reported: its micro-batches' (loss-space methods) or
    # the update's (ant.backward)
    outputs: list = field(default_factory=list)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return check_device(name, "train.device")


def model_kwargs(cfg: Config, data: Dataset) -> dict[str, Any]:
    """cfg.model.overrides plus the input shape, classes and learn_sigma the data/diffusion fix."""
    from .models import model_config

    c, h, w = data.shape
    check_square(cfg.data, h, w)
    base = model_config(cfg.model.name)
    derived = {
        ("input_size" if "input_size" in base else "image_size"): h,
        "in_channels": c,
        "learn_sigma": cfg.diffusion.learn_sigma,
        "num_classes": data.num_classes if cfg.data.class_conditional else None,
    }
    for key, value in derived.items():
        given = cfg.model.overrides.get(key, value)
        if given != value:
            raise ValueError(
                f"model.overrides.{key}={given!r} contradicts the data/diffusion config, which "
                f"gives {value!r}; drop the override (it is derived automatically)"
            )
    return {**cfg.model.overrides, **derived}


def build_run(cfg: Config, codec_state: dict | None = None, dist: DistContext | None = None) -> Run:
    """Data, model, EMA, diffusion, engine and optimiser, seeded from cfg.train.seed.

    With ``dist`` (see :func:`antdiff.train_dist.init_distributed`) the engine and the forward
    pass get the model wrapped in DDP; ``run.model`` stays the plain model.
    """
    from .models import create_model

    tc, ac = cfg.train, cfg.ant
    main = dist is None or dist.is_main  # one warning, not one per process
    if main and "nash" in ac.method.replace(" ", "").lower().split("+") and tc.grad_clip is None:
        log.warning(
            "ant.method=%s without gradient clipping (train.grad_clip: null, as the paper's "
            "presets set): Nash-MTL's update has norm 1/sqrt(k) where its weights are solved, "
            "but the weights grow as the cluster gradients shrink or come to cancel, and the "
            "steps between solves (ant.update_every) apply them to new gradients; its authors "
            "clip the gradient norm at 1.0: pass --train.grad_clip 1.0 (or 0 to train "
            "unclipped without this warning)", ac.method,
        )
    if dist is not None:
        dist.check_batch(tc.batch_size, tc.micro_batch, 1 if ac.sampling == "uniform" else ac.k)
    device = resolve_device(tc.device) if dist is None else dist.device
    if tc.threads:  # process-wide: torch has no per-call setting
        torch.set_num_threads(tc.threads)
    seed_everything(tc.seed)
    try:
        data = load_dataset(cfg.data, tc.seed, tc.num_workers, codec_state).to(device)
    except MissingLabels as exc:
        if cfg.sample.cfg_scale == 1.0:
            raise
        raise MissingLabels(  # its previews guide: unconditional, they could not
            f"{exc} --sample.cfg_scale 1 (the config guides its preview grids at "
            f"{cfg.sample.cfg_scale}, which needs labels)"
        ) from None
    guided = cfg.sample.cfg_channels
    if guided is not None and guided > data.shape[0]:  # the previews would fail after training
        raise ValueError(
            f"sample.cfg_channels={guided} exceeds the {data.shape[0]} channels this run "
            "diffuses: give at most that many, or null (all)"
        )
    seed_everything(tc.seed)
    model = create_model(cfg.model.name, **model_kwargs(cfg, data)).to(device).train()
    check_guidance_trained(model, cfg.sample.cfg_scale)  # previews guide: refuse it before training
    dc = cfg.diffusion
    diffusion = GaussianDiffusion(
        make_schedule(dc.schedule, dc.T),
        dc.prediction,
        dc.learn_sigma,
        dc.loss_weighting,
        dc.p2_gamma,
        dc.p2_k,
        dc.min_snr_gamma,
    )
    affinity = bin_edges = None
    clustering: Any = ac.clustering
    if ac.clustering.lower().endswith(".json"):  # bounds from `antdiff cluster --json`
        from .clustering import Clusters

        clustering = fixed = Clusters.load(ac.clustering)
        if fixed.k != ac.k or fixed.T != diffusion.T:
            raise ValueError(
                f"ant.clustering={ac.clustering} holds k={fixed.k} clusters of T={fixed.T} "
                f"timesteps, the run has ant.k={ac.k} and diffusion.T={diffusion.T}: set "
                f"--ant.k {fixed.k} --diffusion.T {fixed.T}, or cluster again for this run"
            )
    if ac.clustering == "gradient":
        affinity, bin_edges = load_affinity(ac.affinity, schedule=diffusion.schedule)
    # the one-pass mode's per-step hooks would make torch.compile retrace: compile uses micro
    mode = "micro" if tc.compile and ac.mode == "auto" else ac.mode
    wrapped = model if dist is None else dist.wrap(model)
    ant = ANT(
        diffusion.schedule,
        ac.k,
        clustering,
        ac.method,
        sampling=ac.sampling,
        mode=mode,
        update_every=ac.update_every,
        model=wrapped,
        seed=tc.seed,
        affinity=affinity,
        bin_edges=bin_edges,
        min_size=ac.min_size,
        max_size=ac.max_size,
        method_kwargs=ac.method_kwargs,
    ).to(device)
    if tc.compile and mode == "onepass" and ant.needs_gradients:
        raise ValueError(
            "train.compile with ant.mode=onepass: its per-step hooks make torch.compile "
            "recompile every step (slower than eager); use ant.mode auto (micro under compile)"
        )
    groups = [{"params": [p for p in model.parameters() if p.requires_grad]}, *ant.param_groups()]
    opt = _adamw(groups, tc)
    if tc.compile:  # the compilation happens in the first steps, silently otherwise
        log.info("train.compile: the first steps compile the model (minutes on a CPU)")
    forward = torch.compile(wrapped, dynamic=True) if tc.compile else wrapped
    batches = BatchIterator(len(data), tc.batch_size, tc.seed, flip=cfg.data.flips)
    ema = EMA(model, tc.ema_decay) if dist is None or dist.is_main else None
    gen = torch.Generator(device).manual_seed(_derived_seed(tc.seed))
    return Run(cfg, device, data, batches, model, forward, ema, diffusion, ant, opt, gen, dist)


def _adamw(groups: list[dict[str, Any]], tc: Any) -> torch.optim.AdamW:
    """AdamW, fused where torch has a fused kernel for the parameters' device (CUDA, CPU): one
    kernel per step, and ant.step then skips a non-finite step on the device, so a training
    step reads nothing back. Elsewhere the usual multi-tensor AdamW."""
    kw = {"lr": tc.lr, "betas": tuple(tc.betas), "weight_decay": tc.weight_decay}
    try:
        return torch.optim.AdamW(groups, fused=True, **kw)
    except RuntimeError:  # torch names the devices its fused kernels support
        return torch.optim.AdamW(groups, **kw)


def _derived_seed(seed: int) -> int:
    """A seed for the step generator unrelated to the data order's seeds (seed, epoch)."""
    import numpy as np

    return int(np.random.SeedSequence((seed, 0x57E9)).generate_state(1, np.uint64)[0] >> 1)


def engine_step(run: Run, batch: dict[str, torch.Tensor]) -> bool:
    """Timesteps, loss, backward (per micro-batch with ``train.micro_batch``), clipping,
    optimiser step; False if ant.step skipped the step on the host (a fused optimiser skips a
    non-finite step on the device instead).

    No host sync with a fused optimiser; otherwise the engine's non-finite check in ant.step().
    """
    cfg, ant, model = run.cfg, run.ant, run.model
    autocast = (
        torch.autocast(run.device.type, dtype=torch.bfloat16)
        if cfg.train.bf16
        else contextlib.nullcontext()
    )

    def loss_fn(b: dict[str, torch.Tensor], t: torch.Tensor) -> torch.Tensor:
        kw = {"y": b["y"]} if "y" in b else None
        with autocast:
            out = run.diffusion.training_losses(
                run.forward, b["x"], t, noise=b["noise"], model_kwargs=kw
            )
        return out["loss"].float()

    t_range, gen = cfg.train.t_range, run.gen
    B = batch["x"].shape[0]  # noqa: N806
    b = cfg.train.micro_batch or B
    n = B // b  # micro-batches, accumulated into one optimiser step
    if n * b != B:
        raise ValueError(
            f"train.micro_batch={b} does not divide this batch of {B} samples: pass batches of "
            f"train.batch_size={cfg.train.batch_size} (a multiple of micro_batch)"
        )
    run.opt.zero_grad(set_to_none=True)
    run.outputs = []
    for m in range(n):
        part = batch if n == 1 else {key: v[m * b : (m + 1) * b] for key, v in batch.items()}
        if t_range is None:
            t = ant.sample_timesteps(b, run.device, generator=gen)
        else:  # an interval specialist (NTG): only the tasks t1 <= t < t2, uniformly
            t = torch.randint(t_range[0], t_range[1], (b,), device=run.device, generator=gen)
        # noise of the whole (micro-)batch up front: it stays with its sample whatever the
        # slicing
        x = part["x"]
        part = {**part, "noise": torch.randn(x.shape, dtype=x.dtype, device=run.device,
                                             generator=gen)}  # fmt: skip
        if run.dist is not None:  # this rank's slice of the global (micro-)batch
            part, t = run.dist.shard(part, t, ant.sampler)
        if ant.needs_gradients:
            ant.backward(loss_fn, part, t, accumulate=m < n - 1)
        else:  # the mean of the micro-batches' losses (the engine's cluster means are per
            # micro-batch either way); DDP all-reduces at the last one only
            no_sync = getattr(run.forward, "no_sync", None) if m < n - 1 else None
            with no_sync() if no_sync is not None else contextlib.nullcontext():
                loss = ant.reduce(loss_fn(part, t), t)
                (loss / n if n > 1 else loss).backward()
        if not ant.needs_gradients or m == n - 1:
            run.outputs.append(ant.last)
    if cfg.train.grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip, foreach=True)
    stepped = ant.step(run.opt)
    # ant.step's verdict on the gradients (a loss-space step can overflow in its backward):
    # a skipped step's micro-batches log nothing
    verdict = ant.last.finite
    run.outputs = [dataclasses.replace(o, finite=o.finite & verdict) for o in run.outputs[:-1]]
    run.outputs.append(ant.last)
    return stepped


def train_step(run: Run, batch: dict[str, torch.Tensor]) -> None:
    """engine_step, then the EMA update after every optimiser step that was taken."""
    if engine_step(run, batch) and run.ema is not None:
        last = run.ant.last
        run.ema.update(None if last is None else last.finite)
    run.step += 1


def cluster_mean_loss(out: Any) -> float:
    """The mean of the present clusters' mean losses of a StepOutput: one quantity for every
    method (the method's own objective, ``out.loss``, differs: UW's goes negative). A host read:
    for logging, not inside the step."""
    from .engine.core import _present_mean

    return float(_present_mean(out.cluster_losses, out.present))


class _LogMeans:
    """Each step's logged quantities since the last log point, kept as references to the
    step's own device tensors (no operator and no host read in the step) and averaged at the
    log point in one batched pass: a row of metrics.csv / telemetry.jsonl is the mean over its
    interval, as ADM and DiT log (a row was one batch's values). A skipped (non-finite) step
    adds nothing; a cluster absent from a step adds nothing to its column."""

    def __init__(self) -> None:
        self.steps: list[tuple[torch.Tensor, ...]] = []  # (loss, cluster losses, present, finite)

    def add(self, out: Any) -> None:
        if out is not None:
            self.steps.append((out.loss, out.cluster_losses, out.present, out.finite))

    def add_step(self, outs: list) -> None:
        """One optimiser step's outputs (a loss-space method's micro-batches) as ONE
        observation: each cluster's loss the mean over the micro-batches it was in (what a
        gradient method's accumulated update reports), the objective their mean. Device ops
        only."""
        outs = [o for o in outs if o is not None]
        if len(outs) <= 1:
            for o in outs:
                self.add(o)
            return
        L = torch.stack([o.cluster_losses for o in outs])  # noqa: N806
        P = torch.stack([o.present for o in outs])  # noqa: N806
        cl = torch.where(P, L, 0.0).sum(0) / P.sum(0).clamp(min=1)
        loss = torch.stack([o.loss.reshape(()) for o in outs]).mean()
        finite = torch.stack([o.finite.reshape(()) for o in outs]).all()
        self.steps.append((loss, cl, P.any(0), finite))

    def take(self, k: int) -> tuple[float, float, list[float]]:
        """(loss, objective, per-cluster losses) over the interval, NaN where nothing was
        measured; then a new interval starts. A host read: at log points only."""
        steps, self.steps = self.steps, []
        if not steps:
            return math.nan, math.nan, [math.nan] * k
        dev = steps[-1][1].device
        obj = torch.stack([s[0].to(dev).double().reshape(()) for s in steps])
        L = torch.stack([s[1].to(dev).double() for s in steps])  # noqa: N806
        present = torch.stack([s[2].to(dev) for s in steps])
        ok = torch.stack([s[3].to(dev).reshape(()) for s in steps])
        counted = present & ok[:, None]
        # each step's mean of its present clusters' losses (cluster_mean_loss, batched)
        mean = torch.where(present, L, 0.0).sum(1) / present.sum(1).clamp(min=1)
        n = ok.double().sum()
        per = torch.where(counted, L, 0.0).sum(0) / counted.double().sum(0)  # NaN: unmeasured
        both = torch.stack([torch.where(ok, mean, 0.0).sum(), torch.where(ok, obj, 0.0).sum()])
        v = torch.cat([both / n, per]).cpu().tolist()  # n = 0: NaN
        return v[0], v[1], v[2:]

    def state_dict(self) -> list[tuple[torch.Tensor, ...]]:
        return [tuple(x.detach().cpu() for x in s) for s in self.steps]

    def load_state_dict(self, steps: Any, device: torch.device) -> None:
        if not isinstance(steps, list):  # none saved (or a development form): a new interval
            steps = []
        self.steps = [tuple(x.to(device) for x in s) for s in steps]


def checkpoint_state(run: Run) -> dict[str, Any]:
    codec = run.data.codec
    return {
        "format": FORMAT,
        "step": run.step,
        "config": run.cfg.to_dict(),
        "model": run.model.state_dict(),
        "ema": run.ema.model.state_dict(),
        "optimizer": run.opt.state_dict(),
        "ant": run.ant.state_dict(),
        "data": run.batches.state_dict(),
        "rng": capture_rng(),
        "gen": run.gen.get_state(),
        "gen_device": run.gen.device.type,  # a generator's state is its device type's
        "codec": None if codec is None else codec.state_dict(),
        # what sampling needs of the data, so a checkpoint samples without its data set
        "data_meta": {
            "shape": list(run.data.shape),
            "num_classes": run.data.num_classes,
            "class_names": None if run.data.class_names is None else list(run.data.class_names),
        },
    }


def restore(run: Run, state: dict[str, Any], allow_config_change: bool = False) -> None:
    """Load a checkpoint's ``state`` into ``run`` (``allow_config_change``: a generator saved on
    another device type is reseeded, with a warning, instead of refused)."""
    saved_names = (state.get("data_meta") or {}).get("class_names")
    names = None if run.data.class_names is None else list(run.data.class_names)
    if saved_names is not None and names != saved_names:  # the labels would change meaning
        raise ValueError(
            f"the class folders changed since the checkpoint: it was trained with {saved_names}, "
            f"the data now has {names}; restore the folders (labels follow their sorted names)"
        )
    load_model_state(run.model, state["model"], state, "model")
    if run.ema is not None:
        load_model_state(run.ema.model, state["ema"], state, "EMA")
    saved = state["optimizer"]
    # The hyperparameters (lr, betas, weight decay, UW's own lr) and the kernel are this run's
    # config, not the checkpoint's: a resume with --allow-config-change --train.lr X trained at
    # the old rate while config.yaml said X. Nothing schedules them, so the config is the truth.
    # (A checkpoint saved before the trainer fused AdamW says fused=None: torch then moves the
    # step counts where this run's kernel needs them.)
    ours = [{key: v for key, v in g.items() if key != "params"} for g in run.opt.param_groups]
    if len(ours) == len(saved["param_groups"]):
        saved = {**saved, "param_groups": [{**g, **h}
                                           for g, h in zip(saved["param_groups"], ours)]}
    # the engine first: it names a changed method or k, where the optimiser would only say
    # that its parameter groups differ (UW adds one)
    try:
        run.ant.load_state_dict(state["ant"])
    except ValueError as exc:
        fixed = ("trained with method", "sampled timesteps with mode", "checkpoint clusters")
        if not any(s in str(exc) for s in fixed):
            raise
        raise ValueError(
            f"{exc}. When resuming, keep the checkpoint's ant.method, ant.k, ant.clustering, "
            "ant.sampling, and what places the clusters (diffusion.schedule, ant.min_size, "
            "ant.max_size, ant.affinity): its config.yaml has them; --allow-config-change cannot "
            "change them"
        ) from exc
    run.opt.load_state_dict(saved)
    run.batches.load_state_dict(state["data"])
    run.step = int(state["step"])
    restore_rng(state["rng"])
    if "gen" in state:  # absent from checkpoints of older versions
        # a CPU generator's state is 5056 bytes, a CUDA one's 16 (checkpoints before gen_device)
        saved = state.get("gen_device") or ("cpu" if state["gen"].numel() > 16 else "cuda")
        if saved == run.gen.device.type:
            run.gen.set_state(state["gen"])
        elif not allow_config_change:
            raise ValueError(
                f"the checkpoint's run drew its timesteps and noise on {saved}, this one runs on "
                f"{run.gen.device.type} (train.device={run.cfg.train.device!r}): a generator's "
                "state does not carry across device types, so the resume would not be exact. "
                f"Resume on {saved} (--train.device {saved}), or pass --allow-config-change to go "
                "on with that generator reseeded"
            )
        else:
            run.gen.manual_seed(_derived_seed(run.cfg.train.seed) + run.step)
            log.warning(
                "resumed on %s a run that drew on %s: the step generator is reseeded, so the "
                "continuation differs from an unbroken run", run.gen.device.type, saved,
            )


def train(
    cfg: Config,
    resume: str | Path | bool | None = None,
    allow_config_change: bool = False,
) -> dict[str, Any]:
    """Train (or resume) the run ``cfg`` describes; returns a summary of the final step.

    Args:
        cfg: the validated config.
        resume: None (fresh run), True/"" (newest complete checkpoint in cfg.train.out_dir) or a
            checkpoint file / directory.
        allow_config_change: resume even if the config differs in more than steps / logging.

    Under torchrun every process calls it with the same arguments (antdiff.train_dist).
    """
    with deterministic_algorithms(cfg.train.deterministic):
        dist = init_distributed(cfg.train.device)
        try:
            with contextlib.ExitStack() as hold:  # the out_dir's lock, once _train takes it
                return _train(cfg, resume, allow_config_change, dist, hold)
        finally:
            if dist is not None:
                dist.close()


class OutDirInUse(OSError):
    """Another live process is training into the same ``train.out_dir``."""


LOCK_NAME = ".train.lock"


@contextlib.contextmanager
def out_dir_lock(out: Path):
    """Hold an exclusive lock on ``out`` (``<out>/.train.lock``, flock) while a run writes
    there, or raise OutDirInUse at once: two runs resumed into one folder (a scheduler
    restarting a job whose old process still runs) deleted each other's checkpoints. The
    kernel releases the lock when its process ends, killed or not, so no stale lock is left
    to clear (on NFS, a crashed node's lock lasts until its lease expires, ~90 s). Systems or
    mounts without flock (Windows; Lustre without -o flock, NFSv3 without lockd, some FUSE
    file systems) go unlocked, with a warning for the mounts."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    path = out / LOCK_NAME
    fd, writable = _open_lock(path)
    try:
        try:
            _flock_soon(fcntl, fd)
        except BlockingIOError:
            raise _in_use(out, fd, writable) from None
        except OSError as exc:
            if exc.errno not in _NO_FLOCK:
                raise
            refused = exc.strerror
        else:
            refused = None
            if writable:  # the holder's pid, for the message a second run gets
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        if refused is not None:  # warned and yielded outside the except: errors of the run
            # itself then do not carry flock's as their context
            warnings.warn(
                f"train.out_dir={str(out)!r}: its file system refuses flock ({refused}), so the "
                "run goes without the lock that keeps a second run from writing there",
                stacklevel=3,
            )
        yield
    finally:
        os.close(fd)  # releases the lock


def _flock_soon(fcntl: Any, fd: int, tries: int = 10, wait: float = 0.02) -> None:
    """An exclusive flock, tried a few times over 0.2 s before BlockingIOError: another start's
    brief probe (``refuse_if_in_use``) holds it for microseconds, a run for its whole life."""
    for i in range(tries):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if i == tries - 1:
                raise
            time.sleep(wait)


def _in_use(out: Path, fd: int, writable: bool) -> OutDirInUse:
    # a holder that could not write its pid leaves an earlier run's there: this one cannot
    # write either, so it reads no pid rather than maybe a stale one
    holder = os.pread(fd, 64, 0).decode(errors="replace").strip() if writable else ""
    return OutDirInUse(
        f"train.out_dir={str(out)!r} is in use by another antdiff train (pid "
        f"{holder or 'unknown'}, holding {LOCK_NAME}): wait for it to end or stop it, then "
        "--resume; or choose another --train.out_dir"
    )


def refuse_if_in_use(out: Path) -> None:
    """Raise OutDirInUse when another process holds ``out``'s lock, before the checks that read
    the folder: a run that has not written its first checkpoint yet would otherwise get advice
    about the folder's checkpoints ("drop --resume") that the lock then refuses. Takes no lock
    (``out_dir_lock`` does, once the run is checked)."""
    path = out / LOCK_NAME
    try:
        import fcntl

        fd = os.open(path, os.O_RDONLY)
    except (ImportError, OSError):  # no flock here, or no lock file: nobody holds it
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _in_use(out, fd, os.access(path, os.W_OK)) from None
        except OSError:  # a file system without flock: nothing to learn
            return
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


_NO_FLOCK = {errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK, errno.EINVAL}


def _open_lock(path: Path) -> tuple[int, bool]:
    """(fd, writable) of the lock file. A new one is writable by whoever may write its folder
    (its group's and others' write bits), so another user resuming in a shared folder can
    record its pid; one it cannot write (another user's, made before) is locked read-only:
    flock needs no write access."""
    while True:  # again if the file goes between the two opens
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            pass
        else:
            try:
                os.fchmod(fd, 0o644 | (path.parent.stat().st_mode & 0o022))
            except OSError:  # a file system without modes: keep what it gave
                pass
            return fd, True
        try:
            return os.open(path, os.O_RDWR), True
        except FileNotFoundError:
            continue
        except PermissionError as exc:
            try:
                return os.open(path, os.O_RDONLY), False
            except OSError:  # not readable either: the write error is the one to show
                raise exc from None


@contextlib.contextmanager
def deterministic_algorithms(on: bool = True):
    """``torch.use_deterministic_algorithms(True)`` while the block runs (``train.deterministic``),
    then the caller's setting again.

    On a GPU this makes a rerun of the same config on the same card and software bit-identical
    (cuDNN, cuBLAS and index_add pick their deterministic kernels; cuBLAS needs
    ``CUBLAS_WORKSPACE_CONFIG``, set here to ``:4096:8`` unless given, and left set: it takes
    effect only if CUDA has not run a matrix product in this process yet, which ``train``
    ensures by entering this before any CUDA work of its own). An operator with no
    deterministic kernel raises torch's RuntimeError naming it. On the CPU, runs of the same
    config, machine and thread count are reproducible without it.
    """
    if not on:
        yield
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


DIVERGED_STEPS = 100  # consecutive skipped (non-finite) steps after which training stops


class _SkipWatch:
    """Stops a run whose steps have all been skipped as non-finite for ``DIVERGED_STEPS`` in a
    row (a diverged run went on to its last step, writing useless checkpoints). Read at the
    log points, from the telemetry's count (no extra host read in the loop; one at the
    start). Its state goes into checkpoints: a resumed diverging run stops where an unbroken
    one does (it started counting again, and wrote up to DIVERGED_STEPS more steps)."""

    def __init__(self, run: Run, state: dict[str, int] | None = None) -> None:
        # the count at the start (0, or a resumed run's): the first interval counts too (a run
        # that diverged at its first steps was stopped two intervals late)
        self.run, self.row, self.at = run, 0, run.step  # at: the step of the last check
        self.before = run.ant.telemetry.nonfinite()  # no fold: a resume stays bit-exact
        if state is not None:  # a checkpoint's: the last check's, before the checkpoint
            self.row, self.at, self.before = (int(state[key]) for key in ("row", "at", "before"))
        # the engine's records per optimiser step: a loss-space method records each
        # ant.reduce micro-batch (and counts each of a skipped step's as non-finite)
        tc = run.cfg.train
        self.records = 1 if run.ant.needs_gradients or not tc.micro_batch else (
            tc.batch_size // tc.micro_batch)  # fmt: skip

    def state_dict(self) -> dict[str, int]:
        return {"row": self.row, "at": self.at, "before": self.before}

    def check(self, stats: dict[str, Any], ckpt: Path | None) -> None:
        now, steps = stats.get("nonfinite_steps", 0), self.run.step - self.at
        self.row = self.row + steps if now - self.before >= steps * self.records else 0
        self.before, self.at = now, self.run.step
        if self.row >= DIVERGED_STEPS:
            tc = self.run.cfg.train
            earlier = "may already hold the diverged weights: resume from an earlier one " \
                "(--resume PATH) or start over"
            if ckpt is not None:
                advice = f"the last checkpoint, {ckpt}, {earlier}"
            elif self.run.dist is None or self.run.dist.is_main:
                advice = "no checkpoint was written yet: start over"
            else:  # rank 0 alone writes checkpoints
                advice = f"rank 0's last checkpoint, if any, {earlier}"
            raise TrainingDiverged(
                f"training diverged: the last {self.row} steps (to step {self.run.step}) were all "
                f"non-finite and skipped. Lower train.lr (now {tc.lr:g}) or set "
                f"train.grad_clip (now {tc.grad_clip}); {advice}"
            )


def _same_config(saved: Path, cfg: Config) -> bool:
    """Whether the config.yaml at ``saved`` is ``cfg`` (keys added since it was written count
    as their defaults; a file this version cannot read is another config)."""
    import yaml

    from .config import config_from_saved

    try:
        return config_from_saved(yaml.safe_load(saved.read_text())).to_dict() == cfg.to_dict()
    except (TypeError, ValueError, yaml.YAMLError):
        return False


def _train(
    cfg: Config,
    resume: Any,
    allow_config_change: bool,
    dist: DistContext | None,
    hold: contextlib.ExitStack,
) -> dict[str, Any]:
    out = Path(cfg.train.out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"train.out_dir={str(out)!r} is a file; give a directory for the run")
    t_range = cfg.train.t_range  # refused when training, not when a saved config is read
    if t_range is not None and cfg.ant.method != "vanilla":
        raise ValueError(
            f"train.t_range={t_range!r} draws t uniformly in [t1, t2), not by cluster, so "
            f"ant.method={cfg.ant.method!r} would see clusters that never get a sample: "
            "t_range trains an interval specialist (antdiff ntg) with ant.method=vanilla; "
            "set that, or drop train.t_range"
        )
    fresh = resume is None or resume is False
    # rank 0 alone probes (a rank probing after rank 0 took the lock would find it held) and
    # tells the others, before the checks whose advice ("pass --resume") the lock would refuse
    busy = None
    if dist is None or dist.is_main:
        try:
            refuse_if_in_use(out)
        except OutDirInUse as exc:
            busy = str(exc)
    if dist is not None:
        said = [busy]
        torch.distributed.broadcast_object_list(said, src=0, device=dist.device)
        busy = said[0]
    if busy is not None:
        raise OutDirInUse(busy)
    if fresh and cfg.data.random_flip is None:  # written so into config.yaml and checkpoints
        cfg.data.random_flip = cfg.data.flips  # (a resume takes the checkpoint's: resume_state)
    if fresh and list_checkpoints(out):
        raise ValueError(
            f"train.out_dir={str(out)!r} already holds checkpoints of a run (newest: "
            f"{list_checkpoints(out)[-1].name}): pass --resume to continue it, or choose a new "
            "train.out_dir (a fresh run there would prune them and mix its logs with theirs)"
        )
    if fresh and (out / "metrics.csv").exists():  # a run that kept no checkpoints
        saved = out / "config.yaml"
        # the same config again (a rerun of a run killed before its first checkpoint, as the
        # study and NTG pipelines do) replaces its own logs; another run's are kept
        if not (saved.is_file() and _same_config(saved, cfg)):
            raise ValueError(
                f"train.out_dir={str(out)!r} holds the logs of a run with another config "
                "(metrics.csv, config.yaml; no checkpoint to resume): a fresh run there would "
                "overwrite them. Choose a new --train.out_dir, or remove that folder"
            )
    if not fresh and resume not in (True, ""):
        if not Path(resume).exists():  # before the out_dir check, whose advice assumes a run
            raise FileNotFoundError(
                f"--resume {str(resume)!r} does not exist: pass a run folder or a checkpoint "
                "file, or --resume alone for the newest checkpoint in train.out_dir"
            )
        src_dir = Path(resume) if Path(resume).is_dir() else Path(resume).parent
        if src_dir.name == "checkpoints":  # <run>/checkpoints/ckpt_N.pt: the run is above
            src_dir = src_dir.parent
        # a checkpoint copied out of its run (e.g. into the working folder) has no run to
        # continue in place: its folder is not one to write logs and samples into
        a_run = (src_dir / "config.yaml").is_file() or (src_dir / "checkpoints").is_dir()
        in_place = (
            f"--train.out_dir {str(src_dir)!r} to continue that run in place, or an empty "
            "train.out_dir to branch it" if a_run else
            f"a new, empty --train.out_dir to continue from it ({str(src_dir)!r} holds no run: "
            "no config.yaml or checkpoints/)"
        )  # fmt: skip
        if src_dir.resolve() != out.resolve() and (
            list_checkpoints(out) or (out / "metrics.csv").exists()
        ):
            raise ValueError(
                f"--resume {str(resume)!r} would continue into train.out_dir={str(out)!r}, which "
                f"holds another run (its checkpoints and logs would mix with this one's): pass "
                f"{in_place}"
            )
        if src_dir.resolve() != out.resolve() and a_run:
            log.warning(
                "branching: the run continues in train.out_dir=%s; %s is left as it was "
                "(--train.out_dir %s continues it in place)", out, src_dir, src_dir,
            )
    state, resumed = (None, None) if fresh else resume_checkpoint(cfg, resume, allow_config_change)
    if state is not None and int(state["step"]) > cfg.train.steps:
        raise ValueError(  # it would train nothing and write the lower count to config.yaml
            f"train.steps={cfg.train.steps} is below the checkpoint's step {state['step']}: "
            f"raise --train.steps above {state['step']} to continue the run"
        )
    if state is not None and int(state["step"]) == cfg.train.steps and (
        dist is None or dist.is_main
    ):
        log.warning(
            "the run is already at train.steps=%d (checkpoint %s): nothing to train; raise "
            "--train.steps to extend it", cfg.train.steps, resumed,
        )
    if fresh and cfg.ant.method == "vanilla" and cfg.ant.sampling == "equal" and (
        cfg.train.t_range is None  # a t_range draws t uniformly in it, not by cluster
    ):
        warnings.warn(
            "ant.method='vanilla' with ant.sampling='equal' (the paper presets' setting for ANT's "
            "methods): every cluster gets B / k samples whatever its length, so t is not uniform "
            "and the plain mean trains a reweighted objective, not the plain-training baseline. "
            "Add --ant.sampling proportional for that baseline (t uniform, as stratified)",
            stacklevel=3,
        )
    # rank 0 locks the folder before the ranks build anything together (a rank 0 that raised
    # after DDP's first collective left the others waiting in the next one); every rank
    # learns whether it got the lock
    main = dist is None or dist.is_main  # rank 0 alone writes files
    failed: BaseException | None = None
    if main:
        try:  # before anything is written; a run that lost the race read a checkpoint only
            out.mkdir(parents=True, exist_ok=True)
            hold.enter_context(out_dir_lock(out))
        except Exception as exc:  # noqa: BLE001 -- every rank learns of it, then it is raised
            failed = exc
    if dist is not None:
        said = [None if failed is None else (type(failed) is OutDirInUse, str(failed))]
        torch.distributed.broadcast_object_list(said, src=0, device=dist.device)
        if not main and said[0] is not None:
            busy, msg = said[0]
            raise OutDirInUse(msg) if busy else RuntimeError(
                f"rank 0 could not take train.out_dir={str(out)!r}: {msg}"
            )
    if failed is not None:
        raise failed
    run = build_run(cfg, None if state is None else state.get("codec"), dist)
    branch, means, watched = None, _LogMeans(), None
    logged = (None, None)  # the last row's interval means of (loss, objective)
    if state is not None:
        restore(run, state, allow_config_change)
        branch = state.get("log_branch")  # saved before its logs were committed
        means.load_state_dict(state.get("log_means"), run.device)  # a log interval under way
        watched = state.get("skip_watch")  # None in a checkpoint written before it was saved
        del state
    tc = cfg.train
    logger = (
        RunLogger(out, run.ant.k, run.step, tc.steps, tc.progress, branch)
        if main
        else QuietLogger()
    )
    # a continuation from an earlier checkpoint writes its config with its logs, at its first
    # save (or its end): killed before, the folder keeps the config of the newer checkpoints
    config_later = main and logger.pending
    if main and not config_later:
        atomic_write_text(out / "config.yaml", dump_config(cfg))
    ckpt, t_last, s_last, t0, s0 = (
        None,
        time.perf_counter(),
        run.step,
        time.perf_counter(),
        run.step,
    )
    skipped = _SkipWatch(run, watched)
    done, paused = False, 0.0
    try:
        while run.step < tc.steps:
            if dist is not None:  # per rank and step: a resumed run draws what an unbroken one does
                dist.seed_model_rng(tc.seed, run.step)
            train_step(run, get_batch(run.data, *run.batches.next_batch()))
            if main:  # rank 0 alone logs
                means.add_step(run.outputs)
            logger.advance()
            if run.step % tc.log_every == 0 or run.step == tc.steps:
                stats = run.ant.stats()  # waits for the step's queued work on a GPU: then time
                now = time.perf_counter()
                loss, objective, per_cluster = means.take(run.ant.k)
                logged = (loss, objective)
                logger.log(
                    run.step,
                    loss,
                    {**stats, "loss": per_cluster},
                    run.opt.param_groups[0]["lr"],
                    (now - t_last) / (run.step - s_last),
                    objective=objective,
                )
                skipped.check(stats, resumed if ckpt is None else ckpt)
                t_last, s_last = now, run.step
            grid = main and tc.sample_every and run.step % tc.sample_every == 0 \
                and run.step < tc.steps
            save = tc.ckpt_every and (run.step % tc.ckpt_every == 0 or run.step == tc.steps)
            if (grid or save) and run.device.type == "cuda":  # the step's queued kernels count
                torch.cuda.synchronize(run.device)  # as training time, not as the write's
            p0 = time.perf_counter()  # sample grids and checkpoints: not training time
            if grid:
                write_samples(run, out / "samples" / f"step_{run.step:08d}.png")
            if save:
                if main:
                    state = checkpoint_state(run)
                    if (pending := logger.branch_state()) is not None:  # rows not committed
                        state["log_branch"] = pending
                    state["log_means"] = means.state_dict()
                    state["skip_watch"] = skipped.state_dict()
                    ckpt = save_checkpoint(out, run.step, state, tc.keep_ckpts)
                    del state
                    logger.commit()  # its rows now replace those of a continuation it supersedes
                    if config_later:
                        atomic_write_text(out / "config.yaml", dump_config(cfg))
                        config_later = False
                if dist is not None:  # the checkpoint is complete before any rank goes on
                    dist.barrier()
            pause = time.perf_counter() - p0
            t_last, paused = t_last + pause, paused + pause
        done = True
    finally:
        logger.close(commit=done)  # a run stopped before it saved leaves the logs as they were
    if config_later and done:  # finished without a save (ckpt_every 0): its logs commit too
        atomic_write_text(out / "config.yaml", dump_config(cfg))
    seconds = time.perf_counter() - t0
    idle = run.step == s0 and resumed is not None  # a finished run resumed: nothing trained
    samples = None
    if main:  # an idle call keeps the grid the run drew at this step, and names its checkpoint
        final = out / "samples" / f"step_{run.step:08d}.png"
        samples = final if idle and final.is_file() else write_samples(run, final)
        ckpt = resumed if idle and ckpt is None else ckpt
    last = run.ant.last
    if not main or logged[0] is None:  # no row logged here: the last step's own values
        logged = (None, None) if last is None else (cluster_mean_loss(last), float(last.loss))
    return {
        "step": run.step,
        "loss": logged[0],  # the last row's (None when this call trained no step)
        "objective": logged[1],
        "stats": run.ant.stats(),
        "out_dir": str(out),
        "checkpoint": None if ckpt is None else str(ckpt),
        "samples": None if samples is None else str(samples),
        "seconds": seconds,  # sample grids and checkpoints included
        # training steps only (None when this call trained none: a resume of a finished run)
        "sec_per_step": (seconds - paused) / (run.step - s0) if run.step > s0 else None,
        "run": run,
    }

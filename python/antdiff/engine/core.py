"""The ANT engine: cluster-aware timestep sampling, loss reduction and per-cluster gradients.

Two entry points cover every method (the paper's section 4.2):

- ``loss = ant.reduce(per_sample_loss, t)``; ``loss.backward()``: loss-space methods (UW, RLW,
  DWA, FAMO, LS) and vanilla, at the cost of a vanilla step.
- ``ant.backward(loss_fn, batch, t)``: gradient methods (PCGrad, Nash-MTL, IMTL-G, MGDA, CAGrad,
  GradDrop, and compositions such as UW + PCGrad). The batch arrives sorted by cluster, so one
  forward + backward per cluster sub-batch writes the exact per-cluster gradients J [k, P] into
  one flat buffer (about vanilla FLOPs, 1/k of the activations). Then G = J J^T, a k x k solve
  for the weights, and w @ J straight into the parameters' ``.grad``.

Loss-space transforms T_i(L) act elementwise on the cluster losses, so with c_i = dT_i/dL_i the
rows of the transformed J are c_i J_i: the engine never rescales J, it uses G * c c^T and w * c.

Cluster losses are ``local_sum_i / N_i`` with N_i the global count of cluster i, which makes the
multi-process result equal to the single-process one on the global batch.
"""

from __future__ import annotations

import contextlib
import copy
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import mtl
from ..clustering import Clusters, check_clusters_source, cluster_timesteps
from ..mtl.base import check_int, n_present
from ..schedules import as_schedule
from .batch import batch_size, check_batch, slice_batch, take_batch
from .buffer import GradBuffer, unwrap
from .distributed import Comm
from .onepass import LOSS_WITHOUT_GRAD, MODEL_NOT_RUN, NotServable, OnePass
from .telemetry import Telemetry
from .timesteps import TimestepSampler, to_device

MODES = ("auto", "micro", "onepass", "retain_graph")


def _skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """The optimiser takes a ``found_inf`` tensor and skips on the device: torch's optimisers
    with ``fused=True`` in every group (a group loaded from a non-fused state is not)."""
    if not getattr(optimizer, "_step_supports_amp_scaling", False):
        return False
    groups = optimizer.param_groups
    return "fused" not in groups[0] or all(g.get("fused") for g in groups)


class _HostFlag:
    """A 0-d device flag on its way to the host: a non-blocking copy into pinned memory and an
    event, so that ``ready`` and ``read`` never wait for the device (CPU flags: read as is)."""

    def __init__(self, flag: torch.Tensor, step: int, extra: tuple[torch.Tensor, ...] = ()) -> None:
        """``extra``: small tensors copied with the flag (read with it, e.g. to explain it)."""
        self.step, self.event = step, None
        if flag.device.type == "cuda":
            self.host = torch.empty((), dtype=flag.dtype, pin_memory=True)
            self.host.copy_(flag, non_blocking=True)
            self.extra = tuple(_pinned_copy(v) for v in extra)
            self.event = torch.cuda.Event()
            self.event.record(torch.cuda.current_stream(flag.device))  # the copies' stream
        else:
            self.host, self.extra = flag, extra

    def ready(self) -> bool:
        return self.event is None or self.event.query()

    def read(self, wait: bool = False) -> bool:
        """The flag's value: call after ``ready()`` returned True, or with ``wait`` (blocks)."""
        if wait and self.event is not None:
            self.event.synchronize()
        return bool(self.host)


def _warn_unique(message: str, stacklevel: int) -> None:
    """``warnings.warn`` for a message that differs every time (it names a step or a count),
    without the entry in the caller's ``__warningregistry__`` that each distinct message would
    keep for good (one per skipped step over a long run)."""
    frame = sys._getframe(1)  # the caller; then up to stacklevel - 1 more, as far as there are
    for _ in range(stacklevel - 1):
        frame = frame.f_back or frame
    # no module_globals: those of ``python -c``'s __main__ make linecache raise ImportError
    warnings.warn_explicit(
        message, UserWarning, frame.f_code.co_filename, frame.f_lineno,
        module=frame.f_globals.get("__name__"), registry=None,
    )  # fmt: skip


def _pinned_copy(v: torch.Tensor) -> torch.Tensor:
    out = torch.empty(v.shape, dtype=v.dtype, pin_memory=True)
    return out.copy_(v, non_blocking=True)


@dataclass
class _Recompute:
    """A weight recompute whose finite verdict the host has not seen yet, and the weights from
    before it (restored if it was not finite)."""

    flag: _HostFlag | None  # GPU: the finite flag on its way to the host; CPU: None
    w: torch.Tensor | None  # ANT._w before the recompute
    w_present: torch.Tensor | None
    out: Any = None  # its StepOutput, which ant.step may read (the verdict then)
    verdict: bool | None = None


@dataclass
class _Window:
    """The open gradient-accumulation window of ``ant.backward(..., accumulate=True)``: what its
    micro-batches have added so far (their gradients sit in J's rows, or in ``.grad`` on an
    off-step of ``update_every``)."""

    on_step: bool  # a weight step (J's rows) or an off-step (one weighted backward each)
    scaler: Any  # the enabled GradScaler every call must scale with (None: none)
    buf: GradBuffer | None  # the buffer J's rows accumulate in
    L_sum: torch.Tensor  # [k] sum of the micro-batches' global cluster means  # noqa: N815
    M: torch.Tensor  # [k] micro-batches each cluster was present in
    shown: torch.Tensor  # 0-d sum of the micro-batches' reported losses
    shares: torch.Tensor | None  # [k] sum of vanilla's cluster shares (None: another method)
    finite: torch.Tensor  # 0-d bool: every micro-batch's losses were finite
    calls: int  # micro-batches so far
    owed: Any = None  # the redo its first call took (_Recompute): owed again if it is dropped

    def add(self, L, present, shown, finite, shares=None) -> None:  # noqa: N803
        if shares is not None:
            self.shares = shares if self.shares is None else self.shares + shares
        self.L_sum = self.L_sum + torch.where(present, L, 0.0)
        self.M = self.M + present.to(self.M.dtype)
        self.shown = self.shown + shown
        self.finite = self.finite & finite
        self.calls += 1


@dataclass
class StepOutput:
    """What one engine step produced (all device tensors; reading them is a host sync). Read
    only: the telemetry folds these tensors into its running sums a few steps later."""

    loss: torch.Tensor  # 0-d: the method's total loss (global)
    cluster_losses: torch.Tensor  # [k] global cluster means (0 where absent)
    weights: torch.Tensor  # [k] effective weights of the raw cluster gradients
    present: torch.Tensor  # [k] bool
    finite: torch.Tensor  # 0-d bool: losses and gradients were finite


def _ignore(*args: Any, **kwargs: Any) -> None:
    """What a reduce under torch.no_grad records: nothing."""


def _grads_nonfinite(optimizer: torch.optim.Optimizer, buffers: dict) -> list[torch.Tensor]:
    """0-d float flags, one per device of the optimiser's gradients: 1 where one of them holds
    an inf/NaN. GradScaler's own multi-tensor check (with an unscale factor of 1, which leaves
    the values as they are); ``buffers`` keeps the flag and factor tensors of each device
    between steps. No host sync.

    On the CPU one call takes every dense gradient whatever its dtype (no per-tensor Python
    checks, which cost more than the check in a small model's step). On a GPU the gradients go
    in one call per dtype: the kernel checks tensors of another dtype than the first one by
    one."""
    grads = [p.grad for grp in optimizer.param_groups for p in grp["params"] if p.grad is not None]
    if not grads:
        return []
    if grads[0].device.type == "cpu":
        try:  # several devices or sparse gradients raise: grouped below
            return [_check_on(grads[0].device, [grads], buffers)]
        except RuntimeError:
            pass
    groups: dict[torch.device, dict[torch.dtype, list[torch.Tensor]]] = {}
    for g in grads:
        g = g.coalesce().values() if g.is_sparse else g
        groups.setdefault(g.device, {}).setdefault(g.dtype, []).append(g)
    return [_check_on(dev, list(by_dtype.values()), buffers) for dev, by_dtype in groups.items()]


def _check_on(
    device: torch.device, lists: list[list[torch.Tensor]], buffers: dict
) -> torch.Tensor:
    """The inf/NaN flag of the tensor lists (all on ``device``) in the device's flag buffer."""
    if device not in buffers:
        buffers[device] = (torch.zeros((), device=device), torch.ones((), device=device))
    found, one = buffers[device]
    found.zero_()
    for grads in lists:
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found, one)
    return found


def _read_on_host(t: torch.Tensor) -> bool:
    """Whether validating ``t`` may read its values (free on the CPU, a host sync elsewhere)."""
    return t.device.type == "cpu"


class ANT:
    """ANT backend for any diffusion trainer.

    Args:
        schedule: a Schedule, "linear"/"cosine", or an alphas_cumprod array [T].
        k: number of timestep clusters (default 5; with a Clusters object: its k, which a given
            ``k`` must equal).
        clustering: "snr", "timestep" or "gradient" (needs ``affinity``), a Clusters object,
            or the path of a clusters JSON file (``antdiff cluster --json FILE``).
        method: an MTL method name ("vanilla", "uw", "pcgrad", "nash", "uw+pcgrad", ...).
        sampling: "proportional" (default; uniform marginal over t), "equal" or "uniform".
        mode: "onepass" (one forward/backward for all of J, per-cluster weight gradients from
            layer hooks; needs every trainable parameter in a Linear/Conv/GroupNorm/LayerNorm/
            Embedding), "micro" (one forward/backward per cluster sub-batch), "auto" (default:
            onepass when the model allows it, else micro; decided at attach, shown in repr) or
            "retain_graph" (one forward, k backward passes; for models that couple samples).
        update_every: recompute gradient-method weights every N steps (Nash default: 25);
            other steps take one backward of the weighted loss with the last weights. Only for
            methods that combine J through weights (not GradDrop, which needs J every step).
            A non-finite recompute is redone at the next ``backward`` when the host knows of it
            without waiting (see ``backward``).
        model: the model whose parameters get the gradients (or call ``attach`` later).
        seed: seeds the sampler's host RNG and the methods' random streams. Keep it equal on all
            ranks.
        distributed: "auto" (use torch.distributed when initialised), True or False.
        process_group: the torch.distributed group to reduce over (default: the world).
        affinity: for ``clustering="gradient"``: the task affinity [T, T], a binned [nb, nb]
            one with ``bin_edges``, or the path of a file from ``antdiff affinity``.
        bin_edges: [nb + 1] bin edges of a binned ``affinity`` array.
        min_size, max_size: cluster size limits in timesteps ("default": [T/(2k), 2T/k];
            None: no limit).
        method_kwargs: hyper-parameters passed to the method(s).
    """

    def __init__(
        self,
        schedule: Any,
        k: int | None = None,
        clustering: str | Clusters = "snr",
        method: str = "uw",
        *,
        sampling: str = "proportional",
        mode: str = "auto",
        update_every: int | None = None,
        model: nn.Module | None = None,
        seed: int = 0,
        distributed: bool | str = "auto",
        process_group: Any = None,
        affinity: Any = None,
        bin_edges: Any = None,
        min_size: Any = "default",
        max_size: Any = "default",
        method_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.schedule = as_schedule(schedule)
        where = "the clusters given"
        if isinstance(clustering, os.PathLike) or (
            isinstance(clustering, str) and clustering.lower().endswith(".json")
        ):  # fmt: skip
            where = f"the clusters in {clustering}"
            clustering = Clusters.load(clustering)
        elif isinstance(clustering, str):  # an objective's name: any case, as method names
            clustering = clustering.lower()
        if isinstance(clustering, Clusters):
            if clustering.T != self.schedule.T:
                raise ValueError(
                    f"{where} cover T={clustering.T}, the schedule has T={self.schedule.T}"
                )
            check_clusters_source(clustering, self.schedule, where)
            if k is not None and k != clustering.k:
                raise ValueError(
                    f"k={k!r} but {where} have k={clustering.k}: pass k={clustering.k} or leave "
                    "k out"
                )
            self.clusters = clustering
        else:
            self.clusters = cluster_timesteps(
                self.schedule,
                5 if k is None else k,
                clustering,
                affinity=affinity,
                bin_edges=bin_edges,
                min_size=min_size,
                max_size=max_size,
            )
        self.k = self.clusters.k
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not (
            0 <= seed < 2**64
        ):  # fmt: skip
            raise ValueError(
                f"seed must be an integer in [0, 2**64) (the same on every rank), got {seed!r}"
            )
        seed = int(seed)
        if method_kwargs is not None and not isinstance(method_kwargs, dict):
            raise TypeError(
                f"method_kwargs must be a dict of the method's hyper-parameters (e.g. "
                f"{{'iters': 80}}), got {type(method_kwargs).__name__}"
            )
        if update_every is not None and "update_every" in (method_kwargs or {}):
            raise ValueError(
                "update_every is given twice (as update_every= and in method_kwargs): give it once"
            )
        self.method = _make_method(method, self.k, seed, method_kwargs or {})
        self.method_name = self.method.name
        if update_every is not None:
            if self.method.grad is None:
                raise ValueError(
                    f"update_every applies to gradient methods; {self.method_name!r} has none"
                )
            update_every = check_int("update_every", update_every)
            if update_every > 1 and self.method.grad.needs == "grads":
                raise ValueError(
                    f"update_every={update_every} with method {self.method_name!r}: it combines "
                    "the per-cluster gradients elementwise every step and keeps no weights to "
                    "reuse; valid: update_every=1 (or None), or a weight method (pcgrad, nash, "
                    "imtl, mgda, cagrad)"
                )
            self.method.grad.update_every = update_every
        self.sampler = TimestepSampler(self.clusters, sampling, seed)
        self.comm = Comm(distributed, process_group)
        self.telemetry = Telemetry(self.k)
        self.step_count = 0
        self._w: torch.Tensor | None = None  # last gradient-method weights (before c)
        self._w_present: torch.Tensor | None = None  # clusters present when _w was computed
        self._recompute: _Recompute | None = None  # the last weight recompute (see backward)
        self._unsolved_reported = 0  # weight solves without a solution that stats() reported
        self._optimizer_checked: tuple[int, int] | None = None  # see _check_optimizer
        self._buffer: GradBuffer | None = None
        self._onepass: OnePass | None = None  # hook plan when onepass serves the model
        self._model: nn.Module | None = None
        self._batchnorms: list[tuple[str, nn.Module]] = []  # the attached model's, see attach
        self._warned_reorder = False
        self._probed = False  # whether a loss was checked to reach the model's parameters
        self._leaves_checked = False  # whether a J step's loss was checked for other leaves
        self._maybe_absent = True  # whether a cluster may be empty in the last step (host view)
        self._warned_sync = False
        self._skips_said = 0  # skipped steps warned of so far (see _warn_skip)
        self._zeroed_probe: torch.Tensor | None = None  # see attach and reduce
        # (a model parameter, its _version, UW's first log-variance, its _version) after the
        # last ant.backward; False once warned: see _check_own_params_stepped
        self._own_versions: tuple | None | bool = None
        self.last: StepOutput | None = None
        self._unstepped = False  # a reduce/backward since the last ant.step
        self._records = 0  # steps recorded since then (micro-batches of one optimiser step)
        self._finite_since: torch.Tensor | None = None  # their finite flags, and-ed
        # the enabled GradScaler the last ant.backward scaled with (None: none); False after
        # ant.reduce, whose loss the caller scales
        self._backward_scaler: torch.amp.GradScaler | None | bool = False
        self._pending_flags: list[_HostFlag] = []  # device-side skips not yet reported
        # loss-space steps: the engine never sees the gradients, so ant.step checks them, and a
        # loss method's observe waits for that verdict (or for the next step, if step is skipped)
        self._grads_unchecked = False
        # (L, present, finite) of steps whose loss method's observe waits for a verdict
        self._pending_observe: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._uses_step = False  # ant.step has been called: a reduce before it accumulates
        self._window: _Window | None = None  # ant.backward(accumulate=True) since the last update
        self._window_leaves_checked = False  # see _check_window_leaves
        self._check_buffers: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        if model is not None:
            self.attach(model)

    # -- setup -----------------------------------------------------------------------------------
    @property
    def T(self) -> int:  # noqa: N802
        """Number of timesteps of the schedule."""
        return self.clusters.T

    @property
    def needs_gradients(self) -> bool:
        """Whether the method acts on per-cluster gradients (train with ``ant.backward``) rather
        than on losses (``ant.reduce``)."""
        return self.method.grad is not None

    def _check_distributed(self, model: nn.Module) -> None:
        """What the engine's reduction across ranks needs of the model; run at attach and again
        when the reduction turns on later (an engine built, and a model attached, before
        ``init_process_group``)."""
        model = getattr(model, "_orig_mod", model)  # torch.compile(DDP(m)): the DDP inside
        ddp = isinstance(model, nn.parallel.DistributedDataParallel)
        sharded = _sharded_by(model)
        if sharded is not None and self.needs_gradients:
            raise ValueError(
                f"the model is sharded by {sharded}: a gradient method needs every rank to hold "
                "the full per-cluster gradients J [k, P] as views of one flat buffer, which "
                "sharded parameters do not give (the update came out zero, or ranks with "
                "different cluster counts hung). Wrap it in DistributedDataParallel instead"
            )
        if self.comm.active and self.comm.world > 1 and not hasattr(model, "no_sync"):
            how = "" if sharded is None else f" (it is sharded by {sharded})"
            raise ValueError(
                "torch.distributed is initialised and the engine reduces across its "
                f"{self.comm.world} ranks, but the model is not wrapped in "
                f"DistributedDataParallel{how}: the cluster losses assume DDP averages the "
                "gradients (without it the ranks drift apart). Wrap it, DDP(model, ...), or pass "
                "ANT(..., distributed=False) to train each rank on its own"
            )
        if ddp and self.needs_gradients:
            _check_ddp_for_gradients(model, self.comm.active)
        loss = self.method.loss
        if ddp and not self.comm.active and loss is not None and loss.name in _LOCAL_STATE:
            raise ValueError(
                f"a DistributedDataParallel model with {loss.name!r} and distributed=False: its "
                "state follows each rank's own cluster losses (and UW's log-variances are not "
                "DDP's to average), so the ranks would drift apart. Use distributed='auto' (the "
                "default) or True"
            )

    def _resolve_comm(self) -> None:
        """``comm.resolve()``, with the model's checks when the reduction turns on."""
        was = self.comm.active
        self.comm.resolve()
        if self.comm.active and not was and self._model is not None:
            self._check_distributed(self._model)

    def attach(self, model: nn.Module) -> ANT:
        """Use ``model``'s trainable parameters for the per-cluster gradients."""
        if self._window is not None:  # (re-attaching rebuilds the buffer J accumulates in)
            raise RuntimeError(_window_open("ant.attach"))
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"model must be a torch.nn.Module (the network loss_fn runs), got "
                f"{type(model).__name__}"
            )
        # BatchNorm in training mode couples the samples of a batch (its batch statistics); one
        # in eval mode (a frozen pretrained part) does not: checked here and at each backward
        bn_types = nn.modules.batchnorm._BatchNorm
        batchnorms = [(n, m) for n, m in model.named_modules() if isinstance(m, bn_types)]
        self.comm.resolve()
        self._check_batchnorm(batchnorms)
        # torch.compile's wrapper, also inside DDP (and DDP inside it)
        compiled = any(hasattr(m, "_orig_mod") for m in (model, getattr(model, "module", None)))
        inner = getattr(model, "_orig_mod", model)
        if compiled and self.mode == "onepass" and self.needs_gradients:
            raise NotServable(
                "mode='onepass' with a torch.compile'd model: its per-step layer hooks break the "
                "compiled graph at every served layer; use mode='micro' (or 'auto', which picks "
                "micro for a compiled model)"
            )
        ddp = isinstance(inner, nn.parallel.DistributedDataParallel)
        self._check_distributed(model)
        if (
            ddp
            and self.needs_gradients
            and self.mode != "retain_graph"
            and getattr(inner, "broadcast_buffers", False)
            and any(True for _ in inner.buffers())
        ):
            raise ValueError(
                "DDP(..., broadcast_buffers=True) with module buffers: the per-cluster passes may "
                "differ in number between ranks and the buffer broadcasts would deadlock. Wrap the "
                "model with DDP(model, broadcast_buffers=False) (forward_sync_buffers=False in "
                "newer torch) (GroupNorm/LayerNorm models keep "
                "no running statistics to broadcast)."
            )
        self._model = model
        self._batchnorms = batchnorms
        self._buffer = None
        self._onepass = None
        self._probed = False
        self._leaves_checked = False
        self._window_leaves_checked = False
        self._zeroed_probe = None  # a parameter the losses reach: the first reduce's walk
        # the method's state (UW's log-variances, DWA's history, ...) follows the model
        device = next((q.device for q in model.parameters()), None)
        if device is not None:
            self.to(device)
        if self.mode in ("auto", "onepass") and self.needs_gradients and not compiled:
            try:
                self._onepass = OnePass(model)
            except NotServable:
                if self.mode == "onepass":
                    raise
        return self

    def _check_batchnorm(self, batchnorms: list[tuple[str, nn.Module]] | None = None) -> None:
        if not self.needs_gradients:
            return
        training = [(n, m) for n, m in (self._batchnorms if batchnorms is None else batchnorms)
                    if m.training]  # fmt: skip
        sync = [n for n, m in training if isinstance(m, nn.SyncBatchNorm)]
        if sync and self.comm.active and self.comm.world > 1:
            raise ValueError(
                f"SyncBatchNorm layers in training mode ({', '.join(repr(n) for n in sync[:3])}) "
                "under several ranks: their backward all-reduces once per cluster pass, and the "
                "ranks run different numbers of passes (a hang, or rows of different clusters "
                "mixed); a cluster's loss also depends on every rank's samples. Use GroupNorm, "
                "keep them in eval mode, or convert them back to BatchNorm (per-rank statistics) "
                "with mode='retain_graph'"
            )
        if self.mode == "retain_graph":
            return
        bn = [n for n, _ in training]
        if bn:
            names = ", ".join(repr(n) for n in bn[:3]) + (", ..." if len(bn) > 3 else "")
            raise ValueError(
                f"the model has BatchNorm layers in training mode ({names}), which couple the "
                "samples of a batch, so "
                "per-cluster sub-batches would not give the exact per-cluster gradients. Use "
                "ANT(..., mode='retain_graph'), GroupNorm, or keep them in eval mode (frozen "
                "running statistics)."
            )

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimiser parameter groups of the method itself (UW's log-variances), or []."""
        return self.method.loss.param_groups() if self.method.loss is not None else []

    def to(self, device: Any) -> ANT:
        """Move the method's state to ``device`` (``attach`` does this for the model's device);
        build the optimiser from ``param_groups()`` after it."""
        self._flush_observe()  # the last step's observe runs where its losses are
        if self.method.loss is not None:
            self.method.loss.to(device)
        return self

    def _check_device(self, device: torch.device) -> None:
        """A clear error, not a failed kernel, when the method's state sits elsewhere."""
        loss = self.method.loss
        if loss is None:
            return
        # the module's own tensors first (a dict lookup; the recursive generators cost ~20 us
        # in a CPU training step)
        own = next(iter(loss._parameters.values()), None)
        if own is None:
            own = next(iter(loss._buffers.values()), None)
        if own is None:
            own = next(iter(loss.parameters()), None)
        if own is None:
            own = next(iter(loss.buffers()), None)
        if own is not None and own.device != device:
            raise ValueError(
                f"method {self.method_name!r} keeps its state on {own.device} but the losses are "
                f"on {device}: call ant.to({str(device)!r}) (or ant.attach(model) after moving the "
                "model) before building the optimiser"
            )

    # -- sampling and reduction ------------------------------------------------------------------
    def sample_timesteps(
        self,
        B: int,
        device: Any = None,
        generator: torch.Generator | None = None,  # noqa: N803
    ) -> torch.Tensor:
        """[B] int64 timesteps sorted by cluster (per-cluster counts known on the host).

        Args:
            B: batch size; at least k unless ``sampling="uniform"`` (stratified sampling puts
                at least one sample in every cluster).
            device: where the timesteps go (default: the CPU).
            generator: a torch.Generator on ``device`` for the draw within each cluster (default:
                torch's default generator of ``device``, so ``torch.manual_seed`` fixes it; the
                counts per cluster always come from the engine's host stream, seeded by
                ``seed``).
        """
        if isinstance(B, bool) or not isinstance(B, (int, np.integer)) or B < 1:
            raise ValueError(f"B must be a positive integer batch size, got {B!r}")
        if self.sampler.mode != "uniform" and B < self.k:
            raise ValueError(
                f"batch size {B} is smaller than k={self.k}: every step would leave clusters "
                f"without a sample ({self.sampler.mode!r} sampling stratifies the batch over the "
                "clusters). Use a batch >= k, fewer clusters, or sampling='uniform'."
            )
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(
                f"generator must be a torch.Generator (on the timesteps' device) or None, got "
                f"{type(generator).__name__}"
            )
        rank = None
        if self.sampler.per_rank:  # an engine built before init_process_group: resolved here
            self._resolve_comm()
        if self.sampler.per_rank and self.comm.active:
            rank = (torch.distributed.get_rank(self.comm.group), self.comm.world)
        return self.sampler.sample(B, device, generator, rank)[0]

    def _note_per_rank_draw(self, t: torch.Tensor) -> None:
        """Under several processes, timesteps that ``sample_timesteps`` drew on this rank and
        that reach a training step without ``shard``: each rank draws its own batch. The shared
        seed gave every rank the same cluster counts (a global batch of W copies of one
        allocation, also under "uniform"); from the next draw on the ranks' allocations differ
        and add up to a global one (TimestepSampler.sample)."""
        if self.comm.active and not self.sampler.per_rank and self.sampler.whole_draw(t):
            self.sampler.per_rank = True

    def _check_t(self, t: torch.Tensor, n: int | None = None) -> None:
        if (
            not isinstance(t, torch.Tensor) or t.dim() != 1 or t.dtype == torch.bool
            or t.dtype.is_floating_point or t.dtype.is_complex
        ):  # fmt: skip
            raise ValueError(f"t must be a 1-D integer tensor of timesteps, got {_describe(t)}")
        if n is not None and t.shape[0] != n:
            raise ValueError(f"t has {t.shape[0]} entries but the batch/loss has {n} samples")
        if t.shape[0] == 0 and not self.comm.active:  # under DDP a rank's slice may be empty
            raise ValueError(
                "the batch is empty (0 samples): there is nothing to train on, and the "
                "optimiser would still step (weight decay, momentum); skip the step instead"
            )
        if self.sampler.counts_for(t) is not None:  # drawn by sample_timesteps, in range
            return
        ok = (t >= 0) & (t < self.T)
        if _read_on_host(t):
            if not bool(ok.all()):
                bad = t[~ok][:5].tolist()
                raise ValueError(f"timesteps must lie in [0, T={self.T}), got e.g. {bad}")
        else:  # a device-side assert: no host sync
            torch._assert_async(ok.all(), f"timesteps must lie in [0, T={self.T})")

    def _cluster_sums(self, per_sample: torch.Tensor, t: torch.Tensor):
        cid = self.clusters.cluster_of(t)
        k, dev = self.k, per_sample.device
        # a float64 loss keeps its precision in the total (its reported means are float32)
        acc = torch.float64 if per_sample.dtype == torch.float64 else torch.float32
        sums = torch.zeros(k, device=dev, dtype=acc).index_add(0, cid, per_sample.to(acc))
        host = self.sampler.counts_for(t)  # t from sample_timesteps: its counts are on the host
        if host is not None:
            return sums, to_device(torch.from_numpy(host.astype(np.float32)), dev)
        return sums, self._device_counts(cid)

    def _device_counts(self, cid: torch.Tensor) -> torch.Tensor:
        """[k] float32 samples per cluster, counted on cid's device."""
        ones = torch.ones(cid.shape, device=cid.device, dtype=torch.float32)
        return torch.zeros(self.k, device=cid.device, dtype=torch.float32).index_add(0, cid, ones)

    def _inverse_counts(self, per: torch.Tensor, t: torch.Tensor, cid: torch.Tensor):
        """1 / max(N_i, 1) [k] float32, presence N_i > 0 as float32 [k] and as bool [k] of this
        step's clusters (from the host counts of timesteps drawn by sample_timesteps, cached on
        the device: only read the float tensors; else counted on the device)."""
        host = self.sampler.counts_for(t)
        if host is not None:
            return self.sampler.inverse_counts(host, per.device)
        counts = self._device_counts(cid)
        present = counts > 0
        return 1.0 / counts.clamp(min=1), present.float(), present

    def _globalise(self, sums: torch.Tensor, counts: torch.Tensor):
        """Attached local cluster losses, detached global ones, presence and global counts."""
        if not self.comm.active:
            L = sums / counts.clamp(min=1)  # noqa: N806
            return L, L.detach(), counts > 0, counts
        N = self.comm.sum_(counts.detach().clone())  # noqa: N806
        L_global = self.comm.sum_(sums.detach().clone()) / N.clamp(min=1)  # noqa: N806
        L_local = sums / N.clamp(min=1)  # noqa: N806
        # value = global cluster mean; gradient = world * d(local part) (DDP then averages)
        L_eff = L_global + self.comm.world * (L_local - L_local.detach())  # noqa: N806
        return L_eff, L_global, N > 0, N

    def reduce(self, per_sample_loss: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Total training loss of a loss-space method; call ``.backward()`` on it.

        Under ``torch.no_grad`` or ``torch.inference_mode`` (a validation loss) it returns the
        same total and records nothing: no telemetry, no observation for DWA / FAMO / RLW,
        nothing for ``ant.step``; under several processes every rank must call it. A gradient
        method (trained with ``ant.backward``) has a validation total too: its loss method's
        (``"uw+pcgrad"``: UW's) or, without one, the plain batch mean, as vanilla's.
        With a model attached, the first loss after ``attach`` that has an autograd graph is
        checked to reach the model's trainable parameters (one walk of the graph on the host):
        the losses of a copy or of the EMA model would give it a zero update.

        Args:
            per_sample_loss: [B] loss of every sample (already weighted, e.g. P2 / Min-SNR).
            t: [B] timesteps of those samples.
        """
        if self.needs_gradients and torch.is_grad_enabled():
            raise ValueError(
                f"method {self.method_name!r} acts on per-cluster gradients; use "
                "ant.backward(loss_fn, batch, t) instead of ant.reduce to train (under "
                "torch.no_grad, ant.reduce gives a validation loss)"
            )
        if self._window is not None and torch.is_grad_enabled():
            raise RuntimeError(_window_open("ant.reduce"))
        self._resolve_comm()
        # grad disabled (a validation loss): the total only; nothing is recorded, observed
        # or marked for ant.step (it entered the telemetry and DWA / FAMO's next observation)
        evaluating = not torch.is_grad_enabled()
        record = _ignore if evaluating else self._record
        # a reduce before the last one's ant.step: gradient accumulation, whose steps wait for
        # the verdict on all their gradients (a trainer that never calls ant.step observes now)
        if not evaluating and (
            not (self._uses_step and self._grads_unchecked) or len(self._pending_observe) >= 256
        ):
            self._flush_observe()
        if not evaluating:
            self._backward_scaler = False  # a loss the caller scales (or not) itself
        per = _check_per_sample(
            per_sample_loss, t.shape[0] if isinstance(t, torch.Tensor) and t.dim() == 1 else None
        )
        self._check_t(t, per.shape[0])
        if not evaluating:
            self._note_per_rank_draw(t)
        self._check_device(per.device)
        if t.device != per.device:
            raise ValueError(
                f"t is on {t.device} but the per-sample loss on {per.device}: draw the "
                "timesteps on the loss's device (ant.sample_timesteps(B, device))"
            )
        if not per.requires_grad and torch.is_grad_enabled() and (
            self._model is not None
            or (self.method.loss is not None
                and any(p.requires_grad for p in self.method.loss.parameters()))
        ):  # fmt: skip
            # the model (attached, or the one whose losses UW's parameters would weigh) would
            # get no gradient while the method's own parameters move
            raise ValueError(REDUCE_LOSS_WITHOUT_GRAD)
        host = self.sampler.counts_for(t)  # None: counted on the device, maybe with empty ones
        if not evaluating:
            self._maybe_absent = host is None or bool((host == 0).any())
        if self._model is not None and not self._probed and per.grad_fn is not None:
            reached: list[torch.Tensor] = []
            if _reaches_model(per, self._model, reached) is False:  # a zero update, silently
                raise ValueError(REDUCE_MODEL_NOT_RUN)
            self._probed = True
            # (only a method with parameters of its own, UW, has something to check)
            self._zeroed_probe = reached[0] if reached and self.param_groups() else None
        elif not evaluating and self._zeroed_probe is not None:
            self._check_own_params_zeroed(self._zeroed_probe)
        if self.method.loss is None:  # vanilla: the plain batch mean
            sums, counts = self._cluster_sums(per.detach(), t)
            _, L_global, present, N = self._globalise(sums, counts)  # noqa: N806
            total, shown = self._batch_mean(per, L_global, N)
            record(shown, L_global, _count_shares(N), present, None, grads_checked=False)
            return total
        if (
            self.method.loss.fused_total is not None
            and not self.comm.active
            and per.dtype != torch.float64  # its sums are float32
        ):
            cid = self.sampler.cid_for(t)
            if cid is None:
                cid = self.clusters.cluster_of(t)
            inv, pf, present = self._inverse_counts(per, t, cid)
            total, L, c = self.method.loss.fused_total(per, cid, inv, pf)  # noqa: N806
            value = total.detach()  # finite iff every present cluster mean is (fused_total)
            record(value, L, c, present, None, value * 0 == 0, grads_checked=False)
            return total
        sums, counts = self._cluster_sums(per, t)
        L_eff, L_global, present, _ = self._globalise(sums, counts)  # noqa: N806
        terms = self.method.loss.transform(L_eff, present)
        total = terms.sum()
        if not evaluating:  # (the slopes take an autograd pass, which inference_mode refuses)
            c = self.method.loss.slopes(L_global, present)
            record(total.detach(), L_global, c, present, None, grads_checked=False)
        return total

    def _check_own_params_zeroed(self, probe: torch.Tensor) -> None:
        """A model parameter that the losses reach has had its gradient cleared (zero_grad) since
        the last loss, but the method's own parameters (UW's log-variances) still hold theirs:
        the optimiser that steps the model likely does not hold them (a loop that calls
        optimizer.step() itself; ant.step refuses such an optimiser), so UW would stay a fixed
        weighting while its gradient piles up. Host attributes only; off once ant.step has
        checked an optimiser, or once warned."""
        if probe.grad is not None or not probe.requires_grad:
            return
        if self._optimizer_checked is not None:
            self._zeroed_probe = None  # ant.step checks the optimiser itself
            return
        own = [q for g in self.method.loss.param_groups() for q in g["params"]]
        if any(q.grad is not None for q in own):
            self._zeroed_probe = None
            warnings.warn(
                f"method {self.method_name!r}: its own parameters (UW's log-variances) still "
                "hold the gradient of an earlier step while the model's was cleared: the "
                "optimiser that steps the model likely does not hold them, and then they never "
                "move. Build it with model.parameters() and ant.param_groups() "
                "(torch.optim.AdamW([{'params': model.parameters()}, *ant.param_groups()])) and "
                "zero both; ant.step(optimizer) checks this",
                stacklevel=3,
            )

    # -- gradient methods ------------------------------------------------------------------------
    def backward(
        self,
        loss_fn: Callable[[Any, torch.Tensor], torch.Tensor],
        batch: Any,
        t: torch.Tensor,
        *,
        model: nn.Module | None = None,
        scaler: torch.amp.GradScaler | None = None,
        accumulate: bool = False,
    ) -> StepOutput:
        """Compute the method's update and write it into the parameters' ``.grad``.

        The ``.grad`` tensors are overwritten, not added to. Gradient accumulation: pass
        ``accumulate=True`` to every call of an optimiser step but its last (under accelerate:
        ``accumulate=not accelerator.sync_gradients``). Those calls only add their micro-batch's
        per-cluster gradients (on an ``update_every`` off-step: its weighted gradient) and
        return that micro-batch's losses with zero weights; the last call adds its own and forms
        the update from the mean over the micro-batches: each cluster's gradient and loss the
        mean of its micro-batch means (over the micro-batches it was in; the gradient of an
        off-step or of a loss-space method: the mean over all of them). Micro-batches with the
        same cluster counts thus give the update of their concatenation. Under
        DistributedDataParallel J is all-reduced once, at the last call.

        With ``update_every`` > 1, a recompute of the weights that was not finite (e.g. a
        GradScaler overflow) leaves the weights as they were (none before the first) and the
        next call recomputes them, once the host knows the verdict: from ``ant.step``'s own
        read of the finite flag (its default ``skip_nonfinite=True`` without a fused
        optimiser; exact on any device), or on a GPU from a non-blocking copy of the flag into
        pinned memory. While that copy is still in flight, or on the CPU when ``ant.step``
        read nothing, the off-steps use the previous weights (equal weights before the first
        recompute) until the next scheduled recompute.

        Args:
            loss_fn: ``loss_fn(sub_batch, sub_t) -> [b]`` per-sample losses.
            batch: tensor, tuple/list or dict of tensors with leading dimension B.
            t: [B] timesteps; from ``sample_timesteps`` the step has no host sync, other
                tensors cost one sync to count the clusters.
            model: the model (if not attached); may be DDP-wrapped.
            scaler: a GradScaler for fp16; weights come from the unscaled Gram.
            accumulate: keep this micro-batch's gradients for the next call (see above).
        """
        if model is not None and model is not self._model:
            self.attach(model)  # refused while a window is open, which then goes on
        try:
            batch, t, counts, acc, scaling = self._backward_checks(
                loss_fn, batch, t, scaler, accumulate
            )
        except BaseException as e:  # a call that raises drops the open window, whatever raised
            self._drop_window(e)
            raise
        grad = self.method.grad
        owed = None
        if acc is None:
            self._check_own_params_stepped()  # (may raise under -W error: before the redo)
            owed = self._recompute  # a redo this call takes is owed again if it fails
            redo = self._failed_update()
            # this call replaces what the calls since ant.step formed: step's verdict is its own
            self._records = 0
            on_step = grad is not None and (
                redo or self._w is None or self.step_count % grad.update_every == 0
            )
            # overwrite, not accumulate: the method's own parameters always, the model's where
            # no gradient buffer row is zeroed for them (loss-space methods; under a gradient
            # method its frozen ones, whose last gradient the optimiser would apply again at
            # every step after a requires_grad_(False) mid-run)
            own = list(self.method.loss.parameters()) if self.method.loss is not None else []
            model_params = unwrap(self._model).parameters()
            if grad is not None:
                model_params = (q for q in model_params if not q.requires_grad)
            for p in [*own, *model_params]:
                p.grad = None
        else:  # a later micro-batch of the window: its kind of step, added to what is there
            on_step = acc.on_step
        try:
            if on_step:
                out = self._gradient_step(loss_fn, batch, t, counts, scaler, acc, accumulate)
            else:
                out = self._weighted_step(loss_fn, batch, t, scaler, acc, accumulate)
        except BaseException as e:
            if acc is None and redo:  # the retry of this step still owes the redo
                self._recompute = owed
            # J / .grad may hold part of this micro-batch: not resumable (one-pass's fallback
            # inside a window has dropped it and said so)
            if acc is not None:
                self._drop_window(e)
            raise
        if accumulate:
            if acc is None and redo and self._window is not None:
                self._window.owed = owed
            return out
        self._window = None
        self.step_count += 1
        self._backward_scaler = scaling  # ant.step must match it
        if self._own_versions is not False and self._optimizer_checked is None:
            own = [q for g in self.param_groups() for q in g["params"] if q.requires_grad]
            probe = next((q for q in unwrap(self._model).parameters() if q.grad is not None), None)
            if own and probe is not None:
                self._own_versions = (probe, probe._version, own[0], own[0]._version)
        return out

    def _release_window(self) -> bool:
        """Close the open accumulation window (False: none was open), giving back the weight
        redo its first call took: the retried step owes it."""
        win = self._window
        if win is None:
            return False
        if win.owed is not None:
            self._recompute = win.owed
        self._window = None
        return True

    def _drop_window(self, e: BaseException) -> None:
        """Drop the open accumulation window after ``e`` (J / .grad may hold part of a
        micro-batch, or the step is to start again): its owed redo goes back, and ``e`` gets a
        note saying to start the optimiser step again from its first micro-batch."""
        if not self._release_window():
            return
        note = ("antdiff: the accumulation window was dropped (this micro-batch's gradients "
                "are incomplete, or it was refused); start the optimiser step again from its "
                "first micro-batch")  # fmt: skip
        if hasattr(e, "add_note"):
            e.add_note(note)
        else:  # Python 3.10
            warnings.warn(note, stacklevel=3)

    def _backward_checks(self, loss_fn, batch, t, scaler, accumulate):
        """ant.backward's checks and preparation: (batch, t, counts) sorted by cluster, the open
        window (or None) and the enabled scaler (or None)."""
        if not isinstance(accumulate, bool):
            raise TypeError(f"accumulate must be True or False, got {_describe(accumulate)}")
        if not callable(loss_fn):
            raise TypeError(
                f"loss_fn must be a callable (sub_batch, sub_t) -> per-sample losses [b], got "
                f"{type(loss_fn).__name__}"
            )
        if self._model is None:
            raise ValueError("no model: call ant.attach(model) or pass model= to ant.backward")
        self._resolve_comm()
        self._check_batchnorm()  # put in training mode since attach
        n = batch_size(batch)
        self._check_t(t, n)
        self._note_per_rank_draw(t)
        check_batch(batch, t.shape[0], lists=not self.comm.active)
        acc = self._window
        scaling = scaler if _scaling(scaler) else None
        if acc is not None and scaling is not acc.scaler:
            said, got = _scalers_named(acc.scaler, scaling)
            raise ValueError(
                f"ant.backward: the open accumulation window's micro-batches ran with {said}, "
                f"this one with {got}; pass the same scaler= to every call of one optimiser step"
            )
        if acc is None and self._uses_step and self._unstepped:  # ant.step was skipped
            warnings.warn(
                "ant.backward again without ant.step since the last one: its gradients are "
                "replaced, not accumulated (each call rebuilds J and the update). To accumulate "
                "micro-batches, pass accumulate=True to every ant.backward of an optimiser step "
                "but its last; to skip a step on purpose, ignore this warning",
                stacklevel=3,
            )
        self._flush_observe()
        batch, t, counts = self._sorted(batch, t)
        self._maybe_absent = bool((np.asarray(counts) == 0).any())
        return batch, t, counts, acc, scaling

    def _check_own_params_stepped(self) -> None:
        """ant.backward's counterpart of :meth:`_check_own_params_zeroed`: since the last
        ant.backward an optimiser stepped a model parameter (its in-place version counter moved)
        but not the method's own parameters (UW's log-variances), which then never move. Version
        counters only, no device read; warns once; off once ant.step has checked an optimiser."""
        seen, self._own_versions = self._own_versions, None
        if seen is False:
            self._own_versions = False
            return
        if seen is None or self._optimizer_checked is not None:
            return
        probe, v_probe, own, v_own = seen
        if probe._version != v_probe and own._version == v_own:
            self._own_versions = False
            warnings.warn(
                f"method {self.method_name!r}: the optimiser stepped the model since the last "
                "ant.backward but not the method's own parameters (UW's log-variances), which "
                "then never move. Build it with model.parameters() and ant.param_groups() "
                "(torch.optim.AdamW([{'params': model.parameters()}, *ant.param_groups()])); "
                "ant.step(optimizer) checks this",
                stacklevel=3,
            )

    def shard(self, batch: Any, t: torch.Tensor) -> tuple[Any, torch.Tensor]:
        """This rank's contiguous slice of a global batch (and of its timesteps t [B]).

        Under torch.distributed, let every rank draw the same GLOBAL batch and
        ``t = ant.sample_timesteps(B_global)`` (same seeds everywhere), then train on
        ``ant.shard(batch, t)``: the ranks' slices tile the cluster-sorted batch, so the
        stratification is that of one process drawing B_global, and the slice keeps its host
        cluster counts (no device read). Rank r of W gets rows [r B // W, (r + 1) B // W).
        Single process: the whole batch.
        """
        self._resolve_comm()
        check_batch(batch, t.shape[0])
        if not self.comm.active:
            return batch, t
        if self.sampler.per_rank:
            # this draw was offset per rank (the ranks' own batches before): its slices do not
            # tile one global batch; from the next draw on every rank draws the same again
            self.sampler.per_rank = False
            warnings.warn(
                "ant.shard after steps on timesteps that each rank drew for itself: this draw "
                "differs between the ranks (so its slices do not tile one stratified batch); "
                "the next ones are the same on every rank again, as shard needs. Use one of "
                "the two ways throughout",
                stacklevel=2,
            )
        B, W = t.shape[0], self.comm.world  # noqa: N806
        r = torch.distributed.get_rank(self.comm.group)
        a, b = r * B // W, (r + 1) * B // W
        return slice_batch(batch, a, b), self.sampler.local_slice(t, a, b)

    def _failed_update(self) -> bool:
        """True when the last weight recompute was non-finite and the host knows it without
        waiting: its weights are dropped, so this step recomputes them."""
        rec = self._recompute
        if rec is None:
            return False
        ok = rec.verdict
        # under torch.distributed only the verdict, which every rank sets at the same step, may
        # decide: whether a CUDA event is ready yet differs between ranks, and a rank that
        # recomputed (all-reducing J) while another took an off-step (DDP's all-reduce) would
        # mix collectives (a hang or a size mismatch)
        if ok is None and rec.flag is not None and not self.comm.active and rec.flag.ready():
            ok = rec.flag.read()
        if ok is None:  # not known yet: ask again at the next step
            return False
        self._recompute = None
        if not ok:
            self._w, self._w_present = rec.w, rec.w_present
        return not ok

    def _sorted(self, batch: Any, t: torch.Tensor):
        counts = self.sampler.counts_for(t)
        if counts is not None:
            return batch, t, counts
        if not self._warned_sync and t.device.type != "cpu":
            warnings.warn(
                "timesteps not drawn by ant.sample_timesteps: counting clusters costs one host "
                "sync per step",
                stacklevel=4,
            )
            self._warned_sync = True
        cid = self.clusters.cluster_of(t)
        ordered = (cid[1:] >= cid[:-1]).all().reshape(1).long()
        read = torch.cat([torch.bincount(cid, minlength=self.k), ordered]).cpu().numpy()
        counts = read[:-1]
        if read[-1]:  # already in cluster order: nothing to move
            return batch, t, counts
        if not self._warned_reorder:
            warnings.warn(
                "ant.backward sorts the batch by cluster (t was not drawn by "
                "ant.sample_timesteps): every per-sample tensor loss_fn uses must come through "
                "batch; one it takes from its closure (noise, text embeddings) keeps the old "
                "order and would be paired with other samples' timesteps",
                stacklevel=4,
            )
            self._warned_reorder = True
        order = torch.argsort(cid, stable=True)
        return take_batch(batch, order), t.index_select(0, order), counts

    def _weighted_step(self, loss_fn, batch, t, scaler, acc=None, accumulate=False) -> StepOutput:
        """One forward/backward of sum_i w_i T_i(L) with the cached weights (or w = 1); in an
        accumulation window added to the earlier micro-batches' gradients (under DDP without
        its all-reduce but at the last call), which the last call divides by their number."""
        buf = self._grad_buffer() if self.method.grad is not None else None
        if acc is not None and buf is not acc.buf:
            raise RuntimeError(WINDOW_BUFFER_CHANGED)
        no_sync = getattr(self._model, "no_sync", None) if accumulate else None
        with no_sync() if no_sync is not None else contextlib.nullcontext():
            per = _check_per_sample(loss_fn(batch, t), t.shape[0])
            sums, counts = self._cluster_sums(per, t)
            L_eff, L_global, present, N = self._globalise(sums, counts)  # noqa: N806
            loss_m = self.method.loss
            if self.method.is_vanilla:  # the plain batch mean, exactly as ant.reduce
                total, shown = self._batch_mean(per, L_global, N)
                weights = _count_shares(N)
            else:
                w = (
                    torch.ones(self.k, device=per.device)
                    if self._w is None
                    else self._off_weights(per.device)
                )
                if loss_m is None:
                    terms_model, terms_state = L_eff, L_global
                else:
                    terms_model = loss_m.transform(L_eff, present)
                    terms_state = loss_m.transform(L_global, present)
                # model gradient: sum_i w_i c_i dL_i; the method's own parameters get the
                # unweighted one
                total = (w * terms_model).sum() + ((1.0 - w) * terms_state).sum()
                # report what an on-step reports: the mean of the cluster losses without a loss
                # method
                shown = total.detach() if loss_m is not None else _present_mean(L_global, present)
            # gradient methods: row 0 of J, zeroed, takes the gradient (no new P-sized tensor,
            # and .grad is overwritten also before the first recompute after a resume)
            if buf is not None:
                buf.point_grads_at(0, zero=acc is None)
            self._probe(total)
            if (accumulate or acc is not None) and not self._window_leaves_checked:
                self._check_window_leaves(total, batch, t)
            self._scaled(total, scaler).backward()
        if accumulate or acc is not None:
            L_global = torch.where(present, L_global, 0.0)  # noqa: N806
            ok = torch.isfinite(L_global).all() & torch.isfinite(total.detach())
            if acc is None:
                acc = _Window(False, scaler if _scaling(scaler) else None, buf,
                              torch.zeros_like(L_global), torch.zeros_like(L_global),
                              torch.zeros_like(shown), None, ok, 0)  # fmt: skip
            acc.add(L_global, present, shown, ok,
                    weights if self.method.is_vanilla else None)  # fmt: skip
            if accumulate:
                self._window = acc
                return StepOutput(shown, L_global, torch.zeros_like(L_global), present, ok)
            # the mean over the micro-batches: of the gradients (one factor for all: each
            # cluster's share of the summed gradient is not separable), losses and reports
            n = acc.calls
            own = [] if loss_m is None else [p.grad for p in loss_m.parameters()]
            # a gradient method's model gradients are views of J's row 0
            model = [buf.J[0]] if buf is not None else [
                p.grad for p in unwrap(self._model).parameters()]  # fmt: skip
            grads = [g for g in (*model, *own) if g is not None]
            if grads:
                torch._foreach_div_(grads, float(n))
            present = acc.M > 0
            L_global = acc.L_sum / acc.M.clamp(min=1)  # noqa: N806
            shown = acc.shown / n
            if acc.shares is not None:  # vanilla: each cluster's mean share of the samples
                weights = acc.shares / n
        if self.method.is_vanilla:
            return self._record(
                shown, L_global, weights, present, None,
                None if acc is None else acc.finite & torch.isfinite(L_global).all(),
                grads_checked=False,
            )  # fmt: skip
        c = torch.ones_like(L_global) if loss_m is None else loss_m.slopes(L_global, present)
        finite = torch.isfinite(L_global).all() & torch.isfinite(total)
        if acc is not None:
            finite = finite & acc.finite
        own = [] if loss_m is None else [p.grad for p in loss_m.parameters() if p.grad is not None]
        for g in own:
            finite = finite & torch.isfinite(g).all()
        if buf is not None:  # the gradient is row 0 of J: check it in the same pass
            finite = finite & torch.isfinite(buf.J[0].sum())
            # as on the weight steps: zeroed, or NaN for a GradScaler to skip and back off
            _void_unless(finite, buf.J[0], scaler)
            if not _scaling(scaler):
                for g in own:  # the method's own parameters stay as they were
                    g.masked_fill_(~finite, 0.0)
        return self._record(
            # an absent cluster adds nothing this step: weight 0, as the on-steps report it
            shown, L_global, torch.where(present, w * c, 0.0), present, None, finite,
            grads_checked=buf is not None,
        )

    def _probe(self, loss: torch.Tensor) -> None:
        """The first loss after attach: check that it reaches the attached model (one walk of
        its autograd graph on the host; one-pass checks its own steps as they run)."""
        if not self._probed:
            if _reaches_model(loss, self._model) is False:  # the update would be zero, silently
                raise ValueError(MODEL_NOT_RUN)
            self._probed = True

    def _check_window_leaves(self, loss: torch.Tensor, batch: Any, t: torch.Tensor) -> None:
        """An accumulation window divides the gradients it knows (the model's and the method's
        own) by its number of micro-batches: a trainable tensor outside them would keep the
        sum. Refused, once (one walk of the graph on the host)."""
        loss_m = self.method.loss
        own = {id(p) for p in [*self._model.parameters(), *_tensors((batch, t)),
                               *(loss_m.parameters() if loss_m is not None else ())]}  # fmt: skip
        other = _other_leaves(loss, own)
        if other:
            raise ValueError(
                "ant.backward(accumulate=True): loss_fn's losses depend on trainable tensors "
                "outside the attached model (" + ", ".join(other[:5])
                + (f" and {len(other) - 5} more" if len(other) > 5 else "")
                + "), whose gradients the window could not average over its micro-batches. "
                "Make them parameters of the model, or accumulate with "
                "ant.reduce(...) / n and .backward()"
            )
        self._window_leaves_checked = True

    def _check_leaves(self, loss: torch.Tensor, *also: torch.Tensor) -> None:
        """The first J step's loss: refuse trainable tensors outside the attached model. J holds
        the model's per-cluster gradients alone, so such a tensor's gradient would be the plain
        sum over the clusters, whatever the method's weights (one walk of the graph). ``also``:
        leaves that are not parameters (what loss_fn was given, one-pass's anchor)."""
        if self._leaves_checked:
            return
        own = {id(p) for p in [*self._model.parameters(), *also]}
        other = _other_leaves(loss, own)
        if other:
            raise ValueError(
                "loss_fn's losses depend on trainable tensors outside the attached model ("
                + ", ".join(other[:5]) + (f" and {len(other) - 5} more" if len(other) > 5 else "")
                + "): the gradient method weights only the model's per-cluster gradients, so "
                "these would get the unweighted sum over the clusters. Make them parameters of "
                "the model (e.g. a submodule), or stop their gradient (requires_grad_(False) or "
                ".detach())"
            )
        self._leaves_checked = True

    def _batch_mean(self, per: torch.Tensor, L_global: torch.Tensor, N: torch.Tensor):  # noqa: N803
        """Vanilla's loss (attached) and its reported value: the mean over the GLOBAL batch.
        Under DDP the loss's value is that mean on every rank (a validation or logged loss; it
        was each rank's sum scaled by world / B_global, a different number per rank) and its
        gradient that of the rank's sum scaled so, so that DDP's average of the ranks'
        gradients is the global-batch gradient also for unequal local batches."""
        if not self.comm.active:
            total = per.mean()
            return total, total.detach()
        n = N.sum().clamp(min=1)
        scaled = per.sum() * (self.comm.world / n).to(per.dtype)
        shown = (L_global * N).sum() / n  # absent clusters: L 0, N 0
        return shown.to(per.dtype) + (scaled - scaled.detach()), shown

    def _scaled(self, loss: torch.Tensor, scaler) -> torch.Tensor:
        return scaler.scale(loss) if _scaling(scaler) else loss

    def _cached_w(self, device: torch.device) -> torch.Tensor:
        if self._w.device != device:  # once, after a resume: checkpoints load on the CPU
            self._w = self._w.to(device)
            self._w_present = self._w_present.to(device)
        return self._w

    def _equal_weights(self, present: torch.Tensor) -> torch.Tensor:
        """The equal-weight fallback: after a loss method 1 per term (its terms carry the 1/k:
        the loss method's own update, whatever the gradient method's reduction, which is "mean"
        for Nash-MTL there), alone in the gradient method's scale (mean or sum)."""
        w = present.float()
        if self.method.loss is not None or self.method.grad.reduction == "sum":
            return w
        return w / present.sum().clamp(min=1)

    def _off_weights(self, device: torch.device) -> torch.Tensor:
        """Cached weights; clusters absent at the last update get the mean present weight."""
        w, seen = self._cached_w(device), self._w_present
        mean = (w * seen).sum() / seen.sum().clamp(min=1)
        return torch.where(seen, w, mean)

    def _gradient_step(
        self, loss_fn, batch, t, counts: np.ndarray, scaler, acc=None, accumulate=False
    ) -> StepOutput:
        buf = self._grad_buffer()
        self._check_device(buf.J.device)
        if acc is not None and buf is not acc.buf:
            raise RuntimeError(WINDOW_BUFFER_CHANGED)
        # a later micro-batch of an accumulation window adds to J's rows
        sums, N = self._fill_J(buf, loss_fn, batch, t, counts, scaler, keep=acc is not None)  # noqa: N806
        L_global = self.comm.sum_(sums) / N.clamp(min=1)  # noqa: N806
        present = N > 0
        mean_of = None  # [k] 1 / micro-batches per cluster: J's rows are sums of their means
        if accumulate or acc is not None:
            L_global = torch.where(present, L_global, 0.0)  # noqa: N806
            ok = torch.isfinite(L_global).all()
            if acc is None:
                acc = _Window(True, scaler if _scaling(scaler) else None, buf,
                              torch.zeros_like(L_global), torch.zeros_like(L_global),
                              torch.zeros_like(L_global[0]), None, ok, 0)  # fmt: skip
            # what a step on this micro-batch alone reports: the loss method's total, else the
            # mean of the present clusters
            loss_m = self.method.loss
            shown = (loss_m.transform(L_global, present).sum().detach() if loss_m is not None
                     else _present_mean(L_global, present))  # fmt: skip
            acc.add(L_global, present, shown, ok)
            if accumulate:  # J is all-reduced once, at the window's last call
                self._window = acc
                return StepOutput(shown, L_global, torch.zeros_like(L_global), present, ok)
            present = acc.M > 0
            mean_of = 1.0 / acc.M.clamp(min=1)
            L_global = acc.L_sum * mean_of  # noqa: N806
        self.comm.sum_(buf.base)  # all-reduce needs a contiguous tensor; padding stays 0
        J = buf.J  # noqa: N806
        from ant_kernels import combine, gram

        # the Gram, the weights and the combine in their own precision, also when the caller's
        # autocast wraps ant.backward (it made the Gram fp16 / bf16: an fp16 Gram overflows
        # at a GradScaler's scale and rounds a small cluster's norm to 0)
        with torch.autocast(J.device.type, enabled=False):
            G, finite = gram(J)  # noqa: N806
            if _scaling(scaler):
                inv = 1.0 / scaler._scale.to(G.device).float().reshape(())  # device tensor: no sync
                G = G * inv * inv  # noqa: N806
            # (a window's L_global carries a non-finite micro-batch loss)
            finite = finite & torch.isfinite(L_global).all()
            c, finite, total = self._loss_stage(L_global, present, scaler, finite)
            # the rows' scale: the mean of a window's micro-batch rows (reported as weights of
            # the mean cluster gradients, like a step on one batch)
            cj = c if mean_of is None else c * mean_of
            Gc = G * (cj[:, None] * cj[None, :])  # noqa: N806
            grad = self.method.grad
            if grad.needs == "grads":
                J.mul_(cj[:, None].to(J.dtype))
                grad.combine_grads(J, present, finite, out=J[0])
                # the scale of each raw cluster gradient before the masks, as the weights of a
                # Gram method report it: c, over the present clusters with a "mean" reduction
                kp = n_present(present, c.dtype) if grad.reduction == "mean" else 1.0
                w_eff = torch.where(present, c / kp, 0.0)
            else:
                w = grad.weights(torch.where(finite, Gc, torch.zeros_like(Gc)), present, finite)
                if grad.update_every > 1:  # off-steps reuse these weights: redo them if not finite
                    # CPU: the verdict comes from ant.step's read (None under a fused optimiser,
                    # which skips on the device: the recompute then waits for the next cycle)
                    flag = _HostFlag(finite, self.step_count) if finite.is_cuda else None
                    self._recompute = _Recompute(flag, self._w, self._w_present)
                # a solver that ended without a solution on a finite Gram (NaN weights: Nash-MTL's
                # Newton steps did not converge) leaves the weights as they were, and this step
                # uses them as an off-step of update_every would (equal weights before any):
                # counted, and reported by stats(); no host read here
                solved = torch.isfinite(w).all()
                use = finite & solved
                if self._w is not None:
                    kept, fallback = self._cached_w(w.device), self._off_weights(w.device)
                else:
                    kept = fallback = self._equal_weights(present)
                self._w = torch.where(use, w, kept)
                seen = present if self._w_present is None else self._w_present.to(present.device)
                self._w_present = torch.where(use, present, seen)
                self.telemetry.count_unsolved(finite & ~solved)
                w_eff = torch.where(use, w, fallback) * c
                w_J = w_eff if mean_of is None else w_eff * mean_of  # noqa: N806
                combine(w_J.to(torch.float32), J, out=J[0])
            # without a scaler a non-finite update is zeroed; with one it is made NaN, so that
            # scaler.step skips it and backs off (a NaN loss can leave finite gradients)
        _void_unless(finite, J[0], scaler)
        buf.point_grads_at(0, zero=False)
        out = self._record(total, L_global, w_eff, present, Gc, finite)
        if self._recompute is not None and self._recompute.out is None:
            self._recompute.out = out
        return out

    def _fill_J(self, buf: GradBuffer, loss_fn, batch, t, counts, scaler, keep=False):  # noqa: N802
        """Rows of J: gradients of the raw cluster losses local_sum_i / N_i (``keep``: added to
        the rows' contents, a later micro-batch of an accumulation window)."""
        dev = buf.J.device
        N = to_device(torch.as_tensor(counts, dtype=torch.float32), dev)  # noqa: N806
        if self.comm.active:
            N = self.comm.sum_(N)  # noqa: N806
            divisors = [N[i] for i in range(self.k)]
        else:
            divisors = [max(int(c), 1) for c in counts]
        sums = torch.zeros(self.k, device=dev, dtype=torch.float32)
        bounds = np.concatenate([[0], np.cumsum(counts)])
        no_sync = getattr(self._model, "no_sync", None)
        if _scaling(scaler) and getattr(scaler, "_scale", None) is None:
            # a rank whose slice is empty scales no loss on its first step: the scale the Gram
            # is unscaled by must exist all the same (scale() creates it on first use)
            scaler.scale(torch.zeros((), device=dev))
        if self.mode in ("auto", "onepass"):
            got = self._fill_J_onepass(buf, loss_fn, batch, t, counts, N, scaler, no_sync, keep)
            if got is not None:
                return got, N
        if self.mode == "retain_graph":
            # DDP decides in the forward whether its backward all-reduces: not here (J is
            # reduced once, after all clusters; a rank with no live cluster runs no backward)
            if no_sync is not None:  # DDP: its buffers (BatchNorm statistics) still broadcast at
                # this forward; under no_sync the last one turned that off for the next step.
                # Every rank runs this one forward per step, so the broadcasts pair up.
                getattr(self._model, "_orig_mod", self._model).require_forward_param_sync = True
            with no_sync() if no_sync is not None else contextlib.nullcontext():
                per = _check_per_sample(loss_fn(batch, t), t.shape[0])
            if not per.requires_grad:
                raise ValueError(LOSS_WITHOUT_GRAD)
            all_per = per
        live = [i for i in range(self.k) if counts[i] > 0]
        if not live and no_sync is not None and self.comm.active and self.mode != "retain_graph":
            # DDP rebuilds its buckets at the first forward after its first synced backward (an
            # off-step of update_every) with a collective every rank must join: a rank without
            # samples runs one forward of its empty slice, as the others run theirs
            with no_sync():
                loss_fn(batch, t)
        inputs = _tensors((batch, t))  # what loss_fn gets may require grad: not a parameter
        for i in range(self.k):
            if counts[i] == 0:
                if not keep:
                    buf.J[i].zero_()
                continue
            buf.point_grads_at(i, zero=not keep)
            # DDP must not all-reduce these: J is reduced once, after all clusters
            with no_sync() if no_sync is not None else contextlib.nullcontext():
                a, b = int(bounds[i]), int(bounds[i + 1])
                if self.mode == "retain_graph":  # the batch is in cluster order
                    per = all_per[a:b]
                else:
                    sub = (slice_batch(batch, a, b), t[a:b])
                    inputs = _tensors((batch, t, sub))
                    per = _check_per_sample(loss_fn(*sub), b - a, sub_batch=True)
                    if not per.requires_grad:
                        raise ValueError(LOSS_WITHOUT_GRAD)
                # float32 sums of half-precision losses; a float64 loss keeps its precision
                # (a float32 sum gave its backward a float32 1 / N: 3e-8 relative error in J)
                s_i = per.sum(dtype=torch.float64 if per.dtype == torch.float64 else torch.float32)
                loss_i = s_i / divisors[i]
                self._probe(loss_i)
                self._check_leaves(loss_i, *inputs)
                if _scaling(scaler):
                    loss_i = scaler.scale(loss_i)
                loss_i.backward(retain_graph=self.mode == "retain_graph" and i != live[-1])
            sums[i] = s_i.detach()
        return sums, N

    def _fill_J_onepass(self, buf, loss_fn, batch, t, counts, N, scaler, no_sync, keep):  # noqa: N802, N803
        """Cluster sums after one forward + backward wrote J (None: micro serves the model)."""
        if self.mode == "onepass" and self._onepass is None:  # mode set after attach
            self._onepass = OnePass(self._model)
        if self._onepass is None:
            return None
        inputs = _tensors((batch, t))
        try:
            if hasattr(loss_fn, "_torchdynamo_orig_callable") or hasattr(loss_fn, "_orig_mod"):
                raise NotServable(  # dynamo would skip the function and run it eagerly
                    "mode='onepass' with a torch.compile'd loss_fn: the per-step layer hooks "
                    "break its graph, so dynamo runs it uncompiled. Pass the plain loss_fn and "
                    "the compiled model to ANT(model=...) / attach (auto then picks 'micro')"
                )
            with no_sync() if no_sync is not None else contextlib.nullcontext():
                return self._onepass.fill(
                    buf, lambda: _check_per_sample(loss_fn(batch, t), t.shape[0]),
                    self.clusters.cluster_of(t), counts, N, scaler if _scaling(scaler) else None,
                    probe=None if self._leaves_checked else (
                        lambda loss, *own: self._check_leaves(loss, *own, *inputs)),
                    seeds=inputs, keep=keep,
                )  # fmt: skip
        except NotServable as e:  # seen only in the forward, e.g. a layer off the batch dim
            loss = getattr(e, "loss", None)
            if loss is not None and _reaches_model(loss, self._model) is False:
                raise ValueError(MODEL_NOT_RUN) from e  # a user error: one-pass stays
            if self.mode == "onepass":
                raise
            self._onepass = None
            if keep:  # J's rows may hold part of this micro-batch: the window cannot go on
                self._release_window()  # (its message says so: no note)
                raise RuntimeError(
                    f"{e}: mode='auto' uses 'micro' from now on, but this accumulation window's "
                    "earlier micro-batches went through one-pass and this one's gradients are "
                    "incomplete, so the window is dropped: start the optimiser step again from "
                    "its first micro-batch (or build ANT with mode='micro')"
                ) from e
            warnings.warn(f"{e}; mode='auto' uses 'micro' from now on", stacklevel=4)
            return None

    def _loss_stage(self, L_global, present, scaler, finite):  # noqa: N803
        """c = dT/dL [k], the step's finite flag, which now also covers c, the loss method's
        terms and its own parameter gradients (e.g. UW's s; written where the step is finite),
        and the reported total (the loss method's, else the mean of the present clusters)."""
        loss_m = self.method.loss
        if loss_m is None:
            return torch.ones_like(L_global), finite, _present_mean(L_global, present)
        params = [p for p in loss_m.parameters() if p.requires_grad]
        c, grads = loss_m.grads(L_global, present)
        # a slope that is inf/NaN (exp(-s) overflowing) would carry into every update, and a
        # term that is not (FAMO's log of a loss below its min_loss) with finite slopes would
        # reach the method's next observation
        total = loss_m.transform(L_global, present).sum().detach()
        finite = finite & torch.isfinite(c).all() & torch.isfinite(total)
        for g in grads:
            if g is not None:
                finite = finite & torch.isfinite(g).all()
        scale = scaler._scale.reshape(()) if _scaling(scaler) else None
        for p, g in zip(params, grads):
            if g is None:
                continue
            g = torch.where(finite, g, 0.0)  # a non-finite step leaves the method untouched
            g = g * scale.to(g.device) if scale is not None else g  # the scaler's own GPU
            p.grad = g if p.grad is None else p.grad + g
        return c, finite, total

    def _grad_buffer(self) -> GradBuffer:
        model = self._model
        inner = unwrap(model)
        if self._buffer is None or not self._buffer.matches(inner.parameters()):
            self._buffer = GradBuffer(inner.parameters(), self.k)
            if self._onepass is not None or self.mode == "onepass":
                # parameters unfrozen, added or converted since the plan was made: a new one
                self._onepass = None
                try:
                    self._onepass = OnePass(model)
                except NotServable:
                    if self.mode == "onepass":
                        raise
                    warnings.warn(
                        "the model's trainable parameters changed and mode='onepass' cannot "
                        "serve them all; mode='auto' uses 'micro' from now on", stacklevel=3
                    )
        return self._buffer

    def _record(
        self, total, L_global, w, present, G, finite=None, grads_checked=True  # noqa: N803
    ) -> StepOutput:
        """Telemetry and StepOutput of a step; ``grads_checked``: ``finite`` covers the
        gradients too (gradient methods), else ``step`` checks them and ``observe`` waits."""
        if L_global.dtype == torch.float64:  # a float64 loss's cluster means: reported in float32
            L_global, w = L_global.float(), w.float()  # noqa: N806
        if finite is None:  # 0 * x is 0 for finite x and NaN for inf/NaN (one op per input)
            finite = (L_global * 0).sum() + total * 0 == 0
        self.telemetry.update(L_global, w, present, finite, G)
        out = StepOutput(total, L_global, w, present, finite)
        self.last = out
        self._unstepped = True
        # every micro-batch's own flag since the last ant.step (one op from the second on)
        self._finite_since = finite if self._records == 0 else self._finite_since & finite
        self._records += 1
        self._grads_unchecked = not grads_checked
        if self.method.loss is not None and self.method.loss.observes:
            self._pending_observe.append((L_global, present, finite))
            if grads_checked:
                self._flush_observe()
        return out

    def _flush_observe(self, verdict: torch.Tensor | None = None) -> None:
        """The loss method's observe for the steps that wait for it, each masked by its finite
        flag. With ``verdict`` (ant.step's check of all their gradients) they are the micro-
        batches of ONE optimiser step: observed once, each cluster's loss the mean over the
        micro-batches it was present in (FAMO took an Adam step and DWA counted a step per
        micro-batch)."""
        pending, self._pending_observe = self._pending_observe, []
        if verdict is not None and len(pending) > 1:
            dev = pending[-1][0].device
            use = [(p & (f & verdict).to(p.device)).to(dev) for _, p, f in pending]
            num = sum(torch.where(u, L.to(dev), 0.0) for (L, _, _), u in zip(pending, use))
            den = sum(u.to(num.dtype) for u in use)
            present = den > 0
            self.method.loss.observe(torch.where(present, num / den.clamp(min=1), 0.0), present)
            return
        for L, present, finite in pending:  # noqa: N806
            ok = finite if verdict is None else finite & verdict
            self.method.loss.observe(torch.where(ok, L, 0.0), present & ok)

    # -- optimiser step, state, stats ------------------------------------------------------------
    def step(
        self,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler | None = None,
        skip_nonfinite: bool = True,
        check_grads: bool = True,
    ) -> bool:
        """optimizer.step() unless the last engine step was non-finite.

        An optimiser that can skip on the device (torch's Adam, AdamW, SGD, ... built with
        ``fused=True``) skips there when no scaler is given: the non-finite flag goes in as its
        ``found_inf``, so parameters, moments and step counts stay as they were, and nothing is
        read on the host. The warning then comes from a later ``step``/``stats`` call, once the
        flag has reached the host (call ``stats()`` after the last step to hear of a skip there),
        and this returns True (the step was issued); the gradients stay as computed until the
        next ``zero_grad``. Otherwise the check reads one flag from the device (a host sync after
        the step's work is queued, like GradScaler) and returns False for a skipped step. With
        ``skip_nonfinite=False`` nothing is read: the engine has already zeroed a non-finite
        gradient method update (with a GradScaler: made it NaN, so that ``scaler.step`` skips
        it and backs off), and loss-space steps go through as computed. A non-finite
        weight recompute (``update_every`` > 1) seen in this read is redone by the next
        ``backward``.

        After ``ant.reduce`` the engine has seen the losses but not the gradients, which can be
        inf/NaN for finite losses (an fp16 overflow in the backward): the flag then also covers
        the optimiser's gradients (GradScaler's multi-tensor check, one pass), and a
        loss method's ``observe`` (DWA, FAMO, RLW) waits for that verdict. Without ``ant.step``
        it runs at the next ``reduce``/``backward``/``state_dict`` on the losses' flag alone.
        ``check_grads=False`` leaves the gradients unchecked (the pass costs 0.2-0.5 ms per
        step on a 2-core CPU for the benchmark's small models, little on a GPU).

        An optimiser that says it is accumulating (accelerate's, inside
        ``accelerator.accumulate`` on a micro-step that does not sync:
        ``optimizer.gradient_state.sync_gradients`` False) makes this a no-op after
        ``ant.reduce`` and after ``ant.backward(..., accumulate=True)``, whose micro-batches
        then count as one step at the syncing call; after an ``ant.backward`` without
        ``accumulate=True`` it is refused, as the next ``ant.backward`` would replace its
        update. While an accumulation window is open (outside such a micro-step) it raises.
        """
        syncing = getattr(getattr(optimizer, "gradient_state", None), "sync_gradients", True)
        if self._window is not None:
            if syncing is False:  # accelerate's micro-step: the window's last call comes later
                self._uses_step = True
                return True
            raise RuntimeError(_window_open("ant.step"))
        if syncing is False:
            # (_backward_scaler is False after ant.reduce, None or the scaler after ant.backward)
            if self.needs_gradients or self._backward_scaler is not False:
                raise ValueError(
                    f"ant.step on an accumulating micro-step (the optimiser's gradient_state "
                    f"says sync_gradients=False, e.g. inside accelerator.accumulate) after "
                    f"ant.backward (method {self.method_name!r}) without accumulate=True: it "
                    "formed an update, which the next ant.backward would replace. Pass "
                    "accumulate=not accelerator.sync_gradients to ant.backward"
                )
            self._uses_step = True  # (the micro-batches wait for the verdict of that step)
            return True  # the syncing micro-step steps for all of them
        if not self._unstepped:
            raise RuntimeError(
                "ant.step: no ant.reduce or ant.backward since the last ant.step (or since "
                "the engine was built or its state loaded): the optimiser would apply stale or "
                "missing gradients. Call "
                "ant.reduce(per_sample_loss, t).backward() or ant.backward(loss_fn, batch, t) "
                "before each ant.step (a loss the engine did not see steps with optimizer.step())"
            )
        bw = self._backward_scaler
        if bw is not False and bw is not (scaler if _scaling(scaler) else None):
            said, got = _scalers_named(bw, scaler if _scaling(scaler) else None)
            raise ValueError(
                f"ant.backward ran with {said} but ant.step got {got}: pass the same scaler= to "
                "both, or to neither (the update would be applied still scaled, or divided by a "
                "scale it never had)"
            )
        self._check_optimizer(optimizer)
        self._unstepped = False
        records, self._records = self._records, 0
        self._report_skipped()
        self._uses_step = True
        verdict = None
        if self._grads_unchecked and check_grads and (
            skip_nonfinite or self._pending_observe
        ):  # fmt: skip
            # a loss-space step: finite losses can still give inf/NaN gradients (fp16 overflow)
            ok = self.last.finite if records < 2 else self._finite_since
            for found in _grads_nonfinite(optimizer, self._check_buffers):
                ok = ok & (found == 0).to(ok.device, non_blocking=True)
            self.telemetry.count_nonfinite(ok, records)
            last = self.last  # a new record (dataclasses.replace costs 25 us in a CPU step)
            self.last = StepOutput(last.loss, last.cluster_losses, last.weights, last.present, ok)
            verdict = ok
        elif skip_nonfinite and records > 1 and self._grads_unchecked:
            # unchecked gradients (check_grads=False): every micro-batch's losses decide for
            # the step (one NaN one makes its gradients NaN), and a skip voids them all
            ok = self._finite_since
            self.telemetry.count_nonfinite(ok, records)
            last = self.last
            self.last = StepOutput(last.loss, last.cluster_losses, last.weights, last.present, ok)
            verdict = ok
        self._grads_unchecked = False
        self.telemetry.close()
        self._flush_observe(verdict)
        hold = self._hold_absent(optimizer)
        # a disabled GradScaler (enabled=False: the usual fp16 switch turned off) is no scaler
        scaling = _scaling(scaler)
        if skip_nonfinite and self.last is not None and not scaling and _skips_on_device(
            optimizer
        ):  # fmt: skip
            bad = (~self.last.finite).to(torch.float32)
            optimizer.grad_scale, optimizer.found_inf = None, bad
            try:
                optimizer.step()
            finally:
                del optimizer.grad_scale, optimizer.found_inf
            explain = (self.last.cluster_losses.detach(), self.last.present)
            flag = _HostFlag(bad, self.telemetry.steps, explain if self._explains() else ())
            self._pending_flags.append(flag)
            _restore_absent(optimizer, hold)
            return True
        ok = not skip_nonfinite or self.last is None or bool(self.last.finite)
        rec = self._recompute
        if skip_nonfinite and rec is not None and rec.out is self.last:
            rec.verdict = ok  # the read above: backward redoes a non-finite recompute
        if not ok:
            self._warn_skip(
                f"step {self.telemetry.steps}: non-finite cluster losses or gradients; the "
                f"optimiser step was skipped and the method state left unchanged"
                f"{self._skip_detail(self.last.cluster_losses, self.last.present)}",
                stacklevel=3,
            )
            optimizer.zero_grad(set_to_none=True)
            if _scaling(scaler):
                _back_off(scaler)
            return False
        if scaling:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        _restore_absent(optimizer, hold)
        return True

    def _check_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Refuse an optimiser that lacks the method's own trainable parameters (UW's s): they
        would never move, and UW would silently be a fixed weighting. Once per optimiser and
        parameter-group count (a host check, no device read). An optimiser that holds none of
        the attached model's trainable parameters is refused too (another model's optimiser:
        the model would never move); one that holds some of them may be one of several."""
        if not isinstance(getattr(optimizer, "param_groups", None), list) or not callable(
            getattr(optimizer, "step", None)
        ):  # fmt: skip
            raise TypeError(
                f"ant.step needs the optimizer (a torch.optim.Optimizer, or an object with "
                f"param_groups and step()), got {type(optimizer).__name__}"
            )
        loss_m = self.method.loss
        key = (id(optimizer), len(optimizer.param_groups))
        if key == self._optimizer_checked:
            return
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        own = [p for p in loss_m.parameters() if p.requires_grad] if loss_m is not None else []
        if self._model is not None and not (own and all(id(p) in held for p in own)):
            # (an optimiser of the method's own parameters alone, beside the model's: accepted)
            mine = [p for p in self._model.parameters() if p.requires_grad]
            if mine and not any(id(p) in held for p in mine):
                raise ValueError(
                    "the optimizer holds none of the attached model's trainable parameters (an "
                    "optimizer of another model, or of ant.param_groups() alone?): the model "
                    "would never be updated; build it with "
                    "[{'params': list(model.parameters())}, *ant.param_groups()]"
                )
        if any(id(p) not in held for p in own):
            raise ValueError(
                f"the optimizer does not hold {self.method_name}'s own parameters (e.g. UW's "
                "log-variances), which would then never be trained: build it with "
                "[{'params': list(model.parameters())}, *ant.param_groups()]"
            )
        self._optimizer_checked = key

    def _hold_absent(self, optimizer: torch.optim.Optimizer):
        """The loss method's per-cluster parameters (UW's s [k]) and their optimiser state,
        kept when a cluster may be absent this step: an Adam step would still move an absent
        cluster's s_i (its gradient is 0, its moments are not) and decay its moments. Nothing
        when the host counts show every cluster present (sampled batches, B >= k)."""
        loss_m = self.method.loss
        if not self._maybe_absent or loss_m is None or self.last is None:
            return None
        held = []
        for p in loss_m.parameters():
            if p.shape == (self.k,):
                state = optimizer.state.get(p, {})
                kept = {n: v.clone() for n, v in state.items() if torch.is_tensor(v)
                        and v.shape == p.shape}  # fmt: skip
                held.append((p, p.detach().clone(), kept))
        return (self.last.present, held) if held else None

    def _warn_skip(self, message: str, stacklevel: int) -> None:
        """A skipped step's warning: each of the first 10, then the 16th, 32nd, 64th, ... (a
        diverging run skipped every step and printed a warning for each); stats() counts them
        all (``nonfinite_steps``)."""
        self._skips_said += 1
        n = self._skips_said
        if n <= 10 or n & (n - 1) == 0:
            more = (f" [skipped step {n} of this process; from the 10th on only the 16th, 32nd, "
                    "64th, ... are reported here, stats()['nonfinite_steps'] counts each]"
                    if n >= 10 else "")  # fmt: skip
            _warn_unique(message + more, stacklevel)

    def _report_skipped(self, wait: bool = False) -> None:
        """Warn for the device-side skips whose flags have reached the host (all: ``wait``)."""
        pending = []
        for flag in self._pending_flags:
            if wait or flag.ready():
                if flag.read(wait):
                    self._warn_skip(
                        f"step {flag.step}: non-finite cluster losses or gradients; the "
                        "optimiser skipped the step on the device and the method state was left "
                        f"unchanged{self._skip_detail(*flag.extra)}",
                        stacklevel=4,
                    )
            else:
                pending.append(flag)
        self._pending_flags = pending

    def _explains(self) -> bool:
        """Whether the loss method can say why a step was not finite (FAMO)."""
        loss_m = self.method.loss
        return loss_m is not None and type(loss_m).nonfinite_cause is not (
            mtl.base.LossMethod.nonfinite_cause
        )  # fmt: skip

    def _skip_detail(
        self, L: torch.Tensor | None = None, present: torch.Tensor | None = None  # noqa: N803
    ) -> str:
        """The loss method's reason for a skipped step, if it has one. Called once the host has
        the step's verdict: on the device-side skip with the losses copied beside the flag (no
        wait), on the host-read skip after that read (the losses are computed by then)."""
        if L is None or present is None or not self._explains():
            return ""
        L = L.detach().cpu()  # noqa: N806
        cause = self.method.loss.nonfinite_cause(L, present.cpu())
        if cause is None or not bool(cause[0].any()):
            return ""
        values = ", ".join(f"{v:.4g}" for v in L[cause[0]].tolist())
        return f" ({cause[1].replace('{values}', values)})"

    def stats(self) -> dict[str, Any]:
        """Telemetry for logging: last and running per-cluster losses, weights, cosines,
        conflict rates; plus the clusters. Copies to the host: call it outside the step."""
        self._report_skipped(wait=True)
        out = self.telemetry.snapshot()
        unsolved = out.get("unsolved_weight_steps", 0)
        if unsolved > self._unsolved_reported:
            _warn_unique(
                f"{unsolved - self._unsolved_reported} weight solve(s) since the last report "
                f"ended without a solution ({self.method_name}): those steps reused the last "
                "weights. Nash-MTL's Newton steps fall short where cluster gradients nearly "
                "cancel: raise its iters (method_kwargs={'iters': 80}, --ant.method_kwargs "
                "'{iters: 80}' in the CLI)",
                stacklevel=2,
            )
        self._unsolved_reported = unsolved
        out["bounds"] = list(self.clusters.bounds)
        out["method"] = self.method_name
        return out

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue bit for bit: the clusters, the method's
        state (UW's log-variances, Nash's last weights, ...), the sampler's streams, the step
        count and the telemetry, as copies (the weights and telemetry on the CPU, the method's
        tensors on their device); save it with ``torch.save``."""
        if self._window is not None:  # its gradients are not state: they would be lost
            raise RuntimeError(_window_open("ant.state_dict"))
        self._flush_observe()
        loss_m, grad = self.method.loss, self.method.grad
        rec, redo = self._recompute, False
        if rec is not None:  # a non-finite weight recompute that the next backward redoes, as
            # ant.step's read decided it (a GPU flag still on its way is timing, which an
            # unbroken run does not fix either: the resumed one takes the off-steps)
            redo = rec.verdict is False
        return {
            "redo_weights": redo,
            # the trainer calls ant.step: its ant.reduce micro-batches wait for the step's
            # verdict and are one observation (a resumed engine must not observe them singly)
            "uses_step": self._uses_step,
            "clusters": self.clusters.to_dict(),
            "method": self.method_name,
            "step": self.step_count,
            "w": None if self._w is None else self._w.detach().cpu(),
            "w_present": None if self._w_present is None else self._w_present.cpu(),
            # copies: a state kept in memory (a rollback point) must not follow later training
            # (the methods update their tensors in place)
            "loss_method": None if loss_m is None else copy.deepcopy(loss_m.state_dict()),
            "grad_method": None if grad is None else copy.deepcopy(grad.state_dict()),
            "sampler": self.sampler.state_dict(),
            "telemetry": self.telemetry.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a ``state_dict()``: the engine must be built with the same clusters and
        method (checked). An open accumulation window is dropped."""
        missing = [key for key in ("clusters", "method", "step", "w", "sampler", "telemetry")
                   if not isinstance(state, dict) or key not in state]  # fmt: skip
        if missing:
            raise ValueError(
                f"not an ANT state (missing {', '.join(missing)}): pass what ant.state_dict() "
                "returned"
            )
        theirs = Clusters.from_dict(state["clusters"])
        if theirs.bounds != self.clusters.bounds:
            raise ValueError(
                f"checkpoint clusters {list(theirs.bounds)} differ from this engine's "
                f"{list(self.clusters.bounds)}; build ANT with the same schedule, k and clustering"
            )
        if state["method"] != self.method_name:
            raise ValueError(
                f"checkpoint was trained with method {state['method']!r}, this engine uses "
                f"{self.method_name!r}"
            )
        for key in ("sampler", "telemetry"):
            if not isinstance(state[key], dict):
                raise ValueError(
                    f"the state's {key} must be a dict, got {_describe(state[key])}: the "
                    "checkpoint is damaged or not of this engine"
                )
        mode = state["sampler"].get("mode")
        if mode != self.sampler.mode:  # checked before anything is assigned
            raise ValueError(
                f"checkpoint sampled timesteps with mode {mode!r}, this engine uses "
                f"{self.sampler.mode!r}; construct ANT(..., sampling={mode!r})"
            )
        window, self._window = self._window, None  # dropped by a load, kept by a failed one
        backup = copy.deepcopy(self.state_dict())  # a load that fails half-way is undone
        # (and the step in progress, which _assign_state resets, kept: a backward before the
        # failed load still goes to the next ant.step)
        step = (self._grads_unchecked, self._unstepped, self._records, self._recompute)
        try:
            self._assign_state(state)
        except BaseException as exc:
            self._assign_state(backup)
            self._window = window
            self._grads_unchecked, self._unstepped, self._records, self._recompute = step
            if isinstance(exc, (KeyError, TypeError, AttributeError)):  # a part's own lookup
                raise ValueError(
                    f"the ANT state is damaged or not of this engine ({type(exc).__name__}: "
                    f"{exc}); load what ant.state_dict() of an engine built alike returned"
                ) from exc
            raise

    def _assign_state(self, state: dict[str, Any]) -> None:
        self._pending_observe, self._grads_unchecked = [], False  # steps before the load
        self._unstepped, self._records = False, 0
        self._recompute = None
        self._window = None  # micro-batches before the load
        self._uses_step = bool(state.get("uses_step", False))
        self.step_count = check_int("the state's step", state["step"], minimum=0)
        self._w = state["w"]
        self._w_present = state.get("w_present")
        for name, v, kind in (("w", self._w, "float"), ("w_present", self._w_present, "bool")):
            if v is not None and not (
                isinstance(v, torch.Tensor) and v.shape == (self.k,)
                and (v.dtype == torch.bool if kind == "bool" else v.is_floating_point())
            ):  # fmt: skip
                raise ValueError(
                    f"the state's {name} must be a {kind} tensor [k={self.k}] or None, got "
                    f"{_describe(v)}: the checkpoint is damaged or not of this engine"
                )
        if self._w is not None and self._w_present is None:
            self._w_present = torch.ones(self.k, dtype=torch.bool, device=self._w.device)
        if state.get("redo_weights"):  # saved after a non-finite recompute: the next step redoes it
            self._recompute = _Recompute(None, self._w, self._w_present, verdict=False)
        if self.method.loss is not None:
            self.method.loss.load_state_dict(state["loss_method"])
        if self.method.grad is not None:
            self.method.grad.load_state_dict(state["grad_method"])
            if getattr(self.method.grad, "stale_weights", False):  # on another scale: redone at
                self.method.grad.stale_weights = False  # the next step, as after a failed one
                self._recompute = _Recompute(None, self._w, self._w_present, verdict=False)
        self.sampler.load_state_dict(state["sampler"])
        self.telemetry.load_state_dict(state["telemetry"])
        # reported before the checkpoint; counted without folding (see Telemetry.state_dict)
        self._unsolved_reported = self.telemetry.unsolved(fold=False)

    def _auto_choice(self) -> str:
        if not self.needs_gradients:  # ant.reduce: one forward of the whole batch, no J
            return " (unused: a loss-space method)"
        if self.mode != "auto":
            return ""
        return " (onepass)" if self._onepass is not None else " (micro)"

    def __repr__(self) -> str:
        return (
            f"ANT(method={self.method_name!r}, sampling={self.sampler.mode!r}, "
            f"mode={self.mode!r}{self._auto_choice()}, {self.clusters!r})"
        )


REDUCE_LOSS_WITHOUT_GRAD = (
    "ant.reduce: per_sample_loss does not require grad (detached, or computed under "
    "torch.no_grad) while grad is enabled: the model would get no update (only the method's "
    "own parameters, e.g. UW's, would move). Pass the losses with their graph; under "
    "torch.no_grad (evaluation) reduce accepts them"
)


WINDOW_BUFFER_CHANGED = (
    "ant.backward: the model's trainable parameters changed (frozen, unfrozen, added or "
    "converted) inside an accumulation window, whose earlier micro-batches' gradients were "
    "kept for the old ones: change them between optimiser steps"
)


def _window_open(what: str) -> str:
    return (
        f"{what} while an accumulation window is open (the last ant.backward had "
        "accumulate=True): its micro-batches' gradients wait for the update. Finish the window "
        "with ant.backward(..., accumulate=False) on its last micro-batch first"
    )


REDUCE_MODEL_NOT_RUN = (
    "ant.reduce: per_sample_loss reaches none of the attached model's trainable parameters, so "
    "the update would be zero: pass the losses of the model given to ant.attach (or "
    "ANT(..., model=)), or attach the model they come from"
)


def _restore_absent(optimizer: torch.optim.Optimizer, hold) -> None:
    """Put back what ``ANT._hold_absent`` kept for the clusters absent this step (device-side
    selects: no host read). The optimiser's step count, one per parameter, still advances."""
    if hold is None:
        return
    present, held = hold
    with torch.no_grad():
        for p, old, kept in held:
            # absent in the last step and no gradient: a cluster absent in an earlier
            # accumulated micro-batch only (reduce, reduce, step) keeps its update
            idle = ~present.to(p.device)
            if p.grad is not None:
                idle = idle & (p.grad == 0)
            p.copy_(torch.where(idle, old, p))
            state = optimizer.state.get(p, {})
            for name, v in kept.items():
                state[name].copy_(torch.where(idle, v, state[name]))


def _reaches_model(
    loss: torch.Tensor, model: nn.Module, found: list[torch.Tensor] | None = None
) -> bool | None:
    """Whether ``loss``'s autograd graph reaches one of ``model``'s trainable parameters: a walk
    of the graph on the host (no device work). None where the graph cannot tell: a reentrant
    checkpoint runs its layers, and reads their parameters, only during the backward. The
    parameter reached goes into ``found``."""
    params = {id(p) for p in model.parameters() if p.requires_grad}
    if not params:
        return None
    opaque = False
    for node in _graph_nodes(loss):
        var = getattr(node, "variable", None)  # AccumulateGrad: a leaf tensor
        if var is not None and id(var) in params:
            if found is not None:
                found.append(var)
            return True
        opaque = opaque or type(node).__name__ == "CheckpointFunctionBackward"
    return None if opaque or loss.grad_fn is None else False


def _graph_nodes(loss: torch.Tensor):
    """Every node of ``loss``'s autograd graph, once each (a walk on the host)."""
    seen, todo = set(), [loss.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        yield node
        todo.extend(f for f, _ in node.next_functions)


def _tensors(tree: Any) -> list[torch.Tensor]:
    """The tensors of a nested tuple / list / dict."""
    return [v for v in torch.utils._pytree.tree_leaves(tree) if isinstance(v, torch.Tensor)]


def _other_leaves(loss: torch.Tensor, own: set[int]) -> list[str]:
    """The trainable leaf tensors that ``loss``'s autograd graph reaches other than ``own``
    (ids), described by shape and dtype (a walk of the graph on the host)."""
    return [
        f"a {str(var.dtype).removeprefix('torch.')} tensor of shape {list(var.shape)}"
        for var in (getattr(node, "variable", None) for node in _graph_nodes(loss))
        if var is not None and id(var) not in own  # AccumulateGrad: a leaf tensor
    ]


def _count_shares(N: torch.Tensor) -> torch.Tensor:  # noqa: N803
    """N_i / B [k]: the weight of cluster i's mean loss in the plain batch mean (vanilla)."""
    return N / N.sum().clamp(min=1)


def _present_mean(L: torch.Tensor, present: torch.Tensor) -> torch.Tensor:  # noqa: N803
    """0-d mean of the present clusters' losses ``L`` [k] (0 when none is present)."""
    return torch.where(present, L, 0.0).sum() / present.sum().clamp(min=1)


def _scalers_named(used: Any, given: Any) -> tuple[str, str]:
    """How a scaler mismatch names the enabled GradScaler ``used`` before (None: none) and the
    one ``given`` now (None: none)."""
    said = "no GradScaler" if used is None else "a GradScaler"
    got = "none" if given is None else "a GradScaler" if used is None else "another"
    return said, got


def _scaling(scaler: Any) -> bool:
    """True for an enabled GradScaler (a disabled one, GradScaler(enabled=False), is a no-op)."""
    return scaler is not None and scaler.is_enabled()


def _void_unless(finite: torch.Tensor, update: torch.Tensor, scaler: Any) -> None:
    """``update`` kept where the step is finite, else zeroed, or made NaN under a scaler (which
    then skips the step and backs off). One pass with a 0-d condition: on the CPU, masked_fill_
    with a broadcast 0-d mask is slower (0.4-0.6 ms against 0.3 at P = 755009, 2 cores)."""
    fill = update.new_full((), float("nan") if _scaling(scaler) else 0.0)
    torch.where(finite, update, fill, out=update)


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor of shape {list(x.shape)} and dtype {x.dtype}"
    return type(x).__name__


def _back_off(scaler: torch.amp.GradScaler) -> None:
    """What GradScaler.update does after an inf/NaN step: scale times the backoff factor and
    the growth count back to 0 (so the scale does not grow again at the next good step)."""
    scaler.update(scaler.get_scale() * scaler.get_backoff_factor())
    tracker = getattr(scaler, "_growth_tracker", None)
    if isinstance(tracker, torch.Tensor):
        tracker.zero_()


# loss-space methods whose state follows the cluster losses (all-reduced when distributed)
_LOCAL_STATE = ("uw", "dwa", "famo")


def _sharded_by(model: nn.Module) -> str | None:
    """The FSDP flavour that shards ``model`` or one of its submodules, else None."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None  # an FSDP model exists only under a process group
    import torch.distributed.fsdp as fsdp

    kinds = [(getattr(fsdp, "FullyShardedDataParallel", None), "FullyShardedDataParallel"),
             (getattr(fsdp, "FSDPModule", None), "fully_shard (FSDP2)")]  # fmt: skip
    for m in model.modules():
        for cls, name in kinds:
            if cls is not None and isinstance(m, cls):
                return name
    return None


def _check_ddp_for_gradients(model: nn.Module, reducing: bool) -> None:
    """DDP settings under which a gradient method's per-cluster passes cannot be exact."""
    if not reducing:
        raise ValueError(
            "a DistributedDataParallel model with an engine that does not reduce across ranks "
            "(distributed=False): the per-cluster passes run under no_sync, so every rank would "
            "apply its own update. Use distributed='auto' (the default) or True"
        )
    for flag, why in (
        ("gradient_as_bucket_view", "DDP would point .grad at its buckets, away from the rows "
         "of J, and cluster gradients would be lost"),
        ("static_graph", "the per-cluster passes use no_sync, which a static graph does not "
         "allow"),
    ):  # fmt: skip
        if getattr(model, flag, False):
            raise ValueError(
                f"DDP(..., {flag}=True) with a gradient method: {why}. Wrap the model with "
                f"DDP(model, {flag}=False)"
            )


def _check_per_sample(per: Any, n: int | None, sub_batch: bool = False) -> torch.Tensor:
    """``per`` as a [n] float tensor, else a ValueError; ``sub_batch``: loss_fn ran on one
    cluster's rows (micro mode), which the message says, since its shapes are not the batch's."""
    if not isinstance(per, torch.Tensor) or per.dim() != 1 or not per.is_floating_point():
        where = f" (from loss_fn on one cluster's sub-batch of {n} samples)" if sub_batch else ""
        raise ValueError(
            f"the loss must be PER SAMPLE: a 1-D float tensor [B], got {_describe(per)}{where}. "
            "Reduce over every dimension but the batch (e.g. mean over C, H, W), not over B."
        )
    if n is not None and per.shape[0] != n:
        where = f" (loss_fn on one cluster's sub-batch of {n} samples)" if sub_batch else ""
        raise ValueError(
            f"per-sample loss has {per.shape[0]} entries but there are {n} timesteps{where}"
        )
    return per


def _make_method(name: str, k: int, seed: int, kwargs: dict[str, Any]) -> mtl.Composite:
    """make_method, passing the engine's seed to every part that draws random numbers."""
    from ..mtl.registry import _hparam_names

    method = mtl.make_method(name, k, **kwargs)
    if "seed" in kwargs:
        return method
    takes_seed = any(
        part is not None and "seed" in _hparam_names(type(part))
        for part in (method.loss, method.grad)
    )
    return mtl.make_method(name, k, seed=seed, **kwargs) if takes_seed else method

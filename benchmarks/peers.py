"""Peer MTL libraries behind one training-step interface, for bench_step.py only.

Peers (benchmark-only extras, never runtime dependencies of antdiff):

- LibMTL 1.1.5: weighting classes (PCGrad, UW, IMTL, MGDA) are mixins that expect a host
  module with ``get_share_params()``, ``zero_grad_share_params()``, ``task_num``, ``device``
  and ``rep_grad``. Its package import pulls ``torchvision.models.utils`` (for ResNet weights we
  never use), so a stub is put in ``sys.modules`` when torchvision is absent.
- torchjd 0.18: ``torchjd.autojac.backward`` stores the [k, ...] Jacobian of the k cluster losses
  in every parameter's ``.jac`` (one vmapped backward pass carrying k cotangent rows), then
  ``torchjd.autojac.jac_to_grad`` aggregates it into ``.grad`` (aggregators PCGrad, NashMTL).

Every peer step is: forward of the whole batch -> per-sample losses [B] -> cluster losses [k]
(the mean over the samples of each cluster, as ANT defines them) -> the peer's backward and
aggregation -> ``optimizer.step()``. The same model, batch, timesteps and clusters as ours.
"""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Callable
from importlib import metadata
from typing import Any

import torch
from torch import nn

LossFn = Callable[[Any, torch.Tensor], torch.Tensor]  # (batch, t [B]) -> per-sample loss [B]
Step = Callable[[Any, torch.Tensor], None]  # (batch, t [B]) -> None: one full training step

LIBMTL_METHODS = {"pcgrad": "PCGrad", "uw": "UW", "imtl": "IMTL", "mgda": "MGDA"}
TORCHJD_METHODS = ("pcgrad", "nash", "nash25")


def peer_version(package: str) -> str | None:
    """Installed version of ``package``, or None."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _stub_torchvision() -> None:
    """LibMTL's ResNet module imports torchvision.models.utils.load_state_dict_from_url."""
    try:
        importlib.import_module("torchvision.models.utils")
        return
    except ImportError:
        pass
    names = ("torchvision", "torchvision.models", "torchvision.models.utils")
    mods = {name: types.ModuleType(name) for name in names}
    mods["torchvision.models.utils"].load_state_dict_from_url = torch.hub.load_state_dict_from_url
    mods["torchvision"].models = mods["torchvision.models"]
    mods["torchvision.models"].utils = mods["torchvision.models.utils"]
    for name, mod in mods.items():
        sys.modules.setdefault(name, mod)


def libmtl_weighting() -> types.ModuleType:
    """``LibMTL.weighting`` (raises ImportError when LibMTL is not installed)."""
    _stub_torchvision()
    return importlib.import_module("LibMTL.weighting")


def cluster_means(per: torch.Tensor, cid: torch.Tensor, k: int) -> torch.Tensor:
    """[k] mean of ``per`` [B] over the samples of each cluster (``cid`` [B] in [0, k))."""
    sums = torch.zeros(k, dtype=per.dtype, device=per.device).index_add(0, cid, per)
    # counted by index_add, not bincount (which reads its size on the host: a sync on CUDA)
    counts = torch.zeros_like(sums).index_add(0, cid, torch.ones_like(per))
    return sums / counts.clamp(min=1)


def libmtl_host(method: str, model: nn.Module, k: int) -> nn.Module:
    """A LibMTL weighting object whose shared parameters are all of ``model``'s parameters.

    Args:
        method: one of ``LIBMTL_METHODS``.
        model: the diffusion network (registered as a submodule, so ``host.parameters()`` is
            the model's parameters plus the weighting's own, e.g. UW's loss scales).
        k: number of clusters (LibMTL's task_num).
    """
    if method not in LIBMTL_METHODS:
        raise ValueError(f"method must be one of {sorted(LIBMTL_METHODS)}, got {method!r}")
    base = getattr(libmtl_weighting(), LIBMTL_METHODS[method])
    device = next(model.parameters()).device

    class Host(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            super().__init__()
            self.net = model
            self.task_num = k
            self.task_name = [f"cluster{i}" for i in range(k)]
            self.device = device
            self.rep_grad = False
            self.init_param()

        def get_share_params(self):
            return self.net.parameters()

        def zero_grad_share_params(self) -> None:
            # LibMTL was written for torch < 2, where zero_grad() zeroed in place; it later writes
            # ``param.grad.data``, which a None grad would break
            self.net.zero_grad(set_to_none=False)

    return Host()


def libmtl_step(
    method: str, model: nn.Module, loss_fn: LossFn, clusters: Any, lr: float, fused: bool = False
) -> Step:
    """One LibMTL training step: forward, ``host.backward(cluster losses)``, AdamW step
    (``fused``: torch's fused AdamW, as vanilla and antdiff get on a GPU)."""
    host = libmtl_host(method, model, clusters.k)
    opt = torch.optim.AdamW(host.parameters(), lr=lr, fused=fused)
    kwargs = {"mgda_gn": "none"} if method == "mgda" else {}

    def step(batch: Any, t: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=False)
        losses = cluster_means(loss_fn(batch, t), clusters.cluster_of(t), clusters.k)
        host.backward(losses, **kwargs)
        opt.step()

    step.host = host  # type: ignore[attr-defined]
    return step


def torchjd_aggregator(method: str, k: int) -> Any:
    """torchjd's PCGrad, or NashMTL updating its weights every step ("nash") or every 25."""
    from torchjd.aggregation import PCGrad

    if method == "pcgrad":
        return PCGrad()
    if method in ("nash", "nash25"):
        from torchjd.aggregation import NashMTL

        # max_norm=0: no clipping, as ours (its default 1.0 adds a norm and a host read a step)
        return NashMTL(n_tasks=k, update_weights_every=25 if method == "nash25" else 1,
                       max_norm=0.0)
    raise ValueError(f"method must be one of {TORCHJD_METHODS}, got {method!r}")


def torchjd_step(
    method: str, model: nn.Module, loss_fn: LossFn, clusters: Any, lr: float, fused: bool = False
) -> Step:
    """One torchjd step: forward, ``autojac.backward`` of the k cluster losses,
    ``jac_to_grad`` with the aggregator, AdamW step (``fused`` as in libmtl_step)."""
    from torchjd.autojac import backward, jac_to_grad

    aggregator = torchjd_aggregator(method, clusters.k)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, fused=fused)

    def step(batch: Any, t: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        losses = cluster_means(loss_fn(batch, t), clusters.cluster_of(t), clusters.k)
        backward(losses, inputs=params)
        jac_to_grad(params, aggregator)
        opt.step()

    step.aggregator = aggregator  # type: ignore[attr-defined]
    return step


def peer_step(
    lib: str, method: str, model: nn.Module, loss_fn: LossFn, clusters: Any, lr: float = 1e-4,
    fused: bool = False,
) -> Step:
    """A full training step of ``lib`` ("libmtl" or "torchjd") running ``method``."""
    if lib == "libmtl":
        return libmtl_step(method, model, loss_fn, clusters, lr, fused)
    if lib == "torchjd":
        return torchjd_step(method, model, loss_fn, clusters, lr, fused)
    raise ValueError(f"lib must be 'libmtl' or 'torchjd', got {lib!r}")

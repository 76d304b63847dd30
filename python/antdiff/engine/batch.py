"""Cutting a batch (tensor, tuple/list or dict of tensors) along its leading dimension."""

from __future__ import annotations

from typing import Any

import torch


def batch_size(batch: Any) -> int | None:
    """Leading size of the first tensor in ``batch`` (None if it holds no tensor)."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.dim() > 0 else None
    items = batch.values() if isinstance(batch, dict) else batch
    if isinstance(batch, (dict, list, tuple)):
        for v in items:
            n = batch_size(v)
            if n is not None:
                return n
    return None


def map_batch(batch: Any, fn) -> Any:
    """Apply ``fn`` to every tensor with a leading batch dimension; keep everything else."""
    if isinstance(batch, torch.Tensor):
        return fn(batch) if batch.dim() > 0 else batch
    if isinstance(batch, dict):
        return {k: map_batch(v, fn) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        out = [map_batch(v, fn) for v in batch]
        if hasattr(batch, "_fields"):  # a namedtuple: loss_fn reads its fields by name
            return type(batch)(*out)
        return type(batch)(out) if isinstance(batch, list) else tuple(out)
    return batch


def check_batch(batch: Any, n: int, lists: bool = True) -> None:
    """Every tensor with a batch dimension must have ``n`` rows (they are cut by cluster), and
    nothing else may vary per sample: a list of B captions, or of B labels (``list(y)``), would
    not follow its images. A batch must hold at least one such tensor: a loss_fn that reads its
    data from its closure would pair it with timesteps sorted (or cut) by cluster. ``lists``:
    look for lists of n numbers (off for a rank's slice of a global batch, whose n differs
    between ranks: the global batch was checked, and every rank must decide alike)."""
    _check_leaves(batch, n=n if lists else None)
    if batch_size(batch) is None:
        raise ValueError(
            f"the batch holds no tensor with a batch dimension (got {type(batch).__name__}): "
            "pass the per-sample tensors (x0, noise, labels, ...) as ant.backward's batch, so "
            "that the engine cuts and sorts them by cluster together with t; data that loss_fn "
            "reads from its closure would be paired with the wrong timesteps"
        )

    def check(x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != n:
            raise ValueError(
                f"every tensor in the batch needs leading dimension B={n} (it is split by "
                f"cluster), got one of shape {list(x.shape)}; pass shared tensors through the "
                "closure of loss_fn instead"
            )
        return x

    map_batch(batch, check)


def slice_batch(batch: Any, start: int, stop: int) -> Any:
    return map_batch(batch, lambda x: x[start:stop])


def take_batch(batch: Any, index: torch.Tensor) -> Any:
    return map_batch(batch, lambda x: x.index_select(0, index.to(x.device)))


def _scalar(v: Any) -> bool:
    return isinstance(v, (bool, int, float)) or (isinstance(v, torch.Tensor) and v.dim() == 0)


def _check_leaves(batch: Any, where: str = "batch", n: int | None = None) -> None:
    if isinstance(batch, torch.Tensor) or batch is None or isinstance(batch, (bool, int, float)):
        return
    if isinstance(batch, dict):
        for k, v in batch.items():
            _check_leaves(v, f"{where}[{k!r}]", n)
        return
    if isinstance(batch, (list, tuple)):
        # (B > 4: a short tuple of settings, an image size or an RGB mean, may match a tiny B)
        if n is not None and n > 4 and len(batch) == n and all(_scalar(v) for v in batch):
            raise TypeError(
                f"{where} is a {type(batch).__name__} of B={n} numbers: per-sample values "
                "(e.g. list(labels)) must be a tensor, which the engine cuts and sorts by "
                "cluster with the rest of the batch (the list would stay in its order): pass "
                "torch.tensor(...) of it, or, if it is not per sample, pass it through "
                "loss_fn's closure"
            )
        for i, v in enumerate(batch):
            _check_leaves(v, f"{where}[{i}]", n)
        return
    raise TypeError(
        f"{where} is a {type(batch).__name__}: the engine cuts the batch by cluster and can only "
        "cut tensors (a list of B captions would stay whole while the images are re-sorted). "
        "Encode it into a tensor with the batch first (e.g. token ids), or pass shared values "
        "through loss_fn's closure"
    )

"""One flat [k, P] buffer that autograd writes the per-cluster gradients into, in place.

Every trainable parameter's ``.grad`` is pointed at a view of row i of ``J`` before cluster i's
backward pass; autograd then accumulates straight into that row (no copies, no concatenation).
After the weights are known, ``w @ J`` is written into row 0 and the ``.grad`` tensors are left
pointing at row 0, which the optimiser reads as usual.

Rows are padded to a multiple of 16 elements (``J`` is a [k, P] view of ``base`` [k, P_pad]):
every row then starts on a 64-byte boundary, so the gram / combine kernels load 16 bytes per
thread whatever P is (Triton specialises on strides divisible by 16). The padding stays zero.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

ROW_ALIGN = 16  # elements


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model a DistributedDataParallel / DataParallel wrapper holds (also under
    torch.compile); any other model as it is: its child named ``module``, if it has one, is a
    part of it, not the model."""
    m = getattr(model, "_orig_mod", model)
    if isinstance(m, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
        return m.module
    return model


def dense_layout(p: torch.Tensor) -> bool:
    """Whether ``p`` covers its numel elements without gaps or overlaps in some dimension order
    (contiguous, channels_last, a transpose, ...)."""
    expect = 1
    for d in sorted(range(p.dim()), key=p.stride):
        if p.size(d) != 1:
            if p.stride(d) != expect:
                return False
            expect *= p.size(d)
    return True


def param_view(rows: torch.Tensor, offset: int, p: torch.Tensor) -> torch.Tensor:
    """Elements [offset, offset + numel) of the last dimension of ``rows`` ([P] or [k, P], last
    stride 1) shaped like ``p`` and laid out in its memory order, as autograd lays out a
    gradient (the gradient layout contract): a fused optimiser reads .grad and the parameter
    element by element in memory, so a channels_last parameter needs a channels_last .grad. A
    parameter without a dense layout gets the contiguous order."""
    n = p.numel()
    seg = rows[..., offset : offset + n]
    if p.is_contiguous() or not dense_layout(p):
        return seg.view((*rows.shape[:-1], *p.shape))  # (a tuple: () for a 0-d one)
    return seg.as_strided((*rows.shape[:-1], *p.shape), (*rows.stride()[:-1], *p.stride()))


class GradBuffer:
    """J: [k, P] over the trainable parameters of a model, with per-row ``.grad`` views."""

    def __init__(self, params: Iterable[torch.nn.Parameter], k: int) -> None:
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters (requires_grad=True)")
        dtypes = {p.dtype for p in self.params}
        devices = {p.device for p in self.params}
        if len(dtypes) != 1 or len(devices) != 1:
            raise ValueError(
                "all trainable parameters must share one dtype and device for the per-cluster "
                f"gradient buffer; got dtypes {sorted(map(str, dtypes))}, devices "
                f"{sorted(map(str, devices))}. Keep master weights in fp32 and use autocast."
            )
        self.k = k
        self.numels = [p.numel() for p in self.params]
        self.strides = [p.stride() for p in self.params]  # the layout the row views follow
        self.P = sum(self.numels)
        row = -(-self.P // ROW_ALIGN) * ROW_ALIGN
        self.base = torch.zeros(k, row, dtype=dtypes.pop(), device=devices.pop())
        self.J = self.base[:, : self.P]
        self._views = [self._row_views(i) for i in range(k)]

    def _row_views(self, i: int) -> list[torch.Tensor]:
        out, o = [], 0
        for p, n in zip(self.params, self.numels):
            out.append(param_view(self.J[i], o, p))
            o += n
        return out

    def point_grads_at(self, i: int, zero: bool = True) -> None:
        """Make every ``p.grad`` a view of row i (zeroed first unless ``zero`` is False)."""
        if zero:
            self.J[i].zero_()
        for p, v in zip(self.params, self._views[i]):
            p.grad = v

    def matches(self, params: Iterable[torch.nn.Parameter]) -> bool:
        """The same trainable parameters, still of J's dtype and device and in the same memory
        layout (``model.double()``, ``.to()`` or ``.to(memory_format=...)`` after attach
        converts them in place)."""
        ps = [p for p in params if p.requires_grad]
        return len(ps) == len(self.params) and all(
            a is b and a.dtype == self.J.dtype and a.device == self.J.device and a.stride() == st
            for a, b, st in zip(ps, self.params, self.strides)
        )

    def detach_grads(self) -> None:
        """Give every parameter its own gradient tensor again (a copy of the current row 0)."""
        for p, v in zip(self.params, self._views[0]):
            p.grad = v.clone()

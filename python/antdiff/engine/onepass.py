"""All k rows of J from ONE forward and ONE backward over the cluster-sorted batch.

The parameters of the served layers (Linear, Conv1d/2d, GroupNorm, LayerNorm, Embedding) stop
requiring grad during the forward, so autograd computes only activation gradients. A forward hook
keeps each layer call's input (what autograd keeps for a weight gradient anyway) and hooks its
output; in the backward that hook gets grad_output and forms the weight and bias gradients per
cluster, slicing the batch at the host-known cluster bounds, into the rows of J [k, P]. The
backpropagated scalar is sum_i local_sum_i / N_i: each sample's grad_output carries 1 / N of its
cluster, so cluster i's slice gives exactly row i. A layer whose output would not require grad
(stem conv, time-embedding MLP, Embedding) gets an identity node tied to a grad-requiring anchor.

Limits: every trainable parameter must belong to a supported layer and be used only through that
layer's forward, on batch-major tensors (leading dimension B) that derive from the batch; a
layer's input must not change in place after the layer used it (autograd's own rule), no
layer may run again in the backward (activation checkpointing), and no parameter may carry a
gradient hook. Each of these raises NotServable (mode "auto" then uses "micro").
"""

from __future__ import annotations

import functools
import itertools
import math
import weakref
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F  # noqa: N812
import torch.utils.checkpoint
from torch import nn

from .buffer import GradBuffer, dense_layout, param_view, unwrap
from .timesteps import to_device

# exact types only: a subclass may use its parameters in its own way
_KINDS = {nn.Linear: "linear", nn.Conv1d: "conv", nn.Conv2d: "conv", nn.GroupNorm: "norm",
          nn.LayerNorm: "norm", nn.Embedding: "embedding"}  # fmt: skip


# When the k per-cluster weight gradients of a layer are formed in ONE call over the
# cluster-padded batch instead of k calls: at most this many samples' output positions (rows of
# the product) per live cluster, by device type; None = never. A per-cluster call's fixed cost
# dominates when a cluster has little work: on the CPU for the 3x3 convolutions of the 8x8
# ADM-tiny (oneDNN's grouped kernel loses with more positions), while batched products lost
# there (their padded copies cost more than the k calls). A GPU's small models are bound by the
# host launching kernels: on an H200, grouped convolutions took adm-small's PCGrad step from
# 2.08x to 1.77x vanilla and left DiT-S/2 (patch products, no 3x3 layers) at 1.03x, while
# batched products lost on DiT-S/2 (1.29x; benchmarks/results/ab_onepass_h200.md). The CUDA
# limit covers every layer of adm-small (26214 rows a cluster at 32x32, B = 128) and keeps the
# k calls for the paper ADM's 128x128 and 256x256 layers, whose calls are long and which run at
# the step's memory peak, where the padded copies of x and g would add to it. Module-level so
# that a benchmark can compare the ways (benchmarks/ab_onepass_calls.py).
GROUPED_CONV: dict[str, int | None] = {"cpu": 512, "cuda": 32768}
BATCHED_PRODUCTS: dict[str, int | None] = {"cpu": None, "cuda": None}


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)`` without the call when it is one already (the handlers run per layer call
    on every step, where each dispatcher call is host time)."""
    return t if t.dtype == dtype else t.to(dtype)


def _one_call(policy: dict[str, int | None], st: _Step, rows_per_sample: int) -> bool:
    """Whether ``policy`` forms this layer's k rows in one call (see GROUPED_CONV): never where
    the padding would more than double the batch (k times the largest cluster > 2 B, e.g. one
    cluster holding most of a uniform draw)."""
    limit = policy.get(st.cid.device.type)
    live = st.live
    return (
        limit is not None and live > 1 and st.B * rows_per_sample <= limit * live
        and st.k * max(st.counts) <= 2 * st.B
    )  # fmt: skip


class NotServable(ValueError):
    """The model cannot be served by mode "onepass" (raised at attach time or in the forward)."""


def _served(m: nn.Module) -> bool:
    """A layer of a served type in a configuration the gradient formulas cover."""
    if isinstance(m, nn.Embedding):
        return not (m.sparse or m.scale_grad_by_freq)
    if isinstance(m, (nn.Conv1d, nn.Conv2d)):  # 'same' must pad symmetrically
        odd = any(d * (s - 1) % 2 for d, s in zip(m.dilation, m.kernel_size))
        return m.padding_mode == "zeros" and not (m.padding == "same" and odd)
    return True


def _unserved_setting(m: nn.Module) -> str:
    """Why a layer of a served type is not served: its setting, for messages."""
    if isinstance(m, nn.Embedding):
        return "sparse=True" if m.sparse else "scale_grad_by_freq=True"
    if m.padding_mode != "zeros":
        return f"padding_mode={m.padding_mode!r}"
    return "padding='same' with an even dilated kernel (padded asymmetrically)"


def unsupported_parameters(model: nn.Module) -> list[str]:
    """Names of the trainable parameters that mode "onepass" cannot give per-cluster rows."""
    owned: set[int] = set()
    for m in model.modules():
        if type(m) in _KINDS and _served(m):
            owned.update(id(p) for p in m.parameters(recurse=False))
    return [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in owned]


class _Root(torch.autograd.Function):
    """Identity on x that makes the output require grad through ``anchor`` (no gradient)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:  # noqa: ARG004
        return x.clone()  # a fresh non-leaf tensor: in-place ops on the layer output stay legal

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # noqa: ARG004
        return None, None


class _Slot:
    """One parameter's columns of J: ``cols`` [k, n], per-row views shaped like it, and per-row
    2-D views [shape[0], rest] for products."""

    def __init__(self, J: torch.Tensor, offset: int, p: torch.Tensor) -> None:  # noqa: N803
        n = p.numel()
        self.target: torch.Tensor | None = None
        if p.is_contiguous() or not dense_layout(p):
            self.cols = J[:, offset : offset + n]
        else:  # J's rows hold p's memory order (channels_last, ...): written here, then copied
            self.cols = J.new_empty(J.shape[0], n)
            self.target = param_view(J, offset, p)  # [k, *p.shape], strided like p
        self.rows = [self.cols[i].view_as(p) for i in range(J.shape[0])]
        self.mats = [r.view(p.shape[0], -1) if p.dim() else r for r in self.rows]
        self.fresh = True  # not yet written in this step: the first write sets every row

    def flush(self) -> None:
        """The step's rows into J in the parameter's memory order (a no-op for contiguous ones)."""
        if self.target is not None:
            self.target.copy_(self.cols.view(self.target.shape))

    def put_rows(self, st: _Step, value_of: Callable[[int], torch.Tensor]) -> None:
        """Row i := (or +=) value_of(i) for the live clusters i."""
        fresh = self.fresh
        for i, (row, n) in enumerate(zip(self.rows, st.counts)):
            if n:
                v = value_of(i)
                row.copy_(v) if fresh else row.add_(v)
            elif fresh:
                row.zero_()
        self.fresh = False

    def put_products(self, st: _Step, left: torch.Tensor, right: torch.Tensor, n: int) -> None:
        """Row i := (or +=) left[:, a n : b n] @ right[a n : b n] for cluster i's batch rows a:b
        (``n`` columns of ``left`` / rows of ``right`` per sample), written straight into J."""
        fresh = self.fresh
        same = left.dtype == self.cols.dtype
        if _one_call(BATCHED_PRODUCTS, st, n):
            # one batched product over the cluster-padded batch, cluster-major: [k, out, m n]
            # @ [k, m n, in] (m = the largest cluster; a padding slot's left columns are zero)
            m, src, keep = st.blocks_major()
            out, k = left.shape[0], st.k
            lp = left.reshape(out, st.B, n).index_select(1, src)
            lp = lp.mul_(_as(keep, lp.dtype).view(1, -1, 1)).view(out, k, m * n).transpose(0, 1)
            rp = right.reshape(st.B, n, -1).index_select(0, src).view(k, m * n, -1)
            mats = self.cols.view(k, out, -1)
            if same:
                mats.baddbmm_(lp, rp, beta=0 if fresh else 1)
            else:
                v = torch.bmm(lp, rp)
                mats.copy_(v) if fresh else mats.add_(v)
            self.fresh = False
            return
        # one split per operand (a call each) in place of two slices per cluster
        sizes = [c * n for c in st.counts]
        lefts, rights = left.split(sizes, 1), right.split(sizes, 0)
        for mat, c, lf, rt in zip(self.mats, st.counts, lefts, rights):
            if not c:
                if fresh:
                    mat.zero_()
            elif same:  # beta=0 ignores the row's old contents
                mat.addmm_(lf, rt, beta=0 if fresh else 1)
            else:  # half-precision activations: the product in their dtype, then stored
                v = lf @ rt
                mat.copy_(v) if fresh else mat.add_(v)
        self.fresh = False

    def put_all(self, st: _Step, rows: torch.Tensor) -> None:
        """All rows := (or +=) ``rows`` [k, ...] (one row per cluster, absent ones zero)."""
        rows = rows.reshape(self.cols.shape)
        self.cols.copy_(rows) if self.fresh else self.cols.add_(rows)
        self.fresh = False

    def put_seg(self, st: _Step, per_sample: torch.Tensor) -> None:
        """All rows := (or +=) the per-cluster sums of ``per_sample`` [B, n], one product."""
        s = _as(per_sample, st.M.dtype)
        self.cols.addmm_(st.M, s, beta=0) if self.fresh else self.cols.addmm_(st.M, s)
        self.fresh = False


MODEL_NOT_RUN = (
    "loss_fn's losses reach none of the attached model's trainable parameters, so the update "
    "would be zero: loss_fn must run the model given to ant.attach (or model=). Attach the "
    "model that loss_fn uses."
)


LOSS_WITHOUT_GRAD = (
    "loss_fn's output does not require grad (detached, or ant.backward called under "
    "torch.no_grad): there is no gradient to split by cluster"
)


class _Step:
    """Host bounds and device one-hot of the clusters for the step in progress."""

    def __init__(
        self, cid: torch.Tensor, counts, k: int, dtype: torch.dtype, ones: dict | None = None
    ) -> None:
        self.counts = [int(c) for c in counts]
        self.bounds = [0, *itertools.accumulate(self.counts)]
        self.B = self.bounds[-1]
        self.M = (cid[None, :] == torch.arange(k, device=cid.device)[:, None]).to(dtype)  # [k, B]
        self.cid = cid
        self.anchor = torch.zeros((), device=cid.device, requires_grad=True)
        self.ran = 0  # calls of the model's served layers in this step's forward
        self.k = k
        self.live = sum(c > 0 for c in self.counts)
        self._blocks: tuple[int, torch.Tensor, torch.Tensor] | None = None
        self._major: tuple[int, torch.Tensor, torch.Tensor] | None = None
        self._ones = {} if ones is None else ones

    def ones(self, n: int, like: torch.Tensor) -> torch.Tensor:
        """A ones vector [n] of ``like``'s dtype and device, kept across steps in the dict the
        step was given (the plan's: one per distinct size, cleared past 64)."""
        key = (n, like.dtype, like.device)
        v = self._ones.get(key)
        if v is None:
            if len(self._ones) >= 64:
                self._ones.clear()
            v = self._ones[key] = like.new_ones(n)
        return v

    def blocks(self) -> tuple[int, torch.Tensor, torch.Tensor]:
        """(n, src, keep): the cluster-padded layout [n, k] of the batch (n = the largest
        cluster). Slot j * k + i holds sample j of cluster i: ``src`` [n k] is the sample each
        slot reads, for a padding slot its cluster's first sample (sample 0 for an empty
        cluster), and ``keep`` [n k] is 1 for a real slot and 0 for padding. Built once a step."""
        if self._blocks is None:
            counts = self.counts
            n, dev = max(counts), self.cid.device
            slots = [(i, j) for j in range(n) for i in range(self.k)]
            src = [self.bounds[i] + j if j < counts[i] else self.bounds[i] * (counts[i] > 0)
                   for i, j in slots]  # fmt: skip
            keep = [int(j < counts[i]) for i, j in slots]
            # one copy through pinned memory: a plain host-to-device copy would wait on the
            # stream (two host syncs a step on CUDA, as bench_step counted at df5b400)
            both = to_device(torch.tensor([src, keep], dtype=torch.int64), dev)
            self._blocks = n, both[0], both[1].float()
        return self._blocks

    def blocks_major(self) -> tuple[int, torch.Tensor, torch.Tensor]:
        """:meth:`blocks` with the slots cluster-major: slot i * n + j is sample j of cluster
        i, so a gather by ``src`` viewed as [k, n, ...] is one cluster per leading index."""
        if self._major is None:
            n, src, keep = self.blocks()
            self._major = (n, src.view(n, self.k).t().reshape(-1),
                           keep.view(n, self.k).t().reshape(-1))  # fmt: skip
        return self._major


def _linear(st: _Step, m: nn.Module, slots, x: torch.Tensor, g: torch.Tensor, node) -> None:
    w, b = slots
    g2 = g.reshape(-1, g.shape[-1])  # [B * tokens, out]
    n = g2.shape[0] // st.B
    if w is not None:
        w.put_products(st, g2.t(), _as(x, g.dtype).reshape(-1, x.shape[-1]), n)
    if b is not None:
        b.put_seg(st, g2.view(st.B, n, -1).sum(1) if n > 1 else g2)


def _patchwise(m: nn.Module) -> bool:
    """A convolution over non-overlapping patches: kernel == stride, no padding, one group."""
    ks = tuple(m.kernel_size)
    return (
        m.groups == 1 and ks == tuple(m.stride)
        and (all(v == 1 for v in m.dilation) or all(v == 1 for v in ks))
        and (m.padding in ("valid", "same") or not any(m.padding))
    )  # fmt: skip


def _patch_rows(x: torch.Tensor, kernel, out) -> torch.Tensor:
    """[B, C, *spatial] -> [B * prod(out), C * prod(kernel)]: one row per output position.

    Rows are ordered (sample, position), columns (channel, kernel offset) like the weight's
    [Cout, Cin, *kernel] layout; inputs past the last whole patch are dropped, as the layer does.
    """
    d = len(kernel)
    x = x[(..., *(slice(0, o * k_) for o, k_ in zip(out, kernel)))]
    split = [v for o, k_ in zip(out, kernel) for v in (o, k_)]  # o1, k1, o2, k2, ...
    x = x.reshape(x.shape[0], x.shape[1], *split)
    perm = (0, *range(2, 2 + 2 * d, 2), 1, *range(3, 3 + 2 * d, 2))
    return x.permute(perm).reshape(x.shape[0] * math.prod(out), -1)


def _conv(st: _Step, m: nn.Module, slots, x: torch.Tensor, g: torch.Tensor, node) -> None:
    w, b = slots
    patches = w is not None and _patchwise(m)
    L = math.prod(g.shape[2:])  # output positions per sample
    cout, cin = g.shape[1], x.shape[1]
    if patches and all(v == 1 for v in m.kernel_size) and cout * cin <= L * (cout + cin):
        # 1x1 with many positions (the UNet's skips at 8x8): every sample's own product
        # [Cout, L] @ [L, Cin] in one batched call on the layer's layout, then one product with
        # the cluster one-hot; its [B, Cout, Cin] temporary is no larger than the transposed
        # copies of g and x that the per-cluster products below need (half-precision
        # gradients add its float32 copy for the product)
        x3, g3 = _as(x, g.dtype).reshape(st.B, cin, L), g.reshape(st.B, cout, L)
        w.put_seg(st, torch.bmm(g3, x3.transpose(1, 2)).view(st.B, -1))
    elif patches:
        # 1x1 (attention qkv, skips) and patch embeddings: one matmul per cluster on the
        # non-overlapping patches beats convolution_backward's per-call cost
        gt = g.reshape(st.B, g.shape[1], -1).transpose(0, 1).flatten(1)  # [Cout, B*L]
        xp = _patch_rows(_as(x, g.dtype), m.kernel_size, g.shape[2:])  # [B*L, Cin*prod(kernel)]
        w.put_products(st, gt, xp, gt.shape[1] // st.B)
    elif w is not None:
        x = _as(x, g.dtype)
        d = len(m.kernel_size)
        if isinstance(m.padding, str):
            same = [dl * (k_ - 1) // 2 for k_, dl in zip(m.kernel_size, m.dilation)]
            pad = [0] * d if m.padding == "valid" else same
        else:
            pad = list(m.padding)
        # the weight's values are not read (no input gradient is asked for), only its shape,
        # dtype and layout: the weight itself (no graph is recorded in the backward's hooks),
        # or under autocast an uninitialised tensor like it in the gradient's dtype, not a cast
        weight = m.weight
        if weight.dtype != g.dtype:
            weight = torch.empty_like(weight, dtype=g.dtype, requires_grad=False)
        stride, dilation = list(m.stride), list(m.dilation)
        zeros, mask = [0] * d, [False, True, False]

        if _one_call(GROUPED_CONV, st, L):
            # One grouped call for all k clusters: each cluster's samples padded to the largest
            # cluster's count, the clusters side by side as k groups of channels.
            # On the CPU a per-cluster call has a fixed cost that dominates when a cluster has
            # few output positions (8x8 ADM-tiny, B = 32: 13 ms a step in place of 17 for the
            # 20 3x3 layers); with more (32x32 inputs, B = 128) oneDNN's grouped kernel is the
            # slower one, so the k calls stay (GROUPED_CONV). A padding slot reads a real
            # sample's input and output gradient (one gather each, no zero fill) and zeroes the
            # gradient, so it adds nothing to the weight gradient.
            n, src, keep = st.blocks()
            gp = g.index_select(0, src).mul_(_as(keep, g.dtype).view(-1, *[1] * (g.dim() - 1)))
            xp = x.index_select(0, src)
            xp, gp = (v.view(n, st.k * v.shape[1], *v.shape[2:]) for v in (xp, gp))
            wk = weight.new_empty(st.k * weight.shape[0], *weight.shape[1:])  # shape only: no dX
            # the bias rows come from the same call (k Cout sums over the padded layout)
            with_b = b is not None
            _, dw, db = torch.ops.aten.convolution_backward(
                gp, xp, wk, [wk.shape[0]] if with_b else None, stride, pad, dilation, False,
                zeros, st.k * m.groups, [False, True, with_b],
            )  # fmt: skip
            w.put_all(st, dw)
            if with_b:
                b.put_all(st, db)
                return
        else:

            gs, xs = g.split(st.counts), x.split(st.counts)

            def value_of(i: int) -> torch.Tensor:
                return torch.ops.aten.convolution_backward(
                    gs[i], xs[i], weight, None, stride, pad, dilation, False, zeros, m.groups,
                    mask,
                )[1]  # fmt: skip

            w.put_rows(st, value_of)
    if b is not None:
        b.put_seg(st, g.reshape(st.B, g.shape[1], -1).sum(-1))


def _norm(st: _Step, m: nn.Module, slots, x: torch.Tensor, g: torch.Tensor, node) -> None:
    w, b = slots
    # half precision: normalise in fp32 (float64 stays)
    dt = g.dtype if g.dtype in (torch.float32, torch.float64) else torch.float32
    g, x = _as(g, dt), _as(x, dt)
    if isinstance(m, nn.GroupNorm) and type(node).__name__ == "NativeGroupNormBackward0":
        # With the forward's own statistics, the B samples' groups are the B * G groups of one
        # [1, B C, HW] GroupNorm, whose weight and bias gradients are then per sample: one
        # pass over x and g (0.1 ms a layer in place of 0.2-0.4 for recomputing the norm)
        n, c = st.B, m.num_channels
        hw = x.numel() // (n * c)
        stats = (node._saved_result1, node._saved_result2)  # mean, 1 / std: [B, G]
        mean, rstd = (_as(v, dt).reshape(1, n * m.num_groups) for v in stats)
        dw, db = torch.ops.aten.native_group_norm_backward(
            # contiguous: the kernel reads them densely (an expanded gradient, e.g. from a
            # sum over positions, would reshape to a stride-0 view)
            g.reshape(1, n * c, hw).contiguous(), x.reshape(1, n * c, hw).contiguous(), mean, rstd,
            st.ones(n * c, x),  # its values are not read: no input gradient is asked for
            1, n * c, hw, n * m.num_groups, [False, w is not None, b is not None],
        )[1:]  # fmt: skip
        if w is not None:
            w.put_seg(st, dw.view(n, c))
        if b is not None:
            b.put_seg(st, db.view(n, c))
        return
    if isinstance(m, nn.GroupNorm):  # no statistics kept (the input did not require grad)
        n = m.num_channels
        g3 = g.reshape(st.B, n, -1)  # [B, C, spatial]: reduce the last dim
        yh = F.group_norm(x, m.num_groups, eps=m.eps) if w is not None else None
        red = -1
    else:
        n = math.prod(m.normalized_shape)
        g3 = g.reshape(st.B, -1, n)  # [B, tokens, n]: reduce the middle dim
        yh = F.layer_norm(x, m.normalized_shape, eps=m.eps) if w is not None else None
        red = 1
    if w is not None:
        w.put_seg(st, (g3 * yh.reshape(g3.shape)).sum(red))
    if b is not None:
        b.put_seg(st, g3.sum(red))


def _embedding(st: _Step, m: nn.Module, slots, x: torch.Tensor, g: torch.Tensor, node) -> None:
    w, d, idx = slots[0], g.shape[-1], x.reshape(-1)
    if w is None:
        return
    g2 = g.reshape(-1, d)
    if m.padding_idx is not None:  # no gradient flows to the padding row
        g2 = g2.masked_fill((idx == m.padding_idx)[:, None], 0.0)
    cid = st.cid.view(st.B, *[1] * (x.dim() - 1)).expand_as(x).reshape(-1)
    table = w.cols.view(len(w.rows), m.num_embeddings, d)
    if w.fresh:
        table.zero_()
        w.fresh = False
    table.index_put_((cid, idx), g2.to(table.dtype), accumulate=True)


_GRADS = {"linear": _linear, "conv": _conv, "norm": _norm, "embedding": _embedding}


_UNTRACKED = object()  # what _SharedWeightAudit.batch_dim gives for a tensor off the batch
_SWAPS = {"transpose", "transpose_", "swapaxes", "swapaxes_", "swapdims", "swapdims_"}


def _batch_dim_after(func, args, kwargs, src: torch.Tensor, r: torch.Tensor, d):
    """Where the batch dimension ``d`` of ``src`` (an input of op ``name``) lands in its output
    ``r``: exact for the transposes and permutes, else the same dimension counted from the
    right (broadcasting, new leading dimensions) or from the left (reshapes, reductions that
    keep dim 0), provided it has the batch's size there; None where it is lost."""
    if d is None or r.dim() == 0:
        return None
    name = getattr(func, "__name__", "")
    if name == "__get__":  # a property: x.T, x.mT, ...
        name = getattr(getattr(func, "__self__", None), "__name__", "")
        if name in ("T", "H"):
            return src.dim() - 1 - d
        if name in ("mT", "mH"):
            name, args, kwargs = "transpose", (src, -2, -1), {}
    rest = [*args[1:], *kwargs.values()]
    ints = [v for v in rest if isinstance(v, int)]
    try:
        if name in _SWAPS and len(ints) == 2:
            a, b = (v % src.dim() for v in ints)
            return b if d == a else a if d == b else d
        if name in ("t", "t_"):
            return 1 - d if src.dim() == 2 else d
        if name == "permute":
            dims = rest[0] if len(rest) == 1 and not isinstance(rest[0], int) else ints
            return [v % src.dim() for v in dims].index(d)
        if name in ("movedim", "moveaxis") and len(rest) == 2:
            a, b = ([v] if isinstance(v, int) else list(v) for v in rest)
            order = [i for i in range(src.dim()) if i not in [v % src.dim() for v in a]]
            for s_, t_ in sorted(zip((v % src.dim() for v in a), (v % r.dim() for v in b)),
                                 key=lambda st: st[1]):  # fmt: skip
                order.insert(t_, s_)
            return order.index(d)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    size = src.shape[d]
    right = d + r.dim() - src.dim()
    if 0 <= right < r.dim() and r.shape[right] == size:
        return right
    if d < r.dim() and r.shape[d] == size:
        return d
    return None


class _SharedWeightAudit(torch.overrides.TorchFunctionMode):
    """Raises NotServable if a served layer's weight is computed with outside that layer.

    Such a use (tied weights, ``F.linear(h, emb.weight)``) gets no gradient from the hooks, so
    the rows of J would silently miss it. Runs on the first forward only; metadata reads
    (``p.shape``, ``p.dtype``, ...) are allowed.

    It also tracks which tensors are constants of the forward: the model's parameters and
    buffers, tensors made without tensor inputs (``torch.arange(L)``) and whatever is computed
    from constants only. A served layer called on a constant (a learned position table indexed
    by ``arange``) is shared by all samples: autograd sums its output gradient over the batch
    before the hook sees it, so it has no per-cluster rows, even when L happens to equal B.
    """

    _META = {"size", "dim", "numel", "element_size", "is_floating_point", "is_complex",
             "data_ptr", "stride", "__repr__", "__format__", "__len__"}  # fmt: skip

    def __init__(self, layers, handles: list, constants=(), seeds=()) -> None:
        super().__init__()
        # by id, holding them (first forward only): tensors compare by value, not identity
        self.constants: dict[int, torch.Tensor] = {id(c): c for c in constants}
        # tensors computed from the batch (``seeds``: its tensors and t) -> the index of their
        # batch dimension (None where the ops on the way lost it); held weakly, so that the
        # forward's temporaries are freed as usual (and a reused id is not mistaken for them)
        self._batch_dim: dict[int, tuple[weakref.ref, int | None]] = {}
        for c in seeds:
            if c.dim() > 0:
                self.mark(c, 0)
        self.owner = {id(p): id(m) for _, m, _ in layers for p in m.parameters(recurse=False)}
        self.names = {id(p): f"{n}.{pn}" for n, m, _ in layers for pn, p in
                      m.named_parameters(recurse=False)}  # fmt: skip
        self.active: list[int] = []
        for _, m, _ in layers:
            handles.append(m.register_forward_pre_hook(self._enter))
            handles.append(m.register_forward_hook(self._leave))

    def mark(self, t: torch.Tensor, d: int | None) -> None:
        """Record ``t`` as computed from the batch, with its batch dimension ``d``."""
        self._batch_dim[id(t)] = (weakref.ref(t), d)

    def batch_dim(self, t: torch.Tensor):
        """``t``'s batch dimension (None: lost on the way), or _UNTRACKED if ``t`` was not
        computed from the batch (or by an op the audit does not see)."""
        entry = self._batch_dim.get(id(t))
        return entry[1] if entry is not None and entry[0]() is t else _UNTRACKED

    def _enter(self, module: nn.Module, args) -> None:
        self.active.append(id(module))

    def _leave(self, module: nn.Module, args, out) -> None:
        self.active.pop()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name != "__get__" and name not in self._META:
            for a in torch.utils._pytree.tree_leaves((args, kwargs)):
                owner = self.owner.get(id(a)) if isinstance(a, torch.Tensor) else None
                if owner is not None and (not self.active or self.active[-1] != owner):
                    raise NotServable(
                        f"mode='onepass': parameter {self.names[id(a)]!r} is used outside its "
                        f"layer (by {name or func}, e.g. tied weights): its gradient would be "
                        "missed"
                    )
        out = func(*args, **kwargs)
        leaves = [a for a in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor)]  # fmt: skip
        const = all(id(a) in self.constants for a in leaves)
        src = next((a for a in leaves if self.batch_dim(a) is not _UNTRACKED), None)
        for r in torch.utils._pytree.tree_leaves(out):
            if not isinstance(r, torch.Tensor):
                continue
            if const:
                self.constants[id(r)] = r
            else:  # in place (add_ returns its input): a constant that took batch data is no more
                self.constants.pop(id(r), None)
            if src is not None:
                self.mark(r, _batch_dim_after(func, args, kwargs, src, r, self.batch_dim(src)))
        return out


class OnePass:
    """Hook plan for ``model`` (may be DDP-wrapped): the served layers and their J slots.

    Raises NotServable naming the first trainable parameters that no served layer owns.
    """

    def __init__(self, model: nn.Module) -> None:
        inner = unwrap(model)
        bad = unsupported_parameters(inner)
        if bad:
            more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
            settings = [
                f"{name} ({_unserved_setting(m)})"
                for name, m in inner.named_modules()
                if type(m) in _KINDS and not _served(m)
                and any(p.requires_grad for p in m.parameters(recurse=False))
            ]  # fmt: skip
            why = (f"; of those, layers in a setting it does not cover: {', '.join(settings[:5])}"
                   if settings else "")  # fmt: skip
            raise NotServable(
                "mode='onepass' needs every trainable parameter to belong to an nn.Linear, "
                "Conv1d, Conv2d, GroupNorm, LayerNorm or Embedding; these do not: "
                f"{', '.join(bad[:5])}{more}{why}. Use mode='micro' (or 'auto')."
            )
        self.layers = [
            (name, m, _GRADS[_KINDS[type(m)]])
            for name, m in inner.named_modules()
            if type(m) in _KINDS and any(p.requires_grad for p in m.parameters(recurse=False))
        ]
        self._buf: GradBuffer | None = None
        self._slots: list[tuple[_Slot | None, ...]] = []
        self._st: _Step | None = None
        self._in_backward = False  # a served layer's forward now is a recompute (checkpointing)
        self._held: list[list] = []  # per layer call of this step: its input (and GroupNorm node)
        self._audited = False  # the first forward checks that no weight is used elsewhere
        self._audit: _SharedWeightAudit | None = None  # during that forward
        self._inner = inner  # its parameters and buffers are the audit's first constants
        self._ones: dict = {}  # GroupNorm's gamma stand-ins, by size, dtype and device

    def _bind(self, buf: GradBuffer) -> None:
        """Slots of every layer's (weight, bias) in ``buf.J`` (None: frozen or absent)."""
        starts = itertools.accumulate(buf.numels[:-1], initial=0)
        offsets = {id(p): o for p, o in zip(buf.params, starts)}
        self._slots = []
        for _, m, _ in self.layers:
            pair: list[_Slot | None] = []
            for p in (getattr(m, "weight", None), getattr(m, "bias", None)):
                ok = isinstance(p, torch.Tensor) and id(p) in offsets
                pair.append(_Slot(buf.J, offsets[id(p)], p) if ok else None)
            self._slots.append(tuple(pair))
        self._buf = buf

    def fill(
        self,
        buf: GradBuffer,
        per_sample: Callable[[], torch.Tensor],
        cid: torch.Tensor,
        counts,
        N: torch.Tensor,  # noqa: N803
        scaler: torch.amp.GradScaler | None = None,
        probe: Callable[..., None] | None = None,
        seeds: Sequence[torch.Tensor] = (),
        keep: bool = False,
    ) -> torch.Tensor:
        """Write J [k, P] into ``buf.J`` (``keep``: add to its rows); return the local cluster
        loss sums [k].

        Args:
            buf: the engine's gradient buffer (built while the parameters require grad).
            per_sample: runs the forward on the cluster-sorted batch -> per-sample losses [B].
            cid: [B] cluster of every sample; counts: [k] host ints (the same partition).
            N: [k] cluster divisors (global counts under DDP); scaler: an enabled GradScaler.
            probe: ``probe(loss, anchor)`` before the step's backward (the engine's graph
                checks; ``anchor`` is this step's own leaf).
            seeds: the batch's tensors and t, whose batch dimension (0) the first forward
                follows to every served layer's input.
        """
        if self._buf is not buf:
            self._bind(buf)
        k = buf.J.shape[0]
        self._st = _Step(cid, counts, k, buf.J.dtype, self._ones)
        off = [p for p in buf.params if p.requires_grad]
        for p in off:
            if p._backward_hooks or getattr(p, "_post_accumulate_grad_hooks", None):
                name = next((n for n, q in self._inner.named_parameters() if q is p), "?")
                raise NotServable(
                    f"mode='onepass': parameter {name!r} has a gradient hook "
                    "(register_hook / register_post_accumulate_grad_hook), which the per-cluster "
                    "rows would bypass; use mode='micro' (or 'auto')"
                )
        handles = []
        try:
            for p in off:  # the layers' weight gradients come from the hooks, per cluster
                p.requires_grad_(False)
            for j, (_, m, _) in enumerate(self.layers):
                hook = functools.partial(self._forward_hook, j)
                handles.append(m.register_forward_hook(hook, with_kwargs=True))
            if self._audited:
                per = per_sample()
            else:
                audit_handles: list = []
                # read now: Module.to() replaces buffer tensors after the plan was made; plain
                # tensor attributes (self.ids = torch.arange(L)) are constants as buffers are
                constants = [*self._inner.parameters(), *self._inner.buffers(),
                             *(v for mod in self._inner.modules() for v in vars(mod).values()
                               if isinstance(v, torch.Tensor))]  # fmt: skip
                self._audit = _SharedWeightAudit(self.layers, audit_handles, constants, seeds)
                try:
                    with self._audit:
                        per = per_sample()
                finally:
                    self._audit = None
                    for h in audit_handles:
                        h.remove()
                self._audited = True
        except BaseException:
            self._end_step(handles)
            raise
        finally:
            for p in off:  # the graph's edges are fixed: the backward still skips them
                p.requires_grad_(True)
        try:  # the forward hooks stay through the backward: they see checkpointing recompute
            per = per.to(torch.promote_types(per.dtype, torch.float32))
            sums = torch.zeros(k, device=per.device).index_add_(0, cid, per.detach().float())
            total = (per / N.clamp(min=1).to(per)[cid]).sum()
            if scaler is not None:
                total = scaler.scale(total)
            slots = [s for pair in self._slots for s in pair if s is not None]
            for s in slots:
                s.fresh = not keep  # the first write in this step sets all k rows
                if keep and s.target is not None:  # kept rows add to what J holds now (a slot
                    # of a channels_last weight writes its own buffer, copied into J at flush)
                    s.cols.view(s.target.shape).copy_(s.target)
            if not total.requires_grad and self._st.B > 0:
                raise ValueError(LOSS_WITHOUT_GRAD)
            if self._st.ran == 0 and self._st.B > 0:
                # a reentrant checkpoint (its layers run without grad in the forward) trains in
                # micro; another model is an error there too: the engine tells them apart from
                # the loss's graph (``loss``) before it leaves one-pass
                e = NotServable(
                    "mode='onepass': none of the attached model's layers ran with grad in the "
                    "forward (loss_fn runs another model, or the layers sit in a reentrant "
                    "activation checkpoint); use mode='micro' (or 'auto')"
                )
                e.loss = total
                raise e
            if probe is not None and self._st.B > 0:
                probe(total, self._st.anchor)
            if self._st.B > 0:  # an empty (local) batch: zero rows
                self._in_backward = True
                try:
                    total.backward()
                except torch.utils.checkpoint.CheckpointError as e:
                    raise NotServable(
                        f"mode='onepass': activation checkpointing recomputes layers in the "
                        f"backward ({e.__class__.__name__}), so their per-cluster gradients "
                        "cannot come from the first forward; use mode='micro' (or 'auto')"
                    ) from e
            for s in slots:  # layers the loss never reached: zero rows, as in micro
                if s.fresh:
                    s.cols.zero_()
                s.flush()
        finally:
            self._end_step(handles)
        return sums

    def _end_step(self, handles: list) -> None:
        """Remove the step's hooks and drop what they held, also after an aborted forward or
        backward (a GroupNorm's node and its hook's closure would otherwise be a reference
        cycle holding the layer's input and the graph behind it)."""
        self._st = None
        self._in_backward = False
        for h in handles:
            h.remove()
        for held in self._held:
            held.clear()
        self._held.clear()

    def _forward_hook(self, j: int, m: nn.Module, args, kwargs, out):
        if self._in_backward and torch.is_grad_enabled():
            raise NotServable(
                f"mode='onepass': layer {self.layers[j][0]!r} ran again during the backward "
                "(activation checkpointing recomputes it), so its per-cluster gradients cannot "
                "come from the first forward; use mode='micro' (or 'auto')"
            )
        if not torch.is_grad_enabled() or self._st is None:
            return None
        st = self._st
        x = args[0] if args else next(iter(kwargs.values()))
        if not isinstance(out, torch.Tensor) or min(x.dim(), out.dim()) == 0 or (
            x.shape[0], out.shape[0]) != (st.B, st.B):  # fmt: skip
            raise NotServable(
                f"mode='onepass': layer {self.layers[j][0]!r} ({type(m).__name__}) was called "
                f"on a tensor of shape {list(x.shape)}, not batch-major with B={st.B}"
            )
        if self._audit is not None and id(x) in self._audit.constants:
            raise NotServable(
                f"mode='onepass': layer {self.layers[j][0]!r} ({type(m).__name__}) was called "
                "on a tensor computed without the batch (e.g. a position table indexed by "
                "torch.arange): all samples share its output, so its gradient has no "
                "per-cluster rows"
            )
        d = None if self._audit is None else self._audit.batch_dim(x)
        if d not in (None, 0, _UNTRACKED):  # followed from the batch to another dimension
            raise NotServable(
                f"mode='onepass': layer {self.layers[j][0]!r} ({type(m).__name__}) was called "
                f"on a tensor of shape {list(x.shape)} whose batch dimension is {d}, not 0 (a "
                "sequence-first layout?): its rows are not samples"
            )
        st.ran += 1
        new = None
        if not out.requires_grad:
            new = _Root.apply(out, st.anchor)
            if self._audit is not None and self._audit.batch_dim(out) is not _UNTRACKED:
                self._audit.mark(new, self._audit.batch_dim(out))
            out = new
        grad_fn, slots = self.layers[j][2], self._slots[j]
        # held until used, and dropped by fill when the step ends: the graph's nodes (and this
        # hook) may live longer, and GroupNorm's own node (whose kept statistics the backward
        # reads before the node runs and frees them) would otherwise be in a reference cycle
        # with its hook
        held = [x, out.grad_fn if isinstance(m, nn.GroupNorm) else None]
        self._held.append(held)
        version = x._version  # autograd's own rule for the inputs it saves

        def hook(g: torch.Tensor) -> None:
            if not held:
                raise RuntimeError(
                    f"mode='onepass': the backward reached layer {self.layers[j][0]!r} twice; "
                    "retain_graph and double backward are not supported, use mode='micro'"
                )
            x, node = held
            held.clear()
            if x._version != version:
                raise NotServable(
                    f"mode='onepass': the input of layer {self.layers[j][0]!r} was modified in "
                    "place after the layer used it, so its weight gradient would be computed "
                    "from the modified values (autograd refuses this too); use mode='micro' "
                    "(or 'auto'), or avoid the in-place operation"
                )
            grad_fn(st, m, slots, x, g, node)

        out.register_hook(hook)
        return new

"""Mode "onepass", layer by layer: each served layer configuration (odd and non-square kernels,
stride, dilation, padding "same" / "valid", groups, bias=False, Conv1d, patch convolutions that
are not patchwise, channels_last weights, LayerNorm / GroupNorm with their own eps, GroupNorm on
an input that does not require grad, Embedding with padding_idx or called twice, Linear on
many tokens) gives J equal to per-cluster autograd on every code path (per-cluster calls,
grouped convolutions, batched products), with empty clusters and with rows added to (keep).
Also: a layer a step skips gets zero rows; the one-call policy's limit; the batch dimension
through 2-D transposes and reductions; and the checks: layers the formulas do not cover are
not served, gradient hooks and a weight read during another layer's call are refused."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from test_onepass import reference_J
from torch import nn

from antdiff import ANT
from antdiff.engine import onepass
from antdiff.engine.onepass import unsupported_parameters
from antdiff.schedules import linear_schedule

T = 100
# uneven counts, a one-sample cluster and an empty one (k = 4): [4, 4, 0, 1] after sorting
TS = [3, 4, 5, 6, 30, 31, 32, 33, 95]


def _policies(monkeypatch, calls: str) -> None:
    """Pin the CPU code path: "split" (a call per cluster), "grouped" (one grouped
    convolution) or "batched" (one batched product, grouped convolutions too)."""
    big = 10**9
    monkeypatch.setitem(onepass.GROUPED_CONV, "cpu", None if calls == "split" else big)
    monkeypatch.setitem(onepass.BATCHED_PRODUCTS, "cpu", big if calls == "batched" else None)


def _fill(ant, loss_fn, batch, t, counts, mode, keep=False):
    ant.mode = mode
    buf = ant._grad_buffer()
    ant._fill_J(buf, loss_fn, batch, t, counts, None, keep=keep)
    return buf.J.clone()


class Head(nn.Module):
    """``layer`` on the batch, then tanh and a linear read-out scaled by t (clusters differ)."""

    def __init__(self, layer: nn.Module, width: int, pre: nn.Module | None = None) -> None:
        super().__init__()
        self.pre = pre
        self.layer = layer
        self.out = nn.Linear(width, 1)

    def forward(self, x, t):
        h = self.layer(x if self.pre is None else torch.tanh(self.pre(x)))
        return self.out(torch.tanh(h).flatten(1)).squeeze(1) * (1 + t / T)


def _check(model, x, monkeypatch, calls, ts=TS):
    _policies(monkeypatch, calls)
    torch.manual_seed(0)
    model = model.double()
    for p in model.parameters():  # non-trivial affine norms and biases
        with torch.no_grad():
            p.add_(0.3 * torch.randn_like(p))
    ant = ANT(linear_schedule(T), k=4, method="pcgrad", model=model, sampling="uniform")
    b2, t2, counts = ant._sorted(x.double() if x.is_floating_point() else x, torch.tensor(ts))
    assert 0 in counts and 1 in counts

    def loss_fn(b, tt):
        return model(b, tt) ** 2

    J = _fill(ant, loss_fn, b2, t2, counts, "onepass")  # noqa: N806
    ref = reference_J(model, loss_fn, b2, t2, ant.clusters, ant.k)
    assert ref.abs().sum(1).max() > 0
    torch.testing.assert_close(J, ref, rtol=1e-9, atol=1e-11)


_CONVS = {
    "strided_no_bias": (lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False), 8, 4 * 16),
    "dilated_same": (lambda: nn.Conv2d(3, 4, 3, dilation=2, padding="same"), 6, 4 * 36),
    "even_kernel_dilated_same": (lambda: nn.Conv2d(3, 4, 2, dilation=2, padding="same"), 5, 4 * 25),
    "valid": (lambda: nn.Conv2d(3, 4, 3, padding="valid"), 6, 4 * 16),
    "asymmetric": (lambda: nn.Conv2d(3, 4, (3, 1), stride=(1, 2), padding=(1, 0)), 6, 4 * 18),
    "kernel_is_stride_grouped": (lambda: nn.Conv2d(4, 4, 2, stride=2, groups=2), 6, 4 * 9),
    "kernel_is_stride_dilated": (lambda: nn.Conv2d(3, 4, 2, stride=2, dilation=2), 7, 4 * 9),
    "kernel_is_stride_padded": (lambda: nn.Conv2d(3, 4, 2, stride=2, padding=1), 6, 4 * 16),
    "patch_non_square": (lambda: nn.Conv2d(3, 4, (2, 3), stride=(2, 3)), 7, 4 * 6),
    "one_by_one_dilated": (lambda: nn.Conv2d(3, 4, 1, dilation=2), 3, 4 * 9),
    "one_by_one_wide": (lambda: nn.Conv2d(8, 8, 1), 2, 8 * 4),
    "conv1d_strided": (lambda: nn.Conv1d(3, 4, 5, stride=2, padding=2), 9, 4 * 5),
    "conv1d_dilated_same": (lambda: nn.Conv1d(3, 4, 3, padding="same", dilation=3), 8, 4 * 8),
    "conv1d_grouped": (lambda: nn.Conv1d(4, 6, 3, groups=2, bias=False), 7, 6 * 5),
}


@pytest.mark.parametrize("calls", ["split", "grouped", "batched"])
@pytest.mark.parametrize("name", sorted(_CONVS))
def test_conv_configurations_equal_per_cluster_autograd(name, calls, monkeypatch):
    make, side, width = _CONVS[name]
    layer = make()
    cin = layer.in_channels
    dims = (cin, side) if isinstance(layer, nn.Conv1d) else (cin, side, side)
    x = torch.randn(9, *dims, generator=torch.Generator().manual_seed(1))
    _check(Head(layer, width), x, monkeypatch, calls)


@pytest.mark.parametrize("calls", ["split", "grouped"])
def test_conv_after_a_layer_equals_per_cluster_autograd(calls, monkeypatch):
    """The conv's input requires grad (no identity node) and its bias rows come with the
    weight's from the grouped call."""
    x = torch.randn(9, 2, 5, 5, generator=torch.Generator().manual_seed(2))
    pre = nn.Conv2d(2, 4, 3, padding=1)
    _check(Head(nn.Conv2d(4, 4, 3, padding=1, groups=2), 4 * 25, pre), x, monkeypatch, calls)


_NORMS = {
    "layer_norm_eps": (lambda: nn.LayerNorm(6, eps=0.5), None, (5, 6), 30),
    "layer_norm_2d_shape": (lambda: nn.LayerNorm([5, 6], eps=0.2), None, (5, 6), 30),
    "layer_norm_no_bias": (lambda: nn.LayerNorm(6, bias=False), None, (5, 6), 30),
    "layer_norm_after_linear": (
        lambda: nn.LayerNorm(6, eps=0.5),
        lambda: nn.Linear(6, 6),
        (5, 6),
        30,
    ),
    "group_norm_on_the_batch": (lambda: nn.GroupNorm(2, 4, eps=0.5), None, (4, 3, 3), 36),
    "group_norm_flat": (lambda: nn.GroupNorm(2, 4, eps=0.5), None, (4,), 4),
    "group_norm_after_conv": (
        lambda: nn.GroupNorm(2, 4, eps=0.5),
        lambda: nn.Conv2d(4, 4, 3, padding=1),
        (4, 3, 3),
        36,
    ),
}


@pytest.mark.parametrize("name", sorted(_NORMS))
def test_norm_configurations_equal_per_cluster_autograd(name, monkeypatch):
    make, pre, dims, width = _NORMS[name]
    x = torch.randn(9, *dims, generator=torch.Generator().manual_seed(3))
    model = Head(make(), width, None if pre is None else pre())
    _check(model, x, monkeypatch, "split")


class Tokens(nn.Module):
    """Two embeddings (one with padding_idx, one called twice) and a Linear on [B, 2, 3, D]."""

    def __init__(self, bias: bool) -> None:
        super().__init__()
        self.tok = nn.Embedding(5, 4, padding_idx=2)
        self.pos = nn.Embedding(5, 4)
        self.lin = nn.Linear(4, 3, bias=bias)
        self.out = nn.Linear(3, 1)

    def forward(self, ids, t):
        h = self.tok(ids) + self.pos(ids) * self.pos(4 - ids)  # [B, 6, 4]
        h = self.lin(torch.tanh(h.view(h.shape[0], 2, 3, 4)))  # [B, 2, 3, 3]
        return self.out(torch.tanh(h)).sum((1, 2, 3)) * (1 + t / T)


@pytest.mark.parametrize("calls", ["split", "batched"])
@pytest.mark.parametrize("bias", [True, False])
def test_embeddings_and_token_linears_equal_per_cluster_autograd(bias, calls, monkeypatch):
    ids = torch.randint(0, 5, (9, 6), generator=torch.Generator().manual_seed(4))
    ids[0, :3] = 2  # the padding row is used, and gets no gradient
    _check(Tokens(bias), ids, monkeypatch, calls)


@pytest.mark.parametrize("tokens", [(), (1,), (2,), (2, 3)])
def test_linear_bias_rows_sum_over_every_token(tokens, monkeypatch):
    x = torch.randn(9, *tokens, 6, generator=torch.Generator().manual_seed(8))
    _check(Head(nn.Linear(6, 3), 3 * math.prod(tokens)), x, monkeypatch, "split")


def test_batch_dimension_after_two_dimensional_transposes():
    from antdiff.engine.onepass import _batch_dim_after as after

    x = torch.empty(5, 3)
    assert after(torch.t, (x,), {}, x, x.t(), 0) == 1
    assert after(torch.Tensor.t, (x,), {}, x, x.t(), 1) == 0
    y = torch.empty(5)
    assert after(torch.t, (y,), {}, y, y.t(), 0) == 0  # a 1-D t() keeps it
    z = torch.empty(3, 5)  # batch dim 1, reduced over dim 0: counted from the right, it is 0
    assert after(torch.sum, (z, 0), {}, z, z.sum(0), 1) == 0


def test_padding_rows_of_an_embedding_stay_zero(monkeypatch):
    _policies(monkeypatch, "split")
    model = Tokens(True).double()
    ant = ANT(linear_schedule(T), k=4, method="pcgrad", model=model, sampling="uniform")
    ids = torch.full((9, 6), 2)
    ids[:, 0] = 1
    b2, t2, counts = ant._sorted(ids, torch.tensor(TS))
    J = _fill(ant, lambda b, tt: model(b, tt) ** 2, b2, t2, counts, "onepass")  # noqa: N806
    rows = J[:, : 5 * 4].view(4, 5, 4)  # tok.weight comes first
    assert rows[:, 2].abs().max() == 0 and rows[:, 1].abs().max() > 0


@pytest.mark.parametrize("calls", ["split", "grouped", "batched"])
def test_channels_last_weights_equal_micro(calls, monkeypatch):
    """J's rows hold a channels_last weight in its memory order, as micro's do."""
    _policies(monkeypatch, calls)
    torch.manual_seed(0)
    model = Head(nn.Conv2d(4, 4, 3, padding=1), 4 * 16, nn.Conv2d(3, 4, 2, stride=2)).double()
    model = model.to(memory_format=torch.channels_last)
    assert not model.layer.weight.is_contiguous()
    ant = ANT(linear_schedule(T), k=4, method="pcgrad", model=model, sampling="uniform")
    x = torch.randn(9, 3, 8, 8, dtype=torch.float64).to(memory_format=torch.channels_last)
    b2, t2, counts = ant._sorted(x, torch.tensor(TS))

    def loss_fn(b, tt):
        return model(b, tt) ** 2

    J = _fill(ant, loss_fn, b2, t2, counts, "onepass")  # noqa: N806
    ref = _fill(ant, loss_fn, b2, t2, counts, "micro")
    torch.testing.assert_close(J, ref, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("calls", ["split", "grouped", "batched"])
def test_kept_rows_add_the_next_batch(calls, monkeypatch):
    """keep=True adds a micro-batch's rows to J's (clusters empty in one batch and not the
    other): the sum of the two batches' own J."""
    _policies(monkeypatch, calls)
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.GroupNorm(2, 4),
                          nn.Conv2d(4, 4, 2, stride=2))  # fmt: skip
    model = Head(layer, 4 * 4, nn.Conv2d(3, 4, 1)).double()
    ant = ANT(linear_schedule(T), k=4, method="pcgrad", model=model, sampling="uniform")
    g = torch.Generator().manual_seed(5)
    xa, xb = (torch.randn(9, 3, 4, 4, generator=g, dtype=torch.float64) for _ in range(2))
    a = ant._sorted(xa, torch.tensor(TS))
    b = ant._sorted(xb, torch.tensor([1, 60, 61, 62, 63, 80, 81, 82, 83]))
    assert a[2][2] == 0 and b[2][1] == 0

    def loss_fn(bb, tt):
        return model(bb, tt) ** 2

    ja = _fill(ant, loss_fn, *a, "onepass")
    jb = _fill(ant, loss_fn, *b, "onepass")
    _fill(ant, loss_fn, *a, "onepass")
    both = _fill(ant, loss_fn, *b, "onepass", keep=True)
    torch.testing.assert_close(both, ja + jb, rtol=1e-9, atol=1e-11)


def test_rows_of_a_layer_the_loss_skips_are_zero_after_a_step_that_used_it(monkeypatch):
    _policies(monkeypatch, "split")

    class Skip(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 1)
            self.b = nn.Linear(4, 1)
            self.use_b = True

        def forward(self, x, t):
            out = self.a(x).squeeze(1)
            return out + self.b(x).squeeze(1) if self.use_b else out

    model = Skip().double()
    ant = ANT(linear_schedule(T), k=4, method="pcgrad", model=model, sampling="uniform")
    x = torch.randn(9, 4, dtype=torch.float64)
    b2, t2, counts = ant._sorted(x, torch.tensor(TS))
    J = _fill(ant, lambda b, tt: model(b, tt) ** 2, b2, t2, counts, "onepass")  # noqa: N806
    assert J[:, 5:].abs().max() > 0  # b's weight and bias follow a's
    model.use_b = False
    J = _fill(ant, lambda b, tt: model(b, tt) ** 2, b2, t2, counts, "onepass")  # noqa: N806
    assert J[:, 5:].abs().max() == 0 and J[:, :5].abs().max() > 0


def _refused(model, match):
    """A one-pass fill of ``model`` on [9, 4] inputs raises NotServable matching ``match``."""
    ant = ANT(linear_schedule(T), k=4, method="pcgrad", model=model, sampling="uniform",
              mode="onepass")  # fmt: skip
    b2, t2, counts = ant._sorted(torch.randn(9, 4), torch.tensor(TS))
    with pytest.raises(onepass.NotServable, match=match):
        _fill(ant, lambda b, tt: model(b, tt) ** 2, b2, t2, counts, "onepass")


def test_a_post_accumulate_grad_hook_is_refused():
    model = Head(nn.Linear(4, 2), 2)
    model.layer.weight.register_post_accumulate_grad_hook(lambda p: None)
    _refused(model, "gradient hook")


def test_a_weight_used_while_another_layer_runs_is_refused():
    """A layer's weight read during another served layer's call (here by a forward hook of
    that layer) is a use outside its own layer: its gradient would be missed."""
    model = Head(nn.Linear(4, 4), 4, nn.Linear(4, 4))
    model.layer.register_forward_hook(lambda m, a, o: o + F.linear(a[0], model.pre.weight))
    _refused(model, "'pre.weight' is used outside its layer")


def test_layers_the_formulas_do_not_cover_are_not_served():
    model = nn.ModuleDict({
        "freq": nn.Embedding(4, 2, scale_grad_by_freq=True),
        "sparse": nn.Embedding(4, 2, sparse=True),
        "odd_same": nn.Conv2d(2, 2, 4, padding="same"),
        "odd_same_1d": nn.Conv1d(2, 2, (2,), padding="same"),
        "reflect": nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"),
        "even_same": nn.Conv2d(2, 2, 2, dilation=2, padding="same"),
        "odd_kernel_same": nn.Conv1d(2, 2, 3, dilation=3, padding="same"),
    })  # fmt: skip
    bad = {n.split(".")[0] for n in unsupported_parameters(model)}
    assert bad == {"freq", "sparse", "odd_same", "odd_same_1d", "reflect"}


def test_batched_products_of_a_layer_called_twice_under_bf16_autocast(monkeypatch):
    """Half-precision products of a layer's second call add to its first call's rows, in one
    batched product as per cluster."""

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(8, 8)
            self.out = nn.Linear(8, 1)

        def forward(self, x, t):
            h = self.lin(torch.tanh(self.lin(x)))  # [B, 4, 8]
            return self.out(torch.tanh(h)).sum((1, 2)) * (1 + t / T)

    torch.manual_seed(0)
    model = Twice()
    ant = ANT(linear_schedule(T), k=4, method="pcgrad", model=model, sampling="uniform")
    x = torch.randn(9, 4, 8, generator=torch.Generator().manual_seed(7))
    b2, t2, counts = ant._sorted(x, torch.tensor(TS))

    def loss_fn(b, tt):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return (model(b, tt) ** 2).float()

    Js = {}  # noqa: N806
    for calls in ("split", "batched"):
        _policies(monkeypatch, calls)
        Js[calls] = _fill(ant, loss_fn, b2, t2, counts, "onepass")
    scale = float(Js["split"].abs().max())
    torch.testing.assert_close(Js["batched"], Js["split"], rtol=2e-2, atol=2e-2 * scale)


def test_one_call_limit_counts_rows_per_live_cluster_inclusively():
    """A layer's k rows come from one call while the batch's rows (B times the rows a sample
    gives) are at most the limit times the live clusters, never with one live cluster (no
    cluster to pad to) and never where the device's limit is None."""

    def one_call(limit, counts, rows=16):
        cid = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
        st = onepass._Step(cid, counts, len(counts), torch.float32)
        return onepass._one_call({"cpu": limit}, st, rows)

    assert one_call(48, [4, 4, 0, 1])  # 9 * 16 = 48 * 3 live clusters
    assert not one_call(47, [4, 4, 0, 1])
    assert not one_call(None, [4, 4, 0, 1])
    assert not one_call(10**9, [5, 0])  # one live cluster, no padding (2 * 5 <= 2 * 5)
    assert one_call(10**9, [3, 2])


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_kept_rows_add_to_what_j_holds(layout, monkeypatch):
    """keep=True adds to J's rows as they are, whichever mode wrote them: a channels_last
    weight's rows too (one-pass forms them in its own buffer, then copies them into J)."""
    _policies(monkeypatch, "split")
    torch.manual_seed(0)
    model = Head(nn.Conv2d(4, 4, 3, padding=1), 4 * 16, nn.Conv2d(3, 4, 2, stride=2)).double()
    model = model.to(memory_format=layout)
    ant = ANT(linear_schedule(T), k=4, method="pcgrad", model=model, sampling="uniform")
    g = torch.Generator().manual_seed(6)
    xa, xb = (torch.randn(9, 3, 8, 8, generator=g, dtype=torch.float64) for _ in range(2))
    a = ant._sorted(xa, torch.tensor(TS))
    b = ant._sorted(xb, torch.tensor([1, 60, 61, 62, 63, 80, 81, 82, 83]))

    def loss_fn(bb, tt):
        return model(bb, tt) ** 2

    jb = _fill(ant, loss_fn, *b, "onepass")
    ja = _fill(ant, loss_fn, *a, "micro")  # J now holds micro's rows, one-pass's buffer jb's
    both = _fill(ant, loss_fn, *b, "onepass", keep=True)
    torch.testing.assert_close(both, ja + jb, rtol=1e-9, atol=1e-11)

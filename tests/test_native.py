"""antdiff.mtl.native: the C++ PCGrad and Nash-MTL solvers for CPU Gram matrices equal the
float64 torch references, and the dispatch sends CPU tensors to them only under the auto
policy when no Triton kernel serves them."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ant_kernels.reference import nash_weights_ref, pcgrad_weights_ref
from antdiff.mtl import make_method, native


@pytest.fixture
def no_interpreter(monkeypatch):
    """CPU tensors as in production: Triton does not serve them, the C++ solvers do."""
    assert native._C is not None, "antdiff._C is not built: run `make build`"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("ANT_KERNELS_BACKEND", "auto")


def _gram(k: int, seed: int, cosine: float | None = None, zero: tuple[int, ...] = ()):
    """G = J J^T (float64) for random J, or for rows at pairwise cosine ``cosine``."""
    g = torch.Generator().manual_seed(seed)
    if cosine is None:
        J = torch.randn(k, 40, generator=g, dtype=torch.float64)
        J = J * torch.logspace(-2, 2, k, dtype=torch.float64)[:, None]  # badly scaled rows
    else:
        base = torch.randn(40, generator=g, dtype=torch.float64)
        noise = torch.randn(k, 40, generator=g, dtype=torch.float64)
        J = base + noise * math.sqrt((1 - cosine) / cosine) / math.sqrt(40) * base.norm()
    J[list(zero)] = 0.0
    return J @ J.T


def _orders(k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(k, generator=g) for _ in range(k)])


@pytest.mark.parametrize("k", [1, 2, 3, 5, 8, 16, 33])
@pytest.mark.parametrize("seed", [0, 1])
def test_pcgrad_equals_reference(no_interpreter, k, seed):
    g = torch.Generator().manual_seed(seed)
    sign = torch.randint(0, 2, (k, 1), generator=g, dtype=torch.float64) * 2 - 1
    J = sign * torch.randn(40, generator=g, dtype=torch.float64)  # many conflicting pairs
    J = J + 0.8 * torch.randn(k, 40, generator=g, dtype=torch.float64)
    G = J @ J.T
    o = _orders(k, seed)
    assert native.serves("pcgrad", G)
    w = native.pcgrad_weights(G, o)
    assert w.dtype == torch.float64
    torch.testing.assert_close(w, pcgrad_weights_ref(G, o), rtol=1e-12, atol=1e-12)
    assert k < 3 or (G < 0).any()


@pytest.mark.parametrize("k", [1, 2, 5, 16, 32, 40])
@pytest.mark.parametrize("cosine", [None, 0.999])
@pytest.mark.parametrize("normalize", [True, False])
def test_nash_equals_reference_and_solves_the_fixed_point(no_interpreter, k, cosine, normalize):
    G = _gram(k, k, cosine)
    a = native.nash_weights(G, iters=20, normalize=normalize)
    torch.testing.assert_close(a, nash_weights_ref(G, 20, normalize), rtol=1e-9, atol=1e-12)
    Gn = G / torch.linalg.matrix_norm(G) if normalize else G
    assert (a * (Gn @ a) - 1).abs().max() < 1e-10 and (a > 0).all()


def test_nash_degenerate_inputs(no_interpreter):
    G = _gram(5, 3, zero=(1, 4))  # clusters 1 and 4: no gradient -> weight 0
    a = native.nash_weights(G)
    torch.testing.assert_close(a, nash_weights_ref(G), rtol=1e-9, atol=1e-12)
    assert a[1] == 0 and a[4] == 0 and (a[[0, 2, 3]] > 0).all()
    bad = G.clone()
    bad[2, 3] = float("nan")
    assert native.nash_weights(bad).isnan().all() and nash_weights_ref(bad).isnan().all()
    # no steps: the start point, which solves orthogonal or parallel gradients only, is refused
    assert native.nash_weights(G, iters=0).isnan().all() and nash_weights_ref(G, 0).isnan().all()
    diag = torch.diag(torch.tensor([1.0, 4.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(native.nash_weights(diag, iters=0), nash_weights_ref(diag, 0))
    assert torch.isfinite(native.nash_weights(diag, iters=0)).all()


def test_float32_gram_matches_the_reference_on_the_same_values(no_interpreter):
    G = _gram(6, 5).float()
    o = _orders(6, 5)
    torch.testing.assert_close(
        native.pcgrad_weights(G, o), pcgrad_weights_ref(G.double(), o), rtol=1e-12, atol=1e-12
    )
    torch.testing.assert_close(native.nash_weights(G), nash_weights_ref(G.double()))


def test_dispatch(monkeypatch):
    assert native._C is not None, "antdiff._C is not built: run `make build`"
    G = _gram(4, 0)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    for policy, expect in (("auto", True), ("torch", False), ("triton", False)):
        monkeypatch.setenv("ANT_KERNELS_BACKEND", policy)
        assert native.serves("nash", G) is expect
    monkeypatch.setenv("ANT_KERNELS_BACKEND", "auto")
    monkeypatch.setattr(native, "_C", None)
    assert not native.serves("pcgrad", G)
    torch.testing.assert_close(native.nash_weights(G), nash_weights_ref(G))  # the reference


def test_views_and_layouts(no_interpreter):
    """A transposed, a negated (lazy neg view) and a sliced Gram give the values they show."""
    G = _gram(5, 2)
    o = _orders(5, 2)
    big = torch.zeros(7, 7, dtype=torch.float64)
    big[1:6, 2:7] = G
    for view, values in ((G.T, G.T), (torch._neg_view(-G), G), (big[1:6, 2:7], G)):
        torch.testing.assert_close(native.pcgrad_weights(view, o), pcgrad_weights_ref(values, o))
        torch.testing.assert_close(native.nash_weights(view), nash_weights_ref(values))
    with pytest.raises(ValueError, match="dense"):
        native.nash_weights(G.to_sparse())


def test_bad_input(no_interpreter):
    G = _gram(3, 0)
    for iters in (2.7, True, "3"):
        with pytest.raises(ValueError, match="iters must be an integer"):
            native.nash_weights(G, iters=iters)
    with pytest.raises(ValueError, match="orders must be"):
        native.pcgrad_weights(G, _orders(4, 0))
    with pytest.raises(ValueError, match="iters must be an integer >= 0"):
        native.nash_weights(G, iters=-1)
    with pytest.raises(ValueError, match="k must be >= 1"):
        native._C._nash_weights_at(G.data_ptr(), 0, 20, True, G.data_ptr())
    # the address-taking solvers are private and refuse a null address (it was a segfault)
    with pytest.raises(ValueError, match="null buffer address"):
        native._C._pcgrad_weights_at(0, 0, 3, 0)
    with pytest.raises(ValueError, match="null buffer address"):
        native._C._philox_uniform_at(1, 0, 0, 4, 0)
    assert not hasattr(native._C, "pcgrad_weights")
    # the private entry points check what the Python wrappers would have checked
    with pytest.raises(ValueError, match="iters must be >= 0"):
        native._C._nash_weights_at(G.data_ptr(), 3, -1, True, G.data_ptr())
    step, out = torch.tensor([3]), torch.zeros(8)
    J, keep, div = torch.randn(2, 8), torch.ones(2), torch.tensor([2.0])  # noqa: N806
    with pytest.raises(ValueError, match="offset"):
        native._C._philox_uniform_at(1, step.data_ptr(), -1, 4, out.data_ptr())
    for k, stride in ((2, 7), (0, 8)):  # overlapping rows, no row
        with pytest.raises(ValueError):
            native._C._graddrop_at(
                J.data_ptr(), k, 8, stride, keep.data_ptr(), 1, step.data_ptr(), 0.0,
                div.data_ptr(), out.data_ptr(),
            )  # fmt: skip
    for counter, key in (([0] * 5, [0, 0]), ([0] * 4, [0] * 3), ([0] * 3, [0, 0])):
        with pytest.raises(ValueError):
            native._C.philox4x32(counter, key)


def test_pcgrad_skips_what_the_orders_leave_out(no_interpreter):
    """Order entries outside [0, k) are skipped (no projection); a cluster with a zero norm is
    never projected on, even where its Gram row is not exactly 0 (a float32 underflow); a
    non-finite Gram gives NaN weights, which the engine reads as no solution."""
    g = torch.Generator().manual_seed(0)
    J = torch.randn(3, 6, generator=g, dtype=torch.float64)  # noqa: N806
    G = J @ J.T  # noqa: N806

    def at(orders):
        w = torch.empty(3, dtype=torch.float64)
        o = torch.tensor(orders, dtype=torch.int64)
        native._C._pcgrad_weights_at(G.data_ptr(), o.data_ptr(), 3, w.data_ptr())
        return w

    assert at([[-1] * 3] * 3).tolist() == [1.0, 1.0, 1.0]
    orders = [[1, 2, -1], [-1, 0, 2], [5, 1, 0]]  # -1 and 5: skipped
    want = torch.zeros(6, dtype=torch.float64)
    for i, row in enumerate(orders):  # PCGrad in parameter space, the valid entries only
        gi = J[i].clone()
        for j in (j for j in row if 0 <= j < 3):
            d = gi @ J[j]
            gi = gi - d / (J[j] @ J[j]) * J[j] if d < 0 else gi
        want += gi
    torch.testing.assert_close(at(orders) @ J, want, rtol=1e-12, atol=1e-12)
    G = _gram(3, 0)  # noqa: N806
    under = torch.tensor([[1.0, -1e-20], [-1e-20, 0.0]], dtype=torch.float64)
    o = torch.tensor([[1, 0], [0, 1]])
    assert native.pcgrad_weights(under, o).tolist() == [1.0, 1.0]
    assert pcgrad_weights_ref(under, o).tolist() == [1.0, 1.0]
    for bad in (float("nan"), float("inf")):
        Gb = G.clone()  # noqa: N806
        Gb[0, 2] = Gb[2, 0] = bad
        assert native.pcgrad_weights(Gb, _orders(3, 1)).isnan().all()


@pytest.mark.parametrize("absent", [False, True])
def test_nash_iterates_equal_the_reference_at_every_step(no_interpreter, absent):
    """Not only converged: the damped Newton iterates (step rule, an absent cluster's row, the
    solved test) after each of the first steps."""
    g = torch.Generator().manual_seed(0)
    J = torch.randn(5, 40, generator=g, dtype=torch.float64)  # noqa: N806
    J = J * torch.tensor([0.1, 1, 3, 10, 0.5], dtype=torch.float64)[:, None]  # noqa: N806
    if absent:
        J[1] = 0.0
    G = J @ J.T  # noqa: N806
    for iters in range(1, 9):
        torch.testing.assert_close(native.nash_weights(G, iters=iters), nash_weights_ref(G, iters),
                                   rtol=1e-9, atol=1e-12, equal_nan=True)  # fmt: skip


@pytest.mark.parametrize("name", ["pcgrad", "nash"])
def test_methods_give_the_reference_weights(monkeypatch, name):
    """The gradient methods' weights through the C++ solvers equal those of the torch path."""
    G = _gram(5, 7).float()
    present = torch.ones(5, dtype=torch.bool)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    out = {}
    for policy in ("auto", "torch"):
        monkeypatch.setenv("ANT_KERNELS_BACKEND", policy)
        out[policy] = make_method(name, 5).weights(G, present)
    torch.testing.assert_close(out["auto"], out["torch"], rtol=1e-6, atol=1e-9)


def _uw_inputs(k: int, B: int, seed: int, absent: tuple[int, ...] = ()):  # noqa: N803
    """per [B], s [k], cid [B] (clusters ``absent`` left out), 1 / counts and presence [k]."""
    g = torch.Generator().manual_seed(seed)
    live = torch.tensor([i for i in range(k) if i not in absent])
    cid = live[torch.randint(0, len(live), (B,), generator=g)]
    counts = torch.bincount(cid, minlength=k).float()
    per = torch.rand(B, generator=g) * 3
    s = torch.randn(k, generator=g)
    return per, s, cid, 1.0 / counts.clamp(min=1), (counts > 0).float()


def _uw_torch(per, s, cid, inv, present):
    """UW's reduction with torch operators in float64: total, L, c, coef, ds."""
    k = inv.shape[0]
    L = torch.zeros(k, dtype=torch.float64).index_add(0, cid, per.double()) * inv.double()
    p = present.double()
    c = p * torch.exp(-s.double()) / (2 * k)
    total = (c * L + 0.5 * s.double() * p).sum()
    return total, L, c, c * inv.double(), 0.5 * p - c * L


@pytest.mark.parametrize("k,B,absent", [(1, 1, ()), (5, 128, ()), (5, 13, (1, 3)), (32, 40, (0,))])
def test_uw_forward_and_backward_equal_the_torch_formulas(k, B, absent):  # noqa: N803
    assert native._C is not None, "antdiff._C is not built: run `make build`"
    per, s, cid, inv, present = _uw_inputs(k, B, k + B, absent)
    assert native.serves_uw(per, s, cid, inv, present)
    got = native.uw_forward(per, s, cid, inv, present)
    for a, b in zip(got, _uw_torch(per, s, cid, inv, present)):
        assert a.dtype == torch.float32 and a.shape == b.shape
        torch.testing.assert_close(a.double(), b, rtol=2e-6, atol=1e-7)
    g = torch.tensor(0.75)
    coef = got[3]
    torch.testing.assert_close(native.uw_backward(g, coef, cid), 0.75 * coef[cid])


def test_uw_forward_propagates_nonfinite_values():
    per, s, cid, inv, present = _uw_inputs(4, 16, 0, absent=(2,))
    for bad in (float("nan"), float("inf")):
        p = per.clone()
        p[3] = bad
        total, L, *_ = native.uw_forward(p, s, cid, inv, present)
        assert not math.isfinite(float(total)) and not math.isfinite(float(L[cid[3]]))
    s2 = s.clone()
    s2[2] = -200.0  # exp(-s) overflows for the absent cluster: NaN, as the torch path gives
    assert math.isnan(float(native.uw_forward(per, s2, cid, inv, present)[0]))


def test_graddrop_of_a_negative_view_equals_the_reference(no_interpreter):
    from ant_kernels.reference import graddrop_ref

    J = torch.randn(3, 20)
    present, div, step = torch.ones(3, dtype=torch.bool), torch.tensor(3.0), torch.tensor(2)
    want = graddrop_ref(J, present, 1, step, 0.0, div)
    assert torch.equal(native.graddrop(torch._neg_view(-J), present, 1, step, 0.0, div), want)
    neg_div, neg_step = torch._neg_view(-div), torch._neg_view(-step)  # scalars too
    assert torch.equal(native.graddrop(J, present, 1, neg_step, 0.0, neg_div), want)


def test_a_stale_extension_is_refused_with_the_rebuild_hint(monkeypatch):
    """A build from older sources imported fine, then failed mid-step with AttributeError
    (a binding it lacks): now it counts as missing, with a message that says to rebuild."""
    import importlib

    from antdiff import _C, interval_dp

    monkeypatch.setattr(_C, "ABI_VERSION", interval_dp.ABI_VERSION - 1)
    monkeypatch.setattr(interval_dp, "_cpp", {"tried": False, "module": None, "error": None,
                                              "warned": False})  # fmt: skip
    with pytest.raises(ImportError, match="is stale: built with bindings version"):
        interval_dp.solve_intervals("l1", 2, values=np.arange(6.0), backend="cpp")
    try:
        with pytest.warns(RuntimeWarning, match="stale.*using the torch references"):
            importlib.reload(native)
        assert native._C is None and not native.serves_uw(*_uw_inputs(4, 16, 1))
    finally:
        monkeypatch.undo()
        importlib.reload(native)
    assert native._C is not None


def test_uw_serves_only_contiguous_cpu_float32():
    per, s, cid, inv, present = _uw_inputs(4, 16, 1)
    assert native.serves_uw(per, s, cid, inv, present)
    assert not native.serves_uw(per.bfloat16(), s, cid, inv, present)
    assert not native.serves_uw(per, s, cid.int(), inv, present)
    assert not native.serves_uw(torch.rand(32)[::2], s, cid, inv, present)
    assert not native.serves_uw(per.to("meta"), s, cid, inv, present)


def test_uw_forward_refuses_bad_input():
    per, s, cid, inv, present = _uw_inputs(4, 16, 2)
    with pytest.raises(ValueError, match="needs per, cid"):
        native.uw_forward(per, s, cid[:-1], inv, present)
    with pytest.raises(ValueError, match="needs per, cid"):
        native.uw_forward(per, s, cid, torch.ones(5), present)
    for bad_inv in (torch.empty(4, 0), torch.ones(4, 2)):  # [4, 0] read 4 floats at address 0
        with pytest.raises(ValueError, match="needs per, cid"):
            native.uw_forward(per, s, cid, bad_inv, present)
    # a negative view stores -per: read raw it gave the total's sign flipped
    with pytest.raises(ValueError, match="a negative view"):
        native.uw_forward(torch._neg_view(-per), s, cid, inv, present)
    assert not native.serves_uw(torch._neg_view(-per), s, cid, inv, present)
    cid[5] = 4
    with pytest.raises(ValueError, match="cluster id 4 outside"):
        native.uw_forward(per, s, cid, inv, present)
    cid[5] = 1
    # the C++ reads raw pointers: a dtype, device or layout it does not read is refused
    with pytest.raises(ValueError, match="per must be a contiguous CPU torch.float32"):
        native.uw_forward(per.double(), s, cid, inv, present)  # was read as float32
    with pytest.raises(ValueError, match="cid must be a contiguous CPU torch.int64"):
        native.uw_forward(per, s, cid.int(), inv, present)
    with pytest.raises(ValueError, match="s must be a contiguous CPU torch.float32"):
        native.uw_forward(per, torch.zeros(8)[::2], cid, inv, present)
    g, coef = torch.tensor(0.5), torch.rand(4)
    with pytest.raises(ValueError, match="cid must be a contiguous CPU torch.int64"):
        native.uw_backward(g, coef, cid.int())  # read as int64, it crashed the process
    with pytest.raises(ValueError, match=r"cluster id 7 outside \[0, 4\)"):
        native.uw_backward(g, coef, torch.where(cid == 1, 7, cid))
    neg = torch.where(cid == 1, -1, cid)  # read coef[-1] / wrote before the sums
    with pytest.raises(ValueError, match=r"cluster id -1 outside \[0, 4\)"):
        native.uw_backward(g, coef, neg)
    with pytest.raises(ValueError, match=r"cluster id -1 outside \[0, 4\)"):
        native.uw_forward(per, s, neg, inv, present)
    with pytest.raises(ValueError, match="g 0-d"):
        native.uw_backward(g.reshape(1), coef, cid)
    torch.testing.assert_close(native.uw_backward(g, coef, cid), 0.5 * coef[cid])
    uw = make_method("uw", 4).loss
    with pytest.raises(ValueError, match="inv must be"):
        uw.fused_total(per, cid[:-1], inv, present)


def test_uw_forward_sums_in_double():
    """2**22 losses of one cluster: a float32 running sum drifts (3e-5 relative), the double
    one keeps the float64 mean to float32 rounding."""
    B = 1 << 22  # noqa: N806
    per = torch.rand(B, generator=torch.Generator().manual_seed(0)) * 3
    L = native.uw_forward(per, torch.zeros(1), torch.zeros(B, dtype=torch.int64),  # noqa: N806
                          torch.tensor([1.0 / B]), torch.ones(1))[1]  # fmt: skip
    assert float(L[0]) == pytest.approx(float(per.double().mean()), rel=1e-6)

"""Loss-space MTL methods (LS, UW, RLW, DWA, FAMO) against closed forms and float64 references."""

from __future__ import annotations

import io

import pytest
import torch

from antdiff.mtl import DWA, FAMO, LOSS_METHODS, LS, RLW, UW, make_method

LOSS_CLASSES = [LS, UW, RLW, DWA, FAMO]


def _present(k: int, absent: tuple[int, ...] = ()) -> torch.Tensor:
    p = torch.ones(k, dtype=torch.bool)
    p[list(absent)] = False
    return p


def _losses(k: int, seed: int, present: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    L = torch.rand(k, generator=g, dtype=torch.float64) * 2 + 0.05
    return torch.where(present, L, 0.0)


def _dloss(m, L: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """d total / d L_i via autograd (the effective per-cluster weights)."""
    L = L.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(m(L, present), L)
    return g


def _roundtrip(sd: dict) -> dict:
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# ---------------------------------------------------------------- UW
def test_uw_gradients_match_closed_form():
    k, P = 4, 6
    present = _present(k, (2,))
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(k, 3, P, generator=gen, dtype=torch.float64)
    y = torch.randn(k, 3, generator=gen, dtype=torch.float64)
    theta = torch.randn(P, generator=gen, dtype=torch.float64, requires_grad=True)
    m = UW(k).double()
    with torch.no_grad():
        m.s.copy_(torch.tensor([0.3, -0.7, 1.1, 0.0]))
    r = A @ theta - y  # [k, 3]
    L = torch.where(present, (r * r).mean(1), 0.0)  # the engine's cluster losses
    m(L, present).backward()
    s, Ld = m.s.detach(), L.detach()
    ds = torch.where(present, 0.5 * (1 - torch.exp(-s) * Ld / k), 0.0)
    torch.testing.assert_close(m.s.grad, ds)
    # closed form of the model gradient: sum_i 0.5 exp(-s_i) / k * (2/3) A_i^T r_i
    rd = r.detach()
    coef = torch.where(present, 0.5 * torch.exp(-s) / k, 0.0)
    dtheta = torch.einsum("i,ijp,ij->p", coef * 2 / 3, A, rd)
    torch.testing.assert_close(theta.grad, dtheta)
    total = torch.where(present, 0.5 * (torch.exp(-s) * Ld / k + s), 0.0).sum()
    torch.testing.assert_close(m(Ld, present), total)
    assert m.param_groups() == [{"params": [m.s], "lr": 0.025, "weight_decay": 0.0}]


def test_uw_absent_cluster_gets_no_gradient_even_if_nan():
    m = UW(3)
    L = torch.tensor([1.0, float("nan"), 2.0], requires_grad=True)
    present = _present(3, (1,))
    out = m(L, present)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(m.s.grad).all() and m.s.grad[1] == 0
    assert L.grad[1] == 0


def _method_with_absent_cluster(cls):
    """k = 5, cluster 3 absent, the method in float64 (UW with s away from 0)."""
    k = 5
    m = cls(k).double()
    if isinstance(m, UW):
        with torch.no_grad():
            m.s.copy_(torch.tensor([0.3, -0.7, 1.1, 0.0, -2.0]))
    return k, _present(k, (3,)), m


@pytest.mark.parametrize("cls", LOSS_CLASSES)
def test_slopes_equal_autograd_of_the_terms(cls):
    """slopes() (closed form where a method gives one) == d terms_i / d L_i by autograd."""
    k, present, m = _method_with_absent_cluster(cls)
    for step in range(3):  # stateful methods (DWA, FAMO) move between steps
        L = _losses(k, step, present)
        c = m.slopes(L, present)
        assert not c.requires_grad and c.shape == (k,)
        torch.testing.assert_close(c, _dloss(m, L, present), rtol=1e-12, atol=0)
        assert c[3] == 0
        m.observe(L, present)


@pytest.mark.parametrize("cls", LOSS_CLASSES)
def test_grads_equal_autograd_of_the_total(cls):
    """grads() (UW's closed form, the others' autograd default) == d total / d (L, parameters)
    by autograd on the total, in float64, with an absent cluster."""
    k, present, m = _method_with_absent_cluster(cls)
    params = [p for p in m.parameters() if p.requires_grad]
    for step in range(3):
        L = _losses(k, step, present)
        c, grads = m.grads(L, present)
        Lr = L.clone().requires_grad_(True)
        ref = torch.autograd.grad(m(Lr, present), [Lr, *params], allow_unused=True)
        torch.testing.assert_close(c, ref[0], rtol=1e-12, atol=0)
        assert len(grads) == len(params) and not c.requires_grad
        for g, r in zip(grads, ref[1:]):
            assert (g is None) is (r is None)
            if g is not None:
                assert not g.requires_grad and g.dtype == r.dtype
                torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-15)
        m.observe(L, present)
    assert params or cls is not UW


# ---------------------------------------------------------------- LS, RLW
def test_ls_is_mean_over_present():
    k = 5
    present = _present(k, (0, 3))
    L = _losses(k, 1, present)
    m = make_method("ls", k).loss
    torch.testing.assert_close(m(L, present), L[present].mean())
    w = _dloss(m, L, present)
    torch.testing.assert_close(w, torch.where(present, 1 / 3, 0.0).double())


def test_rlw_weights_softmax_of_normals():
    k = 5
    present = _present(k, (4,))
    L = _losses(k, 2, present)
    m = RLW(k, seed=3).double()
    seen = []
    for _ in range(400):
        w = _dloss(m, L, present)
        # transform is pure: same weights until observe draws new ones
        torch.testing.assert_close(_dloss(m, L, present), w)
        z = m.draw[present]
        torch.testing.assert_close(w[present], torch.softmax(z, 0))
        assert w[4] == 0 and abs(w.sum() - 1) < 1e-12
        seen.append(w)
        m.observe(L, present)
    mean = torch.stack(seen).mean(0)
    assert (mean[present] - 0.25).abs().max() < 0.03  # E[w] = 1/k_present
    draws = torch.stack(seen)[:, :4]
    assert draws.std(0).min() > 0.05  # really random per step


# ---------------------------------------------------------------- DWA
def test_dwa_matches_definition():
    k, T = 4, 2.0
    m = DWA(k, temperature=T)
    hist: list[tuple[torch.Tensor, torch.Tensor]] = []
    masks = [(), (), (1,), (), (3,), (), ()]
    for step, absent in enumerate(masks):
        present = _present(k, absent)
        L = _losses(k, 10 + step, present)
        w = _dloss(m, L, present)
        # reference: last two observed losses of each cluster, equal weights until known
        ratio = torch.ones(k, dtype=torch.float64)
        for i in range(k):
            obs = [Lh[i] for Lh, ph in hist if ph[i]]
            if len(obs) >= 2:
                ratio[i] = obs[-1] / obs[-2]
        ref = torch.zeros(k, dtype=torch.float64)
        ref[present] = torch.softmax(ratio[present] / T, 0)
        torch.testing.assert_close(w, ref)
        if step < 2:
            torch.testing.assert_close(w[present], torch.full((int(present.sum()),), 0.25).double())
        m.observe(L, present)
        hist.append((L, present))


@pytest.mark.parametrize("window", [2, 3])
def test_dwa_window_compares_loss_averages(window):
    """With ``window`` steps per average (DWA's epochs), the ratio is of each cluster's last two
    window means over its observed steps; the weights stay put inside a window; a cluster
    absent through a whole window keeps its averages. A mid-window state round trip continues
    exactly."""
    k, T = 4, 2.0
    m = DWA(k, temperature=T, window=window)
    hist: list[tuple[torch.Tensor, torch.Tensor]] = []
    masks = [(), (2,), (1,), (), (3,), (3,), (3,), (), (0,), (), (), (1,), ()]
    for step, absent in enumerate(masks):
        present = _present(k, absent)
        L = _losses(k, 30 + step, present)
        w = _dloss(m, L, present)
        means: list[list[float]] = [[] for _ in range(k)]
        for start in range(0, len(hist) - len(hist) % window, window):
            for i in range(k):
                obs = [float(Lh[i]) for Lh, ph in hist[start : start + window] if ph[i]]
                if obs:
                    means[i].append(sum(obs) / len(obs))
        ratio = torch.tensor([v[-1] / v[-2] if len(v) >= 2 else 1.0 for v in means],
                             dtype=torch.float64)  # fmt: skip
        ref = torch.zeros(k, dtype=torch.float64)
        ref[present] = torch.softmax(ratio[present] / T, 0)
        torch.testing.assert_close(w, ref, rtol=1e-12, atol=0)
        m.observe(L, present)
        hist.append((L, present))
        if step == 4:  # mid-window for both windows: a fresh method continues exactly
            fresh = DWA(k, temperature=T, window=window)
            fresh.load_state_dict(_roundtrip(m.state_dict()))
            m = fresh
    assert (m.count >= 2).all()  # the ratios above were exercised for every cluster


def test_dwa_state_from_before_the_window_loads():
    """A state saved before ``window`` existed (last, prev, count) loads and goes on comparing
    single steps, as it did."""
    k = 3
    a, b = DWA(k), DWA(k)
    for step in range(3):
        a.observe(_losses(k, step, _present(k)), _present(k))
    old = {key: v for key, v in a.state_dict().items() if key in ("last", "prev", "count")}
    b.load_state_dict(old)
    for step in range(3, 6):
        p = _present(k, (step % k,))
        L = _losses(k, step, p)
        assert torch.equal(a.transform(L, p), b.transform(L, p))
        a.observe(L, p), b.observe(L, p)
    with pytest.raises(ValueError, match="window must be an int >= 1"):
        DWA(k, window=0)
    with pytest.raises(ValueError, match="window must be an int >= 1"):
        make_method("dwa", k, window=2.5)


# ---------------------------------------------------------------- FAMO
def test_famo_transform_weights_sum_to_one():
    k = 5
    present = _present(k, (2,))
    m = FAMO(k)
    m.xi.copy_(torch.tensor([0.2, -0.4, 3.0, 0.1, 0.5]))
    L = _losses(k, 4, present)
    w = _dloss(m, L, present)
    z = torch.zeros(k, dtype=torch.float64)
    z[present] = torch.softmax(m.xi[present], 0)
    D = L + 1e-8
    ref = torch.where(present, z / D, 0.0) / torch.where(present, z / D, 0.0).sum()
    torch.testing.assert_close(w, ref)
    assert w[2] == 0 and abs(w.sum() - 1) < 1e-12


def test_famo_update_matches_reference_optimizer():
    """Logit updates == autograd of softmax(xi) . delta stepped by torch.optim.Adam."""
    k, lr, gamma = 4, 0.025, 0.01
    m = FAMO(k, lr=lr, gamma=gamma)
    xi = torch.zeros(k, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([xi], lr=lr, weight_decay=gamma)
    present = _present(k)
    prev = None
    for step in range(8):
        L = _losses(k, 30 + step, present)
        m.observe(L, present)
        if prev is not None:
            delta = torch.log(prev + 1e-8) - torch.log(L + 1e-8)
            (g,) = torch.autograd.grad(torch.softmax(xi, 0), xi, grad_outputs=delta)
            xi.grad = g
            opt.step()
        prev = L
        torch.testing.assert_close(m.xi, xi.detach(), rtol=1e-12, atol=1e-14)
    assert (m.xi.abs() > 1e-4).all()


# ---------------------------------------------------------------- all loss methods
@pytest.mark.parametrize("cls", LOSS_CLASSES, ids=lambda c: c.name)
@pytest.mark.parametrize("absent", [(), (1,), (0, 2, 3), (0, 1, 2, 3)])
def test_absent_terms_are_zero_and_finite(cls, absent):
    k = 4
    present = _present(k, absent)
    m = cls(k).double()
    for step in range(3):
        L = _losses(k, step, present).requires_grad_(True)
        terms = m.transform(L, present)
        assert terms.shape == (k,) and torch.isfinite(terms).all()
        assert (terms[~present] == 0).all()
        torch.testing.assert_close(m(L, present), terms.sum())
        (g,) = torch.autograd.grad(terms.sum(), L)
        assert torch.isfinite(g).all() and (g[~present] == 0).all()
        m.observe(L.detach(), present)
    for buf in m.buffers():
        assert torch.isfinite(buf.double()).all()


@pytest.mark.parametrize("name", ["uw", "rlw", "dwa", "famo"])
def test_state_dict_round_trip(name):
    k = 5
    a = make_method(name, k).loss.double()
    masks = [_present(k), _present(k, (1,)), _present(k), _present(k, (0, 4))]
    for i, p in enumerate(masks):
        a.observe(_losses(k, i, p), p)
    if name == "uw":
        with torch.no_grad():
            a.s.add_(torch.linspace(-1, 1, k))
    b = make_method(name, k).loss.double()
    b.load_state_dict(_roundtrip(a.state_dict()))
    for i in range(4):
        p = masks[i % 4]
        L = _losses(k, 50 + i, p)
        assert torch.equal(a.transform(L, p), b.transform(L, p))
        a.observe(L, p), b.observe(L, p)


def test_registry_covers_loss_methods():
    assert set(LOSS_METHODS) == {"ls", "mean", "uw", "rlw", "dwa", "famo"}
    with pytest.raises(ValueError, match="L must"):
        LS(3).transform(torch.ones(4), _present(3))
    with pytest.raises(ValueError, match="present must"):
        UW(3).transform(torch.ones(3), torch.ones(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="temperature"):
        DWA(3, temperature=0)


def test_rlw_first_steps_differ_and_nonfinite_step_keeps_the_draw():
    from antdiff.mtl import make_method

    rlw = make_method("rlw", 4).loss
    present = torch.ones(4, dtype=torch.bool)
    L = torch.ones(4)
    w0 = rlw.transform(L, present).clone()
    rlw.observe(L, present)
    w1 = rlw.transform(L, present).clone()
    assert not torch.allclose(w0, w1)
    rlw.observe(L, torch.zeros(4, dtype=torch.bool))  # a non-finite step: nothing present
    torch.testing.assert_close(rlw.transform(L, present), w1)
    # ... and the stream did not move: the next draw is the one a run without that step makes
    twin = make_method("rlw", 4).loss
    twin.observe(L, present)
    rlw.observe(L, present)
    twin.observe(L, present)
    torch.testing.assert_close(rlw.draw, twin.draw, rtol=0, atol=0)
    state = rlw.state_dict()
    assert int(state["_extra_state"]["stream"]["steps"]) == 2
    other = make_method("rlw", 4).loss
    other.load_state_dict(state)
    rlw.observe(L, present)
    other.observe(L, present)
    torch.testing.assert_close(other.draw, rlw.draw, rtol=0, atol=0)


def test_rlw_draws_are_standard_normal():
    rlw = RLW(2, seed=8)
    present = torch.ones(2, dtype=torch.bool)
    draws = []
    for _ in range(4000):
        rlw.observe(torch.ones(2), present)
        draws.append(rlw.draw.clone())
    z = torch.stack(draws).reshape(-1)
    n = z.numel()
    assert abs(z.mean()) < 4 / n**0.5 and abs(z.var() - 1) < 4 * (2 / n) ** 0.5
    assert abs((z > 1.96).double().mean() - 0.025) < 0.006
    legacy = rlw.state_dict()
    used = torch.Generator().get_state()
    legacy["_extra_state"] = {"rng": {"seed": 2, "device_type": "cpu", "state": used}}
    with pytest.warns(UserWarning, match="restarts from step 0 of seed 2"):
        rlw.load_state_dict(legacy)


@pytest.mark.parametrize(
    ("method", "kwargs", "match"),
    [
        ("uw", {"lr": float("inf")}, "lr must be a finite number > 0, got inf"),
        ("dwa", {"temperature": float("inf")}, "temperature must be a finite number > 0"),
        ("famo", {"lr": float("nan")}, "lr must be a finite number > 0, got nan"),
        ("famo", {"gamma": float("inf")}, "gamma must be a finite number >= 0"),
        ("famo", {"eps": float("nan")}, "eps must be a finite number > 0"),
        ("famo", {"min_loss": float("nan")}, "min_loss must be a finite number"),
        ("cagrad", {"c": float("inf")}, "c must be a finite number >= 0, got inf"),
    ],
)
def test_nonfinite_method_hyperparameters_are_refused(method, kwargs, match):
    """NaN / inf settings would make every step non-finite (each one skipped)."""
    from antdiff.mtl import make_method

    with pytest.raises(ValueError, match=match):
        make_method(method, 4, **kwargs)


# ------------------------------------------------- fused UW total, DWA and FAMO edges
def test_uw_starts_at_zero_log_variances():
    """METHOD.md: s_i init 0, so a fresh UW's total is sum_i 0.5 L_i / k over present clusters."""
    k = 4
    present = _present(k, (1,))
    L = _losses(k, 5, present)
    m = UW(k).double()
    assert torch.equal(m.s.detach(), torch.zeros(k, dtype=torch.float64))
    want = sum(0.5 * float(L[i]) / k for i in range(k) if present[i])
    assert abs(float(m(L, present).detach()) - want) < 1e-12


def _uw_fused_reference(per, s, cid, k, present):
    """float64 UW total on the cluster means and its gradients w.r.t. per and s."""
    per, s = per.detach().double(), s.detach().double()
    N = torch.zeros(k, dtype=torch.float64).index_add(0, cid, torch.ones_like(per))
    L = torch.zeros(k, dtype=torch.float64).index_add(0, cid, per) / N.clamp(min=1)
    c = torch.where(present, 0.5 * torch.exp(-s) / k, 0.0)
    total = torch.where(present, 0.5 * (torch.exp(-s) * L / k + s), 0.0).sum()
    d_per = (c / N.clamp(min=1))[cid]
    d_s = torch.where(present, 0.5 * (1 - torch.exp(-s) * L / k), 0.0)
    return total, L, c, d_per, d_s


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["cpp", "torch"])
def test_uw_fused_total_equals_the_formula(dtype):
    """fused_total (C++ for CPU float32, torch operators otherwise): total, cluster means and
    slopes of UW on the cluster means, and the gradients (times an upstream factor) w.r.t. the
    per-sample losses and s, with an empty cluster, against a float64 re-implementation."""
    k, B = 4, 13
    gen = torch.Generator().manual_seed(7)
    cid = torch.tensor([0, 1, 3, 0, 1, 1, 3, 0, 3, 3, 1, 0, 1])  # cluster 2 empty
    per = (torch.rand(B, generator=gen, dtype=torch.float64) * 2 + 0.1).to(dtype)
    per.requires_grad_(True)
    m = UW(k).to(dtype)
    with torch.no_grad():
        m.s.copy_(torch.tensor([0.4, -0.9, 1.3, 0.2]))
    counts = torch.bincount(cid, minlength=k).float()
    inv = torch.where(counts > 0, 1 / counts.clamp(min=1), 0.0)
    present = (counts > 0).float()
    total, L, c = m.fused_total(per, cid, inv, present)
    (3.0 * total).backward()
    want, L_ref, c_ref, d_per, d_s = _uw_fused_reference(per, m.s, cid, k, present.bool())
    tol = {"rtol": 2e-6, "atol": 1e-6}
    torch.testing.assert_close(total.double(), want, **tol)
    torch.testing.assert_close(L.double(), L_ref, **tol)
    torch.testing.assert_close(c.double(), c_ref, **tol)
    assert per.grad.dtype == dtype and m.s.grad.dtype == dtype
    torch.testing.assert_close(per.grad.double(), 3.0 * d_per, **tol)
    torch.testing.assert_close(m.s.grad.double(), 3.0 * d_s, **tol)
    with pytest.raises(ValueError, match="present must be float32"):
        m.fused_total(per, cid, inv, present.double())
    with pytest.raises(ValueError, match="inv must be"):
        m.fused_total(per, cid, inv[:-1], present)


def test_uw_grads_follow_the_parameter_dtype():
    """float64 losses on a float32 UW: d total / d s has s's dtype, as autograd gives it."""
    k = 3
    present = _present(k, (0,))
    L = _losses(k, 9, present)
    m = UW(k)
    _, (ds,) = m.grads(L, present)
    (ref,) = torch.autograd.grad(m(L, present), m.s)
    assert ds.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(ds, ref)


def test_dwa_defaults_are_temperature_two_on_single_steps():
    """Liu et al. 2019: w = softmax(r / T) with T = 2; by default r compares single steps."""
    k = 3
    m = DWA(k)
    present = _present(k)
    L1, L2 = _losses(k, 60, present), _losses(k, 61, present)
    m.observe(L1, present)
    m.observe(L2, present)
    r = [float(L2[i] / L1[i]) for i in range(k)]
    e = [torch.tensor(v / 2.0, dtype=torch.float64).exp() for v in r]
    ref = torch.stack(e) / sum(e)
    torch.testing.assert_close(_dloss(m, L2, present), ref, rtol=1e-12, atol=0)


def test_dwa_step_with_no_cluster_is_not_counted():
    """The engine observes a skipped step with nothing present: DWA must go on as if it had not
    happened (mid-window too), not close a window early."""
    k, window = 3, 2
    a, b = DWA(k, window=window), DWA(k, window=window)
    none = torch.zeros(k, dtype=torch.bool)
    for step in range(7):
        p = _present(k, (step % k,) if step % 3 == 2 else ())
        L = _losses(k, 70 + step, p)
        a.observe(L, p)
        b.observe(L, p)
        b.observe(torch.zeros(k, dtype=torch.float64), none)
        torch.testing.assert_close(b.transform(L, p), a.transform(L, p), rtol=0, atol=0)
    assert (a.count >= 2).all()


def test_dwa_zero_average_gives_finite_weights():
    """A cluster whose previous average is exactly 0 has no defined ratio: the weights stay
    finite and sum to 1."""
    k = 3
    m = DWA(k)
    present = _present(k)
    L0 = torch.tensor([0.0, 0.7, 0.4], dtype=torch.float64)
    L1 = torch.tensor([0.5, 0.6, 0.4], dtype=torch.float64)
    L2 = torch.tensor([0.0, 0.6, 0.5], dtype=torch.float64)
    m.observe(L0, present)
    m.observe(L1, present)
    w = _dloss(m, L1, present)
    assert torch.isfinite(w).all() and abs(float(w.sum()) - 1) < 1e-12
    m.observe(L2, present)  # now last = 0 and prev = 0.5: ratio 0, well defined
    w = _dloss(m, L2, present)
    e = torch.tensor([0.0, 0.6 / 0.6, 0.5 / 0.4], dtype=torch.float64).div(2).exp()
    torch.testing.assert_close(w, e / e.sum(), rtol=1e-12, atol=0)


def test_famo_with_absent_clusters_matches_per_cluster_adam():
    """FAMO's defaults (lr 0.025, decay 0.01, eps 1e-8) with min_loss and clusters that come and
    go: each step, the clusters with both a previous and a current loss take one Adam step
    (each its own step count) on the gradient of softmax(xi over them) . delta, delta_i the
    decrease of log(L_i - min_loss + eps) since cluster i was last seen; the others keep their
    logits and Adam state. Reference: one torch.optim.Adam per logit, in float64."""
    k, min_loss, eps = 4, 0.03, 1e-8
    m = FAMO(k, min_loss=min_loss)
    xi = [torch.zeros((), dtype=torch.float64, requires_grad=True) for _ in range(k)]
    opts = [torch.optim.Adam([x], lr=0.025, weight_decay=0.01) for x in xi]
    last: list[float | None] = [None] * k
    masks = [(3,), (3,), (1, 3), (), (2,), (0, 2), (), (1,), (), (0, 1, 2, 3), (3,), ()]
    for step, absent in enumerate(masks):
        present = _present(k, absent)
        L = _losses(k, 80 + step, present)
        # transform: effective weights z_i / D_i normalised, z the softmax over present
        idx = [i for i in range(k) if present[i]]
        w_ref = torch.zeros(k, dtype=torch.float64)
        if idx:
            z = torch.softmax(torch.stack([xi[i].detach() for i in idx]), 0)
            q = z / torch.stack([L[i] - min_loss + eps for i in idx])
            w_ref[idx] = q / q.sum()
        torch.testing.assert_close(_dloss(m, L, present), w_ref, rtol=1e-10, atol=1e-14)
        m.observe(L, present)
        both = [i for i in idx if last[i] is not None]
        if both:
            delta = torch.tensor([last[i] - torch.log(L[i] - min_loss + eps).item() for i in both],
                                 dtype=torch.float64)  # fmt: skip
            z = torch.softmax(torch.stack([xi[i] for i in both]), 0)
            grads = torch.autograd.grad((z * delta).sum(), [xi[i] for i in both])
            for i, g in zip(both, grads):
                xi[i].grad = g
                opts[i].step()
                xi[i].grad = None
        for i in idx:
            last[i] = torch.log(L[i] - min_loss + eps).item()
        ref = torch.stack([x.detach() for x in xi])
        torch.testing.assert_close(m.xi, ref, rtol=1e-12, atol=1e-14)
    assert (m.xi.abs() > 1e-4).all()


def test_famo_nonfinite_cause_flags_losses_whose_log_is_not_finite():
    """The clusters named are the present ones with a finite loss whose log(L - min_loss + eps)
    is not finite (at or below min_loss - eps); an absent or NaN cluster is not named."""
    eps, min_loss = 2.0**-20, 0.25
    m = FAMO(6, min_loss=min_loss, eps=eps)
    L = torch.tensor([0.25 - eps, 0.1, 0.3, float("nan"), -1.0, 0.25], dtype=torch.float64)
    present = _present(6, (4,))
    mask, msg = m.nonfinite_cause(L, present)
    ref = present & torch.isfinite(L) & ~torch.isfinite(torch.log(L - min_loss + eps))
    assert ref.tolist() == [True, True, False, False, False, False]
    assert torch.equal(mask, ref)
    assert "min_loss=0.25" in msg


def test_famo_cluster_weights_are_the_softmax_over_present():
    k = 4
    m = FAMO(k)
    m.xi.copy_(torch.tensor([0.3, -1.2, 2.0, 0.5], dtype=torch.float64))
    present = _present(k, (2,))
    e = torch.exp(m.xi) * present
    torch.testing.assert_close(m.cluster_weights(present), e / e.sum(), rtol=1e-12, atol=0)


def test_hyperparameter_bounds():
    """FAMO's decay may be 0 (plain Adam); DWA's window is an int, not a bool."""
    assert FAMO(3, gamma=0.0).gamma == 0.0 and FAMO(3, gamma=0).gamma == 0.0
    with pytest.raises(ValueError, match="window must be an int >= 1"):
        DWA(3, window=True)


@pytest.mark.parametrize("cls", LOSS_CLASSES, ids=lambda c: c.name)
def test_nan_in_an_absent_slot_reaches_nothing(cls):
    """As for UW above: an absent cluster's entry of L (NaN here) gives a term of exactly 0, no
    gradient, and leaves the state finite."""
    k = 4
    present = _present(k, (2,))
    m = cls(k).double()
    for step in range(3):
        L = torch.where(present, _losses(k, 90 + step, present), torch.nan).requires_grad_(True)
        terms = m.transform(L, present)
        assert torch.isfinite(terms).all() and terms[2] == 0
        (g,) = torch.autograd.grad(terms.sum(), L)
        assert torch.isfinite(g).all() and g[2] == 0
        m.observe(L.detach(), present)
        assert all(torch.isfinite(b.double()).all() for b in m.buffers())


def test_dwa_state_without_its_keys_leaves_the_window_alone():
    """Only a state from before the window (it has "last") gets an empty window filled in: a
    non-strict load of a state without DWA's keys reports them missing and changes nothing."""
    k = 3
    m = DWA(k, window=2)
    p = _present(k)
    for step in range(3):  # mid-window: acc, n, seen hold the open window
        m.observe(_losses(k, 100 + step, p), p)
    before = {key: v.clone() for key, v in m.state_dict().items()}
    res = m.load_state_dict({}, strict=False)
    assert set(res.missing_keys) == set(before)
    for key, v in m.state_dict().items():
        assert torch.equal(v, before[key]), key

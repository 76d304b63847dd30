"""The engine's update and what surrounds it: the gradient step (J's rows, the weights, the
combine), the weighted off-steps of ``update_every``, the optimiser step with its skip of
non-finite steps (host read, fused optimisers, GradScaler), the statistics, and the engine's
state (``state_dict`` / ``load_state_dict``), plus the messages that name what went wrong."""

from __future__ import annotations

import warnings

import pytest
import torch
from test_engine import T, TinyNet, explicit_J, flat_grad, per_sample_loss, setup
from torch import nn

from antdiff import ANT
from antdiff.schedules import linear_schedule


def _sgd(model, ant, lr=0.1):
    return torch.optim.SGD([{"params": model.parameters()}, *ant.param_groups()], lr=lr)


def _unsolved(monkeypatch):
    """Nash-MTL's solver ends without a solution (NaN weights) from now on."""
    from antdiff.mtl import native

    monkeypatch.setattr(native, "nash_weights",
                        lambda G, **kw: torch.full((G.shape[0],), float("nan"), dtype=G.dtype))


# -- messages ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("at_backward", "at_step", "said"),
    [(None, "s", "ran with no GradScaler but ant.step got a GradScaler"),
     ("s", "other", "ran with a GradScaler but ant.step got another"),
     ("s", None, "ran with a GradScaler but ant.step got none")],
)  # fmt: skip
def test_a_scaler_mismatch_names_the_scaler_of_each_side(at_backward, at_step, said):
    model, ant = setup("pcgrad")
    opt = _sgd(model, ant)
    scalers = {"s": torch.amp.GradScaler("cpu"), "other": torch.amp.GradScaler("cpu"), None: None}
    x = torch.randn(8, 1, 6, 6)
    ant.backward(per_sample_loss(model), x, ant.sample_timesteps(8), scaler=scalers[at_backward])
    with pytest.raises(ValueError, match=said):
        ant.step(opt, scaler=scalers[at_step])


def _with_extras(model, extras):
    def fn(xb, tb):
        out = per_sample_loss(model)(xb, tb)
        for e in extras:
            out = out * e
        return out

    return fn


@pytest.mark.parametrize(("n", "rest"), [(5, None), (7, "and 2 more")])
@pytest.mark.parametrize("where", ["window", "J"])
def test_outside_tensors_are_named_up_to_five_and_the_rest_counted(n, rest, where):
    model, ant = setup("uw" if where == "window" else "pcgrad", mode="micro")
    extras = [nn.Parameter(torch.tensor(1.0)) for _ in range(n)]
    x = torch.randn(8, 1, 6, 6)
    t = ant.sample_timesteps(8)
    with pytest.raises(ValueError, match="outside the attached model") as info:
        ant.backward(_with_extras(model, extras), x, t, accumulate=where == "window")
    msg = str(info.value)
    assert msg.count("a float32 tensor of shape []") == 5
    assert ("more" in msg) == (rest is not None)
    if rest is not None:
        assert rest in msg


def test_a_state_part_of_the_wrong_kind_is_named_as_damaged_and_changes_nothing():
    model, ant = setup("nash", update_every=2)
    x = torch.randn(8, 1, 6, 6)
    ant.backward(per_sample_loss(model), x, ant.sample_timesteps(8))
    before = ant.state_dict()
    bad = {**before, "telemetry": {**before["telemetry"], "t": 1}}  # no .items(): AttributeError
    with pytest.raises(ValueError, match=r"damaged or not of this engine \(AttributeError"):
        ant.load_state_dict(bad)
    after = ant.state_dict()
    assert after["step"] == before["step"] == 1
    assert torch.equal(after["w"], before["w"])


class _Pairwise(nn.Module):
    """Couples the samples of the batch (a mean over it): one-pass cannot serve it."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, x, t):
        return self.w * (x - x.mean(0, keepdim=True)) * (1 + t[:, None, None, None] / T)


def test_repr_shows_what_auto_chose():
    assert "mode='auto' (onepass)" in repr(ANT(linear_schedule(T), k=4, method="pcgrad",
                                              model=TinyNet()))  # fmt: skip
    assert "mode='auto' (micro)" in repr(ANT(linear_schedule(T), k=4, method="pcgrad",
                                            model=_Pairwise()))  # fmt: skip
    assert "mode='micro'," in repr(ANT(linear_schedule(T), k=4, method="pcgrad", mode="micro"))


@pytest.mark.parametrize("mode", ["micro", "retain_graph"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_J_rows_are_the_cluster_means_also_for_one_sample_clusters(mode, dtype):
    """A cluster with a single sample has J_i = its gradient (divided by 1), and a float64
    model's rows keep float64 precision (the loss sums and their 1 / N_i are float64)."""
    torch.manual_seed(0)
    model = TinyNet().to(dtype)
    ant = ANT(linear_schedule(T), k=4, method="pcgrad", model=model, mode=mode)
    t = torch.tensor([1, 2, 3, 30, 60, 61, 70, 99])  # in cluster order: 3, 1, 3 and 1 samples
    cid = ant.clusters.cluster_of(t)
    counts = torch.bincount(cid, minlength=4).numpy()
    assert 1 in counts.tolist()
    x = torch.randn(8, 1, 6, 6, dtype=dtype)
    J_ref, per = explicit_J(model, x, t, ant.clusters, ant.k)
    buf = ant._grad_buffer()
    sums, N = ant._fill_J(buf, per_sample_loss(model), x, t, counts, None)
    tol = {"rtol": 1e-12, "atol": 1e-14} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(buf.J.double(), J_ref, **tol)
    L = torch.zeros(4, dtype=torch.float64).index_add(0, cid, per.double())
    torch.testing.assert_close(sums.double(), L, rtol=1e-6, atol=1e-7)  # (float32 sums)


@pytest.mark.parametrize("method", ["uw", "dwa", "famo"])
def test_a_state_kept_in_memory_does_not_follow_later_training(method):
    """state_dict() returns copies: a state kept in memory (a rollback point, an in-memory best
    checkpoint) restores the engine as it was when it was taken, after more steps."""
    model, ant = setup(method)
    opt = _sgd(model, ant, lr=0.5)
    x = torch.randn(8, 1, 6, 6)

    def train(n):
        for _ in range(n):
            opt.zero_grad(set_to_none=True)
            t = ant.sample_timesteps(8)
            ant.reduce(per_sample_loss(model)(x, t), t).backward()
            ant.step(opt)

    train(2)
    state = ant.state_dict()
    saved = {k: v.clone() for k, v in state["loss_method"].items()}
    train(3)
    assert not all(torch.equal(v, saved[k]) for k, v in ant.method.loss.state_dict().items())
    for k, v in state["loss_method"].items():
        torch.testing.assert_close(v, saved[k], rtol=0, atol=0)


@pytest.mark.parametrize("update_every", [None, 2])
def test_a_window_micro_batch_reports_the_loss_a_step_on_it_alone_reports(update_every):
    kw = {} if update_every is None else {"update_every": update_every}
    (model, ant), (model2, alone) = setup("uw+pcgrad", **kw), setup("uw+pcgrad", **kw)
    x = torch.randn(8, 1, 6, 6)
    for _ in range(2):  # a weight step, then (update_every=2) an off-step
        t = ant.sample_timesteps(8)
        alone.sample_timesteps(8)
        first = ant.backward(per_sample_loss(model), x, t, accumulate=True)
        ref = alone.backward(per_sample_loss(model2), x, t)
        torch.testing.assert_close(first.cluster_losses, ref.cluster_losses)
        torch.testing.assert_close(first.loss, ref.loss)
        ant.backward(per_sample_loss(model), x, t)  # closes the window


def _poisoned(model):
    """Per-sample losses whose value is finite and whose gradient is NaN (sqrt'(0) times a zero
    factor), like an fp16 overflow in the backward."""

    def fn(xb, tb):
        return per_sample_loss(model)(xb, tb) + torch.sqrt(model.out.bias.sum() * 0.0)

    return fn


@pytest.mark.parametrize("skip", [True, False])
def test_an_off_step_with_a_nonfinite_gradient_is_not_finite(skip):
    """An off-step of update_every with finite losses but a NaN gradient: the step is not
    finite, its update is zeroed, and ant.step skips it (or, skip_nonfinite=False, applies the
    zero update)."""
    model, ant = setup("nash", update_every=2)
    opt = _sgd(model, ant)
    x = torch.randn(16, 1, 6, 6)
    ant.backward(per_sample_loss(model), x, ant.sample_timesteps(16))
    ant.step(opt)
    before = [p.detach().clone() for p in model.parameters()]
    out = ant.backward(_poisoned(model), x, ant.sample_timesteps(16))  # an off-step
    assert ant._recompute is None or ant._recompute.out is not out
    assert torch.isfinite(out.cluster_losses).all() and not bool(out.finite)
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters())
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        assert ant.step(opt, skip_nonfinite=skip) is not skip
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p.detach(), q)


def test_a_window_with_a_nonfinite_micro_batch_total_is_not_finite():
    """A loss method whose total is not finite for one micro-batch (FAMO's log of a cluster
    loss below its min_loss) although the window's mean cluster losses are: the window's
    gradients hold that micro-batch's NaN, so its step is not finite, and ant.step skips it
    also without the gradient check."""
    model, ant = setup("famo")
    opt = _sgd(model, ant)
    x = torch.randn(8, 1, 6, 6)
    t = ant.sample_timesteps(8)
    below = ant.backward(lambda xb, tb: per_sample_loss(model)(xb, tb) - 10.0, x, t,
                         accumulate=True)  # fmt: skip
    assert not bool(below.finite)
    out = ant.backward(lambda xb, tb: per_sample_loss(model)(xb, tb) + 100.0, x, t)
    assert torch.isfinite(out.cluster_losses).all() and (out.cluster_losses > 0).all()
    assert not bool(out.finite)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.warns(UserWarning, match="non-finite"):
        assert ant.step(opt, check_grads=False) is False
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p.detach(), q)


@pytest.mark.parametrize("method", ["uw", "dwa"])
def test_a_loss_space_backward_with_a_nonfinite_gradient_is_skipped_by_step(method):
    """ant.backward with a loss-space method sees the losses, not the model's gradients:
    ant.step checks them, skips the step, and the method does not observe its losses."""
    model, ant = setup(method)
    opt = _sgd(model, ant)
    x = torch.randn(16, 1, 6, 6)
    ant.backward(per_sample_loss(model), x, ant.sample_timesteps(16))
    assert ant.step(opt) is True
    state = {k: v.clone() for k, v in ant.method.loss.state_dict().items()}
    before = [p.detach().clone() for p in model.parameters()]
    out = ant.backward(_poisoned(model), x, ant.sample_timesteps(16))
    assert bool(out.finite)  # the losses are
    with pytest.warns(UserWarning, match="non-finite"):
        assert ant.step(opt) is False
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p.detach(), q)
    for k, v in ant.method.loss.state_dict().items():
        assert torch.equal(v, state[k])
    assert not bool(ant.last.finite) and ant.stats()["nonfinite_steps"] == 1


@pytest.mark.parametrize("method", ["uw", "vanilla"])
def test_a_first_window_on_inputs_that_require_grad_is_accepted(method):
    """What loss_fn is given (a batch tensor that requires grad, e.g. for a gradient penalty)
    is its input, not a trainable tensor outside the model: the window's first check takes
    it so."""
    model, ant = setup(method, mode="micro")
    x = torch.randn(8, 1, 6, 6).requires_grad_()
    t = ant.sample_timesteps(8)
    ant.backward(per_sample_loss(model), x, t, accumulate=True)
    out = ant.backward(per_sample_loss(model), x, t)
    assert bool(out.finite) and x.grad is not None


@pytest.mark.parametrize(("method", "kw"), [("uw", {}), ("nash", {"update_every": 2})])
def test_a_grad_scaler_scales_the_weighted_backward_and_step_unscales_it(method, kw):
    """A loss-space method's backward and the off-steps of update_every run one backward of
    the weighted loss: scaled by the GradScaler, and ant.step unscales it, so the update is
    the one without a scaler."""
    (m1, plain), (m2, scaled) = setup(method, **kw), setup(method, **kw)
    o1, o2 = _sgd(m1, plain), _sgd(m2, scaled)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    x = torch.randn(16, 1, 6, 6)
    for _ in range(2):  # Nash: a weight step, then an off-step
        t = plain.sample_timesteps(16)
        scaled.sample_timesteps(16)
        o1.zero_grad(set_to_none=True)
        o2.zero_grad(set_to_none=True)
        plain.backward(per_sample_loss(m1), x, t)
        scaled.backward(per_sample_loss(m2), x, t, scaler=scaler)
        torch.testing.assert_close(flat_grad(m2), 256.0 * flat_grad(m1), rtol=1e-5, atol=1e-6)
        assert plain.step(o1) and scaled.step(o2, scaler=scaler)
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_a_first_unsolved_step_with_an_absent_cluster_shares_equally_among_the_present(
    monkeypatch,
):
    """Before any solve the fallback of a "mean" method (Nash-MTL) is the mean of the present
    clusters' gradients: 1 / (clusters present) each, 0 for an absent cluster."""
    model, ant = setup("nash")
    _unsolved(monkeypatch)
    x = torch.randn(6, 1, 6, 6)
    t = torch.tensor([1, 5, 30, 40, 60, 70])  # cluster order; cluster 3 (t >= 79) absent
    J_ref, _ = explicit_J(model, x, t, ant.clusters, ant.k)
    out = ant.backward(per_sample_loss(model), x, t)
    assert bool(out.finite) and out.present.tolist() == [True, True, True, False]
    want = torch.tensor([1 / 3, 1 / 3, 1 / 3, 0.0])
    torch.testing.assert_close(out.weights, want)
    torch.testing.assert_close(flat_grad(model).double(), want.double() @ J_ref,
                               rtol=1e-5, atol=1e-6)  # fmt: skip


def test_an_optimizer_of_the_methods_own_parameters_alone_is_accepted():
    """UW's log-variances in an optimiser of their own beside the model's: ant.step steps that
    one (the model's is stepped by the caller)."""
    model, ant = setup("uw")
    own = torch.optim.SGD(ant.param_groups(), lr=0.5)
    x = torch.randn(16, 1, 6, 6)
    t = ant.sample_timesteps(16)
    ant.reduce(per_sample_loss(model)(x, t), t).backward()
    s = ant.method.loss.s.detach().clone()
    assert ant.step(own) is True
    assert not torch.equal(ant.method.loss.s.detach(), s)


def test_a_failed_recompute_restores_the_weights_from_before_it(monkeypatch):
    """update_every=2: a weight recompute that is not finite (ant.step skips it and reads the
    verdict) leaves the weights of the last good recompute, which the redo at the next step
    falls back to when its own solve ends without a solution."""
    model, ant = setup("nash", update_every=2)
    opt = _sgd(model, ant)
    x = torch.randn(16, 1, 6, 6)
    nan = lambda xb, tb: per_sample_loss(model)(xb, tb) * float("nan")  # noqa: E731
    for fn in (per_sample_loss(model), per_sample_loss(model)):  # a weight step, an off-step
        ant.backward(fn, x, ant.sample_timesteps(16))
        assert ant.step(opt) is True
    w_good = ant._w.clone()
    ant.backward(nan, x, ant.sample_timesteps(16))  # the next recompute: not finite
    with pytest.warns(UserWarning, match="non-finite"):
        assert ant.step(opt) is False
    _unsolved(monkeypatch)
    out = ant.backward(per_sample_loss(model), x, ant.sample_timesteps(16))  # the redo
    assert bool(out.finite)
    torch.testing.assert_close(out.weights, w_good, rtol=0, atol=0)
    torch.testing.assert_close(ant._w, w_good, rtol=0, atol=0)


def test_an_unsolved_recompute_keeps_which_clusters_the_kept_weights_saw(monkeypatch):
    """An unsolved recompute on a batch without cluster 3 keeps the last weights, which were
    solved with cluster 3 present: the next off-step uses them as they are (an absent-at-the-
    update cluster would get the mean present weight instead)."""
    model, ant = setup("nash", update_every=2)
    opt = _sgd(model, ant)
    x = torch.randn(16, 1, 6, 6)
    for _ in range(2):  # a weight step and an off-step, every cluster present
        ant.backward(per_sample_loss(model), x, ant.sample_timesteps(16))
        ant.step(opt)
    w_good = ant._w.clone()
    assert not torch.allclose(w_good, w_good.mean().expand(4))
    with monkeypatch.context() as m:
        _unsolved(m)
        t = torch.tensor([1, 5, 30, 40, 60, 70])  # cluster 3 absent
        out = ant.backward(per_sample_loss(model), x[:6], t)  # the recompute, unsolved
    assert bool(out.finite) and not bool(out.present[3])
    ant.step(opt)
    out = ant.backward(per_sample_loss(model), x, ant.sample_timesteps(16))  # an off-step
    assert bool(out.present.all())
    torch.testing.assert_close(out.weights, w_good, rtol=0, atol=0)


def test_an_unsolved_step_gives_a_cluster_absent_at_the_last_solve_the_mean_weight(
    monkeypatch,
):
    """The last solve had no cluster 3 (weight 0); the next solve ends without a solution on
    a batch with cluster 3: the step reuses the last weights as an off-step would, cluster 3
    getting the mean weight of the clusters that solve saw, not 0."""
    model, ant = setup("nash", update_every=1)
    x = torch.randn(16, 1, 6, 6)
    out = ant.backward(per_sample_loss(model), x[:6], torch.tensor([1, 5, 30, 40, 60, 70]))
    assert bool(out.finite) and float(out.weights[3]) == 0.0
    w_last = ant._w.clone()
    _unsolved(monkeypatch)
    out = ant.backward(per_sample_loss(model), x, ant.sample_timesteps(16))
    assert bool(out.finite) and bool(out.present.all())
    want = torch.cat([w_last[:3], w_last[:3].mean().reshape(1)])
    torch.testing.assert_close(out.weights, want)


def test_graddrop_after_a_loss_method_reports_the_loss_methods_slopes_as_weights():
    """GradDrop combines the rows c_i J_i elementwise: the weights it reports for the raw
    cluster gradients are the loss method's slopes c (UW's 0.5 exp(-s_i) / k)."""
    model, ant = setup("uw+graddrop")
    with torch.no_grad():
        ant.method.loss.s.copy_(torch.tensor([0.3, -0.2, 0.1, 0.0]))
    x = torch.randn(16, 1, 6, 6)
    out = ant.backward(per_sample_loss(model), x, ant.sample_timesteps(16))
    slopes = 0.5 * torch.exp(-ant.method.loss.s.detach()) / ant.k
    torch.testing.assert_close(out.weights, slopes)


@pytest.mark.parametrize("change", ["freeze", "unfreeze", "replace"])
def test_auto_mode_follows_a_change_of_the_trainable_parameters(change):
    """Parameters frozen, unfrozen or replaced (a new output layer) between steps: the buffer
    and one-pass's plan are made anew, and the update is the weights times the per-cluster
    gradients of the parameters that train now (a frozen one gets none)."""
    model, ant = setup("mgda")
    assert ant._onepass is not None
    x = torch.randn(16, 1, 6, 6)
    if change == "unfreeze":
        model.emb.weight.requires_grad_(False)
    ant.backward(per_sample_loss(model), x, ant.sample_timesteps(16))
    model.emb.weight.requires_grad_(change != "freeze")
    if change == "replace":
        model.out = nn.Conv2d(8, 1, 3, padding=1)
    for p in model.parameters():
        p.grad = None
    t = ant.sample_timesteps(16)
    trained = [p for p in model.parameters() if p.requires_grad]
    per = per_sample_loss(model)(x, t)
    cid = ant.clusters.cluster_of(t)
    J_ref = torch.stack([
        torch.cat([g.reshape(-1) for g in torch.autograd.grad(per[cid == i].mean(), trained,
                                                              retain_graph=True)])
        for i in range(ant.k)
    ]).double()  # fmt: skip
    out = ant.backward(per_sample_loss(model), x, t)
    assert ant._onepass is not None
    assert (model.emb.weight.grad is None) == (change == "freeze")
    got = torch.cat([p.grad.reshape(-1) for p in trained]).double()
    torch.testing.assert_close(got, out.weights.double() @ J_ref, rtol=1e-5, atol=1e-6)


def _famo_step_below_min_loss(model, ant, opt, shift):
    """A famo + PCGrad step on losses moved to ``shift`` (below FAMO's min_loss = 0): whether
    it was finite, ant.step's return and its warnings, and whether FAMO's state stayed finite."""
    x = torch.randn(16, 1, 6, 6)
    out = ant.backward(lambda xb, tb: per_sample_loss(model)(xb, tb) * 0.0 + shift, x,
                       ant.sample_timesteps(16))  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        taken = ant.step(opt)
    state = ant.method.loss.state_dict()
    return bool(out.finite), taken, caught, all(torch.isfinite(v).all() for v in state.values())


def _famo_pcgrad():
    model, ant = setup("famo+pcgrad")
    opt = _sgd(model, ant)
    x = torch.randn(16, 1, 6, 6)
    for _ in range(2):  # FAMO has observed losses
        ant.backward(per_sample_loss(model), x, ant.sample_timesteps(16))
        ant.step(opt)
    return model, ant, opt


def test_a_weight_step_whose_loss_slopes_are_not_finite_is_skipped():
    """FAMO's slope 1 / (L - min_loss + eps) is not finite for a cluster loss at min_loss - eps
    (the gradients are finite): the step is not finite and skipped, and FAMO's state stays."""
    model, ant, opt = _famo_pcgrad()
    finite, taken, caught, state_ok = _famo_step_below_min_loss(model, ant, opt, -1e-8)
    assert not finite and taken is False and state_ok
    assert any("non-finite" in str(w.message) for w in caught)


def test_a_weight_step_on_losses_below_famos_min_loss_is_skipped_and_named():
    model, ant, opt = _famo_pcgrad()
    finite, taken, caught, state_ok = _famo_step_below_min_loss(model, ant, opt, -10.0)
    assert state_ok
    assert not finite and taken is False
    assert any("at or below FAMO's min_loss=0" in str(w.message) for w in caught)


@pytest.mark.parametrize("method", ["dwa", "famo"])
def test_one_observation_per_step_averages_each_cluster_over_the_micro_batches_it_was_in(method):
    """Micro-batches of one optimiser step that hold other clusters: the loss method observes
    each cluster's mean over the micro-batches it was present in (cluster 0 in both, the
    others in the second only), once."""
    model, ant = setup(method)
    opt = _sgd(model, ant)
    x = torch.randn(8, 1, 6, 6)
    t = ant.sample_timesteps(8)
    ant.reduce(per_sample_loss(model)(x, t), t).backward()
    ant.step(opt)  # the engine knows the trainer calls ant.step
    seen = []
    real = ant.method.loss.observe
    ant.method.loss.observe = lambda L, present: seen.append((L.clone(), present.clone())) or \
        real(L, present)  # fmt: skip
    opt.zero_grad(set_to_none=True)
    parts = []
    for t in (torch.full((8,), 3), torch.tensor([0, 5, 10, 30, 40, 60, 80, 99])):
        ant.reduce(per_sample_loss(model)(x, t), t).div(2).backward()
        parts.append(ant.last.cluster_losses.clone())
    assert ant.step(opt) is True
    assert len(seen) == 1
    L, present = seen[0]
    assert present.all()
    want = torch.cat([(parts[0][:1] + parts[1][:1]) / 2, parts[1][1:]])
    torch.testing.assert_close(L, want)


def test_a_nonfinite_earlier_micro_batch_skips_the_step_whose_gradients_are_finite():
    """reduce, reduce, ant.step: the first micro-batch's loss was NaN (its gradients are
    finite: the NaN sample is masked out of the graph), the second's finite: the step's
    verdict covers every micro-batch, so it is skipped."""
    model, ant = setup("vanilla")
    opt = _sgd(model, ant)
    x = torch.randn(8, 1, 6, 6)
    for nan in (True, False):
        t = ant.sample_timesteps(8)
        per = per_sample_loss(model)(x, t)
        if nan:
            per = torch.where(torch.arange(8) == 3, float("nan"), per)
        ant.reduce(per, t).div(2).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.warns(UserWarning, match="non-finite"):
        assert ant.step(opt) is False
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p.detach(), q)
    assert ant.stats()["nonfinite_steps"] == 2  # both micro-batches' records


@pytest.mark.parametrize("method", ["pcgrad", "uw"])
def test_a_fused_optimizer_under_a_grad_scaler_steps_through_the_scaler(method):
    """With an enabled GradScaler the scaler unscales and steps (also a fused optimiser): the
    update is the one without a scaler, not the scaled gradient."""
    (m1, plain), (m2, scaled) = setup(method), setup(method)
    o1 = torch.optim.SGD([{"params": m1.parameters()}, *plain.param_groups()], lr=0.1)
    o2 = torch.optim.SGD([{"params": m2.parameters()}, *scaled.param_groups()], lr=0.1,
                         fused=True)  # fmt: skip
    scaler = torch.amp.GradScaler("cpu", init_scale=64.0)
    x = torch.randn(16, 1, 6, 6)
    t = plain.sample_timesteps(16)
    scaled.sample_timesteps(16)
    if plain.needs_gradients:
        plain.backward(per_sample_loss(m1), x, t)
        scaled.backward(per_sample_loss(m2), x, t, scaler=scaler)
    else:
        plain.reduce(per_sample_loss(m1)(x, t), t).backward()
        scaler.scale(scaled.reduce(per_sample_loss(m2)(x, t), t)).backward()
    assert plain.step(o1) is True
    assert scaled.step(o2, scaler=scaler) is True
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_a_state_without_one_of_its_parts_is_named_as_not_an_ant_state():
    model, ant = setup("nash", update_every=2)
    ant.backward(per_sample_loss(model), torch.randn(8, 1, 6, 6), ant.sample_timesteps(8))
    state = ant.state_dict()
    for key in ("w", "sampler", "step"):
        bad = {k: v for k, v in state.items() if k != key}
        with pytest.raises(ValueError, match=rf"not an ANT state \(missing {key}\)"):
            ant.load_state_dict(bad)
    assert ant.step_count == 1


def test_a_state_of_another_sampling_mode_is_refused_before_anything_changes():
    model, ant = setup("pcgrad", sampling="equal")
    x = torch.randn(8, 1, 6, 6)
    ant.backward(per_sample_loss(model), x, ant.sample_timesteps(8))
    _, other = setup("pcgrad")  # "proportional"
    with pytest.raises(ValueError, match=r"with mode 'proportional', this engine uses 'equal'; "
                       r"construct ANT\(\.\.\., sampling='proportional'\)"):  # fmt: skip
        ant.load_state_dict(other.state_dict())
    assert ant.step_count == 1 and ant.sampler.mode == "equal"


@pytest.mark.parametrize("method", ["dwa", "famo"])
def test_a_state_taken_between_steps_holds_the_observations_still_waiting(method):
    """Without ant.step a loss method's observation of the last reduce waits for the next
    call; state_dict() makes it first, so an engine resumed from that state continues as the
    unbroken one does."""
    (model, ant), (model2, resumed) = setup(method), setup(method, seed=3)
    model2.load_state_dict(model.state_dict())
    x = torch.randn(8, 1, 6, 6)
    for _ in range(3):
        t = ant.sample_timesteps(8)
        ant.reduce(per_sample_loss(model)(x, t), t).backward()
    resumed.load_state_dict(ant.state_dict())
    t = ant.sample_timesteps(8)
    a = ant.reduce(per_sample_loss(model)(x, t), t)
    b = resumed.reduce(per_sample_loss(model2)(x, t), t)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    theirs = resumed.state_dict()["loss_method"]
    for k, v in ant.state_dict()["loss_method"].items():
        torch.testing.assert_close(v, theirs[k], rtol=0, atol=0, msg=k)


def test_a_load_of_another_sampling_mode_between_backward_and_step_leaves_the_step():
    model, ant = setup("pcgrad", sampling="equal")
    opt = _sgd(model, ant)
    ant.backward(per_sample_loss(model), torch.randn(8, 1, 6, 6), ant.sample_timesteps(8))
    with pytest.raises(ValueError, match="construct ANT"):
        ant.load_state_dict(setup("pcgrad")[1].state_dict())
    assert ant.step(opt) is True


def test_a_failed_load_between_backward_and_step_leaves_the_step():
    model, ant = setup("pcgrad")
    opt = _sgd(model, ant)
    ant.backward(per_sample_loss(model), torch.randn(8, 1, 6, 6), ant.sample_timesteps(8))
    state = ant.state_dict()
    with pytest.raises(ValueError, match="damaged"):
        ant.load_state_dict({**state, "telemetry": {**state["telemetry"], "t": 1}})
    assert ant.step(opt) is True


def test_step_right_after_a_load_is_an_error():
    model, ant = setup("pcgrad")
    opt = _sgd(model, ant)
    ant.backward(per_sample_loss(model), torch.randn(8, 1, 6, 6), ant.sample_timesteps(8))
    ant.load_state_dict(ant.state_dict())
    with pytest.raises(RuntimeError, match="no ant.reduce or ant.backward since the last ant.step"):
        ant.step(opt)


@pytest.mark.parametrize(("method", "kw"), [("pcgrad", {}), ("nash", {"update_every": 2})])
def test_the_reported_loss_is_the_mean_of_the_present_clusters(method, kw):
    """Without a loss method a step reports the mean of the present clusters' losses (an
    absent cluster is not a zero loss), on weight steps and off-steps alike."""
    model, ant = setup(method, **kw)
    x = torch.randn(6, 1, 6, 6)
    t = torch.tensor([1, 5, 30, 40, 60, 70])  # cluster 3 absent
    for _ in range(2):
        out = ant.backward(per_sample_loss(model), x, t)
        assert out.present.tolist() == [True, True, True, False]
        torch.testing.assert_close(out.loss, out.cluster_losses[:3].mean())


def test_a_frozen_model_is_not_taken_for_another_model():
    """A model without trainable parameters (frozen, here with inputs that require grad) gives
    the graph walk nothing to find: that is no sign of another model's losses."""
    model, ant = setup("vanilla")
    model.requires_grad_(False)
    x = torch.randn(8, 1, 6, 6).requires_grad_()
    t = ant.sample_timesteps(8)
    ant.reduce(per_sample_loss(model)(x, t), t).backward()
    assert x.grad is not None


def test_the_engine_seed_reaches_the_methods_random_streams_unless_given_its_own():
    assert ANT(linear_schedule(T), k=4, method="pcgrad", seed=7).method.grad.seed == 7
    assert ANT(linear_schedule(T), k=4, method="uw+pcgrad", seed=7).method.grad.seed == 7
    own = ANT(linear_schedule(T), k=4, method="pcgrad", seed=7, method_kwargs={"seed": 3})
    assert own.method.grad.seed == 3

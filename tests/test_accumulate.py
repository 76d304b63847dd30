"""Gradient accumulation through ant.backward(..., accumulate=True): a window of micro-batches
gives the update of their concatenation (same cluster counts), or the mean of each cluster's
micro-batch gradients (different counts), and refuses what would lose its gradients."""

from __future__ import annotations

import copy
import types
import warnings

import pytest
import torch
from test_engine import T, TinyNet, explicit_J, flat_grad, per_sample_loss

from antdiff import ANT
from antdiff.schedules import linear_schedule

METHODS = ["pcgrad", "nash", "uw+pcgrad", "graddrop", "imtl", "uw", "vanilla"]


def _pair(method, mode, **kw):
    """Two identical (model, engine, optimiser) triples."""
    out = []
    for _ in range(2):
        torch.manual_seed(0)
        model = TinyNet()
        ant = ANT(linear_schedule(T), k=4, method=method, model=model, seed=0, mode=mode, **kw)
        params = list(model.parameters())
        if ant.method.loss is not None:
            params += list(ant.method.loss.parameters())
        out.append((model, ant, torch.optim.SGD(params, lr=0.05)))
    return out


def _snapshot(model, ant):
    own = [] if ant.method.loss is None else list(ant.method.loss.parameters())
    return [p.detach().clone() for p in [*model.parameters(), *own]]


@pytest.mark.filterwarnings("ignore:ant.backward sorts the batch")  # the big batch's t
@pytest.mark.parametrize("mode", ["onepass", "micro", "retain_graph"])
@pytest.mark.parametrize("method", METHODS)
def test_a_window_equals_one_batch_of_its_micro_batches(method, mode):
    kw = {"update_every": 2} if method == "nash" else {}
    (m1, big, o1), (m2, acc, o2) = _pair(method, mode, **kw)
    g = torch.Generator().manual_seed(1)
    for step in range(4):  # Nash: on-, off-, on-, off-step
        t = big.sample_timesteps(8)
        acc.sample_timesteps(8)  # the same draws on both engines' samplers
        parts = [torch.randn(8, 1, 6, 6, generator=g) for _ in range(3)]
        o1.zero_grad(set_to_none=False)
        one = big.backward(per_sample_loss(m1), torch.cat(parts), t.repeat(3))
        for i, x in enumerate(parts):
            last = i == len(parts) - 1
            out = acc.backward(per_sample_loss(m2), x, t, accumulate=not last)
            if not last:
                assert acc._window is not None and acc.step_count == step
                assert torch.all(out.weights == 0)  # no update formed yet
        torch.testing.assert_close(flat_grad(m2), flat_grad(m1), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(out.weights, one.weights, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(out.cluster_losses, one.cluster_losses, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(out.loss, one.loss, rtol=1e-5, atol=1e-7)
        assert bool(out.finite) and acc._window is None and acc.step_count == step + 1
        assert big.step(o1) and acc.step(o2)
    for a, b in zip(_snapshot(m1, big), _snapshot(m2, acc)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert acc.stats()["steps"] == big.stats()["steps"] == 4


@pytest.mark.parametrize("mode", ["onepass", "micro", "retain_graph"])
@pytest.mark.parametrize("method", ["pcgrad", "imtl", "nash"])
def test_micro_batches_with_other_counts_give_each_clusters_mean_gradient(method, mode):
    """J_i = the mean of cluster i's micro-batch gradients, over the micro-batches it was in
    (the Gram, the weights and the update all see those means; IMTL-G's and Nash-MTL's weights
    depend on every entry of the Gram)."""
    (model, ant, _), _ = _pair(method, mode)
    lo, hi = ant.clusters.bounds[0], ant.clusters.bounds[-1]
    edges = list(ant.clusters.bounds)
    # micro-batch 1: clusters 0, 1, 2 with 1, 2, 3 samples; micro-batch 2: clusters 0 and 3
    t1 = torch.tensor([edges[0], edges[1], edges[1] + 1, edges[2], edges[2] + 1, edges[2] + 2])
    t2 = torch.tensor([lo, lo + 1, lo + 2, hi - 1])
    torch.manual_seed(3)
    x1, x2 = torch.randn(6, 1, 6, 6), torch.randn(4, 1, 6, 6)
    J1, per1 = explicit_J(model, x1, t1, ant.clusters, ant.k)
    J2, per2 = explicit_J(model, x2, t2, ant.clusters, ant.k)
    c1, c2 = (torch.bincount(ant.clusters.cluster_of(t), minlength=4) for t in (t1, t2))
    assert c1.tolist() == [1, 2, 3, 0] and c2.tolist() == [3, 0, 0, 1]
    M = (c1 > 0).double() + (c2 > 0).double()  # noqa: N806
    J = (J1 + J2) / M[:, None]  # noqa: N806  (an absent cluster's row is 0)
    L1, L2 = (torch.zeros(4, dtype=torch.float64).index_add(0, ant.clusters.cluster_of(t), p)  # noqa: N806
              for t, p in ((t1, per1.double()), (t2, per2.double())))  # fmt: skip
    L = (L1 / c1.clamp(min=1) + L2 / c2.clamp(min=1)) / M  # noqa: N806
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # timesteps not from the sampler: counted on the host
        ant.backward(per_sample_loss(model), x1, t1, accumulate=True)
        out = ant.backward(per_sample_loss(model), x2, t2)
    torch.testing.assert_close(out.cluster_losses.double(), L, rtol=1e-5, atol=1e-7)
    # the update is the weights times the mean rows, and those weights are the method's on the
    # mean rows' Gram (PCGrad: the same orders, a fresh method with the engine's seed)
    torch.testing.assert_close(flat_grad(model).double(), out.weights.double() @ J,
                               rtol=1e-5, atol=1e-7)
    fresh = ANT(linear_schedule(T), k=4, method=method, seed=0).method.grad
    w = fresh.weights(J @ J.T, M > 0).double()
    torch.testing.assert_close(out.weights.double(), w, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("mode", ["onepass", "micro"])
def test_graddrop_on_micro_batches_with_other_counts_sees_each_clusters_mean_gradient(mode):
    """GradDrop's purity and update depend on every row's scale: each cluster's row is scaled by
    1 / the micro-batches it was in (M_i), not 1 / the number of micro-batches."""
    (model, ant, _), _ = _pair("graddrop", mode)
    e = list(ant.clusters.bounds)
    t1 = torch.tensor([e[0], e[1], e[1] + 1, e[2], e[2] + 1, e[2] + 2])  # clusters 0, 1, 2
    t2 = torch.tensor([e[0], e[0] + 1, e[0] + 2, e[-1] - 1])  # clusters 0, 3
    torch.manual_seed(3)
    x1, x2 = torch.randn(6, 1, 6, 6), torch.randn(4, 1, 6, 6)
    J1, _ = explicit_J(model, x1, t1, ant.clusters, ant.k)
    J2, _ = explicit_J(model, x2, t2, ant.clusters, ant.k)
    c1, c2 = (torch.bincount(ant.clusters.cluster_of(t), minlength=4) for t in (t1, t2))
    M = (c1 > 0).double() + (c2 > 0).double()  # noqa: N806
    assert M.tolist() == [2, 1, 1, 1]
    J = (J1 + J2) / M[:, None]  # noqa: N806
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # timesteps not from the sampler
        ant.backward(per_sample_loss(model), x1, t1, accumulate=True)
        ant.backward(per_sample_loss(model), x2, t2)
    # a fresh GradDrop with the engine's seed draws the same U
    fresh = ANT(linear_schedule(T), k=4, method="graddrop", seed=0).method.grad
    want = fresh.combine_grads(J.float(), M > 0)
    torch.testing.assert_close(flat_grad(model), want, rtol=1e-5, atol=1e-7)


def test_nash_off_steps_in_a_window_use_the_cached_weights():
    (model, ant, _), _ = _pair("nash", "micro", update_every=2)
    lf = per_sample_loss(model)
    x = torch.randn(8, 1, 6, 6)
    t = ant.sample_timesteps(8)
    w = ant.backward(lf, x, t).weights  # the on-step: weights computed
    ant.step(torch.optim.SGD(model.parameters(), lr=0.0))
    t2 = ant.sample_timesteps(8)
    x1, x2 = torch.randn(8, 1, 6, 6), torch.randn(8, 1, 6, 6)
    calls = []
    counting = lambda xb, tb: calls.append(len(tb)) or lf(xb, tb)  # noqa: E731
    J1, _ = explicit_J(model, x1, t2, ant.clusters, ant.k)
    J2, _ = explicit_J(model, x2, t2, ant.clusters, ant.k)
    ant.backward(counting, x1, t2, accumulate=True)
    out = ant.backward(counting, x2, t2)
    assert calls == [8, 8]  # an off-step: one forward per micro-batch
    torch.testing.assert_close(out.weights, w)
    torch.testing.assert_close(flat_grad(model).double(), w.double() @ ((J1 + J2) / 2),
                               rtol=1e-5, atol=1e-7)


@pytest.mark.filterwarnings("ignore:ant.backward sorts the batch")
def test_a_window_on_the_redo_of_a_nonfinite_recompute_equals_one_batch():
    """update_every=2: a weight recompute that was not finite is redone at the next step (an
    off-step by the step count); a window opened there stays an on-step to its last call."""
    (m1, big, o1), (m2, acc, o2) = _pair("nash", "micro", update_every=2)
    g = torch.Generator().manual_seed(1)
    calls = []
    counting = lambda xb, tb: calls.append(len(tb)) or per_sample_loss(m2)(xb, tb)  # noqa: E731
    for step in range(4):  # on-, off-, on- (not finite), and the redo on-step
        t = big.sample_timesteps(8)
        acc.sample_timesteps(8)
        parts = [torch.randn(8, 1, 6, 6, generator=g) for _ in range(2)]
        if step == 2:
            parts[0][0] = float("nan")
        one = big.backward(per_sample_loss(m1), torch.cat(parts), t.repeat(2))
        calls.clear()
        acc.backward(counting, parts[0], t, accumulate=True)
        out = acc.backward(counting, parts[1], t)
        # an on-step: one forward per present cluster and micro-batch; an off-step: one each
        assert (len(calls) == 2) == (step == 1) and acc._window is None
        if step == 2:
            assert not bool(one.finite) and not bool(out.finite)
            with pytest.warns(UserWarning, match="non-finite"):
                assert not big.step(o1)
            with pytest.warns(UserWarning, match="non-finite"):
                assert not acc.step(o2)
            continue
        torch.testing.assert_close(flat_grad(m2), flat_grad(m1), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(out.weights, one.weights, rtol=1e-5, atol=1e-7)
        assert bool(out.finite) and big.step(o1) and acc.step(o2)
    for a, b in zip(_snapshot(m1, big), _snapshot(m2, acc)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["pcgrad", "uw+nash", "uw"])
def test_a_nonfinite_micro_batch_skips_the_whole_window_and_keeps_the_state(method):
    (model, ant, opt), _ = _pair(method, "micro")
    x = torch.randn(8, 1, 6, 6)
    t = ant.sample_timesteps(8)
    ant.backward(per_sample_loss(model), x, t)
    ant.step(opt)
    state = {k: v for k, v in ant.state_dict().items() if k != "telemetry"}
    before = _snapshot(model, ant)
    bad = x.clone()
    bad[0] = float("nan")
    ant.backward(per_sample_loss(model), bad, t, accumulate=True)
    out = ant.backward(per_sample_loss(model), x, t)
    assert not bool(out.finite)
    with pytest.warns(UserWarning, match="non-finite"):
        assert ant.step(opt) is False
    for a, b in zip(before, _snapshot(model, ant)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    after = {k: v for k, v in ant.state_dict().items() if k != "telemetry"}
    assert after["step"] == state["step"] + 1
    for key in ("w", "loss_method", "grad_method", "sampler"):
        assert repr(after[key]) == repr(state[key]), key


def test_an_open_window_refuses_what_would_lose_its_gradients():
    (model, ant, opt), _ = _pair("pcgrad", "micro")
    lf = per_sample_loss(model)
    x = torch.randn(8, 1, 6, 6)
    t = ant.sample_timesteps(8)
    with pytest.raises(TypeError, match="accumulate must be True or False"):
        ant.backward(lf, x, t, accumulate=1)
    ant.backward(lf, x, t, accumulate=True)
    for call in (lambda: ant.step(opt), ant.state_dict,
                 lambda: ant.attach(TinyNet())):  # fmt: skip
        with pytest.raises(RuntimeError, match="accumulation window is open"):
            call()
    # a backward that raises, refused by its own checks too, drops the window (a loop that
    # starts the step again from its first micro-batch then counts each once)
    with pytest.raises(ValueError, match="GradScaler") as info:
        ant.backward(lf, x, t, scaler=torch.amp.GradScaler("cpu"))
    assert ant._window is None and "window was dropped" in "".join(info.value.__notes__)
    ant.backward(lf, x, t, accumulate=True)
    # an accelerate optimiser on a micro-step that does not sync: a no-op, the window goes on
    opt.gradient_state = types.SimpleNamespace(sync_gradients=False)
    before = _snapshot(model, ant)
    assert ant.step(opt) is True
    for a, b in zip(before, _snapshot(model, ant)):
        assert torch.equal(a, b)
    ant.backward(lf, x, t)
    opt.gradient_state.sync_gradients = True
    assert ant.step(opt) is True
    assert ant.state_dict()["step"] == 1
    # a load drops a window; a failed load keeps it
    ant.backward(lf, x, t, accumulate=True)
    state = ANT(linear_schedule(T), k=4, method="pcgrad", seed=0).state_dict()
    with pytest.raises(ValueError):
        ant.load_state_dict({**state, "method": "nash"})
    assert ant._window is not None
    ant.load_state_dict(state)
    assert ant._window is None


def test_a_loss_space_window_refuses_reduce():
    (model, ant, _), _ = _pair("uw", "micro")
    x = torch.randn(8, 1, 6, 6)
    t = ant.sample_timesteps(8)
    ant.backward(per_sample_loss(model), x, t, accumulate=True)
    with pytest.raises(RuntimeError, match="ant.reduce while an accumulation window"):
        ant.reduce(per_sample_loss(model)(x, t), t)
    with torch.no_grad():  # a validation loss is fine
        ant.reduce(per_sample_loss(model)(x, t), t)


@pytest.mark.filterwarnings("ignore:ant.backward sorts the batch")
@pytest.mark.parametrize("mode", ["onepass", "micro"])
def test_equal_sampling_windows_equal_their_concatenation(mode):
    """sampling="equal" at a micro-batch size that k divides: every draw holds the same counts,
    so a window of fresh draws gives the update of the concatenated batch."""
    (m1, big, _), (m2, acc, _) = _pair("uw+pcgrad", mode, sampling="equal")
    g = torch.Generator().manual_seed(4)
    ts = [acc.sample_timesteps(8) for _ in range(3)]
    xs = [torch.randn(8, 1, 6, 6, generator=g) for _ in ts]
    counts = {tuple(torch.bincount(acc.clusters.cluster_of(t), minlength=4).tolist()) for t in ts}
    assert counts == {(2, 2, 2, 2)}
    assert len({tuple(t.tolist()) for t in ts}) == 3  # other timesteps, same counts
    one = big.backward(per_sample_loss(m1), torch.cat(xs), torch.cat(ts))
    for i, (x, t) in enumerate(zip(xs, ts)):
        out = acc.backward(per_sample_loss(m2), x, t, accumulate=i < 2)
    torch.testing.assert_close(flat_grad(m2), flat_grad(m1), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.weights, one.weights, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.cluster_losses, one.cluster_losses, rtol=1e-5, atol=1e-7)


def test_a_resumed_engine_keeps_observing_accumulated_reduces_as_one_step():
    """ant.reduce micro-batches wait for ant.step's verdict once the trainer has called
    ant.step; a resumed engine observed its first step's micro-batches one by one (DWA counted
    two steps) until its own first ant.step: the state now says the trainer steps."""
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ant = ANT(linear_schedule(T), k=4, method="dwa", model=model, seed=0)
    g = torch.Generator().manual_seed(5)
    batches = [[torch.randn(8, 1, 6, 6, generator=g) for _ in range(2)] for _ in range(3)]

    def step(engine, xs):
        for x in xs:
            t = engine.sample_timesteps(8)
            (engine.reduce(per_sample_loss(model)(x, t), t) / 2).backward()
        engine.step(opt)
        opt.zero_grad()

    step(ant, batches[0])
    state = ant.state_dict()
    resumed = ANT(linear_schedule(T), k=4, method="dwa", model=model, seed=0)
    resumed.load_state_dict(state)
    saved = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    torch.manual_seed(7)  # (the timesteps follow torch's seed)
    for xs in batches[1:]:
        step(ant, xs)
    unbroken = ant.method.loss.state_dict()
    model.load_state_dict(saved[0])
    opt.load_state_dict(saved[1])
    torch.manual_seed(7)
    for xs in batches[1:]:
        step(resumed, xs)
    # one observation per optimiser step, but for the first: before any ant.step the engine
    # cannot know that one follows, and observes each micro-batch
    assert int(unbroken["seen"]) == 2 + 1 + 1
    assert repr(resumed.method.loss.state_dict()) == repr(unbroken)


@pytest.mark.filterwarnings("ignore:ant.backward sorts the batch")
@pytest.mark.parametrize("method", ["pcgrad", "uw+nash"])
def test_a_window_under_a_grad_scaler_equals_one_batch(method):
    """Every micro-batch scaled by the same scale; the last call unscales the Gram and the
    update once (Nash: an on- and an off-step)."""
    kw = {"update_every": 2} if "nash" in method else {}
    (m1, big, o1), (m2, acc, o2) = _pair(method, "micro", **kw)
    s1, s2 = (torch.amp.GradScaler("cpu", init_scale=2.0**10) for _ in range(2))
    g = torch.Generator().manual_seed(6)
    for _ in range(2):
        t = big.sample_timesteps(8)
        acc.sample_timesteps(8)
        parts = [torch.randn(8, 1, 6, 6, generator=g) for _ in range(2)]
        big.backward(per_sample_loss(m1), torch.cat(parts), t.repeat(2), scaler=s1)
        acc.backward(per_sample_loss(m2), parts[0], t, scaler=s2, accumulate=True)
        acc.backward(per_sample_loss(m2), parts[1], t, scaler=s2)
        assert big.step(o1, scaler=s1) and acc.step(o2, scaler=s2)  # (it updates the scale)
    assert s1.get_scale() == s2.get_scale()
    for a, b in zip(_snapshot(m1, big), _snapshot(m2, acc)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_failed_micro_batch_drops_the_window():
    """A loss_fn that raises part-way (e.g. an out-of-memory error the training loop catches)
    has added some clusters' rows to J: the window is dropped, and the next one starts clean."""
    (model, ant, opt), (m2, ref, _) = _pair("pcgrad", "micro")
    lf = per_sample_loss(model)
    x1, x2, x3 = (torch.randn(8, 1, 6, 6) for _ in range(3))
    t = ant.sample_timesteps(8)
    ref.sample_timesteps(8)
    calls = []

    def flaky(xb, tb):
        calls.append(1)
        if len(calls) == 4 + 3:  # the second micro-batch's third cluster pass
            raise RuntimeError("out of memory (simulated)")
        return lf(xb, tb)

    ant.backward(flaky, x1, t, accumulate=True)
    with pytest.raises(RuntimeError, match="out of memory") as info:
        ant.backward(flaky, x2, t, accumulate=True)
    assert ant._window is None
    if hasattr(info.value, "__notes__"):
        assert "accumulation window was dropped" in info.value.__notes__[0]
    # the step again from its first micro-batch: the window of x1 and x3 alone
    ant.backward(lf, x1, t, accumulate=True)
    ant.backward(lf, x3, t)
    ref.backward(per_sample_loss(m2), x1, t, accumulate=True)
    ref.backward(per_sample_loss(m2), x3, t)
    torch.testing.assert_close(flat_grad(model), flat_grad(m2), rtol=1e-6, atol=1e-8)


def test_auto_leaving_onepass_inside_a_window_drops_it():
    """mode='auto': a micro-batch one-pass cannot serve (a layer under non-reentrant activation
    checkpointing, seen only in its backward, after other layers wrote part of its rows) after
    the window's first went through one-pass: refused and the window dropped, not topped up by
    micro; the next window runs in micro."""
    from torch.utils.checkpoint import checkpoint

    (model, ant, _), _ = _pair("pcgrad", "auto")
    _, (m2, ref, _) = _pair("pcgrad", "micro")

    def checkpointed(m):
        def block(xb, tb):
            return torch.nn.functional.silu(m.norm(m.inp(xb) + m.emb(tb)[:, :, None, None]))

        def fn(xb, tb):
            h = checkpoint(block, xb, tb, use_reentrant=False)
            target = torch.sin(xb * (1 + tb[:, None, None, None] / T))
            return ((m.out(h) - target) ** 2).mean(dim=(1, 2, 3))

        return fn

    x1, x2 = torch.randn(8, 1, 6, 6), torch.randn(8, 1, 6, 6)
    t = ant.sample_timesteps(8)
    ref.sample_timesteps(8)
    ant.backward(per_sample_loss(model), x1, t, accumulate=True)
    assert ant._onepass is not None  # the first micro-batch went through one-pass
    with pytest.raises(RuntimeError, match="window's earlier micro-batches went through one-pass"):
        ant.backward(checkpointed(model), x2, t)
    assert ant._window is None and ant._onepass is None
    ant.backward(checkpointed(model), x1, t, accumulate=True)
    ant.backward(checkpointed(model), x2, t)
    ref.backward(checkpointed(m2), x1, t, accumulate=True)
    ref.backward(checkpointed(m2), x2, t)
    torch.testing.assert_close(flat_grad(model), flat_grad(m2), rtol=1e-6, atol=1e-8)


def test_changed_parameters_drop_the_window_and_attach_waits():
    (model, ant, opt), _ = _pair("pcgrad", "micro")
    lf = per_sample_loss(model)
    x = torch.randn(8, 1, 6, 6)
    t = ant.sample_timesteps(8)
    ant.backward(lf, x, t, accumulate=True)
    with pytest.raises(RuntimeError, match="ant.attach while an accumulation window is open"):
        ant.attach(model)  # (it rebuilds the buffer J accumulates in)
    model.out.bias.requires_grad_(False)
    with pytest.raises(RuntimeError, match="parameters changed"):
        ant.backward(lf, x, t)
    assert ant._window is None  # not stuck: the next step trains
    ant.backward(lf, x, t, accumulate=True)
    ant.backward(lf, x, t)
    assert ant.step(opt)


def test_changed_parameters_drop_an_off_step_window():
    """update_every=2: an off-step window (a weighted backward per micro-batch, into J's row 0)
    refuses parameters changed inside it too, and the next window trains."""
    (model, ant, opt), _ = _pair("nash", "micro", update_every=2)
    lf = per_sample_loss(model)
    x = torch.randn(8, 1, 6, 6)
    ant.backward(lf, x, ant.sample_timesteps(8))  # the on-step
    assert ant.step(opt)
    t = ant.sample_timesteps(8)
    ant.backward(lf, x, t, accumulate=True)
    assert ant._window is not None and not ant._window.on_step
    model.out.bias.requires_grad_(False)
    with pytest.raises(RuntimeError, match="parameters changed"):
        ant.backward(lf, x, t)
    assert ant._window is None
    ant.backward(lf, x, t, accumulate=True)
    ant.backward(lf, x, t)
    assert ant.step(opt) and ant.state_dict()["step"] == 2


@pytest.mark.parametrize("method", ["uw", "vanilla"])
def test_a_loss_space_window_refuses_trainable_tensors_outside_the_model(method):
    (model, ant, _), _ = _pair(method, "micro")
    gain = torch.ones((), requires_grad=True)  # not a parameter of the model

    def lf(xb, tb):
        return per_sample_loss(model)(xb, tb) * gain

    x = torch.randn(8, 1, 6, 6)
    t = ant.sample_timesteps(8)
    ant.backward(lf, x, t)  # one batch: an ordinary backward gives it its gradient
    with pytest.raises(ValueError, match="outside the attached model"):
        ant.backward(lf, x, t, accumulate=True)
    assert ant._window is None


def test_another_model_is_checked_for_outside_tensors_again():
    (model, ant, opt), _ = _pair("uw", "micro")
    x = torch.randn(8, 1, 6, 6)
    t = ant.sample_timesteps(8)
    ant.backward(per_sample_loss(model), x, t, accumulate=True)  # checked: nothing outside
    ant.backward(per_sample_loss(model), x, t)
    ant.step(opt)
    other = TinyNet()
    gain = torch.ones((), requires_grad=True)
    ant.attach(other)
    with pytest.raises(ValueError, match="outside the attached model"):
        ant.backward(lambda xb, tb: per_sample_loss(other)(xb, tb) * gain, x, t, accumulate=True)


def test_vanilla_window_weights_are_the_mean_cluster_shares():
    (model, ant, _), _ = _pair("vanilla", "micro")
    lf = per_sample_loss(model)
    edges = list(ant.clusters.bounds)
    t1 = torch.tensor([edges[0]] * 6 + [edges[1], edges[2]])  # shares 6/8, 1/8, 1/8, 0
    t2 = torch.tensor([edges[3]] * 4 + [edges[0]] * 4)  # shares 1/2, 0, 0, 1/2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ant.backward(lf, torch.randn(8, 1, 6, 6), t1, accumulate=True)
        out = ant.backward(lf, torch.randn(8, 1, 6, 6), t2)
    torch.testing.assert_close(out.weights, torch.tensor([10 / 16, 1 / 16, 1 / 16, 4 / 16]))


@pytest.mark.parametrize("method", ["uw", "dwa"])
def test_a_loss_space_window_with_other_counts_reports_each_clusters_mean(method):
    """The window's clusters: every one present in some micro-batch, its loss the mean of its
    micro-batch means over the micro-batches it was in."""
    (model, ant, _), _ = _pair(method, "micro")
    e = list(ant.clusters.bounds)
    t1 = torch.tensor([e[0], e[1], e[1] + 1, e[2], e[2] + 1, e[2] + 2])  # clusters 0, 1, 2
    t2 = torch.tensor([e[0], e[0] + 1, e[0] + 2, e[-1] - 1])  # clusters 0, 3
    torch.manual_seed(3)
    x1, x2 = torch.randn(6, 1, 6, 6), torch.randn(4, 1, 6, 6)
    L, M = torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)  # noqa: N806
    with torch.no_grad():
        for x, t in ((x1, t1), (x2, t2)):
            c = ant.clusters.cluster_of(t)
            n = torch.bincount(c, minlength=4).double()
            per = per_sample_loss(model)(x, t).double()
            L += torch.zeros(4, dtype=torch.float64).index_add(0, c, per) / n.clamp(min=1)
            M += (n > 0).double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # timesteps not from the sampler
        ant.backward(per_sample_loss(model), x1, t1, accumulate=True)
        out = ant.backward(per_sample_loss(model), x2, t2)
    assert out.present.tolist() == [True] * 4 and bool((out.weights > 0).all())
    torch.testing.assert_close(out.cluster_losses.double(), L / M, rtol=1e-5, atol=1e-7)


def test_window_scalers_and_inputs_that_require_grad():
    (model, ant, _), _ = _pair("uw", "micro")
    x = torch.randn(8, 1, 6, 6)
    t = ant.sample_timesteps(8)
    one, two = torch.amp.GradScaler("cpu"), torch.amp.GradScaler("cpu")
    ant.backward(per_sample_loss(model), x, t, scaler=one, accumulate=True)
    with pytest.raises(ValueError, match="ran with a GradScaler, this one with another"):
        ant.backward(per_sample_loss(model), x, t, scaler=two)
    ant.backward(per_sample_loss(model), x, t, scaler=one)  # refused before it ran: it goes on
    off = torch.amp.GradScaler("cpu", enabled=False)  # a disabled scaler is no scaler
    ant.backward(per_sample_loss(model), x, t, scaler=off, accumulate=True)
    ant.backward(per_sample_loss(model), x, t, scaler=None)
    # a batch tensor that requires grad is loss_fn's input, not a tensor outside the model
    xg = x.clone().requires_grad_()
    ant.backward(per_sample_loss(model), xg, t, accumulate=True)
    ant.backward(per_sample_loss(model), xg, t)


def test_a_load_that_fails_keeps_the_window_and_the_state_keeps_uses_step():
    (model, ant, opt), _ = _pair("pcgrad", "micro")
    x = torch.randn(8, 1, 6, 6)
    t = ant.sample_timesteps(8)
    ant.backward(per_sample_loss(model), x, t)
    ant.step(opt)
    assert ant.state_dict()["uses_step"] is True
    state = ANT(linear_schedule(T), k=4, method="pcgrad", seed=0).state_dict()
    assert state["uses_step"] is False
    ant.backward(per_sample_loss(model), x, t, accumulate=True)
    with pytest.raises(ValueError):  # damaged weights: the load fails inside, after the checks
        ant.load_state_dict({**state, "w": "not a tensor"})
    assert ant._window is not None and ant._uses_step is True
    ant.load_state_dict(state)  # a good load drops the window and takes the state's uses_step
    assert ant._window is None and ant._uses_step is False

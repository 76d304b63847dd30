"""Engine review findings: a replaced non-finite ant.backward no longer voids the step that
replaced it, a redo owed after a non-finite weight recompute survives a call that raises, and a
memory-format conversion after attach gives gradients in the new layout."""

from __future__ import annotations

import warnings

import pytest
import torch
from test_engine import T, TinyNet, per_sample_loss, setup

from antdiff import ANT
from antdiff.schedules import linear_schedule


@pytest.mark.parametrize("method", ["uw", "famo", "vanilla"])
def test_a_replaced_nonfinite_backward_does_not_void_the_step_that_replaced_it(method):
    """README: without accumulate, a second ant.backward before ant.step REPLACES the first's
    gradients. For a loss-space method (or vanilla) trained through ant.backward, ant.step
    checks the gradients itself and AND-s the flags of every record since the last step, so
    the discarded call's NaN skips the finite update that replaced it."""
    model, ant = setup(method)
    opt = torch.optim.AdamW([{"params": list(model.parameters())}, *ant.param_groups()], lr=1e-2)
    fn = per_sample_loss(model)
    x = torch.randn(8, 1, 6, 6)
    opt.zero_grad(set_to_none=True)
    ant.backward(fn, x, ant.sample_timesteps(8))
    assert ant.step(opt)
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad(set_to_none=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "replaced, not accumulated", and the skip warning
        ant.backward(lambda a, b: fn(a, b) * float("nan"), x, ant.sample_timesteps(8))
        out = ant.backward(fn, x, ant.sample_timesteps(8))  # replaces the NaN call
        assert bool(out.finite)
        assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())
        stepped = ant.step(opt)
    assert stepped is True
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


class _Recorder:
    """Counts the weight recomputes (``ANT._gradient_step`` calls) by step_count."""

    def __init__(self, ant: ANT) -> None:
        self.at: list[int] = []
        inner = ant._gradient_step

        def wrapped(*a, **k):
            self.at.append(ant.step_count)
            return inner(*a, **k)

        ant._gradient_step = wrapped


@pytest.mark.parametrize("window", [False, True])
def test_a_redo_owed_after_a_nonfinite_recompute_survives_a_call_that_raises(window):
    """update_every > 1: after a skipped (non-finite) recompute, ant.backward redoes it at the
    next call. README: a call that raises (e.g. an OOM the loop catches) drops the window and
    the step starts again; the retried step must still redo the recompute, as a run without
    the failed call does (here: on-steps at step_count 0, 4 and 5)."""
    model, ant = setup("pcgrad", update_every=4, mode="micro")
    rec = _Recorder(ant)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    fn = per_sample_loss(model)
    x = torch.randn(8, 1, 6, 6)

    def boom(a, b):
        raise RuntimeError("out of memory (simulated)")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(4):
            ant.backward(fn, x, ant.sample_timesteps(8))
            ant.step(opt)
        ant.backward(lambda a, b: fn(a, b) * float("nan"), x, ant.sample_timesteps(8))
        assert ant.step(opt) is False  # the recompute at step_count 4 was not finite
        with pytest.raises(RuntimeError, match="out of memory"):
            if window:  # the window's first micro-batch passes, its second one fails
                ant.backward(fn, x, ant.sample_timesteps(8), accumulate=True)
            ant.backward(boom, x, ant.sample_timesteps(8))
        assert ant._window is None
        before = len(rec.at)
        ant.backward(fn, x, ant.sample_timesteps(8))  # the step again
        ant.step(opt)
    assert ant.step_count == 6
    assert rec.at[before:] == [5], rec.at  # the retried step recomputed the weights


@pytest.mark.parametrize("mode", ["micro", "onepass"])
def test_a_memory_format_conversion_after_attach_gives_gradients_in_the_new_layout(mode):
    """README: parameters converted after attach are picked up at the next step. A
    channels_last conversion keeps the Parameter objects, dtype and device, so the buffer was
    kept with row views in the old layout (autograd warns "grad and param do not obey the
    gradient layout contract"); torch's fused AdamW then moved the weights by up to 2 lr
    wrongly."""
    results = []
    for fused in (False, True):
        torch.manual_seed(0)
        model = TinyNet()
        ant = ANT(linear_schedule(T), k=4, method="pcgrad", model=model, seed=0, mode=mode)
        x = torch.randn(8, 1, 6, 6, generator=torch.Generator().manual_seed(1))
        ant.backward(per_sample_loss(model), x, ant.sample_timesteps(8))  # the buffer is built
        model.zero_grad(set_to_none=True)
        model.to(memory_format=torch.channels_last)  # same Parameter objects, new layout
        assert not model.out.weight.is_contiguous()
        opt = torch.optim.AdamW(model.parameters(), lr=0.01, fused=fused)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # autograd's layout-contract warning
            ant.backward(per_sample_loss(model), x, ant.sample_timesteps(8))
        if fused:
            for n, p in model.named_parameters():
                real = [d for d in range(p.dim()) if p.shape[d] > 1]  # size-1 strides are free
                assert [p.grad.stride(d) for d in real] == [p.stride(d) for d in real], n
        assert ant.step(opt) is True
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("bad", ["scaler", "timesteps"])
def test_a_call_refused_inside_a_window_drops_it_so_a_restart_counts_once(bad):
    """README: a call that raises drops the window and the step starts again from its first
    micro-batch. A call refused by its checks (another scaler, timesteps out of range) raised
    before that and left the window open, so a restart added its first micro-batches twice."""
    def run(fail: bool):
        model, ant = setup("pcgrad", mode="micro")
        fn = per_sample_loss(model)
        g = torch.Generator().manual_seed(3)
        xs = [torch.randn(8, 1, 6, 6, generator=g) for _ in range(2)]
        ts = [ant.sample_timesteps(8) for _ in range(2)]
        if fail:
            ant.backward(fn, xs[0], ts[0], accumulate=True)
            with pytest.raises(ValueError) as info:
                if bad == "scaler":
                    ant.backward(fn, xs[1], ts[1], scaler=torch.amp.GradScaler("cpu"))
                else:
                    ant.backward(fn, xs[1], ts[1] + T)
            assert "start the optimiser step again" in "".join(getattr(info.value, "__notes__", []))
            assert ant._window is None
        ant.backward(fn, xs[0], ts[0], accumulate=True)  # the step from its first micro-batch
        ant.backward(fn, xs[1], ts[1])
        return [p.grad.clone() for p in model.parameters()]

    for a, b in zip(run(False), run(True)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("b, sampling", [(16, "proportional"), (3, "uniform")])
def test_graddrop_alone_reports_the_scale_its_update_gives_each_cluster(b, sampling):
    """GradDrop with a "mean" reduction divides its combined gradient by the present clusters:
    its reported weights were c = 1 for every cluster (absent ones too), k times what a Gram
    method reports for the same scale. With leak 1 nothing is dropped, and the update is then
    exactly sum_i w_i J_i with the reported w (0 for an absent cluster)."""
    model, ant = setup("graddrop", k=4, mode="micro", sampling=sampling,
                       method_kwargs={"leak": 1.0})  # fmt: skip
    fn = per_sample_loss(model)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(b, 1, 6, 6, generator=g)
    t = torch.tensor([5, 7, 60]) if b == 3 else ant.sample_timesteps(b)
    out = ant.backward(fn, x, t)
    update = torch.cat([p.grad.flatten() for p in model.parameters()])
    cid = ant.clusters.cluster_of(t)
    rows = []
    for i in range(4):
        model.zero_grad(set_to_none=True)
        m = cid == i
        if m.any():
            fn(x[m], t[m]).mean().backward()
            rows.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        else:
            rows.append(torch.zeros_like(update))
    kp = int(out.present.sum())
    want = torch.where(out.present, torch.full((4,), 1.0 / kp), torch.zeros(4))
    torch.testing.assert_close(out.weights, want)
    torch.testing.assert_close(update, (out.weights[:, None] * torch.stack(rows)).sum(0),
                               rtol=1e-5, atol=1e-7)  # fmt: skip

"""Review findings on the day's engine changes: frozen UW log-variances are not reported as never
stepped, and a redo owed by a window survives one-pass's fallback inside it."""

from __future__ import annotations

import warnings

import pytest
import torch
from test_engine import T, TinyNet, per_sample_loss, setup
from test_review_engine import _Recorder

from antdiff import ANT
from antdiff.schedules import linear_schedule


def test_frozen_uw_log_variances_are_not_reported_as_never_stepped():
    """UW's log-variances frozen on purpose (requires_grad_(False): _loss_stage and
    _check_optimizer both skip them) and an optimiser of the model alone: ant.backward's new
    version-counter check warns that the optimiser does not step them."""
    model, ant = setup("uw")
    ant.method.loss.s.requires_grad_(False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    fn = per_sample_loss(model)
    x = torch.randn(8, 1, 6, 6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            opt.zero_grad()
            ant.backward(fn, x, ant.sample_timesteps(8))
            opt.step()
    assert not [w for w in caught if "own parameters" in str(w.message)]


class _LateOffBatch(TinyNet):
    """After ``late = True`` its embedding is also called off the batch dimension, which
    one-pass finds only in the forward (mode "auto" then falls back to micro)."""

    late = False

    def forward(self, x, t):
        h = super().forward(x, t)
        if self.late:
            h = h + 0 * self.emb(torch.arange(3)).sum()
        return h


def test_a_redo_owed_by_a_window_survives_one_passs_fallback_inside_it():
    """update_every > 1 after a non-finite recompute: the window's first call takes the redo
    (stored as the window's owed one). Its second call falls back from one-pass to micro, which
    drops the window with a RuntimeError; the retried step must still redo the recompute (as
    test_review_engine's window case does for any other error)."""
    torch.manual_seed(0)
    model = _LateOffBatch()
    ant = ANT(linear_schedule(T), k=4, method="pcgrad", model=model, seed=0, update_every=4,
              mode="auto")  # fmt: skip
    rec = _Recorder(ant)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    fn = per_sample_loss(model)
    x = torch.randn(8, 1, 6, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(4):
            ant.backward(fn, x, ant.sample_timesteps(8))
            ant.step(opt)
        assert ant._onepass is not None
        ant.backward(lambda a, b: fn(a, b) * float("nan"), x, ant.sample_timesteps(8))
        assert ant.step(opt) is False  # the recompute at step_count 4 was not finite
        ant.backward(fn, x, ant.sample_timesteps(8), accumulate=True)  # takes the redo
        model.late = True
        with pytest.raises(RuntimeError, match="start the optimiser step again"):
            ant.backward(fn, x, ant.sample_timesteps(8))
        assert ant._window is None and ant._onepass is None
        before = len(rec.at)
        ant.backward(fn, x, ant.sample_timesteps(8))  # the step again (micro now)
        ant.step(opt)
    assert ant.step_count == 6
    assert rec.at[before:] == [5], rec.at


def test_backward_with_another_model_inside_a_window_is_refused_and_keeps_the_window():
    """README: while a window is open, attaching another model raises so that the window's
    gradients are not lost; through ant.backward(model=other) too (not dropped like a call
    that fails its checks), and the window then completes as an unbroken one."""
    def run(interrupt: bool):
        model, ant = setup("pcgrad", mode="micro")
        fn = per_sample_loss(model)
        g = torch.Generator().manual_seed(5)
        xs = [torch.randn(8, 1, 6, 6, generator=g) for _ in range(2)]
        ts = [ant.sample_timesteps(8) for _ in range(2)]
        ant.backward(fn, xs[0], ts[0], accumulate=True)
        if interrupt:
            with pytest.raises(RuntimeError, match="accumulation window is open"):
                ant.backward(fn, xs[1], ts[1], model=TinyNet())
            assert ant._window is not None
        ant.backward(fn, xs[1], ts[1])
        return [p.grad.clone() for p in model.parameters()]

    for a, b in zip(run(False), run(True)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

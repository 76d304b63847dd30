"""The engine's entry points: construction, attach, timestep sampling, ``reduce``,
``backward`` and ``shard``: their input checks, and the host-side bookkeeping around them (the
cluster losses of empty clusters and of other dtypes, the accumulation window's finite flag,
the weights a resumed run recomputes, which optimisers ``ant.step`` lets skip a non-finite step
on the device and when such a skip is reported)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from test_engine import T, TinyNet, per_sample_loss, setup
from torch import nn

from antdiff import ANT
from antdiff.clustering import Clusters
from antdiff.schedules import linear_schedule

pytestmark = pytest.mark.usefixtures("one_thread")


def all_params(model, ant):
    return [*model.parameters(), *(p for g in ant.param_groups() for p in g["params"])]


class Compiled(nn.Module):
    """Stands in for torch.compile's wrapper (the module it compiles as ``_orig_mod``) without
    importing dynamo."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self._orig_mod = module

    def forward(self, *args):
        return self._orig_mod(*args)


class BareParam(nn.Module):
    """A trainable tensor outside any Linear/Conv/norm layer: one-pass hooks cannot serve it."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 1)
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x, t):
        return self.lin(x).squeeze(1) * self.scale


# -- construction ---------------------------------------------------------------------------------
def test_clusters_of_another_T_than_the_schedule_are_refused():
    clusters = Clusters((0, 10, 25, 50))  # T = 50
    with pytest.raises(ValueError, match=r"the clusters given cover T=50, the schedule has T=100"):
        ANT(linear_schedule(T), clustering=clusters, method="uw")


def test_an_unknown_mode_is_refused_at_construction():
    with pytest.raises(ValueError, match=r"mode must be one of .*'retain_graph'.*got 'fast'"):
        ANT(linear_schedule(T), k=4, method="pcgrad", mode="fast")


@pytest.mark.parametrize("seed", [0, 2**63, 2**64 - 1, np.uint64(2**64 - 1)])
def test_every_seed_in_the_64_bit_range_is_accepted(seed):
    a = ANT(linear_schedule(T), k=4, method="uw", seed=seed)
    b = ANT(linear_schedule(T), k=4, method="uw", seed=int(seed))
    draws = []
    for ant in (a, b):
        torch.manual_seed(1)  # the draw within each cluster follows torch's seed
        draws.append(ant.sample_timesteps(16))
    assert torch.equal(*draws)


@pytest.mark.parametrize("seed", [-1, 2**64, True, 1.0, "0"])
def test_a_seed_outside_the_64_bit_range_or_not_an_integer_is_refused(seed):
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*64\)"):
        ANT(linear_schedule(T), k=4, method="uw", seed=seed)


@pytest.mark.parametrize("sampling", ["proportional", "uniform"])
def test_the_cluster_counts_come_from_a_stream_seeded_by_seed(sampling):
    """The per-cluster counts are those of a sampler seeded with the engine's ``seed``, so
    every rank (same seed) gets the same allocation."""
    from antdiff.engine.timesteps import TimestepSampler

    ant = ANT(linear_schedule(T), k=4, method="uw", seed=7, sampling=sampling)
    ref = TimestepSampler(ant.clusters, sampling, 7)
    for B in (9, 13, 16):
        torch.manual_seed(B)
        t = ant.sample_timesteps(B)
        torch.manual_seed(B)
        t_ref, counts = ref.sample(B)
        assert torch.equal(t, t_ref)
        np.testing.assert_array_equal(ant.sampler.counts_for(t), counts)


# -- attach ---------------------------------------------------------------------------------------
def test_the_batchnorm_message_lists_three_layers_whole_and_shortens_more():
    three = nn.Sequential(*(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)) for _ in range(3)))
    with pytest.raises(ValueError) as info:
        ANT(linear_schedule(T), k=4, method="pcgrad", model=three)
    assert "('0.1', '1.1', '2.1'), which" in str(info.value)
    four = nn.Sequential(*(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)) for _ in range(4)))
    with pytest.raises(ValueError) as info:
        ANT(linear_schedule(T), k=4, method="pcgrad", model=four)
    assert "('0.1', '1.1', '2.1', ...), which" in str(info.value)


def test_a_loss_method_trains_a_model_with_batchnorm():
    """A loss-space method takes one backward of the whole batch: BatchNorm's coupling of the
    samples is no reason to refuse it (in any mode)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    for mode in ("auto", "micro", "onepass"):
        ant = ANT(linear_schedule(T), k=4, method="uw", mode=mode, model=model)
        x = torch.randn(8, 3)
        t = ant.sample_timesteps(8)
        ant.reduce(model(x).squeeze(1) ** 2, t).backward()
        assert model[1].weight.grad is not None


def test_a_compiled_model_with_a_loss_method_attaches_in_any_mode():
    """The one-pass hooks serve gradient methods only: a loss-space method with a compiled
    model is not refused for mode='onepass'."""
    model = TinyNet()
    compiled = Compiled(model)
    ant = ANT(linear_schedule(T), k=4, method="uw", mode="onepass", model=compiled)
    assert ant._onepass is None
    with pytest.raises(Exception, match="mode='onepass' with a torch.compile'd model"):
        ANT(linear_schedule(T), k=4, method="pcgrad", mode="onepass", model=compiled)


def test_mode_onepass_names_a_model_it_cannot_serve_at_attach():
    from antdiff.engine.onepass import NotServable

    with pytest.raises(NotServable):
        ANT(linear_schedule(T), k=4, method="pcgrad", mode="onepass", model=BareParam())
    ant = ANT(linear_schedule(T), k=4, method="pcgrad", mode="auto", model=BareParam())
    assert ant._onepass is None  # auto: micro


def test_a_plain_model_is_accepted_under_a_group_of_one_rank(one_rank_group):
    """Without other ranks there is nothing to drift apart: no DDP wrapper needed."""
    model = TinyNet()
    ant = ANT(linear_schedule(T), k=4, method="uw", model=model)
    assert ant.comm.active and ant.comm.world == 1
    x = torch.randn(8, 1, 6, 6)
    t = ant.sample_timesteps(8)
    ant.reduce(per_sample_loss(model)(x, t), t).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_an_engine_without_a_model_turns_the_reduction_on_at_its_first_step(tmp_path):
    """Built before init_process_group and never attached (ant.reduce of a loss the caller
    backpropagates): the reduction turns on at the first step without a model to check."""
    import torch.distributed as dist

    ant = ANT(linear_schedule(T), k=4, method="uw")
    assert not ant.comm.active
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0,
                            world_size=1)  # fmt: skip
    try:
        t = ant.sample_timesteps(8)
        loss = ant.reduce(torch.rand(8, requires_grad=True), t)
        assert ant.comm.active and torch.isfinite(loss)
    finally:
        dist.destroy_process_group()


# -- timestep sampling ----------------------------------------------------------------------------
@pytest.mark.parametrize("sampling", ["proportional", "uniform"])
@pytest.mark.parametrize("B", [0, -3, True, 4.0])
def test_sample_timesteps_names_a_batch_size_that_is_not_a_positive_integer(sampling, B):
    ant = ANT(linear_schedule(T), k=4, method="uw", sampling=sampling)
    with pytest.raises(ValueError, match=rf"B must be a positive integer batch size, got {B!r}"):
        ant.sample_timesteps(B)


def test_a_batch_of_k_samples_is_enough_and_uniform_sampling_takes_fewer():
    ant = ANT(linear_schedule(T), k=4, method="uw")
    t = ant.sample_timesteps(4)
    np.testing.assert_array_equal(ant.sampler.counts_for(t), [1, 1, 1, 1])
    uniform = ANT(linear_schedule(T), k=4, method="uw", sampling="uniform")
    assert uniform.sample_timesteps(2).shape == (2,)


def test_a_single_process_run_saves_no_per_rank_draws():
    """Only under torch.distributed does a step on this rank's own draw switch the sampler to
    per-rank draws; a single-process checkpoint resumed under several ranks then still draws
    one global batch for ant.shard."""
    model, ant = setup("uw")
    x = torch.randn(8, 1, 6, 6)
    for _ in range(2):
        t = ant.sample_timesteps(8)
        ant.reduce(per_sample_loss(model)(x, t), t).backward()
    assert ant.state_dict()["sampler"]["per_rank"] is False


def test_under_a_group_a_step_on_an_unsharded_draw_switches_to_per_rank_draws(one_rank_group):
    model, ant = setup("uw")
    x = torch.randn(8, 1, 6, 6)
    t = ant.sample_timesteps(8)
    ant.reduce(per_sample_loss(model)(x, t), t).backward()
    assert ant.state_dict()["sampler"]["per_rank"] is True


@pytest.mark.parametrize("bad", [-1, T])
def test_timesteps_outside_the_schedule_are_refused_with_an_example(bad):
    ant = ANT(linear_schedule(T), k=4, method="uw")
    t = torch.tensor([0, 5, bad, 99])
    with pytest.raises(ValueError, match=rf"\[0, T=100\), got e.g. \[{bad}\]"):
        ant.reduce(torch.rand(4, requires_grad=True), t)
    model, gm = setup("pcgrad")
    with pytest.raises(ValueError, match=rf"\[0, T=100\), got e.g. \[{bad}\]"):
        gm.backward(per_sample_loss(model), torch.randn(4, 1, 6, 6), t)


# -- cluster losses -------------------------------------------------------------------------------
def _one_cluster_step(method):
    model, ant = setup(method)
    x = torch.randn(4, 1, 6, 6)
    t = torch.tensor([1, 2, 3, 4])  # all in the first cluster
    if ant.needs_gradients:
        ant.backward(per_sample_loss(model), x, t)
    else:
        ant.reduce(per_sample_loss(model)(x, t), t).backward()
    assert ant.last.present.tolist() == [True, False, False, False]
    assert ant.last.cluster_losses[1:].tolist() == [0.0, 0.0, 0.0]
    assert bool(ant.last.finite)


@pytest.mark.parametrize("method", ["vanilla", "uw", "dwa", "pcgrad"])
def test_an_empty_cluster_is_absent_with_a_zero_loss(method):
    _one_cluster_step(method)


@pytest.mark.parametrize("method", ["vanilla", "uw", "dwa"])
def test_under_a_group_an_empty_cluster_is_absent(one_rank_group, method):
    _one_cluster_step(method)


@pytest.mark.parametrize("method", ["vanilla", "dwa", "pcgrad"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_cluster_losses_of_per_sample_losses_in_another_dtype_are_float32(method, dtype):
    """Per-sample losses in bf16 (autocast) or float64 are summed per cluster in float32."""
    torch.manual_seed(0)
    lin = nn.Linear(3, 1).to(dtype)
    ant = ANT(linear_schedule(T), k=4, method=method, model=lin)
    x = torch.randn(8, 3, dtype=dtype)
    t = ant.sample_timesteps(8)

    def loss_fn(xb, tb):
        return lin(xb).squeeze(1) ** 2

    if ant.needs_gradients:
        out = ant.backward(loss_fn, x, t)
    else:
        ant.reduce(loss_fn(x, t), t).backward()
        out = ant.last
    per = (lin(x).squeeze(1) ** 2).detach().float()
    cid = ant.clusters.cluster_of(t)
    ref = torch.zeros(4).index_add(0, cid, per) / torch.bincount(cid, minlength=4)
    assert out.cluster_losses.dtype == torch.float32
    torch.testing.assert_close(out.cluster_losses, ref)


# -- reduce ---------------------------------------------------------------------------------------
def test_reduces_waiting_for_a_step_are_observed_in_batches_of_256():
    """Without ant.step after the first, the observations waiting for its verdict are not kept
    without bound: the 257th reduce observes the 256 before it."""
    ant = ANT(linear_schedule(T), k=4, method="dwa")
    seen = []
    observe = ant.method.loss.observe
    ant.method.loss.observe = lambda L, present: (seen.append(1), observe(L, present))[1]
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    t = ant.sample_timesteps(8)
    ant.reduce(torch.rand(8), t)
    ant.step(opt, check_grads=False)
    assert len(seen) == 1
    for _ in range(256):
        ant.reduce(torch.rand(8), t)
    assert len(seen) == 1  # waiting for a verdict
    ant.reduce(torch.rand(8), t)
    assert len(seen) == 257


def test_a_reduce_after_a_scaled_backward_steps_without_the_scaler():
    """The scaler of an earlier ant.backward does not bind a later ant.reduce's step (its loss
    the caller scales, or not, itself)."""
    model, ant = setup("uw")
    opt = torch.optim.SGD(all_params(model, ant), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    x = torch.randn(8, 1, 6, 6)
    t = ant.sample_timesteps(8)
    ant.backward(per_sample_loss(model), x, t, scaler=scaler)
    assert ant.step(opt, scaler) is True
    opt.zero_grad(set_to_none=True)
    t = ant.sample_timesteps(8)
    ant.reduce(per_sample_loss(model)(x, t), t).backward()
    assert ant.step(opt) is True


@pytest.mark.parametrize("method", ["vanilla", "dwa"])
def test_a_loop_of_its_own_steps_a_method_without_parameters_quietly(method):
    """A loop that calls optimizer.step() and zero_grad() itself (no ant.step): a method with
    no parameters of its own has nothing to warn of, however often the model's gradient is
    cleared."""
    model, ant = setup(method)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(8, 1, 6, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            t = ant.sample_timesteps(8)
            ant.reduce(per_sample_loss(model)(x, t), t).backward()
            opt.step()


def test_a_validation_reduce_does_not_warn_of_uw_parameters_outside_the_optimizer():
    """The warning about UW's log-variances outside the optimiser comes from a training
    reduce (the one after the model's gradient was cleared), never from a validation one."""
    model, ant = setup("uw")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)  # without ant.param_groups()
    x = torch.randn(8, 1, 6, 6)
    t = ant.sample_timesteps(8)
    ant.reduce(per_sample_loss(model)(x, t), t).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("error")
        ant.reduce(per_sample_loss(model)(x, t), t)
    with pytest.warns(UserWarning, match="its own parameters"):
        ant.reduce(per_sample_loss(model)(x, t), t)


def test_freezing_the_output_layer_in_a_loop_of_its_own_does_not_warn():
    """A loop with its own optimizer.step() over the model and ant.param_groups(), zeroing the
    gradients to zero tensors: freezing the last layer (gradient None from then on) is no sign
    that UW's log-variances are left out of the optimiser."""
    model, ant = setup("uw")
    opt = torch.optim.SGD(all_params(model, ant), lr=0.01)
    x = torch.randn(8, 1, 6, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step in range(3):
            if step == 1:
                for p in model.out.parameters():
                    p.requires_grad_(False)
                    p.grad = None
            opt.zero_grad(set_to_none=False)
            t = ant.sample_timesteps(8)
            ant.reduce(per_sample_loss(model)(x, t), t).backward()
            opt.step()


# -- backward -------------------------------------------------------------------------------------
def test_backward_with_the_attached_model_passed_again_keeps_the_window():
    """model= naming the model already attached is no re-attach: an accumulation window stays
    open across such calls."""
    model, ant = setup("pcgrad")
    x = torch.randn(8, 1, 6, 6)
    ant.backward(per_sample_loss(model), x, ant.sample_timesteps(8), model=model, accumulate=True)
    out = ant.backward(per_sample_loss(model), x, ant.sample_timesteps(8), model=model)
    assert bool(out.finite) and ant.step_count == 1


def test_a_window_with_one_non_finite_micro_batch_skips_its_step():
    """FAMO's log(L - min_loss) of a micro-batch whose losses lie below min_loss is NaN while
    its losses and gradients are finite: the window's step is not finite, whatever the later
    micro-batches (and the window's mean losses) are."""
    model, ant = setup("famo")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 1, 6, 6)
    loss = per_sample_loss(model)
    first = ant.backward(lambda xb, tb: loss(xb, tb) - 10.0, x, ant.sample_timesteps(8),
                         accumulate=True)  # fmt: skip
    assert not bool(first.finite)
    out = ant.backward(lambda xb, tb: loss(xb, tb) + 20.0, x, ant.sample_timesteps(8))
    assert bool(torch.isfinite(out.cluster_losses).all())  # the window's means are finite
    assert not bool(out.finite)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.warns(UserWarning, match="optimiser step was skipped"):
        assert ant.step(opt) is False
    for a, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(a.detach(), b)


def test_a_state_without_weights_resumed_mid_cycle_recomputes_them_at_once():
    """update_every=3: a state without gradient-method weights (none kept yet) resumed at a
    step between two scheduled recomputes solves on its next step instead of taking off-steps
    with no weights until the cycle comes round."""
    model, ant = setup("nash", update_every=3)
    x = torch.randn(8, 1, 6, 6)
    ant.backward(per_sample_loss(model), x, ant.sample_timesteps(8))
    state = ant.state_dict()
    assert state["step"] == 1
    state["w"], state["w_present"] = None, None
    m2, fresh = setup("nash", update_every=3)
    m2.load_state_dict(model.state_dict())
    fresh.load_state_dict(state)
    t = fresh.sample_timesteps(8)
    out = fresh.backward(per_sample_loss(m2), x, t)
    m3, first = setup("nash", update_every=3)
    m3.load_state_dict(model.state_dict())
    torch.testing.assert_close(out.weights, first.backward(per_sample_loss(m3), x, t).weights)
    assert fresh.state_dict()["w"] is not None


def test_backward_without_ever_calling_ant_step_does_not_warn():
    """A loop that steps the optimiser itself never calls ant.step: its backward calls replace
    each other's update as intended, without the warning for a skipped ant.step."""
    model, ant = setup("pcgrad")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 1, 6, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            ant.backward(per_sample_loss(model), x, ant.sample_timesteps(8))
            opt.step()


@pytest.mark.parametrize("method", ["pcgrad", "uw+pcgrad", "uw"])
def test_a_layer_frozen_mid_run_stops_moving_without_zero_grad(method):
    """ant.backward overwrites .grad (a loop needs no zero_grad): a layer frozen between two
    steps (requires_grad_(False)) gets no gradient from then on and the optimiser leaves it,
    under gradient methods as under a loss-space one."""
    model, ant = setup(method)
    opt = torch.optim.SGD(all_params(model, ant), lr=0.1)
    x = torch.randn(8, 1, 6, 6)
    ant.backward(per_sample_loss(model), x, ant.sample_timesteps(8))
    ant.step(opt)
    model.out.requires_grad_(False)
    frozen = model.out.weight.detach().clone()
    ant.backward(per_sample_loss(model), x, ant.sample_timesteps(8))
    ant.step(opt)
    assert model.out.weight.grad is None
    assert torch.equal(model.out.weight.detach(), frozen)


def test_a_rank_slice_may_carry_lists_of_per_sample_values(one_rank_group):
    """Under torch.distributed a rank's slice is not checked for lists of per-sample numbers
    (its length differs between ranks, and every rank must decide alike)."""
    model, ant = setup("pcgrad", mode="micro")
    x = torch.randn(8, 1, 6, 6)
    t = ant.sample_timesteps(8)
    out = ant.backward(lambda b, tb: per_sample_loss(model)(b[0], tb), (x, [0.5] * 8), t)
    assert bool(out.finite)


# -- shard ----------------------------------------------------------------------------------------
def test_shard_checks_the_batch_against_t_in_a_single_process():
    _, ant = setup("pcgrad")
    x = torch.randn(8, 1, 6, 6)
    t = ant.sample_timesteps(8)
    assert ant.shard(x, t)[0] is x
    with pytest.raises(ValueError, match="leading dimension B=8"):
        ant.shard(x[:4], t)


def test_shard_after_per_rank_draws_warns_once_and_draws_globally_again(one_rank_group):
    model, ant = setup("uw")
    x = torch.randn(8, 1, 6, 6)
    t = ant.sample_timesteps(8)
    ant.reduce(per_sample_loss(model)(x, t), t).backward()  # this rank's own draw
    with pytest.warns(UserWarning, match="ant.shard after steps on timesteps that each rank"):
        ant.shard(x, ant.sample_timesteps(8))
    assert ant.state_dict()["sampler"]["per_rank"] is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        xs, ts = ant.shard(x, ant.sample_timesteps(8))
        ant.reduce(per_sample_loss(model)(xs, ts), ts)


# -- ant.step: optimisers that skip on the device, and the flags that report it -------------------
def test_an_optimizer_with_one_unfused_group_skips_on_the_host():
    """Only an optimiser fused in every group takes the non-finite flag as found_inf: a group
    added with fused=False would apply the NaN update, so the step is skipped on the host."""
    model, ant = setup("uw")
    own = [p for g in ant.param_groups() for p in g["params"]]
    opt = torch.optim.AdamW(
        [{"params": list(model.parameters())}, {"params": own, "fused": False}],
        lr=0.1, fused=True,
    )  # fmt: skip
    before = [p.detach().clone() for p in all_params(model, ant)]
    x = torch.randn(8, 1, 6, 6)
    t = ant.sample_timesteps(8)
    opt.zero_grad(set_to_none=True)
    ant.reduce(per_sample_loss(model)(x, t) * float("nan"), t).backward()
    with pytest.warns(UserWarning, match="optimiser step was skipped"):
        assert ant.step(opt) is False
    for a, b in zip(all_params(model, ant), before, strict=True):
        assert torch.equal(a.detach(), b)


def test_a_device_skip_on_the_cpu_is_reported_at_the_next_step():
    """On the CPU the flag of a device-side skip is on the host at once: the next ant.step
    reports it (without waiting for stats())."""
    model, ant = setup("uw")
    opt = torch.optim.AdamW(all_params(model, ant), lr=0.1, fused=True)
    x = torch.randn(8, 1, 6, 6)

    def run(scale):
        opt.zero_grad(set_to_none=True)
        t = ant.sample_timesteps(8)
        ant.reduce(per_sample_loss(model)(x, t) * scale, t).backward()
        return ant.step(opt)

    assert run(1.0) is True
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert run(float("nan")) is True  # skipped on the device, reported later
    with pytest.warns(UserWarning, match=r"step 2: .*skipped the step on the device"):
        assert run(1.0) is True


def test_an_optimizer_whose_parameters_got_no_gradient_steps_quietly():
    """One of several optimisers may hold a part of the model the loss did not reach this step
    (none of its parameters has a gradient): the gradient check has nothing to look at."""
    torch.manual_seed(0)
    used, unused = nn.Linear(3, 1), nn.Linear(3, 1)
    model = nn.ModuleDict({"used": used, "unused": unused})
    ant = ANT(linear_schedule(T), k=4, method="vanilla", model=model)
    opt = torch.optim.SGD(unused.parameters(), lr=0.1)
    x = torch.randn(8, 3)
    t = ant.sample_timesteps(8)
    ant.reduce(used(x).squeeze(1) ** 2, t).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ant.step(opt) is True
    assert all(p.grad is None for p in unused.parameters())


def test_skipped_step_warnings_thin_out_after_the_tenth():
    """A diverging run skipped every step and printed a warning for each (100 lines before the
    trainer stopped it): now the first 10, then the 16th, 32nd, ...; each names its step, and
    stats() still counts every skip."""
    model, ant = setup("uw")
    opt = torch.optim.SGD([{"params": list(model.parameters())}, *ant.param_groups()], lr=0.1)
    x = torch.randn(8, 1, 6, 6)
    loss = per_sample_loss(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(33):
            opt.zero_grad(set_to_none=True)
            t = ant.sample_timesteps(8)
            ant.reduce(loss(x, t) * float("nan"), t).backward()
            assert ant.step(opt) is False
    said = [str(w.message) for w in caught if "optimiser step was skipped" in str(w.message)]
    assert len(said) == 12  # 1..10, 16, 32
    assert said[0].startswith("step 1:") and "stats()['nonfinite_steps']" in said[-1]
    assert "skipped step 32 of this process" in said[-1]
    assert all(w.filename == __file__ for w in caught)  # the caller's line
    assert ant.stats()["nonfinite_steps"] == 33

"""Engine tests: exact per-cluster gradients, every method's update, sampling, state, bad input."""

from __future__ import annotations

import bisect
import copy
import itertools
import math
import subprocess
import sys
import warnings
from fractions import Fraction

import numpy as np
import pytest
import torch
from torch import nn

from antdiff import ANT
from antdiff.clustering import Clusters
from antdiff.engine.timesteps import (
    _DRAW_HIGH,
    TimestepSampler,
    _Allocations,
    _place_on,
    _placement,
    _systematic,
    allocate,
)
from antdiff.mtl import make_method
from antdiff.schedules import linear_schedule

T = 100


class TinyNet(nn.Module):
    """Per-sample independent (GroupNorm) conv net conditioned on t."""

    def __init__(self, ch: int = 8) -> None:
        super().__init__()
        self.inp = nn.Conv2d(1, ch, 3, padding=1)
        self.emb = nn.Embedding(T, ch)
        self.norm = nn.GroupNorm(2, ch)
        self.out = nn.Conv2d(ch, 1, 3, padding=1)

    def forward(self, x, t):
        h = self.inp(x) + self.emb(t)[:, :, None, None]
        return self.out(torch.nn.functional.silu(self.norm(h)))


def per_sample_loss(model):
    def fn(x, t):
        target = torch.sin(x * (1 + t[:, None, None, None] / T))
        return ((model(x, t) - target) ** 2).mean(dim=(1, 2, 3))

    return fn


def flat_grad(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def explicit_J(model, x, t, clusters, k):
    """[k, P] float64: gradient of each cluster's mean loss, one autograd.grad per cluster."""
    params = list(model.parameters())
    per = per_sample_loss(model)(x, t)
    cid = clusters.cluster_of(t)
    rows = []
    for i in range(k):
        m = cid == i
        if not bool(m.any()):
            rows.append(torch.zeros(sum(p.numel() for p in params), dtype=torch.float64))
            continue
        g = torch.autograd.grad(per[m].mean(), params, retain_graph=True)
        rows.append(torch.cat([x.reshape(-1) for x in g]).double())
    return torch.stack(rows), per.detach()


def setup(method, k=4, seed=0, **kw):
    torch.manual_seed(seed)
    model = TinyNet()
    ant = ANT(linear_schedule(T), k=k, method=method, model=model, seed=seed, **kw)
    return model, ant


@pytest.mark.parametrize("mode", ["micro", "retain_graph"])
def test_J_matches_explicit_per_cluster_gradients(mode):
    model, ant = setup("pcgrad", mode=mode)
    x = torch.randn(13, 1, 6, 6)
    t = ant.sample_timesteps(13)
    J_ref, _ = explicit_J(model, x, t, ant.clusters, ant.k)
    buf = ant._grad_buffer()
    counts = ant.sampler.counts_for(t)
    sums, N = ant._fill_J(buf, per_sample_loss(model), x, t, counts, None)
    torch.testing.assert_close(buf.J.double(), J_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "method",
    ["pcgrad", "nash", "imtl", "mgda", "cagrad", "uw+pcgrad",
     pytest.param("uw+nash", marks=pytest.mark.interpret)],
)
def test_update_is_weights_times_explicit_J(method):
    model, ant = setup(method)
    x = torch.randn(16, 1, 6, 6)
    t = ant.sample_timesteps(16)
    J_ref, per = explicit_J(model, x, t, ant.clusters, ant.k)
    out = ant.backward(per_sample_loss(model), x, t)
    torch.testing.assert_close(flat_grad(model).double(), out.weights.double() @ J_ref,
                               rtol=1e-5, atol=1e-6)
    # the weights are the method's weights on the explicit Gram (same seed -> same PCGrad orders)
    fresh = make_method(method, ant.k, **({"seed": 0} if "pcgrad" in method else {}))
    cid = ant.clusters.cluster_of(t)
    present = torch.bincount(cid, minlength=ant.k) > 0
    L = torch.zeros(ant.k, dtype=torch.float64).index_add(0, cid, per.double())
    L = L / torch.bincount(cid, minlength=ant.k).clamp(min=1)
    c = torch.ones(ant.k, dtype=torch.float64)
    if fresh.loss is not None:  # UW at s = 0: dT_i/dL_i = 0.5 / k
        c = c * 0.5 / ant.k
    G = (J_ref @ J_ref.T) * (c[:, None] * c[None, :])
    w = fresh.weights(G, present).double() * c
    torch.testing.assert_close(out.weights.double(), w, rtol=1e-4, atol=1e-7)


def test_uw_reduce_matches_closed_form():
    model, ant = setup("uw")
    s = ant.method.loss.s if hasattr(ant.method.loss, "s") else next(ant.method.loss.parameters())
    with torch.no_grad():
        s.copy_(torch.tensor([0.3, -0.2, 0.1, 0.0]))
    x = torch.randn(16, 1, 6, 6)
    t = ant.sample_timesteps(16)
    J_ref, per = explicit_J(model, x, t, ant.clusters, ant.k)
    cid = ant.clusters.cluster_of(t)
    L = torch.zeros(4, dtype=torch.float64).index_add(0, cid, per.double()) / torch.bincount(cid)
    loss = ant.reduce(per_sample_loss(model)(x, t), t)
    loss.backward()
    s64 = s.detach().double()
    expect_total = (0.5 * (torch.exp(-s64) * L / 4 + s64)).sum()
    assert float(loss.detach()) == pytest.approx(float(expect_total), rel=1e-5)
    torch.testing.assert_close(flat_grad(model).double(), (0.5 * torch.exp(-s64) / 4) @ J_ref,
                               rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(s.grad.double(), 0.5 * (1 - torch.exp(-s64) * L / 4),
                               rtol=1e-5, atol=1e-7)


def test_uw_backward_equals_reduce():
    grads = []
    for use_backward in (False, True):
        model, ant = setup("uw")
        x = torch.randn(16, 1, 6, 6, generator=torch.Generator().manual_seed(1))
        t = ant.sample_timesteps(16)
        if use_backward:
            ant.backward(per_sample_loss(model), x, t)
        else:
            ant.reduce(per_sample_loss(model)(x, t), t).backward()
        s = next(ant.method.loss.parameters())
        grads.append((flat_grad(model), s.grad.clone()))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-5, atol=1e-7)


def test_nash_off_steps_reuse_weights_with_one_backward():
    model, ant = setup("nash", update_every=3)
    lf = per_sample_loss(model)
    x = torch.randn(16, 1, 6, 6)
    t = ant.sample_timesteps(16)
    first = ant.backward(lf, x, t)
    calls = {"n": 0}

    def counting(xb, tb):
        calls["n"] += 1
        return lf(xb, tb)

    for p in model.parameters():
        p.grad = None
    t2 = ant.sample_timesteps(16)
    J_ref, _ = explicit_J(model, x, t2, ant.clusters, ant.k)
    second = ant.backward(counting, x, t2)
    assert calls["n"] == 1  # one forward over the whole batch
    torch.testing.assert_close(second.weights, first.weights)
    torch.testing.assert_close(flat_grad(model).double(), second.weights.double() @ J_ref,
                               rtol=1e-5, atol=1e-7)


def test_timesteps_sorted_inside_clusters_and_counts_known():
    ant = ANT(linear_schedule(1000), k=5, method="vanilla")
    for B in (5, 7, 64, 241):
        t = ant.sample_timesteps(B)
        counts = ant.sampler.counts_for(t)
        assert counts.sum() == B
        cid = ant.clusters.cluster_of(t)
        assert torch.all(cid[1:] >= cid[:-1])
        assert torch.bincount(cid, minlength=5).tolist() == counts.tolist()


def test_placement_stays_inside_each_interval():
    """r -> t = lo + r mod size: r = 0 gives the first timestep, r = 2^62 - 1 stays inside,
    one-timestep intervals always give their one timestep, every timestep of an interval is
    reached."""
    lo = np.array([0, 1, 7, 300, 999], dtype=np.int64).repeat(400)
    size = np.array([1, 6, 293, 699, 1], dtype=np.int64).repeat(400)
    g = torch.Generator().manual_seed(0)
    r = torch.randint(0, _DRAW_HIGH, (lo.size,), generator=g)
    r[::7] = _DRAW_HIGH - 1
    r[1::7] = 0
    t = _place_on(r, _placement(lo, size, device=r.device))
    assert t.dtype == torch.int64
    assert t.tolist() == (lo + np.mod(r.numpy(), size)).tolist()
    assert np.all((t.numpy() >= lo) & (t.numpy() < lo + size))
    assert t[1::7].tolist() == lo[1::7].tolist()
    assert t[:400].eq(0).all() and t[-400:].eq(999).all()
    assert len(set(t[400:800].tolist())) == 6  # all of 1..6 in 400 draws


@pytest.mark.parametrize("mode", ["proportional", "equal"])
def test_allocation_table_equals_systematic_sampling(mode):
    """The per-batch-size table gives, for every start u, the counts the systematic-sampling
    allocation gives at u (random cluster sizes and batch sizes, u near the breakpoints; not
    within the rounding of u + j, about 1e-15, of a piece's end)."""
    r = np.random.default_rng(1)
    for _ in range(300):
        k = int(r.integers(1, 12))
        sizes = r.integers(1, 300, k)
        B = int(r.integers(1, 200))  # noqa: N806
        table = _Allocations(B, sizes, mode)
        assert len(table.counts) == len(table.breaks) + 1 <= k + 1
        probes = [*r.random(20), *(b + d for b in table.breaks for d in (-1e-9, 1e-9))]
        for u in (u for u in probes if 1e-12 < u < 1 - 1e-12):  # off u + j's rounding
            got = table.counts[bisect.bisect_right(table.breaks, u)]
            assert got.tolist() == _systematic(B, sizes, mode, u)
            assert got.sum() == B


@pytest.mark.parametrize("mode", ["proportional", "equal"])
def test_sampler_counts_equal_one_allocate_per_step(mode, monkeypatch):
    """Whatever the batch sizes (whole quotas that need no draw, more sizes than the tables
    kept), the count vectors follow the sequence ``allocate`` gives with the same seed."""
    import antdiff.engine.timesteps as ts

    monkeypatch.setattr(ts, "_MAX_PLACEMENTS", 3)
    clusters = Clusters((0, 10, 40, 50, 60, 100))
    sampler, ref = TimestepSampler(clusters, mode=mode, seed=2), np.random.default_rng(2)
    sizes = [10, 7, 20, 13, 10, 33, 7, 40, 11] * 12
    got = [sampler.sample(B)[1].tolist() for B in sizes]
    want = [allocate(B, clusters.sizes, mode, ref).tolist() for B in sizes]
    assert got == want
    assert len(sampler._allocations) == 3
    state = sampler.state_dict()
    with pytest.raises(ValueError, match="'used'"):
        sampler.load_state_dict({**state, "used": -1})
    assert sampler.state_dict() == state  # a refused state changes nothing


def test_allocation_table_draw_follows_the_sampler_rng():
    """Two samplers with the same seed draw the same count vectors, also through a state_dict
    round trip; the counts handed out are the caller's to keep."""
    clusters = Clusters((0, 10, 40, 50, 100))
    a, b = TimestepSampler(clusters, seed=5), TimestepSampler(clusters, seed=5)
    seq = [a.sample(7)[1].tolist() for _ in range(150)]
    assert seq == [b.sample(7)[1].tolist() for _ in range(150)]
    assert len({tuple(c) for c in seq}) > 1  # the remainders move between clusters
    # the same sequence as one host draw per step (the uniforms come in batches of 64)
    ref = np.random.default_rng(5)
    assert seq == [allocate(7, clusters.sizes, "proportional", ref).tolist()
                   for _ in range(150)]  # fmt: skip
    for n in (0, 3, 64 - 150 % 64 - 1, 64 - 150 % 64):  # resume inside a batch and at its end
        for _ in range(n):
            a.sample(7)
        state = a.state_dict()
        nxt = [a.sample(7)[1].tolist() for _ in range(70)]
        c = TimestepSampler(clusters, seed=99)
        c.load_state_dict(state)
        assert nxt == [c.sample(7)[1].tolist() for _ in range(70)]
    with pytest.raises(ValueError, match="'used' must be an int in"):
        c.load_state_dict({**state, "used": 64})
    legacy = {"mode": "proportional", "rng": np.random.default_rng(8).bit_generator.state}
    c.load_state_dict(legacy)  # a checkpoint from before the batched draws
    want = allocate(7, clusters.sizes, "proportional", np.random.default_rng(8))
    assert c.sample(7)[1].tolist() == want.tolist()
    counts = a.sample(7)[1]
    counts[0] += 100  # does not reach the table
    assert all(c.sum() == 7 for c in a._allocations[7].counts)


@pytest.mark.parametrize("mode", ["uniform", "proportional"])
def test_per_rank_draws_resume_and_tile_the_global_allocation(mode):
    """Ranks drawing their own batches (TimestepSampler.per_rank, set by the engine under
    several processes): the flag survives a state_dict round trip (a resume drew like the
    first step again) and is off for a state saved before it; with rank offsets the ranks'
    "proportional" counts add up to the systematic allocation of the global batch."""
    clusters = Clusters((0, 10, 40, 50, 100))
    a = TimestepSampler(clusters, mode=mode, seed=5)
    a.per_rank = True
    a.sample(7, rank=(1, 3))
    b = TimestepSampler(clusters, mode=mode, seed=1)
    b.load_state_dict(a.state_dict())
    assert b.per_rank
    for _ in range(20):
        assert np.array_equal(a.sample(7, rank=(1, 3))[1], b.sample(7, rank=(1, 3))[1])
    state = {k: v for k, v in a.state_dict().items() if k != "per_rank"}
    b.load_state_dict(state)
    assert not b.per_rank
    if mode == "proportional":
        quota = 21 * np.asarray(clusters.sizes) / 100
        for _ in range(50):
            saved = a.state_dict()
            total = 0
            for r in range(3):  # every rank from the same shared state
                a.load_state_dict(saved)
                total = total + a.sample(7, rank=(r, 3))[1]
            assert ((total == np.floor(quota)) | (total == np.ceil(quota))).all(), total


def test_sample_timesteps_follows_the_torch_seed():
    ant = ANT(linear_schedule(1000), k=5, method="vanilla")
    ant2 = ANT(linear_schedule(1000), k=5, method="vanilla")
    torch.manual_seed(3)
    a = ant.sample_timesteps(37)
    torch.manual_seed(3)
    b = ant2.sample_timesteps(37)
    g = torch.Generator().manual_seed(4)
    c = ant2.sample_timesteps(37, generator=g)
    assert torch.equal(a, b) and not torch.equal(b, c)


@pytest.mark.parametrize("mode", ["proportional", "uniform"])
def test_marginal_over_t_is_uniform(mode):
    clusters = Clusters((0, 10, 40, 50, 100))
    rng = np.random.default_rng(0)
    shares = clusters.sizes / 100
    B, n = 7, 20000
    total = np.zeros(4)
    for _ in range(n):
        total += allocate(B, clusters.sizes, mode, rng)
    np.testing.assert_allclose(total / (n * B), shares, atol=0.006)


def _allocate_exact(B, sizes, mode, rng):  # noqa: N803
    """The systematic-sampling allocation in exact fractions (reference)."""
    k, T = len(sizes), int(sum(sizes))  # noqa: N806
    quota = [Fraction(B, k)] * k if mode == "equal" else [Fraction(B * int(s), T) for s in sizes]
    counts = [math.floor(q) for q in quota]
    extra = B - sum(counts)
    if extra > 0:
        u = Fraction(rng.random())
        edges = list(itertools.accumulate(q - c for q, c in zip(quota, counts)))
        for j in range(extra):
            counts[min(bisect.bisect_right(edges, u + j), k - 1)] += 1
    return counts


def test_allocate_equals_exact_reference():
    r = np.random.default_rng(0)
    for trial in range(3000):
        k = int(r.integers(1, 40))
        sizes = r.integers(1, 300, k)
        B = int(r.integers(1, 600))  # noqa: N806
        mode = ("proportional", "equal")[trial % 2]
        got = allocate(B, sizes, mode, np.random.default_rng(trial))
        ref = _allocate_exact(B, sizes, mode, np.random.default_rng(trial))
        assert got.dtype == np.int64 and got.tolist() == ref and got.sum() == B


def test_allocate_floors_whole_quotas_exactly():
    """B |I_i| / T whole: its floor is the quota itself (1500 * (18 / 1000) rounds to
    26.999999999999996 in floating point); every count of a whole-quota allocation is exact,
    for any start, and no draw is made."""
    sizes = np.array([18, 36, 946])
    for B in (1500, 750 * 4):
        want = [B * s // 1000 for s in sizes]
        for u in (0.0, 0.5, 1 - 1e-12):
            assert _systematic(B, sizes, "proportional", u) == want
        assert _Allocations(B, sizes, "proportional").extra == 0
        rng = np.random.default_rng(0)
        assert allocate(B, sizes, "proportional", rng).tolist() == want
        assert rng.random() == np.random.default_rng(0).random()  # no draw was used


def test_equal_mode_is_stratified():
    rng = np.random.default_rng(0)
    counts = allocate(12, np.array([1, 2, 3, 4]), "equal", rng)
    assert counts.tolist() == [3, 3, 3, 3]
    c = allocate(7, np.array([1, 2, 3, 4]), "equal", rng)
    assert sorted(c.tolist()) == [1, 2, 2, 2]


def test_uniform_sampling_may_leave_clusters_empty_and_weights_zero():
    model, ant = setup("pcgrad", sampling="uniform")
    x = torch.randn(2, 1, 6, 6)
    t = ant.sample_timesteps(2)  # 2 samples, 4 clusters
    out = ant.backward(per_sample_loss(model), x, t)
    assert int(out.present.sum()) <= 2
    assert torch.all(out.weights[~out.present] == 0)
    assert torch.isfinite(flat_grad(model)).all()


def test_state_dict_round_trip_gives_identical_next_step():
    model, ant = setup("uw+pcgrad")
    opt = torch.optim.SGD(list(model.parameters()) + [next(ant.method.loss.parameters())], lr=0.1)
    x = torch.randn(16, 1, 6, 6)
    for _ in range(3):
        opt.zero_grad()
        ant.backward(per_sample_loss(model), x, ant.sample_timesteps(16))
        ant.step(opt)
    state = ant.state_dict()
    model_state = {k: v.clone() for k, v in model.state_dict().items()}
    uw_state = {k: v.clone() for k, v in ant.method.loss.state_dict().items()}
    rng = torch.get_rng_state()  # within-cluster draws use torch's RNG (the trainer saves it)
    ref = ant.backward(per_sample_loss(model), x, ant.sample_timesteps(16))
    model2, ant2 = setup("uw+pcgrad", seed=5)
    model2.load_state_dict(model_state)
    ant2.load_state_dict(state)
    ant2.method.loss.load_state_dict(uw_state)
    torch.set_rng_state(rng)
    out = ant2.backward(per_sample_loss(model2), x, ant2.sample_timesteps(16))
    torch.testing.assert_close(out.weights, ref.weights)
    torch.testing.assert_close(flat_grad(model2), flat_grad(model))


@pytest.mark.parametrize("bad", ["sampler_used", "sampler_rng", "method_state"])
def test_a_load_that_fails_half_way_leaves_the_engine_as_it_was(bad):
    """A malformed checkpoint is refused after the step count, weights and method states were
    assigned (the sampler comes last): the load is undone, not left half applied."""
    model, ant = setup("uw+pcgrad")
    x = torch.randn(16, 1, 6, 6)
    for _ in range(2):
        ant.backward(per_sample_loss(model), x, ant.sample_timesteps(16))
    before = ant.state_dict()
    other_model, other = setup("uw+pcgrad", seed=5)
    for _ in range(5):
        other.backward(per_sample_loss(other_model), x, other.sample_timesteps(16))
    state = other.state_dict()
    if bad == "sampler_used":
        state["sampler"]["used"] = 99
    elif bad == "sampler_rng":
        state["sampler"]["rng"] = {"bit_generator": "none"}
    else:
        state["grad_method"] = {"not": "a PCGrad state"}
    with pytest.raises((ValueError, KeyError, TypeError)):
        ant.load_state_dict(state)
    after = ant.state_dict()
    assert after["step"] == before["step"] == 2
    torch.testing.assert_close(after["w"], before["w"])
    torch.testing.assert_close(after["loss_method"], before["loss_method"])
    assert after["grad_method"].keys() == before["grad_method"].keys()
    assert after["sampler"]["rng"] == before["sampler"]["rng"]
    _, twin = setup("uw+pcgrad", seed=7)
    twin.load_state_dict(before)
    draws = []
    for engine in (ant, twin):  # the host counts come from the sampler's state
        torch.manual_seed(0)  # the within-cluster draws from torch's
        draws.append([engine.sample_timesteps(16).tolist() for _ in range(3)])
    assert draws[0] == draws[1]


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("how", ["reduce", "backward"])
def test_absent_clusters_keep_their_uw_state(fused, how):
    """A cluster without samples has weight 0 and a zero gradient for its s_i, but an Adam
    step moved s_i anyway (by its moments) and decayed the moments: ant.step now leaves both
    as they were for the absent clusters, and moves the present one."""
    method = "uw" if how == "reduce" else "uw+pcgrad"
    model, ant = setup(method, sampling="uniform")
    opt = torch.optim.AdamW([*model.parameters(), *ant.method.loss.parameters()], lr=0.05,
                            fused=fused)  # fmt: skip
    x = torch.randn(16, 1, 6, 6)

    def step(t):
        opt.zero_grad(set_to_none=True)
        if how == "reduce":
            ant.reduce(per_sample_loss(model)(x, t), t).backward()
        else:
            ant.backward(per_sample_loss(model), x, t)
        ant.step(opt)

    for _ in range(3):  # every cluster present: moments build up
        step(ant.sample_timesteps(16))
    s = ant.method.loss.s
    before = s.detach().clone()
    moments = {n: v.clone() for n, v in opt.state[s].items() if v.shape == s.shape}
    assert moments and all(v[1:].abs().min() > 0 for v in moments.values())
    step(torch.full((16,), 3))  # cluster 0 only
    assert not torch.equal(s[0], before[0])
    torch.testing.assert_close(s.detach()[1:], before[1:], rtol=0, atol=0)
    for n, v in moments.items():
        torch.testing.assert_close(opt.state[s][n][1:], v[1:], rtol=0, atol=0)
        assert not torch.equal(opt.state[s][n][0], v[0])


def _reduce_step(model, ant, opt, x):
    """One loss-space training step on x: zero_grad, draw t, reduce, backward, ant.step."""
    opt.zero_grad(set_to_none=True)
    t = ant.sample_timesteps(x.shape[0])
    ant.reduce(per_sample_loss(model)(x, t), t).backward()
    ant.step(opt)


def test_accumulated_micro_batches_keep_every_present_clusters_uw_update():
    """reduce on cluster 3's samples, reduce on cluster 0's, one step: presence comes from the
    last reduce, but s_3 has a gradient and keeps its update; s_1, s_2 stay as they were."""
    model, ant = setup("uw", sampling="uniform")
    opt = torch.optim.AdamW([*model.parameters(), *ant.method.loss.parameters()], lr=0.05)
    x = torch.randn(8, 1, 6, 6)
    for _ in range(2):
        _reduce_step(model, ant, opt, x)
    s = ant.method.loss.s
    before = s.detach().clone()
    opt.zero_grad(set_to_none=True)
    for t_one in (T - 1, 0):  # cluster 3, then cluster 0
        t = torch.full((8,), t_one)
        (0.5 * ant.reduce(per_sample_loss(model)(x, t), t)).backward()
    ant.step(opt)
    moved = s.detach() != before
    assert moved.tolist() == [True, False, False, True]


@pytest.mark.parametrize("first", [False, True])
def test_a_solve_without_a_solution_keeps_the_last_weights(first, monkeypatch):
    """NaN weights from the solver on a finite Gram (Nash-MTL's Newton steps ended without a
    solution) neither step the optimiser with NaN gradients nor void the step: the step uses
    the last weights (equal weights before any), as an off-step would, and keeps the method's
    state (its NaN alpha and weights were stored); stats() counts and reports it once."""
    from antdiff.mtl import native

    unsolved = lambda G, **kw: torch.full((G.shape[0],), float("nan"), dtype=G.dtype)  # noqa: E731
    if first:
        model, ant = setup("nash", update_every=1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        x = torch.randn(16, 1, 6, 6)
        w_before = ant._equal_weights(torch.ones(4, dtype=torch.bool))  # "mean": 1/4 each
        nash = ant.method.grad
        alpha = last = None
    else:
        model, ant, opt, x, w_before, _ = _after_one_step("nash", update_every=1)
        nash = ant.method.grad
        alpha, last = nash.last_alpha.clone(), nash.last_weights.clone()
    monkeypatch.setattr(native, "nash_weights", unsolved)
    t = ant.sample_timesteps(16)
    J_ref, _ = explicit_J(model, x, t, ant.clusters, ant.k)  # noqa: N806
    out = ant.backward(per_sample_loss(model), x, t)
    assert bool(out.finite)
    torch.testing.assert_close(out.weights, w_before, rtol=0, atol=0)
    torch.testing.assert_close(flat_grad(model).double(), w_before.double() @ J_ref,
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    if not first:
        torch.testing.assert_close(nash.last_alpha, alpha, rtol=0, atol=0)
        torch.testing.assert_close(nash.last_weights, last, rtol=0, atol=0)
        torch.testing.assert_close(ant._w, w_before, rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ant.step(opt) is True
    with pytest.warns(UserWarning, match=r"1 weight solve\(s\) .*ended without a solution "
                      r"\(nash\): those steps reused the last weights.*'iters': 80"):  # fmt: skip
        assert ant.stats()["unsolved_weight_steps"] == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ant.stats()  # reported once
    state = ant.state_dict()  # a resume does not report it again
    ant2 = setup("nash", update_every=1)[1]
    ant2.load_state_dict(state)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ant2.stats()["unsolved_weight_steps"] == 1


def test_a_first_unsolved_uw_nash_step_is_uw_s_own_update(monkeypatch):
    """Before any solve, the fallback after a loss method is one per term (its terms carry the
    1/k): the loss method's own update. With Nash-MTL's "mean" reduction in the composition it
    was divided by k once more."""
    from antdiff.mtl import native

    model, ant = setup("uw+nash")
    monkeypatch.setattr(native, "nash_weights",
                        lambda G, **kw: torch.full((G.shape[0],), float("nan"), dtype=G.dtype))
    x = torch.randn(16, 1, 6, 6)
    t = ant.sample_timesteps(16)
    out = ant.backward(per_sample_loss(model), x, t)
    slopes = 0.5 * torch.exp(-ant.method.loss.s.detach()) / ant.k  # d term_i / d L_i at s
    torch.testing.assert_close(out.weights, slopes * out.present)


@pytest.mark.parametrize("method", ["dwa", "famo", "uw", "vanilla"])
@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_a_validation_reduce_under_no_grad_records_nothing(method, mode):
    """The refusal of a graph-less loss invites ``with torch.no_grad(): ant.reduce(...)`` for a
    validation loss: it entered the telemetry, counted as a step and was averaged into DWA /
    FAMO's next observation (their weights then followed validation losses). It now gives the
    total alone; two runs, one with validation reduces between its steps, stay identical."""
    runs = []
    for validate in (False, True):
        model, ant = setup(method)
        opt = torch.optim.SGD([{"params": model.parameters()}, *ant.param_groups()], lr=0.05)
        x = torch.randn(16, 1, 6, 6)
        for _ in range(4):
            _reduce_step(model, ant, opt, x)
            if validate:
                tv = torch.randint(0, T, (16,), generator=torch.Generator().manual_seed(1))
                with mode():  # (inference_mode: DWA / FAMO's slopes failed, an autograd pass)
                    val = ant.reduce(per_sample_loss(model)(100 * x, tv), tv)
                assert val.dim() == 0 and bool(torch.isfinite(val))
        runs.append((model, ant))
    (m1, a1), (m2, a2) = runs
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))
    assert a1.stats() == a2.stats()
    s1, s2 = a1.state_dict(), a2.state_dict()
    assert str(s1["loss_method"]) == str(s2["loss_method"]) and s1["step"] == s2["step"]
    # and a step right after a validation reduce still needs a training reduce
    with torch.no_grad():
        a2.reduce(per_sample_loss(m2)(x, tv), tv)
    with pytest.raises(RuntimeError, match="reduce"):
        a2.step(torch.optim.SGD(m2.parameters(), lr=0.05))


@pytest.mark.parametrize("method", ["pcgrad", "nash", "uw+pcgrad"])
def test_a_gradient_methods_validation_reduce(method):
    """A gradient method's ``ant.reduce`` refused every call, also the validation loss under
    no_grad that a trainer takes for any method. It now gives its loss method's total (UW's
    for "uw+pcgrad") or the plain batch mean, records nothing (two runs, one validating
    between its steps, stay identical) and still refuses to train with grad enabled."""
    runs = []
    for validate in (False, True):
        model, ant = setup(method)
        opt = torch.optim.SGD([{"params": model.parameters()}, *ant.param_groups()], lr=0.05)
        x = torch.randn(16, 1, 6, 6)
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            ant.backward(per_sample_loss(model), x, ant.sample_timesteps(16))
            ant.step(opt)
            if validate:
                tv = torch.randint(0, T, (16,), generator=torch.Generator().manual_seed(1))
                with torch.no_grad():
                    per = per_sample_loss(model)(x, tv)
                    val = ant.reduce(per, tv)
                if ant.method.loss is None:
                    torch.testing.assert_close(val, per.mean())
                else:  # the same total as a UW engine holding the same s
                    uw = ANT(linear_schedule(T), k=ant.k, method="uw")
                    uw.method.loss.load_state_dict(ant.method.loss.state_dict())
                    with torch.no_grad():
                        torch.testing.assert_close(val, uw.reduce(per, tv))
        runs.append((model, ant))
    (m1, a1), (m2, a2) = runs
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))
    assert a1.stats() == a2.stats()
    tv = ant.sample_timesteps(16)
    with pytest.raises(ValueError, match=r"ant\.backward\(loss_fn, batch, t\) instead"):
        a2.reduce(per_sample_loss(m2)(x, tv), tv)


def _after_one_step(method: str, **kw):
    """A weight method's engine after one SGD step: model, ant, opt, x and copies of the
    weights and parameters then."""
    model, ant = setup(method, **kw)
    opt = torch.optim.SGD([{"params": model.parameters()}, *ant.param_groups()], lr=0.1)
    x = torch.randn(16, 1, 6, 6)
    ant.backward(per_sample_loss(model), x, ant.sample_timesteps(16))
    ant.step(opt)
    return model, ant, opt, x, ant._w.clone(), [p.detach().clone() for p in model.parameters()]


def test_nonfinite_step_is_skipped_with_warning_and_state_untouched():
    model, ant, opt, x, w_before, params_before = _after_one_step("uw+nash")

    def bad(xb, tb):
        return per_sample_loss(model)(xb, tb) * float("nan")

    ant.step_count = 0  # force an on-step
    ant.backward(bad, x, ant.sample_timesteps(16))
    assert not bool(ant.last.finite)
    with pytest.warns(UserWarning, match="non-finite"):
        assert ant.step(opt) is False
    torch.testing.assert_close(ant._w, w_before)
    for p, q in zip(model.parameters(), params_before):
        torch.testing.assert_close(p.detach(), q)


@pytest.mark.parametrize("method", ["uw", "uw+pcgrad"])
def test_fused_optimizer_skips_nonfinite_step_on_the_device(method):
    """A fused optimiser takes the non-finite flag as its found_inf: parameters, moments and
    step counts stay (AdamW's weight decay would move them on a zero-gradient step), ant.step
    reads nothing and warns at the next call that reads the flag; the next good step updates."""
    model, ant = setup(method)
    params = [*model.parameters(), *(p for g in ant.param_groups() for p in g["params"])]
    opt = torch.optim.AdamW(params, lr=0.1, weight_decay=0.5, fused=True)
    x = torch.randn(16, 1, 6, 6)

    def run(loss_fn):
        opt.zero_grad(set_to_none=True)
        t = ant.sample_timesteps(16)
        if ant.needs_gradients:
            ant.backward(loss_fn, x, t)
        else:
            ant.reduce(loss_fn(x, t), t).backward()
        return ant.step(opt)

    def snapshot():
        state = [v.clone() for p in params for v in opt.state[p].values()]
        return [p.detach().clone() for p in params] + state

    assert run(per_sample_loss(model)) is True
    before = snapshot()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the flag is reported later, not here
        assert run(lambda xb, tb: per_sample_loss(model)(xb, tb) * float("nan")) is True
    assert not bool(ant.last.finite)
    for a, b in zip(snapshot(), before, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.warns(UserWarning, match="skipped the step on the device"):
        ant.stats()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reported once
        assert run(per_sample_loss(model)) is True
    assert not torch.equal(params[0].detach(), before[0])


@pytest.mark.parametrize("method", ["uw", "pcgrad"])
def test_a_disabled_grad_scaler_keeps_the_skip_on_the_device(method):
    """GradScaler(enabled=False), the usual fp16 switch turned off, counts as no scaler
    everywhere else; ant.step tested `scaler is None`, so with a fused optimiser it read the
    finite flag on the host every step (a GPU sync) instead of passing it as found_inf."""
    model, ant = setup(method)
    params = [*model.parameters(), *(p for g in ant.param_groups() for p in g["params"])]
    opt = torch.optim.AdamW(params, lr=0.1, fused=True)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    seen, step = [], opt.step

    def spy(*a, **kw):
        seen.append(getattr(opt, "found_inf", None))
        return step(*a, **kw)

    opt.step = spy
    x = torch.randn(16, 1, 6, 6)
    t = ant.sample_timesteps(16)
    if ant.needs_gradients:
        ant.backward(per_sample_loss(model), x, t, scaler=scaler)
    else:
        ant.reduce(per_sample_loss(model)(x, t), t).backward()
    assert ant.step(opt, scaler=scaler) is True
    assert len(seen) == 1 and isinstance(seen[0], torch.Tensor), seen  # the device-side skip


def test_a_state_without_w_present_gets_it_on_the_weights_device():
    """A state saved before w_present existed, loaded onto a GPU: w_present was made on the
    CPU beside w on the GPU, and the first off-step mixed the two devices."""
    _, ant = setup("nash", update_every=3)
    state = ant.state_dict()
    state["w"] = torch.full((ant.k,), 0.25, device="meta")
    del state["w_present"]
    ant._assign_state(state)
    assert ant._w_present.device == ant._w.device == torch.device("meta")


def test_optimizer_loaded_from_a_non_fused_state_skips_on_the_host():
    """A fused AdamW whose groups came from a non-fused state dict runs the non-fused kernel,
    which takes no found_inf: ant.step must take the host path (and still skip)."""
    model, ant = setup("uw")
    params = [*model.parameters(), *(p for g in ant.param_groups() for p in g["params"])]
    opt = torch.optim.AdamW(params, lr=0.1, fused=True)
    plain = torch.optim.AdamW(params, lr=0.1)
    opt.load_state_dict(plain.state_dict())
    assert not any(g["fused"] for g in opt.param_groups)
    x = torch.randn(16, 1, 6, 6)
    t = ant.sample_timesteps(16)
    ant.reduce(per_sample_loss(model)(x, t) * float("nan"), t).backward()
    with pytest.warns(UserWarning, match="non-finite"):
        assert ant.step(opt) is False


def test_timesteps_sampled_in_inference_mode():
    """Drawn under inference mode, t is still a normal tensor: a change in place after the
    draw is seen (an inference tensor has no change counter), so its stale host counts are not
    used and its range is checked."""
    _, ant = setup("uw")
    with torch.inference_mode():
        t = ant.sample_timesteps(16)
        assert ant.sampler.counts_for(t) is not None and not t.is_inference()
        ant.reduce(torch.ones(16), t)
        t.fill_(5 * T)
        assert ant.sampler.counts_for(t) is None
        with pytest.raises(ValueError, match=r"\[0, T=100\)"):
            ant.reduce(torch.ones(16), t)
    uw = ANT(linear_schedule(T), k=4, method="uw")
    with torch.inference_mode():
        t = uw.sample_timesteps(16)
        t.zero_()  # every sample in cluster 0: the engine counts again
        total = uw.reduce(torch.arange(16.0), t)
    # cluster 0 alone, mean 7.5 (of 0..15): UW's 0.5 L_0 / k at s = 0 (the stale counts, four
    # samples a cluster, gave 0.5 (1.5 + 5.5 + 9.5 + 13.5) / 4)
    assert float(total) == pytest.approx(0.5 * 7.5 / 4)


def test_stats_report_conflicts_and_cosines():
    model, ant = setup("pcgrad")
    x = torch.randn(16, 1, 6, 6)
    for _ in range(2):
        ant.backward(per_sample_loss(model), x, ant.sample_timesteps(16))
    st = ant.stats()
    assert st["steps"] == 2 and len(st["conflict_rate"]) == 4
    cos = np.array(st["cosine"])
    np.testing.assert_allclose(np.diag(cos), 1.0, atol=1e-5)
    assert np.all((np.array(st["conflict_rate"]) >= 0) & (np.array(st["conflict_rate"]) <= 1))


def test_bad_input_messages():
    model, ant = setup("pcgrad")
    x = torch.randn(8, 1, 6, 6)
    t = ant.sample_timesteps(8)
    with pytest.raises(ValueError, match="PER SAMPLE"):
        ant.backward(lambda xb, tb: per_sample_loss(model)(xb, tb).mean(), x, t)
    with pytest.raises(ValueError, match=r"\[0, T=100\)"):
        ant.backward(per_sample_loss(model), x, torch.full((8,), 100))
    t_moved = ant.sample_timesteps(8)
    t_moved += 100  # changed after sampling: its host counts and range no longer hold
    assert ant.sampler.counts_for(t_moved) is None
    with pytest.raises(ValueError, match=r"\[0, T=100\)"):
        ant.backward(per_sample_loss(model), x, t_moved)
    with pytest.raises(ValueError, match="8 entries"):
        ant.backward(per_sample_loss(model), x[:4], t)
    with pytest.raises(ValueError, match="smaller than k"):
        ant.sample_timesteps(3)
    with pytest.raises(ValueError, match="ant.backward"):
        ant.reduce(torch.ones(8), t)
    with pytest.raises(ValueError, match="unknown MTL method"):
        ANT(linear_schedule(T), k=4, method="pcgard")
    bn = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    for mode in ("auto", "micro", "onepass"):  # every mode that splits the batch
        with pytest.raises(ValueError, match="BatchNorm.*retain_graph"):
            ANT(linear_schedule(T), k=4, method="pcgrad", model=bn, mode=mode)
    ANT(linear_schedule(T), k=4, method="pcgrad", model=bn, mode="retain_graph")  # allowed
    _, uw = setup("uw")
    with pytest.raises(ValueError, match="PER SAMPLE"):
        uw.reduce(torch.ones(8, 2), t)
    for bad in (t.bool(), t.float(), t.to(torch.complex64)):  # a bool t read as t = 0 / 1
        with pytest.raises(ValueError, match="t must be a 1-D integer tensor"):
            uw.reduce(torch.ones(8), bad)


def test_user_timesteps_not_sorted_still_exact():
    model, ant = setup("pcgrad")
    x = torch.randn(12, 1, 6, 6)
    t = torch.randint(0, T, (12,))
    J_ref, _ = explicit_J(model, x, t, ant.clusters, ant.k)
    out = ant.backward(per_sample_loss(model), x, t)
    torch.testing.assert_close(flat_grad(model).double(), out.weights.double() @ J_ref,
                               rtol=1e-5, atol=1e-6)


def test_gradscaler_weights_from_unscaled_gram():
    outs = []
    for scale in (None, 1024.0):
        model, ant = setup("nash")
        x = torch.randn(16, 1, 6, 6, generator=torch.Generator().manual_seed(3))
        t = ant.sample_timesteps(16)
        scaler = torch.amp.GradScaler("cpu", init_scale=scale) if scale else None
        out = ant.backward(per_sample_loss(model), x, t, scaler=scaler)
        g = flat_grad(model) / (scale or 1.0)
        outs.append((out.weights, g))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-5, atol=1e-7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU here")
@pytest.mark.gpu
@pytest.mark.parametrize("method", ["pcgrad", "nash", "uw+pcgrad"])
def test_gpu_step_has_no_host_sync(method):
    torch.manual_seed(0)
    model = TinyNet().cuda()
    ant = ANT(linear_schedule(T), k=4, method=method, model=model)
    x = torch.randn(16, 1, 6, 6, device="cuda")
    ant.backward(per_sample_loss(model), x, ant.sample_timesteps(16, device="cuda"))  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        t = ant.sample_timesteps(16, device="cuda")
        ant.backward(per_sample_loss(model), x, t)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _nan_loss(model):
    def fn(xb, tb):
        return per_sample_loss(model)(xb, tb) * float("nan")

    return fn


def test_nan_first_update_falls_back_to_equal_weights_not_zero():
    model, ant = setup("nash", update_every=3)
    x = torch.randn(16, 1, 6, 6)
    ant.backward(_nan_loss(model), x, ant.sample_timesteps(16))
    assert not bool(ant.last.finite)
    out = ant.backward(per_sample_loss(model), x, ant.sample_timesteps(16))  # an off-step
    torch.testing.assert_close(out.weights, torch.full((4,), 0.25))
    assert flat_grad(model).abs().sum() > 0


def test_nan_step_leaves_method_state_and_uw_untouched():
    model, ant = setup("uw+nash")
    x = torch.randn(16, 1, 6, 6)
    ant.backward(per_sample_loss(model), x, ant.sample_timesteps(16))
    nash = ant.method.grad
    alpha, last = nash.last_alpha.clone(), nash.last_weights.clone()
    s = next(ant.method.loss.parameters())
    s.grad = None
    ant.step_count = 0  # force an on-step
    ant.backward(_nan_loss(model), x, ant.sample_timesteps(16))
    torch.testing.assert_close(nash.last_alpha, alpha)
    torch.testing.assert_close(nash.last_weights, last)
    assert torch.all(s.grad == 0)
    assert torch.all(flat_grad(model) == 0)


def _stream_state(ant: ANT, method: str):
    """What the next valid step draws from: PCGrad's orders, GradDrop's U, RLW's draw."""
    ant.state_dict()  # runs a pending observe (RLW)
    if method == "pcgrad":
        return ant.method.grad.last_orders.clone()
    part = ant.method.grad if method == "graddrop" else ant.method.loss
    steps = int(part.stream.state_dict()["steps"])
    return (steps, part.stream.uniform(64, "cpu")) if method == "graddrop" else (
        steps, part.draw.clone())  # fmt: skip


@pytest.mark.parametrize("method", ["pcgrad", "graddrop", "rlw"])
def test_nan_step_leaves_random_streams(method):
    """A skipped (non-finite) step does not move a method's random stream: the next good step
    draws what a run without the skipped step draws (PCGrad's orders, GradDrop's U, RLW's
    normal draws)."""
    runs = []
    for skip in (True, False):
        model, ant = setup(method)
        x = torch.randn(16, 1, 6, 6, generator=torch.Generator().manual_seed(1))
        ant.backward(per_sample_loss(model), x, ant.sample_timesteps(16))
        if skip:
            ant.backward(_nan_loss(model), x, ant.sample_timesteps(16))
            assert not bool(ant.last.finite)
        ant.backward(per_sample_loss(model), x, ant.sample_timesteps(16))
        runs.append(_stream_state(ant, method))
    if method == "pcgrad":
        assert torch.equal(runs[0], runs[1])
    else:
        assert runs[0][0] == runs[1][0] == 2 and torch.equal(runs[0][1], runs[1][1])


def test_vanilla_backward_is_the_batch_mean():
    grads = []
    for use_backward in (False, True):
        model, ant = setup("vanilla")
        x = torch.randn(16, 1, 6, 6, generator=torch.Generator().manual_seed(2))
        t = ant.sample_timesteps(16)
        if use_backward:
            ant.backward(per_sample_loss(model), x, t)
        else:
            ant.reduce(per_sample_loss(model)(x, t), t).backward()
        grads.append(flat_grad(model))
    torch.testing.assert_close(grads[0], grads[1])


def test_off_steps_weight_clusters_absent_at_the_update():
    model, ant = setup("pcgrad", sampling="uniform", update_every=10)
    x = torch.randn(16, 1, 6, 6)
    ant.backward(per_sample_loss(model), x[:2], ant.sample_timesteps(2))  # <= 2 clusters
    seen = ant._w_present.clone()
    assert not bool(seen.all())
    out = ant.backward(per_sample_loss(model), x, ant.sample_timesteps(16))
    w = out.weights
    assert torch.all(w[~seen] > 0)
    torch.testing.assert_close(w[~seen], torch.full_like(w[~seen], float(w[seen].mean())))


def test_disabled_gradscaler_is_a_no_op():
    model, ant = setup("nash")
    x = torch.randn(16, 1, 6, 6)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    out = ant.backward(per_sample_loss(model), x, ant.sample_timesteps(16), scaler=scaler)
    assert bool(out.finite)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert ant.step(opt, scaler) is True


def test_more_bad_input():
    with pytest.raises(ValueError, match="update_every must be"):
        ANT(linear_schedule(T), k=4, method="nash", update_every=0)
    with pytest.raises(ValueError, match="gradient methods"):
        ANT(linear_schedule(T), k=4, method="uw", update_every=5)
    model, ant = setup("pcgrad")
    x = torch.randn(8, 1, 6, 6)
    with pytest.raises(ValueError, match="leading dimension B=8"):
        ant.backward(lambda b, tb: per_sample_loss(model)(b["x"], tb),
                     {"x": x, "shared": torch.ones(1, 3)}, ant.sample_timesteps(8))
    with pytest.raises(TypeError, match="loss_fn must be a callable"):  # not deep in onepass
        ant.backward(None, x, ant.sample_timesteps(8))
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        ant.sample_timesteps(8, generator=5)
    # an empty batch stepped the optimiser (weight decay, momentum) as if it had trained
    empty = torch.zeros(0, dtype=torch.long)
    with pytest.raises(ValueError, match="the batch is empty"):
        ant.backward(per_sample_loss(model), x[:0], empty)
    uw = ANT(linear_schedule(T), k=4, method="uw")
    with pytest.raises(ValueError, match="the batch is empty"):
        uw.reduce(per_sample_loss(model)(x, ant.sample_timesteps(8))[:0], empty)


@pytest.mark.parametrize("method", ["uw", "dwa", "uw+pcgrad"])
def test_method_state_follows_the_model_and_mismatch_is_a_clear_error(method):
    """attach() moves the method's state to the model's device; state left elsewhere is refused
    with the fix, not a device error deep in a kernel. The meta device stands in for a GPU."""
    model, ant = setup(method)
    state = list(ant.method.loss.parameters()) + list(ant.method.loss.buffers())
    assert state and all(s.device.type == "cpu" for s in state)
    ant.attach(TinyNet().to("meta"))
    moved = list(ant.method.loss.parameters()) + list(ant.method.loss.buffers())
    assert all(s.device.type == "meta" for s in moved)
    model, ant = setup(method)
    x = torch.randn(16, 1, 6, 6)

    def step():
        t = ant.sample_timesteps(16)
        if ant.needs_gradients:
            ant.backward(per_sample_loss(model), x, t)
        else:
            ant.reduce(per_sample_loss(model)(x, t), t)

    step()  # a step on the CPU first: what the engine remembers must follow the move
    ant.to("meta")  # model on the CPU, the state moved away after attach
    t = ant.sample_timesteps(16)
    with pytest.raises(ValueError, match=r"keeps its state on meta.*ant\.to\('cpu'\)"):
        if ant.needs_gradients:
            ant.backward(per_sample_loss(model), x, t)
        else:
            ant.reduce(per_sample_loss(model)(x, t), t)


@pytest.mark.parametrize("method", ["vanilla", "uw", "dwa"])
@pytest.mark.parametrize("bad", [float("inf"), -float("inf"), float("nan"), None])
def test_reduce_flags_any_nonfinite_sample(method, bad):
    """One inf, -inf or NaN sample makes the step non-finite; large finite losses do not (the
    check must not overflow on them)."""
    ant = ANT(linear_schedule(1000), k=5, method=method)
    t = ant.sample_timesteps(20)
    per = torch.full((20,), 1e37)
    if bad is not None:
        per[7] = bad
    ant.reduce(per.requires_grad_(), t)
    assert bool(ant.last.finite) is (bad is None)


def test_engine_calls_observe_only_where_a_method_defines_it():
    from antdiff.mtl import LS, UW
    from antdiff.mtl.base import LossMethod

    class Counting(LossMethod):
        name = "counting"
        calls = 0

        def transform(self, L, present):
            return torch.where(present, L, 0.0) / self.k

        def observe(self, L, present):
            Counting.calls += 1

    assert not LS(3).observes and not UW(3).observes and Counting(3).observes
    for name in ("rlw", "dwa", "famo"):
        assert make_method(name, 3).loss.observes
    ant = ANT(linear_schedule(1000), k=5, method="uw")
    ant.method.loss = Counting(5)
    t = ant.sample_timesteps(10)
    ant.reduce(torch.ones(10), t)
    assert Counting.calls == 0  # waits for ant.step's gradient check
    ant.reduce(torch.ones(10), t)  # ... or, without a step, for the next reduction
    assert Counting.calls == 1
    ant.state_dict()  # a checkpoint includes every observed step
    assert Counting.calls == 2


@pytest.fixture(params=["native", "torch"])
def uw_path(request, monkeypatch):
    """The fused UW reduction's two paths on the CPU: the C++ call (float32; counts the calls)
    and the torch operators (what CUDA and unbuilt extensions run)."""
    from antdiff.mtl import native

    calls = []
    if request.param == "torch":
        monkeypatch.setattr(native, "_C", None)
    else:
        assert native._C is not None, "antdiff._C is not built: run `make build`"
        real = native.uw_forward
        monkeypatch.setattr(
            native, "uw_forward", lambda *a, **kw: calls.append(1) or real(*a, **kw)
        )
    return request.param, calls


@pytest.mark.parametrize("source", ["sampler", "user"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_uw_fused_reduce_equals_the_composed_transform(source, dtype, uw_path):
    """ant.reduce's one-node UW (closed-form backward) gives the value, gradients, cluster
    losses and weights of UW.transform composed with torch operators: for sampled timesteps
    (host counts) and for a user's unsorted timesteps with an empty cluster (device counts)."""
    from antdiff.mtl import UW

    _, ant = setup("uw")
    s0 = torch.tensor([0.3, -0.2, 0.1, 0.0])
    with torch.no_grad():
        ant.method.loss.s.copy_(s0)
    g = torch.Generator().manual_seed(3)
    if source == "sampler":
        t = ant.sample_timesteps(11)
    else:  # clusters 0, 1 and 3 only, shuffled
        b = ant.clusters.bounds
        pool = torch.cat([torch.arange(b[i], b[i + 1]) for i in (0, 1, 3)])
        t = pool[torch.randint(0, len(pool), (11,), generator=g)]
    per = (torch.rand(11, generator=g) + 0.1).to(dtype).requires_grad_(True)
    total = ant.reduce(per, t)
    total.backward()

    ref = UW(4)
    with torch.no_grad():
        ref.s.copy_(s0)
    per2 = per.detach().clone().requires_grad_(True)
    cid = ant.clusters.cluster_of(t)
    counts = torch.bincount(cid, minlength=4).float()
    L = torch.zeros(4).index_add(0, cid, per2.float()) / counts.clamp(min=1)
    present = counts > 0
    total2 = ref.transform(L, present).sum()
    total2.backward()
    assert bool(present.all()) is (source == "sampler")
    torch.testing.assert_close(total.detach(), total2.detach())
    torch.testing.assert_close(per.grad, per2.grad)
    torch.testing.assert_close(ant.method.loss.s.grad, ref.s.grad)
    torch.testing.assert_close(ant.last.cluster_losses, L.detach())
    torch.testing.assert_close(ant.last.weights, ref.slopes(L.detach(), present))
    assert torch.equal(ant.last.present, present) and per.grad.dtype == dtype
    assert len(uw_path[1]) == (uw_path[0] == "native" and dtype == torch.float32)


@pytest.mark.parametrize("mode", ["proportional", "equal", "uniform"])
def test_cached_placements_give_the_placement_formula(mode):
    """Steps that reuse a cached per-sample placement (same counts) draw exactly
    lo + r mod size from their own r, as a fresh placement does."""
    ant = ANT(linear_schedule(1000), k=5, method="vanilla", sampling=mode)
    g, g_ref = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    lo_k = np.asarray(ant.clusters.bounds[:-1])
    size_k = np.diff(np.asarray(ant.clusters.bounds))
    seen = set()
    for B in [12, 12, 12, 12, 12, 12, 13, 12]:
        t, counts = ant.sampler.sample(B, generator=g)
        seen.add(counts.tobytes())
        r = torch.randint(0, 2**62, (B,), generator=g_ref)
        lo = torch.from_numpy(np.repeat(lo_k, counts))
        size = torch.from_numpy(np.repeat(size_k, counts))
        assert torch.equal(t, lo + r % size)
        assert torch.equal(ant.sampler.cid_for(t), ant.clusters.cluster_of(t))
    if mode == "uniform":  # counts vary freely: nothing cached
        assert not ant.sampler._placements
    else:  # a few count vectors, each cached once and then reused
        assert len(ant.sampler._placements) == len(seen) < 8
    twin = copy.deepcopy(ant)  # copies start with an empty cache and draw the same
    assert not twin.sampler._placements and ant.sampler._placements or mode == "uniform"
    a = twin.sample_timesteps(12, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, ant.sample_timesteps(12, generator=torch.Generator().manual_seed(3)))
    ant.sampler._placements.clear()
    with torch.inference_mode():  # drawn as normal tensors: kept, and fit for training steps
        t = ant.sampler.sample(12)[0]
    kept = [x for tensors, _ in ant.sampler._placements.values() for x in tensors]
    assert not t.is_inference() and not any(x.is_inference() for x in kept)
    assert bool(kept) == (mode != "uniform")


@pytest.mark.parametrize("mode", ["proportional", "uniform"])
def test_uw_fused_reduce_over_steps_with_changing_counts(mode, uw_path):
    """Step after step (count vectors differ, repeat and leave clusters empty), the fused UW
    reduction's gradients equal the composed transform's: a wrong cached 1 / N would show."""
    from antdiff.mtl import UW

    _, ant = setup("uw", sampling=mode)
    ref = UW(4)
    g = torch.Generator().manual_seed(11)
    for B in [11, 12, 13, 12, 5, 11, 13]:
        with torch.no_grad():
            s0 = torch.randn(4, generator=g)
            ant.method.loss.s.copy_(s0)
            ref.s.copy_(s0)
        ant.method.loss.s.grad = ref.s.grad = None
        t = ant.sample_timesteps(B)
        per = (torch.rand(B, generator=g) + 0.1).requires_grad_(True)
        ant.reduce(per, t).backward()
        per2 = per.detach().clone().requires_grad_(True)
        cid = ant.clusters.cluster_of(t)
        counts = torch.bincount(cid, minlength=4).float()
        L = torch.zeros(4).index_add(0, cid, per2) / counts.clamp(min=1)
        ref.transform(L, counts > 0).sum().backward()
        torch.testing.assert_close(per.grad, per2.grad)
        torch.testing.assert_close(ant.method.loss.s.grad, ref.s.grad)
    assert len(uw_path[1]) == (7 if uw_path[0] == "native" else 0)


@pytest.mark.parametrize("default_dtype", [torch.float32, torch.float64])
def test_uw_fused_reduce_allows_in_place_scaling_under_any_default_dtype(uw_path, default_dtype):
    """``loss /= n`` (gradient accumulation) before backward works on both paths, and a float64
    default dtype changes nothing for float32 losses (the C++ path's buffers are float32)."""
    from antdiff.mtl import UW

    _, ant = setup("uw")
    ref = UW(4)
    t = ant.sample_timesteps(10)
    per = (torch.rand(10, generator=torch.Generator().manual_seed(5)) + 0.1).requires_grad_(True)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(default_dtype)
    try:
        loss = ant.reduce(per, t)
        loss /= 4
        loss.backward()
    finally:
        torch.set_default_dtype(prev)
    per2 = per.detach().clone().requires_grad_(True)
    cid = ant.clusters.cluster_of(t)
    counts = torch.bincount(cid, minlength=4).float()
    L = torch.zeros(4).index_add(0, cid, per2) / counts.clamp(min=1)
    (ref.transform(L, counts > 0).sum() / 4).backward()
    torch.testing.assert_close(loss.detach(), ref.transform(L.detach(), counts > 0).sum() / 4)
    torch.testing.assert_close(per.grad, per2.grad)
    torch.testing.assert_close(ant.method.loss.s.grad, ref.s.grad)
    assert len(uw_path[1]) == (uw_path[0] == "native")


def test_uw_fused_reduce_refuses_double_backward(uw_path):
    _, ant = setup("uw")
    t = ant.sample_timesteps(8)
    per = torch.rand(8, requires_grad=True)
    (gp,) = torch.autograd.grad(ant.reduce(per, t), per, create_graph=True)
    with pytest.raises(RuntimeError, match="does not require grad|once_differentiable"):
        torch.autograd.grad(gp.sum(), per)


@pytest.mark.parametrize("method", ["uw", "dwa", "vanilla"])
@pytest.mark.parametrize("opt_kind", ["plain", "fused", "scaler"])
def test_finite_loss_with_nonfinite_gradient_is_skipped(method, opt_kind):
    """ant.reduce only sees losses; a finite loss can still give inf/NaN gradients (an fp16
    overflow in the backward). ant.step checks the gradients: the step is skipped, the
    parameters, optimiser moments, UW's s and DWA's history stay, the telemetry counts it."""
    model, ant = setup(method)
    params = [*model.parameters(), *(p for g in ant.param_groups() for p in g["params"])]
    opt = torch.optim.AdamW(params, lr=0.1, weight_decay=0.5, fused=opt_kind == "fused")
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0) if opt_kind == "scaler" else None
    x = torch.randn(16, 1, 6, 6)

    def run(poison: bool):
        opt.zero_grad(set_to_none=True)
        t = ant.sample_timesteps(16)
        per = per_sample_loss(model)(x, t)
        if poison:  # sqrt'(0) = inf times a zero factor: a NaN gradient, a finite loss
            per = per + torch.sqrt(model.out.bias.sum() * 0.0)
        loss = ant.reduce(per, t)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        return ant.step(opt, scaler=scaler)

    def snapshot():
        state = [v.clone() for p in params for v in opt.state[p].values()]
        method_state = [v.clone() for v in ant.method.loss.state_dict().values()] if (
            ant.method.loss is not None) else []  # fmt: skip
        return [p.detach().clone() for p in params] + state + method_state

    for _ in range(3):  # DWA needs two observed steps before its history matters
        assert run(poison=False) is True
    before = snapshot()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        taken = run(poison=True)
        ant.stats()  # a device-side skip is reported once its flag is read
    assert any("non-finite" in str(w.message) for w in caught)
    assert taken is (opt_kind == "fused")  # issued (and skipped on the device) or refused
    assert not bool(ant.last.finite)
    for a, b in zip(snapshot(), before):
        assert torch.equal(a, b)
    assert ant.stats()["nonfinite_steps"] == 1
    assert run(poison=False) is True  # and the next good step goes through
    assert any(not torch.equal(a, b) for a, b in zip(snapshot(), before))


def test_check_grads_false_lets_a_finite_loss_step_through():
    model, ant = setup("uw")
    opt = torch.optim.SGD([{"params": model.parameters()}, *ant.param_groups()], lr=0.1)
    t = ant.sample_timesteps(16)
    per = per_sample_loss(model)(torch.randn(16, 1, 6, 6), t)
    ant.reduce(per + torch.sqrt(model.out.bias.sum() * 0.0), t).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ant.step(opt, check_grads=False) is True
    assert model.out.bias.isnan().all()  # as asked: the NaN gradient was applied


@pytest.mark.parametrize("bad_at", [0, 1, 2, None])
def test_gradient_check_covers_mixed_dtypes_and_sparse_gradients(bad_at):
    """ant.step's gradient check (one multi-tensor call in the usual case): float32, bfloat16
    and sparse gradients in one optimiser, an inf/NaN in any of them is found."""
    from antdiff.engine.core import _grads_nonfinite

    a = torch.nn.Parameter(torch.zeros(5))
    b = torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))
    emb = torch.nn.Embedding(4, 2, sparse=True)
    opt = torch.optim.SGD([a, b, *emb.parameters()], lr=0.1)
    a.grad, b.grad = torch.ones(5), torch.ones(3, dtype=torch.bfloat16)
    emb(torch.tensor([1, 2])).sum().backward()
    assert emb.weight.grad.is_sparse
    if bad_at == 0:
        a.grad[2] = float("nan")
    elif bad_at == 1:
        b.grad[0] = float("inf")
    elif bad_at == 2:
        nan_row = [[float("nan"), 0.0]]
        emb.weight.grad = torch.sparse_coo_tensor([[1]], nan_row, (4, 2), check_invariants=True)
    buffers: dict = {}
    flags = _grads_nonfinite(opt, buffers)
    assert bool(sum(f for f in flags) > 0) is (bad_at is not None)
    a.grad[2] = float("nan") if bad_at is None else 1.0  # the buffers are reused across calls
    b.grad[0], emb.weight.grad = 1.0, None
    flags = _grads_nonfinite(opt, buffers)
    assert len(flags) == 1 and bool(flags[0] > 0) is (bad_at is None)


def _cluster_shares(t, clusters):
    """float64 [k] N_i / B, counting by the cluster bounds with bisect."""
    ids = [bisect.bisect_right(clusters.bounds, int(v)) - 1 for v in t]
    return np.bincount(ids, minlength=clusters.k) / len(ids)


def _nash_after_first_step(skip_first, x, t):
    """(forwards, weights, grad) of the step after an optional skipped inf step (micro mode:
    a recompute takes one forward per cluster), checking the off-step after it."""
    model, ant = setup("nash", mode="micro")  # update_every 25
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    lf, calls = per_sample_loss(model), {"n": 0}

    def counting(xb, tb):
        calls["n"] += 1
        return lf(xb, tb)

    if skip_first:
        ant.backward(lambda xb, tb: lf(xb, tb) * torch.where(tb == 20, float("inf"), 1.0), x, t)
        with pytest.warns(UserWarning, match="non-finite"):
            assert ant.step(opt) is False
    out = ant.backward(counting, x, t)
    got = (calls["n"], out.weights.clone(), flat_grad(model).clone())
    calls["n"] = 0
    ant.step(opt)
    again = ant.backward(counting, x, t)  # an off-step with those weights
    assert calls["n"] == 1
    torch.testing.assert_close(again.weights, out.weights)
    return got


def test_nonfinite_first_recompute_is_redone_at_the_next_step():
    """A skipped (inf) first Nash recompute leaves no weights behind: the next step recomputes
    them and gets what a run starting with that step gets."""
    x = torch.randn(16, 1, 6, 6, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([2, 5, 9, 20, 26, 31, 40, 47, 52, 58, 63, 70, 77, 84, 90, 99])
    n_skip, w_skip, g_skip = _nash_after_first_step(True, x, t)
    n_ref, w_ref, g_ref = _nash_after_first_step(False, x, t)
    assert n_skip == n_ref == 4  # one pass per cluster: a recompute
    assert not torch.allclose(w_ref, torch.full((4,), 0.25))
    torch.testing.assert_close(w_skip, w_ref, rtol=0, atol=0)
    torch.testing.assert_close(g_skip, g_ref, rtol=0, atol=0)


def test_resume_mid_cycle_overwrites_grad_without_zero_grad():
    """backward overwrites .grad: a run resumed between Nash recomputes, with no zero_grad,
    ends where the uninterrupted run ends."""

    def run(model, ant, opt, steps):
        for s in steps:
            x = torch.randn(8, 1, 6, 6, generator=torch.Generator().manual_seed(100 + s))
            ant.backward(per_sample_loss(model), x, ant.sample_timesteps(8))
            ant.step(opt)

    model, ant = setup("nash", update_every=4)
    run(model, ant, torch.optim.SGD(model.parameters(), lr=0.05), range(6))
    model2, ant2 = setup("nash", update_every=4)
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.05)
    run(model2, ant2, opt2, range(2))
    state = copy.deepcopy((model2.state_dict(), ant2.state_dict()))
    rng = torch.get_rng_state()
    model3, ant3 = setup("nash", seed=7, update_every=4)
    model3.load_state_dict(state[0])
    ant3.load_state_dict(state[1])
    torch.set_rng_state(rng)
    run(model3, ant3, torch.optim.SGD(model3.parameters(), lr=0.05), range(2, 6))
    for p, q in zip(model.parameters(), model3.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("method", ["nash", "pcgrad", "uw+nash"])
def test_off_step_reports_the_on_step_loss(method):
    """Same batch and parameters: on- and off-steps report the same loss (the mean of the
    cluster losses without a loss method, UW's total with one)."""
    model, ant = setup(method, update_every=2)
    x = torch.randn(8, 1, 6, 6, generator=torch.Generator().manual_seed(4))
    t = torch.tensor([3, 10, 30, 45, 60, 70, 85, 95])
    on = ant.backward(per_sample_loss(model), x, t)
    off = ant.backward(per_sample_loss(model), x, t)
    assert ant.step_count == 2
    torch.testing.assert_close(off.loss, on.loss, rtol=1e-6, atol=0)
    if method != "uw+nash":
        with torch.no_grad():
            per = per_sample_loss(model)(x, t).double()
        ids = torch.tensor([bisect.bisect_right(ant.clusters.bounds, int(v)) - 1 for v in t])
        means = [per[ids == i].mean() for i in range(ant.k)]
        torch.testing.assert_close(off.loss.double(), torch.stack(means).mean(), rtol=1e-6,
                                   atol=0)  # fmt: skip


def test_update_every_refused_where_no_weights_are_kept():
    with pytest.raises(ValueError, match=r"update_every=5 with method 'graddrop'.*valid"):
        ANT(linear_schedule(T), k=4, method="graddrop", update_every=5)
    with pytest.raises(ValueError, match=r"update_every=2 with method 'uw\+graddrop'"):
        ANT(linear_schedule(T), k=4, method="uw+graddrop", update_every=2)
    ANT(linear_schedule(T), k=4, method="graddrop", update_every=1)  # every step: honoured
    for name in ("pcgrad", "nash", "imtl", "mgda", "cagrad"):  # keep weights to reuse
        ANT(linear_schedule(T), k=4, method=name, update_every=3)


def test_k_must_match_a_clusters_object():
    clusters = Clusters((0, 10, 40, 50, 60, 100))
    with pytest.raises(ValueError, match=r"k=3 but the clusters given have k=5: pass k=5"):
        ANT(linear_schedule(T), k=3, clustering=clusters, method="uw")
    assert ANT(linear_schedule(T), k=5, clustering=clusters, method="uw").k == 5
    assert ANT(linear_schedule(T), clustering=clusters, method="uw").k == 5
    assert ANT(linear_schedule(T), clustering=Clusters((0, 30, 100)), method="uw").k == 2
    assert ANT(linear_schedule(T), method="uw").k == 5
    # an objective's name in any case, as method names
    assert ANT(linear_schedule(T), clustering="SNR").clusters.bounds == ANT(
        linear_schedule(T), clustering="snr").clusters.bounds  # fmt: skip


@pytest.mark.parametrize("entry", ["reduce", "backward"])
def test_vanilla_weights_are_the_cluster_shares(entry):
    """The plain batch mean weights cluster i's mean loss by N_i / B."""
    model, ant = setup("vanilla", sampling="uniform")
    x = torch.randn(40, 1, 6, 6, generator=torch.Generator().manual_seed(5))
    t = ant.sample_timesteps(40)
    if entry == "reduce":
        ant.reduce(per_sample_loss(model)(x, t), t).backward()
    else:
        ant.backward(per_sample_loss(model), x, t)
    want = _cluster_shares(t, ant.clusters)
    assert len(set(want.tolist())) > 1  # unequal shares: 1/k would fail
    np.testing.assert_allclose(ant.last.weights.double().numpy(), want, rtol=1e-6)
    np.testing.assert_allclose(ant.stats()["weight"], want, rtol=1e-6)


@pytest.mark.parametrize("method", ["uw", "dwa", "uw+pcgrad"])
def test_backward_overwrites_grad_for_every_method(method):
    """Two calls on the same batch leave what one call leaves, for the model's .grad and the
    method's own parameters (UW's log-variances), loss-space methods included."""
    x = torch.randn(8, 1, 6, 6, generator=torch.Generator().manual_seed(5))
    t = torch.tensor([3, 10, 30, 45, 60, 70, 85, 95])
    grads = []
    for calls in (1, 2):
        model, ant = setup(method)
        for _ in range(calls):
            ant.backward(per_sample_loss(model), x, t)
        own = [p for g in ant.param_groups() for p in g["params"]]
        grads.append([p.grad.clone() for p in [*model.parameters(), *own]])
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_off_step_reports_weight_zero_for_an_absent_cluster():
    """Cached Nash weights still hold a value for a cluster this batch lacks; it adds nothing
    to the step, so the reported weight is 0, as an on-step reports it."""
    model, ant = setup("nash", update_every=4)
    x = torch.randn(8, 1, 6, 6, generator=torch.Generator().manual_seed(6))
    full = torch.tensor([3, 10, 30, 45, 60, 70, 85, 95])
    ant.backward(per_sample_loss(model), x, full)  # on-step: every cluster present
    ids = torch.tensor([bisect.bisect_right(ant.clusters.bounds, int(v)) - 1 for v in full])
    lacking = full.clone()
    lacking[ids == ids[-1]] = int(full[0])  # the last cluster's samples moved to the first
    out = ant.backward(per_sample_loss(model), x, lacking)  # off-step
    assert not bool(out.present[ids[-1]]) and float(out.weights[ids[-1]]) == 0.0
    assert (out.weights[out.present] > 0).all()


def test_parameter_gradient_hooks_are_not_bypassed():
    """One-pass forms the weight gradients in layer hooks, so a hook on a parameter would never
    run: onepass refuses, auto switches to micro, where the hook applies."""
    x = torch.randn(16, 1, 6, 6, generator=torch.Generator().manual_seed(3))
    for kind in ("register_hook", "register_post_accumulate_grad_hook"):
        model, ant = setup("pcgrad", mode="onepass")
        getattr(model.inp.weight, kind)(lambda g: None)
        with pytest.raises(ValueError, match=f"'inp.weight' has a gradient hook.*{kind}"):
            ant.backward(per_sample_loss(model), x, ant.sample_timesteps(16))
    model, ant = setup("pcgrad")  # auto
    model.inp.weight.register_hook(lambda g: g * 0)
    with pytest.warns(UserWarning, match="uses 'micro'"):
        ant.backward(per_sample_loss(model), x, ant.sample_timesteps(16))
    assert float(model.inp.weight.grad.abs().sum()) == 0.0
    assert float(model.out.weight.grad.abs().sum()) > 0.0


@pytest.mark.parametrize("s0", [float("nan"), -100.0])
def test_nonfinite_uw_slope_skips_a_gradient_method_step(s0):
    """UW's slope exp(-s_i) / 2k can be inf/NaN while every loss is finite (s_i NaN, or
    exp(-s_i) overflowing): the step is non-finite, as ant.reduce has it, not an update that
    carries the inf/NaN into the model."""
    model, ant = setup("uw+pcgrad")
    with torch.no_grad():
        ant.method.loss.s[0] = s0
    opt = torch.optim.SGD([{"params": model.parameters()}, *ant.param_groups()], lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(16, 1, 6, 6)
    out = ant.backward(per_sample_loss(model), x, ant.sample_timesteps(16))
    assert not bool(out.finite)
    with pytest.warns(UserWarning, match="non-finite"):
        assert ant.step(opt) is False
    for a, b in zip(before, model.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("method", ["nash", "uw+nash"])
def test_a_nash_state_from_before_raw_gram_weights_is_recomputed(method):
    """A checkpoint whose Nash-MTL weights solved G / ||G||_F (sqrt(||G||_F) times larger; and
    "uw+nash" then used the sum reduction) resumed its off-steps on them: the load warns and
    the next step, an off-step, solves anew; a current state keeps its off-steps."""
    model, ant, opt, x, w_before, _ = _after_one_step(method, update_every=25)
    state = copy.deepcopy(ant.state_dict())
    old = copy.deepcopy(state)
    del old["grad_method"]["alpha_scale"]
    old["grad_method"].pop("reduction")
    old["w"] = old["w"] * 7.0  # what the old scale kept
    t = ant.sample_timesteps(16)
    for saved, redo in ((state, False), (old, True)):
        m2, fresh = setup(method, update_every=25)
        m2.load_state_dict(model.state_dict())
        if redo:
            with pytest.warns(UserWarning, match="Nash-MTL state from an earlier antdiff"):
                fresh.load_state_dict(saved)
        else:
            fresh.load_state_dict(saved)
        out = fresh.backward(per_sample_loss(m2), x, t)
        if redo:  # solved on this step's Gram, as an engine's first step is
            m3, first = setup(method, update_every=25)
            m3.load_state_dict(model.state_dict())
            ref = first.backward(per_sample_loss(m3), x, t)
            torch.testing.assert_close(out.weights, ref.weights)
            assert not torch.allclose(fresh._w, saved["w"])  # not the kept 7x weights
        else:
            torch.testing.assert_close(fresh._w, saved["w"])  # an off-step: kept


def test_off_step_nan_leaves_uw_untouched_without_the_skip():
    """skip_nonfinite=False: the engine zeroes a non-finite update itself, the method's own
    gradients (UW's s) included, so s stays finite and later steps recover."""
    model, ant = setup("uw+nash", update_every=2)
    opt = torch.optim.SGD([{"params": model.parameters()}, *ant.param_groups()], lr=0.1)
    x = torch.randn(16, 1, 6, 6)
    ant.backward(per_sample_loss(model), x, ant.sample_timesteps(16))
    ant.step(opt, skip_nonfinite=False)
    s = ant.method.loss.s.detach().clone()
    nan_one = lambda xb, tb: per_sample_loss(model)(xb, tb) * torch.where(  # noqa: E731
        torch.arange(len(tb)) == 3, float("nan"), 1.0
    )
    out = ant.backward(nan_one, x, ant.sample_timesteps(16))  # an off-step
    assert not bool(out.finite)
    assert torch.equal(ant.method.loss.s.grad, torch.zeros_like(s))
    ant.step(opt, skip_nonfinite=False)
    assert torch.equal(ant.method.loss.s.detach(), s)
    assert bool(ant.backward(per_sample_loss(model), x, ant.sample_timesteps(16)).finite)


def test_skip_with_a_gradscaler_backs_off_as_gradscaler_does():
    """Scale times the backoff factor and the growth count reset, whichever way the skip
    happens: through ant.step's read, or (skip_nonfinite=False) through scaler.step, which
    sees the update made NaN even when the NaN loss left the gradients finite."""
    x = torch.randn(16, 1, 6, 6)
    for skip in (True, False):
        model, ant = setup("pcgrad")
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, backoff_factor=0.25,
                                      growth_interval=3)  # fmt: skip
        for _ in range(2):  # two good steps: growth count 2 of 3
            ant.backward(per_sample_loss(model), x, ant.sample_timesteps(16), scaler=scaler)
            ant.step(opt, scaler=scaler, skip_nonfinite=skip)
        before = [p.detach().clone() for p in model.parameters()]
        lf = per_sample_loss(model)
        masked_nan = lambda xb, tb, lf=lf: torch.where(  # noqa: E731
            torch.arange(len(tb)) == 3, float("nan"), lf(xb, tb)  # NaN loss, finite gradients
        )
        ant.backward(masked_nan, x, ant.sample_timesteps(16), scaler=scaler)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ant.step(opt, scaler=scaler, skip_nonfinite=skip)
        assert scaler.get_scale() == 256.0
        for a, b in zip(before, model.parameters()):
            assert torch.equal(a, b)
        ant.backward(per_sample_loss(model), x, ant.sample_timesteps(16), scaler=scaler)
        ant.step(opt, scaler=scaler, skip_nonfinite=skip)
        assert scaler.get_scale() == 256.0  # the growth count started again


def test_api_review_cases():
    """Unfrozen or converted parameters after attach get a new hook plan (one-pass gave them
    zero / stale gradients), a loss without grad is an error (one-pass gave a zero update),
    per-sample non-tensors in the batch are refused (they stayed whole while the images were
    cut), a failed load changes nothing, and the seed is checked by name."""
    x = torch.randn(16, 1, 6, 6, generator=torch.Generator().manual_seed(3))
    for mode in ("onepass", "micro"):
        model, ant = setup("pcgrad", mode=mode)
        model.inp.requires_grad_(False)
        ant.attach(model)
        t = ant.sample_timesteps(16)
        ant.backward(per_sample_loss(model), x, t)
        model.inp.requires_grad_(True)
        out = ant.backward(per_sample_loss(model), x, t)
        J_ref, _ = explicit_J(model, x, t, ant.clusters, ant.k)
        torch.testing.assert_close(flat_grad(model).double(), out.weights.double() @ J_ref,
                                   rtol=1e-5, atol=1e-6)  # fmt: skip
        model.double()
        out = ant.backward(per_sample_loss(model), x.double(), t)
        assert model.inp.weight.grad.dtype == torch.float64
        J_ref, _ = explicit_J(model, x.double(), t, ant.clusters, ant.k)
        torch.testing.assert_close(flat_grad(model), out.weights.double() @ J_ref,
                                   rtol=1e-5, atol=1e-6)  # fmt: skip
    model, ant = setup("pcgrad", mode="onepass")
    t = ant.sample_timesteps(16)
    with pytest.raises(ValueError, match="does not require grad"):
        ant.backward(lambda xb, tb: per_sample_loss(model)(xb, tb).detach(), x, t)
    with pytest.raises(TypeError, match=r"batch\[1\]\[0\] is a str"):
        ant.backward(lambda b, tb: per_sample_loss(model)(b[0], tb), (x, ["a"] * 16), t)
    src, dst = setup("uw", sampling="equal")[1], setup("uw")[1]
    src.reduce(torch.rand(16, requires_grad=True), src.sample_timesteps(16))
    with torch.no_grad():
        src.method.loss.s.fill_(0.5)
    before = copy.deepcopy(dst.state_dict())
    with pytest.raises(ValueError, match="sampling='equal'"):
        dst.load_state_dict(src.state_dict())
    assert torch.equal(dst.method.loss.s, before["loss_method"]["s"])
    with pytest.raises(ValueError, match="not an ANT state"):
        dst.load_state_dict({})
    for seed in (None, -1, 2**64, 1.5):
        with pytest.raises(ValueError, match="seed must be an integer in"):
            ANT(linear_schedule(T), k=4, method="uw", seed=seed)
    for B in (True, 0, 2.5):  # a bool said "smaller than k"
        with pytest.raises(ValueError, match="B must be a positive integer batch size"):
            ANT(linear_schedule(T), k=4, method="uw", sampling="uniform").sample_timesteps(B)


@pytest.mark.parametrize("mode", ["micro", "onepass", "auto", "retain_graph"])
@pytest.mark.parametrize("method", ["vanilla", "uw", "pcgrad", "uw+nash"])
def test_loss_fn_that_runs_another_model_is_an_error(method, mode):
    """A loss_fn that runs a model other than the attached one (a copy, the EMA model) gave a
    zero update with no word; now the first step says so, in every mode and step kind."""

    def mlp():
        return nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4))

    attached, other = mlp(), mlp()
    ant = ANT(linear_schedule(100), k=3, method=method, mode=mode, model=attached)
    x, t = torch.randn(12, 4), ant.sample_timesteps(12)
    serving = ant._onepass is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a user's mistake must not switch auto to micro
        with pytest.raises(ValueError, match="reach none of the attached model's trainable"):
            ant.backward(lambda xb, tb: (other(xb) - xb).pow(2).mean(1), x, t)
    assert (ant._onepass is not None) == serving  # one-pass keeps serving the fixed loss_fn
    assert all(p.grad is None or not p.grad.any() for p in attached.parameters())
    ant.backward(lambda xb, tb: (attached(xb) - xb).pow(2).mean(1), x, t)  # the right one
    assert any(p.grad.any() for p in attached.parameters())


@pytest.mark.parametrize("method", ["vanilla", "uw", "rlw"])
def test_reduce_of_another_models_loss_is_an_error(method, monkeypatch):
    """ant.reduce with a model attached: the first loss after attach is checked to reach it
    (the losses of a copy or of the EMA model gave it a zero update with no word); a loss
    without a graph (computed under no_grad) is not judged, the walk runs once, and without an
    attached model there is nothing to check."""
    import antdiff.engine.core as core

    def mlp():
        return nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4))

    attached, other = mlp(), mlp()
    ant = ANT(linear_schedule(100), k=3, method=method, model=attached)
    x, t = torch.randn(12, 4), ant.sample_timesteps(12)
    with pytest.raises(ValueError, match="per_sample_loss reaches none of the attached model"):
        ant.reduce((other(x) - x).pow(2).mean(1), t)
    with torch.no_grad():
        ant.reduce((other(x) - x).pow(2).mean(1), t)  # no graph: no verdict
    walks = []
    walk = core._reaches_model
    monkeypatch.setattr(core, "_reaches_model", lambda *a: walks.append(1) or walk(*a))
    for _ in range(2):
        ant.reduce((attached(x) - x).pow(2).mean(1), t).backward()
    assert len(walks) == 1 and all(p.grad.any() for p in attached.parameters())
    ant.attach(other)  # a new model: its first loss is checked again
    with pytest.raises(ValueError, match="per_sample_loss reaches none of the attached model"):
        ant.reduce((attached(x) - x).pow(2).mean(1), t)
    free = ANT(linear_schedule(100), k=3, method=method)
    free.reduce((other(x) - x).pow(2).mean(1), t).backward()  # no model: nothing to check


@pytest.mark.parametrize("mode", ["micro", "auto"])
def test_reentrant_checkpoint_is_not_mistaken_for_another_model(mode):
    """A reentrant checkpoint reads its layers' parameters only in the backward: the graph walk
    cannot see them there and gives no verdict rather than a false error; under auto, one-pass
    (whose hooks see no layer run with grad) hands the step to micro."""
    from torch.utils.checkpoint import checkpoint

    inner = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4))
    ant = ANT(linear_schedule(100), k=3, method="pcgrad", mode=mode, model=inner)
    x, t = torch.randn(12, 4), ant.sample_timesteps(12)

    def loss_fn(xb, tb):
        xb = xb.requires_grad_(True)
        return (checkpoint(inner, xb, use_reentrant=True) - xb).pow(2).mean(1)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ant.backward(loss_fn, x, t)
    assert all(p.grad.any() for p in inner.parameters())
    if mode == "auto":
        assert any("uses 'micro' from now on" in str(w.message) for w in caught)
    onepass = ANT(linear_schedule(100), k=3, method="pcgrad", mode="onepass", model=inner)
    with pytest.raises(ValueError, match="reentrant activation checkpoint.*mode='micro'"):
        onepass.backward(loss_fn, x, t)


def test_an_optimizer_without_the_methods_parameters_is_refused():
    """UW's log-variances left out of the optimiser never moved: UW silently became a fixed
    weighting. ant.step names the fix; an optimiser that holds them (or a method without
    parameters of its own) goes through."""
    model, ant = setup("uw")
    x = torch.randn(16, 1, 6, 6)
    t = ant.sample_timesteps(16)
    ant.reduce(per_sample_loss(model)(x, t), t).backward()
    with pytest.raises(ValueError, match=r"does not hold uw's own parameters .*ant.param_groups"):
        ant.step(torch.optim.AdamW(model.parameters()))
    ant.step(torch.optim.AdamW([{"params": model.parameters()}, *ant.param_groups()]))
    model, ant = setup("pcgrad")
    ant.backward(per_sample_loss(model), x, ant.sample_timesteps(16))
    ant.step(torch.optim.SGD(model.parameters(), lr=0.1))


@pytest.mark.parametrize("method", ["uw", "pcgrad"])
def test_step_without_a_reduce_or_backward_since_the_last_is_an_error(method):
    """ant.step before any engine step, or twice after one, would apply missing or stale
    gradients (a silent no-op or a repeated update): a RuntimeError names the fix."""
    model, ant = setup(method)
    params = [*model.parameters(), *(p for g in ant.param_groups() for p in g["params"])]
    opt = torch.optim.SGD(params, lr=0.1)
    x = torch.randn(8, 1, 6, 6)
    with pytest.raises(RuntimeError, match=r"no ant.reduce or ant.backward since the last"):
        ant.step(opt)
    t = ant.sample_timesteps(8)
    if method == "uw":
        ant.reduce(per_sample_loss(model)(x, t), t).backward()
    else:
        ant.backward(lambda b, tt: per_sample_loss(model)(b, tt), x, t)
    assert ant.step(opt) is True
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"Call ant.reduce\(per_sample_loss, t\).backward\(\)"):
        ant.step(opt)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    ant.load_state_dict(ant.state_dict())  # a loaded engine waits for its next step too
    with pytest.raises(RuntimeError, match="its state loaded"):
        ant.step(opt)


@pytest.mark.parametrize(
    ("at_backward", "at_step"), [(True, False), (False, True), (True, "other")]
)
def test_a_scaler_at_backward_and_not_at_step_is_an_error(at_backward, at_step):
    """ant.backward's scaler and ant.step's must be the same (or both absent): else the update
    is applied still scaled (by the scale, 2 ** 16 by default) or divided by a scale it never
    had. A disabled GradScaler counts as none."""
    model, ant = setup("pcgrad")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    s = torch.amp.GradScaler("cpu", init_scale=1024.0)
    other = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x = torch.randn(8, 1, 6, 6)
    t = ant.sample_timesteps(8)
    ant.backward(per_sample_loss(model), x, t, scaler=s if at_backward else None)
    given = {True: s, False: None, "other": other}[at_step]
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="pass the same scaler= to both"):
        ant.step(opt, scaler=given)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert ant.step(opt, scaler=s if at_backward else None) is True  # the matching call goes on
    off = torch.amp.GradScaler("cpu", enabled=False)
    ant.backward(per_sample_loss(model), x, t, scaler=off)
    assert ant.step(opt) is True


@pytest.mark.parametrize("mode", ["onepass", "micro", "retain_graph"])
def test_a_loss_without_grad_is_named_in_every_mode(mode):
    """A detached loss, or ant.backward under torch.no_grad, gives the engine's message in
    every mode (micro and retain_graph gave torch's 'element 0 of tensors ...'); micro names a
    wrongly shaped loss as one cluster's sub-batch."""
    model, ant = setup("pcgrad", mode=mode)
    x = torch.randn(16, 1, 6, 6)
    t = ant.sample_timesteps(16)
    with pytest.raises(ValueError, match="does not require grad"):
        ant.backward(lambda xb, tb: per_sample_loss(model)(xb, tb).detach(), x, t)
    with torch.no_grad(), pytest.raises(ValueError, match="does not require grad"):
        ant.backward(per_sample_loss(model), x, t)
    if mode == "micro":
        with pytest.raises(ValueError, match="one cluster's sub-batch of 4 samples"):
            ant.backward(lambda xb, tb: per_sample_loss(model)(xb, tb)[:, None], x, t)


@pytest.mark.parametrize("mode", ["onepass", "micro", "retain_graph"])
def test_channels_last_parameters_get_gradients_in_their_layout(mode):
    """A channels_last model's .grad views are laid out like its parameters (autograd's layout
    contract): the values equal the contiguous model's, and a fused AdamW step (which reads
    parameter and gradient element by element in memory) equals the unfused one. With
    contiguous views the fused step moved the weights by up to 2 lr wrongly."""
    x = torch.randn(12, 1, 6, 6)
    ref_model, ref_ant = setup("pcgrad", mode=mode)
    t = ref_ant.sample_timesteps(12)
    ref_ant.backward(per_sample_loss(ref_model), x, t)
    ref = {n: p.grad.clone() for n, p in ref_model.named_parameters()}
    results = []
    for fused in (False, True):
        torch.manual_seed(0)
        model = TinyNet().to(memory_format=torch.channels_last)
        ant = ANT(linear_schedule(T), k=4, method="pcgrad", model=model, seed=0, mode=mode)
        assert not model.out.weight.is_contiguous()
        ant.sample_timesteps(12)  # the same draw as the reference's
        ant.backward(per_sample_loss(model), x, t)
        for n, p in model.named_parameters():
            real = [d for d in range(p.dim()) if p.shape[d] > 1]  # size-1 strides are free
            assert [p.grad.stride(d) for d in real] == [p.stride(d) for d in real], n
            torch.testing.assert_close(p.grad, ref[n], rtol=1e-5, atol=1e-6)
        opt = torch.optim.AdamW(model.parameters(), lr=0.01, fused=fused)
        assert ant.step(opt) is True
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_param_view_follows_the_memory_order():
    from antdiff.engine.buffer import dense_layout, param_view

    J = torch.arange(2 * 40, dtype=torch.float32).view(2, 40)
    p = torch.empty(2, 3, 2, 2).to(memory_format=torch.channels_last)
    v = param_view(J, 5, p)
    assert v.shape == (2, *p.shape) and v.stride()[1:] == p.stride()
    # element (c=1, h=0, w=1) of output channel 0 sits at memory position (h, w, c) = 1 * 3 + 1
    assert v[1, 0, 1, 0, 1] == J[1, 5 + 4]
    assert param_view(J[0], 0, torch.empty(3, 4)).is_contiguous()
    assert dense_layout(torch.empty(4, 5).t()) and not dense_layout(torch.empty(4, 5)[:, ::2])
    assert param_view(J[0], 0, torch.empty(4, 5)[:, ::2]).is_contiguous()  # no dense order


@pytest.mark.parametrize("mode", ["onepass", "micro", "retain_graph"])
def test_trainable_tensors_outside_the_model_are_refused_by_gradient_methods(mode):
    """J holds the attached model's per-cluster gradients; a trainable tensor that loss_fn uses
    besides would get the unweighted sum over the clusters (MGDA's weights ignored), and
    accumulate across steps. The first step names it; a detached one trains as usual."""
    model, ant = setup("mgda", mode=mode)
    extra = nn.Parameter(torch.tensor(1.0))
    x = torch.randn(12, 1, 6, 6)
    t = ant.sample_timesteps(12)

    def loss_fn(xb, tb):
        return per_sample_loss(model)(xb, tb) * extra

    with pytest.raises(ValueError, match=r"outside the attached model \(a float32 tensor of "
                       r"shape \[\]\)"):  # fmt: skip
        ant.backward(loss_fn, x, t)
    assert extra.grad is None
    extra.requires_grad_(False)
    out = ant.backward(loss_fn, x, t)
    assert bool(out.finite) and model.out.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("method", ["dwa", "famo", "rlw"])
def test_accumulated_micro_batches_are_observed_only_once_the_step_passes(method):
    """Gradient accumulation (reduce + backward per micro-batch, one ant.step): a micro-batch
    with finite losses and NaN gradients makes the step skip, and none of its micro-batches
    reaches the method's state (the second reduce observed the first on its losses alone)."""
    model, ant = setup(method)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(16, 1, 6, 6)

    def micro(poison: bool):
        t = ant.sample_timesteps(8)
        per = per_sample_loss(model)(x[:8], t)
        if poison:  # sqrt'(0) = inf times a zero factor: a NaN gradient, a finite loss
            per = per + torch.sqrt(model.out.bias.sum() * 0.0)
        ant.reduce(per, t).backward()

    def flat(v):  # tensors and the nested dicts of RLW's stream state
        if isinstance(v, dict):
            return [x for key in sorted(v) for x in flat(v[key])]
        return [v.clone() if isinstance(v, torch.Tensor) else torch.tensor(v)]

    def state():
        return flat(ant.method.loss.state_dict())

    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        micro(False), micro(False)
        assert ant.step(opt) is True
    before = state()
    opt.zero_grad(set_to_none=True)
    micro(True), micro(False)
    with pytest.warns(UserWarning, match="non-finite"):
        assert ant.step(opt) is False
    assert all(torch.equal(a, b) for a, b in zip(state(), before))
    opt.zero_grad(set_to_none=True)
    micro(False), micro(False)
    assert ant.step(opt) is True
    assert any(not torch.equal(a, b) for a, b in zip(state(), before))


@pytest.mark.parametrize("method", ["dwa", "famo"])
def test_accumulated_micro_batches_are_one_observation_per_optimiser_step(method):
    """4 micro-batches per ant.step: FAMO took 4 Adam steps of its logits per optimiser step
    (mostly comparing micro-batches under the same weights) and DWA counted 4 steps; they now
    observe each cluster's mean over the micro-batches once per step."""
    model, ant = setup(method)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 1, 6, 6)
    seen = []
    real = ant.method.loss.observe
    ant.method.loss.observe = lambda L, present: seen.append((L.clone(), present.clone())) or \
        real(L, present)  # fmt: skip
    for _ in range(2):  # until its first ant.step the engine cannot tell accumulation apart
        # from a trainer that never calls it (each reduce then observes the one before)
        t = ant.sample_timesteps(8)
        ant.reduce(per_sample_loss(model)(x, t), t).backward()
    ant.step(opt)
    seen.clear()
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        parts = []
        for _ in range(4):
            t = ant.sample_timesteps(8)
            ant.reduce(per_sample_loss(model)(x, t), t).div(4).backward()
            parts.append((ant.last.cluster_losses.clone(), ant.last.present.clone()))
        assert ant.step(opt) is True
        L, present = seen[-1]
        want = torch.stack([torch.where(p, c, 0.0) for c, p in parts]).sum(0) / torch.stack(
            [p.float() for _, p in parts]).sum(0).clamp(min=1)  # fmt: skip
        assert torch.equal(present, torch.stack([p for _, p in parts]).any(0))
        torch.testing.assert_close(L, torch.where(present, want, 0.0))
    assert len(seen) == 3


def test_backward_again_without_step_warns_that_it_replaces():
    """backward, backward, step (the usual way to accumulate) trained on the last micro-batch
    alone, silently."""
    model, ant = setup("pcgrad")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 1, 6, 6)
    loss = per_sample_loss(model)
    for _ in range(2):  # backward + step: no warning
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ant.backward(loss, x, ant.sample_timesteps(8))
        ant.step(opt)
    ant.backward(loss, x, ant.sample_timesteps(8))
    with pytest.warns(UserWarning, match="replaced, not accumulated"):
        ant.backward(loss, x, ant.sample_timesteps(8))


@pytest.mark.parametrize("read", [True, False])
def test_a_resume_after_a_nonfinite_recompute_redoes_it_as_an_unbroken_run(read):
    """update_every > 1: a non-finite weight recompute whose verdict ant.step read is redone at
    the next backward; a checkpoint taken right after it carries that (the resumed run took
    off-steps with the fallback weights until the next scheduled recompute). Without the read
    (CPU, no ant.step) neither run redoes it."""
    x = torch.randn(16, 1, 6, 6, generator=torch.Generator().manual_seed(3))
    t2 = torch.randint(0, T, (16,), generator=torch.Generator().manual_seed(4))
    runs = []
    for resume in (False, True):
        model, ant = setup("mgda", update_every=4)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)  # the weights alone are compared
        ant.backward(_nan_loss(model), x, ant.sample_timesteps(16))
        if read:
            with pytest.warns(UserWarning, match="non-finite"):
                assert ant.step(opt) is False
        if resume:
            state = ant.state_dict()
            assert state["redo_weights"] is read
            model2, ant = setup("mgda", update_every=4)
            model2.load_state_dict(model.state_dict())
            model = model2
            ant.load_state_dict(state)
        runs.append(ant.backward(per_sample_loss(model), x, t2).weights.clone())
    torch.testing.assert_close(runs[1], runs[0])
    fallback = torch.allclose(runs[0], torch.full((4,), 0.25))
    assert fallback is not read  # recomputed after the read, the fallback without it


@pytest.mark.parametrize("mode", ["micro", "onepass"])
@pytest.mark.parametrize("method", ["imtl", "nash", "pcgrad", "mgda"])
def test_autocast_around_backward_leaves_the_gram_and_combine_in_float32(mode, method):
    """A trainer's autocast around ant.backward (not only inside loss_fn) made the Gram and
    the combine bf16 matmuls: weights and .grad moved by ~1e-3 (an fp16 Gram overflowed at a
    GradScaler's scale). The update must equal the one with autocast inside loss_fn alone."""
    got = []
    for outer in (False, True):
        torch.manual_seed(0)
        model = TinyNet()
        ant = ANT(linear_schedule(T), k=5, method=method, mode=mode, model=model)
        x, t = torch.randn(20, 1, 6, 6), ant.sample_timesteps(20)
        inner = per_sample_loss(model)

        def fn(xb, tb, inner=inner):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return inner(xb, tb).float()

        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=outer):
            ant.backward(fn, x, t)
        got.append((flat_grad(model), ant.last.weights))
    assert torch.equal(got[0][0], got[1][0])
    assert torch.equal(got[0][1], got[1][1])


def _tiny_setup(method="pcgrad", mode="auto", B=10):
    torch.manual_seed(0)
    model = TinyNet()
    ant = ANT(linear_schedule(T), k=5, method=method, mode=mode, model=model)
    return model, ant, torch.randn(B, 1, 6, 6)


@pytest.mark.parametrize("mode", ["onepass", "micro"])
@pytest.mark.parametrize("as_list", [list, tuple])
def test_a_list_of_per_sample_numbers_in_the_batch_is_refused(mode, as_list):
    """list(labels) passed in the batch stayed in its order while the tensors were sorted by
    cluster (t not from sample_timesteps): every sample was paired with another's label."""
    model, ant, x = _tiny_setup(mode=mode)
    t = torch.randint(0, T, (10,))
    labels = as_list(torch.arange(10.0))
    with pytest.raises(TypeError, match=r"batch\[1\] is a .* of B=10 numbers.*torch.tensor"):
        ant.backward(lambda b, tb: per_sample_loss(model)(b[0], tb), (x, labels), t)
    # a short list of settings is not per sample: it passes through, also where B equals its
    # length (a smoke run with B = 3 and an RGB mean)
    ant.backward(lambda b, tb: per_sample_loss(model)(b[0], tb), (x, [0.5, 2.0]), t)
    ant.backward(lambda b, tb: per_sample_loss(model)(b[0], tb), (x[:3], [0.5, 0.4, 0.4]), t[:3])


@pytest.mark.parametrize("batch", [None, [1, 2], torch.tensor(3.0)])
def test_a_batch_without_a_batch_tensor_is_refused(batch):
    """A loss_fn reading x from its closure got timesteps sorted by cluster, x unsorted."""
    model, ant, x = _tiny_setup(mode="onepass")
    t = torch.randint(0, T, (10,))
    with pytest.raises(ValueError, match="the batch holds no tensor with a batch dimension"):
        ant.backward(lambda _, tb: per_sample_loss(model)(x, tb), batch, t)


def test_micro_length_mismatch_names_the_sub_batch():
    model, ant, x = _tiny_setup(mode="micro")
    t = ant.sample_timesteps(10)
    with pytest.raises(ValueError, match=r"entries but there are \d+ timesteps \(loss_fn on one "):
        ant.backward(lambda b, tb: per_sample_loss(model)(b, tb)[1:], x, t)


@pytest.mark.parametrize("method", ["uw", "vanilla", "dwa"])
def test_reduce_refuses_a_loss_without_graph_while_grad_is_enabled(method):
    """UW trained only its own s on detached losses (the model never moved), silently."""
    model, ant, x = _tiny_setup(method=method)
    t = ant.sample_timesteps(10)
    with torch.no_grad():
        per = per_sample_loss(model)(x, t)
        ant.reduce(per, t)  # evaluation under no_grad: accepted
    with pytest.raises(ValueError, match="per_sample_loss does not require grad"):
        ant.reduce(per, t)


def test_reduce_names_a_scalar_t_and_t_on_another_device():
    ant = ANT(linear_schedule(T), k=5, method="uw")
    with pytest.raises(ValueError, match="t must be a 1-D integer tensor"):
        ant.reduce(torch.randn(1, requires_grad=True), torch.tensor(5))
    with pytest.raises(ValueError, match="t is on meta but the per-sample loss on cpu"):
        t = torch.zeros(4, dtype=torch.long, device="meta")
        ant.reduce(torch.randn(4, requires_grad=True), t)


def test_step_refuses_an_optimizer_of_none_of_the_models_parameters():
    model, ant, x = _tiny_setup(method="pcgrad")
    other = TinyNet()
    t = ant.sample_timesteps(10)
    ant.backward(per_sample_loss(model), x, t)
    with pytest.raises(ValueError, match="holds none of the attached model's trainable"):
        ant.step(torch.optim.SGD(other.parameters(), lr=0.1))
    with pytest.raises(TypeError, match="ant.step needs the optimizer"):
        ant.step(model)
    # an optimiser of part of the model (one of several) is accepted
    ant.step(torch.optim.SGD(model.out.parameters(), lr=0.1))
    # UW's log-variances in an optimiser of their own, beside the model's: accepted
    uw_model, uw, _ = _tiny_setup(method="uw")
    uw.reduce(per_sample_loss(uw_model)(x, t), t).backward()
    assert uw.step(torch.optim.Adam(uw.param_groups()))


def test_constructor_names_wrong_types_and_accepts_numpy_numbers():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        ANT(linear_schedule(T), k=5, method="pcgrad", model="net")
    with pytest.raises(TypeError, match="method_kwargs must be a dict"):
        ANT(linear_schedule(T), k=5, method="nash", method_kwargs=[("iters", 5)])
    with pytest.raises(ValueError, match="update_every is given twice"):
        ANT(linear_schedule(T), k=5, method="nash", update_every=2,
            method_kwargs={"update_every": 7})  # fmt: skip
    ant = ANT(linear_schedule(T), k=np.int64(5), method="nash", update_every=np.int64(3),
              method_kwargs={"iters": np.int64(50)})  # fmt: skip
    assert (ant.method.grad.update_every, ant.method.grad.iters) == (3, 50)
    assert type(ant.method.grad.update_every) is int
    famo = ANT(linear_schedule(T), k=5, method="famo", method_kwargs={"lr": np.float32(0.5)})
    assert famo.method.loss.lr == 0.5
    with pytest.raises(ValueError, match="update_every must be an integer >= 1, got True"):
        ANT(linear_schedule(T), k=5, method="nash", update_every=True)


def test_batchnorm_message_names_the_layers():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    with pytest.raises(ValueError, match=r"BatchNorm layers in training mode \('1'\), which"):
        ANT(linear_schedule(T), k=5, method="pcgrad", model=model)


@pytest.mark.parametrize("mode", ["onepass", "micro"])
def test_a_batchnorm_in_eval_mode_is_served_until_it_trains(mode):
    """A frozen BatchNorm in eval mode (a pretrained part) couples no samples: it was refused
    like a training one. One put back in training mode is refused at the next backward."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    model[1].eval().requires_grad_(False)
    ant = ANT(linear_schedule(T), k=5, method="pcgrad", mode=mode, model=model)

    def fn(x, t):
        return (model(x)[:, 0] - t.float() / T) ** 2

    x = torch.randn(20, 3)
    t = ant.sample_timesteps(20)
    ant.backward(fn, x, t)
    got = flat_grad_of([model[0], model[2]])
    ref = ANT(linear_schedule(T), k=5, method="pcgrad", mode="retain_graph", model=model)
    ref.backward(fn, x, t)
    torch.testing.assert_close(got, flat_grad_of([model[0], model[2]]), rtol=1e-5, atol=1e-7)
    model[1].train()
    with pytest.raises(ValueError, match="BatchNorm layers in training mode"):
        ant.backward(fn, x, t)
    # a refused attach leaves the engine on its model: the rejected one's layers are not checked
    model[1].eval()
    with pytest.raises(ValueError, match="BatchNorm layers in training mode"):
        ant.attach(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)))
    ant.backward(fn, x, t)


def flat_grad_of(mods):
    return torch.cat([p.grad.reshape(-1) for m in mods for p in m.parameters()]).clone()


def test_a_compiled_model_is_served_by_micro_under_auto():
    """torch.compile's wrapper got the one-pass hooks (a graph break at every served layer),
    also for an explicit mode='onepass'."""
    torch.manual_seed(0)
    model = TinyNet()
    compiled = torch.compile(model, backend="eager")  # no code generation: fast on the CPU
    ant = ANT(linear_schedule(T), k=5, method="pcgrad", model=compiled)
    assert ant._onepass is None
    x = torch.randn(10, 1, 6, 6)
    t = ant.sample_timesteps(10)
    ant.backward(per_sample_loss(compiled), x, t)
    got = flat_grad(model).clone()
    ANT(linear_schedule(T), k=5, method="pcgrad", mode="micro", model=model).backward(
        per_sample_loss(model), x, t
    )
    torch.testing.assert_close(got, flat_grad(model))
    with pytest.raises(ValueError, match="torch.compile'd model"):
        ANT(linear_schedule(T), k=5, method="pcgrad", mode="onepass", model=compiled)


def test_a_compiled_loss_fn_is_served_by_micro_under_auto():
    """A torch.compile'd loss_fn over the plain model got the one-pass hooks: dynamo met them,
    skipped the function and ran it eagerly (exact, never compiled), without a word."""
    torch.manual_seed(0)
    model = TinyNet()
    x = torch.randn(10, 1, 6, 6)
    ant = ANT(linear_schedule(T), k=5, method="pcgrad", model=model)
    assert ant._onepass is not None
    t = ant.sample_timesteps(10)
    loss_fn = torch.compile(per_sample_loss(model), backend="eager")
    with pytest.warns(UserWarning, match="torch.compile'd loss_fn.*uses 'micro' from now on"):
        ant.backward(loss_fn, x, t)
    assert ant._onepass is None
    got = flat_grad(model).clone()
    ANT(linear_schedule(T), k=5, method="pcgrad", mode="micro", model=model).backward(
        per_sample_loss(model), x, t
    )
    torch.testing.assert_close(got, flat_grad(model))
    one = ANT(linear_schedule(T), k=5, method="pcgrad", mode="onepass", model=model)
    with pytest.raises(ValueError, match="torch.compile'd loss_fn"):
        one.backward(loss_fn, x, one.sample_timesteps(10))


def test_sorting_the_batch_by_cluster_warns_once():
    """A per-sample tensor that loss_fn takes from its closure keeps its order when the engine
    sorts the batch (t not from sample_timesteps): silently misaligned in one-pass."""
    model, ant, x = _tiny_setup(mode="onepass")
    t = torch.tensor([95, 3, 50, 20, 70, 1, 88, 40, 10, 60])  # not in cluster order
    with pytest.warns(UserWarning, match="sorts the batch by cluster"):
        ant.backward(per_sample_loss(model), x, t)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ant.backward(per_sample_loss(model), x, t)  # once
        sorted_t, _ = torch.sort(torch.arange(10) * 97 % T)
        ANT(linear_schedule(T), k=5, method="pcgrad", model=model).backward(
            per_sample_loss(model), x, sorted_t
        )  # already in cluster order: nothing moves, no warning


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [("w", torch.ones(3), r"w must be a float tensor \[k=5\]"),
     ("w_present", torch.ones(5), r"w_present must be a bool tensor \[k=5\]"),
     ("step", "abc", "the state's step must be an integer >= 0"),
     ("step", -4, "the state's step must be an integer >= 0"),
     # an AttributeError, a KeyError and a TypeError from the parts' own loads before
     ("sampler", None, "the state's sampler must be a dict, got None"),
     ("telemetry", {}, r"damaged or not of this engine \(KeyError"),
     ("grad_method", None, r"damaged or not of this engine \(TypeError")],
)  # fmt: skip
def test_load_state_dict_refuses_damaged_weights_and_step(key, value, match):
    """A w of shape [3] in a k = 5 state loaded and failed at the next off-step with a size
    mismatch; a step of 'abc' raised int()'s message. The engine keeps its state."""
    model, ant, x = _tiny_setup(method="nash")
    ant.backward(per_sample_loss(model), x, ant.sample_timesteps(10))
    state = ant.state_dict()
    before = copy.deepcopy(state)
    bad = {**state, key: value}
    with pytest.raises(ValueError, match=match):
        ant.load_state_dict(bad)
    assert torch.equal(ant.state_dict()["w"], before["w"]) and ant.step_count == before["step"]


@pytest.mark.parametrize("fused", [False, True])
def test_famo_names_losses_below_its_min_loss_on_a_skipped_step(fused):
    """Finite cluster losses below FAMO's min_loss make log(L - min_loss) NaN: every step was
    skipped as 'non-finite cluster losses or gradients', with no hint of min_loss."""
    model, ant, x = _tiny_setup(method="famo")
    opt = torch.optim.AdamW([{"params": model.parameters()}, *ant.param_groups()], fused=fused)
    t = ant.sample_timesteps(10)
    per = per_sample_loss(model)(x, t) - 10.0  # finite, below min_loss = 0
    ant.reduce(per, t).backward()
    with pytest.warns(UserWarning, match=r"below FAMO's min_loss=0.*'min_loss'"):
        ant.step(opt)
        ant.stats()  # the fused optimiser's skip is reported once its flag is read
    # a NaN loss is no min_loss problem: the plain message
    ant.reduce(per_sample_loss(model)(x, t) * float("nan"), t).backward()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        ant.step(opt)
        ant.stats()
    msgs = [str(w.message) for w in seen if "non-finite" in str(w.message)]
    assert msgs and not any("min_loss" in m for m in msgs)


def test_an_engine_resumed_between_folds_logs_the_running_means_of_an_unbroken_run():
    """The load counted the unsolved steps by folding the loaded ones: the running means of a
    resumed engine differed from an unbroken run's by an ulp."""
    def run(split):
        torch.manual_seed(0)
        model = TinyNet()
        ant = ANT(linear_schedule(T), k=5, method="uw", model=model, seed=3)
        opt = torch.optim.SGD([{"params": model.parameters()}, *ant.param_groups()], lr=0.01)
        x = torch.randn(10, 1, 6, 6)
        for i in range(40):
            if i == split:
                state = copy.deepcopy(ant.state_dict())
                ant = ANT(linear_schedule(T), k=5, method="uw", model=model, seed=3)
                ant.load_state_dict(state)
                opt.param_groups[1]["params"] = list(ant.param_groups()[0]["params"])
                opt.state.clear()
            t = ant.sample_timesteps(10)
            ant.reduce(per_sample_loss(model)(x, t), t).backward()
            ant.step(opt)
            opt.zero_grad()
        return ant.stats()

    ref = run(None)
    got = run(5)
    assert got["loss_mean"] == ref["loss_mean"]


@pytest.mark.parametrize("case", ["grads", "fold_between", "unchecked", "unchecked_first"])
def test_a_skipped_accumulated_step_leaves_the_telemetry_whole(case):
    """reduce + reduce + ant.step that skips: both micro-batches are skipped (the loss method's
    observe dropped both), so both leave the running losses and both count as non-finite; only
    the last one did. Skipped for its gradients (also with a fold between the micro-batches)
    or, with check_grads=False, for a micro-batch's own losses (the first one's too: its NaN
    gradients were applied)."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    ant = ANT("linear", k=2, clustering="timestep", method="uw", model=model)
    opt = torch.optim.SGD([{"params": list(model.parameters())}, *ant.param_groups()], lr=0.0)
    bad = [False]
    model.weight.register_hook(lambda g: g * float("inf") if bad[0] else g)

    def micro(value):
        t = ant.sample_timesteps(4)
        ant.reduce(model(torch.ones(4, 3)).squeeze(1) * 0 + value, t).backward()

    opt.zero_grad()
    micro(1.0)
    micro(1.0)
    assert ant.step(opt)
    opt.zero_grad()
    micro(float("nan") if case == "unchecked_first" else 100.0)
    if case == "fold_between":
        ant.stats()  # folds the first micro-batch into the running sums
    if case == "unchecked":
        micro(float("nan"))
    elif case == "unchecked_first":
        micro(100.0)
    else:
        bad[0] = True
        micro(100.0)
        bad[0] = False
    with pytest.warns(UserWarning, match="non-finite"):
        assert not ant.step(opt, check_grads=not case.startswith("unchecked"))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    st = ant.stats()
    assert st["loss_mean"] == [1.0, 1.0] and st["nonfinite_steps"] == 2 and st["steps"] == 4


class _Holder(nn.Module):
    """A model whose child is named ``module`` (no DDP wrapper) beside a layer of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.module = TinyNet()
        self.head = nn.Conv2d(1, 1, 1)

    def forward(self, x, t):
        return self.head(self.module(x, t))


@pytest.mark.parametrize("mode", ["micro", "onepass"])
def test_a_child_named_module_is_part_of_the_model(mode):
    """The engine took any attribute ``module`` for a DDP wrapper's model: J covered that child
    only, and the head got the unweighted sum of the cluster gradients (4x PCGrad's 1/4)."""
    torch.manual_seed(0)
    model = _Holder()
    ant = ANT(linear_schedule(T), k=4, method="pcgrad", model=model, mode=mode)
    x = torch.randn(16, 1, 6, 6)
    t = ant.sample_timesteps(16)
    J_ref, _ = explicit_J(model, x, t, ant.clusters, ant.k)
    out = ant.backward(per_sample_loss(model), x, t)
    assert ant.mode == mode
    torch.testing.assert_close(flat_grad(model).double(), out.weights.double() @ J_ref,
                               rtol=1e-5, atol=1e-6)  # fmt: skip


class _Accumulating(torch.optim.SGD):
    """An optimiser that says it is accumulating, as accelerate's does inside
    ``accelerator.accumulate`` (its step is then a no-op)."""

    def __init__(self, params, sync_every: int) -> None:
        super().__init__(params, lr=0.1)
        self.calls, self.sync_every = 0, sync_every
        self.gradient_state = type("State", (), {"sync_gradients": False})()

    def step(self, closure=None):
        self.calls += 1
        if self.gradient_state.sync_gradients:
            return super().step(closure)
        return None


def test_accumulating_optimizer_micro_steps():
    """Under accelerate's accumulate, ant.step runs on every micro-batch. A gradient method
    dropped all but the last micro-batch without a word: refused unless ant.backward was told
    to accumulate (test_accumulate.py). A loss method observed (and judged) each micro-batch as
    a step of its own: the syncing call now does it for all."""
    torch.manual_seed(0)
    model, ant = setup("pcgrad")
    opt = _Accumulating(model.parameters(), 2)
    x = torch.randn(16, 1, 6, 6)
    ant.backward(per_sample_loss(model), x, ant.sample_timesteps(16))
    with pytest.raises(ValueError, match="sync_gradients=False.*accumulate=not accelerator"):
        ant.step(opt)
    model, ant = setup("uw")  # a loss method trained through ant.backward replaces them too
    opt = _Accumulating(model.parameters(), 2)
    ant.backward(per_sample_loss(model), x, ant.sample_timesteps(16))
    with pytest.raises(ValueError, match="sync_gradients=False.*accumulate=not accelerator"):
        ant.step(opt)
    runs = []
    for accumulate in (False, True):
        model, ant = setup("dwa")
        opt = _Accumulating(model.parameters(), 2)
        xs = [torch.randn(8, 1, 6, 6, generator=torch.Generator().manual_seed(i))
              for i in range(4)]  # fmt: skip
        for i, xb in enumerate(xs):
            t = ant.sample_timesteps(8)
            ant.reduce(per_sample_loss(model)(xb, t), t).backward()
            sync = not accumulate or i % 2 == 1
            opt.gradient_state.sync_gradients = sync
            assert ant.step(opt)
            if sync:
                opt.zero_grad()
        runs.append(ant)
    assert runs[0].stats()["steps"] == runs[1].stats()["steps"] == 4
    # two optimiser steps of two micro-batches each: DWA observed two steps, not four
    seen = [int(a.method.loss.state_dict()["seen"]) for a in runs]
    assert seen == [4, 2], seen


def test_skip_warnings_leave_no_registry_entry_per_step():
    """Each skipped step's warning names its step, so each was a new entry in the caller's
    __warningregistry__, kept for the whole run. They are shown as before, and kept nowhere."""
    model, ant = setup("uw")
    opt = torch.optim.SGD([{"params": model.parameters()}, *ant.param_groups()], lr=0.05)
    x = torch.randn(16, 1, 6, 6)
    registry = globals().setdefault("__warningregistry__", {})
    registry.clear()
    shown = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for _ in range(5):
            opt.zero_grad(set_to_none=True)
            t = ant.sample_timesteps(16)
            ant.reduce(per_sample_loss(model)(x, t) * float("nan"), t).backward()
            assert not ant.step(opt)
        shown = [str(w.message) for w in caught if "non-finite" in str(w.message)]
        assert caught[0].filename == __file__  # still reported at the caller's line
    assert len(shown) == 5 and len(set(shown)) == 5
    assert not [k for k in registry if k != "version"]


def test_a_unique_warning_from_a_shallow_stack():
    """sys._getframe(stacklevel) raised where the stack was shorter (ant.step called from a
    thread's entry function), so the skip path stopped before zero_grad and the back-off."""
    from antdiff.engine import core

    with pytest.warns(UserWarning, match="shallow"):
        core._warn_unique("shallow", stacklevel=500)


def test_a_unique_warning_from_python_c():
    """Under ``python -c`` the caller's globals are __main__'s, whose loader has no source:
    passing them to warn_explicit made linecache raise ImportError, so a skipped step crashed
    a script given on the command line."""
    code = ("from antdiff.engine import core\n"
            "def step():\n    core._warn_unique('skipped', stacklevel=2)\n"
            "step()\nprint('went on')")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert out.returncode == 0 and "went on" in out.stdout, out.stderr
    assert "UserWarning: skipped" in out.stderr


@pytest.mark.parametrize("method", ["pcgrad", "nash", "uw+nash"])
def test_a_gradient_steps_cluster_losses_are_the_per_cluster_means(method):
    """ant.last.cluster_losses of ant.backward (telemetry, the step's losses, and what a loss
    method before a gradient method trains on: UW's s in uw+nash) was never compared with the
    per-cluster means: a wrong divisor passed every test."""
    model, ant = setup(method)
    x = torch.randn(13, 1, 6, 6, generator=torch.Generator().manual_seed(3))
    t = ant.sample_timesteps(13)
    per = per_sample_loss(model)(x, t).detach().float()
    ant.backward(per_sample_loss(model), x, t)
    cid = ant.clusters.cluster_of(t)
    n = torch.bincount(cid, minlength=ant.k).float()
    assert len(set(n.tolist())) > 1  # unequal counts: a wrong divisor shows
    want = torch.zeros(ant.k).index_add(0, cid, per) / n.clamp(min=1)
    torch.testing.assert_close(ant.last.cluster_losses, want)


def test_batch_helpers_keep_zero_dim_tensors_whole():
    """A 0-d tensor in the batch (a shared scalar) has no batch dimension: checking, slicing
    and gathering the batch leave it as it is."""
    from antdiff.engine.batch import check_batch, slice_batch, take_batch

    s = torch.tensor(0.5)
    b = {"x": torch.arange(6.0).view(6, 1), "s": s}
    check_batch(b, 6)
    assert slice_batch(b, 1, 3)["s"] is s and slice_batch(b, 1, 3)["x"].shape[0] == 2
    assert take_batch(b, torch.tensor([4, 0]))["s"] is s


def test_a_rank_slice_is_not_a_whole_draw():
    """local_slice remembers the slice's counts but marks it sliced: ``whole_draw`` (which
    turns on per-rank draws in the engine) must be False for it and True for the draw."""
    from antdiff.clustering import cluster_timesteps
    from antdiff.engine.timesteps import TimestepSampler
    from antdiff.schedules import linear_schedule

    s = TimestepSampler(cluster_timesteps(linear_schedule(100), 4, "snr"), "proportional", seed=0)
    t, counts = s.sample(16)
    assert s.whole_draw(t)
    local = s.local_slice(t, 0, 8)
    assert s.counts_for(local) is not None
    assert not s.whole_draw(local)


def test_engine_shard_tiles_a_batch_not_divisible_by_the_world(monkeypatch):
    """ant.shard: rank r of W gets rows [r B // W, (r + 1) B // W), so the ranks' slices cover
    every row also when W does not divide B (B=10, W=3: 3, 3, 4 rows)."""
    import torch.distributed as tdist

    from antdiff import ANT
    from antdiff.schedules import linear_schedule

    B, W = 10, 3  # noqa: N806
    ant = ANT(linear_schedule(100), k=4, method="vanilla", seed=0)
    ant.comm.active, ant.comm.world = True, W  # as under a group of 3 processes
    t = ant.sample_timesteps(B)
    x = torch.arange(B * 2).reshape(B, 2)
    got_t, got_x = [], []
    for r in range(W):
        monkeypatch.setattr(tdist, "get_rank", lambda group=None, r=r: r)
        ant.sampler.remember(t, ant.sampler.last[1], ant.sampler.last[3])  # every rank's draw
        lx, lt = ant.shard(x, t)
        assert lt.shape[0] == lx.shape[0] == (r + 1) * B // W - r * B // W
        got_t.append(lt)
        got_x.append(lx)
    assert torch.equal(torch.cat(got_t), t) and torch.equal(torch.cat(got_x), x)


class _SkipNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(6, 16)
        self.emb = torch.nn.Embedding(100, 16)
        self.out = torch.nn.Linear(16, 6)

    def forward(self, x, t):
        return self.out(torch.tanh(self.inp(x) + self.emb(t)))


def test_a_host_skipped_step_clears_the_gradients():
    """A non-finite step skipped on the host (non-fused Adam): ant.step returns False and
    leaves no NaN gradients behind (zero_grad(set_to_none)), so a loop that accumulates into
    .grad recovers at the next step."""
    from antdiff import ANT
    from antdiff.schedules import linear_schedule

    torch.manual_seed(0)
    net = _SkipNet()
    ant = ANT(linear_schedule(100), k=4, method="vanilla", model=net, seed=0)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    x = torch.randn(16, 6)
    t = ant.sample_timesteps(16)
    ant.reduce(((net(x, t) - x) ** 2).mean(1) * float("nan"), t).backward()
    with pytest.warns(UserWarning, match="non-finite"):
        assert ant.step(opt) is False
    assert all(p.grad is None for p in net.parameters())


def test_load_state_dict_refuses_other_clusters():
    """A state of an engine with other cluster bounds (same k, method and sampler) is refused
    before anything is assigned."""
    from antdiff import ANT
    from antdiff.schedules import linear_schedule

    a = ANT(linear_schedule(100), k=4, method="vanilla", clustering="snr", seed=0)
    b = ANT(linear_schedule(100), k=4, method="vanilla", clustering="timestep", seed=0)
    assert list(a.clusters.bounds) != list(b.clusters.bounds)
    with pytest.raises(ValueError, match="checkpoint clusters"):
        b.load_state_dict(a.state_dict())


def test_load_state_dict_names_another_method():
    """A state of another gradient method is refused with the method named (pcgrad's state
    into an MGDA engine would otherwise load)."""
    from antdiff import ANT
    from antdiff.schedules import linear_schedule

    a = ANT(linear_schedule(100), k=4, method="pcgrad", seed=0)
    b = ANT(linear_schedule(100), k=4, method="mgda", seed=0)
    with pytest.raises(ValueError, match="trained with method 'pcgrad'"):
        b.load_state_dict(a.state_dict())


def test_ant_takes_a_clusters_file_and_shows_mode_unused_for_loss_methods(tmp_path):
    want = ANT(linear_schedule(T), k=4, clustering="timestep").clusters
    path = tmp_path / "c.json"
    path.write_text(want.to_json())
    for p in (path, str(path)):
        assert ANT(linear_schedule(T), clustering=p).clusters.bounds == want.bounds
    with pytest.raises(ValueError, match=f"k=3 but the clusters in {path} have k=4"):
        ANT(linear_schedule(T), k=3, clustering=path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ANT(linear_schedule(T), clustering=str(tmp_path / "none.json"))
    # the mode is the gradient methods' choice; a loss-space method says it does not use it
    assert "(unused: a loss-space method)" in repr(ANT(linear_schedule(T), k=4, method="uw"))
    assert "unused" not in repr(ANT(linear_schedule(T), k=4, method="pcgrad"))


@pytest.mark.parametrize("holds", [False, True])
def test_uw_parameters_outside_the_optimiser_are_warned_of(holds):
    """A loop that steps with optimizer.step() (not ant.step, which refuses it) and an
    optimiser without ant.param_groups(): UW's log-variances never move and their gradient
    piles up. The second reduce (the model's gradient cleared, UW's not) warns."""
    torch.manual_seed(0)
    model = TinyNet()
    ant = ANT(linear_schedule(T), k=4, method="uw", model=model, seed=0)
    groups = [{"params": model.parameters()}, *(ant.param_groups() if holds else [])]
    opt = torch.optim.SGD(groups, lr=0.01)
    x = torch.randn(8, 1, 6, 6)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(3):
            opt.zero_grad()
            t = ant.sample_timesteps(8)
            ant.reduce(per_sample_loss(model)(x, t), t).backward()
            opt.step()
    said = [w for w in seen if "own parameters" in str(w.message)]
    assert len(said) == (0 if holds else 1)  # once
    if not holds:
        assert "ant.param_groups()" in str(said[0].message) and said[0].filename == __file__
    s = ant.param_groups()[0]["params"][0]
    assert bool((s != 0).any()) == holds


class _UnusedFirst(nn.Module):
    """A model whose first parameter the loss never reaches (an unused embedding)."""

    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(3))
        self.net = TinyNet()

    def forward(self, x, t):
        return self.net(x, t)


@pytest.mark.parametrize("loop", ["accumulate", "ant_step"])
def test_uw_parameters_in_the_optimiser_are_not_warned_of(loop):
    """No warning where the optimiser holds UW's parameters: accumulation over two reduces with
    a first parameter the loss never reaches (its .grad stays None), and a loop that uses
    ant.step (which checks the optimiser itself) while the model's gradient alone is cleared."""
    torch.manual_seed(0)
    model = _UnusedFirst()
    ant = ANT(linear_schedule(T), k=4, method="uw", model=model, seed=0)
    opt = torch.optim.SGD([{"params": model.parameters()}, *ant.param_groups()], lr=0.01)
    x = torch.randn(8, 1, 6, 6)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*own parameters")
        for _ in range(3):
            if loop == "accumulate":
                opt.zero_grad()
                for _ in range(2):
                    t = ant.sample_timesteps(8)
                    (ant.reduce(per_sample_loss(model)(x, t), t) / 2).backward()
                ant.step(opt)
            else:
                model.zero_grad()  # UW's gradient kept: ant.step still checked the optimiser
                t = ant.sample_timesteps(8)
                ant.reduce(per_sample_loss(model)(x, t), t).backward()
                ant.step(opt)


def test_grad_buffer_rows_are_padded_and_detached_grads_are_copies():
    """J's rows start on 16-element boundaries (the kernels' aligned loads) with zero padding;
    detach_grads gives each parameter its own copy of row 0, which later writes to J leave."""
    from antdiff.engine.buffer import ROW_ALIGN, GradBuffer

    model = nn.Sequential(nn.Linear(3, 5), nn.Linear(5, 2))  # P = 20 + 10 = 30: unaligned
    model[1].bias.requires_grad_(False)
    buf = GradBuffer(model.parameters(), 3)
    assert buf.J.shape == (3, 30) and buf.base.shape[1] % ROW_ALIGN == 0
    assert buf.base.shape[1] >= 30 and buf.J.data_ptr() == buf.base.data_ptr()
    assert buf.J.stride(0) % ROW_ALIGN == 0
    buf.J.fill_(2.0)
    assert bool((buf.base[:, 30:] == 0).all())  # the padding stays zero
    buf.detach_grads()
    before = [p.grad.clone() for p in buf.params]
    buf.J.fill_(7.0)
    for p, b in zip(buf.params, before):
        torch.testing.assert_close(p.grad, b)
        assert torch.equal(b, torch.full_like(b, 2.0))


def test_dense_layout_ignores_the_stride_of_a_size_one_dimension():
    """A size-1 dimension's stride says nothing about the layout (a channels_last depthwise
    weight [C, 1, kh, kw] has such strides): the tensor is still dense."""
    from antdiff.engine.buffer import dense_layout

    base = torch.empty(12)
    assert dense_layout(base.as_strided((4, 1, 3), (1, 5, 4)))
    assert not dense_layout(base.as_strided((4, 1, 2), (1, 5, 5)))  # a gap after each row


def test_map_batch_keeps_lists_lists_and_distributed_flag_is_checked():
    from antdiff.engine.batch import map_batch

    a, b = torch.arange(4), torch.arange(4.0)
    out = map_batch({"l": [a, b], "t": (a, 3)}, lambda x: x[:2])
    assert isinstance(out["l"], list) and isinstance(out["t"], tuple)
    assert out["t"][1] == 3 and torch.equal(out["l"][1], b[:2])
    with pytest.raises(ValueError, match="distributed must be 'auto', True or False"):
        ANT(linear_schedule(T), k=4, distributed="yes")


@pytest.mark.parametrize("mode", ["onepass", "micro"])
def test_a_namedtuple_batch_reaches_loss_fn_as_that_namedtuple(mode):
    """The sorted and cut batch keeps its namedtuple type (a plain tuple lost the field names
    that loss_fn reads), and gives the gradient of the same batch passed as a tuple."""
    from collections import namedtuple

    Batch = namedtuple("Batch", "x scale")
    model, ant, x = _tiny_setup(mode=mode)
    t = torch.randint(0, T, (10,), generator=torch.Generator().manual_seed(1))  # unsorted
    scale = torch.linspace(0.5, 2.0, 10)
    seen = []

    def by_name(b, tb):
        seen.append(type(b))
        return per_sample_loss(model)(b.x, tb) * b.scale

    ant.backward(by_name, Batch(x, scale), t)
    got = flat_grad(model).clone()
    assert seen and all(c is Batch for c in seen)
    model.zero_grad(set_to_none=True)
    ant.backward(lambda b, tb: per_sample_loss(model)(b[0], tb) * b[1], (x, scale), t)
    torch.testing.assert_close(got, flat_grad(model), rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["proportional", "equal"])
def test_systematic_counts_are_the_floor_or_ceiling_of_the_quota_at_every_start(mode):
    """Every cluster gets floor(quota) or ceil(quota) samples, and exactly its quota when that
    is whole, for every start in [0, 1), the ends of the pieces (0 and the breaks) included."""
    r = np.random.default_rng(3)
    for _ in range(200):
        k = int(r.integers(1, 9))
        sizes = r.integers(1, 40, k)
        if k > 1 and r.random() < 0.5:  # half of T: a whole quota B / 2 for even B
            sizes[0] = sizes[1:].sum()
        B = int(r.integers(1, 60))  # noqa: N806
        T_ = int(sizes.sum())  # noqa: N806
        quota = [Fraction(B, k)] * k if mode == "equal" else [Fraction(B * int(s), T_)
                                                               for s in sizes]  # fmt: skip
        table = _Allocations(B, sizes, mode)
        for u in [0.0, *table.breaks, *r.random(5)]:
            counts = _systematic(B, sizes, mode, u)
            assert sum(counts) == B
            for c, q in zip(counts, quota):
                assert math.floor(q) <= c <= math.ceil(q), (B, sizes.tolist(), u, counts)


def test_uniform_per_rank_draws_are_independent_across_ranks():
    """"uniform" with ranks: each rank's counts come from its own generator (seeded by the
    shared stream and the rank), so two ranks of one step do not draw the same counts every
    time, while a rank drawn twice from the same state does."""
    clusters = Clusters((0, 10, 40, 50, 100))
    r0, r1, again = (TimestepSampler(clusters, mode="uniform", seed=4) for _ in range(3))
    equal = 0
    for _ in range(20):
        c0, c1 = r0.sample(16, rank=(0, 2))[1], r1.sample(16, rank=(1, 2))[1]
        assert np.array_equal(c0, again.sample(16, rank=(0, 2))[1])
        equal += np.array_equal(c0, c1)
    assert equal < 5  # P(two independent multinomial(16) draws agree) is well below 1/4


def test_local_slice_counts_are_the_clusters_of_the_slice():
    """The counts remembered for a rank's slice are those of its timesteps' clusters, for
    slices that start and end inside clusters."""
    clusters = Clusters((0, 10, 40, 50, 100))
    s = TimestepSampler(clusters, mode="proportional", seed=1)
    bounds = np.asarray(clusters.bounds)
    for start, stop in [(0, 5), (3, 11), (5, 16), (2, 3), (0, 16)]:
        t, _ = s.sample(16)
        local = s.local_slice(t, start, stop)
        cid = np.searchsorted(bounds, local.numpy(), side="right") - 1
        want = np.bincount(cid, minlength=len(bounds) - 1)
        assert s.counts_for(local).tolist() == want.tolist(), (start, stop)


def test_the_sampler_refuses_a_batch_size_below_one():
    """TimestepSampler.sample itself (not only the engine) refuses B < 1 and non-integers."""
    s = TimestepSampler(Clusters((0, 10, 40, 50, 100)), mode="proportional", seed=0)
    for B in (0, -3, True, 2.0):  # noqa: N806
        with pytest.raises(ValueError, match="batch size B must be a positive integer"):
            s.sample(B)
    assert s.sample(1)[0].shape == (1,)

"""Multi-process (gloo, CPU) engine steps equal one process on the global batch."""

from __future__ import annotations

import datetime
import gc
import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

from antdiff import ANT
from antdiff.schedules import linear_schedule

T, B, WORLD = 100, 16, 2


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 16)
        self.emb = nn.Embedding(T, 16)
        self.norm = nn.LayerNorm(16)
        self.out = nn.Linear(16, 6)

    def forward(self, x, t):
        return self.out(torch.tanh(self.norm(self.inp(x) + self.emb(t))))


def make_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, 6, generator=g)
    t = torch.randint(0, T, (B,), generator=g)
    return x, t


def one_step(method: str, model: nn.Module, x, t, ant: ANT | None = None):
    """One engine step; returns (flat .grad of the model, weights, method-param grads)."""
    inner = getattr(model, "module", model)
    if ant is None:
        ant = ANT(linear_schedule(T), k=4, method=method, model=model, seed=0)
    else:
        ant.attach(model)

    def loss_fn(xb, tb):
        return ((model(xb, tb) - torch.sin(xb)) ** 2).mean(dim=1)

    if ant.needs_gradients:
        out = ant.backward(loss_fn, x, t)
    else:
        ant.reduce(loss_fn(x, t), t).backward()
        out = ant.last
    extra = [p.grad.clone() for p in ant.method.loss.parameters()] if ant.method.loss else []
    grad = torch.cat([p.grad.reshape(-1) for p in inner.parameters()])
    return grad, out.weights, extra


METHODS = ["vanilla", "uw", "pcgrad", "nash", "uw+pcgrad", "mgda"]


def _worker(rank: int, init_file: str, result_file: str) -> None:
    os.environ["ANT_KERNELS_BACKEND"] = "torch"
    early = ANT(linear_schedule(T), k=4, method="pcgrad", seed=0)  # before the group exists
    # before the group too, resumed from a state of per-rank draws
    early_draws = ANT(linear_schedule(T), k=4, method="vanilla", seed=0, sampling="uniform")
    early_draws.sampler.per_rank = True
    plain_net = Net()  # attached before the group exists, and never wrapped in DDP
    early_plain = ANT(linear_schedule(T), k=4, method="uw", seed=0, model=plain_net)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=120))
    try:
        results = {}
        for method in METHODS:
            torch.manual_seed(0)
            model = nn.parallel.DistributedDataParallel(Net())
            x, t = make_data()
            # uneven split on purpose: rank 0 gets 5 samples, rank 1 gets 11
            sl = slice(0, 5) if rank == 0 else slice(5, B)
            grad, w, extra = one_step(method, model, x[sl], t[sl])
            results[method] = {"grad": grad, "w": w, "extra": extra}
        # an engine built before init_process_group reduces too; a rank with no sample at all
        # (one-pass mode) contributes zero rows
        # retain_graph with an empty rank: its forward must not arm DDP's reduction (the other
        # rank's backward all-reduced alone: a gloo collective mismatch)
        retain = ANT(linear_schedule(T), k=4, method="pcgrad", mode="retain_graph", seed=0)
        for name, ant, sl in (("pcgrad:early", early, slice(0, 8) if rank == 0 else slice(8, B)),
                              ("pcgrad:empty", None, slice(0, 0) if rank == 0 else slice(0, B)),
                              ("pcgrad:retain_empty", retain,
                               slice(0, 0) if rank == 0 else slice(0, B))):  # fmt: skip
            torch.manual_seed(0)
            model = nn.parallel.DistributedDataParallel(Net())
            x, t = make_data()
            grad, w, extra = one_step("pcgrad", model, x[sl], t[sl], ant)
            results[name] = {"grad": grad, "w": w, "extra": extra}
        results["pcgrad:shard"] = _shard_step(rank)
        for mode in ("micro", "retain_graph"):
            results[f"scaled_empty:{mode}"] = _scaled_step(rank, mode)
        for method in WINDOW_METHODS:
            results[f"window:{method}"] = _window_steps(rank, method)
        results["bn_broadcasts"] = _retain_graph_buffer_broadcasts(rank)
        results["recompute_paths"] = _redo_after_a_nonfinite_recompute(rank)
        refused = []
        for kw, dist_flag in ((dict(gradient_as_bucket_view=True), "auto"),
                              (dict(static_graph=True), "auto"), ({}, False)):
            try:
                ANT(linear_schedule(T), k=4, method="pcgrad", distributed=dist_flag,
                    model=nn.parallel.DistributedDataParallel(Net(), **kw))
            except ValueError as e:
                refused.append(str(e))
        # a model without DDP under an initialised group (the ranks drifted apart), and UW's
        # state with distributed=False (each rank's log-variances followed its own losses)
        for method, dist_flag, net in (("uw", "auto", Net()),
                                       ("uw", False, nn.parallel.DistributedDataParallel(Net()))):
            try:
                ANT(linear_schedule(T), k=4, method=method, distributed=dist_flag, model=net)
            except ValueError as e:
                refused.append(str(e))
        try:  # the reduction turns on at the first step: the model is checked then
            x, t = make_data()
            early_plain.reduce(((plain_net(x, t) - torch.sin(x)) ** 2).mean(dim=1), t)
        except ValueError as e:
            refused.append(str(e))
        results["refused"] = refused
        more = []
        syncbn = nn.Sequential(nn.Linear(6, 4), nn.SyncBatchNorm(4), nn.Linear(4, 6))
        compiled = torch.compile(nn.parallel.DistributedDataParallel(
            Net(), gradient_as_bucket_view=True), backend="eager")  # fmt: skip
        # (DDP refuses a SyncBatchNorm on the CPU: the engine's check comes first anyway)
        for mode, net in (("retain_graph", syncbn), ("micro", compiled)):
            try:
                ANT(linear_schedule(T), k=4, method="pcgrad", mode=mode, model=net)
            except ValueError as e:
                more.append(str(e))
        results["refused_more"] = more
        # a rank's slice of 5 samples next to a tuple of 5 settings: not taken for per-sample
        # numbers on one rank alone (the other has 11 samples: both must decide alike)
        torch.manual_seed(0)
        model = nn.parallel.DistributedDataParallel(Net())
        ant = ANT(linear_schedule(T), k=4, method="pcgrad", seed=0, model=model)
        x, t = make_data()
        sl = slice(0, 5) if rank == 0 else slice(5, B)
        ant.backward(lambda b, tb: ((model(b[0], tb) - torch.sin(b[0])) ** 2).mean(dim=1),
                     (x[sl], (1.0,) * 5), t[sl])  # fmt: skip
        results["settings_tuple_ok"] = True
        results["totals"] = _totals(rank)
        results["per_rank"] = _per_rank_draws(rank, early_draws)
        if rank == 0:
            torch.save(results, result_file)
        # the DDP models (one holds a Python comm hook) go while the group is alive, and the
        # ranks leave together: a rank that tore gloo down alone aborted now and then
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


TOTAL_METHODS = ("vanilla", "pcgrad", "uw")


def _totals(rank: int | None) -> dict[str, list[float]]:
    """Each method's ``ant.reduce`` total of the per-sample losses 0..B-1 on uneven local
    batches, under no_grad (a validation loss) and, for the loss methods, with grad: every
    rank's value (one process: its own, once)."""
    out: dict[str, list[float]] = {}
    x, t = make_data()
    per = torch.arange(B, dtype=torch.float32)
    sl = slice(0, B) if rank is None else slice(0, 5) if rank == 0 else slice(5, B)
    for method in TOTAL_METHODS:
        torch.manual_seed(0)
        net = Net() if rank is None else nn.parallel.DistributedDataParallel(Net())
        ant = ANT(linear_schedule(T), k=4, method=method, model=net, seed=0)
        for grad in (False, True):
            if grad and ant.needs_gradients:
                continue
            with torch.set_grad_enabled(grad):
                lossy = per[sl] + 0 * net(x[sl], t[sl]).sum(1)  # reaches the model
                value = ant.reduce(lossy, t[sl]).detach().reshape(1)
            values = [value] if rank is None else [torch.zeros(1) for _ in range(WORLD)]
            if rank is not None:
                dist.all_gather(values, value)
            out[f"{method}:{'train' if grad else 'eval'}"] = [float(v) for v in values]
    return out


@pytest.mark.slow
def test_every_rank_reports_the_global_total(two_process_results):
    """Vanilla's total (and a gradient method's validation total, the plain batch mean) was
    each rank's sum scaled by world / B_global: 1.25 and 13.75 where the global mean is 7.5,
    a different loss per rank. Every rank must report the one-process value."""
    ref = _totals(None)
    got = two_process_results["totals"]
    assert set(got) == set(ref)
    for key, (want,) in ref.items():
        assert got[key] == pytest.approx([want] * WORLD, rel=1e-6), key
    assert ref["vanilla:eval"] == [pytest.approx((B - 1) / 2)]


def _gather_counts(ant: ANT, t: torch.Tensor) -> torch.Tensor:
    """[W, k]: every rank's host cluster counts of its draw ``t``."""
    counts = torch.from_numpy(ant.sampler.counts_for(t).copy())
    both = [torch.zeros_like(counts) for _ in range(WORLD)]
    dist.all_gather(both, counts)
    return torch.stack(both)


def _per_rank_draws(rank: int, early: ANT) -> dict[str, torch.Tensor]:
    """Each rank draws its own batch of 6 (sample_timesteps on every rank, no shard) for 60
    steps with the shared seed: the cluster counts of every rank and step [steps, W, k]; then
    a global draw for ant.shard (and the next one), and ``early``'s first draws."""
    out = {}
    for mode in ("uniform", "proportional"):
        ant = ANT(linear_schedule(T), k=4, method="vanilla", seed=0, sampling=mode)
        rows = []
        for _ in range(60):
            t = ant.sample_timesteps(6)
            rows.append(_gather_counts(ant, t))
            ant.reduce(torch.zeros(6), t)  # a training step's loss
        out[mode] = torch.stack(rows)
        out["sizes"] = torch.tensor(ant.clusters.sizes)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        ant.shard(torch.zeros(12), ant.sample_timesteps(12))  # a global draw to slice
    out["shard_warned"] = torch.tensor([any("each rank drew" in str(w.message) for w in seen)])
    out["after_shard"] = _gather_counts(ant, ant.sample_timesteps(12))
    out["early"] = torch.stack([_gather_counts(early, early.sample_timesteps(6))
                                for _ in range(5)])  # fmt: skip
    return out


@pytest.mark.slow
def test_ranks_drawing_their_own_batches_draw_different_allocations(two_process_results):
    """With the shared seed every rank drew the same cluster counts at every step (a global
    batch of copies: under "uniform" a cluster was empty in it twice as often as i.i.d.
    timesteps leave it). After the first step the ranks' counts differ ("uniform": as often as
    independent draws do) and, "proportional", add up to the global batch's stratified
    allocation (every count the floor or ceiling of its share of 12)."""
    got = two_process_results["per_rank"]
    uni, prop, sizes = got["uniform"], got["proportional"], got["sizes"].double()
    assert torch.equal(uni[0, 0], uni[0, 1])  # the first step: not yet known to be per rank
    same = (uni[1:, 0] == uni[1:, 1]).all(1).double().mean()
    assert same < 0.3, same
    quota = 12 * sizes / sizes.sum()
    total = prop[1:].sum(1).double()  # [steps, k]
    assert ((total == quota.floor()) | (total == quota.ceil())).all(), (total, quota)
    assert (total.sum(1) == 12).all()
    assert not (prop[1:, 0] == prop[1:, 1]).all()
    # ant.shard of a global draw: the ranks go back to drawing alike, with a warning about the
    # draw that was still offset
    assert got["shard_warned"].item()
    after = got["after_shard"]
    assert torch.equal(after[0], after[1])
    # an engine built before init_process_group and resumed with per-rank draws: its first
    # draws already differ between the ranks (it did not know the group yet: all alike)
    early = got["early"]
    assert not (early[:, 0] == early[:, 1]).all()


class BNNet(nn.Module):
    """BatchNorm couples the samples: retain_graph mode, DDP broadcasting its statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.bn, self.out = nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Linear(16, 6)

    def forward(self, x, t):
        return self.out(torch.tanh(self.bn(self.inp(x))))


def _retain_graph_buffer_broadcasts(rank: int) -> int:
    """How often DDP broadcast the buffers over 3 PCGrad steps in retain_graph mode: once per
    forward, as in a plain DDP loop (the forward's no_sync had turned it off after step 1)."""
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(BNNet())
    calls = []
    sync = model._sync_buffers
    model._sync_buffers = lambda: (calls.append(1), sync())[1]
    ant = ANT(linear_schedule(T), k=4, method="pcgrad", mode="retain_graph", seed=0, model=model)
    x, t = make_data()
    for _ in range(3):
        ant.backward(lambda xb, tb: ((model(xb, tb) - xb) ** 2).mean(1), x[rank::2], t[rank::2])
    return len(calls)


class _ReadyOnRankZero:
    """A non-finite recompute's flag as a fused optimiser leaves it (no verdict): its CUDA event
    is ready on rank 0 and not yet on rank 1, as host timing differences give on GPUs."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def ready(self) -> bool:
        return self.rank == 0

    def read(self, wait: bool = False) -> bool:
        return False


def _redo_after_a_nonfinite_recompute(rank: int) -> list[list[str]]:
    """Each rank's path (recompute / off-step) over the two steps after a non-finite weight
    recompute with update_every = 3: rank 0 redid the recompute (all-reducing J) while rank 1
    took an off-step (DDP's all-reduce): mixed collectives. Every rank's paths, gathered."""
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(Net())
    ant = ANT(linear_schedule(T), k=4, method="pcgrad", update_every=3, seed=0, model=model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    paths: list[str] = []
    gradient_step, weighted_step = ant._gradient_step, ant._weighted_step
    ant._gradient_step = lambda *a: (paths.append("recompute"), gradient_step(*a))[1]
    ant._weighted_step = lambda *a: (paths.append("off-step"), weighted_step(*a))[1]
    x, t = make_data()
    for s in range(3):
        xs = x.clone()
        if s == 0:
            xs[3, 0] = float("nan")  # the first (recompute) step is not finite on every rank
        opt.zero_grad()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ant.backward(lambda xb, tb: ((model(xb, tb) - xb) ** 2).mean(1), xs[rank::2],
                         t[rank::2])  # fmt: skip
            ant.step(opt)
        if s == 0:
            assert ant._recompute is not None and ant._recompute.verdict is None
            ant._recompute.flag = _ReadyOnRankZero(rank)
    gathered: list[list[str]] = [[] for _ in range(WORLD)]
    dist.all_gather_object(gathered, paths)
    return gathered


def _shard_step(rank: int | None):
    """PCGrad on ``ant.shard`` of a global batch whose timesteps every rank draws alike."""
    torch.manual_seed(0)
    net = Net()
    model = net if rank is None else nn.parallel.DistributedDataParallel(net)
    ant = ANT(linear_schedule(T), k=4, method="pcgrad", seed=0, model=model)
    x, _ = make_data()
    torch.manual_seed(1)
    t = ant.sample_timesteps(B)
    xb, tb = ant.shard(x, t)
    assert tb.shape[0] == (B if rank is None else B // WORLD)
    assert ant.sampler.counts_for(tb) is not None  # the slice keeps its host counts
    grad, w, extra = one_step("pcgrad", model, xb, tb, ant)
    return {"grad": grad, "w": w, "extra": extra}


def _scaled_step(rank: int | None, mode: str):
    """fp16 losses and a fresh GradScaler, rank 0's slice empty: that rank scales no loss on
    its first step, so the scale the Gram is unscaled by did not exist yet (it raised)."""
    torch.manual_seed(0)
    net = Net()
    model = net if rank is None else nn.parallel.DistributedDataParallel(net)
    ant = ANT(linear_schedule(T), k=4, method="pcgrad", seed=0, model=model, mode=mode)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x, t = make_data()
    sl = slice(0, B) if rank is None else slice(0, 0) if rank == 0 else slice(0, B)

    def loss_fn(xb, tb):
        return ((model(xb, tb) - torch.sin(xb)) ** 2).mean(dim=1).half()

    out = ant.backward(loss_fn, x[sl], t[sl], scaler=scaler)
    assert ant.step(opt, scaler=scaler)
    params = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    return {"params": params, "w": out.weights.detach(), "scale": scaler.get_scale()}


def _window_steps(rank: int | None, method: str):
    """Two optimiser steps of two micro-batches each through ant.backward(accumulate=True)
    (Nash: an on-step and an off-step); every rank holds an uneven slice of each global
    micro-batch, and J / DDP's gradients are all-reduced at each window's last call only."""
    torch.manual_seed(0)
    net = Net()
    model = net if rank is None else nn.parallel.DistributedDataParallel(net)
    kw = {"update_every": 2} if method == "nash" else {}
    ant = ANT(linear_schedule(T), k=4, method=method, seed=0, model=model, **kw)
    params = [*net.parameters(), *(ant.method.loss.parameters() if ant.method.loss else ())]
    opt = torch.optim.SGD(params, lr=0.1)
    g = torch.Generator().manual_seed(2)

    def loss_fn(xb, tb):
        return ((model(xb, tb) - torch.sin(xb)) ** 2).mean(dim=1)

    reduced = [0]  # DDP's bucket all-reduces
    if rank is not None:
        def hook(state, bucket):
            reduced[0] += 1
            return allreduce_hook(state, bucket)

        model.register_comm_hook(None, hook)
    weights, early = [], []
    for _ in range(2):
        for m in range(2):
            x, t = torch.randn(B, 6, generator=g), torch.randint(0, T, (B,), generator=g)
            sl = slice(0, B) if rank is None else slice(0, 5 + m) if rank == 0 else slice(5 + m, B)
            before = reduced[0]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # timesteps not from the sampler
                out = ant.backward(loss_fn, x[sl], t[sl], accumulate=m == 0)
            if m == 0:
                early.append(reduced[0] - before)
        weights.append(out.weights.detach())
        assert ant.step(opt)
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    return {"params": flat, "w": torch.stack(weights), "step": ant.step_count,
            "reduced_early": early}  # fmt: skip


WINDOW_METHODS = ("pcgrad", "nash", "uw")


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    os.environ["ANT_KERNELS_BACKEND"] = "torch"
    mp.spawn(_worker, args=(str(tmp / "init"), str(tmp / "rank0.pt")), nprocs=WORLD)
    return torch.load(tmp / "rank0.pt", weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize(
    "method", [*METHODS, "pcgrad:early", "pcgrad:empty", "pcgrad:retain_empty"]
)
def test_two_processes_equal_one_process_on_global_batch(two_process_results, method, monkeypatch):
    """Also vanilla on unequal local batches (each rank's sum is scaled by world / B_global,
    so DDP's average is the global mean, not the mean of the ranks' means)."""
    monkeypatch.setenv("ANT_KERNELS_BACKEND", "torch")
    torch.manual_seed(0)
    x, t = make_data()
    ref_grad, ref_w, ref_extra = one_step(method.partition(":")[0], Net(), x, t)
    got = two_process_results[method]
    torch.testing.assert_close(got["w"], ref_w, rtol=1e-6, atol=1e-7)
    assert len(got["extra"]) == len(ref_extra)
    for a, b in zip(got["extra"], ref_extra):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got["grad"], ref_grad, rtol=1e-6, atol=1e-6)


def test_every_rank_takes_the_same_path_after_a_nonfinite_recompute(two_process_results):
    paths = two_process_results["recompute_paths"]
    assert paths[0] == paths[1] and paths[0][0] == "recompute", paths


def test_retain_graph_keeps_broadcasting_buffers(two_process_results):
    assert two_process_results["bn_broadcasts"] == 3


@pytest.mark.slow
def test_ddp_settings_that_break_gradient_methods_are_refused(two_process_results):
    """gradient_as_bucket_view points .grad away from J (cluster gradients were lost),
    static_graph forbids no_sync, and distributed=False would let every rank step alone; a
    model not wrapped in DDP is refused also when it was attached before the group existed
    (each rank applied world x its own gradient)."""
    bucket, static, local, plain, uw_local, plain_early = two_process_results["refused"]
    for msg in (plain, plain_early):  # also a model attached before init_process_group
        assert "not wrapped in DistributedDataParallel" in msg and "distributed=False" in msg
    assert "'uw' and distributed=False" in uw_local
    assert "gradient_as_bucket_view=True" in bucket
    assert "DDP(model, gradient_as_bucket_view=False)" in bucket
    assert "static_graph=True" in static and "no_sync" in static
    assert "distributed=False" in local and "own update" in local


@pytest.mark.parametrize("mode", ["micro", "retain_graph"])
def test_a_rank_without_samples_under_a_grad_scaler(two_process_results, mode, monkeypatch):
    monkeypatch.setenv("ANT_KERNELS_BACKEND", "torch")
    ref, got = _scaled_step(None, mode), two_process_results[f"scaled_empty:{mode}"]
    assert got["scale"] == ref["scale"]
    torch.testing.assert_close(got["w"], ref["w"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got["params"], ref["params"], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("method", WINDOW_METHODS)
def test_accumulation_windows_under_ddp_equal_one_process(two_process_results, method,
                                                          monkeypatch):  # fmt: skip
    monkeypatch.setenv("ANT_KERNELS_BACKEND", "torch")
    ref, got = _window_steps(None, method), two_process_results[f"window:{method}"]
    assert got["step"] == ref["step"] == 2
    assert got["reduced_early"] == [0, 0]  # a window's first call all-reduces nothing in DDP
    torch.testing.assert_close(got["w"], ref["w"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got["params"], ref["params"], rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_shard_of_a_global_draw_equals_one_process(two_process_results, monkeypatch):
    monkeypatch.setenv("ANT_KERNELS_BACKEND", "torch")
    ref, got = _shard_step(None), two_process_results["pcgrad:shard"]
    torch.testing.assert_close(got["w"], ref["w"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got["grad"], ref["grad"], rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_ddp_cases_today_refused_or_served_alike_on_every_rank(two_process_results):
    """A training SyncBatchNorm under several ranks all-reduced once per cluster pass (ranks
    ran different numbers: a hang or mixed rows), also in retain_graph mode; torch.compile
    around DDP hid DDP's settings from the checks; a tuple of settings as long as one rank's
    slice was refused on that rank alone (the other waited in a collective)."""
    syncbn, compiled = two_process_results["refused_more"]
    assert "SyncBatchNorm layers in training mode" in syncbn
    assert "gradient_as_bucket_view=True" in compiled
    assert two_process_results["settings_tuple_ok"]


def test_sharded_models_are_refused_for_gradient_methods(tmp_path):
    """FSDP passed the DDP check (it has no_sync): a gradient method then left the parameters
    unchanged, or hung when the ranks' cluster counts differed. Refused by name at attach; a
    loss-space method still attaches."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0,
                            world_size=1)  # fmt: skip
    try:
        torch.manual_seed(0)
        with warnings.catch_warnings():  # (NO_SHARD at world size 1)
            warnings.simplefilter("ignore")
            model = FullyShardedDataParallel(Net(), device_id=torch.device("cpu"))
        with pytest.raises(ValueError, match="sharded by FullyShardedDataParallel.*"
                           "DistributedDataParallel instead"):  # fmt: skip
            ANT("linear", k=4, method="pcgrad", model=model)
        ANT("linear", k=4, method="uw", model=model)
    finally:
        dist.destroy_process_group()

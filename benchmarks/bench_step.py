"""One training step: vanilla vs ANT's methods vs LibMTL and torchjd, side by side in one run.

Models: a small ADM UNet ("unet": adm-tiny, 8x8x1) and a small DiT ("dit": dit-tiny, 8x8x1,
class-conditional), also with larger batches ("unet-b128", "dit-b512") and the UNet on 32x32x1
inputs ("unet-32px"); eps-MSE per-sample losses from GaussianDiffusion (linear schedule, T = 1000),
k = 5 SNR clusters, AdamW (fused on CUDA, where ant.step skips non-finite steps on the device).
A step = draw t, forward, the method's backward, optimizer step.

- Time: every test times its scenario and, in the same rounds (pedantic ``setup``), a vanilla
  step of an identical model, so each ratio compares steps taken under the same machine load.
  Scenarios that refresh weights every 25 steps report the total over one full 25-step cycle
  over the total of the vanilla steps paired with it, the others the median of the paired
  ratios. Loss-space scenarios (vanilla, UW), whose ratio is within a few percent
  of 1 where two identical vanilla models already differ by about 1%, run 3x the rounds.
- Backward passes per step: a hook on the model's outputs counts the passes through the network
  (the vanilla model carries the same hooks, so their cost is on both sides of the ratio); a
  vmapped pass (torchjd) counts once and carries ``rows`` cotangent rows.
- Peak memory: growth of the allocated tensor bytes over two steps from a fresh model and
  optimiser (gradients, optimiser state, activations, method buffers and operator scratch; not
  imports or weights), ``antdiff.memory.peak_allocated``: torch's CPU allocator total as the
  profiler reports it, in a fresh subprocess per scenario, or ``torch.cuda.max_memory_allocated``.
  On CPU the resident-set peak (Linux VmHWM over the same two steps, glibc's mmap threshold fixed
  at 64 KiB so freed tensors leave the resident set) is reported beside it: it adds what glibc's
  heap keeps after small frees. On CUDA also host syncs per step, counted with
  ``torch.cuda.set_sync_debug_mode("warn")``.
- Cross-checks (run in every session, --quick included): our PCGrad update equals LibMTL's and
  torchjd's for the same projection orders, our Nash-MTL weights equal torchjd's, our IMTL-G
  weights equal LibMTL's.

    pytest benchmarks/bench_step.py --benchmark-json=raw.json [--quick]
    python benchmarks/bench_step.py raw.json benchmarks/results/step_cpu
"""

from __future__ import annotations

import functools
import json
import os
import random
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT, ROOT / "python"):  # the --memory subprocess runs this file as a script
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from antdiff import ANT  # noqa: E402
from antdiff.diffusion import GaussianDiffusion  # noqa: E402
from antdiff.memory import peak_allocated  # noqa: E402
from antdiff.models import create_model  # noqa: E402
from benchmarks import peers  # noqa: E402

# OpenMP's wait policy is left as the environment sets it (unset: libgomp spins briefly, then
# sleeps, what a training job gets). PASSIVE (sleep at once) was used before 2026-11-26: every
# parallel region then paid a thread wake-up (0.05-0.4 ms here), which made a vanilla step
# 1.8-2.4x slower and inflated the cost of many small operations (per-cluster products) most.

K = 5
THREADS = int(os.environ.get("ANT_BENCH_THREADS", "2"))
ROUNDS = int(os.environ.get("ANT_BENCH_ROUNDS", "10"))
MACHINE_KEYS = ("device", "cpu_model", "cpu_cores", "python", "numpy", "torch", "triton", "git_sha")
# name: (registry size, batch, conditional); "tiny" is the --quick model
MODELS = {
    "unet": ("adm-tiny", 32, False),
    "dit": ("dit-tiny", 128, True),
    "tiny": ("dit-tiny", 10, True),
    # larger batches or inputs, same models: how the per-cluster call overhead shrinks as each
    # call gets more work (32x32: CIFAR-10's size, the smallest the paper trains on)
    "unet-b128": ("adm-tiny", 128, False),
    "dit-b512": ("dit-tiny", 512, True),
    "unet-32px": ("adm-tiny", 32, False),
    # GPU only: models that fill more of a GPU than the tiny ones
    "adm-small": ("adm-small", 128, False),
    "dit-s2": ("DiT-S/2", 128, True),
    # GPU only: the paper's own ADM-light (FFHQ 256, 94M parameters) at a batch of 16
    "adm-light": ("adm-light", 16, False),
}
# input height = width (8 otherwise) and constructor overrides (eps-only output: the loss is
# eps-MSE)
RESOLUTION = {"adm-small": 16, "dit-s2": 32, "unet-32px": 32, "adm-light": 256}
OVERRIDES = {"dit-s2": {"learn_sigma": False}, "adm-light": {"learn_sigma": False}}
SCALED = ("unet-b128", "dit-b512", "unet-32px")
SCALED_SCENARIOS = ("vanilla", "ours-uw", "ours-pcgrad-onepass", "ours-nash-onepass")
GPU_MODELS = ("adm-small", "dit-s2", "adm-light")
GPU_SCENARIOS = (
    "vanilla", "ours-uw", "ours-pcgrad", "ours-pcgrad-onepass", "ours-nash-onepass",
    "ours-nash25", "ours-uw+pcgrad-onepass", "ours-graddrop-onepass",
)  # fmt: skip
PAPER_SCENARIOS = (
    "vanilla", "ours-uw", "ours-pcgrad-onepass", "ours-nash-onepass", "ours-uw+pcgrad-onepass",
)  # fmt: skip
SCENARIOS = (
    "vanilla", "ours-uw", "ours-pcgrad", "ours-pcgrad-retain", "ours-nash", "ours-nash25",
    "ours-uw+pcgrad", "ours-pcgrad-onepass", "ours-nash-onepass", "ours-uw+pcgrad-onepass",
    "ours-graddrop-onepass", "libmtl-pcgrad", "libmtl-uw", "libmtl-imtl", "libmtl-mgda",
    "torchjd-pcgrad", "torchjd-nash", "torchjd-nash25",
    # the batch in two accumulated micro-batches, against vanilla accumulating alike
    "vanilla-x2", "ours-uw-x2", "ours-pcgrad-onepass-x2", "ours-nash-onepass-x2",
)  # fmt: skip
LOSS_SPACE = ("vanilla", "ours-uw", "libmtl-uw", "vanilla-x2", "ours-uw-x2")  # more rounds
QUICK_MEMORY = ("vanilla", "ours-pcgrad", "libmtl-pcgrad", "torchjd-pcgrad")
CYCLE = 25  # weight refresh period of the "*nash25" scenarios


class Setup:
    """Model, fixed batch, loss function and clusters of one scenario (identical per seed)."""

    def __init__(self, model_name: str, device: str = "cpu", seed: int = 0) -> None:
        size, self.B, cond = MODELS[model_name]
        torch.manual_seed(seed)
        self.device = torch.device(device)
        self.model = create_model(size, **OVERRIDES.get(model_name, {})).to(self.device)
        self.P = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        res = RESOLUTION.get(model_name, 8)
        shape = (self.model.in_channels, res, res)
        gen = torch.Generator().manual_seed(seed + 1)
        x = torch.randn(self.B, *shape, generator=gen)
        noise = torch.randn(self.B, *shape, generator=gen)
        y = torch.randint(0, 10, (self.B,), generator=gen) if cond else torch.zeros(self.B)
        self.batch = tuple(v.to(self.device) for v in (x, noise, y))
        self.cond = cond
        self.diffusion = GaussianDiffusion("linear")
        self.clusters = ANT("linear", k=K, method="vanilla").clusters

    def loss_fn(self, batch: Any, t: torch.Tensor) -> torch.Tensor:
        """[b] eps-MSE of the sub-batch ``batch`` = (x0, noise, y) at timesteps t [b]."""
        x, noise, y = batch
        kw = {"y": y} if self.cond else None
        return self.diffusion.training_losses(self.model, x, t, noise, kw)["loss"]


def make_step(scenario: str, s: Setup) -> Callable[[], None]:
    """A closure running one full training step of ``scenario`` on ``s``; "-x2": the batch in
    two accumulated micro-batches of B / 2 (vanilla: loss / 2 twice; ours: ant.backward with
    accumulate=True, or two ant.reduce(...) / 2)."""
    n = 2 if scenario.endswith("-x2") else 1
    scenario = scenario.removesuffix("-x2")
    b = s.B // n
    parts = [tuple(v[i * b : (i + 1) * b] for v in s.batch) for i in range(n)]
    lib, _, method = scenario.partition("-")
    fused = s.device.type == "cuda"  # there ant.step then skips non-finite steps on the device
    if lib in ("libmtl", "torchjd"):  # the same AdamW as vanilla and ours, fused on a GPU
        sampler = ANT("linear", k=K, method="vanilla", clustering=s.clusters)
        step = peers.peer_step(lib, method, s.model, s.loss_fn, s.clusters, fused=fused)
        return lambda: step(s.batch, sampler.sample_timesteps(s.B, s.device))
    if lib == "vanilla":
        opt = torch.optim.AdamW(s.model.parameters(), lr=1e-4, fused=fused)

        def vanilla() -> None:
            opt.zero_grad(set_to_none=True)
            for part in parts:
                t = torch.randint(0, s.clusters.T, (b,), device=s.device)
                loss = s.loss_fn(part, t).mean()
                (loss / n if n > 1 else loss).backward()
            opt.step()

        return vanilla
    mode = {"retain": "retain_graph", "onepass": "onepass"}.get(method.rpartition("-")[2], "micro")
    name = method.removesuffix("-retain").removesuffix("-onepass").removesuffix("25")
    every = CYCLE if method.endswith("25") else (1 if name == "nash" else None)
    ant = ANT("linear", k=K, clustering=s.clusters, method=name, mode=mode, update_every=every)
    ant.attach(s.model).to(s.device)
    groups = [{"params": list(s.model.parameters())}, *ant.param_groups()]
    opt = torch.optim.AdamW(groups, lr=1e-4, fused=fused)

    def ours() -> None:
        opt.zero_grad(set_to_none=True)
        for i, part in enumerate(parts):
            t = ant.sample_timesteps(b, s.device)
            if ant.needs_gradients:
                ant.backward(s.loss_fn, part, t, accumulate=i < n - 1)
            else:
                loss = ant.reduce(s.loss_fn(part, t), t)
                (loss / n if n > 1 else loss).backward()
        ant.step(opt)

    return ours


class PassCounter:
    """Counts backward passes through the model (and their cotangent rows) with a tensor hook.

    The hook sits on every output of the model's forward (onepass gives the parameters no .grad).
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.passes = self.rows = 0
        self.handle = model.register_forward_hook(self._on_forward)

    def _on_forward(self, module: torch.nn.Module, args: Any, out: torch.Tensor) -> None:
        if out.requires_grad:
            out.register_hook(self._hook)

    def _hook(self, grad: torch.Tensor) -> None:
        from torch._C import _functorch

        self.passes += 1
        if _functorch.is_batchedtensor(grad):  # torchjd: one vmapped pass over k rows
            self.rows += _functorch.get_unwrapped(grad).shape[_functorch.maybe_get_bdim(grad)]
        else:
            self.rows += 1


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_memory(model_name: str, scenario: str, device: str = "cpu") -> dict[str, int]:
    """Peak allocated bytes above the pre-step level over two steps (fresh process on CPU)."""
    torch.set_num_threads(THREADS)
    peak = peak_allocated(lambda: make_step(scenario, Setup(model_name, device)), device)
    return {"peak_bytes": peak}


def measure_rss(model_name: str, scenario: str) -> dict[str, int]:
    """Peak resident set above the pre-step level over two steps (CPU, fresh process)."""
    torch.set_num_threads(THREADS)
    step = make_step(scenario, Setup(model_name))
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current VmRSS
    base = _status_kib("VmRSS")
    for _ in range(2):
        step()
    return {"rss_peak_bytes": (_status_kib("VmHWM") - base) * 1024}


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _memory_in_subprocess(model_name: str, scenario: str) -> dict[str, int]:
    out: dict[str, int] = {}
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    for flag in ("--memory", "--rss"):  # the profiler's own buffers would inflate the RSS
        cmd = [sys.executable, __file__, flag, model_name, scenario]
        run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)
        if run.returncode != 0:
            raise RuntimeError(f"{flag} run of {scenario} failed:\n{run.stderr[-3000:]}")
        out.update(json.loads(run.stdout.strip().splitlines()[-1]))
    return out


def count_syncs(step: Callable[[], None], device: torch.device) -> int:
    """Host syncs in one step, from torch's CUDA sync debug mode warnings (not counting the
    notice that switching the mode on prints)."""
    _sync(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum("called a synchronizing CUDA operation" in str(w.message) for w in caught)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Full runs: unet and dit (and a few scenarios at larger batches; on CUDA also the GPU-sized
    models); --quick: the tiny model only (marked ``quick``)."""
    if "scenario" not in metafunc.fixturenames:
        return
    quick = metafunc.config.getoption("--quick")
    cases = []
    for device in ("cpu", "cuda"):
        marks = [pytest.mark.quick] if quick else []
        if device == "cuda":
            marks.append(pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU here"))
        models = ("unet", "dit", *SCALED, *(GPU_MODELS if device == "cuda" else ()))
        for model_name in ("tiny",) if quick else models:
            scenarios = SCENARIOS
            if model_name in SCALED:
                scenarios = SCALED_SCENARIOS
            elif model_name == "adm-light":  # the engine's one-pass scenarios only
                scenarios = PAPER_SCENARIOS
            elif model_name in GPU_MODELS:
                scenarios = GPU_SCENARIOS
            for scenario in scenarios:
                cid = f"{device}-{model_name}-{scenario}"
                cases.append(pytest.param(device, model_name, scenario, id=cid, marks=marks))
    metafunc.parametrize(("device", "model_name", "scenario"), cases)


def test_step(bench: Any, quick: bool, device: str, model_name: str, scenario: str) -> None:
    if scenario.startswith(("libmtl", "torchjd")):
        lib = {"libmtl": "LibMTL", "torchjd": "torchjd"}[scenario.split("-")[0]]
        assert peers.peer_version(lib), f"{lib} missing: install the bench extra"
    torch.set_num_threads(THREADS)
    s, v = Setup(model_name, device), Setup(model_name, device)
    # the accumulating scenarios ("-x2") against vanilla accumulating alike
    vanilla = "vanilla-x2" if scenario.endswith("-x2") else "vanilla"
    step, vstep = make_step(scenario, s), make_step(vanilla, v)
    # the same hooks on both models: their cost (tens of us a pass) must not tilt the ratio
    counter, vcounter = PassCounter(s.model), PassCounter(v.model)
    cycle = scenario.endswith("25")
    rounds, warmup = (CYCLE, 2) if cycle else ((3, 1) if quick else (ROUNDS, 2))
    if not (cycle or quick) and scenario in LOSS_SPACE:
        rounds *= 3
    vtimes: list[float] = []
    calls = [0]

    def timed_vanilla(before: bool) -> None:
        if before and calls[0] == warmup:  # passes are counted over the timed rounds only
            counter.passes = counter.rows = 0  # (the warm-up holds a Nash cycle's first solve)
        # alternate before/after the scenario's step so order effects cancel within a pair
        if (calls[0] % 2 == 0) != before:
            return
        t0 = time.perf_counter()
        vstep()
        _sync(v.device)
        vtimes.append(time.perf_counter() - t0)

    def teardown() -> None:
        timed_vanilla(before=False)
        calls[0] += 1

    def target() -> None:
        step()
        _sync(s.device)

    bench.group = f"{device}-{model_name}"
    bench.pedantic(
        target, setup=lambda: timed_vanilla(True), teardown=teardown, rounds=rounds,
        warmup_rounds=warmup,
    )  # fmt: skip
    n_steps = rounds
    own_times, van_times = list(bench.stats.stats.data), vtimes[warmup:]
    if cycle:  # total over the cycle's paired rounds: a load spike weighs on both sides alike
        ratio = sum(own_times) / sum(van_times)
    else:  # median of per-round ratios: each pair ran back to back, under the same load
        ratio = statistics.median(a / b for a, b in zip(own_times, van_times))
    own = statistics.mean(own_times) if cycle else statistics.median(own_times)
    info = dict(
        model=model_name, size=MODELS[model_name][0], scenario=scenario, B=s.B, k=K, P=s.P,
        threads=THREADS, step_s=own, statistic="mean of a 25-step cycle" if cycle else "median",
        vanilla_pair_s=statistics.median(van_times), ratio=ratio,
        backward_passes=counter.passes / n_steps, backward_rows=counter.rows / n_steps,
        omp_wait_policy=os.environ.get("OMP_WAIT_POLICY") or "unset", kind=device,
    )  # fmt: skip
    counter.handle.remove()
    vcounter.handle.remove()
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(s.device)
        info["host_syncs"] = count_syncs(step, s.device)
        info.update(measure_memory(model_name, scenario, device))
    elif not quick or scenario in QUICK_MEMORY:
        info.update(_memory_in_subprocess(model_name, scenario))
    else:
        info["peak_bytes"] = info["rss_peak_bytes"] = None  # --quick: few fresh processes
    info["peer_versions"] = {p: peers.peer_version(p) for p in ("LibMTL", "torchjd", "cvxpy")}
    bench.extra_info.update(info)


# -- cross-checks: the same J and projection orders through ours and the peers ------------------
class _Linear(torch.nn.Module):
    """L_i = J[i] . theta: the gradient of cluster loss i is exactly row i of J."""

    def __init__(self, J: torch.Tensor) -> None:  # noqa: N803
        super().__init__()
        self.J = J
        self.theta = torch.nn.Parameter(torch.zeros(J.shape[1], dtype=J.dtype))

    def losses(self) -> torch.Tensor:
        return self.J @ self.theta


@functools.cache
def _jacobians() -> dict[str, torch.Tensor]:
    """[k, P] float64 Jacobians (read-only): the tiny DiT's per-cluster gradients after 50
    training steps (at initialisation its clusters do not conflict, so PCGrad would be a plain
    sum), and a random one with a strong conflict."""
    s = Setup("tiny")
    opt = torch.optim.AdamW(s.model.parameters(), lr=1e-3)
    for step in range(50):
        sampler = ANT("linear", k=K, method="vanilla", clustering=s.clusters, seed=100 + step)
        opt.zero_grad()
        s.loss_fn(s.batch, sampler.sample_timesteps(s.B)).mean().backward()
        opt.step()
    sampler = ANT("linear", k=K, method="vanilla", clustering=s.clusters, seed=3)
    t = sampler.sample_timesteps(s.B)
    L = peers.cluster_means(s.loss_fn(s.batch, t), s.clusters.cluster_of(t), K)  # noqa: N806
    params = list(s.model.parameters())
    rows = [torch.autograd.grad(L[i], params, retain_graph=True) for i in range(K)]
    real = torch.stack([torch.cat([g.reshape(-1) for g in r]) for r in rows]).double()
    gen = torch.Generator().manual_seed(5)
    mixed = torch.randn(K, 48, generator=gen, dtype=torch.float64)
    mixed[3] = -0.8 * mixed[0] + 0.3 * mixed[3]  # a strong conflict on top of random ones
    return {"real": real, "conflicting": mixed}


def _pcgrad_ours(J: torch.Tensor, orders: list[list[int]]) -> torch.Tensor:  # noqa: N803
    """[P] sum of projected gradients from our Gram-space PCGrad (float64)."""
    import ant_kernels

    w = ant_kernels.pcgrad_weights(J @ J.T, torch.tensor(orders))
    return w @ J


def _cases_J() -> list[Any]:
    return [pytest.param(name, marks=pytest.mark.quick) for name in ("real", "conflicting")]


@pytest.mark.parametrize("which", _cases_J())
def test_pcgrad_equals_libmtl(which: str) -> None:
    J = _jacobians()[which].float()  # noqa: N806
    assert int((J @ J.T < 0).sum()) // 2 > 0  # projections happen: the comparison can fail
    lin = _Linear(J)
    host = peers.libmtl_host("pcgrad", lin, K)
    random.seed(11)  # LibMTL shuffles list(range(k)) with `random` once per cluster, in order
    orders = [_shuffled() for _ in range(K)]
    random.seed(11)
    host.backward(lin.losses())
    J64 = J.double()  # noqa: N806
    expect = _pcgrad_ours(J64, orders)
    torch.testing.assert_close(lin.theta.grad.double(), expect, rtol=2e-5, atol=2e-6 * _scale(J64))


def _shuffled() -> list[int]:
    idx = list(range(K))
    random.shuffle(idx)
    return idx


def _scale(J: torch.Tensor) -> float:  # noqa: N803
    return float(J.norm(dim=1).max())


@pytest.mark.parametrize("which", _cases_J())
def test_pcgrad_equals_torchjd(which: str) -> None:
    from torchjd.aggregation import PCGradWeighting

    J = _jacobians()[which]  # noqa: N806
    G = J @ J.T  # noqa: N806
    torch.manual_seed(13)
    w_jd = PCGradWeighting()(G)
    torch.manual_seed(13)  # torchjd: one randperm per cluster, skipping itself; ours: self first
    orders = []
    for i in range(K):
        perm = torch.randperm(K).tolist()
        orders.append([i] + [j for j in perm if j != i])
    assert int((G < 0).sum()) // 2 > 0  # projections happen: the comparison can fail
    torch.testing.assert_close(_pcgrad_ours(J, orders), w_jd @ J, rtol=1e-10, atol=1e-12)


@pytest.mark.quick
@pytest.mark.parametrize("which", ["real", "conflicting"])
def test_nash_weights_equal_torchjd(which: str) -> None:
    from torchjd.aggregation import NashMTL

    import ant_kernels
    from antdiff.mtl import make_method

    J = _jacobians()[which]  # noqa: N806
    G = J @ J.T  # noqa: N806
    agg = NashMTL(n_tasks=K, max_norm=0.0, update_weights_every=1, optim_niter=50)
    alpha_jd = agg.weighting(J).double()
    # torchjd solves on G / ||G||_F but scales its constraints back, so its alpha solves
    # alpha * (G alpha) = 1 on the raw G, as the engine's weights do ("mean": alpha / K);
    # the kernel with normalize=True solves it on G / ||G||_F
    raw = ant_kernels.nash_weights(G, normalize=False)
    normed = ant_kernels.nash_weights(G, normalize=True)
    torch.testing.assert_close(raw * (G @ raw), torch.ones(K, dtype=torch.float64))
    torch.testing.assert_close(normed, raw * G.norm().sqrt())
    ours = K * make_method("nash", K).weights(G, torch.ones(K, dtype=torch.bool)).double()
    # torchjd's convex-programme loop stops at ||G_n a - 1/a|| < 1e-3
    torch.testing.assert_close(alpha_jd, ours, rtol=5e-3, atol=0.0)
    torch.testing.assert_close(ours, raw, rtol=1e-6, atol=0.0)  # float32 weights


@pytest.mark.quick
def test_imtl_weights_equal_libmtl() -> None:
    from antdiff.mtl import make_method

    J = _jacobians()["conflicting"]  # noqa: N806
    lin = _Linear(J.float())
    host = peers.libmtl_host("imtl", lin, K)  # its loss scales start at 0: exp(0) L - 0 = L
    alpha_lib = torch.as_tensor(host.backward(lin.losses()), dtype=torch.float64)
    w = make_method("imtl", K).weights(J @ J.T, torch.ones(K, dtype=torch.bool)).double()
    torch.testing.assert_close(w, alpha_lib, rtol=1e-4, atol=1e-6)


# -- summary ---------------------------------------------------------------------------------------
def summarize(raw_json: str, out_stem: str) -> dict[str, Any]:
    """Reduce a --benchmark-json file to <out_stem>.json and <out_stem>.md."""
    raw = json.loads(Path(raw_json).read_text())
    rows: list[dict[str, Any]] = []
    machine: dict[str, Any] = {}
    kinds = set()
    for b in raw["benchmarks"]:
        info = dict(b["extra_info"])
        if "scenario" not in info:
            continue
        # (files written before rows said their device: a GPU row names its card)
        kinds.add(info.pop("kind", "cuda" if info.get("gpu") else "cpu"))
        machine = {key: info.pop(key) for key in MACHINE_KEYS}
        machine["peer_versions"] = info.pop("peer_versions")
        machine["threads"] = info.pop("threads")
        machine["omp_wait_policy"] = info.pop("omp_wait_policy")
        machine["gpu"] = info.pop("gpu", None)
        info["rounds"] = b["stats"]["rounds"]
        rows.append(info)
    if len(kinds) > 1:  # extras are against the same device's vanilla; one header per file
        raise ValueError(
            f"{raw_json} holds both CPU and CUDA cases: summarise one device per file "
            "(run with -k cpu or -k cuda)"
        )
    for model in {r["model"] for r in rows}:
        mine = [r for r in rows if r["model"] == model]
        bases = {name: next((r for r in mine if r["scenario"] == name), None)
                 for name in ("vanilla", "vanilla-x2")}  # fmt: skip
        for r in mine:
            budget = 1.1 * r["k"] * r["P"] * 4
            r["mem_budget_bytes"] = budget
            # accumulating scenarios against vanilla accumulating alike
            van = bases["vanilla-x2" if r["scenario"].endswith("-x2") else "vanilla"]
            for key in ("peak_bytes", "rss_peak_bytes"):
                if van is not None and None not in (van.get(key), r.get(key)):
                    r["extra_" + key] = r[key] - van[key]
    summary = {"machine": machine, "targets": TARGETS, "scenarios": rows}
    Path(out_stem + ".json").write_text(json.dumps(summary, indent=1) + "\n")
    Path(out_stem + ".md").write_text(_markdown(summary))
    return summary


@pytest.mark.quick
def test_summarize_refuses_cpu_and_cuda_rows_in_one_file(tmp_path):
    """A full run on a GPU machine collects CPU and CUDA cases; their rows were mixed under one
    GPU header, the CUDA extras taken against the CPU vanilla (synthetic rows, no GPU)."""

    def case(scenario, kind, gpu=None):
        info = {key: "x" for key in MACHINE_KEYS} | {
            "model": "tiny", "scenario": scenario, "k": K, "P": 10, "peak_bytes": 1,
            "rss_peak_bytes": 1, "peer_versions": {}, "threads": 1, "omp_wait_policy": "unset",
            "kind": kind, "B": 8, "size": "s", "step_s": 1.0, "ratio": 1.0,
            "backward_passes": 1.0, "backward_rows": 1.0,
        }  # fmt: skip
        if gpu:
            info["gpu"] = gpu
        return {"extra_info": info, "stats": {"rounds": 3}}

    rows = [case("vanilla", "cpu"), *(case(sc, "cuda", "card") for sc in ("vanilla", "ours-uw"))]
    (tmp_path / "raw.json").write_text(json.dumps({"benchmarks": rows}))
    with pytest.raises(ValueError, match="holds both CPU and CUDA cases"):
        summarize(str(tmp_path / "raw.json"), str(tmp_path / "s"))
    (tmp_path / "raw.json").write_text(json.dumps({"benchmarks": rows[1:]}))
    out = summarize(str(tmp_path / "raw.json"), str(tmp_path / "s"))
    assert out["machine"]["gpu"] == "card" and len(out["scenarios"]) == 2


# The targets are for the engine's default mode ("auto": one-pass where the model allows it);
# the micro-batched rows (ours-pcgrad, ours-nash, ...) are the fallback, shown without one.
TARGETS = {
    "ours-uw": 1.03,
    "ours-pcgrad-onepass": 1.25, "ours-uw+pcgrad-onepass": 1.25, "ours-nash-onepass": 1.3,
    "memory": "peak(gradient method) <= peak(vanilla) + 1.1 * k * P * 4 bytes",
}  # fmt: skip


def _mb(nbytes: float | None) -> str:
    return "-" if nbytes is None else f"{nbytes / 2**20:.1f}"


def _markdown(summary: dict[str, Any]) -> str:
    m = summary["machine"]
    pv = ", ".join(f"{k} {v}" for k, v in m["peer_versions"].items())
    syncs = any("host_syncs" in r for r in summary["scenarios"])
    where = f"{m['gpu']}; host: " if m.get("gpu") else ""
    lines = [
        "# Training-step benchmark: ANT methods vs vanilla vs peers",
        "",
        f"{where}{m['device']} ({m['cpu_model']}), torch.set_num_threads({m['threads']}), "
        f"OMP_WAIT_POLICY={m['omp_wait_policy']}; torch {m['torch']}, triton {m['triton']}, "
        f"python {m['python']}; {pv}; git {m['git_sha']}.",
        "k = 5 SNR clusters, linear schedule, eps-MSE, AdamW. Ratio = median over rounds of the "
        "scenario's step time over a vanilla step run back to back with it (order alternating); "
        "*nash25: total over one 25-step cycle over its paired vanilla steps' total. Vanilla "
        "draws t with torch.randint, ours and the peers with ANT's stratified sampler (its cost "
        "is in their ratios). Step ms: "
        "absolute times "
        "drift with the machine's load between rows; compare ratios. "
        "Peak = allocated tensor bytes above the pre-step level over two steps from a fresh "
        "model (torch's allocator; "
        + ("in the benchmark's process after the timing" if syncs else "fresh process per scenario")
        + "); extra = peak - vanilla's peak (an -x2 row: vanilla-x2's), "
        "checked against budget = 1.1 k P 4 bytes. RSS extra = the same for the resident set "
        "(adds glibc heap retention). MB = MiB."
        + (
            " Host syncs: synchronising calls in one step under "
            "torch.cuda.set_sync_debug_mode('warn'), ant.step's non-finite check included (fused "
            "AdamW: on the device)."
            if syncs
            else ""
        ),
        "",
        "| model | scenario | step ms | ratio | target | backward passes (rows) | peak MB | "
        "extra MB | budget MB | RSS extra MB |" + (" host syncs |" if syncs else ""),
        "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if syncs else ""),
    ]
    for r in summary["scenarios"]:
        tgt = summary["targets"].get(r["scenario"])
        target = f"<= {tgt}" if isinstance(tgt, float) else ""
        extra = r.get("extra_peak_bytes")
        lines.append(
            f"| {r['model']} ({r['size']}, B={r['B']}, P={r['P']}) | {r['scenario']} | "
            f"{1e3 * r['step_s']:.1f} | {r['ratio']:.2f}x | {target} | "
            f"{r['backward_passes']:.2f} ({r['backward_rows']:.2f}) | "
            f"{_mb(r['peak_bytes'])} | {_mb(extra)} | "
            f"{r['mem_budget_bytes'] / 2**20:.1f} | {_mb(r.get('extra_rss_peak_bytes'))} |"
            + (f" {r.get('host_syncs', '-')} |" if syncs else "")
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if sys.argv[1] == "--memory":
        print(json.dumps(measure_memory(sys.argv[2], sys.argv[3])))
    elif sys.argv[1] == "--rss":
        print(json.dumps(measure_rss(sys.argv[2], sys.argv[3])))
    else:
        summarize(sys.argv[1], sys.argv[2])

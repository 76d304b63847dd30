"""No host sync inside a training step, checked on CPU.

On a GPU, ``torch.cuda.set_sync_debug_mode("error")`` does this (tests/test_engine.py, skipped
without one). Here a dispatch mode raises on the operators that make the host wait for a CUDA
device: reading a value (``.item()``, ``float(t)``, ``bool(t)``, a Python ``if`` on a tensor),
operators whose output shape depends on the data (``nonzero``, ``masked_select``, ``unique``,
boolean indexing, ...) and those that read a result back (``bincount``, ``histc``, the error
flag of ``linalg`` solvers). A function mode adds ``.cpu()``, ``.tolist()`` and ``.numpy()``,
which bypass the dispatcher on CPU tensors. Together they see the forward, the backward
(autograd runs it under the same modes) and the optimiser step. Not seen: ``.to("cpu")`` (here
indistinguishable from the host-to-device copies a step makes on purpose) and blocking
host-to-device copies; the CUDA test covers those. GradScaler syncs inside torch by design and
is not part of these steps.
"""

from __future__ import annotations

import time
import warnings

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from antdiff import ANT
from antdiff.diffusion import GaussianDiffusion
from antdiff.models import create_model

_SYNCING = {
    "aten::_local_scalar_dense", "aten::is_nonzero", "aten::nonzero", "aten::nonzero_static",
    "aten::masked_select", "aten::unique_dim", "aten::_unique", "aten::_unique2",
    "aten::unique_consecutive", "aten::unique_dim_consecutive", "aten::equal",
    "aten::bincount", "aten::histc", "aten::_linalg_check_errors",
}  # fmt: skip
# tensor methods that copy to the host, and conversions that read through the data pointer
_HOST_COPIES = {"cpu", "tolist", "numpy", "__array__", "item", "__float__", "__int__", "__bool__"}


class HostSyncError(AssertionError):
    pass


class NoHostSync(TorchDispatchMode):
    """Raises HostSyncError on the (allowed + 1)-th operator that would synchronise with a CUDA
    device; ``syncs`` counts them."""

    def __init__(self, allowed: int = 0) -> None:
        super().__init__()
        self.allowed, self.syncs = allowed, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if (
            name in _SYNCING
            or (name == "aten::repeat_interleave" and (kwargs or {}).get("output_size") is None)
            or (name.startswith(("aten::index", "aten::_index_put")) and _bool_index(args))
        ):
            self.syncs += 1
            if self.syncs > self.allowed:
                raise HostSyncError(f"{name} would synchronise the host with the device")
        return func(*args, **(kwargs or {}))


class NoHostCopy(TorchFunctionMode):
    """Raises HostSyncError on ``.cpu()``, ``.tolist()``, ``.numpy()``, which bypass the
    dispatcher when the tensor already lives on the CPU. (``.to("cpu")`` is not flagged: here it
    cannot be told apart from the host-to-device copies a step makes on purpose.)"""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in _HOST_COPIES:
            raise HostSyncError(f"Tensor.{name} copies to the host")
        return func(*args, **(kwargs or {}))


def _bool_index(args) -> bool:
    """x[mask] and x[mask] = v: a boolean index becomes integer indices (nonzero) first."""
    indices = args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else ()
    return any(
        isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices
    )


def test_detector_catches_value_reads():
    x = torch.ones(3)
    reads = (
        lambda: x.sum().item(), lambda: float(x.max()), lambda: bool(x.any()),
        lambda: x.nonzero(), lambda: x[x > 0], lambda: x.__setitem__(x > 0, 2.0),
    )  # fmt: skip
    for read in reads:
        with pytest.raises(HostSyncError), NoHostSync():
            read()
    copies = (
        lambda: x.cpu(), lambda: x.tolist(), lambda: x.numpy(), lambda: torch.bincount(x.long()),
        lambda: torch.linalg.solve(torch.eye(3), x),
    )  # fmt: skip
    for copy in copies:
        with pytest.raises(HostSyncError), NoHostCopy(), NoHostSync():
            copy()
    with NoHostSync():  # device-side selection is fine
        torch.where(x > 0, x, 0.0).sum()


def test_step_code_copies_host_values_to_the_device_without_waiting():
    """A tensor built from host values straight on a CUDA device (``torch.tensor(v,
    device=d)``, ``torch.tensor(v).to(d)``) is a blocking copy that waits on the stream, a host
    sync the CPU detectors above cannot see. The engine and the methods copy host values through
    pinned memory (``antdiff.engine.timesteps.to_device``); this reads their source for the
    blocking forms. (The one-pass step's padded layout was built the blocking way, two syncs a
    step on an H200.)"""
    import re
    from pathlib import Path

    pkg = Path(__file__).resolve().parents[1] / "python" / "antdiff"
    call = re.compile(r"torch\.(?:as_)?tensor\(((?:[^()]|\([^()]*\))*)\)(\.to\()?", re.S)
    hits = [
        f"{f.relative_to(pkg)}: {m.group(0)[:80]}"
        for d in ("engine", "mtl")
        for f in sorted((pkg / d).glob("*.py"))
        for m in call.finditer(f.read_text())
        if "device" in m.group(1) or m.group(2)
    ]
    assert not hits, hits
    assert call.search("torch.tensor([src, keep], device=dev)").group(1)  # the pattern bites
    assert call.search("torch.tensor(x, dtype=torch.int64).to(dev)").group(2)


def _step(
    family: str, method: str, mode: str, B: int, skip_nonfinite: bool = False,
    sampling: str = "proportional", device: str = "cpu", amp: bool = False, fused: bool = False,
    method_kwargs: dict | None = None, micro_batches: int = 1,
):  # fmt: skip
    """One training step as a trainer writes it (``ant.step`` without the non-finite read);
    ``amp``: the forward under bf16 autocast; ``fused``: a fused AdamW (which skips a
    non-finite step on the device) instead of SGD; ``micro_batches``: the step's batch in that
    many micro-batches (ant.backward(accumulate=True) or ant.reduce for each)."""
    torch.manual_seed(0)
    model = create_model("adm-tiny" if family == "unet" else "dit-tiny").to(device)
    cond = family == "dit"
    diffusion = GaussianDiffusion("linear")
    shape = (B, model.in_channels, 8, 8)
    x, noise = torch.randn(shape, device=device), torch.randn(shape, device=device)
    y = torch.randint(0, 10, (B,), device=device)
    every = 3 if "nash" in method else None
    ant = ANT("linear", k=5, method=method, mode=mode, update_every=every, sampling=sampling,
              method_kwargs=method_kwargs)  # fmt: skip
    ant.attach(model)
    # SGD: AdamW's step counters are host tensors, whose reads this CPU check cannot tell apart
    groups = [{"params": list(model.parameters())}, *ant.param_groups()]
    if fused:
        opt = torch.optim.AdamW(groups, lr=1e-4, fused=True)
    else:
        opt = torch.optim.SGD(groups, lr=1e-4, momentum=0.9)

    def loss_fn(batch, t):
        x0, eps, labels = batch
        with torch.autocast(torch.device(device).type, torch.bfloat16, enabled=amp):
            out = diffusion.training_losses(model, x0, t, eps, {"y": labels} if cond else None)
        return out["loss"]

    b = B // micro_batches

    def step():
        opt.zero_grad(set_to_none=True)
        for m in range(micro_batches):
            t = ant.sample_timesteps(b, device=device)
            batch = tuple(v[m * b : (m + 1) * b] for v in (x, noise, y))
            if ant.needs_gradients:
                ant.backward(loss_fn, batch, t, accumulate=m < micro_batches - 1)
            else:
                ant.reduce(loss_fn(batch, t), t).backward()
        ant.step(opt, skip_nonfinite=skip_nonfinite)

    step.x = x  # the batch's x0, shared by every step (tests poison it)
    step.ant = ant
    return step


STEP_CASES = [
    ("unet", "uw", "auto"),
    ("unet", "pcgrad", "onepass"),
    ("unet", "uw+pcgrad", "onepass"),
    ("unet", "nash", "onepass"),
    ("unet", "pcgrad", "micro"),
    ("dit", "pcgrad", "onepass"),
    ("dit", "uw+nash", "onepass"),
    ("dit", "imtl", "micro"),
    ("dit", "mgda", "onepass"),
    ("dit", "cagrad", "onepass"),
    ("dit", "graddrop", "onepass"),
    ("dit", "famo", "auto"),
    ("dit", "dwa", "auto"),
    ("dit", "rlw", "auto"),
    ("unet", "vanilla", "auto"),
    ("unet", "ls", "auto"),
    ("unet", "famo+mgda", "onepass"),
    ("dit", "imtl", "onepass"),
]  # fmt: skip


# two micro-batches a step: ant.backward(accumulate=True) for gradient methods, two
# ant.reduce for loss-space ones
WINDOW_CASES = [
    ("unet", "pcgrad", "onepass"),
    ("unet", "pcgrad", "micro"),
    ("dit", "uw+nash", "onepass"),
    ("dit", "graddrop", "onepass"),
    ("unet", "uw", "auto"),
]  # fmt: skip
CASES = [pytest.param(*c, 1, id="-".join(c)) for c in STEP_CASES] + [
    pytest.param(*c, 2, id="-".join((*c, "x2"))) for c in WINDOW_CASES
]


@pytest.mark.parametrize(("family", "method", "mode", "micro"), CASES)
def test_engine_step_has_no_host_sync(family, method, mode, micro):
    step = _step(family, method, mode, B=20, micro_batches=micro)
    step()  # the first step may build buffers and audit the model
    with NoHostCopy(), NoHostSync():
        for _ in range(4):  # covers Nash's off-steps (update_every=3)
            step()


@pytest.mark.parametrize("method", ["uw+pcgrad", "nash"])
def test_no_host_sync_across_a_telemetry_fold(method):
    """The telemetry folds its kept step tensors every FOLD steps: a window of FOLD + 2 steps
    crosses one (the other cases run 4 steps and never reach it)."""
    from antdiff.engine.telemetry import FOLD

    step = _step("dit", method, "auto", B=6, sampling="uniform")
    step()
    with NoHostCopy(), NoHostSync():
        for _ in range(FOLD + 2):
            step()


@pytest.mark.parametrize("method", ["pcgrad", "nash", "uw"])
def test_no_host_sync_with_empty_clusters(method):
    """Uniform sampling at B = 6, k = 5: most steps leave some cluster empty."""
    step = _step("dit", method, "auto", B=6, sampling="uniform")
    step()
    with NoHostCopy(), NoHostSync():
        for _ in range(6):
            step()


@pytest.mark.parametrize("method", ["uw", "pcgrad"])
def test_skipping_nonfinite_steps_reads_one_flag_per_step(method):
    """ant.step's default non-finite check is the step's one host read, made after the work is
    queued (as GradScaler's); skip_nonfinite=False (above) makes none."""
    step = _step("dit", method, "onepass", B=20, skip_nonfinite=True)
    step()
    with NoHostSync(allowed=3) as mode:
        for _ in range(3):
            step()
    assert mode.syncs == 3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU here")
@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("family", "method", "mode", "micro"), CASES)
def test_cuda_engine_step_has_no_host_sync(family, method, mode, micro, amp):
    """The same steps on a GPU under torch's own detector: any synchronising call raises."""
    step = _step(family, method, mode, B=20, device="cuda", amp=amp, micro_batches=micro)
    step()  # the first step builds buffers and audits the model
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(4):  # covers Nash's off-steps (update_every=3)
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU here")
@pytest.mark.parametrize(
    ("family", "method", "mode"),
    [("unet", "uw", "auto"), ("unet", "pcgrad", "onepass"), ("dit", "uw+nash", "onepass")],
)
def test_cuda_fused_optimizer_skip_check_has_no_host_sync(family, method, mode):
    """ant.step's default non-finite skip with a fused AdamW happens on the device: no sync."""
    step = _step(family, method, mode, B=20, device="cuda", skip_nonfinite=True, fused=True)
    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(4):
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def _poisoned_run(method: str, device: str, sync_check: bool, **kw) -> list[str]:
    """A fused AdamW run with one NaN batch among finite ones; the warnings it gave."""
    step = _step("unet", method, "auto", B=20, device=device, skip_nonfinite=True, fused=True,
                 **kw)  # fmt: skip
    step()
    keep = step.x.clone()
    if sync_check:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            step.x.fill_(float("nan"))
            step()
            step.x.copy_(keep)
            for _ in range(3):
                if sync_check:
                    time.sleep(0.5)  # the flag reaches the host: the next ant.step reports it
                step()
            early = [str(w.message) for w in seen]
    finally:
        if sync_check:
            torch.cuda.set_sync_debug_mode("default")
    return early


@pytest.mark.parametrize("method", ["uw", "pcgrad"])
def test_a_skipped_step_under_a_fused_optimizer_is_reported(method):
    msgs = _poisoned_run(method, "cpu", sync_check=False)
    assert any("skipped the step on the device" in m for m in msgs)  # before any stats()
    if method == "uw":  # FAMO's reason for finite losses below its min_loss comes along
        msgs = _poisoned_run("famo", "cpu", sync_check=False, method_kwargs={"min_loss": 1e3})
        assert any("below FAMO's min_loss=1000" in m for m in msgs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU here")
@pytest.mark.parametrize("method", ["uw", "famo", "pcgrad"])
def test_cuda_a_skipped_step_is_reported_without_a_host_sync(method):
    """A non-finite step under a fused AdamW is skipped on the device and warned about at a
    later ant.step, from host copies made beside the flag: FAMO's reason (its losses) read
    there blocked on the queued step before."""
    msgs = _poisoned_run(method, "cuda", sync_check=True)
    assert any("skipped the step on the device" in m for m in msgs)  # inside the checked window
    if method == "famo":  # finite losses below min_loss: the reason, from the pinned copies
        msgs = _poisoned_run(method, "cuda", sync_check=True, method_kwargs={"min_loss": 1e3})
        assert any("below FAMO's min_loss=1000" in m for m in msgs)

"""graddrop: the fused kernel and the C++ path equal the chunked reference exactly, the
reference equals GradDrop's per-column definition in float64, and ``out`` may be a row of J."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ant_kernels import backend_reasons, graddrop, graddrop_ref, uniform_ref
from antdiff.mtl import native

CASES = [(k, P) for k in (1, 2, 3, 5, 8) for P in (1, 7, 4099, 65539)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _case(k: int, P: int, dtype=torch.float32, seed: int = 0):
    """J [k, P] as a column range of a wider buffer (rows 16-padded, 4 columns in), with exact
    zeros and a -0.0 in it; present with one absent cluster when k > 1."""
    g = torch.Generator().manual_seed(seed + 1000 * k + P)
    wide = torch.randn(k, P + 24, generator=g) * torch.logspace(-1, 1, k)[:, None]
    wide[:, 4:9] = 0.0
    wide[-1, 10] = -0.0
    J = wide.to(dtype)[:, 4 : 4 + P]
    present = torch.ones(k, dtype=torch.bool)
    if k > 1:
        present[k // 2] = False
    return J, present


def _definition(J: torch.Tensor, present: torch.Tensor, u: torch.Tensor, leak: float, div: float):
    """GradDrop per column, in float64 numpy."""
    g = np.where(present.numpy()[:, None], J.double().numpy(), 0.0)
    total, mass = g.sum(0), np.abs(g).sum(0)
    purity = 0.5 * (1 + total / np.where(mass > 0, mass, 1.0))
    uu = u.double().numpy()
    kept = ((purity > uu) & (g > 0)) | ((purity < uu) & (g < 0))
    return np.where(kept, g, leak * g).sum(0) / div


@pytest.mark.parametrize("leak", [0.0, 0.25, 1.0])
def test_reference_is_the_definition(leak):
    k, P = 5, 4099
    J, present = _case(k, P, torch.float64)
    step = torch.tensor([3])
    div = torch.tensor(4.0, dtype=torch.float64)
    out = graddrop_ref(J, present, 11, step, leak, div, chunk=1000)  # several chunks
    u = uniform_ref(11, step, P)
    np.testing.assert_allclose(out.numpy(), _definition(J, present, u, leak, 4.0), rtol=1e-12,
                               atol=1e-15)  # fmt: skip
    # the sign picked follows the purity: positives are kept with probability P
    if leak == 0.0:
        g = J[present].numpy()
        pos, neg = np.where(g > 0, g, 0).sum(0), np.where(g < 0, g, 0).sum(0)
        mixed = (pos != 0) & (neg != 0)  # columns where the draw decides
        kept_pos = np.isclose(out.numpy() * 4, pos, rtol=1e-12, atol=0)[mixed]
        pur = 0.5 * (1 + g.sum(0)[mixed] / np.abs(g).sum(0)[mixed])
        assert mixed.sum() > 3000 and abs(kept_pos.mean() - pur.mean()) < 0.03


@pytest.mark.interpret
@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("k,P", CASES, ids=[f"k{k}-P{P}" for k, P in CASES])
def test_triton_equals_reference(k, P, dt, kernel_device, force_triton):
    J, present = _case(k, P, DTYPES[dt])
    step = torch.tensor([2**33 + 1])
    div = torch.tensor(float(present.sum()))
    seed = 2**63 + 7 if P % 2 else 1  # a u64 key (as the engine's), and 1 (a Triton constant)
    # the same float32 arithmetic; only the final rounding to a half-precision out may differ
    # (the interpreter converts as numpy does)
    tol = {"rtol": 0, "atol": 0} if dt == "fp32" else {"rtol": torch.finfo(J.dtype).eps,
                                                       "atol": 0}  # fmt: skip
    for leak in (0.0, 0.25):
        ref = graddrop_ref(J, present, seed, step, leak, div)
        got = graddrop(J.to(kernel_device), present.to(kernel_device), seed,
                       step.to(kernel_device), leak, div.to(kernel_device))  # fmt: skip
        assert got.dtype == J.dtype
        torch.testing.assert_close(got.cpu(), ref, **tol)
    # small blocks (several programs, a partial last one), and out = row 0 of J itself
    from ant_kernels.graddrop import graddrop_triton

    Jd = J.to(kernel_device).clone()
    bp = 8 if P < 100 else 4096  # the interpreter's cost is per program
    keep, d1 = present.to(kernel_device).float(), div.reshape(1).to(kernel_device)
    step_d = step.to(kernel_device)
    small = graddrop_triton(Jd, keep, 7, step_d, 0.0, d1, torch.empty_like(Jd[0]), bp)
    torch.testing.assert_close(small.cpu(), graddrop_ref(J, present, 7, step, 0.0, div), **tol)
    graddrop(Jd, present.to(kernel_device), 7, step.to(kernel_device), 0.0,
             div.to(kernel_device), out=Jd[0])  # fmt: skip
    torch.testing.assert_close(Jd[0].cpu(), graddrop_ref(J, present, 7, step, 0.0, div), **tol)


@pytest.mark.parametrize("k,P", CASES, ids=[f"k{k}-P{P}" for k, P in CASES])
def test_cpp_equals_reference(k, P, monkeypatch):
    assert native._C is not None, "antdiff._C is not built: run `make build`"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("ANT_KERNELS_BACKEND", "auto")
    called = []
    real = native._C._graddrop_at
    monkeypatch.setattr(native._C, "_graddrop_at", lambda *a: called.append(1) or real(*a),
                        raising=False)  # fmt: skip
    J, present = _case(k, P)
    step = torch.tensor([5])
    div = torch.tensor(float(present.sum()))
    for leak in (0.0, 0.25, 1.0):
        ref = graddrop_ref(J, present, 2**63 + 5, step, leak, div)
        assert torch.equal(native.graddrop(J, present, 2**63 + 5, step, leak, div), ref)
    Jc = J.clone()
    native.graddrop(Jc, present, 9, step, 0.0, div, out=Jc[0])  # in place, as the engine does
    assert torch.equal(Jc[0], graddrop_ref(J, present, 9, step, 0.0, div))
    assert called, "the C++ path did not serve float32 CPU tensors"
    # what C++ does not take goes to ant_kernels: float64, strided columns, a non-float32 out
    for args in ((J.double(), present), (J.t().contiguous().t(), present)):
        torch.testing.assert_close(native.graddrop(*args, 9, step, 0.0, div).double(),
                                   graddrop_ref(*args, 9, step, 0.0, div).double())  # fmt: skip


def test_nonfinite_and_absent_rows(monkeypatch):
    """NaN / inf in an absent row are ignored; in a present row they reach out (the engine then
    skips the step); with every cluster absent the update is 0. Reference, C++ and (under the
    interpreter) the kernel agree."""
    J, present = _case(3, 101)
    J[1, :10] = float("nan")  # row 1 is absent
    J[2, 20] = float("inf")
    J[0, 30] = float("nan")
    step, div = torch.tensor([1]), torch.tensor(2.0)
    ref = graddrop_ref(J, present, 5, step, 0.1, div)
    assert torch.isfinite(ref[:10]).all() and not torch.isfinite(ref[[20, 30]]).any()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("ANT_KERNELS_BACKEND", "auto")
    torch.testing.assert_close(native.graddrop(J, present, 5, step, 0.1, div), ref, equal_nan=True)
    none = torch.zeros(3, dtype=torch.bool)
    assert torch.equal(native.graddrop(J, none, 5, step, 0.1, div), torch.zeros(101))
    assert torch.equal(graddrop_ref(J, none, 5, step, 0.1, div), torch.zeros(101))


@pytest.mark.interpret
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy's NaN
def test_nonfinite_and_absent_rows_triton(kernel_device, force_triton):
    J, present = _case(3, 101)
    J[1, :10], J[2, 20], J[0, 30] = float("nan"), float("inf"), float("nan")
    step, div = torch.tensor([1]), torch.tensor(2.0)
    for pres in (present, torch.zeros(3, dtype=torch.bool)):
        got = graddrop(*(t.to(kernel_device) for t in (J, pres)), 5, step.to(kernel_device), 0.1,
                       div.to(kernel_device))  # fmt: skip
        torch.testing.assert_close(got.cpu(), graddrop_ref(J, pres, 5, step, 0.1, div),
                                   equal_nan=True, rtol=0, atol=0)  # fmt: skip


def test_cpp_declines_what_it_cannot_read(monkeypatch):
    """Rows that share memory (an expand) and tensors off the CPU go to ant_kernels, which
    handles or names them: C++ never reads a device pointer or overlapping rows."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("ANT_KERNELS_BACKEND", "auto")
    monkeypatch.setattr(native._C, "_graddrop_at", lambda *a: pytest.fail("C++ was called"),
                        raising=False)  # fmt: skip
    row = torch.randn(50)
    J, present = row.expand(3, 50), torch.ones(3, dtype=torch.bool)
    step, div = torch.tensor([0]), torch.tensor(3.0)
    ref = graddrop_ref(J.contiguous(), present, 1, step, 0.0, div)
    torch.testing.assert_close(native.graddrop(J, present, 1, step, 0.0, div), ref)
    with pytest.raises(ValueError, match="must share one device"):
        native.graddrop(J, present, 1, torch.tensor([0], device="meta"), 0.0, div)


def test_bad_input():
    J, present = _case(3, 10)
    step, div = torch.tensor([0]), torch.tensor(1.0)
    with pytest.raises(ValueError, match=r"present must be a bool tensor of shape \[k\]=\[3\]"):
        graddrop(J, present.float(), 1, step, 0.0, div)
    with pytest.raises(ValueError, match=r"leak must be a number in \[0, 1\]"):
        graddrop(J, present, 1, step, 1.5, div)
    with pytest.raises(ValueError, match="divisor must be a one-element float tensor"):
        graddrop(J, present, 1, step, 0.0, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"out must be a float tensor of shape \[P\]=\[10\]"):
        graddrop(J, present, 1, step, 0.0, div, out=torch.empty(9))
    with pytest.raises(ValueError, match="out has stride 0"):  # the kernel wrote one of P results
        graddrop(J, present, 1, step, 0.0, div, out=torch.empty(1).expand(10))
    with pytest.raises(ValueError, match="seed must be an int in"):
        graddrop(J, present, -3, step, 0.0, div)
    with pytest.raises(ValueError, match="one-element int64 tensor"):
        graddrop(J, present, 1, torch.tensor([0.0]), 0.0, div)
    assert any("k=65" in r for r in backend_reasons("graddrop", torch.empty(65, 3), k=65))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU here")
def test_cuda_matches_reference_without_host_sync(force_triton):
    """Bit-identical to the reference on the GPU (correctly rounded divisions by a divisor
    that is not a power of two; P = 1e6 + 3 takes two launches)."""
    J, present = _case(6, 1_000_003)
    Jd, pd, step = J.cuda(), present.cuda(), torch.tensor([4], device="cuda")
    div = torch.tensor(5.0, device="cuda")
    graddrop(Jd, pd, 2**63 + 3, step, 0.3, div)  # compile outside the sync check
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = graddrop(Jd, pd, 2**63 + 3, step, 0.3, div, out=Jd[0])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ref = graddrop_ref(J, present, 2**63 + 3, torch.tensor([4]), 0.3, torch.tensor(5.0))
    assert torch.equal(got.cpu(), ref)


def _tie_inputs():
    """Columns whose purity equals their draw U exactly (g = (U, -(1 - U)): purity = U, every
    operation exact in float32): both strict comparisons are false, so with leak 0 the column
    is 0; a >= or <= would keep one sign. Random J never ties (U has 24 bits)."""
    P, seed = 4099, 2**63 + 7  # noqa: N806
    step = torch.tensor([2**33 + 1], dtype=torch.int64)
    u = uniform_ref(seed, step, P)
    J = torch.stack([u, -(1 - u)])  # noqa: N806
    present, div = torch.ones(2, dtype=torch.bool), torch.tensor(1.0)
    ref = graddrop_ref(J, present, seed, step, 0.0, div)
    assert torch.equal(ref, torch.zeros(P))  # the definition
    return J, present, seed, step, div, ref


def test_cpp_purity_tie_drops_both_signs(monkeypatch):
    from antdiff.mtl import native

    assert native._C is not None, "antdiff._C is not built: run `make build`"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("ANT_KERNELS_BACKEND", "auto")
    J, present, seed, step, div, ref = _tie_inputs()  # noqa: N806
    assert torch.equal(native.graddrop(J, present, seed, step, 0.0, div), ref)


@pytest.mark.interpret
def test_triton_purity_tie_drops_both_signs(kernel_device, force_triton):
    """The tie of _tie_inputs on the Triton kernel."""
    J, present, seed, step, div, ref = _tie_inputs()  # noqa: N806
    got = graddrop(J.to(kernel_device), present.to(kernel_device), seed, step.to(kernel_device),
                   0.0, div.to(kernel_device))  # fmt: skip
    assert torch.equal(got.cpu(), ref)

"""combine: Triton kernel vs same-dtype reference vs float64; in place, aliasing, strides."""

from __future__ import annotations

import pytest
import torch

from ant_kernels import combine, combine_ref
from ant_kernels.combine import combine_triton

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
EPS32 = torch.finfo(torch.float32).eps
CASES = [
    (k, P, d, o)
    for k in (1, 2, 3, 5, 8)
    for P in (1, 7, 4099, 65539)
    for d in DTYPES
    for o in dict.fromkeys(("fp32", d))  # out fp32, and out in J's dtype
] + [(5, 4099, "fp32", "bf16"), (3, 65539, "bf16", "fp16")]
IDS = [f"k{k}-P{P}-{d}-out{o}" for k, P, d, o in CASES]


def _check(out: torch.Tensor, w: torch.Tensor, J: torch.Tensor) -> None:
    """Rule: |out - exact| <= 2 |same-dtype ref - exact| + atol (fp32 noise + out rounding)."""
    exact = w.cpu().double() @ J.cpu().double()
    ref = combine_ref(w.cpu(), J.cpu(), torch.empty_like(out, device="cpu"))
    err = (out.cpu().double() - exact).abs()
    err_ref = (ref.double() - exact).abs().max().item()
    scale = w.cpu().double().abs() @ J.cpu().double().abs()
    # one ulp of out's dtype (two roundings of nearby fp32 values can straddle a tie) plus
    # k ulps of fp32 accumulation
    atol = torch.finfo(out.dtype).eps * exact.abs() + (J.shape[0] + 1) * EPS32 * scale + 1e-30
    bad = err > 2 * err_ref + atol
    assert not bad.any(), (
        f"{int(bad.sum())} columns off, first at {bad.nonzero()[0].item()}: "
        f"max err {err.max().item():.3e}, ref err {err_ref:.3e}"
    )


@pytest.mark.interpret
@pytest.mark.parametrize("k,P,dt,odt", CASES, ids=IDS)
def test_combine_matches_reference(k, P, dt, odt, kernel_device, force_triton):
    J = torch.randn(k, P, device=kernel_device).to(DTYPES[dt])
    w = torch.randn(k, device=kernel_device)
    out = torch.full((P,), float("nan"), dtype=DTYPES[odt], device=kernel_device)
    res = combine(w, J, out)
    assert res is out
    _check(out, w, J)
    # small integers: exact in every dtype and every order of summation
    Ji = torch.randint(-8, 9, (k, P), device=kernel_device)
    wi = torch.randint(-4, 5, (k,), device=kernel_device)
    res = combine(wi.float(), Ji.to(DTYPES[dt]), torch.empty(P, device=kernel_device))
    assert torch.equal(res.cpu(), (wi.cpu() @ Ji.cpu()).float())


@pytest.mark.interpret
def test_combine_out_none_is_fp32(kernel_device, force_triton):
    J = torch.randn(3, 4099, device=kernel_device).to(torch.bfloat16)
    w = torch.randn(3, device=kernel_device)
    res = combine(w, J)
    assert res.dtype == torch.float32 and res.shape == (4099,)
    _check(res, w, J)


@pytest.mark.interpret
@pytest.mark.parametrize("row", [0, 2, 4])
def test_combine_into_a_row_of_J(row, kernel_device, force_triton):
    J = torch.randn(5, 4099, device=kernel_device)
    w = torch.randn(5, device=kernel_device)
    J0 = J.clone()
    combine(w, J, J[row])
    _check(J[row], w, J0)
    J[row] = J0[row]
    assert torch.equal(J, J0)  # the other rows are untouched
    J = J0.clone()
    combine_triton(w, J, J[row], block_p=256)  # many programs, same guarantee
    _check(J[row], w, J0)


@pytest.mark.interpret
@pytest.mark.parametrize("view", ["row-slice", "col-stride3", "transposed", "out-strided"])
def test_combine_strided(view, kernel_device, force_triton):
    base = torch.randn(9, 3001, device=kernel_device)
    J = {
        "row-slice": base[1::2, 5:2900],
        "col-stride3": base[:5, ::3],
        "transposed": torch.randn(4099, 5, device=kernel_device).T,
        "out-strided": base[:4],
    }[view]
    k, P = J.shape
    w = torch.randn(k, dtype=torch.float64, device=kernel_device)  # float64 w is read as fp32
    big = torch.zeros(2 * P, device=kernel_device)
    out = big[::2] if view == "out-strided" else big[:P]
    combine(w, J, out)
    _check(out, w.float(), J)
    if view == "out-strided":
        assert torch.equal(big[1::2], torch.zeros(P, device=kernel_device))


@pytest.mark.parametrize(
    "w,J,out,match",
    [
        (torch.ones(3), torch.ones(4, 10), None, "w must"),
        (torch.ones(4), torch.ones(4, 10), torch.ones(9), "out must"),
        (torch.ones(4), torch.ones(4, 10), torch.ones(10, dtype=torch.int64), "out must"),
        (torch.ones(4, dtype=torch.int64), torch.ones(4, 10), None, "w must"),
        (torch.ones(4), torch.ones(10), None, "J must"),
    ],
    ids=["w-len", "out-len", "out-int", "w-int", "J-1d"],
)
def test_combine_bad_input(w, J, out, match):
    with pytest.raises(ValueError, match=match):
        combine(w, J, out)


def test_combine_reference_path_float64(monkeypatch):
    monkeypatch.setenv("ANT_KERNELS_BACKEND", "auto")
    J = torch.randn(4, 333, dtype=torch.float64)
    w = torch.randn(4, dtype=torch.float64)
    res = combine(w, J)
    assert res.dtype == torch.float64
    torch.testing.assert_close(res, w @ J, rtol=0, atol=1e-12)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU here")
@pytest.mark.parametrize("dt", list(DTYPES))
def test_combine_cuda_no_host_sync(dt, force_triton):
    J = torch.randn(5, 1_000_003, device="cuda").to(DTYPES[dt])
    w = torch.randn(5, device="cuda")
    out = torch.empty(J.shape[1], device="cuda")
    combine(w, J, out)  # compile outside the sync check
    torch.cuda.set_sync_debug_mode("error")
    try:
        combine(w, J, out)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    _check(out, w, J)

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
    # one ulp of out's dtype (two roundings of nearby fp32 values can straddle a tie; and the
    # Triton interpreter truncates fp32 -> bf16 stores where a GPU rounds to nearest even: the
    # exact rounding is checked on a GPU, bit for bit, by the sequential-loop test) plus k ulps
    # of fp32 accumulation
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


@pytest.mark.parametrize("P", [1 << 16, (1 << 16) + 7, 755009])  # 64 blocks, + a tail
@pytest.mark.parametrize("where", ["row-of-J", "strided", "new"])
def test_combine_ref_in_column_blocks(P, where):
    """The reference's blocked product (64 column blocks, then the tail) equals float64 w @ J,
    also written into a row of J it reads or into a strided out."""
    J = torch.randn(5, P)
    w = torch.randn(5)
    J0 = J.clone()
    big = torch.zeros(2 * P)
    out = {"row-of-J": J[3], "strided": big[::2], "new": None}[where]
    res = combine_ref(w, J, out)
    assert res.shape == (P,) and res.dtype == torch.float32 and (out is None or res is out)
    _check(res, w, J0)
    if where == "strided":
        assert torch.equal(big[1::2], torch.zeros(P))
    J[3] = J0[3]
    assert torch.equal(J, J0)  # the other rows are untouched
    # independent of the reference: small integers are exact in any order of summation, and
    # a float64 J stays float64 (blocks in column order, tail included)
    Ji = torch.randint(-8, 9, (5, P))
    wi = torch.randint(-4, 5, (5,))
    assert torch.equal(combine_ref(wi.float(), Ji.float()), (wi @ Ji).float())
    res64 = combine_ref(w.double(), J0.double())
    assert res64.dtype == torch.float64
    torch.testing.assert_close(res64, w.double() @ J0.double(), rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "w,J,out,match",
    [
        (torch.ones(3), torch.ones(4, 10), None, "w must"),
        (torch.ones(4), torch.ones(4, 10), torch.ones(9), "out must"),
        (torch.ones(4), torch.ones(4, 10), torch.ones(10, dtype=torch.int64), "out must"),
        (torch.ones(4, dtype=torch.int64), torch.ones(4, 10), None, "w must"),
        (torch.ones(4), torch.ones(10), None, "J must"),
        (torch.ones(4), torch.ones(4, 10), torch.ones(1).expand(10), "stride 0"),
    ],
    ids=["w-len", "out-len", "out-int", "w-int", "J-1d", "out-expanded"],
)
def test_combine_bad_input(w, J, out, match):
    with pytest.raises(ValueError, match=match):
        combine(w, J, out)


def _negated(x: torch.Tensor) -> torch.Tensor:
    """A tensor equal to ``x`` that carries torch's lazy negation bit (public API only)."""
    v = torch.complex(torch.zeros_like(x), -x).conj().imag  # -(-x), the sign kept lazily
    assert v.is_neg() and torch.equal(v, x)
    return v


@pytest.mark.interpret
def test_kernels_refuse_or_resolve_the_lazy_negation_bit(kernel_device, monkeypatch):
    """A view with the negation bit holds -x in memory: the kernels read memory, so forced
    Triton must refuse it (naming resolve_neg) and auto must take the reference, which applies
    it. Triton gave combine and GradDrop the wrong sign, PCGrad and Nash-MTL wrong weights."""
    import ant_kernels

    gen = torch.Generator().manual_seed(5)
    J = torch.randn(4, 37, generator=gen).to(kernel_device)
    w = torch.randn(4, generator=gen).to(kernel_device)
    G = (J @ J.T).double()
    orders = torch.stack([torch.randperm(4, generator=gen) for _ in range(4)]).to(kernel_device)
    present = torch.ones(4, dtype=torch.bool, device=kernel_device)
    step = torch.zeros(1, dtype=torch.int64, device=kernel_device)
    calls = {
        "combine": (lambda J, w, G: ant_kernels.combine(w, J), (J, w, G)),
        "pcgrad": (lambda J, w, G: ant_kernels.pcgrad_weights(G, orders), (J, w, G)),
        "nash": (lambda J, w, G: ant_kernels.nash_weights(G), (J, w, G)),
        "graddrop": (lambda J, w, G: ant_kernels.graddrop(J, present, 3, step), (J, w, G)),
    }
    for name, (call, (J0, w0, G0)) in calls.items():
        expected = call(J0, w0, G0)
        neg = {"combine": (_negated(J0), _negated(w0), G0), "graddrop": (_negated(J0), w0, G0),
               "pcgrad": (J0, w0, _negated(G0)), "nash": (J0, w0, _negated(G0))}[name]  # fmt: skip
        monkeypatch.setenv("ANT_KERNELS_BACKEND", "triton")
        with pytest.raises(RuntimeError, match="resolve_neg"):
            call(*neg)
        monkeypatch.setenv("ANT_KERNELS_BACKEND", "auto")
        torch.testing.assert_close(call(*neg), expected, msg=name)
    out = _negated(torch.zeros(37, device=kernel_device))
    monkeypatch.setenv("ANT_KERNELS_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="resolve_neg"):
        ant_kernels.combine(w, J, out)


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


def _sequential(w: torch.Tensor, J: torch.Tensor) -> torch.Tensor:
    """The sum the kernel promises, bit for bit: acc = 0, then acc = acc + w[i] * J[i] in
    float32 for i = 0..k-1, each product and each sum rounded (separate torch ops: no FMA)."""
    acc = torch.zeros(J.shape[1], dtype=torch.float32, device=J.device)
    for i in range(J.shape[0]):
        acc = acc + w[i].float() * J[i].float()
    return acc


def _wide(k: int, P: int, dt: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """w and J with magnitudes spread over many binades, so that a fused multiply-add (one
    rounding) and a multiply then an add (two) differ in the last bit of many columns."""
    scale = 2.0 ** torch.randint(-12, 13, (k, P), device=device)  # finite in fp16 too
    return torch.randn(k, device=device) * 3, (torch.randn(k, P, device=device) * scale).to(dt)


@pytest.mark.interpret
@pytest.mark.parametrize("k", [1, 3, 5, 8, 17])
@pytest.mark.parametrize("dt", list(DTYPES))
def test_combine_is_the_sequential_float32_loop(k, dt, kernel_device, force_triton):
    """Bit for bit (the float32 words, not just equal values), interpreted or compiled."""
    w, J = _wide(k, 4099, DTYPES[dt], kernel_device)
    out = combine(w, J, torch.empty(4099, device=kernel_device))
    assert torch.equal(out.view(torch.int32), _sequential(w, J).view(torch.int32))


def test_combine_launch_disables_fp_fusion(monkeypatch):
    """The compiled launch (interpreter off) turns FMA contraction off, or sm_90 builds
    contract every w[i] * J[i] + acc into one FFMA and the bits leave the sequential loop."""
    from ant_kernels.combine import _plan

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for k in (1, 5, 64):
        assert _plan(torch.zeros(1).expand(k, 1000))[1]["enable_fp_fusion"] is False


def test_combine_grid_fits_cuda_limits(monkeypatch):
    """One grid axis (CUDA allows 2**31 - 1 programs there) for J of up to 2**31 elements."""
    from ant_kernels._dispatch import MAX_K
    from ant_kernels.combine import _plan

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for k in range(1, MAX_K["combine"] + 1):
        for dt in (torch.float32, torch.bfloat16):
            P = 2**31 // k
            nprog, meta = _plan(torch.zeros(1, dtype=dt).expand(k, P))
            assert isinstance(nprog, int) and 1 <= nprog <= 2**31 - 1, (k, nprog)
            assert (nprog - 1) * meta["BLOCK_P"] < P <= nprog * meta["BLOCK_P"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU here")
@pytest.mark.parametrize("k", [1, 2, 5, 8, 16, 33, 64])
@pytest.mark.parametrize("dt", list(DTYPES))
def test_combine_cuda_is_the_sequential_float32_loop(k, dt, force_triton):
    """Compiled for the GPU: the same float32 words as the loop, main part and tail, into an
    fp32 ``out`` and into a row of J's dtype (one rounding of the same sum)."""
    w, J = _wide(k, 1_000_003, DTYPES[dt], "cuda")
    expected = _sequential(w, J)
    out = combine(w, J, torch.empty(J.shape[1], device="cuda"))
    assert torch.equal(out.view(torch.int32), expected.view(torch.int32))
    row = combine(w, J, torch.empty_like(J[0]))
    assert torch.equal(row, expected.to(J.dtype))


def test_launches_make_the_tensors_device_current(monkeypatch):
    """Triton launches on the current CUDA device: a J on cuda:1 while cuda:0 is current must
    switch devices for the launch (checked on the helper; a single-GPU machine cannot run it)."""
    import contextlib

    from ant_kernels._dispatch import on_device

    class OnCuda:  # stands in for a CUDA tensor: only what on_device reads
        is_cuda = True

        def __init__(self, index: int) -> None:
            self.device = torch.device("cuda", index)

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    ctx = on_device(OnCuda(1))
    assert isinstance(ctx, torch.cuda.device) and ctx.idx == 1
    assert isinstance(on_device(OnCuda(0)), contextlib.nullcontext)
    assert isinstance(on_device(torch.zeros(2)), contextlib.nullcontext)


def test_reference_keeps_float32_weights_for_half_precision_rows():
    """The reference accumulates in float32 with the weights as given, also for a bf16 J:
    the weights are not rounded to J's dtype first."""
    J = torch.ones(3, 8, dtype=torch.bfloat16)  # noqa: N806
    w = torch.tensor([1 / 3, 1 / 3, 1 / 3 + 1e-3], dtype=torch.float32)
    out = combine_ref(w, J)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.full((8,), float(w.double().sum())), rtol=1e-6,
                               atol=1e-6)  # fmt: skip

"""gram: Triton kernel vs same-dtype reference vs float64, plus the backend dispatch rules."""

from __future__ import annotations

import sys

import pytest
import torch

import ant_kernels
from ant_kernels import backend_reasons, gram, gram_ref
from ant_kernels.gram import TILINGS, gram_triton

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
EPS32 = torch.finfo(torch.float32).eps
CASES = [(k, P, d) for k in (1, 2, 3, 5, 8) for P in (1, 7, 4099, 65539) for d in DTYPES] + [
    (k, 4099, "fp32") for k in (11, 17, 33)  # several row tiles (k > 8)
]


def _check(G: torch.Tensor, J: torch.Tensor) -> None:
    """Rule: |G - G64| <= 2 |same-dtype ref - G64| + an fp32 summation-noise atol."""
    G64, _ = gram_ref(J.cpu(), upcast=True)
    G32, _ = gram_ref(J.cpu())
    err = (G.cpu().double() - G64).abs().max().item()
    err_ref = (G32.double() - G64).abs().max().item()
    # 16 ulps of the largest entry: fp32 summation noise in any order, far below TF32's error
    atol = 16 * EPS32 * G64.abs().max().item() + 1e-30
    assert err <= 2 * err_ref + atol, (
        f"kernel err {err:.3e}, ref err {err_ref:.3e}, atol {atol:.3e}"
    )


@pytest.mark.interpret
@pytest.mark.parametrize("k,P,dt", CASES, ids=[f"k{k}-P{P}-{d}" for k, P, d in CASES])
def test_gram_matches_reference(k, P, dt, kernel_device, force_triton):
    J = torch.randn(k, P, device=kernel_device).to(DTYPES[dt])
    G, finite = gram(J)
    assert G.shape == (k, k) and G.dtype == torch.float32 and G.device == J.device
    assert finite.dim() == 0 and finite.dtype == torch.bool and bool(finite)
    assert torch.equal(G, G.T)
    _check(G, J)
    # small integers: every partial sum is exact in fp32 (< 2**24), so any dropped, doubled or
    # misplaced column shows up as an exact mismatch
    Ji = torch.randint(-8, 9, (k, P), device=kernel_device)
    Gi, _ = gram(Ji.to(DTYPES[dt]))
    assert torch.equal(Gi.cpu(), (Ji.cpu() @ Ji.cpu().T).float())


@pytest.mark.interpret
@pytest.mark.parametrize("k", [3, 5, 6, 7, 8, 11])
@pytest.mark.parametrize("dt", list(DTYPES))
def test_gram_rows_of_a_padded_buffer_are_exactly_symmetric(k, dt, kernel_device, force_triton):
    """The engine's layout (rows of a buffer padded to 16 elements: 16-byte vector loads) with
    the default configuration. Compiled for sm_90, fp32 G[i, j] and G[j, i] once differed in the
    last bits here (the products contracted into FMAs differently for the two): a block on the
    diagonal now stores one triangle both ways. P spans several blocks: their sum once added
    them in another order at [i, j] than at [j, i] (k = 6, 7 on the CPU)."""
    P = 70_001 if kernel_device.type == "cpu" else 100_003
    pad = -(-P // 16) * 16
    J = torch.randn(k, pad, device=kernel_device).to(DTYPES[dt])[:, :P]
    G, finite = gram(J)
    assert bool(finite) and torch.equal(G, G.T)
    _check(G, J)


@pytest.mark.interpret
@pytest.mark.parametrize("view", ["row-slice", "col-stride3", "transposed", "offset"])
def test_gram_strided_views(view, kernel_device, force_triton):
    make = {
        "row-slice": lambda b: b[1::2, 5:2900],  # row stride 2 * 3001
        "col-stride3": lambda b: b[:5, ::3],  # column stride 3
        "transposed": lambda b: b.view(-1)[: 5 * 4099].view(4099, 5).T,  # column stride 5
        "offset": lambda b: b.view(-1)[17 : 17 + 4 * 5000].view(4, 5000),
    }[view]
    base = torch.randn(9, 3001, device=kernel_device)
    J = make(base)
    assert not J.is_contiguous() or view == "offset"
    G, finite = gram(J)
    assert bool(finite)
    _check(G, J)
    Ji = make(base.round().clamp(-8, 8))  # same strides, small integer values: exact
    assert torch.equal(gram(Ji)[0].cpu(), (Ji.double() @ Ji.double().T).float().cpu())


@pytest.mark.interpret
@pytest.mark.parametrize("fold,chain", [(1, 0), (4, 0), (2, 1), (4, 1), (8, 1)])
@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 6, 7, 8])
def test_gram_split_kernel_matches_reference(k, fold, chain, kernel_device, force_triton):
    """The k <= 8 kernel that reads each row once (tiles A and B): every block of G, both
    halves of A B^T, the masked rows of a partial tile B (k = 7), two spans and a tail; with
    FOLD > 1 the columns folded into fewer accumulators, as a sum tree or (CHAIN) one by one."""
    config = (0, max(4, fold), 2, 4, 1, fold, chain)
    for dt in DTYPES.values():
        J = torch.randn(k, 9001, device=kernel_device).to(dt)
        G, finite = gram_triton(J, block_p=2048, chunks=2, config=config)
        assert G.shape == (k, k) and bool(finite) and torch.equal(G, G.T)
        _check(G, J)
        Ji = torch.randint(-8, 9, (k, 9001))
        Gi, _ = gram_triton(Ji.to(kernel_device, dt), block_p=2048, chunks=2, config=config)
        assert torch.equal(Gi.cpu(), (Ji @ Ji.T).float())
    if fold > 1:
        with pytest.raises(ValueError, match="FOLD, CHAIN and PAIRS apply to the split kernel"):
            gram_triton(J, config=(2, 4, 2, 4, 1, fold, chain))
    if chain:
        with pytest.raises(ValueError, match="CHAIN serves FOLD <= 8"):
            gram_triton(J, config=(0, 16, 2, 4, 1, 16, 1))
    with pytest.raises(ValueError, match="k <= 8"):
        gram_triton(torch.randn(9, 64, device=kernel_device), config=(0, 4, 2, 4, 1))


@pytest.mark.interpret
@pytest.mark.parametrize("chain", [0, 1])
@pytest.mark.parametrize("k", [1, 3, 4, 5, 7, 8])
def test_gram_split_kernel_word_loads(k, chain, kernel_device, force_triton):
    """PAIRS: bf16 rows read as int32 words (even and odd columns from one word) where the
    layout allows (unit column stride, even row stride and width, 4-byte aligned start),
    column reads elsewhere: rows of an even-strided buffer with an odd tail, a view that starts
    at an odd column, fp16 and fp32 (which ignore it)."""
    from ant_kernels.gram import _plan

    config = (0, 8, 2, 4, 1, 8, chain, 1)
    buf = torch.randn(k, 9024, device=kernel_device).bfloat16()
    ints = torch.randint(-8, 9, (k, 9024), device=kernel_device).bfloat16()  # exact products
    cuts = {"main+tail": (0, 9001), "odd start": (1, 9002), "words": (0, 8192),
            "4 bytes in": (2, 9012), "even tail": (0, 9010)}  # fmt: skip
    plans = {name: _plan(buf[:, a : b - (b - a) % 16], block_p=2048, chunks=2,
                         config=config)[1]["PAIRS"] for name, (a, b) in cuts.items()}  # fmt: skip
    assert plans == {"main+tail": 1, "odd start": 0, "words": 1, "4 bytes in": 1, "even tail": 1}
    assert _plan(buf[:, 9008:9010], config=config)[1]["PAIRS"] == 1  # the even tail: words
    assert _plan(buf[:, :9001].float(), config=config)[1]["PAIRS"] == 0
    assert _plan(buf[:, 8992:9001], config=config)[1]["PAIRS"] == 0  # the odd tail
    for a, b in cuts.values():
        for dt in (torch.bfloat16, torch.float16, torch.float32):  # the last two: column reads
            J, Ji = buf[:, a:b].to(dt), ints[:, a:b].to(dt)
            G, finite = gram_triton(J, block_p=2048, chunks=2, config=config)
            assert G.shape == (k, k) and bool(finite) and torch.equal(G, G.T)
            _check(G, J)
            Gi, _ = gram_triton(Ji, block_p=2048, chunks=2, config=config)
            assert torch.equal(Gi.cpu(), (Ji.double() @ Ji.double().T).float().cpu())
    with pytest.raises(ValueError, match="PAIRS needs FOLD >= 2"):
        gram_triton(buf, config=(0, 8, 2, 4, 1, 1, 0, 1))


@pytest.mark.parametrize(
    "config",
    [(0, 8, 16), (0, 8, 16, 4, 1, 8, 1, 1, 0), (0, 8, 16, 4, 1, 6, 1), (0, 8, 16, 4, 1, 8, 2),
     (3, 4, 16, 4), (0, 8, 16, 4, 1, 32), (0, 8, 16, 4, 0), (0, 8, 16, 4, 1, 8, True), "fast"],
)  # fmt: skip
def test_gram_config_is_checked(config):
    """A bad tiling is refused up front with what is valid, not deep inside Triton; every
    TILINGS entry passes."""
    from ant_kernels.gram import _check_config

    for tiling in TILINGS:
        _check_config(tiling)
    with pytest.raises(ValueError, match=r"config must be \(TB, VEC, CHUNKS, num_warps"):
        gram_triton(torch.randn(5, 64), config=config)


@pytest.mark.interpret
@pytest.mark.parametrize("dt", list(DTYPES))
def test_gram_many_blocks_reduction(dt, kernel_device):
    # small tiles: 33 programs x 2 chunks exercise the two-stage sum and the tail masks
    J = torch.randn(5, 4099, device=kernel_device).to(DTYPES[dt])
    G, finite = gram_triton(J, block_p=64, chunks=2)
    assert bool(finite)
    _check(G, J)
    G2, _ = gram_triton(J, block_p=64, chunks=2)
    assert torch.equal(G, G2), "two runs must be bit-identical"


@pytest.mark.interpret
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("where", ["first", "last", "middle-row"])
def test_gram_nonfinite_flag(bad, where, kernel_device, force_triton):
    J = torch.randn(5, 4099, device=kernel_device)
    row, col = {"first": (0, 0), "last": (4, 4098), "middle-row": (2, 2049)}[where]
    J[row, col] = float(bad)
    _, finite = gram(J)
    _, finite_small = gram_triton(J, block_p=64, chunks=2)
    assert not bool(finite) and not bool(finite_small)
    assert not bool(gram_ref(J.cpu())[1])


@pytest.mark.interpret
def test_gram_entries_near_the_float32_limit_are_finite(kernel_device, force_triton):
    """G[0, 0] = 1.96e38 fits float32; the reference's (G + G.T) / 2 overflowed it to inf and
    called J non-finite while the kernel did not."""
    J = torch.zeros(2, 37, device=kernel_device)
    J[0, 0], J[1, 0] = 1.4e19, 1.0
    for G, finite in (gram(J), gram_ref(J.cpu())):
        assert bool(finite) and G[0, 0].item() == pytest.approx(1.96e38, rel=1e-6)
        assert torch.equal(G, G.T)
    J[0, 1] = 1.4e19  # now the squared norm itself overflows: not finite on both paths
    assert not bool(gram(J)[1]) and not bool(gram_ref(J.cpu())[1])


def test_gram_ref_upcast_is_exact_on_integers():
    # small integers: every fp64 partial sum is exact, so G must equal the integer product
    Ji = torch.randint(-50, 50, (4, 777))
    G, finite = gram_ref(Ji.double(), upcast=True)
    assert G.dtype == torch.float64 and bool(finite)
    assert torch.equal(G, (Ji @ Ji.T).double())


def test_gram_of_a_float64_J_is_float64():
    """A double-precision model's J keeps its precision in G: a float32 Gram of nearly
    cancelling clusters moved their Nash-MTL weights by 27%, and entries above float32's range
    read as a non-finite J (a dropped step)."""
    g = torch.randn(2, 100_000, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    J = torch.cat([g, -(g.sum(0, keepdim=True)) + 1e-3 * torch.randn(1, 100_000).double()])
    G, finite = gram(J)
    assert G.dtype == torch.float64 and bool(finite)
    torch.testing.assert_close(G, J @ J.T, rtol=1e-12, atol=0)
    big = torch.full((2, 3), 1e30, dtype=torch.float64)
    G, finite = gram(big)
    assert bool(finite) and G[0, 0].item() == pytest.approx(3e60)


@pytest.mark.parametrize(
    "J,match",
    [
        (torch.zeros(5), "shape"),
        (torch.zeros(2, 3, 4), "shape"),
        (torch.zeros(0, 4), "shape"),
        (torch.zeros(3, 4, dtype=torch.int32), "float"),
    ],
    ids=["1d", "3d", "k0", "int"],
)
def test_gram_bad_input(J, match):
    with pytest.raises(ValueError, match=match):
        gram(J)


def test_backend_torch_forces_reference(monkeypatch):
    monkeypatch.setenv("ANT_KERNELS_BACKEND", "torch")
    J = torch.randn(3, 100)
    assert any("forces the reference" in r for r in backend_reasons("gram", J, k=3))

    def fail(*args, **kwargs):
        raise AssertionError("the Triton launcher must not run")

    # ant_kernels.gram is the function; the module is only reachable through sys.modules
    monkeypatch.setattr(sys.modules["ant_kernels.gram"], "gram_triton", fail)
    G, _ = gram(J)
    torch.testing.assert_close(G, gram_ref(J)[0])


def test_forced_triton_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("ANT_KERNELS_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    J = torch.randn(3, 100)
    reasons = backend_reasons("gram", J, k=3)
    assert any("not on CUDA and TRITON_INTERPRET!=1" in r for r in reasons)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        gram(J)


def test_tiles_follow_how_the_kernels_were_built(monkeypatch):
    """The tiling of a launch follows where it runs: CPU tensors in the interpreter, CUDA
    tensors compiled unless the kernels were built under the interpreter; the variable set
    after the import on a GPU gave compiled kernels the interpreter's 4096-wide blocks."""
    import types

    from ant_kernels import _dispatch

    # ant_kernels.gram etc. are the functions; the modules are reachable through sys.modules
    gram_mod, combine, graddrop, uniform = (
        sys.modules[f"ant_kernels.{m}"] for m in ("gram", "combine", "graddrop", "uniform")
    )
    cuda = types.SimpleNamespace(is_cuda=True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(_dispatch, "_jit_interpreted", {False})  # compiled kernels
    assert not _dispatch.interpreted(cuda) and _dispatch.interpreted(torch.empty(1))
    monkeypatch.setattr(_dispatch, "_jit_interpreted", {True})
    assert _dispatch.interpreted(cuda)
    J = torch.empty(5, 10**6)
    assert gram_mod._plan(J, interp=True)[1] != gram_mod._plan(J, interp=False)[1]
    assert combine._config(5, interp=False) == (2048, 4) != combine._config(5, interp=True)
    assert graddrop._config(5, interp=False) != graddrop._config(5, interp=True)
    assert uniform._config(interp=False) == (256, 4) != uniform._config(interp=True)


@pytest.mark.interpret
def test_every_launcher_asks_where_its_launch_runs(monkeypatch, force_triton, kernel_device):
    """gram, combine, graddrop and uniform each pick their tiles from ``interpreted(tensor)``
    (a launcher that read the environment variable instead would pass the test above)."""
    import ant_kernels
    from ant_kernels._dispatch import interpreted

    seen = []

    def spy(t):
        seen.append(t.shape)
        return interpreted(t)

    mods = {m: sys.modules[f"ant_kernels.{m}"] for m in ("gram", "combine", "graddrop", "uniform")}
    for m in mods.values():
        monkeypatch.setattr(m, "interpreted", spy)
    dev = kernel_device  # CUDA tensors where there is a GPU, CPU ones under the interpreter
    J, step = torch.randn(3, 100, device=dev), torch.zeros(1, dtype=torch.int64, device=dev)
    for launch in (lambda: ant_kernels.gram(J),
                   lambda: ant_kernels.combine(torch.ones(3, device=dev), J,
                                               out=torch.empty(100, device=dev)),
                   lambda: ant_kernels.graddrop(J, torch.ones(3, dtype=torch.bool, device=dev),
                                                1, step),
                   lambda: ant_kernels.uniform(1, step, 10)):  # fmt: skip
        before = len(seen)
        launch()
        assert len(seen) > before


def test_forced_triton_lists_every_reason(monkeypatch):
    monkeypatch.setenv("ANT_KERNELS_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    J = torch.randn(70, 10, dtype=torch.float64)
    with pytest.raises(RuntimeError) as info:
        gram(J)
    msg = str(info.value)
    assert "TRITON_INTERPRET" in msg and "float64" in msg and "k=70" in msg


def test_auto_falls_back_and_bad_backend_value(monkeypatch):
    monkeypatch.setenv("ANT_KERNELS_BACKEND", "auto")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    J = torch.randn(3, 50)
    torch.testing.assert_close(gram(J)[0], gram_ref(J)[0])
    monkeypatch.setenv("ANT_KERNELS_BACKEND", "cuda")
    with pytest.raises(ValueError, match="ANT_KERNELS_BACKEND"):
        backend_reasons("gram", J)
    with pytest.raises(ValueError, match="op="):
        ant_kernels.backend_reasons("matmul", J)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU here")
@pytest.mark.parametrize("dt", list(DTYPES))
def test_gram_cuda_no_host_sync(dt, force_triton):
    J = torch.randn(5, 1_000_003, device="cuda").to(DTYPES[dt])
    gram(J)  # compile outside the sync check
    torch.cuda.set_sync_debug_mode("error")
    try:
        G, finite = gram(J)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert bool(finite)
    _check(G, J)


@pytest.mark.parametrize("P", [1 << 16, 100003, 755009])
def test_gram_ref_large_P_blocked_sum_matches_float64(P):
    """Long rows take the blocked reduction (64 partial Grams plus a tail): same G to float32
    accuracy, exactly symmetric, NaN detection intact."""
    g = torch.Generator().manual_seed(P)
    J = torch.randn(5, P, generator=g)
    G, finite = gram_ref(J)
    exact = J.double() @ J.double().T
    tol = {"rtol": 2e-6, "atol": 1e-7 * P}  # float32 rounding of sums of P unit-scale products
    torch.testing.assert_close(G.double(), exact, **tol)
    assert torch.equal(G, G.T) and bool(finite)
    J[3, P - 1] = float("nan")  # in the tail when P is not a multiple of 64
    assert not bool(gram_ref(J)[1])
    # a strided view takes the same blocks (a single product sums too coarsely on some BLAS)
    Js = torch.randn(5, 2 * P, generator=g)[:, ::2]
    torch.testing.assert_close(gram_ref(Js)[0].double(), Js.double() @ Js.double().T, **tol)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU here")
@pytest.mark.parametrize("k", [3, 5, 8, 11])
@pytest.mark.parametrize("tiling", TILINGS, ids=["-".join(map(str, t)) for t in TILINGS])
def test_gram_tilings_cuda(tiling, k):
    if tiling[0] == 0 and k > 8:
        with pytest.raises(ValueError, match="k <= 8"):
            gram_triton(torch.randn(k, 100, device="cuda"), config=tiling)
        return
    from ant_kernels.gram import _plan

    pairs = len(tiling) > 7 and tiling[7] == 1
    for dt in DTYPES.values():
        # rows of a 16-padded buffer (the engine's layout: word loads apply), a view starting
        # 4 bytes in (words, not 16-byte aligned), a contiguous odd width (no words)
        buf = torch.randn(k, 100_016, device="cuda").to(dt)
        ints = torch.randint(-8, 9, (k, 100_016), device="cuda").to(dt)
        for a, b, words in ((0, 100_003, True), (2, 100_012, True), (0, None, False)):
            J, Ji = (buf[:, a:b], ints[:, a:b]) if b else (buf[:, :100_003].clone(), None)
            main = J[:, : J.shape[1] - J.shape[1] % 16]
            assert _plan(main, config=tiling)[1].get("PAIRS", 0) == int(
                pairs and words and dt == torch.bfloat16 and tiling[0] == 0)  # fmt: skip
            G, finite = gram_triton(J, config=tiling)
            assert bool(finite) and torch.equal(G, G.T)
            _check(G, J)
            if Ji is not None:
                Gi, _ = gram_triton(Ji, config=tiling)
                exact = (Ji.double() @ Ji.double().T).float()
                assert torch.equal(Gi, exact)


@pytest.mark.interpret
@pytest.mark.parametrize("P", [7, 16, 4099])
def test_gram_columns_past_the_last_multiple_of_16(P, kernel_device, force_triton):
    """The launcher runs the kernel on the first P - P % 16 columns and again on the rest:
    G counts both parts, and a NaN in the rest is still flagged."""
    from ant_kernels._dispatch import column_parts

    parts = column_parts(P)
    assert [(c.start, c.stop) for c in parts] == (
        [(0, P)] if P % 16 == 0 or P < 16 else [(0, P - P % 16), (P - P % 16, P)]
    )
    Ji = torch.randint(-8, 9, (5, P))
    G, finite = gram_triton(Ji.float().to(kernel_device))
    assert bool(finite) and torch.equal(G.cpu(), (Ji @ Ji.T).float())
    Jn = Ji.float()
    Jn[2, P - 1] = float("nan")
    assert not bool(gram_triton(Jn.to(kernel_device))[1])


CUDA_AXIS0_MAX, CUDA_AXIS12_MAX = 2**31 - 1, 65535


@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gram_grid_fits_cuda_limits(dt, monkeypatch):
    """The compiled launch's grid (interpreter off: the GPU tiling) stays within CUDA's limits
    for J of up to 2**31 elements at every k the dispatch allows, and covers every (column span,
    tile pair) once. A stand-in J with zero strides costs no memory."""
    from ant_kernels._dispatch import MAX_K, column_parts
    from ant_kernels.gram import _plan

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for k in range(1, MAX_K["gram"] + 1):
        P = 2**31 // k - 3  # not a multiple of 16: both column parts
        for cols in column_parts(P):
            n = cols.stop - cols.start
            grid, meta = _plan(torch.zeros(1, dtype=dt).expand(k, n))
            assert 1 <= grid[0] <= CUDA_AXIS0_MAX, (k, n, grid)
            assert all(1 <= g <= CUDA_AXIS12_MAX for g in grid[1:]), (k, n, grid)
            spans = -(-n // (meta["BLOCK_P"] * meta["CHUNKS"]))
            pairs = meta["T"] ** 2 if "T" in meta else 1
            assert torch.Size(grid).numel() == spans * pairs, (k, n, grid, meta)
    with pytest.raises(ValueError, match="programs, more than CUDA's 2147483647"):
        _plan(torch.zeros(1, dtype=dt).expand(64, 2**40), config=(1, 1, 1, 1))


def _precision() -> tuple[str, ...]:
    """The float32 matmul precision a matmul now sees: per backend where torch has them."""
    matmul = getattr(torch.backends.mkldnn, "matmul", None)
    if matmul is not None and hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        return torch.backends.cuda.matmul.fp32_precision, matmul.fp32_precision
    return (torch.get_float32_matmul_precision(),)


class _MatmulSpy(torch.overrides.TorchFunctionMode):
    """Records ``_precision()`` at every matrix product."""

    NAMES = {"matmul", "__matmul__", "mm", "bmm", "mv"}  # `@` arrives as TensorBase.matmul

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, ...]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", None) in self.NAMES:
            self.seen.append(_precision())
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("P", [4099, (1 << 16) + 7])  # one product; 64 blocks + a tail
def test_gram_ref_ignores_lowered_matmul_precision(P):
    """A user's ``set_float32_matmul_precision("medium")`` (TF32 on CUDA, bf16 passes in oneDNN
    on the CPU) must not reach the float32 references: every product inside runs in IEEE
    float32, G matches float64 to float32 accuracy, and the user's setting is back afterwards."""
    from ant_kernels import combine_ref

    J = torch.randn(5, P)
    w = torch.randn(5)
    G64 = J.double() @ J.double().T
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        user = _precision()
        with _MatmulSpy() as spy:
            G, _ = gram_ref(J)
            res = combine_ref(w, J)
        assert torch.get_float32_matmul_precision() == "medium" and _precision() == user
    finally:
        torch.set_float32_matmul_precision(before)
    full = ("ieee", "ieee") if len(user) == 2 else ("highest",)
    assert spy.seen and all(seen == full for seen in spy.seen), spy.seen
    atol = 16 * EPS32 * G64.abs().max().item()
    torch.testing.assert_close(G.double(), G64, rtol=0, atol=atol)
    exact = w.double() @ J.double()
    scale = (w.double().abs() @ J.double().abs()).max().item()
    torch.testing.assert_close(res.double(), exact, rtol=0, atol=6 * EPS32 * scale)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU here")
@pytest.mark.parametrize("k,P", [(3, 600_000_000), (1, 3 * 2**29)])
def test_gram_cuda_more_spans_than_grid_axis_1_allows(k, P, force_triton):
    """fp32 rows of ones (zero strides: no memory) long enough for more than 65535 column spans
    (73243 at k = 3 and 98304 at k = 1 with the default tilings), which a launch with the spans
    on grid axis 1 cannot start. Exact: every partial sum, in any order, is an integer and a
    multiple of 512 (a span holds a power of two >= 512 columns, P is a multiple of 512) below
    2**31, where float32 integers are exact in steps of 128 or less."""
    J = torch.ones(1, device="cuda").expand(k, P)
    G, finite = gram(J)
    assert bool(finite)
    assert torch.equal(G, torch.full((k, k), float(P), device="cuda"))


def test_kernel_k_limits_are_inclusive_and_devices_are_named():
    """k == MAX_K is a kernel's largest tile and is served, MAX_K + 1 is not; tensors on
    several devices are a reason of their own (cpu + cuda under the interpreter, or two GPUs,
    would otherwise reach a kernel)."""
    from ant_kernels import _dispatch

    t = torch.zeros(4, 4)
    for op, mk in _dispatch.MAX_K.items():
        if mk is None:
            continue
        assert not any("exceeds" in r for r in backend_reasons(op, t, k=mk)), op
        assert any("exceeds" in r for r in backend_reasons(op, t, k=mk + 1)), op
    reasons = backend_reasons("combine", torch.zeros(3), torch.zeros(3, 4, device="meta"))
    assert any("several devices" in r for r in reasons), reasons


@pytest.mark.interpret
@pytest.mark.parametrize("kernel", ["row-tile", "split"])
@pytest.mark.parametrize("k", [1, 5, 7])
def test_triton_reads_nothing_past_column_p(kernel, k, kernel_device, force_triton):
    """J = the first P columns of a buffer whose other entries are NaN: every column >= P and
    row >= k stays masked on every tile load (a NaN read times a masked 0 is still NaN). The
    other tests' tail columns lie past the tensor's end or hold finite values, so an unmasked
    load was caught only when stray memory happened to be non-finite."""
    P = 4099  # noqa: N806  (a 4096-column block and a 3-column tail)
    buf = torch.full((k + 1, P + 4 * 4096 + 16), float("nan"))
    ints = torch.randint(-8, 9, (k, P)).float()
    buf[:k, :P] = ints
    J = buf.to(kernel_device)[:k, :P]  # noqa: N806
    if kernel == "row-tile":
        G, finite = gram(J)  # noqa: N806
    else:
        G, finite = gram_triton(J, block_p=2048, chunks=2, config=(0, 4, 2, 4, 1, 4))  # noqa: N806
    assert bool(finite)
    assert torch.equal(G.cpu(), ints @ ints.T)

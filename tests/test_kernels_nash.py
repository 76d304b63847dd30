"""nash_weights: residual of alpha * (G alpha) = 1, kernel == reference, independent solver."""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from ant_kernels import backend_reasons, nash_weights, nash_weights_ref

KINDS = ("random", "scaled", "cos0.999", "near-parallel")
# the interpreter runs each of the ~20 * k pivot steps op by op: keep k = 16 and 32 cases few
CASES = [(k, kind) for k in (2, 5, 8) for kind in KINDS] + [
    (16, "random"),
    (16, "cos0.999"),
    (16, "near-parallel"),
    (32, "scaled"),
]


def _make_G(k: int, kind: str, P: int = 200) -> torch.Tensor:
    """[k, k] float64 Gram matrix of k cluster gradients of the requested flavour."""
    f64 = torch.float64
    if kind in ("random", "scaled"):
        J = torch.randn(k, P, dtype=f64)
    elif kind == "cos0.999":
        # cosine exactly 0.999 between every pair: sqrt(.999) c + sqrt(.001) e_i, orthonormal
        Q = torch.linalg.qr(torch.randn(P, k + 1, dtype=f64))[0]
        J = math.sqrt(0.999) * Q[:, k][None, :] + math.sqrt(0.001) * Q[:, :k].T
    else:
        # a shared direction plus unequal noise: pairwise cosines between ~0.99 and 0.9999
        J = torch.randn(P, dtype=f64)[None, :] + 0.02 * torch.rand(k, 1, dtype=f64) * torch.randn(
            k, P, dtype=f64
        )
    spread = 3.0 if kind == "scaled" else 1.0
    J = J * torch.exp(spread * torch.randn(k, 1, dtype=f64))
    return J @ J.T


def _residual(G: torch.Tensor, a: torch.Tensor) -> float:
    Gn = G / torch.linalg.matrix_norm(G)
    return (a * (Gn @ a) - 1).abs().max().item()


def _independent_solve(G: torch.Tensor) -> torch.Tensor:
    """Newton with Armijo backtracking from a = 1, run to convergence (test oracle)."""
    G = G / torch.linalg.matrix_norm(G)
    a = torch.ones(G.shape[0], dtype=torch.float64)

    def f(x: torch.Tensor) -> float:
        return (0.5 * x @ G @ x - x.log().sum()).item()

    for _ in range(500):
        g = G @ a - 1 / a
        if (a * (G @ a) - 1).abs().max() < 1e-14:
            break
        dx = -torch.linalg.solve(G + torch.diag(1 / a**2), g)
        t = 1.0
        # backtrack while far away; near the optimum f's rounding noise would stall Armijo
        while -(g @ dx) > 1e-8 and (
            (a + t * dx).min() <= 0 or f(a + t * dx) > f(a) + 0.25 * t * (g @ dx).item()
        ):
            t *= 0.5
        a = a + t * dx
    return a


@pytest.mark.interpret
@pytest.mark.parametrize("k,kind", CASES, ids=[f"k{k}-{kind}" for k, kind in CASES])
def test_nash_kernel_solves_and_matches(k, kind, kernel_device, force_triton):
    G = _make_G(k, kind)
    a = nash_weights(G.to(kernel_device)).cpu()
    assert a.dtype == torch.float64 and a.shape == (k,)
    assert (a > 0).all()
    assert _residual(G, a) < 1e-10
    ref = nash_weights_ref(G)
    assert _residual(G, ref) < 1e-10
    torch.testing.assert_close(a, ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(a, _independent_solve(G), rtol=1e-10, atol=0)
    if k <= 8:  # a float32 G is read and solved in float64 too
        a32 = nash_weights(G.float().to(kernel_device)).cpu()
        assert _residual(G.float().double(), a32) < 1e-10


@pytest.mark.parametrize("k", [2, 5, 8, 16, 32])
@pytest.mark.parametrize("kind", KINDS)
def test_nash_reference_residual_many_draws(k, kind):
    for _ in range(10):
        G = _make_G(k, kind)
        assert _residual(G, nash_weights_ref(G)) < 1e-10


def _two_factor_G(k: int, noise: float, gen: torch.Generator) -> torch.Tensor:
    """float32 Gram of k gradients along two shared directions with loadings of mixed sign
    (1 + N(0, 1)), plus noise: cosines from -1 to 1, the hardest family measured."""
    F = torch.randn(2, 20_000, dtype=torch.float64, generator=gen)  # noqa: N806
    L = torch.randn(k, 2, dtype=torch.float64, generator=gen) + 1.0  # noqa: N806
    J = L @ F + noise * torch.randn(k, 20_000, dtype=torch.float64, generator=gen)
    return J.float() @ J.float().T


def test_nash_iteration_budget_has_margin():
    """The default of 40 steps: random, scaled and nearly parallel Grams need at most 10; the
    two-factor family up to 39 (20 steps, the default before, left 16 of 30 draws at k = 16
    and 19 of 30 at k = 32 unsolved)."""
    assert inspect.signature(nash_weights).parameters["iters"].default == 40
    worst = 0
    for k in (2, 5, 8, 16):
        for kind in KINDS:
            for _ in range(5):
                G = _make_G(k, kind)
                need = next(i for i in range(41) if _residual(G, nash_weights_ref(G, i)) < 1e-10)
                worst = max(worst, need)
    assert worst <= 10, f"needed {worst} Newton steps"
    gen = torch.Generator().manual_seed(3)
    for k, noise in ((16, 0.03), (32, 0.03), (32, 0.1)):
        for _ in range(8):
            G = _two_factor_G(k, noise, gen)
            a = nash_weights_ref(G)
            assert (a > 0).all() and _residual(G.double(), a) < 1e-6


def test_nash_closed_forms():
    # orthogonal gradients: a_i^2 G_ii / |G| = 1; parallel ones: a_i = 1 / (|g_i| sqrt(k))
    d = torch.tensor([1.0, 4.0, 9.0], dtype=torch.float64)
    a = nash_weights(torch.diag(d))
    torch.testing.assert_close(a, (d.norm() / d).sqrt(), rtol=1e-14, atol=0)
    g = torch.tensor([1.0, 2.0, 5.0], dtype=torch.float64)
    G = torch.outer(g, g)
    a = nash_weights(G, normalize=False)
    torch.testing.assert_close(a, 1 / (g * math.sqrt(3)), rtol=1e-12, atol=0)


@pytest.mark.interpret
def test_nash_scaling(kernel_device, force_triton):
    G = _make_G(3, "random").to(kernel_device)
    a = nash_weights(G)
    torch.testing.assert_close(nash_weights(1e6 * G), a, rtol=1e-12, atol=0)
    a_raw = nash_weights(G, normalize=False)
    torch.testing.assert_close(nash_weights(4 * G, normalize=False), a_raw / 2, rtol=1e-12, atol=0)
    assert (a_raw * (G.double() @ a_raw) - 1).abs().max() < 1e-10


@pytest.mark.interpret
@pytest.mark.parametrize("scale", [1e-200, 1e-170, 1e160, 1e200])
def test_nash_normalisation_survives_extreme_float64_scales(scale, kernel_device, monkeypatch):
    """The Frobenius norm of a float64 G near the ends of its range: the squares overflowed
    (weights 0) or underflowed (weights 1e84) in the C++ solver, the torch reference and the
    Triton kernel."""
    from ant_kernels.reference import nash_weights_ref

    G = _make_G(3, "random").double()
    want = nash_weights_ref(G)
    torch.testing.assert_close(nash_weights_ref(G * scale), want, rtol=1e-12, atol=0)
    monkeypatch.setenv("ANT_KERNELS_BACKEND", "triton")
    got = nash_weights((G * scale).to(kernel_device)).cpu()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=0)
    from antdiff import _C  # make builds it before the tests
    g, got = (G * scale).contiguous(), torch.empty(3, dtype=torch.float64)
    _C._nash_weights_at(g.data_ptr(), 3, 20, True, got.data_ptr())  # the C++ solver itself
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


@pytest.mark.interpret
@pytest.mark.parametrize("top", [1e-318, 1e-310, 1.5e308])
def test_nash_solves_the_ends_of_the_float64_range(top, kernel_device, monkeypatch):
    """max |G| subnormal or near 1.7e308 with ||G||_F > 1.8e308: the norm overflowed (weights 0
    from the C++ solver, the torch reference and the Triton kernel), and without normalising
    the reference's solve went NaN on subnormal entries. Each backend must give, normalised or
    not, the weights of the same G moved into the normal range by an exact power of 2."""
    G = _make_G(5, "near-parallel").double()  # every entry near max |G|: ||G||_F ~ 5 max |G|
    e = math.floor(math.log2(top / G.abs().max().item()))
    Gs = torch.ldexp(G, torch.tensor(e))  # the G under test
    shift = -e - e % 2  # an even power of 2 back into the normal range: exact on Gs
    Gn = torch.ldexp(Gs, torch.tensor(shift))
    assert torch.equal(torch.ldexp(Gn, torch.tensor(-shift)), Gs)
    from antdiff import _C  # make builds it before the tests

    def cpp(g: torch.Tensor, normalize: bool) -> torch.Tensor:
        g, out = g.contiguous(), torch.empty(5, dtype=torch.float64)
        _C._nash_weights_at(g.data_ptr(), 5, 40, normalize, out.data_ptr())
        return out

    monkeypatch.setenv("ANT_KERNELS_BACKEND", "triton")
    for normalize in (True, False):
        want = nash_weights_ref(Gn, normalize=normalize)
        if not normalize:  # a (Gn) = a (Gs * 2^shift) = a (Gs) / 2^(shift / 2)
            want = torch.ldexp(want, torch.tensor(shift // 2))
        assert torch.isfinite(want).all() and (want > 0).all()
        for got in (
            nash_weights_ref(Gs, normalize=normalize),
            cpp(Gs, normalize),
            nash_weights(Gs.to(kernel_device), normalize=normalize).cpu(),
        ):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


@pytest.mark.interpret
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_nash_degenerate_inputs(backend, kernel_device, monkeypatch):
    monkeypatch.setenv("ANT_KERNELS_BACKEND", backend)
    G = _make_G(5, "random")
    G[2], G[:, 2] = 0.0, 0.0  # an empty cluster
    a = nash_weights(G.to(kernel_device)).cpu()
    assert a[2] == 0 and torch.isfinite(a).all()
    keep = [0, 1, 3, 4]
    sub = G[keep][:, keep]
    # the other four solve their own problem (normalised by the same norm: zeros add nothing)
    torch.testing.assert_close(a[keep], nash_weights_ref(sub), rtol=1e-12, atol=0)
    assert torch.equal(
        nash_weights(torch.zeros(3, 3, device=kernel_device)).cpu(),
        torch.zeros(3, dtype=torch.float64),
    )
    for bad in (float("nan"), float("inf")):
        Gb = G.clone()
        Gb[1, 3] = bad
        assert torch.isnan(nash_weights(Gb.to(kernel_device))).all()


# float32 Gram of J [3, 1e5] with g3 = -(g1 + g2) + 1e-3 noise: rounding left it indefinite
# (smallest eigenvalue of G / |G| -1.5e-7), and a full Newton step took the weights to -14144
_INDEFINITE = [[100819.640625, -319.37799072265625, -100500.65625],
               [-319.37799072265625, 100183.484375, -99863.78125],
               [-100500.65625, -99863.78125, 200364.359375]]  # fmt: skip


def _opposed(k: int, noise: float) -> torch.Tensor:
    """Gram of k gradients, the last one the negated sum of the others plus noise: the solution
    lies far from the start (scale ~ 1 / noise)."""
    g = torch.Generator().manual_seed(0)
    J = torch.randn(k, 1000, generator=g, dtype=torch.float64)
    J[-1] = -J[:-1].sum(0) + noise * torch.randn(1000, generator=g, dtype=torch.float64)
    return J @ J.T


@pytest.mark.interpret
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("backend", ["triton", "torch", "native"])
def test_nash_without_a_solution_gives_nan(backend, solver_on):
    """A solve that ends without a solution says so (NaN: the engine keeps the last weights)
    instead of handing out wrong weights: negative ones for an indefinite float32 G, far-off
    ones where 20 steps do not reach a distant solution; with enough steps the same G is
    solved."""
    solve, dev = solver_on(backend, "nash")
    G = torch.tensor(_INDEFINITE, dtype=torch.float32)
    assert torch.linalg.eigvalsh(G.double()).min() < 0
    for iters in (20, 40):
        assert solve(G.to(dev), iters=iters).isnan().all()
    G = _opposed(8, 0.01)
    assert solve(G.to(dev), iters=20).isnan().all()  # residual 3.5 after 20 steps
    a = solve(G.to(dev), iters=40).cpu()
    assert (a > 0).all() and _residual(G, a) < 1e-9


def test_nash_k_limit_and_bad_input(monkeypatch):
    G = _make_G(33, "random")
    monkeypatch.setenv("ANT_KERNELS_BACKEND", "auto")
    assert any("k=33" in r for r in backend_reasons("nash", G, k=33))
    assert _residual(G, nash_weights(G)) < 1e-10  # auto: the reference serves k > 32
    monkeypatch.setenv("ANT_KERNELS_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="k=33"):
        nash_weights(G)
    for iters in (-1, True, 2.0):  # a bool is an int to Python, not an iteration count
        for solve in (nash_weights, nash_weights_ref):  # the reference gave a bare TypeError
            with pytest.raises(ValueError, match="iters must be an int >= 0"):
                solve(G[:3, :3], iters=iters)
    with pytest.raises(ValueError, match="G must"):
        nash_weights(torch.ones(2, 3))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU here")
@pytest.mark.parametrize("kind", KINDS)
def test_nash_cuda_no_host_sync(kind, force_triton):
    G = _make_G(8, kind)
    Gc = G.cuda()
    nash_weights(Gc)  # compile outside the sync check
    torch.cuda.set_sync_debug_mode("error")
    try:
        a = nash_weights(Gc)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(a.cpu(), nash_weights_ref(G), rtol=1e-12, atol=0)


@pytest.mark.interpret
@pytest.mark.parametrize("case", ["opposed8", "random5"])
def test_triton_takes_exactly_iters_steps(case, kernel_device, force_triton):
    """The kernel runs exactly ``iters`` damped steps from the reference's start: at step
    counts around the first whose result passes the tolerance (28 for an opposed k = 8 Gram,
    3 for a random k = 5 one) its weights are NaN or finite exactly where the reference's are,
    and equal them. Converged weights (the other tests') do not depend on the step count, the
    start or where the damping ends."""
    if case == "opposed8":
        G, counts = _opposed(8, 0.01), (27, 28, 30)  # noqa: N806
    else:
        g = torch.Generator().manual_seed(5)
        J = torch.randn(5, 200, generator=g, dtype=torch.float64)  # noqa: N806
        G, counts = J @ J.T, (2, 3, 4)  # noqa: N806
    finite = []
    for iters in counts:
        want = nash_weights_ref(G, iters=iters)
        got = nash_weights(G.to(kernel_device), iters=iters).cpu()
        finite.append(bool(torch.isfinite(want).all()))
        torch.testing.assert_close(got, want, rtol=1e-10, atol=0, equal_nan=True)
    assert finite[0] is False and finite[-1] is True  # the counts straddle convergence

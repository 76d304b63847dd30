"""Gradient-space MTL methods and the registry, against independent float64 references."""

from __future__ import annotations

import io
import math
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from ant_kernels import uniform_ref
from antdiff.mtl import (
    GRAD_METHODS,
    IMTLG,
    MGDA,
    CAGrad,
    GradDrop,
    MeanGram,
    NashMTL,
    PCGrad,
    available_methods,
    make_method,
)

GRAM_CLASSES = [MeanGram, PCGrad, NashMTL, IMTLG, MGDA, CAGrad]


def _J(k: int, P: int, seed: int, parallel: float = 0.0) -> torch.Tensor:
    """[k, P] float64 gradients; ``parallel`` > 0 adds a shared direction (diffusion-like)."""
    g = torch.Generator().manual_seed(seed)
    J = torch.randn(k, P, generator=g, dtype=torch.float64)
    J = J * torch.rand(k, 1, generator=g, dtype=torch.float64).add(0.2)  # uneven norms
    if parallel:
        J = J + parallel * torch.randn(1, P, generator=g, dtype=torch.float64)
    return J


def _present(k: int, absent: tuple[int, ...] = ()) -> torch.Tensor:
    p = torch.ones(k, dtype=torch.bool)
    p[list(absent)] = False
    return p


# ---------------------------------------------------------------- numpy / float64 references
def _pcgrad_pspace(J: torch.Tensor, orders: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(J.shape[1], dtype=torch.float64)
    for i in range(J.shape[0]):
        if not present[i]:
            continue
        g = J[i].clone()
        for j in orders[i].tolist():
            nj = float(J[j] @ J[j])
            d = float(g @ J[j])
            if present[j] and d < 0 and nj > 0:
                g = g - d / nj * J[j]
        out += g
    return out


def _proj_simplex(v: np.ndarray) -> np.ndarray:
    u = np.sort(v)[::-1]
    css = np.cumsum(u) - 1.0
    rho = np.nonzero(u - css / np.arange(1, len(v) + 1) > 0)[0][-1]
    return np.maximum(v - css[rho] / (rho + 1), 0.0)


def _fista_simplex(grad, k: int, lip: float, iters: int = 20000) -> np.ndarray:
    x = y = np.full(k, 1.0 / k)
    t = 1.0
    for _ in range(iters):
        x_new = _proj_simplex(y - grad(y) / lip)
        t_new = 0.5 * (1 + np.sqrt(1 + 4 * t * t))
        y = x_new + (t - 1) / t_new * (x_new - x)
        x, t = x_new, t_new
    return x


def _min_norm_by_supports(G: np.ndarray) -> np.ndarray:
    """argmin w^T G w over the simplex: on each support S, w_S ∝ G_SS^-1 1 (scaled by the
    gradient norms first, so the solve is well conditioned); the best feasible one."""
    k = G.shape[0]
    d = np.sqrt(np.diag(G))
    C = G / np.outer(d, d)
    best, best_obj = None, np.inf
    for code in range(1, 1 << k):
        S = [i for i in range(k) if code >> i & 1]
        y = np.linalg.solve(C[np.ix_(S, S)], 1.0 / d[S])
        w = np.zeros(k)
        w[S] = y / d[S]
        if w.sum() <= 0:
            continue
        w /= w.sum()
        if (w >= -1e-12).all() and w @ G @ w < best_obj:
            best, best_obj = np.clip(w, 0, None), w @ G @ w
    return best


def _simplex_grid(n: int) -> np.ndarray:
    a, b = np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij")
    keep = a + b <= n
    a, b = a[keep] / n, b[keep] / n
    return np.stack([a, b, 1 - a - b], axis=1)


def _check_simplex_kkt(w: np.ndarray, grad: np.ndarray, tol: float, sum_tol: float) -> None:
    """KKT of min f over the simplex: grad_i = lam on the support, >= lam off it."""
    support = w > 1e-7
    lam = grad[support].mean()
    scale = np.abs(grad).max()
    assert np.abs(grad[support] - lam).max() <= tol * scale, (grad, w)
    assert (grad[~support] >= lam - tol * scale).all(), (grad, w)
    assert abs(w.sum() - 1) < sum_tol and (w >= 0).all()


# ---------------------------------------------------------------- PCGrad
@pytest.mark.parametrize(
    "k,P,absent", [(2, 5, ()), (3, 4, ()), (5, 7, ()), (5, 9, (1, 3)), (8, 11, (0,))]
)
def test_pcgrad_matches_pspace(k, P, absent):
    present = _present(k, absent)
    m = PCGrad(k, seed=7)
    for step in range(4):
        J = _J(k, P, seed=10 * k + step)
        # clusters of opposite parity pull against a shared direction: many conflicts
        sign = torch.tensor([(-1.0) ** i for i in range(k)], dtype=torch.float64)
        J = J + 2 * sign[:, None] * J.mean(0, keepdim=True).sign()
        G = J @ J.T
        assert (G < 0).sum() >= k
        w = m.weights(G, present)
        assert w.dtype == torch.float32 and w.shape == (k,)
        orders = m.last_orders
        assert torch.equal(orders.sort(1).values, torch.arange(k).expand(k, k))
        ref = _pcgrad_pspace(J, orders, present) / present.sum()
        got = w.double() @ J
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * ref.norm().item())
        assert (w[~present] == 0).all()


def _orders_seq(m: PCGrad, G: torch.Tensor, valid: list[bool]) -> list[torch.Tensor]:
    present = torch.ones(m.k, dtype=torch.bool)
    out = []
    for v in valid:
        m.weights(G, present, torch.tensor(v))
        out.append(m.last_orders.clone())
    return out


def test_pcgrad_skipped_step_leaves_the_order_stream():
    """A non-finite step (valid False) changes nothing that a later step sees: the state after
    it is the state before it, and the next valid steps use the orders a run without it uses."""
    k = 5
    J = _J(k, 9, seed=3)
    G = J @ J.T
    a, b = PCGrad(k, seed=11), PCGrad(k, seed=11)
    seq_a = _orders_seq(a, G, [True, True, True])
    before = {key: v.clone() if isinstance(v, torch.Tensor) else v
              for key, v in a.state_dict().items()}  # fmt: skip
    _orders_seq(a, G, [False, False])
    after = a.state_dict()
    assert torch.equal(after["steps"], before["steps"]) and after["seed"] == before["seed"]
    seq_a += _orders_seq(a, G, [True, True])
    seq_b = _orders_seq(b, G, [True] * 5)
    assert all(torch.equal(x, y) for x, y in zip(seq_a, seq_b))
    assert len({tuple(o.flatten().tolist()) for o in seq_b}) > 1  # the orders change per step


@pytest.mark.parametrize("k", [1, 256, 300])
def test_pcgrad_order_tables_stay_small_for_any_k(k):
    """The tables hold uint8 entries up to k = 256 and int16 above, within a few MB, and still
    give permutations."""
    m = PCGrad(k, seed=1)
    tables = m._host_tables
    assert tables.dtype == (torch.uint8 if k <= 256 else torch.int16)
    assert tables.numel() * tables.element_size() <= max(PCGrad._TABLE_BYTES, 2 * 16 * k * k * 2)
    G = torch.eye(k, dtype=torch.float64)
    for o in _orders_seq(m, G, [True, True]):
        assert torch.equal(o.sort(1).values, torch.arange(k).expand(k, k))


def test_pcgrad_orders_are_uniform_permutations_and_resume_exactly():
    """Every row is a permutation; over many steps each of the 3! orders of a row comes up
    about equally often, also past one table period (no repetition at M); a checkpoint resumes
    the stream, and an old checkpoint without the counter is accepted with a warning."""
    k = 3
    m = PCGrad(k, seed=5)
    G = torch.eye(k, dtype=torch.float64)
    n = 3 * m.period
    seq = _orders_seq(m, G, [True] * n)
    rows = torch.stack(seq)  # [n, k, k]
    assert torch.equal(rows.sort(2).values, torch.arange(k).expand(n, k, k))
    codes = rows[:, 0, 0] * 9 + rows[:, 0, 1] * 3 + rows[:, 0, 2]
    freq = torch.bincount(codes, minlength=27)[codes.unique()].double() / n
    assert len(freq) == 6 and torch.all((freq - 1 / 6).abs() < 0.02)
    M = m.period  # noqa: N806
    assert any(not torch.equal(seq[i], seq[i + M]) for i in range(M))
    twin = PCGrad(k, seed=0)
    twin.load_state_dict(_roundtrip(m.state_dict()))
    assert all(torch.equal(x, y) for x, y in zip(_orders_seq(m, G, [True] * 4),
                                                 _orders_seq(twin, G, [True] * 4)))  # fmt: skip
    legacy = {"last_weights": None, "rng": {"seed": 5, "device_type": None, "state": None}}
    with pytest.warns(UserWarning, match="restart from step 0"):
        twin.load_state_dict(legacy)
    for bad in (3.5, torch.tensor(-1), torch.tensor(True), torch.tensor([1, 2])):
        with pytest.raises(ValueError, match="'steps' must be a one-element integer tensor >= 0"):
            twin.load_state_dict({"last_weights": None, "steps": bad})


@pytest.mark.interpret
def test_pcgrad_and_nash_default_dispatch():
    k = 5
    J = _J(k, 8, seed=21)
    present = _present(k, (1,))
    m = PCGrad(k, seed=1)
    w = m.weights(J @ J.T, present)
    ref = _pcgrad_pspace(J, m.last_orders, present) / present.sum()
    torch.testing.assert_close(w.double() @ J, ref, rtol=1e-5, atol=1e-5 * ref.norm().item())
    n = NashMTL(k)
    n.weights(J @ J.T, present)
    Gm = torch.where(present[:, None] & present[None, :], J @ J.T, 0.0)
    res = n.last_alpha * (Gm @ n.last_alpha)
    torch.testing.assert_close(res[present], torch.ones(k - 1, dtype=torch.float64))


def test_pcgrad_k2_removes_conflict():
    g1 = torch.tensor([1.0, 0.2, -0.5], dtype=torch.float64)
    g2 = torch.tensor([-0.8, 1.0, 0.3], dtype=torch.float64)
    J = torch.stack([g1, g2])
    assert g1 @ g2 < 0
    w = PCGrad(2, reduction="sum").weights(J @ J.T, _present(2))
    d = w.double() @ J
    closed = g1 + g2 - (g1 @ g2) * (g1 / (g1 @ g1) + g2 / (g2 @ g2))
    torch.testing.assert_close(d, closed, rtol=1e-6, atol=1e-7)
    assert d @ g1 >= -1e-7 and d @ g2 >= -1e-7
    # no conflict: plain sum
    J2 = torch.stack([g1, g1 + 0.1 * g2])
    w2 = PCGrad(2, reduction="sum").weights(J2 @ J2.T, _present(2))
    torch.testing.assert_close(w2, torch.ones(2))


# ---------------------------------------------------------------- Nash-MTL
@pytest.mark.parametrize("parallel", [0.0, 5.0])
@pytest.mark.parametrize("absent", [(), (2,)])
@pytest.mark.parametrize("scale", [1e-3, 7.0])
def test_nash_fixed_point(parallel, absent, scale):
    """alpha_i (G alpha)_i = 1 on the raw Gram (Nash-MTL's bargaining solution, which its
    authors' solver reaches although it normalises G): the update has norm sqrt(k_present)
    whatever the gradients' scale, and the weights scale as 1 / |g|."""
    k = 5
    J = _J(k, 13, seed=3, parallel=parallel) * scale
    present = _present(k, absent)
    Gm = torch.where(present[:, None] & present[None, :], J @ J.T, 0.0)
    m = NashMTL(k)
    assert m.update_every == 25
    w = m.weights(J @ J.T, present)
    alpha = m.last_alpha
    res = alpha * (Gm @ alpha)
    torch.testing.assert_close(res[present], torch.ones(int(present.sum()), dtype=torch.float64))
    assert (alpha[present] > 0).all() and (w[~present] == 0).all()
    kp = int(present.sum())
    torch.testing.assert_close((alpha @ J).norm(), torch.tensor(kp**0.5, dtype=torch.float64))
    unit = NashMTL(k)
    unit.weights((J / scale) @ (J / scale).T, present)
    torch.testing.assert_close(alpha * scale, unit.last_alpha)
    torch.testing.assert_close(w.double(), alpha / present.sum(), rtol=1e-6, atol=0)
    w_sum = NashMTL(k, reduction="sum").weights(J @ J.T, present)
    torch.testing.assert_close(w_sum.double(), alpha, rtol=1e-6, atol=0)


def test_nash_weights_at_the_top_of_the_float64_range():
    """A float64 Gram whose Frobenius norm exceeds 1.8e308 (entries near 1.5e308): the norm
    overflowed and every weight was 0. The weights are those of G / 4^e times 2^-e."""
    k = 5
    J = _J(k, 13, seed=4, parallel=5.0)
    G = J @ J.T
    e = math.floor(math.log2(1.5e308 / G.abs().max().item()) / 2)
    big, unit = NashMTL(k), NashMTL(k)
    big.weights(torch.ldexp(G, torch.tensor(2 * e)), _present(k))
    unit.weights(G, _present(k))
    assert (big.last_alpha > 0).all()
    torch.testing.assert_close(big.last_alpha, torch.ldexp(unit.last_alpha, torch.tensor(-e)),
                               rtol=1e-12, atol=0)  # fmt: skip


# ---------------------------------------------------------------- IMTL-G
@pytest.mark.parametrize("k,parallel", [(2, 0.0), (3, 0.0), (5, 0.0), (5, 3.0), (8, 0.0)])
def test_imtl_equal_projections_and_closed_form(k, parallel):
    J = _J(k, 17, seed=k, parallel=parallel)
    w = IMTLG(k).weights(J @ J.T, _present(k)).double()
    d = w @ J
    proj = (J @ d) / J.norm(dim=1)
    torch.testing.assert_close(proj, proj.mean().expand(k), rtol=1e-5, atol=0)
    # closed form of the paper in P space: alpha_{2:k} = g_1 U^T (D U^T)^{-1}
    U = J / J.norm(dim=1, keepdim=True)
    D, Ud = J[0] - J[1:], U[0] - U[1:]
    rest = (J[0] @ Ud.T) @ torch.linalg.inv(D @ Ud.T)
    alpha = torch.cat([1 - rest.sum().reshape(1), rest])
    torch.testing.assert_close(w, alpha, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("spread", [1e3, 1e6])
def test_imtl_keeps_equal_projections_across_far_apart_norms(spread):
    """Gradient norms spanning many orders (UW's exp(-s) factors widen them): the ridge used to
    sit on G's mean diagonal and outweigh the small clusters' entries (30% off at 1e6)."""
    J = _J(4, 17, seed=3, parallel=1.0)
    J = J * torch.logspace(0, np.log10(spread), 4, dtype=torch.float64)[:, None]
    w = IMTLG(4).weights(J @ J.T, _present(4)).double()
    d = w @ J
    proj = (J @ d) / J.norm(dim=1)
    torch.testing.assert_close(proj, proj.mean().expand(4), rtol=1e-5, atol=0)


def test_imtl_of_a_float32_gram_of_nearly_parallel_gradients_is_not_its_rounding():
    """Cosines 1 - 1e-8 apart (the diffusion case) are below a float32 Gram's rounding: solved
    as exact, its noise set the weights (0.67 / 0.12 / 0.21 where float64 gives 0.32 / 0.30 /
    0.37). The ridge now matches the Gram's precision; a float64 Gram keeps its exact answer."""
    rng = np.random.default_rng(0)
    v = rng.standard_normal(100)
    J = torch.tensor(np.stack([v, 1.01 * v, 0.99 * v]) + 1e-4 * rng.standard_normal((3, 100)))
    exact = IMTLG(3).weights(J @ J.T, _present(3)).double()
    w32 = IMTLG(3).weights((J @ J.T).float(), _present(3)).double()
    assert (w32 > 0).all() and (w32 - exact).abs().max() < 0.05
    # float64: the closed form, unchanged by the float32 ridge
    U = J / J.norm(dim=1, keepdim=True)
    D, Ud = J[0] - J[1:], U[0] - U[1:]
    rest = (J[0] @ Ud.T) @ torch.linalg.inv(D @ Ud.T)
    torch.testing.assert_close(exact, torch.cat([1 - rest.sum().reshape(1), rest]), rtol=1e-4,
                               atol=1e-5)  # fmt: skip


@pytest.mark.parametrize("k", [5, 8])
def test_imtl_of_a_float32_gram_never_points_uphill(k):
    """A float32 Gram of gradients with cosines >= 1 - 5e-8: rounding made the cosine matrix
    indefinite (lambda ~ -5e-7) next to the ridge (k eps ~ 6e-7), and the update's projection
    on every unit gradient was negative in 4-12 of 100 such cases (seed 7, k 5: -312 each,
    weights 7.9 / -3.3 / -0.7 / -2.1 / -0.8), or the update was 3-200x the norm of the float64
    Gram's. Every projection must be positive and the norm within 2.5x of float64's."""
    present = _present(k)
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        J = torch.randn(1, 4096, generator=g) * torch.linspace(0.5, 2, k)[:, None]
        J = J + 1e-4 * torch.randn(k, 4096, generator=g)
        w = IMTLG(k).weights(J @ J.T, present).double()  # float32, as the engine computes it
        J64 = J.double()
        proj = J64 @ (w @ J64) / J64.norm(dim=1)
        assert (proj > 0).all(), (seed, w, proj)
        assert w.sum().sub(1).abs() < 1e-6
        w64 = IMTLG(k).weights(J64 @ J64.T, present).double()
        assert (w @ J64).norm() < 2.5 * (w64 @ J64).norm(), (seed, w, w64)


def test_imtl_of_a_float32_gram_stays_near_the_float64_weights():
    """Nearly parallel gradients: the ridge is at least the float32 Gram's own rounding (2 k eps
    of float32), so its weights stay near those of the float64 Gram of the same gradients; a
    ridge at float64's rounding solved the float32 Gram as exact and gave weights of its noise
    (off by 0.7-1.2 here, against at most 0.25)."""
    k, present = 3, _present(3)
    for noise in (1e-4, 1e-5):
        for seed in range(40):
            g = torch.Generator().manual_seed(seed)
            J = torch.randn(1, 4096, generator=g) * torch.linspace(0.5, 2, k)[:, None]
            J = J + noise * torch.randn(k, 4096, generator=g)
            w32 = IMTLG(k).weights(J @ J.T, present).double()
            J64 = J.double()
            w64 = IMTLG(k).weights(J64 @ J64.T, present).double()
            assert (w32 - w64).abs().max() < 0.4, (noise, seed, w32, w64)


def test_imtl_of_a_float64_gram_keeps_its_own_solution():
    """Float64 Grams of well-spread gradients (row scales 1e-3..1e3): the projections on the
    unit gradients are equal, also where their common value is negative (IMTL-G's solution
    there; a positivity gate had swapped it for the 1 / |g_i| limit in ~1% of cases)."""
    rng = np.random.default_rng(1)
    negative = 0
    for _ in range(1000):
        k = int(rng.integers(2, 7))
        scales = np.logspace(-3, 3, k)[rng.permutation(k)]
        J = torch.tensor(rng.standard_normal((k, 20)) * scales[:, None])
        w = IMTLG(k).weights(J @ J.T, _present(k)).double()
        proj = (J @ (w @ J)) / J.norm(dim=1)
        torch.testing.assert_close(proj, proj.mean().expand(k), rtol=1e-4, atol=0)
        negative += int(proj.mean() < 0)
    assert negative > 0  # the case the gate replaced occurs among these


def _same_state(a: object, b: object) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same_state(a[n], b[n]) for n in a)
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    return a == b


def test_gram_methods_refuse_an_infinite_entry_between_finite_clusters():
    """inf off the diagonal with a finite diagonal (no Gram of finite rows holds it): IMTL-G and
    MGDA gave finite weights [0, 0, 1] (PCGrad, CAGrad and Nash-MTL NaN); NaN from every one."""
    G = torch.eye(3)
    G[0, 1] = G[1, 0] = float("inf")
    for cls in GRAM_CLASSES:
        if cls is MeanGram:  # the mean never reads G off its diagonal
            continue
        m = cls(3)
        m.weights(torch.eye(3), _present(3))
        state = m.state_dict()
        w = m.weights(G, _present(3))
        assert torch.isnan(w).all(), (cls.name, w)
        # nothing of an unsolved step is kept (PCGrad's order counter advanced on it)
        assert _same_state(m.state_dict(), state), cls.name


def test_gram_methods_take_a_finite_gram_near_the_float64_maximum():
    """G = diag(1e308, 1): its symmetrised copy (G + G^T) / 2 overflowed on the diagonal and the
    first cluster was dropped as non-finite (mean weights [0, 0.5])."""
    G = torch.tensor([[1e308, 0.0], [0.0, 1.0]], dtype=torch.float64)
    for cls in (MeanGram, PCGrad):  # orthogonal: no conflict, both the plain mean
        torch.testing.assert_close(cls(2).weights(G, _present(2)), torch.full((2,), 0.5))


def test_gram_methods_use_the_symmetric_part_of_the_gram():
    """A Gram computed in float32 need not be exactly symmetric: every method reads G and G^T
    alike (its symmetric part), so transposing it changes no weight."""
    J = _J(4, 30, seed=12, parallel=0.3)
    G = J @ J.T
    skew = 1e-3 * torch.tensor([[0.0, 1, -2, 3], [-1, 0, 4, -1], [2, -4, 0, 2], [-3, 1, -2, 0]],
                               dtype=torch.float64)  # fmt: skip
    A = G + skew * G.diagonal().mean()  # noqa: N806
    present = _present(4, (2,))
    for cls in GRAM_CLASSES:
        w, wt = cls(4).weights(A, present), cls(4).weights(A.T, present)
        assert torch.isfinite(w).all(), cls.name
        assert torch.equal(w, wt), (cls.name, w, wt)
        torch.testing.assert_close(w, cls(4).weights(0.5 * (A + A.T), present), rtol=1e-6,
                                   atol=1e-7, msg=cls.name)  # fmt: skip


@pytest.mark.parametrize("scale", [1e200, 1e-200])
def test_nash_weights_beyond_float32_are_unsolved_not_zero(scale):
    """Nash-MTL's weights scale as 1 / sqrt(||G||): for a float64 Gram of norm 1e200 they are
    1e-100, which float32 rounded to 0 and returned as a solved, zero update; 1e-200 gave inf.
    Both are unsolved (NaN) and the kept weights stay."""
    m = NashMTL(2)
    m.weights(torch.eye(2, dtype=torch.float64), _present(2))
    kept = m.last_weights.clone()
    alpha = m.last_alpha.clone()
    w = m.weights(torch.eye(2, dtype=torch.float64) * scale, _present(2))
    assert torch.isnan(w).all()
    assert torch.equal(m.last_weights, kept)
    assert torch.equal(m.last_alpha, alpha)  # the saved alpha took the rejected solve's


# ---------------------------------------------------------------- MGDA
def test_mgda_k2_closed_form():
    for seed in range(6):
        J = _J(2, 4, seed=seed)
        g1, g2 = J[0], J[1]
        gam = float(((g2 - g1) @ g2) / ((g1 - g2) @ (g1 - g2)))
        gam = min(max(gam, 0.0), 1.0)
        w = MGDA(2).weights(J @ J.T, _present(2)).double()
        torch.testing.assert_close(
            w, torch.tensor([gam, 1 - gam], dtype=torch.float64), atol=1e-6, rtol=0
        )


@pytest.mark.parametrize("parallel", [0.0, 2.0])
def test_mgda_k3_brute_force(parallel):
    J = _J(3, 6, seed=11, parallel=parallel)
    G = (J @ J.T).numpy()
    grid = _simplex_grid(600)
    best = np.einsum("nk,kl,nl->n", grid, G, grid).min()
    w = MGDA(3).weights(J @ J.T, _present(3)).double().numpy()
    obj = w @ G @ w
    assert obj <= best + 1e-7 * np.abs(G).max()
    assert best - obj <= 1e-4 * np.abs(G).max()


@pytest.mark.parametrize(
    "k,parallel,P,spread",
    [(5, 0.0, 20, 1), (5, 4.0, 20, 1), (8, 0.0, 6, 1), (8, 1.0, 30, 1), (5, 1.0, 20, 1e8)],
)
def test_mgda_min_norm_and_kkt(k, parallel, P, spread):
    J = _J(k, P, seed=100 + k, parallel=parallel)
    J = J * torch.logspace(0, np.log10(spread), k, dtype=torch.float64)[:, None]
    G = J @ J.T
    w = MGDA(k).weights(G, _present(k)).double().numpy()
    Gn = G.numpy()
    _check_simplex_kkt(w, 2 * Gn @ w, tol=1e-5, sum_tol=1e-6)  # w is float32
    if spread == 1:
        ref = _fista_simplex(lambda x: 2 * Gn @ x, k, lip=2 * np.linalg.eigvalsh(Gn)[-1])
    else:  # FISTA stalls at this conditioning: every support's KKT system, solved in numpy
        ref = _min_norm_by_supports(Gn)
    assert w @ Gn @ w <= ref @ Gn @ ref * (1 + 1e-6) + 1e-7 * np.abs(Gn).max() / spread**2
    # the min-norm point itself is unique even where the weights are not
    np.testing.assert_allclose(
        w @ J.numpy(), ref @ J.numpy(), atol=1e-5 * np.sqrt(np.abs(Gn).max())
    )


# ---------------------------------------------------------------- CAGrad
def _cagrad_dual_obj(W: np.ndarray, G: np.ndarray, b: np.ndarray, c: float) -> np.ndarray:
    cn = c * np.sqrt(b @ G @ b)
    quad = np.einsum("nk,kl,nl->n", W, G, W)
    return W @ (G @ b) + cn * np.sqrt(np.maximum(quad, 0))


@pytest.mark.parametrize(
    "k,parallel,c", [(3, 0.0, 0.4), (5, 0.0, 0.4), (5, 3.0, 0.8), (8, 0.0, 0.2)]
)
def test_cagrad_dual_kkt_and_reference(k, parallel, c):
    J = _J(k, 25, seed=200 + k, parallel=parallel)
    G = J @ J.T
    b = torch.full((k,), 1.0 / k, dtype=torch.float64)
    m = CAGrad(k, c=c)
    w = m.dual_weights(G, b, _present(k)).numpy()
    Gn, bn = G.numpy(), b.numpy()
    cn = c * np.sqrt(bn @ Gn @ bn)
    grad = Gn @ bn + cn * (Gn @ w) / np.sqrt(w @ Gn @ w)
    _check_simplex_kkt(w, grad, tol=1e-8, sum_tol=1e-12)
    # independent solve of the same dual (smooth away from g_w = 0)
    lam = np.linalg.eigvalsh(Gn)
    lip = lam[-1] * (1 + cn / np.sqrt(lam[0] / k))
    ref = _fista_simplex(lambda x: Gn @ bn + cn * Gn @ x / np.sqrt(x @ Gn @ x), k, lip)
    f_w, f_ref = _cagrad_dual_obj(np.stack([w, ref]), Gn, bn, c)
    assert f_w <= f_ref + 1e-10 * np.abs(Gn).max()
    if k == 3:
        grid = _simplex_grid(600)
        assert f_w <= _cagrad_dual_obj(grid, Gn, bn, c).min() + 1e-10 * np.abs(Gn).max()
    # the update: d = g0 + c|g0|/|g_w| g_w, divided by 1 + c^2; and it sits on the ball
    wt = torch.from_numpy(w)
    g0, gw = b @ J, wt @ J
    d = (g0 + c * g0.norm() / gw.norm() * gw) / (1 + c * c)
    got = m.weights(G, _present(k)).double() @ J
    torch.testing.assert_close(got, d, rtol=1e-5, atol=1e-6 * d.norm().item())
    assert abs(((1 + c * c) * got - g0).norm() / (c * g0.norm()) - 1) < 1e-5


def test_cagrad_primal_maximises_worst_improvement():
    k, c = 4, 0.5
    J = _J(k, 8, seed=5)
    d = CAGrad(k, c=c, rescale=0).weights(J @ J.T, _present(k)).double() @ J
    g0 = J.mean(0)
    worst = (J @ d).min()
    gen = torch.Generator().manual_seed(0)
    for _ in range(2000):
        v = torch.randn(8, generator=gen, dtype=torch.float64)
        v = g0 + c * g0.norm() * v / v.norm() * torch.rand(1, generator=gen).item() ** 0.1
        assert (J @ v).min() <= worst + 1e-6


# ---------------------------------------------------------------- GradDrop
def test_graddrop_elementwise_reference():
    k, P, seed = 4, 4099, 9
    J = _J(k, P, seed=1)
    present = _present(k, (2,))
    out = GradDrop(k, seed=seed).combine_grads(J, present)
    key = (seed + 0x9E3779B97F4A7C15) % 2**64  # GradDrop's stream: tag 1
    u = uniform_ref(key, torch.zeros(1, dtype=torch.int64), P).double()  # step 0 of its stream
    Jp = J[present].numpy()
    pur = 0.5 * (1 + Jp.sum(0) / np.abs(Jp).sum(0))
    pos = np.where(Jp > 0, Jp, 0).sum(0)
    neg = np.where(Jp < 0, Jp, 0).sum(0)
    ref = np.where(pur > u.numpy(), pos, neg) / 3
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-12, atol=1e-15)
    # the choice follows the purity: positives kept with probability P
    kept_pos = (out.numpy() == pos / 3) & (pos != 0)
    assert abs(kept_pos.mean() - pur.mean()) < 0.03
    with pytest.raises(TypeError, match="combine_grads"):
        GradDrop(k).weights(J @ J.T, present)


def test_graddrop_stream_skips_invalid_steps_and_round_trips():
    """U comes from (seed, valid steps): a skipped step draws nothing, so the steps after it
    combine exactly as in a run without it; the state restores the stream exactly."""
    k, P = 3, 257
    Js = [_J(k, P, seed=s) for s in range(4)]
    present = _present(k)
    a, b = GradDrop(k, seed=4), GradDrop(k, seed=4)
    outs_a = [a.combine_grads(J, present, torch.tensor(True)) for J in Js[:2]]
    a.combine_grads(Js[2], present, torch.tensor(False))  # a skipped step
    outs_a.append(a.combine_grads(Js[3], present, torch.tensor(True)))
    outs_b = [b.combine_grads(J, present) for J in (Js[0], Js[1], Js[3])]
    for x, y in zip(outs_a, outs_b):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    assert int(a.state_dict()["stream"]["steps"]) == 3
    twin = GradDrop(k, seed=99)
    twin.load_state_dict(_roundtrip(a.state_dict()))
    torch.testing.assert_close(twin.combine_grads(Js[0], present), a.combine_grads(Js[0], present))
    fresh = GradDrop(k, seed=4)
    first = fresh.combine_grads(Js[0], present)
    assert not torch.equal(fresh.combine_grads(Js[0], present), first)  # a new U every step
    used = torch.Generator().get_state()  # a generator-based stream that had drawn
    legacy = {"last_weights": None, "rng": {"seed": 5, "device_type": "cpu", "state": used}}
    with pytest.warns(UserWarning, match="restarts from step 0 of seed 5"):
        twin.load_state_dict(legacy)
    assert twin.stream.seed == 5 and int(twin.state_dict()["stream"]["steps"]) == 0
    with warnings.catch_warnings():  # one that never drew restarts exactly: no warning
        warnings.simplefilter("error")
        twin.load_state_dict({"last_weights": None, "rng": {"seed": 6, "device_type": None,
                                                            "state": None}})  # fmt: skip
    with pytest.raises(ValueError, match="seed must be an int in"):
        GradDrop(k, seed=-1)


def test_methods_given_one_seed_draw_independent_streams():
    method = make_method("rlw+graddrop", 4, seed=0)
    rlw, drop = method.loss.stream, method.grad.stream
    assert rlw.seed == drop.seed == 0 and rlw.key != drop.key
    a, b = rlw.uniform(4096, "cpu").double(), drop.uniform(4096, "cpu").double()
    assert not torch.equal(a[:8], b[:8])
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1]) < 4 / 64


def test_graddrop_leak_one_is_mean():
    J = _J(3, 50, seed=2)
    out = GradDrop(3, leak=1.0).combine_grads(J, _present(3))
    torch.testing.assert_close(out, J.mean(0))


@pytest.mark.parametrize("bad", [dict(leak=-0.1), dict(leak=1.5), dict(leak=float("nan")),
                                 dict(leak=True), dict(seed=2**64), dict(seed=-1)])  # fmt: skip
def test_graddrop_hyperparameters_are_checked_when_it_is_built(bad):
    """A leak outside [0, 1] or a seed outside [0, 2**64) is refused by the constructor (not
    at the first step; a seed of 2**64 would alias seed 0)."""
    what = "leak must be a number in" if "leak" in bad else "seed must be an int in"
    with pytest.raises(ValueError, match=re.escape(what)):
        GradDrop(3, **bad)
    with pytest.raises(ValueError, match=re.escape(what)):
        make_method("graddrop", 3, **bad)


def test_graddrop_state_saved_right_after_a_load_keeps_the_step():
    """A GradDrop loaded from a state and saved again before its next step (a checkpoint right
    after a resume) keeps the saved step count, and draws on as the original does."""
    J, present = _J(3, 40, seed=8), _present(3)
    a = GradDrop(3, seed=2)
    for _ in range(4):
        a.combine_grads(J, present)
    b = GradDrop(3, seed=9)
    b.load_state_dict(_roundtrip(a.state_dict()))
    again = GradDrop(3)
    again.load_state_dict(_roundtrip(b.state_dict()))  # b never stepped in between
    assert again.stream.seed == 2 and int(again.state_dict()["stream"]["steps"]) == 4
    torch.testing.assert_close(again.combine_grads(J, present), a.combine_grads(J, present))


@pytest.mark.parametrize("name", ["pcgrad", "graddrop"])
def test_terms_without_a_loss_method_are_zero_for_absent_clusters(name):
    """Alone, a gradient method's terms are the raw cluster losses, exactly 0 where a cluster
    is absent whatever L holds there (a NaN included)."""
    L = torch.tensor([1.5, float("nan"), 2.0, 7.0])  # noqa: N806
    present = torch.tensor([True, False, True, False])
    assert make_method(name, 4).terms(L, present).tolist() == [1.5, 0.0, 2.0, 0.0]


# ---------------------------------------------------------------- masks, NaN, state
@pytest.mark.parametrize("cls", GRAM_CLASSES, ids=lambda c: c.name)
@pytest.mark.parametrize("absent", [(), (0,), (1, 3), (0, 1, 2, 3), (0, 1, 2, 3, 4)])
def test_absent_clusters_get_zero_weight(cls, absent):
    k = 5
    J = _J(k, 9, seed=4)
    J[list(absent)] = 0.0  # the engine leaves absent rows zero
    present = _present(k, absent)
    for G in (J @ J.T, (J @ J.T).float()):
        w = cls(k).weights(G, present)
        assert torch.isfinite(w).all() and (w[~present] == 0).all()
        if present.any():
            assert (w[present] != 0).any()
    # a present cluster with an exactly zero gradient is ignored, not NaN
    J[4] = 0.0
    w = cls(k).weights(J @ J.T, _present(k))
    assert torch.isfinite(w).all() and w[4] == 0


def test_reduction_mean_vs_sum():
    k = 5
    J = _J(k, 9, seed=8)
    present = _present(k, (1,))
    for cls in GRAM_CLASSES:
        kw = {"seed": 3} if cls is PCGrad else {}
        wm = cls(k, reduction="mean", **kw).weights(J @ J.T, present)
        ws = cls(k, reduction="sum", **kw).weights(J @ J.T, present)
        torch.testing.assert_close(ws, 4 * wm, rtol=1e-6, atol=0)
    torch.testing.assert_close(MeanGram(k).weights(J @ J.T, present).sum(), torch.tensor(1.0))


def _roundtrip(sd: dict) -> dict:
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize(
    "name", ["pcgrad", "nash", "mgda", "graddrop", "uw+pcgrad", "famo+nash", "rlw+graddrop"]
)
def test_state_dict_round_trip(name):
    k = 5
    a = make_method(name, k)
    J = _J(k, 64, seed=12)
    present = _present(k, (3,))
    L = torch.rand(k, dtype=torch.float64)

    def step(m):
        m.observe(L, present)
        if m.needs == "grads":
            return m.combine_grads(J, present)
        return m.weights(J @ J.T, present)

    step(a), step(a)
    b = make_method(name, k)
    b.load_state_dict(_roundtrip(a.state_dict()))
    if a.needs == "gram":  # what the engine reuses between Nash recomputations
        assert torch.equal(a.grad.last_weights, b.grad.last_weights)
    for _ in range(3):
        assert torch.equal(step(a), step(b))
    if "nash" in name:
        assert torch.equal(a.grad.last_alpha, b.grad.last_alpha)
    # a state saved at another k is refused at load, not steps later (GradDrop's too, though
    # nothing in it is k-shaped)
    with pytest.raises(ValueError, match="this method has k=3"):
        make_method(name, 3).load_state_dict(_roundtrip(a.state_dict()))


@pytest.mark.parametrize("name", ["pcgrad", "nash", "imtl", "mgda", "cagrad"])
@pytest.mark.parametrize("bad", ["nan_row", "inf_diag"])
def test_a_nonfinite_cluster_counts_as_absent(name, bad):
    """As documented: a cluster whose gradient holds NaN or inf gets weight 0 and the others
    solve without it, the mean still dividing by the 4 present (an inf diagonal passed the old
    diag > 0 test: all-NaN weights)."""
    k = 4
    J = _J(k, 32, seed=9, parallel=0.5)
    G = J @ J.T
    if bad == "nan_row":
        G[2, :], G[:, 2] = float("nan"), float("nan")
    else:
        G[2, 2] = float("inf")
    torch.manual_seed(0)
    got = make_method(name, k).grad.weights(G, _present(k))
    torch.manual_seed(0)
    want = make_method(name, k).grad.weights(J @ J.T, _present(k, (2,)))
    assert got[2] == 0 and torch.isfinite(got).all()
    # the same weights up to the mean's divisor (4 present here, 3 there)
    torch.testing.assert_close(got / got.sum(), want / want.sum())


def test_loss_method_state_of_another_k_is_a_clear_error():
    with pytest.raises(ValueError, match="uw state does not fit: this method has k=3 clusters"):
        make_method("uw", 3).load_state_dict(_roundtrip(make_method("uw", 5).state_dict()))


def test_a_failed_state_load_changes_nothing():
    """A k=5 RLW state into k=3: its random stream loaded before the weights' shape failed, so
    the failed load still moved the stream. Loads are all or nothing now."""
    m = make_method("rlw", 3)
    for _ in range(2):
        m.terms(torch.rand(3, dtype=torch.float64), _present(3))
    before = _roundtrip(m.state_dict())
    other = make_method("rlw", 5, seed=11)
    for _ in range(4):
        other.terms(torch.rand(5, dtype=torch.float64), _present(5))
    with pytest.raises(ValueError, match="k=3"):
        m.load_state_dict(_roundtrip(other.state_dict()))
    assert repr(_roundtrip(m.state_dict())) == repr(before)


@pytest.mark.parametrize("seed", [-5, 2**64, 1.5, True])
def test_pcgrad_seed_is_checked(seed):
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*64\)"):
        make_method("pcgrad", 3, seed=seed)


# ---------------------------------------------------------------- registry
def test_make_method_parses_compositions():
    m = make_method("UW + PCGrad", 5, lr=0.01, seed=4)
    assert m.name == "uw+pcgrad" and m.needs == "gram" and m.update_every == 1
    assert m.loss.lr == 0.01 and m.grad.seed == 4 and m.grad.reduction == "sum"
    assert m.param_groups()[0]["lr"] == 0.01
    n = make_method("nash", 5, update_every=10)
    assert n.loss is None and n.grad.reduction == "mean" and n.update_every == 10
    assert make_method("uw+nash", 3).update_every == 25
    assert make_method("graddrop", 3).needs == "grads"
    assert make_method("ls", 3).needs == "none" and make_method("mean", 3).loss.name == "ls"
    v = make_method("vanilla", 3)
    assert v.is_vanilla and v.needs == "none"
    for name in available_methods():
        assert make_method(name, 3).name == name
    assert set(GRAD_METHODS) <= set(available_methods(compositions=False))


def test_available_methods_lists_each_method_once_and_no_equal_weight_composition():
    """"ls+<grad>" and "mean+<grad>" are accepted but not listed (they are <grad> alone, see
    below); every other loss method composes with every gradient method, each name once."""
    names = available_methods()
    assert len(names) == len(set(names))
    assert not [n for n in names if n.split("+")[0] in ("ls", "mean") and "+" in n]
    composed = {n for n in names if "+" in n}
    assert composed == {f"{a}+{b}" for a in ("uw", "rlw", "dwa", "famo") for b in GRAD_METHODS}
    assert make_method("ls+pcgrad", 3).name == "ls+pcgrad"  # accepted all the same
    singles = ["vanilla", "ls", "mean", "uw", "rlw", "dwa", "famo", *GRAD_METHODS]
    assert available_methods(compositions=False) == singles


@pytest.mark.parametrize("grad", [g for g in GRAD_METHODS if g != "graddrop"])
def test_ls_plus_grad_is_the_gradient_method_alone(grad):
    """Why available_methods() leaves "ls+<grad>" out: its update (weights from the Gram of the
    terms L_i / k_present, sum reduction) is the gradient method's own (mean reduction)."""
    k, present = 5, _present(5, (3,))
    J = _J(k, 64, seed=4, parallel=0.5)
    kp = int(present.sum())
    alone, composed = make_method(grad, k), make_method(f"ls+{grad}", k)
    torch.manual_seed(0)
    u_alone = alone.weights(J @ J.T, present).double() @ J
    torch.manual_seed(0)
    Jt = J / kp  # the rows of the ls terms
    u_composed = composed.weights(Jt @ Jt.T, present).double() @ Jt
    torch.testing.assert_close(u_composed, u_alone, rtol=1e-5, atol=1e-6)  # float32 weights


def test_a_loss_method_before_nash_leaves_its_update_unchanged():
    """Nash-MTL's weights absorb per-cluster scales (alpha_i / c_i for a gradient c_i g_i), so
    "uw+nash" with any log-variances updates the model exactly as "nash" alone."""
    k, present = 5, _present(5, (1,))
    J = _J(k, 64, seed=8, parallel=0.5) * 3.0
    alone, composed = make_method("nash", k), make_method("uw+nash", k)
    with torch.no_grad():
        composed.loss.s.copy_(torch.tensor([0.3, -1.2, 0.0, 2.0, -0.4]))
    L = torch.rand(k, dtype=torch.float64) + 0.5
    c = torch.autograd.functional.jacobian(
        lambda v: composed.loss.transform(v, present).sum(), L
    ).detach()  # the terms' slopes: the rows of J the composition sees are c_i g_i
    Jt = c[:, None] * J
    u_composed = composed.weights(Jt @ Jt.T, present).double() @ Jt
    u_alone = alone.weights(J @ J.T, present).double() @ J
    torch.testing.assert_close(u_composed, u_alone, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", ["foo", "pcgrad+uw", "uw+dwa", "uw+pcgrad+nash", "", "uw+"])
def test_make_method_rejects_unknown(bad):
    with pytest.raises(ValueError, match="valid names: vanilla, ls, mean, uw") as e:
        make_method(bad, 5)
    assert "pcgrad" in str(e.value) and "graddrop" in str(e.value)


@pytest.mark.parametrize(("typo", "meant"), [("pcgard", "pcgrad"), ("UW+PCGard", "uw+pcgrad"),
                                             ("nash_mtl", "nash")])  # fmt: skip
def test_a_mistyped_method_name_gets_a_suggestion(typo, meant):
    with pytest.raises(ValueError, match=f"did you mean '{re.escape(meant)}'"):
        make_method(typo, 5)


def test_make_method_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown hyperparameters.*'c'"):
        make_method("uw", 5, c=0.3)
    # nash takes update_every among its own; pcgrad's said only "unknown" (it is the engine's)
    with pytest.raises(ValueError, match=r"update_every is set for every method by ANT\(upd"):
        make_method("pcgrad", 5, update_every=2)
    with pytest.raises(ValueError, match="k must be"):
        make_method("uw", 0)
    with pytest.raises(ValueError, match="k <= 12"):
        make_method("mgda", 13)
    with pytest.raises(ValueError, match="reduction"):
        make_method("pcgrad", 3, reduction="avg")
    with pytest.raises(ValueError, match="G must"):
        make_method("imtl", 3).weights(torch.eye(4), _present(3))
    with pytest.raises(ValueError, match="present must"):
        make_method("imtl", 3).weights(torch.eye(3), torch.ones(3))
    with pytest.raises(ValueError, match="vanilla"):
        make_method("vanilla", 3).terms(torch.ones(3), _present(3))
    with pytest.raises(ValueError, match="vanilla takes no hyperparameters"):
        make_method("vanilla", 3, lr=0.1)
    with pytest.raises(ValueError, match="present is on meta"):  # not the Gram's device
        make_method("imtl", 3).weights(torch.eye(3), _present(3).to("meta"))
    with pytest.raises(ValueError, match="present is on meta"):
        make_method("graddrop", 3).combine_grads(torch.ones(3, 4), _present(3).to("meta"))


# ---------------------------------------------------------------- no host sync
def test_no_host_sync_calls_in_source():
    src = Path(__file__).resolve().parents[1] / "python" / "antdiff" / "mtl"
    pat = re.compile(r"\.item\(|\.tolist\(|\.cpu\(|\.numpy\(|float\(L|float\(G|(?<![.\w])bool\(")
    for f in src.glob("*.py"):
        hits = [ln for ln in f.read_text().splitlines() if pat.search(ln) and "``" not in ln]
        assert not hits, f"{f.name}: {hits}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU here")
def test_cuda_no_sync():
    k, dev = 5, torch.device("cuda")
    J = _J(k, 257, seed=1).float().to(dev)
    G = J @ J.T
    present = _present(k, (2,)).to(dev)
    L = torch.rand(k, device=dev)
    methods = [make_method(n, k) for n in available_methods() if n != "vanilla"]
    for m in methods:
        m.to(dev)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for m in methods:
            for _ in range(2):
                if m.loss is not None:
                    m.terms(L, present).sum()
                if m.needs == "gram":
                    m.weights(G, present)
                elif m.needs == "grads":
                    m.combine_grads(J, present)
                m.observe(L, present)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


@pytest.mark.parametrize("name", ["uw+pcgrad", "rlw+nash"])
def test_composite_weights_pass_the_valid_flag(name):
    """Composite.weights dropped ``valid``: a non-finite step advanced PCGrad's orders and
    replaced Nash's warm start through the composite API."""
    m = make_method(name, 4, seed=0)
    J = _J(4, 50, 0, parallel=0.5)  # noqa: N806
    G, present = J @ J.T, torch.ones(4, dtype=torch.bool)  # noqa: N806
    J2 = _J(4, 50, 1, parallel=0.5)  # noqa: N806
    m.weights(G, present)
    before = m.grad.state_dict()
    m.weights(J2 @ J2.T, present, torch.tensor(False))
    after = m.grad.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        a, b = before[key], after[key]
        assert torch.equal(a, b) if torch.is_tensor(a) else a == b, key
    m.weights(J2 @ J2.T, present, torch.tensor(True))
    changed = m.grad.state_dict()
    assert any(not (torch.equal(changed[key], before[key]) if torch.is_tensor(before[key])
                    else changed[key] == before[key]) for key in before)  # fmt: skip


def test_imtl_falls_back_to_the_parallel_limit_where_no_ridge_helps():
    """A Gram that is not PSD (a cosine above 1) defeats every ridge of IMTL-G's ladder: its
    last candidate is the parallel limit w ~ 1 / |g_i| (equal projections of parallel
    gradients), summing to 1: norms 1 and 2 give (2/3, 1/3). The path had no test."""
    c = 1 + 1e-5
    d = torch.tensor([1.0, 2.0], dtype=torch.float64)
    G = torch.tensor([[1.0, c], [c, 1.0]], dtype=torch.float64) * d[:, None] * d[None, :]  # noqa: N806
    w = IMTLG(2).weights(G, _present(2))
    torch.testing.assert_close(w.double(), torch.tensor([2 / 3, 1 / 3], dtype=torch.float64),
                               rtol=1e-6, atol=1e-7)  # fmt: skip


# ------------------------------------------- CAGrad, mean, subsets, PCGrad / Nash state, scale
def _cagrad_k2_reference(g1, g2, g0, c: float, div: float) -> torch.Tensor:
    """CAGrad's update for two active gradients, in float64: the dual min over t in [0, 1] of
    g_t . g0 + c |g0| |g_t| (g_t = t g1 + (1 - t) g2, convex in t) by ternary search, then
    d = g0 + c |g0| / |g_t| g_t, divided by ``div``."""

    def f(t: float) -> float:
        gt = t * g1 + (1 - t) * g2
        return float(gt @ g0 + c * g0.norm() * gt.norm())

    lo, hi = 0.0, 1.0
    for _ in range(200):
        a, b = lo + (hi - lo) / 3, hi - (hi - lo) / 3
        lo, hi = (lo, b) if f(a) <= f(b) else (a, hi)
    gt = 0.5 * (lo + hi) * g1 + (1 - 0.5 * (lo + hi)) * g2
    d = g0 + c * g0.norm() / gt.norm() * gt if c > 0 else g0
    return d / div


def _conflicting_pair() -> torch.Tensor:
    J = torch.tensor([[1.0, 0.3, -0.2, 0.5], [-0.6, 1.2, 0.4, -0.1]], dtype=torch.float64)
    assert J[0] @ J[1] < 0
    return J


@pytest.mark.parametrize(
    "kwargs,c,div",
    [({}, 0.4, 1 + 0.4**2), (dict(rescale=0), 0.4, 1.0), (dict(c=0.7, rescale=2), 0.7, 1.7),
     (dict(c=0.0), 0.0, 1.0)],
)  # fmt: skip
def test_cagrad_defaults_and_rescales_against_a_two_cluster_reference(kwargs, c, div):
    """The defaults (c = 0.4, the update divided by 1 + c^2), rescale 2 (by 1 + c) and c = 0
    (the mean gradient) against an independent solve of the k = 2 dual."""
    J = _conflicting_pair()
    got = CAGrad(2, **kwargs).weights(J @ J.T, _present(2)).double() @ J
    want = _cagrad_k2_reference(J[0], J[1], J.mean(0), c, div)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_cagrad_refuses_an_unknown_rescale_when_it_is_built():
    for bad in (3, -1, "1"):
        with pytest.raises(ValueError, match="rescale must be 0, 1 or 2"):
            CAGrad(3, rescale=bad)


@pytest.mark.parametrize("zero_gradient", [True, False])
def test_mean_and_cagrad_reference_the_mean_over_present_clusters(zero_gradient):
    """A present cluster with an exactly zero gradient still counts in the mean gradient g0
    (sum over present / k_present, as documented); an absent one does not, and its row of G
    plays no part in CAGrad's dual."""
    J = torch.cat([_conflicting_pair(), torch.tensor([[0.9, -0.4, 1.1, 0.3]], dtype=torch.float64)])
    if zero_gradient:
        J[2] = 0.0
        present, kp = _present(3), 3
    else:
        present, kp = _present(3, (2,)), 2
    G = J @ J.T
    mean = MeanGram(3).weights(G, present).double()
    torch.testing.assert_close(mean, torch.tensor([1 / kp, 1 / kp, 0.0], dtype=torch.float64))
    g0 = (J[0] + J[1]) / kp
    got = CAGrad(3).weights(G, present).double()
    assert got[2] == 0
    want = _cagrad_k2_reference(J[0], J[1], g0, 0.4, 1 + 0.4**2)
    torch.testing.assert_close(got @ J, want, rtol=1e-5, atol=1e-6)


def test_subset_methods_take_k_12_and_refuse_13():
    """MGDA and CAGrad solve every support exactly up to k = 12 (MAX_SUBSET_K) and refuse k = 13
    when built."""
    k = 12
    J = _J(k, 40, seed=31)
    G = J @ J.T
    w = MGDA(k).weights(G, _present(k)).double().numpy()
    _check_simplex_kkt(w, 2 * G.numpy() @ w, tol=1e-5, sum_tol=1e-6)
    w = CAGrad(k).weights(G, _present(k))
    assert torch.isfinite(w).all() and (w > 0).any()
    for cls in (MGDA, CAGrad):
        with pytest.raises(ValueError, match="k <= 12"):
            cls(13)


def test_pcgrad_seed_sets_the_orders():
    """The order stream is a function of the seed: one seed repeats it, another differs."""
    G = torch.eye(5, dtype=torch.float64)
    a, b, c = PCGrad(5, seed=1), PCGrad(5, seed=1), PCGrad(5, seed=2)
    sa, sb, sc = (_orders_seq(m, G, [True] * 3) for m in (a, b, c))
    assert all(torch.equal(x, y) for x, y in zip(sa, sb))
    assert not all(torch.equal(x, y) for x, y in zip(sa, sc))


def test_pcgrad_state_loads_into_a_used_method_and_saves_right_after_a_load():
    """A load replaces the step counter of a PCGrad that has already stepped, and a state
    saved right after a load (no step in between) keeps the loaded counter."""
    G = torch.eye(4, dtype=torch.float64)
    a = PCGrad(4, seed=3)
    _orders_seq(a, G, [True] * 5)
    used = PCGrad(4, seed=3)
    _orders_seq(used, G, [True] * 9)
    used.load_state_dict(_roundtrip(a.state_dict()))
    again = PCGrad(4, seed=3)
    again.load_state_dict(_roundtrip(a.state_dict()))
    resaved = PCGrad(4, seed=0)
    resaved.load_state_dict(_roundtrip(again.state_dict()))  # ``again`` never stepped
    assert int(resaved.state_dict()["steps"]) == 5
    want = _orders_seq(a, G, [True] * 3)
    for m in (used, resaved):
        assert all(torch.equal(x, y) for x, y in zip(_orders_seq(m, G, [True] * 3), want))


def test_nash_default_iterations_solve_nearly_cancelling_gradients():
    """g_2 = -g_1 + 1e-2 noise: the damped Newton solve needs about 20 iterations; the default
    (40) reaches alpha * (G alpha) = 1 with alpha > 0."""
    g = torch.Generator().manual_seed(1)
    J = torch.randn(5, 20, generator=g, dtype=torch.float64)
    J[1] = -J[0] + 1e-2 * torch.randn(20, generator=g, dtype=torch.float64)
    G = J @ J.T
    m = NashMTL(5)
    assert torch.isfinite(m.weights(G, _present(5))).all()
    alpha = m.last_alpha
    assert (alpha > 0).all()
    torch.testing.assert_close(alpha * (G @ alpha), torch.ones(5, dtype=torch.float64),
                               rtol=1e-8, atol=0)  # fmt: skip


def test_nash_state_load_keeps_alpha_and_checks_reduction_and_k():
    """A current state loads without a warning and restores alpha before any step; one saved
    with the other reduction is marked stale (with a warning); an alpha of another k is
    refused at load."""
    J = _J(3, 10, seed=5, parallel=1.0)
    a = NashMTL(3)
    a.weights(J @ J.T, _present(3))
    b = NashMTL(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b.load_state_dict(_roundtrip(a.state_dict()))
    assert not b.stale_weights and torch.equal(b.last_alpha, a.last_alpha)
    summed = NashMTL(3, reduction="sum")
    summed.weights(J @ J.T, _present(3))
    c = NashMTL(3)
    with pytest.warns(UserWarning, match="Nash-MTL state from an earlier antdiff"):
        c.load_state_dict(_roundtrip(summed.state_dict()))
    assert c.stale_weights
    bad = {**a.state_dict(), "last_alpha": torch.ones(5, dtype=torch.float64)}
    with pytest.raises(ValueError, match=r"'last_alpha' has shape \(5,\), but this method has k=3"):
        NashMTL(3).load_state_dict(bad)


def _mgda_k2(J: torch.Tensor) -> torch.Tensor:
    g1, g2 = J[0], J[1]
    gam = min(max(float(((g2 - g1) @ g2) / ((g1 - g2) @ (g1 - g2))), 0.0), 1.0)
    return torch.tensor([gam, 1 - gam], dtype=torch.float64)


def test_mgda_and_cagrad_of_a_subnormal_gram():
    """Both are invariant to G's scale: a float64 Gram with subnormal entries (|G| ~ 1e-310)
    gives the weights of G itself (solved without the normalisation, 1 / sqrt(diag G)
    overflowed and MGDA's weights were NaN)."""
    J = _conflicting_pair()
    G = J @ J.T
    e = math.floor(math.log2(1e-310 / G.abs().max().item()))
    tiny = torch.ldexp(G, torch.tensor(e))
    assert 0 < tiny.abs().max() < torch.finfo(torch.float64).tiny
    torch.testing.assert_close(MGDA(2).weights(tiny, _present(2)).double(), _mgda_k2(J),
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    got = CAGrad(2).weights(tiny, _present(2)).double() @ J
    torch.testing.assert_close(got, _cagrad_k2_reference(J[0], J[1], J.mean(0), 0.4, 1.16),
                               rtol=1e-5, atol=1e-6)  # fmt: skip


# The mean active diagonal was computed as diag.sum() / n, whose sum overflowed to inf for a
# finite Gram near the float64 maximum: G / inf = 0, and MGDA returned [1, 0], CAGrad the mean.
def test_mgda_and_cagrad_of_a_gram_near_the_float64_maximum():
    """Both are invariant to G's scale, up to the top of the float64 range (entries ~1.7e308,
    whose diagonal sum is beyond it), like Nash-MTL and the mean."""
    J = _conflicting_pair()
    G = J @ J.T
    big = G * (1.7e308 / G.abs().max().item())
    assert torch.isfinite(big).all() and not torch.isfinite(big.diagonal().sum())
    torch.testing.assert_close(MGDA(2).weights(big, _present(2)).double(), _mgda_k2(J),
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    got = CAGrad(2).weights(big, _present(2)).double() @ J
    torch.testing.assert_close(got, _cagrad_k2_reference(J[0], J[1], J.mean(0), 0.4, 1.16),
                               rtol=1e-5, atol=1e-6)  # fmt: skip

"""ant_kernels: the torch references' documented semantics and argument checks, and the dispatch
rules (policy value, reasons, launch helpers), against values computed independently: by hand,
in float64, or by the documented iteration written out again here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_kernels_combine import _negated
from test_kernels_graddrop import _case, _definition
from test_kernels_nash import _INDEFINITE, _opposed

import ant_kernels
from ant_kernels import (
    _dispatch,
    backend_reasons,
    combine,
    combine_ref,
    graddrop,
    graddrop_ref,
    gram,
    gram_ref,
    nash_weights,
    nash_weights_ref,
    pcgrad_weights,
    pcgrad_weights_ref,
    uniform,
    uniform_ref,
)
from ant_kernels.reference import NASH_TOL

STEP = torch.tensor([3], dtype=torch.int64)
TORCH_ONLY = "ANT_KERNELS_BACKEND=torch forces the reference"
NO_TRITON = [] if _dispatch.HAS_TRITON else ["triton is not installed"]


@pytest.fixture
def interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dispatch as under TRITON_INTERPRET=1 with interpreted kernels, whatever the machine."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(_dispatch, "_jit_interpreted", {True})


# ------------------------------------------------------------------------------------ dispatch


def test_policy_value_is_trimmed_case_folded_and_defaults_to_auto(monkeypatch):
    monkeypatch.delenv("ANT_KERNELS_BACKEND", raising=False)
    assert _dispatch.backend() == "auto"
    for value, want in (("", "auto"), ("  ", "auto"), (" Torch\n", "torch"), ("TRITON", "triton")):
        monkeypatch.setenv("ANT_KERNELS_BACKEND", value)
        assert _dispatch.backend() == want, value
    monkeypatch.setenv("ANT_KERNELS_BACKEND", "gpu")
    with pytest.raises(ValueError, match=r"ANT_KERNELS_BACKEND='gpu' is not valid"):
        _dispatch.backend()


def test_interpreting_means_triton_interpret_1(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert _dispatch.interpreting() is False
    for value, want in (("1", True), ("0", False), ("", False)):
        monkeypatch.setenv("TRITON_INTERPRET", value)
        assert _dispatch.interpreting() is want, value


@pytest.mark.skipif(not _dispatch.HAS_TRITON, reason="triton is not installed")
def test_interpreting_agrees_with_triton(monkeypatch):
    """Triton decides interpreter or compiler from its own reading of TRITON_INTERPRET; the
    dispatch must read the variable the same way or it refuses (forced triton: a RuntimeError
    that says to set TRITON_INTERPRET=1) tensors the interpreter would run."""
    want = {"1": True, "0": False, "": False, "true": True, "On": True, "YES": True, "off": False}
    for value, on in want.items():
        monkeypatch.setenv("TRITON_INTERPRET", value)
        assert _dispatch.interpreting() is on, value
        if _dispatch.HAS_TRITON:  # Triton's own reading of the variable
            from triton._C.libtriton import getenv_bool

            assert getenv_bool("TRITON_INTERPRET", False) is on, value


def test_reasons_are_exactly_the_causes(monkeypatch, interpreter):
    """Each cause gives its one reason: none for CPU tensors under the interpreter, only the
    policy under ``torch``, only the device for meta tensors (whatever TRITON_INTERPRET says)."""
    J = torch.zeros(3, 5)
    monkeypatch.setenv("ANT_KERNELS_BACKEND", "torch")
    assert backend_reasons("gram", J, k=3) == [TORCH_ONLY, *NO_TRITON]
    monkeypatch.setenv("ANT_KERNELS_BACKEND", "auto")
    assert backend_reasons("gram", J, k=3) == NO_TRITON
    meta = ["tensors on meta: Triton runs CUDA tensors (or CPU ones under TRITON_INTERPRET=1)"]
    for value in ("0", "1"):
        monkeypatch.setenv("TRITON_INTERPRET", value)
        assert backend_reasons("gram", J.to("meta"), k=3) == [*NO_TRITON, *meta], value


def test_reasons_name_the_conjugation_bit_and_the_first_tensors_dtype(monkeypatch, interpreter):
    monkeypatch.setenv("ANT_KERNELS_BACKEND", "auto")
    z = torch.zeros(2, 3, dtype=torch.complex64).conj()
    assert any("resolve_conj" in r for r in backend_reasons("gram", z, k=2))
    # the dtype is J's (the first tensor), not the fp32 weights' or out's after it
    J64, w, out = torch.zeros(2, 3, dtype=torch.float64), torch.zeros(2), torch.zeros(3)
    reasons = backend_reasons("combine", J64, w, out, k=2)
    assert any("dtype torch.float64 is not supported" in r for r in reasons), reasons
    assert backend_reasons("combine", J64.float(), w.double(), out.double(), k=2) == NO_TRITON


def test_next_pow2_and_column_parts():
    nxt = _dispatch.next_pow2
    assert [nxt(n) for n in (0, 1, 2, 3, 4, 5, 8, 9, 33, 64)] == [1, 1, 2, 4, 4, 8, 8, 16, 64, 64]
    assert [nxt(n, 2) for n in (0, 1, 2, 3)] == [2, 2, 2, 4]
    parts = _dispatch.column_parts
    assert parts(1) == [slice(0, 1)] and parts(15) == [slice(0, 15)]
    assert parts(16) == [slice(0, 16)] and parts(4096) == [slice(0, 4096)]
    assert parts(24) == [slice(0, 16), slice(16, 24)]
    assert parts(4099) == [slice(0, 4096), slice(4096, 4099)]


def _forced(monkeypatch, call):
    """RuntimeError message of ``call`` under ANT_KERNELS_BACKEND=triton."""
    monkeypatch.setenv("ANT_KERNELS_BACKEND", "triton")
    with pytest.raises(RuntimeError) as info:
        call()
    return str(info.value)


def test_launchers_pass_k_and_every_tensor_to_the_dispatch(monkeypatch, interpreter):
    """Forced Triton refuses what its kernels cannot read, so a launcher must hand the dispatch
    k and each tensor the kernel reads: a k above the kernel's tile, combine's w alone, and
    GradDrop's divisor or out alone with the lazy negation bit (the kernel reads memory: -x)."""
    gen = torch.Generator().manual_seed(0)
    J65, w65 = torch.randn(65, 3, generator=gen), torch.randn(65, generator=gen)
    assert "k=65" in _forced(monkeypatch, lambda: combine(w65, J65))
    present = torch.ones(65, dtype=torch.bool)
    assert "k=65" in _forced(monkeypatch, lambda: graddrop(J65, present, 1, STEP))
    J, present = _case(3, 37)
    w = torch.randn(3, generator=gen)
    assert "resolve_neg" in _forced(monkeypatch, lambda: combine(_negated(w), J))
    div = torch.tensor(2.0)
    assert "resolve_neg" in _forced(monkeypatch, lambda: graddrop(J, present, 5, STEP, 0.25,
                                                                  _negated(div)))  # fmt: skip
    out = _negated(torch.zeros(37))
    assert "resolve_neg" in _forced(monkeypatch, lambda: graddrop(J, present, 5, STEP, out=out))
    # auto: the reference, which applies the bit
    monkeypatch.setenv("ANT_KERNELS_BACKEND", "auto")
    want = graddrop_ref(J, present, 5, STEP, 0.25, div)
    assert torch.equal(graddrop(J, present, 5, STEP, 0.25, _negated(div)), want)
    torch.testing.assert_close(combine(_negated(w), J), w.double() @ J.double(), check_dtype=False)


def test_launchers_check_arguments_before_any_kernel(monkeypatch, interpreter):
    """Forced Triton with tensors the kernels would take: each launcher still refuses bad
    arguments with the references' errors (the other tests reach these checks through the
    reference path only, which repeats them)."""
    monkeypatch.setenv("ANT_KERNELS_BACKEND", "triton")
    J, present = _case(4, 10)
    bad = {
        "combine-w": (lambda: combine(torch.ones(3), J), "w must be a float tensor"),
        "combine-out": (lambda: combine(torch.ones(4), J, torch.zeros(10, dtype=torch.int64)),
                        "out must be a float tensor"),
        "pcgrad-orders": (lambda: pcgrad_weights(torch.eye(4), torch.zeros(4, 4)),
                          "orders must be an int64 or int32 tensor"),
        "nash-iters": (lambda: nash_weights(torch.eye(4), iters=-1), "iters must be an int"),
        "uniform-seed": (lambda: uniform(-1, STEP, 3), "seed must be an int in"),
        "uniform-step": (lambda: uniform(1, torch.tensor([0.0]), 3), "one-element int64"),
        "graddrop-seed": (lambda: graddrop(J, present, -3, STEP), "seed must be an int in"),
        "graddrop-step": (lambda: graddrop(J, present, 1, torch.tensor([0.0])),
                          "one-element int64"),
    }  # fmt: skip
    for call, match in bad.values():
        with pytest.raises(ValueError, match=match):
            call()


@pytest.mark.interpret
def test_kernels_read_strided_weights_and_write_a_strided_out(kernel_device, force_triton):
    """w a view with stride 2 (combine), out a view with stride 3 (GradDrop): the launchers pass
    those strides; the tests elsewhere read contiguous weights and write contiguous rows."""
    gen = torch.Generator().manual_seed(1)
    J = torch.randn(3, 37, generator=gen)
    wide = torch.randn(6, generator=gen)
    w = wide.to(kernel_device)[::2]
    got = combine(w, J.to(kernel_device), torch.empty(37, device=kernel_device)).cpu()
    torch.testing.assert_close(got.double(), wide[::2].double() @ J.double(), rtol=1e-6,
                               atol=1e-6)  # fmt: skip
    J, present = _case(3, 37)
    big = torch.full((3 * 37,), -7.0, device=kernel_device)
    out = graddrop(J.to(kernel_device), present.to(kernel_device), 5, STEP.to(kernel_device),
                   0.25, out=big[::3])  # fmt: skip
    assert out.data_ptr() == big.data_ptr()
    assert torch.equal(big[::3].cpu(), graddrop_ref(J, present, 5, STEP, 0.25))
    assert bool((big.view(37, 3)[:, 1:] == -7).all())


def test_gram_launch_plans_refuse_what_they_cannot_build():
    from ant_kernels.gram import _grid, _plan, _word_aligned

    assert _grid(2**31 - 1, 1) == (2**31 - 1,)  # CUDA's axis-0 limit itself is allowed
    with pytest.raises(ValueError, match="more than CUDA's 2147483647"):
        _grid(2**30, 2)
    with pytest.raises(ValueError, match="split gram kernel serves k <= 8, got k=9"):
        _plan(torch.zeros(9, 64), config=(0, 4, 16, 4))
    buf = torch.zeros(3, 4098, dtype=torch.bfloat16)
    one = buf.view(-1)[: 3 * 4097].view(3, 4097)[:1, :4096]  # one row, odd row stride
    assert one.stride(0) == 4097 and _word_aligned(one)
    assert not _word_aligned(buf.view(-1)[: 3 * 4097].view(3, 4097)[:2, :4096])
    assert _word_aligned(buf[:, :4096]) and not _word_aligned(buf[:, 1:4097])  # 2 bytes in


@pytest.mark.interpret
def test_gram_row_tiles_cover_every_tile_pair(kernel_device, force_triton):
    """k = 11 takes two row tiles (T = 2, 4 tile pairs per span): small integers, so every entry
    is exact; a workspace sized for T rather than T^2 pairs per span loses blocks."""
    ints = torch.randint(-8, 9, (11, 37), generator=torch.Generator().manual_seed(4)).float()
    G, finite = gram(ints.to(kernel_device))
    assert bool(finite) and torch.equal(G.cpu(), ints @ ints.T)


# ---------------------------------------------------------------------- argument checks


def _bad_calls():
    J, w, G = torch.ones(2, 4), torch.ones(2), torch.eye(2)
    orders = torch.tensor([[0, 1], [1, 0]])
    present, div = torch.ones(2, dtype=torch.bool), torch.tensor(1.0)
    meta = torch.device("meta")
    return {
        "J-P0": (lambda: gram_ref(torch.zeros(3, 0)), ValueError, r"k, P >= 1, got \(3, 0\)"),
        "J-list": (lambda: gram_ref([[1.0]]), TypeError, "J must be a torch.Tensor, got list"),
        "G-0x0": (lambda: nash_weights_ref(torch.zeros(0, 0)), ValueError, "k >= 1"),
        "G-int": (lambda: pcgrad_weights_ref(torch.eye(2, dtype=torch.int64), orders),
                  ValueError, "G must be a float tensor"),
        "w-device": (lambda: combine_ref(w.to(meta), J), ValueError, "must share one device"),
        "orders-device": (lambda: pcgrad_weights_ref(G, orders.to(meta)), ValueError,
                          "orders is on meta but G is on cpu"),
        "orders-list": (lambda: pcgrad_weights_ref(G, [[0, 1], [1, 0]]), TypeError,
                        "orders must be a torch.Tensor, got list"),
        "n-bool": (lambda: uniform_ref(1, STEP, True), ValueError, "n must be an int >= 0"),
        "offset-2**62": (lambda: uniform_ref(1, STEP, 2, offset=2**62), ValueError,
                         r"offset must be an int in \[0, 2\*\*62\)"),
        "uniform-out-device": (lambda: uniform_ref(1, STEP, 2, out=torch.empty(2, device=meta)),
                               ValueError, r"out must be a float32 \[n\]=\[2\] tensor on cpu"),
        "leak-bool": (lambda: graddrop_ref(J, present, 1, STEP, True, div), ValueError,
                      r"leak must be a number in \[0, 1\], got True"),
        "divisor-int": (lambda: graddrop_ref(J, present, 1, STEP, 0.0, torch.tensor(2)),
                        ValueError, "divisor must be a one-element float tensor"),
        "graddrop-out-int": (lambda: graddrop_ref(J, present, 1, STEP, 0.0, div,
                                                  torch.zeros(4, dtype=torch.int32)),
                             ValueError, r"out must be a float tensor of shape \[P\]=\[4\]"),
        "divisor-device": (lambda: graddrop_ref(J, present, 1, STEP, 0.0, div.to(meta)),
                           ValueError, "J, present, divisor, out and step must share one device"),
    }  # fmt: skip


@pytest.mark.parametrize("case", list(_bad_calls()))
def test_references_refuse_bad_arguments(case):
    call, exc, match = _bad_calls()[case]
    with pytest.raises(exc, match=match):
        call()


def test_a_one_element_out_may_have_stride_0():
    """Stride 0 is refused because P > 1 results would share one location; one result may."""
    J, w = torch.tensor([[2.0], [3.0]]), torch.tensor([1.0, -1.0])
    out = torch.zeros(()).expand(1)
    assert out.stride(0) == 0 and combine_ref(w, J, out) is out and out.item() == -1.0
    present = torch.ones(2, dtype=torch.bool)
    out = torch.zeros(()).expand(1)
    assert graddrop_ref(J, present, 1, STEP, 0.0, out=out) is out and out.item() == 5.0


# ------------------------------------------------------------------------------------- pcgrad


def test_pcgrad_int32_orders_are_the_int64_orders():
    gen = torch.Generator().manual_seed(2)
    J = torch.randn(5, 30, generator=gen, dtype=torch.float64)
    J[1] = -J[0] + 0.1 * J[1]
    G = J @ J.T
    orders = torch.stack([torch.randperm(5, generator=gen) for _ in range(5)])
    want = pcgrad_weights_ref(G, orders)
    assert not torch.equal(want, torch.ones(5, dtype=torch.float64))  # something projected
    assert torch.equal(pcgrad_weights_ref(G, orders.int()), want)
    assert torch.equal(pcgrad_weights(G, orders.int()), want)


def test_pcgrad_never_projects_on_a_cluster_with_zero_norm():
    """The rule is: d < 0 AND G[j, j] != 0. With G[1, 1] = 0 but G[0, 1] = -1 (a G no J has, so
    only the rule decides) row 0 stays g_0; row 1 takes -(-1 / 1) g_0 once: w = (2, 1). Without
    the G[j, j] test the reference divided by 1 in place of 0 and gave (2, 3)."""
    G = torch.tensor([[1.0, -1.0], [-1.0, 0.0]], dtype=torch.float64)
    orders = torch.tensor([[1, 0], [0, 1]])
    want = torch.tensor([2.0, 1.0], dtype=torch.float64)
    assert torch.equal(pcgrad_weights_ref(G, orders), want)
    assert torch.equal(pcgrad_weights_ref(G.float(), orders), want.float())


@pytest.mark.interpret
def test_pcgrad_kernel_never_projects_on_a_cluster_with_zero_norm(kernel_device, force_triton):
    G = torch.tensor([[1.0, -1.0], [-1.0, 0.0]], dtype=torch.float64, device=kernel_device)
    orders = torch.tensor([[1, 0], [0, 1]], device=kernel_device)
    assert pcgrad_weights(G, orders).cpu().tolist() == [2.0, 1.0]


# --------------------------------------------------------------------------------------- nash


def _newton(G: torch.Tensor, iters: int) -> list[tuple[torch.Tensor, float, bool]]:
    """The documented solve written out again, float64: G / max|G| / ||.||_F, inactive clusters
    (G_ii <= 0) out of the problem, start s u with u_i = 1 / sqrt(G_ii) and s^2 = n / u^T G u,
    Newton steps damped by 1 / (1 + lambda) while lambda >= 1/4. Returns, for 0..iters steps,
    (a on the active clusters, max |a (G a) - 1|, all a > 0)."""
    G = G.double()
    G = G / G.abs().max()
    G = G / torch.linalg.matrix_norm(G)
    act = G.diagonal() > 0
    G = G[act][:, act]
    u = 1 / G.diagonal().sqrt()
    a = math.sqrt(int(act.sum()) / float(u @ G @ u)) * u
    seen = []
    for _ in range(iters + 1):
        seen.append((a, float((a * (G @ a) - 1).abs().max()), bool((a > 0).all())))
        grad = G @ a - 1 / a
        x = torch.linalg.solve(G + torch.diag(1 / a**2), grad)
        lam = math.sqrt(max(float(grad @ x), 0.0))
        a = a - (1.0 if lam < 0.25 else 1 / (1 + lam)) * x
    return seen


def _with_an_empty_cluster() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    J = torch.randn(5, 50, generator=gen, dtype=torch.float64)
    J = J * torch.exp(2 * torch.randn(5, 1, generator=gen, dtype=torch.float64))
    J[2] = 0.0
    return J @ J.T


def test_nash_result_follows_the_documented_iteration():
    """After each fixed number of steps the reference returns the iterate of the documented
    solve where it passes the tolerance (NASH_TOL = 1e-6, all a > 0) and NaN where it does not.
    The cases cover an iterate between 1e-9 and 1e-6 (accepted) and one between 1e-6 and 1e-4
    (refused), an empty cluster (out of the solve, weight 0), the damped phase (opposed Grams:
    28 and 17 steps; the latter's count moves if the damping ends at another lambda), an
    indefinite float32 Gram (negative weights: refused) and an indefinite G whose iterates
    converge to a solution with a negative weight (residual 1e-15, refused)."""
    assert NASH_TOL == 1e-6
    mixed = torch.tensor([[0.505, 0.287, 0.594], [0.287, 0.0026, 0.764], [0.594, 0.764, 0.509]],
                         dtype=torch.float64)  # fmt: skip
    cases = {"empty": (_with_an_empty_cluster(), 8), "opposed8": (_opposed(8, 0.01), 32),
             "opposed5": (_opposed(5, 0.05), 20), "indefinite": (torch.tensor(_INDEFINITE), 12),
             "mixed": (mixed, 32)}  # fmt: skip
    seen, negative = [], 0
    for name, (G, steps) in cases.items():
        act = G.diagonal() > 0
        for i, (a, res, pos) in enumerate(_newton(G, steps)):
            if 0.5 * NASH_TOL < res < 2 * NASH_TOL:
                continue  # too close to the tolerance to call
            seen.append(res)
            negative += res < 1e-9 and not pos
            got = nash_weights_ref(G, iters=i)
            want_ok = res <= NASH_TOL and pos
            assert bool(torch.isfinite(got).all()) is want_ok, (name, i, res, pos)
            if want_ok:
                assert torch.equal(got[~act], torch.zeros(int((~act).sum()), dtype=torch.float64))
                torch.testing.assert_close(got[act], a, rtol=1e-9, atol=0, msg=f"{name} {i}")
            else:
                assert bool(got.isnan().all()), (name, i)
    assert any(1e-9 < r < 0.5 * NASH_TOL for r in seen) and any(2e-6 < r < 1e-4 for r in seen)
    assert negative > 0


def test_nash_start_is_exact_for_orthogonal_and_parallel_gradients():
    """No Newton step needed (iters=0) where the documented start is the solution, also with
    an empty cluster (G_ii = 0), which neither counts in n nor in u^T G u."""
    d = torch.tensor([1.0, 4.0, 0.0, 9.0], dtype=torch.float64)
    a = nash_weights_ref(torch.diag(d), iters=0)
    want = torch.tensor([1.0, 0.5, 0.0, 1.0 / 3.0], dtype=torch.float64) * d.norm().sqrt()
    torch.testing.assert_close(a, want, rtol=1e-14, atol=0)
    g = torch.tensor([1.0, 2.0, 0.0, 5.0], dtype=torch.float64)
    a = nash_weights_ref(torch.outer(g, g), iters=0, normalize=False)
    want = torch.tensor([1.0, 0.5, 0.0, 0.2], dtype=torch.float64) / math.sqrt(3)
    torch.testing.assert_close(a, want, rtol=1e-14, atol=0)
    assert torch.equal(nash_weights(torch.outer(g, g), iters=0, normalize=False), a)


# -------------------------------------------------------------------- uniform and graddrop


def test_uniform_ref_writes_the_given_out():
    out = torch.full((7,), -1.0)
    assert uniform_ref(9, STEP, 7, out=out, offset=2) is out
    assert torch.equal(out, uniform_ref(9, STEP, 7, offset=2)) and bool((out >= 0).all())
    strided = torch.full((14,), -1.0)
    assert uniform(9, STEP, 7, out=strided[::2], offset=2).data_ptr() == strided.data_ptr()
    assert torch.equal(strided[::2], out) and bool((strided[1::2] == -1).all())


def test_graddrop_ref_defaults_and_float64_divisor():
    """divisor None is 1; a new out has J's dtype (also bf16); a float64 divisor divides a
    float64 J unrounded (3 + 1e-9 is not a float32)."""
    J, present = _case(3, 101)
    one = torch.tensor(1.0)
    default = graddrop_ref(J, present, 5, STEP, 0.25)
    assert torch.equal(default, graddrop_ref(J, present, 5, STEP, 0.25, one))
    assert graddrop_ref(J.bfloat16(), present, 5, STEP).dtype == torch.bfloat16
    J64 = J.double()
    div = torch.tensor(3 + 1e-9, dtype=torch.float64)
    got = graddrop_ref(J64, present, 5, STEP, 0.25, div)
    want = _definition(J64, present, uniform_ref(5, STEP, 101), 0.25, 3 + 1e-9)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-14, atol=0)


def test_gram_ref_uses_the_upper_triangle_once():
    """G is the upper triangle mirrored: the diagonal counted once, J J^T exactly for small
    integers (also through the dispatcher)."""
    J = torch.tensor([[1.0, 2.0, 0.0], [3.0, -1.0, 2.0]])
    want = torch.tensor([[5.0, 1.0], [1.0, 14.0]])
    for G, finite in (gram_ref(J), gram(J)):
        assert torch.equal(G, want) and bool(finite)
    assert ant_kernels.gram_ref(J.double())[0].dtype == torch.float64
    # a float32 CPU product of random rows is not symmetric bit for bit; G must be
    R = torch.randn(5, 4099, generator=torch.Generator().manual_seed(6))
    G, _ = gram_ref(R)
    assert torch.equal(G, G.T)
    torch.testing.assert_close(G.double(), R.double() @ R.double().T, rtol=0, atol=1e-3)


@pytest.mark.interpret
def test_nash_kernel_ends_the_damping_where_the_reference_does(kernel_device, force_triton):
    """An opposed k = 5 Gram first passes the tolerance after 17 steps, and after 16 if the
    damping stopped at lambda < 1/2 instead of 1/4 (the opposed k = 8 Gram of the kernel tests
    needs 28 steps either way): the kernel is NaN at 16 steps and the reference's weights at 17."""
    G = _opposed(5, 0.05)
    for iters, finite in ((16, False), (17, True)):
        want = nash_weights_ref(G, iters=iters)
        assert bool(torch.isfinite(want).all()) is finite
        got = nash_weights(G.to(kernel_device), iters=iters).cpu()
        torch.testing.assert_close(got, want, rtol=1e-10, atol=0, equal_nan=True)


@pytest.mark.parametrize("chunk", [0, -4, 2.5, True])
def test_graddrop_ref_refuses_a_chunk_that_is_no_positive_int(chunk):
    """A negative chunk ran no pass: ``out`` came back unwritten (uninitialised when new)."""
    J, present = torch.randn(3, 10), torch.ones(3, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"chunk must be a positive int \(columns per pass\)"):
        graddrop_ref(J, present, 0, STEP, chunk=chunk)

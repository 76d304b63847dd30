"""pcgrad_weights: Gram-space PCGrad == explicit P-space projection in float64."""

from __future__ import annotations

import pytest
import torch

from ant_kernels import backend_reasons, pcgrad_weights, pcgrad_weights_ref

KINDS = ("random", "conflicts", "zero-row")
CASES = [(k, kind) for k in (1, 2, 3, 5, 8, 16) for kind in KINDS] + [(32, "conflicts")]


def _make_J(k: int, kind: str, P: int = 97) -> torch.Tensor:
    """[k, P] float64 cluster gradients of the requested flavour."""
    J = torch.randn(k, P, dtype=torch.float64)
    if kind == "conflicts":
        # shared direction with random signs: about half of all pairs conflict strongly
        sign = torch.where(torch.rand(k) < 0.5, -1.0, 1.0).double()
        J = sign[:, None] * torch.randn(P, dtype=torch.float64) + 0.3 * J
    if kind == "zero-row":
        J[k // 2] = 0.0  # an empty cluster: G[j, j] == 0, never projected against
    return J * torch.exp(torch.randn(k, 1, dtype=torch.float64))


def _orders(k: int) -> torch.Tensor:
    return torch.stack([torch.randperm(k) for _ in range(k)])


def _project(J: torch.Tensor, i: int, order: list[int]) -> torch.Tensor:
    """g_i projected against the clusters in ``order``, P-space, float64."""
    g = J[i].clone()
    for j in order:
        d, n2 = g @ J[j], J[j] @ J[j]
        if d < 0 and n2 != 0:
            g = g - (d / n2) * J[j]
    return g


def _pspace(J: torch.Tensor, orders: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """PCGrad done the expensive way: project P-length vectors, float64."""
    projected = [_project(J, i, orders[i].tolist()) for i in range(J.shape[0])]
    return torch.stack(projected).sum(0), projected


@pytest.mark.interpret
@pytest.mark.parametrize("k,kind", CASES, ids=[f"k{k}-{kind}" for k, kind in CASES])
def test_pcgrad_gram_space_equals_p_space(k, kind, kernel_device, force_triton):
    J = _make_J(k, kind)
    orders = _orders(k)
    expected, _ = _pspace(J, orders)
    G = J @ J.T
    w = pcgrad_weights(G.to(kernel_device), orders.to(kernel_device)).cpu()
    assert w.dtype == torch.float64 and w.shape == (k,)
    scale = J.abs().sum(0).max().item() * w.abs().max().item()
    torch.testing.assert_close(w @ J, expected, rtol=0, atol=1e-10 * scale)
    torch.testing.assert_close(w, pcgrad_weights_ref(G, orders), rtol=1e-12, atol=1e-12)
    # float32 G: the kernel and the float32 reference agree to float32 accuracy
    w32 = pcgrad_weights(G.float().to(kernel_device), orders.to(kernel_device)).cpu()
    assert w32.dtype == torch.float32
    w32_ref = pcgrad_weights_ref(G.float(), orders)
    torch.testing.assert_close(w32, w32_ref, rtol=1e-4, atol=1e-4 * w32_ref.abs().max().item())


@pytest.mark.interpret
@pytest.mark.parametrize("odt", [torch.int64, torch.int32])
def test_pcgrad_kernel_skips_order_entries_outside_range_k(odt, kernel_device):
    """As documented, the kernel skips an order entry outside range(k). An int64 2**32 + 1 was
    cast to int32 before the range test and projected onto cluster 1."""
    from ant_kernels.pcgrad import pcgrad_triton

    if backend_reasons("pcgrad", torch.zeros(1, device=kernel_device), k=4):
        pytest.skip("no GPU here")  # only the interpreter runs the kernel on a CPU
    J = _make_J(4, "conflicts")
    J[1] = -J[0] + 0.1 * J[1]  # 0 and 1 conflict: a wrapped index 1 projects g_0 on g_1
    wide = [2**32 + 1, -1, -(2**31), 7] if odt == torch.int64 else [2**31 - 1, -1, -(2**31), 7]
    # row i: i, an entry outside range(4), then the clusters but 1 and i, padded with 7s
    bad = torch.tensor([
        ([i, v] + [j for j in (0, 2, 3) if j != i] + [7, 7])[:4] for i, v in enumerate(wide)
    ])  # fmt: skip
    expected = sum(
        _project(J, i, [j for j in row if 0 <= j < 4]) for i, row in enumerate(bad.tolist())
    )
    w = pcgrad_triton((J @ J.T).to(kernel_device), bad.to(odt).to(kernel_device)).cpu()
    torch.testing.assert_close(w @ J, expected, rtol=0, atol=1e-10 * J.abs().max().item() * 8)


@pytest.mark.interpret
def test_pcgrad_many_conflicts_are_projected(kernel_device, force_triton):
    # g_2 = -g_1 + small: every cross pair conflicts; the answer must differ from plain sum
    J = _make_J(4, "conflicts", P=50)
    J[1] = -J[0] + 0.01 * torch.randn(50, dtype=torch.float64)
    orders = _orders(4)
    w = pcgrad_weights((J @ J.T).to(kernel_device), orders.to(kernel_device)).cpu()
    assert not torch.allclose(w, torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(w @ J, _pspace(J, orders)[0], rtol=0, atol=1e-9)


@pytest.mark.interpret
@pytest.mark.parametrize("trial", range(6))
def test_pcgrad_k2_leaves_no_conflict(trial, kernel_device, force_triton):
    J = _make_J(2, "conflicts")
    orders = _orders(2)
    G = J @ J.T
    _, projected = _pspace(J, orders)
    for i in range(2):
        for j in range(2):
            # g_i' . g_j >= 0 for every pair: self-projection never triggers (Cauchy-Schwarz)
            assert projected[i] @ J[j] >= -1e-9 * G.abs().max()
    w = pcgrad_weights(G.to(kernel_device), orders.to(kernel_device)).cpu()
    torch.testing.assert_close(w @ J, projected[0] + projected[1], rtol=0, atol=1e-9)


@pytest.mark.interpret
@pytest.mark.parametrize("backend", ["triton", "torch", "native"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_pcgrad_nonfinite_gram_gives_nan(backend, bad, solver_on):
    """A NaN dot product fails ``d < 0``: weights of a non-finite G were finite ([1, 1, 1.8])
    in every implementation; they are NaN now, as Nash-MTL's."""
    solve, dev = solver_on(backend, "pcgrad")
    J = _make_J(3, "conflicts")
    G = J @ J.T
    for i, j in ((0, 1), (2, 2)):
        Gb = G.clone()
        Gb[i, j] = bad
        assert solve(Gb.to(dev), _orders(3).to(dev)).isnan().all()
    assert torch.isfinite(solve(G.to(dev), _orders(3).to(dev))).all()


def test_pcgrad_closed_form_k2():
    # g1 = (1, 0), g2 = (-1, 1): g1' = g1 - (-1/2) g2 = (1/2, 1/2); g2' = g2 - (-1) g1 = (0, 1)
    J = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    orders = torch.tensor([[1, 0], [0, 1]])
    w = pcgrad_weights(J @ J.T, orders)
    torch.testing.assert_close(w @ J, torch.tensor([0.5, 1.5], dtype=torch.float64))
    torch.testing.assert_close(w, torch.tensor([2.0, 1.5], dtype=torch.float64))


def test_pcgrad_no_conflict_is_plain_sum():
    J = torch.rand(5, 40, dtype=torch.float64)  # all entries >= 0: no pair conflicts
    w = pcgrad_weights(J @ J.T, _orders(5))
    torch.testing.assert_close(w, torch.ones(5, dtype=torch.float64), rtol=0, atol=0)


@pytest.mark.parametrize(
    "G,orders,match",
    [
        (torch.eye(3), torch.zeros(3, 2, dtype=torch.int64), "orders must"),
        (torch.eye(3), torch.zeros(3, 3), "orders must be an int64 or int32 tensor"),
        (torch.ones(3, 2), torch.zeros(3, 3, dtype=torch.int64), "G must"),
    ],
    ids=["orders-shape", "orders-float", "G-shape"],
)
def test_pcgrad_bad_input(G, orders, match):
    with pytest.raises(ValueError, match=match):
        pcgrad_weights(G, orders)


def test_pcgrad_dispatch_reasons(monkeypatch):
    monkeypatch.setenv("ANT_KERNELS_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    G, orders = torch.eye(65), _orders(65)
    reasons = backend_reasons("pcgrad", G, orders, k=65)
    assert any("k=65" in r for r in reasons) and any("TRITON_INTERPRET" in r for r in reasons)
    with pytest.raises(RuntimeError, match="k=65"):
        pcgrad_weights(G, orders)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # not even the interpreter reads meta tensors
    meta = backend_reasons("pcgrad", G.to("meta"), orders.to("meta"), k=5)
    assert meta == ["tensors on meta: Triton runs CUDA tensors (or CPU ones under "
                    "TRITON_INTERPRET=1)"]  # fmt: skip


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU here")
def test_pcgrad_cuda_no_host_sync(force_triton):
    J = _make_J(5, "conflicts")
    orders = _orders(5)
    G, o = (J @ J.T).cuda(), orders.cuda()
    pcgrad_weights(G, o)  # compile outside the sync check
    torch.cuda.set_sync_debug_mode("error")
    try:
        w = pcgrad_weights(G, o)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(w.cpu() @ J, _pspace(J, orders)[0], rtol=0, atol=1e-9)


def _pairs(k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """G [k, k] float32 of k / 2 independent conflicting pairs (2i, 2i + 1) with integer entries
    below 2**21, and orders that project each row against itself, then its partner, then the
    rest: the only projection of row i is the partner p's, with d = G[i, p] exact, so
    w[i] = 1 - G[p, i] / G[i, i] depends on nothing but the rounding of that one division."""
    g = torch.Generator().manual_seed(seed)
    diag = torch.randint(1, 2**21, (k,), generator=g).float()
    off = -torch.randint(1, 2**21, (k // 2,), generator=g).float()
    G = torch.diag(diag)
    G[0::2, 1::2] = G[1::2, 0::2] = torch.diag(off)
    rest = torch.arange(k)
    orders = torch.stack(
        [torch.cat([torch.tensor([i, i ^ 1]), rest[(rest != i) & (rest != (i ^ 1))]]) for i in rest]
    )
    return G, orders


@pytest.mark.interpret
@pytest.mark.parametrize("seed", range(4))
def test_pcgrad_float32_division_is_correctly_rounded(seed, kernel_device, force_triton):
    """fp32 weights bit for bit: a correctly rounded quotient (float64 then float32 rounds the
    same, 53 >= 2 * 24 + 2) and one float32 subtraction. The GPU's default fp32 division
    (div.full.f32) is off by up to 2 ulps."""
    G, orders = _pairs(64, seed)
    idx = torch.arange(64)
    partner = idx ^ 1
    coef = (G[partner, idx].double() / G.diagonal().double()).float()
    expected = 1.0 - coef  # float32
    w = pcgrad_weights(G.to(kernel_device), orders.to(kernel_device)).cpu()
    assert w.dtype == torch.float32
    assert torch.equal(w.view(torch.int32), expected.view(torch.int32))
    assert torch.equal(pcgrad_weights_ref(G, orders), expected)


_PTX_DIVS = """
import os, re
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from ant_kernels import aot
for name, fn, args, meta in aot._launches():
    if name in ("pcgrad k=5 fp32", "pcgrad k=64 fp32", "pcgrad k=5 fp64"):
        options = {key: v for key, v in meta.items() if key in aot._OPTIONS}
        ptx = triton.compile(aot._source(fn, args, meta), target=GPUTarget("cuda", 90, 32),
                             options=options).asm["ptx"]
        print(name, "|", " ".join(sorted(set(re.findall(r"\\bdiv\\.[a-z0-9.]+", ptx)))))
"""


def test_pcgrad_sm90_divisions_are_ieee():
    """Built for sm_90 (no GPU needed): only correctly rounded divisions in the PTX, fp32 and
    fp64 (``/`` alone gives div.full.f32, which the interpreter cannot show)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(root), str(root / "python")])
    run = subprocess.run([sys.executable, "-c", _PTX_DIVS], capture_output=True, text=True,
                         env=env, cwd=root, timeout=300, check=False)  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]
    divs = dict(line.split(" | ") for line in run.stdout.strip().splitlines())
    assert divs == {"pcgrad k=5 fp32": "div.rn.f32", "pcgrad k=64 fp32": "div.rn.f32",
                    "pcgrad k=5 fp64": "div.rn.f64"}, divs  # fmt: skip

"""uniform: the counter-based stream (Philox4x32-10) is bit-identical in the Triton kernel, the
torch reference and the C++ path, matches the generator's published known answers, and looks
uniform and independent across steps and seeds."""

from __future__ import annotations

import math

import pytest
import torch

from ant_kernels import backend_reasons, uniform, uniform_ref
from ant_kernels.reference import philox_ref
from antdiff.mtl import native

# Philox4x32-10 known-answer vectors (Random123's kat_vectors): counter, key -> output words
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]
# 1 compiles as a constant in Triton, < 2**31 as i32, then i64, then u64
SEEDS = (0, 1, 3, 2**31, 2**40 + 3, 2**64 - 1)
STEPS = (0, 5, 2**32 + 1, 2**63 - 1)
PAIRS = [(s, t) for s in SEEDS for t in STEPS]
NS = (1, 7, 4099, 65539)


def _step(v: int, device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.tensor([v], dtype=torch.int64, device=device)


@pytest.mark.parametrize("counter,key,words", KAT, ids=["zeros", "ones", "pi"])
def test_known_answers(counter, key, words):
    seed = key[0] | key[1] << 32
    got = philox_ref(torch.tensor([counter], dtype=torch.int64), seed)[0].tolist()
    assert got == list(words)
    assert native._C.philox4x32(list(counter), list(key)) == list(words)


def test_values_are_the_top_24_bits_of_the_words():
    # counter (m // 4, 0, step, 0) under key (seed, 0): step 0, seed 0 is the first KAT vector
    u = uniform_ref(0, _step(0), 4)
    assert (u * 2**24).long().tolist() == [w >> 8 for w in KAT[0][2]]
    step = 0x03707344_13198A2E
    c = torch.tensor([[5, 0, step & 0xFFFFFFFF, step >> 32]], dtype=torch.int64)
    words = philox_ref(c, 2**33 + 7)[0]
    u = uniform_ref(2**33 + 7, _step(step), 24)[20:]
    assert torch.equal((u * 2**24).long(), words >> 8)


@pytest.mark.interpret
@pytest.mark.parametrize("n", NS, ids=lambda n: f"n{n}")
def test_triton_equals_reference(n, kernel_device, force_triton):
    for seed, step in PAIRS:
        ref = uniform_ref(seed, _step(step), n)
        got = uniform(seed, _step(step, kernel_device), n)
        assert got.dtype == torch.float32 and got.device.type == kernel_device.type
        assert torch.equal(got.cpu(), ref), (seed, step)
    # a strided out, and small blocks (several programs, a partial last one)
    from ant_kernels.uniform import uniform_triton

    out = torch.zeros(2 * n, device=kernel_device)[::2]
    assert uniform(7, _step(9, kernel_device), n, out=out) is out
    assert torch.equal(out.cpu(), uniform_ref(7, _step(9), n))
    bc = 4 if n < 100 else 1024  # several programs; the interpreter's cost is per program
    small = uniform_triton(7, _step(9, kernel_device), n, torch.empty(n, device=kernel_device), bc)
    assert torch.equal(small.cpu(), uniform_ref(7, _step(9), n))
    for offset in (1, 6, 2**33 + 3):  # a range of the stream on its own
        got = uniform(7, _step(9, kernel_device), n, offset=offset)
        assert torch.equal(got.cpu(), uniform_ref(7, _step(9), n, offset=offset)), offset


@pytest.mark.parametrize("n", (0, *NS), ids=lambda n: f"n{n}")
def test_cpp_equals_reference(n, monkeypatch):
    assert native._C is not None, "antdiff._C is not built: run `make build`"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("ANT_KERNELS_BACKEND", "auto")
    called = []
    real = native._C._philox_uniform_at
    monkeypatch.setattr(native._C, "_philox_uniform_at", lambda *a: called.append(1) or real(*a),
                        raising=False)  # fmt: skip
    for seed, step in PAIRS:
        assert torch.equal(native.uniform(seed, _step(step), n), uniform_ref(seed, _step(step), n))
        # past 2**34 the block index needs the counter's second word
        for offset in (1, 6, 2**33 + 3, 2**34 + 1, 2**40 + 6):
            got = native.uniform(seed, _step(step), n, offset=offset)
            assert torch.equal(got, uniform_ref(seed, _step(step), n, offset=offset))
    assert called, "the C++ path did not serve a CPU counter"
    # a 0-d counter and a view into a larger tensor read the same value
    steps = torch.tensor([1, 2**33 + 5, 3])
    assert torch.equal(native.uniform(5, steps[1:2], n), uniform_ref(5, _step(2**33 + 5), n))


def test_offset_draws_a_range_of_the_stream():
    whole = uniform_ref(3, _step(2), 40)
    for offset in range(9):
        for n in (0, 1, 3, 4, 5, 40 - offset):
            assert torch.equal(uniform_ref(3, _step(2), n, offset=offset), whole[offset:][:n])
    far = uniform_ref(3, _step(2), 5, offset=2**34 + 1)
    c = torch.tensor([[0, 1, 2, 0], [1, 1, 2, 0]], dtype=torch.int64)  # blocks 2**32, 2**32 + 1
    words = philox_ref(c, 3).reshape(-1)[1:6]
    assert torch.equal((far * 2**24).long(), words >> 8)


def test_looks_uniform_and_independent():
    n = 1 << 16
    u = uniform_ref(11, _step(4), n).double()
    assert 0.0 <= u.min() and u.max() < 1.0
    assert abs(u.mean() - 0.5) < 4 * math.sqrt(1 / 12 / n)
    assert abs(u.var() - 1 / 12) < 4 * math.sqrt(1 / 180 / n)
    ks = (u.sort().values - torch.arange(1, n + 1, dtype=torch.float64) / n).abs().max()
    assert ks < 1.63 / math.sqrt(n)  # Kolmogorov-Smirnov, 1% level
    # neighbouring positions, steps and seeds are uncorrelated
    for other in (u.roll(1), uniform_ref(11, _step(5), n).double(),
                  uniform_ref(12, _step(4), n).double()):  # fmt: skip
        r = torch.corrcoef(torch.stack([u, other]))[0, 1]
        assert abs(r) < 4 / math.sqrt(n)
    # the 4 words of one counter are as independent as the counters
    words = u.view(-1, 4)
    r = torch.corrcoef(words.T)
    assert (r - torch.eye(4, dtype=torch.float64)).abs().max() < 4 / math.sqrt(n / 4)


def test_bad_input():
    with pytest.raises(ValueError, match="seed must be an int in"):
        uniform(-1, _step(0), 3)
    with pytest.raises(ValueError, match="seed must be an int in"):
        uniform(2**64, _step(0), 3)
    with pytest.raises(ValueError, match="seed must be an int in"):
        uniform(True, _step(0), 3)
    with pytest.raises(ValueError, match="one-element int64 tensor"):
        uniform(1, torch.tensor([0, 1]), 3)
    with pytest.raises(ValueError, match="one-element int64 tensor"):
        uniform(1, torch.tensor([0.0]), 3)
    with pytest.raises(ValueError, match="n must be an int >= 0"):
        uniform(1, _step(0), -2)
    with pytest.raises(ValueError, match=r"offset must be an int in \[0, 2\*\*62\)"):
        uniform(1, _step(0), 2, offset=-1)
    with pytest.raises(ValueError, match=r"out must be a float32 \[n\]=\[3\]"):
        uniform(1, _step(0), 3, out=torch.empty(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="one-element int64 tensor"):
        native.uniform(1, torch.tensor(0.5), 3)


def test_dispatch_reasons():
    out, step = torch.empty(3), _step(0)
    assert not any("k=" in r for r in backend_reasons("uniform", out, step, k=10**6))  # no k
    reasons = backend_reasons("uniform", out.double(), step)
    assert any("dtype torch.float64" in r for r in reasons)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU here")
def test_cuda_equals_cpu_without_host_sync(force_triton):
    n = 1_000_003
    step = _step(2**33 + 2, "cuda")
    uniform(5, step, n)  # compile outside the sync check
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = uniform(5, step, n)
        step += 1
        nxt = uniform(5, step, n)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(got.cpu(), uniform_ref(5, _step(2**33 + 2), n))
    assert torch.equal(nxt.cpu(), uniform_ref(5, _step(2**33 + 3), n))


@pytest.mark.interpret
@pytest.mark.parametrize("offset", [1, 2, 3, 6, 2**33 + 3])
@pytest.mark.parametrize("n", [1, 5, 4099])
def test_triton_writes_only_its_out(offset, n, kernel_device, force_triton):
    """out = a window of a larger buffer, at an offset that is not a multiple of 4: the first
    counter covers stream positions before ``offset`` and the last ones past offset + n; neither
    may be written (only a fresh or a strided, copied-back out was tested)."""
    buf = torch.full((n + 16,), -1.0, device=kernel_device)
    out = buf[8 : 8 + n]
    assert uniform(7, _step(9, kernel_device), n, out=out, offset=offset) is out
    assert torch.equal(out.cpu(), uniform_ref(7, _step(9), n, offset=offset))
    assert bool((buf[:8] == -1).all()) and bool((buf[8 + n :] == -1).all())


@pytest.mark.interpret
@pytest.mark.parametrize(("offset", "n"), [(3, 2), (1, 4), (6, 7), (3, 5)])
@pytest.mark.parametrize("block", [1, 2])
def test_triton_launch_covers_an_unaligned_range(offset, n, block, kernel_device, force_triton):
    """The grid counts the counters [offset, offset + n) touches, (offset + n + 3) // 4 -
    offset // 4, not (n + 3) // 4: offset % 4 + n % 4 > 4 straddles one more counter; small
    blocks make it a program of its own (the small-block test used offset 0)."""
    from ant_kernels.uniform import uniform_triton

    got = uniform_triton(7, _step(9, kernel_device), n,
                         torch.full((n,), -1.0, device=kernel_device), block=block, offset=offset)
    assert torch.equal(got.cpu(), uniform_ref(7, _step(9), n, offset=offset))

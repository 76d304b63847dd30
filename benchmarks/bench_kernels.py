"""ant_kernels benchmarks: gram / combine / graddrop vs torch on CUDA, the Nash solve and
GradDrop on CPU.

On CUDA, k = 5, P in {1e6, 1e7, 1e8}, J in fp32 and bf16: ``gram`` against ``J @ J.T`` (plus
the finiteness check) and ``combine`` against ``torch.mv`` into the same buffer, side by side in
one run, and a device-to-device copy of J (the card's practical bandwidth ceiling); extra_info
holds the achieved bandwidth (bytes read + written / median time) and its fraction of the card's
datasheet peak (``ANT_PEAK_BW`` in B/s overrides the table). On CPU the reference paths run
on tiny sizes, and the Nash-MTL solve (torch reference vs the C++ solver CPU steps use) at
k = 2..16 (the cases marked ``quick``, so ``--quick`` in CI keeps this file alive).

    pytest benchmarks/bench_kernels.py --benchmark-json=raw.json
    python benchmarks/bench_kernels.py raw.json benchmarks/results/kernels_<card>
    python benchmarks/bench_kernels.py raw.json benchmarks/results/nash_cpu nash
"""

from __future__ import annotations

import os
import platform

import pytest
import torch

from ant_kernels import combine, graddrop, gram
from ant_kernels.gram import TILINGS as GRAM_TILINGS
from ant_kernels.gram import gram_triton
from ant_kernels.reference import combine_ref, graddrop_ref, gram_ref, nash_weights_ref

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU here")

# Peak DRAM bandwidth in B/s by device-name fragment (first match wins).
PEAK_BW = (
    ("H100 PCIe", 2.0e12),
    ("H100", 3.35e12),
    ("H200", 4.8e12),
    ("A100 80GB", 2.0e12),
    ("A100-SXM4-80GB", 2.0e12),
)
K = 5
REPS = 10  # calls per timed round
SIZES = [10**6, 10**7, 10**8]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _environment() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor()
    return {"kernel_device": name, "torch_runtime": torch.__version__, "triton": triton_version}


def _peak_bw(name: str) -> float | None:
    if "ANT_PEAK_BW" in os.environ:
        return float(os.environ["ANT_PEAK_BW"])
    return next((bw for key, bw in PEAK_BW if key in name), None)


def _run_cuda(benchmark, fn, nbytes: int) -> None:
    """Time rounds of REPS back-to-back calls of ``fn``, one device sync per round: the
    launches queue ahead of the device, so a round measures the device's time rather than the
    host's launch cost (which alone moved small-P figures by 50-90 us between runs). Records the
    achieved and peak-relative bandwidth per call."""

    def timed():
        for _ in range(REPS):
            fn()
        torch.cuda.synchronize()

    timed()  # compile and warm up
    benchmark.pedantic(timed, rounds=20, warmup_rounds=2, iterations=1)
    env = _environment()
    # the median round: a stray slow round (seen up to 5x a case's median on an H100) moves
    # the mean by tens of percent
    bw = nbytes * REPS / benchmark.stats.stats.median
    peak = _peak_bw(env["kernel_device"])
    benchmark.extra_info.update(env)
    benchmark.extra_info.update(
        {"bytes": nbytes, "reps": REPS, "GB/s": bw / 1e9,
         "peak_fraction": bw / peak if peak else None}
    )  # fmt: skip


@needs_gpu
@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("impl", ["ant", "torch"])
@pytest.mark.parametrize("P", SIZES, ids=[f"P{p:.0e}" for p in SIZES])
def test_gram_cuda(bench, impl, P, dt):
    J = torch.randn(K, P, device="cuda").to(DTYPES[dt])
    bench.group = f"gram-k{K}-P{P:.0e}-{dt}"
    fn = (lambda: gram(J)) if impl == "ant" else (lambda: (J @ J.T, torch.isfinite(J).all()))
    _run_cuda(bench, fn, J.numel() * J.element_size())




@needs_gpu
@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("tiling", GRAM_TILINGS, ids=["-".join(map(str, t)) for t in GRAM_TILINGS])
def test_gram_tiling_cuda(bench, tiling, dt):
    P = SIZES[-1]
    J = torch.randn(K, P, device="cuda").to(DTYPES[dt])
    bench.group = f"gram-tiling-k{K}-P{P:.0e}-{dt}"
    _run_cuda(bench, lambda: gram_triton(J, config=tiling), J.numel() * J.element_size())
    bench.extra_info.update({"tiling": list(tiling), "P": P})


# other k with the launcher's configuration: fp32 at P = 1e7, and every k <= 8 (the split
# kernel) at P = 1e8 in both dtypes
K_CASES = [(k, SIZES[1], "fp32") for k in (2, 8, 16, 32, 64)] + [
    (k, SIZES[2], dt) for k in (3, 4, 6, 7, 8) for dt in DTYPES
]


@needs_gpu
@pytest.mark.parametrize(("k", "P", "dt"), K_CASES, ids=[f"{k}-{p:.0e}-{d}" for k, p, d in K_CASES])
def test_gram_k_cuda(bench, k, P, dt):
    J = torch.randn(k, P, device="cuda").to(DTYPES[dt])
    bench.group = f"gram-k-P{P:.0e}-{dt}"
    _run_cuda(bench, lambda: gram(J), J.numel() * J.element_size())
    bench.extra_info.update({"k": k, "P": P})


@needs_gpu
@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("impl", ["ant", "torch"])
@pytest.mark.parametrize("P", SIZES, ids=[f"P{p:.0e}" for p in SIZES])
def test_combine_cuda(bench, impl, P, dt):
    """fp32 .grad out; torch's mv needs w and out in J's dtype (a bf16 out for bf16 J)."""
    J = torch.randn(K, P, device="cuda").to(DTYPES[dt])
    w = torch.randn(K, device="cuda")
    out = torch.empty(P, device="cuda", dtype=torch.float32 if impl == "ant" else J.dtype)
    bench.group = f"combine-k{K}-P{P:.0e}-{dt}"
    if impl == "ant":
        fn = lambda: combine(w, J, out)  # noqa: E731
    else:
        w = w.to(J.dtype)
        fn = lambda: torch.mv(J.T, w, out=out)  # noqa: E731
    _run_cuda(bench, fn, J.numel() * J.element_size() + out.numel() * out.element_size())


@needs_gpu
@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("impl", ["ant", "torch"])
@pytest.mark.parametrize("P", SIZES, ids=[f"P{p:.0e}" for p in SIZES])
def test_graddrop_cuda(bench, impl, P, dt):
    """GradDrop written into row 0 of J: the fused kernel against the chunked torch reference
    (about 30 operators per chunk of P / 32 columns). Bytes: J read once + out written."""
    J = torch.randn(K, P, device="cuda").to(DTYPES[dt])
    present = torch.ones(K, dtype=torch.bool, device="cuda")
    step, div = torch.zeros(1, dtype=torch.int64, device="cuda"), torch.tensor(5.0, device="cuda")
    bench.group = f"graddrop-k{K}-P{P:.0e}-{dt}"
    impl_fn = graddrop if impl == "ant" else graddrop_ref
    fn = lambda: impl_fn(J, present, 3, step, 0.0, div, out=J[0])  # noqa: E731
    _run_cuda(bench, fn, (J.numel() + P) * J.element_size())


@needs_gpu
@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("P", SIZES, ids=[f"P{p:.0e}" for p in SIZES])
def test_copy_cuda(bench, P, dt):
    """A device-to-device copy of J: the bandwidth a memory-bound kernel can reach here."""
    J = torch.randn(K, P, device="cuda").to(DTYPES[dt])
    out = torch.empty_like(J)
    bench.group = f"copy-k{K}-P{P:.0e}-{dt}"
    _run_cuda(bench, lambda: out.copy_(J), 2 * J.numel() * J.element_size())


@needs_gpu
@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("P", SIZES, ids=[f"P{p:.0e}" for p in SIZES])
def test_read_cuda(bench, P, dt):
    """torch.sum over J: the bandwidth a kernel that only reads J can reach here."""
    J = torch.randn(K, P, device="cuda").to(DTYPES[dt])
    bench.group = f"read-k{K}-P{P:.0e}-{dt}"
    _run_cuda(bench, lambda: torch.sum(J, dtype=torch.float32), J.numel() * J.element_size())


@needs_gpu
@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("op", ["gram", "combine"])
def test_odd_P_cuda(bench, op, dt):
    """P = 1e8 + 9, rows 16-element aligned as in the engine's buffer: the launchers run the
    kernel on the first P - P % 16 columns (vector loads) and again on the last 9."""
    P = SIZES[-1] + 9
    J = torch.randn(K, P + 7, device="cuda").to(DTYPES[dt])[:, :P]
    bench.group = f"odd-P-{dt}"
    nbytes = J.numel() * J.element_size()
    if op == "gram":
        fn = lambda: gram(J)  # noqa: E731
    else:
        w = torch.randn(K, device="cuda")
        out = torch.empty(P, device="cuda")
        fn = lambda: combine(w, J, out)  # noqa: E731
        nbytes += out.numel() * 4
    _run_cuda(bench, fn, nbytes)
    bench.extra_info.update({"P": P})


def _gram_with_cosine(k: int, cosine: float | None) -> torch.Tensor:
    """Random float64 Gram; with ``cosine``, every pair of rows has that cosine similarity."""
    g = torch.Generator().manual_seed(k)
    if cosine is None:
        J = torch.randn(k, 64, dtype=torch.float64, generator=g)
        return J @ J.T
    norms = torch.rand(k, dtype=torch.float64, generator=g) + 0.5
    C = torch.full((k, k), cosine, dtype=torch.float64).fill_diagonal_(1.0)
    return C * norms[:, None] * norms[None, :]


@pytest.mark.quick
@pytest.mark.parametrize("cosine", [None, 0.999], ids=["random", "cos0.999"])
@pytest.mark.parametrize("k", [2, 5, 8, 16])
@pytest.mark.parametrize("impl", ["ref", "native"])
def test_nash_cpu(bench, impl, k, cosine):
    """Nash-MTL solve time and exactness, also for nearly parallel clusters (cosine 0.999):
    the torch reference and the C++ solver a CPU training step uses (antdiff.mtl.native)."""
    from antdiff.mtl import native

    if impl == "native":
        assert native._C is not None, "antdiff._C is not built: make build"
        fn = native.nash_weights
    else:
        fn = nash_weights_ref
    G = _gram_with_cosine(k, cosine)
    if impl == "native" and not native.serves("nash", G):
        pytest.fail("the C++ solver does not serve this G (TRITON_INTERPRET=1 or a forced "
                    "ANT_KERNELS_BACKEND?): unset them to time it")  # fmt: skip
    bench.group = "nash-cpu"
    a = bench(fn, G)
    Gn = G / torch.linalg.matrix_norm(G)
    residual = float((a * (Gn @ a) - 1).abs().max())
    assert residual < 1e-10
    bench.extra_info.update(
        {"impl": impl, "k": k, "cosine": cosine, "ms_per_solve": bench.stats.stats.median * 1e3,
         "residual": residual}
    )


@needs_gpu
@pytest.mark.parametrize("cosine", [None, 0.999], ids=["random", "cos0.999"])
@pytest.mark.parametrize("k", [2, 5, 8, 16, 32])
def test_nash_cuda(bench, k, cosine):
    """The Triton Nash-MTL kernel a GPU training step runs: device time per solve (rounds of
    REPS back-to-back launches, one sync per round) and the host's cost of one launch (the call
    alone, the device idle), with the residual of its float64 solution."""
    import time

    from ant_kernels.nash import nash_triton

    G = _gram_with_cosine(k, cosine).cuda()
    fn = lambda: nash_triton(G)  # noqa: E731

    def timed():
        for _ in range(REPS):
            fn()
        torch.cuda.synchronize()

    timed()  # compile and warm up
    host = []
    for _ in range(50):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        host.append(time.perf_counter() - t0)
    bench.group = "nash-cuda"
    bench.pedantic(timed, rounds=20, warmup_rounds=2, iterations=1)
    a = fn().cpu()
    Gn = G.cpu() / torch.linalg.matrix_norm(G.cpu())
    residual = float((a * (Gn @ a) - 1).abs().max())
    assert residual < 1e-10
    bench.extra_info.update(_environment())
    bench.extra_info.update(
        {"impl": "triton", "k": k, "cosine": cosine, "reps": REPS, "residual": residual,
         "ms_per_solve": bench.stats.stats.median / REPS * 1e3,
         "launch_us": sorted(host)[len(host) // 2] * 1e6}
    )  # fmt: skip


@pytest.mark.quick
@pytest.mark.parametrize("impl", ["ref", "native"])
def test_graddrop_cpu(bench, impl):
    """GradDrop on the benchmark UNet's P (k = 5) on the CPU: the chunked torch reference and
    the C++ pass a CPU training step uses (antdiff.mtl.native), written into row 0 of J."""
    from antdiff.mtl import native

    P = 755009
    J = torch.randn(K, P)
    present = torch.ones(K, dtype=torch.bool)
    step, div = torch.zeros(1, dtype=torch.int64), torch.tensor(5.0)
    if impl == "native":
        assert native._C is not None, "antdiff._C is not built: make build"
        if native.backend_reasons("graddrop", J) == []:
            pytest.fail("Triton serves CPU tensors here (TRITON_INTERPRET=1?): unset it to time "
                        "the C++ pass")  # fmt: skip
        fn = native.graddrop
    else:
        fn = graddrop_ref
    bench.group = "graddrop-cpu"
    bench(fn, J, present, 3, step, 0.0, div, J[0])
    bench.extra_info.update({"impl": impl, "k": K, "P": P,
                             "ms": bench.stats.stats.median * 1e3})  # fmt: skip


@pytest.mark.quick
@pytest.mark.parametrize("op", ["gram_ref", "combine_ref"])
def test_reference_cpu_tiny(bench, op):
    J = torch.randn(K, 10**5)
    w = torch.randn(K)
    out = torch.empty(10**5)
    bench.group = "reference-cpu"
    fn = (lambda: gram_ref(J)) if op == "gram_ref" else (lambda: combine_ref(w, J, out))
    bench(fn)
    bench.extra_info["GB/s"] = J.numel() * 4 / bench.stats.stats.median / 1e9


@pytest.mark.quick
def test_summarize_reads_the_median_round_and_the_pair(tmp_path):
    """One stray slow round must not move the table, and the pair is both ops' bytes over both
    times (synthetic rounds, no GPU)."""
    import json

    def case(name, params, nbytes, median, mean):
        info = {"bytes": nbytes, "reps": 1, "GB/s": nbytes / mean / 1e9, "peak_fraction":
                nbytes / mean / 4e12, "kernel_device": "card", "torch_runtime": "t", "triton": "x"}
        return {"name": name, "params": params, "extra_info": info,
                "stats": {"median": median, "mean": mean}}  # fmt: skip

    P = 10**8
    raw = {"machine_info": {}, "benchmarks": [
        case("test_gram_cuda[a]", {"impl": "ant", "P": P, "dt": "fp32"}, 2e9, 1e-3, 3e-3),
        case("test_combine_cuda[a]", {"impl": "ant", "P": P, "dt": "fp32"}, 2.4e9, 1e-3, 1e-3),
        case("test_copy_cuda[a]", {"P": P, "dt": "fp32"}, 4e9, 1e-3, 1e-3),
    ]}  # fmt: skip
    (tmp_path / "raw.json").write_text(json.dumps(raw))
    out = summarize(str(tmp_path / "raw.json"), str(tmp_path / "s"))
    gram_row = out["rows"][0]
    assert gram_row["GB/s"] == pytest.approx(2000)  # 2e9 B / 1 ms, not / the 3 ms mean
    assert gram_row["peak_fraction"] == pytest.approx(0.5)  # the run's own peak, 4e12 B/s
    assert gram_row["copy_fraction"] == pytest.approx(0.5)
    (pair,) = out["pair"]
    assert pair["GB/s"] == pytest.approx(4.4e9 / 2e-3 / 1e9)
    assert pair["peak_fraction"] == pytest.approx(0.55)
    assert "- P = 1e+08, fp32: 2200 GB/s, 55% of peak" in (tmp_path / "s.md").read_text()


@pytest.mark.quick
def test_summarize_nash_gives_time_per_solve(tmp_path):
    """A CUDA case's rounds hold REPS solves each: the table divides by them and names the card
    and the launch cost; a CPU case's round is one solve (synthetic rounds, no GPU)."""
    import json

    def case(name, info, median):
        return {"name": name, "extra_info": {"cosine": None, "residual": 1e-15, **info},
                "stats": {"median": median, "min": median / 2}}  # fmt: skip

    cuda = {"impl": "triton", "k": 5, "reps": 10, "launch_us": 12.3, "kernel_device": "card X",
            "torch_runtime": "t", "triton": "x"}  # fmt: skip
    raw = {"machine_info": {"antdiff": {"git_sha": "abc"}}, "benchmarks": [
        case("test_nash_cuda[5-random]", cuda, 2e-3)]}  # fmt: skip
    (tmp_path / "raw.json").write_text(json.dumps(raw))
    out = summarize_nash(str(tmp_path / "raw.json"), str(tmp_path / "s"))
    assert out["rows"][0]["median_ms"] == pytest.approx(0.2)
    md = (tmp_path / "s.md").read_text()
    assert "card X" in md and "| triton | 5 | random | 0.200 | 0.100 | 12 |" in md
    raw["benchmarks"] = [case("test_nash_cpu[native-5-random]", {"impl": "native", "k": 5}, 2e-3)]
    (tmp_path / "raw.json").write_text(json.dumps(raw))
    assert summarize_nash(str(tmp_path / "raw.json"), str(tmp_path / "s"))["rows"][0][
        "median_ms"] == pytest.approx(2.0)  # fmt: skip
    assert "| native | 5 | random | 2.000 | 1.000 | - |" in (tmp_path / "s.md").read_text()


def summarize(raw_json: str, out_stem: str) -> dict:
    """Reduce a --benchmark-json run of the CUDA cases to <out_stem>.json and <out_stem>.md."""
    import json
    from pathlib import Path

    raw = json.loads(Path(raw_json).read_text())
    rows = []
    for b in raw["benchmarks"]:
        info = b["extra_info"]
        if "GB/s" not in info or "peak_fraction" not in info:
            continue  # CPU cases
        op = b["name"].split("[")[0].removeprefix("test_").removesuffix("_cuda")
        params = b["params"]
        if op == "gram_tiling":
            op, params = "gram " + "-".join(map(str, info["tiling"])), {**params, "impl": "ant"}
        elif op == "gram_k":
            op, params = f"gram k={params['k']}", {**params, "impl": "ant"}
        elif op == "odd_P":
            op, params = f"{params['op']} P odd", {**params, "impl": "ant"}
        P = params.get("P", info.get("P"))
        reps = info.get("reps", 1)  # calls per round (1 in runs before back-to-back rounds)
        # bandwidth from the median round (runs before recorded it from the mean)
        bw = info["bytes"] * reps / b["stats"]["median"]
        peak = info["GB/s"] * 1e9 / info["peak_fraction"] if info["peak_fraction"] else None
        rows.append({"op": op, "impl": params.get("impl", "torch"), "P": P, "k": params.get("k", K),
                     "dtype": params.get("dt", "fp32"), "mean_ms": b["stats"]["mean"] * 1e3 / reps,
                     "median_ms": b["stats"]["median"] * 1e3 / reps, "reps": reps,
                     "GB/s": bw / 1e9, "peak_fraction": bw / peak if peak else None,
                     "device": info["kernel_device"], "torch": info["torch_runtime"],
                     "triton": info["triton"]})  # fmt: skip
    copy = {(r["P"], r["dtype"]): r["GB/s"] for r in rows if r["op"] == "copy"}
    for r in rows:
        c = copy.get((r["P"], r["dtype"]))
        r["copy_fraction"] = r["GB/s"] / c if c else None
    device = rows[0]["device"] if rows else "no CUDA case in this run"
    summary = {"device": device, "git_sha": raw["machine_info"].get("antdiff", {}).get("git_sha"),
               "target": "ant gram + combine >= 0.8 of the card's bandwidth at P >= 1e8",
               "rows": rows, "pair": _pairs(rows)}  # fmt: skip
    Path(out_stem + ".json").write_text(json.dumps(summary, indent=1) + "\n")
    versions = f"torch {rows[0]['torch']}, triton {rows[0]['triton']}; " if rows else ""
    reps = "/".join(str(n) for n in sorted({r["reps"] for r in rows})) or "-"
    lines = [
        "# ant_kernels on the GPU: gram, combine and graddrop vs torch", "",
        f"{device}; {versions}git {summary['git_sha']}. k = {K}; bandwidth = bytes read + "
        f"written / median time per call over 20 rounds of {reps} back-to-back call(s), one "
        "device sync per round (the mean, beside it, shows stray slow rounds); 'of peak' against "
        "the datasheet "
        "bandwidth, 'of copy' against a device-to-device copy of J of the same size and dtype "
        "measured in the same run. combine writes fp32 (ours) or J's dtype (torch.mv); graddrop "
        "writes J's first row (ours: the fused kernel; torch: the chunked reference) and counts "
        "J read once + that row written.", "",
        "| op | impl | k | J dtype | P | median ms | mean ms | GB/s | of peak | of copy |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in rows:
        frac = "-" if r["peak_fraction"] is None else f"{r['peak_fraction']:.0%}"
        of_copy = "-" if r["copy_fraction"] is None else f"{r['copy_fraction']:.0%}"
        lines.append(f"| {r['op']} | {r['impl']} | {r['k']} | {r['dtype']} | {r['P']:.0e} | "
                     f"{r['median_ms']:.3f} | {r['mean_ms']:.3f} | {r['GB/s']:.0f} | {frac} | "
                     f"{of_copy} |")  # fmt: skip
    if summary["pair"]:
        lines += ["", "The engine's pair, gram then combine on the same J (both rows' bytes over "
                  "both median times):", ""]  # fmt: skip
        for r in summary["pair"]:
            frac = "" if r["peak_fraction"] is None else f", {r['peak_fraction']:.0%} of peak"
            lines.append(f"- P = {r['P']:.0e}, {r['dtype']}: {r['GB/s']:.0f} GB/s{frac}")
    Path(out_stem + ".md").write_text("\n".join(lines) + "\n")
    return summary


def _pairs(rows: list[dict]) -> list[dict]:
    """gram + combine (ours, k = K) at each P and dtype measured: the bytes of both over the
    sum of their median times, the figure the bandwidth target is about."""
    out = []
    by = {(r["op"], r["impl"], r["k"], r["P"], r["dtype"]): r for r in rows}
    for (op, impl, k, P, dt), g in by.items():
        c = by.get(("combine", "ant", k, P, dt))
        if op != "gram" or impl != "ant" or k != K or c is None:
            continue
        nbytes = (g["GB/s"] * g["median_ms"] + c["GB/s"] * c["median_ms"]) * 1e6
        bw = nbytes / ((g["median_ms"] + c["median_ms"]) * 1e-3)
        peak = g["GB/s"] * 1e9 / g["peak_fraction"] if g["peak_fraction"] else None
        out.append({"P": P, "dtype": dt, "GB/s": bw / 1e9,
                    "peak_fraction": bw / peak if peak else None})  # fmt: skip
    return out


def summarize_nash(raw_json: str, out_stem: str) -> dict:
    """Reduce a --benchmark-json run of test_nash_cpu to <out_stem>.json and <out_stem>.md."""
    import json
    from pathlib import Path

    raw = json.loads(Path(raw_json).read_text())
    rows = [
        {"impl": b["extra_info"]["impl"], "k": b["extra_info"]["k"],
         "cosine": b["extra_info"]["cosine"],
         "median_ms": b["stats"]["median"] * 1e3 / b["extra_info"].get("reps", 1),
         "min_ms": b["stats"]["min"] * 1e3 / b["extra_info"].get("reps", 1),
         "launch_us": b["extra_info"].get("launch_us"), "residual": b["extra_info"]["residual"]}
        for b in raw["benchmarks"] if b["name"].startswith("test_nash_")
    ]  # fmt: skip
    cuda = [b["extra_info"] for b in raw["benchmarks"] if b["name"].startswith("test_nash_cuda")]
    machine = raw["machine_info"].get("antdiff", {})
    if cuda:
        where = (f"{cuda[0]['kernel_device']}; torch {cuda[0]['torch_runtime']}, triton "
                 f"{cuda[0]['triton']}; git {machine.get('git_sha')}. triton = the kernel a GPU "
                 f"training step launches (ant_kernels.nash); ms = device time per solve, the "
                 f"median of 20 rounds of {cuda[0]['reps']} back-to-back launches with one sync "
                 "per round; launch us = the host's time for one call (median of 50, device "
                 "idle).")  # fmt: skip
        what = "the Triton kernel on CUDA tensors"
    else:
        where = (f"{machine.get('device')} ({machine.get('cpu_model')}); torch "
                 f"{machine.get('torch')}; git {machine.get('git_sha')}. ref = "
                 "ant_kernels.reference.nash_weights_ref (about 800 torch operators), native = "
                 "the C++ solver a CPU training step calls.")  # fmt: skip
        what = "torch reference vs the C++ solver (antdiff.mtl.native) on CPU tensors"
    summary = {"benchmark": f"Nash-MTL solve, float64 damped Newton, 40 iterations: {what}",
               "machine": machine, "target": "< 1 ms for k <= 16, residual < 1e-10",
               "kernel_device": cuda[0]["kernel_device"] if cuda else None,
               "rows": rows}  # fmt: skip
    Path(out_stem + ".json").write_text(json.dumps(summary, indent=1) + "\n")
    lines = [
        f"# Nash-MTL solve on the {'GPU' if cuda else 'CPU'} (float64, 40 Newton iterations)",
        "", where + " Residual = max_i |a_i (G a)_i - 1| on G / ||G||_F.", "",
        "| impl | k | clusters | median ms | min ms | launch us | residual |",
        "|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in sorted(rows, key=lambda r: (r["impl"] != "native", r["k"], r["cosine"] or 0)):
        kind = "random" if r["cosine"] is None else f"cosine {r['cosine']}"
        launch = "-" if r["launch_us"] is None else f"{r['launch_us']:.0f}"
        lines.append(f"| {r['impl']} | {r['k']} | {kind} | {r['median_ms']:.3f} | "
                     f"{r['min_ms']:.3f} | {launch} | {r['residual']:.1e} |")  # fmt: skip
    Path(out_stem + ".md").write_text("\n".join(lines) + "\n")
    return summary


if __name__ == "__main__":
    import sys

    if len(sys.argv) > 3 and sys.argv[3] == "nash":
        summarize_nash(sys.argv[1], sys.argv[2])
    else:
        summarize(sys.argv[1], sys.argv[2])

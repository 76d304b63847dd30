"""One call or k calls: how the one-pass step forms each layer's k per-cluster rows, A/B.

    python benchmarks/ab_onepass_calls.py [MODEL ...] [--scenario S] [--rounds R] [--out F.md]

For each bench_step MODEL (default adm-small and dit-s2; on a GPU when there is one), times the
one-pass SCENARIO (default ours-pcgrad-onepass) under each policy of
``antdiff.engine.onepass`` (GROUPED_CONV for convolutions, BATCHED_PRODUCTS for the matrix
products of linear layers and patch convolutions), each step paired with a vanilla step run
back to back with it (order alternating, policies interleaved round by round), and reports the
median ratio, the step's peak memory above vanilla's, and the largest difference of the
combined gradient from the per-cluster policy's, relative to its largest entry (float32
without TF32, same batch and t, on a copy of the model with perturbed weights: at
initialisation ADM's zero output convolution and DiT's adaLN-zero leave every other layer's
gradient at zero, which would check one layer).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "python")]  # noqa: E501

from antdiff import ANT  # noqa: E402
from antdiff.engine import onepass  # noqa: E402
from benchmarks.bench_step import THREADS, K, Setup, _sync, count_syncs, make_step  # noqa: E402

BIG = 10**9
# name: (GROUPED_CONV limit, BATCHED_PRODUCTS limit) for the device, or None: the engine's own
# limits (as shipped, read at import); see onepass.GROUPED_CONV
DEFAULTS = dict(onepass.GROUPED_CONV), dict(onepass.BATCHED_PRODUCTS)
POLICIES: dict[str, tuple[int | None, int | None] | None] = {
    "default": None,
    "per-cluster": (None, None),
    "grouped-conv": (BIG, None),
    "one-call": (BIG, BIG),
    "one-call-2048": (2048, 2048),
}


def set_policy(device: str, name: str) -> None:
    limits = POLICIES[name] or (DEFAULTS[0].get(device), DEFAULTS[1].get(device))
    onepass.GROUPED_CONV[device], onepass.BATCHED_PRODUCTS[device] = limits


def _timed(step, device: str) -> float:
    t0 = time.perf_counter()
    step()
    _sync(torch.device(device))
    return time.perf_counter() - t0


def _peak(step, device: str) -> int | None:
    if device != "cuda":
        return None
    _sync(torch.device(device))
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    _sync(torch.device(device))
    return torch.cuda.max_memory_allocated() - base


def gradient_gaps(model_name: str, device: str) -> dict[str, float]:
    """max |grad - grad_per_cluster| / max |grad_per_cluster| of one PCGrad ant.backward, on
    the model with perturbed weights (every layer's gradient non-zero) and no label dropout."""
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        s = Setup(model_name, device)
        gen = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for p in s.model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen).to(p.device))
        if hasattr(s.model, "class_dropout_prob"):
            s.model.class_dropout_prob = 0.0
        ant = ANT("linear", k=K, clustering=s.clusters, method="pcgrad", mode="onepass")
        ant.attach(s.model).to(device)
        t = ant.sample_timesteps(s.B, device, generator=torch.Generator(device).manual_seed(3))
        grads = {}
        for name in POLICIES:
            set_policy(device, name)
            s.model.zero_grad(set_to_none=True)
            ant.backward(s.loss_fn, s.batch, t)
            grads[name] = torch.cat([p.grad.flatten() for p in s.model.parameters()]).double()
        ref = grads["per-cluster"]
        scale = ref.abs().max()
        zero = [n for n, p in s.model.named_parameters() if p.grad is None or not p.grad.any()]
        if zero:
            raise RuntimeError(f"gradient check: no gradient reached {zero[:3]}")
        return {n: float((g - ref).abs().max() / scale) for n, g in grads.items()}
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def run(model_name: str, scenario: str, rounds: int, device: str) -> list[dict]:
    v, s = Setup(model_name, device), Setup(model_name, device)
    vstep, step = make_step("vanilla", v), make_step(scenario, s)
    for name in POLICIES:  # warm-up: kernels, the allocator's cache, cuDNN's choices
        set_policy(device, name)
        for _ in range(2):
            step()
            vstep()
    ratios: dict[str, list[float]] = {n: [] for n in POLICIES}
    times: dict[str, list[float]] = {n: [] for n in POLICIES}
    for r in range(rounds):
        for name in POLICIES:
            set_policy(device, name)
            if r % 2:
                a, b = _timed(step, device), _timed(vstep, device)
            else:
                b, a = _timed(vstep, device), _timed(step, device)
            ratios[name].append(a / b)
            times[name].append(a)
    vpeak = _peak(vstep, device)
    gaps = gradient_gaps(model_name, device)
    rows = []
    for name in POLICIES:
        set_policy(device, name)
        peak = _peak(step, device)
        syncs = count_syncs(step, torch.device(device)) if device == "cuda" else None
        rows.append(dict(
            model=model_name, B=s.B, P=s.P, policy=name, ratio=statistics.median(ratios[name]),
            step_ms=1e3 * statistics.median(times[name]),
            extra_mib=None if peak is None else (peak - vpeak) / 2**20, gap=gaps[name],
            host_syncs=syncs,
        ))  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="*", default=["adm-small", "dit-s2"])
    ap.add_argument("--scenario", default="ours-pcgrad-onepass")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--out", default=None, help="also write the table to this markdown file")
    a = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(THREADS)
    saved = dict(onepass.GROUPED_CONV), dict(onepass.BATCHED_PRODUCTS)
    where = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    lines = [
        f"# One-pass rows: one call or k calls per layer ({where}, torch {torch.__version__})",
        "",
        f"{a.scenario}, k = {K}; ratio = median over {a.rounds} rounds of the step's time over "
        "a vanilla step run back to back with it; extra = the step's peak memory above "
        "vanilla's; gap = max |grad - per-cluster grad| / max |per-cluster grad| (fp32, no TF32); "
        "host syncs: synchronising calls in one step under torch.cuda.set_sync_debug_mode('warn') "
        "(CUDA only). default: the engine's own limits, "
        f"GROUPED_CONV {DEFAULTS[0].get(device)}, BATCHED_PRODUCTS {DEFAULTS[1].get(device)}.",
        "",
        "| model | B | P | policy | step ms | ratio | extra MiB | gap | host syncs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    try:
        for model_name in a.models:
            for r in run(model_name, a.scenario, a.rounds, device):
                extra = "-" if r["extra_mib"] is None else f"{r['extra_mib']:.1f}"
                syncs = "-" if r["host_syncs"] is None else r["host_syncs"]
                lines.append(
                    f"| {r['model']} | {r['B']} | {r['P']} | {r['policy']} | {r['step_ms']:.1f} "
                    f"| {r['ratio']:.2f}x | {extra} | {r['gap']:.1e} | {syncs} |"
                )
                print(lines[-1], flush=True)
    finally:
        onepass.GROUPED_CONV.update(saved[0])
        onepass.BATCHED_PRODUCTS.update(saved[1])
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        Path(a.out).write_text(text)


if __name__ == "__main__":
    main()

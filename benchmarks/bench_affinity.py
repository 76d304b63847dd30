"""The task-affinity pass vs the forward+backward passes it needs, side by side in one run.

Model: the ADM family's "adm-small" at ~3.0M parameters (model_channels=40, one 40-channel
attention head at 4x4) on the 8x8 digits (x0 in [-1, 1]), linear schedule, T = 1000, eps-MSE.
(a) baseline: for each of the nb bins, forward+backward of n samples in batches of B with
t and eps drawn beforehand (nothing else timed); (b) ``task_affinity`` with the same nb, n, B:
the same passes plus the GradBuffer rows, per-bin task draws, ``gram`` of J [nb, P] and the
cosines. Target: (b) / (a) <= 1.2. Full run: nb = 50, n = 512 (25,600 sample passes each);
--quick: nb = 10, n = 16 (a smoke test: there the fixed cost of gram on J [10, P] weighs more).

    pytest benchmarks/bench_affinity.py --benchmark-json=raw.json [--quick]
    python benchmarks/bench_affinity.py raw.json benchmarks/results/affinity_cpu
"""

from __future__ import annotations

import os

# Under a loaded machine, OpenMP threads that spin-wait at barriers slow small ops tenfold and at
# random; sleeping waits keep the timings repeatable. Read when torch first loads libgomp.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(_ROOT / "python"), str(_ROOT)]  # run as a script, too
from antdiff.analysis import task_affinity  # noqa: E402
from antdiff.diffusion import GaussianDiffusion  # noqa: E402
from antdiff.models import create_model  # noqa: E402
from antdiff.schedules import linear_schedule  # noqa: E402

MACHINE_KEYS = ("device", "cpu_model", "cpu_cores", "python", "numpy", "torch", "triton", "git_sha")
MODEL = dict(
    model_channels=40, num_head_channels=40, image_size=8, attention_resolutions=(4,)
)  # adm-small overrides: 2,998,161 parameters
TARGET = 1.2


def _digits() -> torch.Tensor:
    from sklearn.datasets import load_digits

    return torch.from_numpy(load_digits().images.astype(np.float32) / 8.0 - 1.0)[:, None]


def baseline_passes(model, diffusion, x, nb: int, n: int, batch: int, seed: int = 0) -> float:
    """Seconds for nb x (forward+backward of n samples), inputs drawn before the clock starts."""
    g = torch.Generator().manual_seed(seed)
    T = diffusion.T  # noqa: N806
    inputs = []
    for b in range(nb):
        lo, hi = b * T // nb, (b + 1) * T // nb
        idx = torch.randint(0, x.shape[0], (n,), generator=g)
        inputs.append(
            (x[idx], torch.randint(lo, hi, (n,), generator=g), torch.randn(n, *x.shape[1:]))
        )
    model.eval()
    start = time.perf_counter()
    for x0, t, eps in inputs:
        model.zero_grad(set_to_none=False)
        for s in range(0, n, batch):
            e = min(n, s + batch)
            loss = diffusion.training_losses(model, x0[s:e], t[s:e], noise=eps[s:e])["loss"]
            (loss.sum() / n).backward()
    return time.perf_counter() - start


@pytest.mark.quick
def test_affinity_pass(bench: Any, quick: bool) -> None:
    nb, n, batch = (10, 16, 16) if quick else (50, 512, 256)
    torch.manual_seed(0)
    model = create_model("adm-small", **MODEL)
    for p in model.parameters():  # the zero-initialised output conv would hide the rest
        p.data.add_(0.02 * torch.randn_like(p))
    diffusion = GaussianDiffusion(linear_schedule(1000))
    x = _digits()
    P = sum(p.numel() for p in model.parameters())  # noqa: N806
    baseline_passes(model, diffusion, x, 2, min(n, 64), batch)  # warm-up: allocator, kernels
    times: dict[str, float] = {}
    result: dict[str, Any] = {}

    def target() -> None:
        times["a"] = baseline_passes(model, diffusion, x, nb, n, batch)
        start = time.perf_counter()
        result["r"] = task_affinity(model, diffusion, x, bins=nb, n_samples=n, batch_size=batch)
        times["b"] = time.perf_counter() - start

    bench.pedantic(target, rounds=1, iterations=1)
    A = result["r"].affinity  # noqa: N806
    assert A.shape == (nb, nb) and np.all(np.isfinite(A)) and np.allclose(A, A.T)
    bench.extra_info.update(
        {
            "case": "quick" if quick else "full",
            "model": "adm-small " + json.dumps(MODEL),
            "P": P,
            "bins": nb,
            "n_samples": n,
            "batch_size": batch,
            "block_rows": result["r"].meta["block_rows"],
            "baseline_s": times["a"],
            "affinity_s": times["b"],
            "ratio": times["b"] / times["a"],
            "threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        }
    )


def summarize(raw_json: str, out_stem: str) -> dict[str, Any]:
    """Reduce a --benchmark-json file to <out_stem>.json and <out_stem>.md."""
    raw = json.loads(Path(raw_json).read_text())
    rows, machine = [], {}
    for b in raw["benchmarks"]:
        info = dict(b["extra_info"])
        machine = {key: info.pop(key) for key in MACHINE_KEYS}
        machine["threads"] = info.pop("threads")
        machine["omp_wait_policy"] = info.pop("omp_wait_policy")
        rows.append(info)
    summary = {"machine": machine, "target_ratio": TARGET, "cases": rows}
    Path(out_stem + ".json").write_text(json.dumps(summary, indent=1) + "\n")
    m = machine
    lines = [
        "# Task-affinity pass vs the forward+backward passes it needs",
        "",
        f"{m['device']} ({m['cpu_model']}), torch.set_num_threads({m['threads']}), "
        f"OMP_WAIT_POLICY={m['omp_wait_policy']}; torch {m['torch']}, python {m['python']}; "
        f"git {m['git_sha']}. Measured back to back in one run: (a) nb x n-sample "
        "forward+backward passes, then (b) the full `task_affinity` pass with the same nb, n, "
        f"batch. Target (b)/(a) <= {TARGET}. The machine is shared with other jobs, so a "
        "ratio below 1 is load noise between the two back-to-back measurements, not a speed-up.",
        "",
        "| case | model (P) | bins | samples/bin | batch | rows of J | (a) passes s | "
        "(b) affinity s | ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | adm-small ({r['P']:,}) | {r['bins']} | {r['n_samples']} | "
            f"{r['batch_size']} | {r['block_rows']} | {r['baseline_s']:.1f} | "
            f"{r['affinity_s']:.1f} | {r['ratio']:.3f}x |"
        )
    Path(out_stem + ".md").write_text("\n".join(lines) + "\n")
    return summary


if __name__ == "__main__":
    summarize(sys.argv[1], sys.argv[2])

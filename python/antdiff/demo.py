"""``make demo`` / ``antdiff demo`` / ``python -m antdiff.demo``: ANT vs vanilla on digits, on CPU.

Trains the small ADM UNet "adm-tiny" on sklearn's 8x8 digits twice with the same seed and steps:
once with ANT (k = 5 log-SNR clusters, UW + PCGrad; preset ``digits_adm_uw_pcgrad``) and once
vanilla. Then writes a report folder: sample grids of both (EMA weights, DDIM-50), the clusters
plot, per-cluster weights and losses over training, the PCGrad conflict-rate matrix, and
summary.json + README.md describing the run.
"""

from __future__ import annotations

import argparse
import csv
import json
import multiprocessing
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from .clustering import Clusters
from .config import load_config
from .utils import atomic_write, atomic_write_text

PRESET = "digits_adm_uw_pcgrad"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="demo_out", help="report folder (default demo_out)")
    p.add_argument("--steps", type=int, default=None, help="training steps of each run")
    p.add_argument("--batch-size", type=int, default=None, help="batch size of each run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    plt = _plt()
    try:
        return atomic_write(path, lambda f: fig.savefig(f, format="png"))
    finally:
        plt.close(fig)


def _read_csv(path: Path) -> dict[str, np.ndarray]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return {k: np.array([float(r[k]) for r in rows]) for k in rows[0]}


def plot_curves(ant_csv: Path, vanilla_csv: Path, k: int, path: Path) -> Path:
    """Per-cluster weights (ANT) and per-cluster losses (ANT vs vanilla) against the step."""
    plt = _plt()
    a, v = _read_csv(ant_csv), _read_csv(vanilla_csv)
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8), dpi=110)
    colors = plt.get_cmap("viridis")(np.linspace(0.05, 0.9, k))
    dot = {"marker": "o"} if min(len(a["step"]), len(v["step"])) < 2 else {}  # one log: a dot
    for i in range(k):
        label = f"I{i + 1}"
        axes[0].plot(a["step"], a[f"weight_c{i + 1}"], color=colors[i], label=label, **dot)
        axes[1].plot(a["step"], a[f"loss_c{i + 1}"], color=colors[i], label=label, **dot)
        axes[2].plot(v["step"], v[f"loss_c{i + 1}"], color=colors[i], label=label, **dot)
    axes[0].set_title("ANT (UW+PCGrad): effective cluster weights")
    axes[1].set_title("ANT: cluster losses")
    axes[2].set_title("vanilla: cluster losses")
    axes[0].set_yscale("log")
    # the top from the finite losses only: a cluster no logged step drew is all NaN (and
    # max() over a NaN depends on the order), a diverged step inf
    finite = [c[np.isfinite(c)] for r in (a, v) for c in (r[f"loss_c{i + 1}"] for i in range(k))]
    top = max((float(np.percentile(c, 98)) for c in finite if c.size), default=None)
    for ax in axes[1:]:
        ax.set_yscale("log")
        if top is not None and top > 0:
            ax.set_ylim(top=top * 1.5)
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return _save(fig, path)


def plot_conflicts(rate: list[list[float]], path: Path) -> Path:
    """Heat map of the fraction of steps where clusters i and j had a negative cosine."""
    plt = _plt()
    m = np.asarray(rate, dtype=np.float64)
    k = m.shape[0]
    fig, ax = plt.subplots(figsize=(4.6, 3.9), dpi=120)
    im = ax.imshow(m, vmin=0.0, vmax=max(0.5, float(np.nanmax(m, initial=0.0))), cmap="magma")
    names = [f"I{i + 1}" for i in range(k)]
    ax.set_xticks(range(k), names)
    ax.set_yticks(range(k), names)
    for i in range(k):
        for j in range(k):
            ax.text(
                j,
                i,
                f"{m[i, j]:.2f}",
                ha="center",
                va="center",
                fontsize=8,
                color="white" if m[i, j] < 0.6 * im.get_clim()[1] else "black",
            )
    ax.set_title("PCGrad conflict rate (cos < 0)", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return _save(fig, path)


def side_by_side(ant_png: Path, vanilla_png: Path, path: Path) -> Path:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 5.3), dpi=110)
    for ax, p, title in ((axes[0], vanilla_png, "vanilla"), (axes[1], ant_png, "ANT: UW + PCGrad")):
        ax.imshow(plt.imread(p), interpolation="nearest")
        ax.set_title(title)
        ax.axis("off")
    fig.tight_layout()
    return _save(fig, path)


MARK = ".antdiff_demo"  # in the demo's run folders: a rerun may replace them


def _demo_owned(run_dir: Path) -> bool:
    """A folder the demo wrote: marked, or (from before the mark) a checkpoint-less run of the
    demo's preset."""
    if (run_dir / MARK).is_file():
        return True
    cfg = run_dir / "config.yaml"
    if not cfg.is_file() or any((run_dir / "checkpoints").glob("ckpt_*.pt")):
        return False
    first = cfg.read_text().splitlines()[:1]
    return first == [f"name: {PRESET}"]


def run_demo(
    out: str | Path = "demo_out",
    steps: int | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Train both runs and write the report; returns the summary written to summary.json."""
    from .clustering import plot_clusters
    from .schedules import make_schedule

    out = Path(out)
    k = load_config(PRESET).ant.k
    for flag, value, least in (("--steps", steps, 1), ("--batch-size", batch_size, k),
                               ("--seed", seed, 0)):  # fmt: skip
        if (value is not None or flag == "--seed") and (
            isinstance(value, bool) or not isinstance(value, int) or value < least
        ):
            why = f" (the ANT run stratifies each batch over its {k} clusters)" if least > 1 else ""
            raise ValueError(f"{flag} must be an integer >= {least}{why}, got {value!r}")
    if seed >= 2**63:
        raise ValueError(f"--seed must be below 2**63 (torch seeds), got {seed}")
    extra = ["--train.seed", str(seed), "--train.progress", str(progress).lower()]
    if steps is not None:
        extra += ["--train.steps", str(steps)]
    if batch_size is not None:
        extra += ["--train.batch_size", str(batch_size)]
    t_start = time.perf_counter()
    jobs = {}
    for name, method in (("ant", None), ("vanilla", "vanilla")):
        over = [*extra, "--train.out_dir", str(out / "runs" / name)]
        over += (["--ant.method", method] if method else []) + ["--train.threads", "1"]
        jobs[name] = (load_config(PRESET, over), over)
    for name in jobs:  # both checked before either is touched
        run_dir = out / "runs" / name
        for d in (out, run_dir.parent, run_dir):
            if d.exists() and not d.is_dir():
                raise ValueError(
                    f"{str(d)!r} is a file where the demo writes a folder: give the demo "
                    "another --out"
                )
        if not _demo_owned(run_dir) and run_dir.exists() and any(run_dir.iterdir()):
            raise ValueError(
                f"{str(run_dir)!r} holds files the demo did not write (a training run?): give "
                "the demo another --out"
            )
    for name, (cfg, _) in jobs.items():  # a rerun replaces the demo's own runs (they keep no
        # checkpoints, so an earlier run's sample grids and TensorBoard events would sit beside
        # the new ones); only folders the demo marked as its own, never a run of the user's
        print(
            f"[demo] training {name}: {cfg.ant.method}, {cfg.train.steps} steps, batch "
            f"{cfg.train.batch_size}",
            file=sys.stderr,
        )
        run_dir = out / "runs" / name
        if _demo_owned(run_dir):
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / MARK).write_text("written by antdiff demo; a rerun replaces this folder\n")
    _remove_old_report(out)
    # the twins train at once, one thread each: both cores busy, no thread oversubscription
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    ctx = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(max_workers=2, mp_context=ctx)
    try:
        futures = {n: pool.submit(_train_child, over) for n, (_, over) in jobs.items()}
        results = {n: (jobs[n][0], f.result()) for n, f in futures.items()}
    except BaseException:  # Ctrl-C, SIGTERM, a worker's error: the other worker stops too (the
        # pool's exit waited for both runs to finish)
        for proc in list((getattr(pool, "_processes", None) or {}).values()):
            proc.terminate()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    cfg, ant = results["ant"]
    clusters = Clusters.from_dict(ant["clusters"])
    files = {
        "samples": side_by_side(
            Path(ant["samples"]), Path(results["vanilla"][1]["samples"]), out / "samples.png"
        ),
        "samples_ant": _copy(Path(ant["samples"]), out / "samples_ant.png"),
        "samples_vanilla": _copy(
            Path(results["vanilla"][1]["samples"]), out / "samples_vanilla.png"
        ),
        "clusters": plot_clusters(
            clusters, make_schedule(cfg.diffusion.schedule, cfg.diffusion.T), out / "clusters.png"
        ),
        "curves": plot_curves(
            out / "runs" / "ant" / "metrics.csv",
            out / "runs" / "vanilla" / "metrics.csv",
            clusters.k,
            out / "weights_losses.png",
        ),
        "conflicts": plot_conflicts(ant["stats"]["conflict_rate"], out / "conflict_rate.png"),
    }
    summary = _summary(results, files, time.perf_counter() - t_start)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    atomic_write_text(out / "README.md", _readme(summary))
    return summary


def _remove_old_report(out: Path) -> None:
    """An earlier demo's report (its summary.json, README.md and the files the summary lists)
    goes before the new runs train: stopped mid-way, a rerun left the old report beside the
    new runs' logs. Only files an antdiff demo summary names."""
    try:
        old = json.loads((out / "summary.json").read_text())
        names = [*old["files"].values()] if old.get("preset") == PRESET else []
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        return
    for name in [*names, "README.md", "summary.json"]:
        if isinstance(name, str) and "/" not in name:
            path = out / name
            if path.is_file() or path.is_symlink():  # never a folder ("runs", "..")
                path.unlink(missing_ok=True)


def _train_child(overrides: list[str]) -> dict:
    """Train one run in a worker process; return its picklable summary."""
    from .train import train

    s = train(load_config(PRESET, overrides))
    run = s.pop("run")
    s["clusters"] = run.ant.clusters.to_dict()
    return s


def _copy(src: Path, dst: Path) -> Path:
    data = src.read_bytes()
    return atomic_write(dst, lambda f: f.write(data))


def _summary(results: dict, files: dict, seconds: float) -> dict:
    cfg, ant = results["ant"]
    stats = ant["stats"]
    return {
        "what": "adm-tiny on sklearn digits (8x8), ANT (k=5 log-SNR clusters, UW+PCGrad) vs "
        "vanilla, same seed and steps; samples from the EMA weights with DDIM",
        "preset": PRESET,
        "out": str(Path(cfg.train.out_dir).parent.parent),
        "steps": cfg.train.steps,
        "batch_size": cfg.train.batch_size,
        "seed": cfg.train.seed,
        "clusters": [list(iv) for iv in Clusters.from_dict(ant["clusters"]).intervals],
        "sampler": f"{cfg.sample.sampler}-{cfg.sample.steps}",
        "seconds_total": round(seconds, 1),
        "seconds": {n: round(r["seconds"], 1) for n, (_, r) in results.items()},
        "final_loss": {n: r["loss"] for n, (_, r) in results.items()},
        "ant_final_weights": stats.get("weight"),
        "ant_mean_cluster_losses": stats.get("loss_mean"),
        "vanilla_mean_cluster_losses": results["vanilla"][1]["stats"].get("loss_mean"),
        "conflict_rate": stats.get("conflict_rate"),
        "files": {k: Path(v).name for k, v in files.items()},
    }


def _readme(s: dict) -> str:
    c = s["conflict_rate"]
    far = c[0][-1] if c else float("nan")
    return f"""# antdiff demo

What ran: {s["what"]}.
Preset `{s["preset"]}`; {s["steps"]} steps of batch {s["batch_size"]} per run, seed {s["seed"]};
total {s["seconds_total"]} s, of which training (side by side) ANT {s["seconds"]["ant"]} s, vanilla
{s["seconds"]["vanilla"]} s.
Clusters (half-open timestep intervals [l, r), t = 0 least noisy): {s["clusters"]}.

| file | content |
|---|---|
| samples.png | vanilla (left) and ANT (right) samples, {s["sampler"]}, EMA weights |
| samples_ant.png, samples_vanilla.png | the two grids alone |
| clusters.png | log-SNR(t) and the k = 5 cluster boundaries |
| weights_losses.png | ANT's effective per-cluster weights and both runs' cluster losses |
| conflict_rate.png | fraction of steps where two clusters' gradients had negative cosine |
| runs/ant, runs/vanilla | metrics.csv, config.yaml, TensorBoard events, sample grids |

Final effective weights (UW x PCGrad): {[round(w, 3) for w in s["ant_final_weights"]]}.
Conflict rate between the least and the most noisy cluster: {far:.2f}.
A few minutes of CPU training is far from convergence: the point is the mechanics (clusters,
weights, conflicts) and a like-for-like comparison, not sample quality.
Re-run: `antdiff demo --out {s["out"]} --steps {s["steps"]} --batch-size {s["batch_size"]} \
--seed {s["seed"]}` (`make demo`: the defaults into demo_out).
"""


def run(args: argparse.Namespace) -> int:
    from .utils import check_output

    check_output(args.out, "--out", folder=True)
    s = run_demo(args.out, args.steps, args.batch_size, args.seed, not args.no_progress)
    print(json.dumps({k: s[k] for k in ("seconds_total", "final_loss", "files")}, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m antdiff.demo", description=__doc__)
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return run(args)
    except (ValueError, FileNotFoundError) as exc:  # bad input: the message, not a traceback
        p.error(str(exc))


if __name__ == "__main__":
    sys.exit(main())

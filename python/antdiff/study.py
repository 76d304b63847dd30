"""Small-scale study on digits: vanilla vs ANT methods x clusterings, several seeds, scored.

    python -m antdiff.study --out runs/study_digits --seeds 3 --steps 600 --jobs 2 \
        --report benchmarks/results/study_digits

Every (config, seed) trains ``adm-tiny`` with the same steps, batch, lr and seed, then samples
``--num`` images (EMA weights, DDIM) and scores them with the digits domain features against the
digits set. Each result lands in ``<out>/results/<config>_s<seed>.json``; a rerun skips the
configs whose JSON exists, so an interrupted study resumes. The "gradient" clustering needs a
task-affinity matrix: it is computed first from the vanilla seed-0 checkpoint (``antdiff
affinity``, ``--bins`` bins), and that run counts as the vanilla seed-0 result. The runs cluster
per timestep on the matrix's [T, T] expansion (every timestep takes its bin's row), so a bound
may fall inside a bin; ``antdiff cluster --affinity affinity.npz`` clusters on the bin edges.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, ThreadPoolExecutor, wait
from itertools import product
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from .utils import atomic_write, atomic_write_text, git_describe

METHODS = ("uw", "pcgrad", "nash", "uw+pcgrad")
CLUSTERINGS = ("timestep", "snr", "gradient")
METRICS = ("fid", "precision", "recall")


def study_configs(methods: tuple[str, ...], clusterings: tuple[str, ...]) -> list[dict[str, Any]]:
    """[{"name", "method", "clustering"}]: vanilla first, then every method x clustering."""
    out = [{"name": "vanilla", "method": "vanilla", "clustering": "snr"}]
    for m, c in product(methods, clusterings):
        out.append({"name": f"{m}-{c}", "method": m, "clustering": c})
    return out


def result_path(out: Path, name: str, seed: int) -> Path:
    return out / "results" / f"{name}_s{seed}.json"


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """Train one (config, seed), evaluate its final EMA checkpoint, write the result JSON."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(job["threads"])
    try:
        return _run_one(job)
    finally:
        torch.set_num_threads(threads)


def _run_one(job: dict[str, Any]) -> dict[str, Any]:
    from .checkpoint import list_checkpoints
    from .config import load_config
    from .evaluate import evaluate_checkpoint
    from .train import train

    run_dir = Path(job["out"]) / "runs" / f"{job['name']}_s{job['seed']}"
    steps = job["steps"]
    overrides = [
        *("--ant.method", job["method"], "--ant.clustering", job["clustering"]),
        *("--train.steps", str(steps), "--train.batch_size", str(job["batch"])),
        *("--train.lr", str(job["lr"]), "--train.ema_decay", str(job["ema"])),
        *("--train.seed", str(job["seed"]), "--train.threads", str(job["threads"])),
        *("--train.ckpt_every", str(steps), "--train.keep_ckpts", "1"),
        *("--train.progress", "false", "--train.out_dir", str(run_dir), "--sample.n", "16"),
    ]
    if job["clustering"] == "gradient":
        overrides += ["--ant.affinity", job["affinity"]]
    # a run killed after its checkpoint but before its result file: continue it
    earlier = list_checkpoints(run_dir)
    summary = train(load_config("digits_adm", overrides), resume=True if earlier else None)
    run = summary.pop("run")
    res = evaluate_checkpoint(
        summary["checkpoint"] or str(list_checkpoints(run_dir)[-1]),
        job["num"],
        sampler=job["sampler"],
        steps=job["sample_steps"],
        seed=job["seed"],
        batch_size=job["num"],
        progress=False,
    )
    if summary["loss"] is None:  # nothing left to train here: the earlier process's log
        summary.update(_logged(run_dir))
    res.update(
        config=job["name"],
        train_steps=steps,
        train_batch=job["batch"],
        train_seconds=round(summary["seconds"], 2),
        sec_per_step=round(summary["sec_per_step"], 4),
        final_loss=summary["loss"],
        cluster_bounds=list(run.ant.clusters.bounds),
        cluster_weights=summary["stats"].get("weight"),
        git_sha=git_describe(),  # the code that made this result (a study may span commits)
    )
    path = result_path(Path(job["out"]), job["name"], job["seed"])
    atomic_write_text(path, json.dumps(res, indent=2, default=float))
    return res


def _logged(run_dir: Path) -> dict[str, float]:
    """Timing and final loss of a run an earlier process trained to the end, from its
    metrics.csv (a resume that had no step left to train measured nothing)."""
    import csv

    with open(Path(run_dir) / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    last = max(rows, key=lambda r: int(r["step"]))
    prev, sec = 0, 0.0
    for r in sorted(rows, key=lambda r: int(r["step"])):  # each row times the steps since the last
        sec += float(r["sec_per_step"]) * (int(r["step"]) - prev)
        prev = int(r["step"])
    return {"loss": float(last["loss"]), "seconds": sec, "sec_per_step": sec / max(1, prev)}


def make_affinity(out: Path, ckpt_dir: Path, bins: int, n_samples: int, threads: int) -> Path:
    """``antdiff affinity`` on one vanilla run -> <out>/affinity.npz (+ PNGs) and the [T, T]
    expansion <out>/affinity_T.npy that the trainer's ``ant.affinity`` reads."""
    import torch

    from .analysis.affinity import AffinityResult
    from .cli import main as cli_main

    torch.set_num_threads(threads)
    npz = out / "affinity.npz"
    argv = ["affinity", str(ckpt_dir), "--bins", str(bins), "--n-samples", str(n_samples)]
    if cli_main([*argv, "--device", "cpu", "--out", str(npz)]) != 0:
        raise RuntimeError("antdiff affinity failed (see the message above)")
    res = AffinityResult.load(npz)
    # per-timestep matrix: every timestep takes its bin's row/column
    which = np.repeat(np.arange(res.nb), np.diff(res.bin_edges))
    full = out / "affinity_T.npy"
    table = res.affinity[np.ix_(which, which)].astype(np.float32)
    atomic_write(full, lambda f: np.save(f, table))  # its existence means "done" on a resume
    return full


def summarize(out: Path, configs: list[dict[str, Any]], seeds: list[int]) -> dict[str, Any]:
    """Mean and std (over seeds, ddof=1; None for one seed) of every metric per config, from the
    result JSONs. ΔFID is paired with vanilla by seed (mean None without vanilla results)."""
    rows, first = [], None
    for c in configs:
        paths = [result_path(out, c["name"], s) for s in seeds]
        res = [json.loads(p.read_text()) for p in paths if p.is_file()]
        if not res:
            continue
        first = first or res[0]
        row = {**c, "n_seeds": len(res), "seeds": [r["seed"] for r in res]}
        for key in (*METRICS, "sec_per_step"):
            vals = np.array([r[key] for r in res], dtype=np.float64)
            row[key] = {"mean": float(vals.mean()), "std": _std(vals), "values": vals.tolist()}
        row["cluster_bounds"] = res[0]["cluster_bounds"]
        rows.append(row)
    van = next((r for r in rows if r["method"] == "vanilla"), None)
    base = dict(zip(van["seeds"], van["fid"]["values"])) if van is not None else {}
    for row in rows:  # paired by seed: every config shares the seed's data order, init, noise
        d = np.array([v - base[s] for s, v in zip(row["seeds"], row["fid"]["values"]) if s in base])
        row["dfid"] = {
            "mean": float(d.mean()) if d.size else None,
            "std": _std(d),
            "values": d.tolist(),
            "better": int((d < 0).sum()),
        }
    return {"rows": rows, "settings": first or {}}


def _std(vals: np.ndarray) -> float | None:
    """Sample std (ddof=1); None below two values, where it is undefined (JSON has no NaN)."""
    return float(vals.std(ddof=1)) if vals.size > 1 else None


def _pm(stat: dict[str, float], digits: int, sign: bool = False) -> str:
    std = "n/a" if stat["std"] is None else f"{stat['std']:.{digits}f}"  # one seed
    mean = f"{stat['mean']:+.{digits}f}" if sign else f"{stat['mean']:.{digits}f}"
    return f"{mean} ± {std}"


def write_report(summary: dict[str, Any], prefix: Path, out: Path) -> None:
    """PREFIX.md (table + settings), PREFIX.json (the summary) and PREFIX/ (affinity files)."""
    meta, rows = summary["meta"], summary["rows"]
    feats = summary["settings"].get("features", "?")
    lines = [
        "# ANT vs vanilla on 8x8 digits (small-scale study)",
        "",
        f"Features: {feats}: the 64-d hidden layer of a small digits classifier; reference: "
        f"all 1797 digits. Mean ± std (ddof 1) over seeds {rows[0]['seeds'] if rows else []}.",
        "",
        "ΔFID: FID minus the vanilla FID of the same seed (mean ± std over seeds); "
        "'better': seeds where the config beat vanilla.",
        "",
        "| config | method | clustering | FID ↓ | ΔFID vs vanilla | better | precision ↑ "
        "| recall ↑ | s/step | clusters |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        d, van = r["dfid"], r["method"] == "vanilla"
        delta = "-" if van or not d["values"] else _pm(d, 2, sign=True)
        better = "-" if van or not d["values"] else f"{d['better']}/{len(d['values'])}"
        lines.append(
            f"| {r['name']} | {r['method']} | {'-' if van else r['clustering']} | "
            f"{_pm(r['fid'], 2)} | {delta} | {better} | {_pm(r['precision'], 3)} | "
            f"{_pm(r['recall'], 3)} | {r['sec_per_step']['mean']:.3f} | "
            f"{'-' if van else r['cluster_bounds']} |"
        )
    lines += [
        "",
        f"- Command: `{meta['command']}`",
        f"- Model adm-tiny (digits_adm preset), {meta['steps']} steps, batch {meta['batch']}, "
        f"lr {meta['lr']}, EMA {meta['ema']}, k = 5, {meta['seeds']} seeds (a seed fixes "
        "the init, data order and noise streams of every config).",
        f"- Samples: {meta['num']} per run, {meta['sampler'].upper()}-{meta['sample_steps']}, "
        "EMA weights, sampling seed = training seed; precision / recall with k = 3.",
        *([f"- Gradient clustering: affinity of {meta['bins']} bins "
           f"({meta['affinity_samples']} samples per bin) from the vanilla seed-0 checkpoint "
           f"({prefix.name}/affinity_*.png, affinity.npz), clustered per timestep on its [T, T] "
           "expansion (bounds may fall inside a bin; `antdiff cluster --affinity` on the .npz "
           "clusters on the bin edges)."]
          if any(r["clustering"] == "gradient" and r["method"] != "vanilla" for r in rows)
          else []),  # fmt: skip
        f"- Machine: {meta['machine']}, shared with other jobs; {meta['jobs']} runs in parallel, "
        "1 torch thread each; s/step are therefore contended timings.",
        f"- Wall time: {meta['wall_seconds'] / 60:.1f} min from the study's first start to this "
        f"report; git sha {meta['git_sha']} (results made at "
        f"{', '.join(meta.get('results_made_at') or ['?'])}).",
    ]
    prefix.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(prefix.with_suffix(".md"), "\n".join(lines) + "\n")
    atomic_write_text(prefix.with_suffix(".json"), json.dumps(summary, indent=2, default=str))
    for name in ("affinity.npz", "affinity_timestep.png", "affinity_logsnr.png"):
        if (out / name).is_file():
            prefix.mkdir(parents=True, exist_ok=True)
            shutil.copy2(out / name, prefix / name)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m antdiff.study", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="runs, results and affinity go here")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema", type=float, default=0.99)
    p.add_argument("--num", type=int, default=1000, help="samples per run for the metrics")
    p.add_argument("--sampler", default="ddim", choices=("ddim", "ddpm"))
    p.add_argument("--sample-steps", type=int, default=50)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--clusterings", default=",".join(CLUSTERINGS))
    p.add_argument("--bins", type=int, default=20, help="affinity bins (gradient clustering)")
    p.add_argument("--affinity-samples", type=int, default=256)
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel (1 thread each)")
    p.add_argument("--report", type=Path, default=None, help="write REPORT.md / REPORT.json")
    args = p.parse_args(argv)
    if args.seeds < 1 or args.steps < 1 or args.num < 1 or args.jobs < 1:
        p.error("--seeds, --steps, --num and --jobs must be >= 1")
    from .metrics.fid import check_enough_samples

    try:  # the digits features are 64-d: found now, not after the first run has trained
        check_enough_samples(args.num, 64, f"--num {args.num}", False, api=False)
    except ValueError as exc:
        p.error(str(exc))
    _check_runs(p, args)
    return args


def _check_runs(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every run's config validated now (a mistyped method failed when its run came up, after
    the others had trained)."""
    from .config import load_config

    clusterings = args.clusterings.split(",")
    unknown = [c for c in clusterings if c not in CLUSTERINGS]
    if unknown:
        p.error(f"--clusterings: unknown {unknown}; choose among {list(CLUSTERINGS)}")
    for flag, names in (("--methods", args.methods.split(",")), ("--clusterings", clusterings)):
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:  # two runs of one config would train in the same folder
            p.error(f"{flag}: {twice} given twice; name each once")
    for m, c in product(["vanilla", *args.methods.split(",")], clusterings):
        overrides = [
            *("--ant.method", m, "--ant.clustering", "snr" if c == "gradient" else c),
            *("--train.steps", str(args.steps), "--train.batch_size", str(args.batch)),
            *("--train.lr", str(args.lr), "--train.ema_decay", str(args.ema)),
            *("--sample.sampler", args.sampler, "--sample.steps", str(args.sample_steps)),
        ]  # the gradient clustering's affinity file comes from the study's first run
        try:
            cfg = load_config("digits_adm", overrides)
        except ValueError as exc:
            p.error(f"--methods {m} / --clusterings {c}: {exc}")
        if c == "gradient" and not 1 <= args.bins <= cfg.diffusion.T:  # checked after a run
            p.error(f"--bins must be in [1, T={cfg.diffusion.T}], got {args.bins}")
    if args.affinity_samples < 1:
        p.error(f"--affinity-samples must be >= 1, got {args.affinity_samples}")


def _schedule(out: Path, todo: list[dict[str, Any]], args: argparse.Namespace, t0: float) -> None:
    """Run the jobs ``args.jobs`` at a time; the gradient-clustering jobs wait for the affinity,
    which the vanilla seed-0 run provides."""
    affinity = out / "affinity_T.npy"
    vdir = out / "runs" / "vanilla_s0"
    held = [j for j in todo if j["clustering"] == "gradient" and not affinity.is_file()]
    if held and result_path(out, "vanilla", 0).is_file():
        make_affinity(out, vdir, args.bins, args.affinity_samples, 1)
        held = []
    ready = sorted((j for j in todo if j not in held), key=lambda j: j["seed"] != 0)
    ready.sort(key=lambda j: (j["name"], j["seed"]) != ("vanilla", 0))
    # one job at a time runs in this process (no start-up cost); more get spawned processes
    pool = (
        ThreadPoolExecutor(1)
        if args.jobs == 1
        else ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn"),
                                 initializer=_die_with_parent, initargs=(os.getpid(),))
    )  # fmt: skip
    # one shutdown, not a `with` block: its exit's shutdown(wait=True) after a cancelling one
    # let a process pool start every queued run anyway (CPython 3.11 resets the cancel flag)
    try:
        running = {pool.submit(run_one, j): j for j in ready}
        _collect(pool, running, held, out, vdir, args, t0)
    except BaseException:  # reported now; the queued runs are dropped, the running ones end
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def _die_with_parent(parent: int, every: float = 1.0) -> None:
    """A worker's initializer: end the worker once its study process ``parent`` is gone (a
    kill -9 or an OOM kill of the study left its workers training on, beside the rerun, in the
    same run folders, and then idle for good)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="antdiff-parent-watch").start()


def _lock(out: Path):  # noqa: ANN202
    """Hold ``out``/.lock until the returned file is closed (main closes it as it ends; a killed
    process's lock goes with it), or exit naming the study holding it: two studies on one --out
    trained the same run folders side by side."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        return None
    f = open(out / ".lock", "a+")  # noqa: SIM115 (held open until main ends)
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise SystemExit(
            f"study: another study is running on {out} (pid {holder} holds {out / '.lock'}): "
            "wait for it to end, or pass another --out"
        ) from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def _collect(pool, running, held, out, vdir, args, t0) -> None:  # noqa: ANN001
    """Report the runs as they finish; submit the held gradient-clustering runs once the
    vanilla seed-0 run has made the affinity."""
    while running:
        done, _ = wait(running, return_when=FIRST_COMPLETED)
        for f in done:
            j, r = running.pop(f), f.result()
            print(
                f"[{time.perf_counter() - t0:6.0f} s] {j['name']} seed {j['seed']}: "
                f"FID {r['fid']:.3f} P {r['precision']:.3f} R {r['recall']:.3f} "
                f"({r['sec_per_step']:.3f} s/step)",
                flush=True,
            )
            if held and (j["name"], j["seed"]) == ("vanilla", 0):
                make_affinity(out, vdir, args.bins, args.affinity_samples, 1)
                running.update({pool.submit(run_one, h): h for h in held})
                held = []
    if held:
        raise RuntimeError("the gradient runs need the vanilla seed-0 run, which did not run")


SETTINGS = ("steps", "batch", "lr", "ema", "num", "sampler", "sample_steps", "bins",
            "affinity_samples")  # fmt: skip


def _check_settings(out: Path, args: argparse.Namespace) -> None:
    """Record the settings every result of ``out`` is made with; a rerun must repeat them (it
    reuses the results already there)."""
    from .evaluate import NOISE

    now = {k: getattr(args, k) for k in SETTINGS}
    now["noise"] = NOISE  # how samples draw their noise: not a flag; results made before it
    # was recorded drew one stream per run and are not paired with per-image ones
    path = out / "settings.json"
    if not path.is_file():
        atomic_write_text(path, json.dumps(now, indent=2) + "\n")
        return
    then = json.loads(path.read_text())
    diff = {k: (then.get(k), v) for k, v in now.items() if then.get(k) != v}
    made = any((out / "results").glob("*.json")) or any((out / "runs").glob("*/config.yaml"))
    if diff and not made:  # nothing made with them yet (no result, no run begun)
        atomic_write_text(path, json.dumps(now, indent=2) + "\n")
        return
    if diff:
        said = ", ".join(
            f"sampling noise {v} (made with {was or 'one stream per run'}: an earlier antdiff)"
            if k == "noise" else f"--{k.replace('_', '-')} {v} (made with {was})"
            for k, (was, v) in diff.items()
        )  # fmt: skip
        raise SystemExit(
            f"study: {out} holds results or runs made with other settings: {said}. Repeat "
            "those settings to resume it, or pass another --out"
        )


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    t0, out = time.perf_counter(), args.out
    out.mkdir(parents=True, exist_ok=True)
    lock = _lock(out)
    try:
        return _study(args, argv, t0, out)
    finally:  # released however main ends: a kept traceback (a REPL's, a test's) held it open
        if lock is not None:
            lock.close()


def _study(args: argparse.Namespace, argv: list[str] | None, t0: float, out: Path) -> int:
    """main's work, with ``out`` locked."""
    if not (out / "started.txt").is_file():  # wall time counts from the first invocation
        atomic_write_text(out / "started.txt", f"{time.time():.1f}\n")
    _check_settings(out, args)
    configs = study_configs(tuple(args.methods.split(",")), tuple(args.clusterings.split(",")))
    seeds = list(range(args.seeds))
    base = {k: getattr(args, k) for k in ("steps", "batch", "lr", "ema", "num", "sampler")}
    base.update(out=str(out), threads=1, sample_steps=args.sample_steps)
    base["affinity"] = str(out / "affinity_T.npy")
    todo = [
        {**base, **c, "seed": s}
        for s in seeds
        for c in configs
        if not result_path(out, c["name"], s).is_file()
    ]
    print(f"study: {len(todo)} runs to do ({len(configs)} configs x {len(seeds)} seeds)")
    _schedule(out, todo, args, t0)
    summary = summarize(out, configs, seeds)
    summary["meta"] = {
        "command": "python -m antdiff.study " + " ".join(sys.argv[1:] if argv is None else argv),
        "wall_seconds": round(time.time() - float((out / "started.txt").read_text()), 1),
        "git_sha": git_describe(),
        # the code of each result, which a resumed study may have made over several commits
        "results_made_at": sorted({
            json.loads(result_path(out, c["name"], s).read_text()).get("git_sha", "unrecorded")
            for c in configs for s in seeds if result_path(out, c["name"], s).is_file()
        }),  # fmt: skip
        "machine": f"CPU, {os.cpu_count()} cores",
        **{k: v for k, v in vars(args).items() if k not in ("out", "report")},
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, default=str))
    if args.report is not None:
        write_report(summary, args.report, out)
    for r in summary["rows"]:
        print(f"{r['name']:>20}: FID {_pm(r['fid'], 3)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``antdiff cluster``: exact interval clustering of the timesteps, printed, saved, plotted."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..clustering import (
    affinity_meta,
    check_affinity_source,
    cluster_timesteps,
    load_affinity,
    plot_clusters,
)
from ..config import SCHEDULES
from ..schedules import Schedule, as_schedule, make_schedule
from ..utils import atomic_write_text, check_output, load_npy


def _limit(s: str) -> int | str | None:
    if s in ("none", "None"):
        return None
    if s == "default":
        return s
    try:
        return int(s)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"expected an integer, 'default' or 'none', got {s!r}"
        ) from exc


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--schedule",
        default=None,
        help="linear | scaled_linear | cosine | PATH.npy (alphas_cumprod); default: the one an "
        "affinity .npz was measured on (its meta), else linear",
    )
    p.add_argument(
        "--T", type=int, default=None,
        help="number of timesteps of a named schedule (default: the affinity's, else 1000)",
    )  # fmt: skip
    p.add_argument("--k", type=int, default=5, help="number of clusters")
    p.add_argument(
        "--objective", default="snr", choices=["timestep", "snr", "gradient"],
        help="what each cluster keeps close: timestep (t), snr (the SNR, --snr) or gradient "
        "(the task affinity, --affinity)",
    )  # fmt: skip
    p.add_argument("--snr", default="log", choices=["log", "raw"], help="SNR scale for 'snr'")
    p.add_argument(
        "--min-size",
        type=_limit,
        default="default",
        help="smallest cluster in timesteps, 'default' (T/(2k)) or 'none' (no limit); "
        "default: T/(2k)",
    )
    p.add_argument(
        "--max-size",
        type=_limit,
        default="default",
        help="largest cluster in timesteps, 'default' (2T/k) or 'none' (no limit); default: 2T/k",
    )
    p.add_argument(
        "--affinity",
        type=Path,
        default=None,
        help="task-affinity file for --objective gradient: the .npz of antdiff affinity "
        "('affinity' and 'bin_edges'), a .npy ([T,T], or [nb,nb] with a sibling *_edges.npy) "
        "or a .pt tensor [T,T]",
    )
    p.add_argument(
        "--backend", default="auto", choices=["auto", "cpp", "numpy"],
        help="the DP's implementation (auto: the C++ extension if built, else numpy)",
    )  # fmt: skip
    p.add_argument("--json", type=Path, default=None, help="write the clusters as JSON here")
    p.add_argument("--plot", type=Path, default=None, help="write a PNG of log-SNR with the bounds")


def load_schedule(name: str, T: int) -> Schedule:  # noqa: N803
    path = Path(name)
    if path.suffix == ".npy":
        if not path.is_file():
            raise FileNotFoundError(f"schedule file {path} does not exist")
        # as_schedule: the API's check of an array (per-step alphas passed as alphas_cumprod)
        sched = as_schedule(load_npy(path, "alphas_cumprod [T]"))
        return Schedule(sched.alphas_cumprod, name=path.stem)
    return make_schedule(name, T)


def _affinity_schedule(meta: dict) -> str:
    """The named schedule an ``antdiff affinity`` .npz records in its meta ("cosine(T=1000)"
    -> "cosine"); "linear" for files without one (a .npy, a .pt, a custom schedule)."""
    name = str(meta.get("schedule", "")).split("(")[0]
    return name if name in SCHEDULES else "linear"


def run(args: argparse.Namespace) -> int:
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if path is not None:
            check_output(path, flag, folder=False)
    affinity = edges = None
    if args.objective == "gradient":
        if args.affinity is None:
            raise ValueError("--objective gradient needs --affinity FILE (from `antdiff affinity`)")
        affinity, edges = load_affinity(args.affinity)
        meta = affinity_meta(args.affinity)
    elif args.affinity is not None:
        raise ValueError(f"--affinity applies to --objective gradient, not {args.objective!r}: "
                         "add --objective gradient")  # fmt: skip
    T = args.T  # noqa: N806
    if T is None:  # the affinity's timesteps: its last bin edge, or the side of a [T, T] one
        T = 1000 if affinity is None else int(edges[-1]) if edges is not None else len(affinity)  # noqa: N806
    if args.schedule is None:
        args.schedule = _affinity_schedule(meta) if affinity is not None else "linear"
    try:
        sched = load_schedule(args.schedule, T)  # a .npy file has its own length
    except ValueError as e:
        if affinity is None or edges is not None or args.T is not None:
            raise
        n = len(affinity)  # a binned matrix without its edges reads as per timestep: T = nb
        raise ValueError(
            f"{e}. The affinity {args.affinity} ([{n}, {n}]) has no bin edges (no "
            f"{Path(args.affinity).stem}_edges.npy beside it), so it was read as per timestep "
            "with T = its side: put its edges beside it, pass the .npz that antdiff affinity "
            "wrote, or give --T"
        ) from e
    if args.T is not None and len(sched.alphas_cumprod) != args.T:
        raise ValueError(
            f"--T {args.T}: {args.schedule} holds {len(sched.alphas_cumprod)} timesteps (a file "
            "has its own length); drop --T"
        )
    if affinity is not None:  # measured on another T or schedule than this one's?
        check_affinity_source(args.affinity, meta, sched)
    clusters = cluster_timesteps(
        sched,
        args.k,
        args.objective,
        snr=args.snr,
        affinity=affinity,
        bin_edges=edges,
        min_size=args.min_size,
        max_size=args.max_size,
        backend=args.backend,
    )
    print(clusters)
    for i, (l, r) in enumerate(clusters.intervals):
        ls = sched.log_snr
        print(
            f"  I{i + 1}: t in [{l}, {r})  size {r - l:5d}  "
            f"log-SNR {ls[l]:+.2f} .. {ls[r - 1]:+.2f}"
        )
    if args.json is not None:
        atomic_write_text(args.json, clusters.to_json())
        print(f"wrote {args.json}")
    if args.plot is not None:
        plot_clusters(clusters, sched, args.plot)
        print(f"wrote {args.plot}")
    if args.json is None and args.plot is None:
        print(json.dumps({"bounds": list(clusters.bounds), "cost": clusters.cost}))
    return 0

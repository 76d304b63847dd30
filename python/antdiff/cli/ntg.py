"""``antdiff ntg``: negative transfer gap per timestep interval (paper Eq. 3, Fig. 2).

antdiff ntg --config digits_adm --intervals 5 --specialist-steps 1000
antdiff ntg --full runs/digits_adm --intervals 0:200,800:1000 --out runs/ntg

Trains the full model (unless --full names a trained run; from --config it trains vanilla, as
in the paper's NTG, unless --ant.method names another method; a vanilla one draws t uniformly,
--ant.sampling proportional, unless --ant.sampling says otherwise) and one vanilla specialist per
interval (0-based, half-open [t1, t2)), samples both ways with the same noise and writes
``ntg.json`` and ``ntg.png`` to --out. By default digits runs use domain features
(DigitsFeatures), which are not comparable to published FIDs, and other data the Inception
network; ``--features`` / ``--inception`` pick the network as ``antdiff eval``'s do.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from ..config import available_presets, load_config, parse_overrides
from ..utils import check_output
from .train import _collect_overrides


def _intervals(s: str) -> int | list[tuple[int, int]]:
    try:
        if ":" not in s:
            return int(s)
        return [tuple(int(v) for v in part.split(":")) for part in s.split(",")]  # type: ignore[misc]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"expected k (equal intervals) or t1:t2,t1:t2,... got {s!r}"
        ) from exc


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        default=None,
        help=f"the full model's preset ({', '.join(available_presets())}) or YAML file",
    )
    p.add_argument("--full", default=None, help="use this trained run dir / checkpoint as full")
    p.add_argument(
        "--intervals",
        type=_intervals,
        default=5,
        help="k (k equal intervals of [0, T)) or t1:t2,t1:t2,... (0-based, half-open)",
    )
    p.add_argument(
        "--specialist-steps", type=int, default=None, help="default: the full model's steps"
    )
    p.add_argument("--n-samples", type=int, default=1000, help="samples per FID")
    p.add_argument("--seed", type=int, default=0, help="noise seed shared by all samplings")
    p.add_argument("--batch", type=int, default=500, help="sampling batch size")
    p.add_argument("--out", default="runs/ntg", help="output directory")
    from ..evaluate import FEATURES

    p.add_argument(
        "--features",
        default=None,
        help=f"feature network, one of {', '.join(FEATURES)} (default: digits for digits data, "
        "else inception)",
    )
    p.add_argument("--inception", type=Path, default=None, help="feature network file")
    p.epilog = "Full-model config overrides: --section.key VALUE, e.g. --train.steps 2000"
    p.allow_abbrev = False
    _collect_overrides(p)


def run(args: argparse.Namespace) -> int:
    from ..analysis.ntg import run_ntg, uniform_intervals
    from ..checkpoint import load_checkpoint
    from ..config import config_from_saved

    overrides = getattr(args, "overrides", [])
    if args.full is None and args.config is None:
        raise ValueError("--config: give the full model's config, or --full RUN_DIR")
    if args.full is not None and args.config is not None:
        raise ValueError("--config and --full: give one; the full model trains from --config or "
                         "is the trained --full run (whose config it keeps)")  # fmt: skip
    if args.full is not None and overrides:
        raise ValueError(f"overrides {overrides} apply to --config, not to a trained --full run")
    if args.n_samples < 2 or args.batch < 1:
        raise ValueError(f"--n-samples must be >= 2 and --batch >= 1, got {args.n_samples}, "
                         f"{args.batch}")  # fmt: skip
    check_output(args.out, "--out", folder=True)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.full is None:
        given = dict(parse_overrides(overrides, once=True))
        if "ant.method" not in given:
            # the paper's NTG compares vanilla models; the specialists are vanilla too
            overrides = [*overrides, "--ant.method", "vanilla"]
        cfg = load_config(args.config, overrides)
        if cfg.ant.method == "vanilla" and "ant.sampling" not in given:  # (any spelling)
            # uniform t, as plain training draws it (the paper presets stratify "equal" for
            # ANT's methods: with vanilla a reweighted objective)
            cfg = load_config(args.config, [*overrides, "--ant.sampling", "proportional"])
    else:  # the full run's config, without building its model twice
        cfg = config_from_saved(load_checkpoint(args.full)[0]["config"])
    iv = args.intervals
    intervals = uniform_intervals(cfg.diffusion.T, iv) if isinstance(iv, int) else iv
    steps = args.specialist_steps if args.specialist_steps is not None else cfg.train.steps
    if steps < 1:
        raise ValueError(f"--specialist-steps must be >= 1, got {steps}")
    extractor = None
    if args.features is not None or args.inception is not None:
        from ..evaluate import make_extractor

        # built now: a missing network file is reported before any model trains
        default = "digits" if cfg.data.source == "digits" else "inception"
        extractor = make_extractor(args.features or default, args.inception, device=None)
    result = run_ntg(
        cfg, intervals, specialist_steps=steps, out_dir=args.out, full=args.full,
        n_samples=args.n_samples, seed=args.seed, batch=args.batch, extractor=extractor,
    )  # fmt: skip
    print(json.dumps({"full": result["full"], "seed_gap": result["seed_gap"],
                      "ntg": {r["label"]: r["ntg"] for r in result["intervals"]},
                      "features": result["features"], "out": args.out}, indent=2))  # fmt: skip
    return 0

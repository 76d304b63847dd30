"""``antdiff plot``: figures of a training run from its logs (paper Figs. 3-4).

antdiff plot --run runs/digits_adm [--out runs/digits_adm/plots]

Writes losses.png (per-cluster losses), weights.png (the method's cluster weights) and, for
gradient methods, conflict.png (PCGrad conflict rates between clusters) and cosine.png.
"""

from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="a run directory written by antdiff train")
    p.add_argument("--out", default=None, help="output directory (default: RUN/plots)")


def run(args: argparse.Namespace) -> int:
    from ..analysis.report import plot_run
    from ..utils import check_output

    if args.out is not None:
        check_output(args.out, "--out", folder=True)
    print(json.dumps(plot_run(args.run, args.out), indent=2))
    return 0

"""``antdiff train``: train a preset or YAML config, with dotted overrides, resumable.

antdiff train --config digits_adm --ant.method pcgrad --train.steps 500
antdiff train --config digits_adm --resume                # newest checkpoint in out_dir
antdiff train --config my.yaml --resume runs/x/checkpoints/ckpt_00001000.pt
torchrun --nproc_per_node 4 -m antdiff train --config digits_adm   # 4 GPUs, global batch
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import logging
import os

from ..config import available_presets, load_config, parse_overrides
from ..logging_utils import _finite_or_none


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        required=True,
        help=f"a preset ({', '.join(available_presets())}) or the path of a YAML file",
    )
    p.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="PATH",
        help="continue from the newest complete checkpoint in train.out_dir, or from PATH "
        "(a checkpoint file or directory)",
    )
    p.add_argument(
        "--allow-config-change",
        action="store_true",
        help="resume even if the config differs in more than train.steps / logging settings "
        "(still fixed: ant.method, ant.k, ant.clustering, ant.sampling, the model, the data's "
        "channels / classes / autoencoder, diffusion.T and learn_sigma, whose state would not "
        "fit, and train.seed, which the data order and RNG streams continue)",
    )
    p.add_argument(
        "--print-config", action="store_true",
        help="print the resolved config (every key, after the preset and overrides) and exit",
    )  # fmt: skip
    p.epilog = (
        "Any config key can be overridden as --section.key VALUE (VALUE parsed as YAML), e.g. "
        "--ant.method nash --train.batch_size 32 --model.overrides.dropout 0.1. Every key and "
        "its value: --print-config; what each means: the comments in antdiff/config.py "
        "(python/antdiff/config.py in the repository)"
    )
    p.allow_abbrev = False
    _collect_overrides(p)


def _collect_overrides(p: argparse.ArgumentParser) -> None:
    """Let this sub-parser keep the unknown --section.key VALUE pairs as ``args.overrides``.

    The top-level parser calls the sub-parser's parse_known_args and rejects what it returns
    unparsed, so the dotted overrides are moved into the namespace here instead.
    """
    original = p.parse_known_args

    def parse_known_args(args=None, namespace=None):  # type: ignore[no-untyped-def]
        ns, extras = original(args, namespace)
        ns.overrides = list(getattr(ns, "overrides", None) or []) + list(extras)
        return ns, []

    p.parse_known_args = parse_known_args  # type: ignore[method-assign]


_OPTIONS = ("--config", "--resume", "--allow-config-change", "--print-config")


def _check_options(args: argparse.Namespace) -> None:
    """Options mistyped as overrides (--allow_config_change, --resum) and options that would
    be ignored get an error naming the fix."""
    from ..config import Config

    top = {f"--{f.name}" for f in dataclasses.fields(Config)}  # --name: a key of its own
    for tok in getattr(args, "overrides", []):
        key = tok.partition("=")[0]
        if tok.startswith("--") and "." not in key and key not in top:
            close = difflib.get_close_matches(key.replace("_", "-"), _OPTIONS, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ValueError(
                f"unknown option {key}{hint}: the options are {', '.join(_OPTIONS)}; config "
                "keys are set as --section.key VALUE"
            )
    parse_overrides(getattr(args, "overrides", []), once=True)  # a key twice: which one?
    if args.allow_config_change and args.resume is None:
        raise ValueError("--allow-config-change applies when resuming: add --resume")


def run(args: argparse.Namespace) -> int:
    from ..config import dump_config
    from ..train import train

    _check_options(args)
    cfg = load_config(args.config, getattr(args, "overrides", []))
    if args.print_config:
        print(dump_config(cfg), end="")
        return 0
    quiet = os.environ.get("RANK", "0") != "0"  # under torchrun rank 0 alone reports
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s")
    if cfg.train.ckpt_every == 0 and not quiet:  # read as "at the end only", as sample_every's 0
        logging.getLogger("antdiff.train").warning(
            "train.ckpt_every=0: no checkpoint will be written, not even at the end, so the "
            "trained weights are lost when the run ends (and it cannot be resumed); set "
            "--train.ckpt_every N to save every N steps and at the last one"
        )
    summary = train(cfg, resume=args.resume, allow_config_change=args.allow_config_change)
    run_ = summary.pop("run", None)
    if run_ is not None and run_.dist is not None and not run_.dist.is_main:
        return 0
    stats = summary.pop("stats", {})
    summary["cluster_weights"] = stats.get("weight")
    # strict JSON: a non-finite loss (a diverged run) is null, not NaN
    print(json.dumps(_finite_or_none(summary), indent=2, default=str, allow_nan=False))
    return 0

"""The ``antdiff`` command line: one sub-command per module in this package."""

from __future__ import annotations

import argparse
import importlib
import re
import signal
import sys
import threading

# sub-command -> module (each module defines add_arguments(parser) and run(args) -> int)
COMMANDS = {
    "cluster": ("antdiff.cli.cluster", "cluster the T timesteps into k intervals (exact DP)"),
    "affinity": ("antdiff.cli.affinity", "task affinity of timestep bins from checkpoints"),
    "train": ("antdiff.cli.train", "train a diffusion model with ANT (presets, --a.b overrides)"),
    "encode": ("antdiff.cli.encode", "an image folder -> latents of a local diffusers VAE (.pt)"),
    "sample": ("antdiff.cli.sample", "draw samples from a checkpoint (EMA) -> PNG grid + .npy"),
    "eval": ("antdiff.cli.eval", "FID / precision / recall / IS of a checkpoint's samples"),
    "ntg": ("antdiff.cli.ntg", "negative transfer gap per timestep interval -> JSON + PNG"),
    "plot": ("antdiff.cli.plot", "figures of a run's logs: cluster losses, weights, conflicts"),
    "demo": ("antdiff.demo", "ANT vs vanilla on digits in a few CPU minutes -> demo_out/"),
    "info": ("antdiff.info", "versions, the C++ extension, Triton / CUDA, ANT_* settings"),
}


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Each option's help ends with its default, "(default: 5)", as argparse's
    ArgumentDefaultsHelpFormatter writes it, except where there is nothing to show (no default:
    None; a flag's False / True) or the help already says it ("default: the run's own")."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        d = action.default
        if (
            not action.option_strings
            or d is None
            or d is argparse.SUPPRESS
            or isinstance(d, bool)
            or "%(default)" in text
            or re.search(r"\bdefault[:\s)]", text)
        ):
            return text
        return f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="antdiff",
        description="ANT for diffusion training: clustering, training, evaluation, analyses.",
    )
    parser.add_argument("--version", action="version", version=f"antdiff {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(
            name, help=help_text, description=help_text, formatter_class=DefaultsHelpFormatter
        )
        importlib.import_module(module).add_arguments(p)
        for action in p._actions:  # an option without help still shows its default
            d = action.default
            if action.help is None and action.option_strings and d is not None \
                    and not isinstance(d, bool):  # fmt: skip
                action.help = "(default: %(default)s)"
    return parser


def _interrupt(signum: int, frame: object) -> None:  # noqa: ARG001
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    module = importlib.import_module(COMMANDS[args.command][0])
    from ..utils import TrainingDiverged

    previous = None
    if args.command == "train" and threading.current_thread() is threading.main_thread():
        # a scheduler's SIGTERM stops a run like Ctrl-C: a message, not a silent exit 143
        previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return int(module.run(args) or 0)
    except (ValueError, OSError, ImportError) as exc:  # OSError: paths; ImportError: an extra
        print(f"antdiff {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except TrainingDiverged as exc:
        print(f"antdiff {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a training run keeps its last complete checkpoint
        hint = (": its last complete checkpoint is kept; continue with the same command and "
                "--resume" if args.command == "train" else "")  # fmt: skip
        print(f"antdiff {args.command}: interrupted{hint}", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())

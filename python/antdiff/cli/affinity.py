"""``antdiff affinity``: task affinity of timestep bins from checkpoints, saved and plotted.

    antdiff affinity run/ckpt_10000.pt run/ckpt_20000.pt --bins 50 --n-samples 512 \
        --out affinity.npz
    antdiff cluster --objective gradient --affinity affinity.npz --k 5

Writes ``--out`` (.npz with affinity, bin_edges, n_samples, checkpoints; or .npy plus
``<stem>_edges.npy``) and, unless ``--no-plot``, ``<stem>_timestep.png`` and
``<stem>_logsnr.png``. Without ``--out`` it writes ``affinity.npz`` and refuses to replace one
that exists (an earlier pass, minutes to hours of work) unless ``--force``; a file named with
``--out`` is written as named, replacing it. The diffusion (schedule, T, prediction, ...)
comes from the first checkpoint's config when it has one, else from ``--schedule`` / ``--T``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from ..analysis import load_affinity_checkpoint, plot_affinity_figures, task_affinity
from ..diffusion import GaussianDiffusion
from ..schedules import make_schedule
from ..utils import check_device, check_output, load_npy

_DIFFUSION_KEYS = (
    "prediction",
    "learn_sigma",
    "loss_weighting",
    "p2_gamma",
    "p2_k",
    "min_snr_gamma",
)


DEFAULT_OUT = Path("affinity.npz")  # --out when none is given: never silently replaced


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "checkpoints", nargs="+", type=Path, help="checkpoint files (or run dirs) of ONE model"
    )
    p.add_argument(
        "--data",
        default=None,
        help="'digits' (sklearn 8x8, in [-1, 1]) or a .npy / .pt file of x0 [N, C, H, W] "
        "(floats as trained on, or uint8 pixels; a .pt may hold {'x': x0, 'y': labels}); "
        "default: the trainer checkpoint's data set, else digits",
    )
    p.add_argument("--image-size", type=int, default=None, help="resize digits to this size")
    p.add_argument(
        "--bins", type=int, default=None,
        help="number of near-equal timestep bins (default: min(50, T))",
    )  # fmt: skip
    p.add_argument(
        "--bin-edges", type=Path, default=None, help=".npy of [nb + 1] edges (overrides --bins)"
    )
    p.add_argument("--n-samples", type=int, default=512, help="data points per bin")
    p.add_argument("--batch-size", type=int, default=128, help="samples per forward/backward")
    p.add_argument(
        "--block-rows", type=int, default=None,
        help="rows of J in memory (>= 2; default: as many as --max-bytes allows)",
    )  # fmt: skip
    p.add_argument(
        "--max-bytes", type=int, default=None,
        help="memory budget for J in bytes (default: half the free device memory; on the "
        "CPU, of the available RAM)",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="fixes the data points, t and noise")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if any)")
    p.add_argument(
        "--schedule",
        default=None,
        help="linear | scaled_linear | cosine (checkpoints without one; else the same)",
    )
    p.add_argument(
        "--T", type=int, default=None, help="timesteps (checkpoints without one; else must match)"
    )
    p.add_argument(
        "--out", type=Path, default=None,
        help=f".npz or .npy (default: {DEFAULT_OUT}, which is never replaced: an existing one is "
        "an error unless --force; a file named with --out is replaced)",
    )  # fmt: skip
    p.add_argument(
        "--force", action="store_true", help=f"replace an existing {DEFAULT_OUT} (no --out)"
    )
    p.add_argument("--no-plot", action="store_true", help="skip the two PNG heat maps")


class CheckpointLoader:
    """``loader(path, device) -> (model, config)`` for ``antdiff train`` checkpoints (a file or a
    run directory: its newest complete checkpoint; the raw, non-EMA weights) and for the minimal
    format ``{"model": state_dict, "config": {"model": {"name", "overrides"}}}``.

    A trainer checkpoint's model shape depends on its data, so the data set of its config is
    loaded (once per config) and kept in ``self.data`` for the affinity pass.
    """

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}

    def __call__(self, path: Any, device: Any) -> tuple[torch.nn.Module, dict[str, Any]]:
        from ..checkpoint import (
            FORMAT,
            is_latest_pointer,
            is_torch_file,
            load_checkpoint,
            model_from_state,
        )
        from ..config import config_from_saved

        p = Path(path)
        if p.is_file() and not is_latest_pointer(p):  # "latest": its folder's newest, below
            if not is_torch_file(p):
                raise ValueError(f"{str(p)!r} is not a torch checkpoint (give checkpoint files "
                                 "or run folders of one model)")  # fmt: skip
            try:
                raw = torch.load(p, map_location="cpu", weights_only=True)
            except Exception as exc:  # noqa: BLE001 (truncated zip, bad pickle, ...: named below)
                first = (str(exc).splitlines() or [type(exc).__name__])[0]
                raise ValueError(
                    f"{str(p)!r} cannot be read ({first}): the file is corrupted or truncated; "
                    "give another checkpoint, or the run folder to take its newest complete one"
                ) from None
            if not (isinstance(raw, dict) and raw.get("format") == FORMAT):
                return load_affinity_checkpoint(p, device)
        state, _ = load_checkpoint(p, "cpu")
        data = self.dataset(config_from_saved(state["config"]), state)
        model, _, _ = model_from_state(state, data)
        return model.to(device or "cpu"), state["config"]

    def dataset(self, cfg: Any, state: dict[str, Any]) -> Any:
        from ..data import load_dataset

        key = json.dumps(state["config"].get("data"), sort_keys=True)
        if key not in self.data:
            self.data[key] = load_dataset(cfg.data, cfg.train.seed, 0, state.get("codec"))
        return self.data[key]


def _schedule_name(cfg: dict[str, Any], args: argparse.Namespace) -> str:
    """The schedule the affinity uses: --schedule, else the checkpoint's, else linear."""
    return args.schedule or (cfg.get("diffusion") or {}).get("schedule", "linear")


def _diffusion(cfg: dict[str, Any], args: argparse.Namespace) -> GaussianDiffusion:
    dcfg = dict(cfg.get("diffusion") or {})
    for flag, key in (("--schedule", "schedule"), ("--T", "T")):
        given = getattr(args, key)
        if given is not None and key in dcfg and given != dcfg[key]:
            raise ValueError(
                f"{flag} {given}: the checkpoint was trained with {key} = {dcfg[key]}, which "
                f"the affinity uses; drop {flag}"
            )
    name = _schedule_name(cfg, args)
    T = args.T if args.T is not None else dcfg.get("T", 1000)  # noqa: N806 (--T 0: an error)
    kwargs = {k: dcfg[k] for k in _DIFFUSION_KEYS if k in dcfg}
    return GaussianDiffusion(make_schedule(name, T), **kwargs)


def _data(args: argparse.Namespace, load: CheckpointLoader) -> tuple[torch.Tensor, Any]:
    """x0 [N, C, H, W] and labels [N] (or None): --data, else the trainer checkpoint's data."""
    if args.data is None and load.data:
        ds = next(iter(load.data.values()))
        x = ds.x  # as stored (uint8 pixels: only the rows the pass uses become float32)
        if args.image_size is not None and args.image_size != x.shape[-1]:
            raise ValueError(
                f"--image-size {args.image_size}: the checkpoint's own data keeps the size it "
                f"trained at ({x.shape[-1]}); drop --image-size (or pass --data digits)"
            )
        return x, ds.y
    if args.data in (None, "digits"):
        from ..data import load_digits_tensor

        return load_digits_tensor(args.image_size)
    path = Path(args.data)
    if not path.is_file():
        raise FileNotFoundError(f"--data {path} does not exist (use 'digits' or a .npy/.pt file)")
    from ..evaluate import load_image_file
    from ..metrics.features import image_floats

    x, y = load_image_file(path, "--data")
    if not (x.is_floating_point() or x.dtype == torch.uint8):
        raise ValueError(f"--data {path}: x0 must be floats (or uint8 pixels), got {x.dtype}")
    # 8-bit pixels stay as stored (the pass scales the rows it uses to [-1, 1], as it does for
    # the checkpoint's data: a whole uint8 file as float32 is four times its size in memory)
    x = x if x.dtype == torch.uint8 else image_floats(x)
    return x, None if y is None else y.long()


def _labels(model: Any, y: torch.Tensor | None, n: int) -> dict[str, torch.Tensor]:
    """The model's class inputs: the data's labels, else its null class when trained."""
    num_classes = getattr(model, "num_classes", None)
    if not num_classes:
        return {}
    untrained_null = getattr(model, "class_dropout_prob", None) == 0
    if y is not None:
        top = num_classes - 1 if untrained_null else num_classes  # the null class if trained
        if len(y) and not 0 <= int(y.min()) <= int(y.max()) <= top:
            raise ValueError(
                f"--data labels must be class indices in [0, {top}] for this model "
                f"({num_classes} classes{'' if untrained_null else ' + its null class'}); got "
                f"{int(y.min())} .. {int(y.max())}"
            )
        return {"y": y}
    if untrained_null:
        raise ValueError(
            "the model is class-conditional and --data gave no labels, but its null class was "
            "never trained (class_dropout_prob 0): give a .pt holding {'x': images, 'y': "
            "labels}, or leave --data out to use the checkpoint's data set"
        )
    return {"y": torch.full((n,), num_classes, dtype=torch.long)}  # unconditional branch


def _output(args: argparse.Namespace) -> Path:
    """--out, or the default affinity.npz when it is free (or --force): an earlier pass's file
    is not replaced by a run that never named it."""
    if args.out is not None:
        return args.out
    if DEFAULT_OUT.exists() and not args.force:
        raise ValueError(
            f"{str(DEFAULT_OUT)!r} already exists (an earlier affinity pass?) and the default "
            "--out is never replaced: name another file with --out FILE.npz, or pass --force "
            f"(or --out {DEFAULT_OUT}) to replace it"
        )
    return DEFAULT_OUT


def run(args: argparse.Namespace) -> int:
    if args.device is not None:  # an unknown or absent device: its message, before any work
        check_device(args.device, "--device")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.out = _output(args)
    if args.out.suffix not in (".npz", ".npy"):  # before the pass, not after it
        raise ValueError(f"--out must end in .npz or .npy, got {str(args.out)!r}")
    check_output(args.out, "--out", folder=False)
    load = CheckpointLoader()
    model, cfg = load(args.checkpoints[0], device)
    diffusion = _diffusion(cfg, args)
    x, y = _data(args, load)
    kwargs = _labels(model, y, len(x))
    edges = None if args.bin_edges is None else load_npy(args.bin_edges, "bin edges [nb + 1]")
    del model
    start = time.perf_counter()
    result = task_affinity(
        [str(c) for c in args.checkpoints],
        diffusion,
        x,
        bins=None if edges is not None else args.bins,
        bin_edges=edges,
        n_samples=args.n_samples,
        batch_size=args.batch_size,
        block_rows=args.block_rows,
        max_bytes=args.max_bytes,
        seed=args.seed,
        device=device,
        model_kwargs=kwargs,
        loader=load,
    )
    seconds = time.perf_counter() - start
    result.meta["seconds"] = round(seconds, 3)
    out = result.save(args.out)
    print(
        f"affinity [{result.nb}, {result.nb}] over {result.n_checkpoints} checkpoint(s), "
        f"{result.n_samples} samples/bin, {seconds:.1f} s; wrote {out}"
    )
    if not args.no_plot:
        for p in plot_affinity_figures(result, diffusion.schedule, args.out.with_suffix("")):
            print(f"wrote {p}")
    k = min(5, result.nb)  # cluster's default k = 5 needs 5 bins
    few = f" --k {k}" if k < 5 else ""
    print(
        f"next: antdiff cluster --objective gradient --affinity {out} --T {diffusion.T} "
        f"--schedule {_schedule_name(cfg, args)}{few}{_limits_hint(result, diffusion, k)}"
    )
    return 0


def _limits_hint(result: Any, diffusion: Any, k: int) -> str:
    """" --min-size none --max-size none" where no split on the bin edges meets the default
    size limits [T / 2k, 2T / k] (uneven bins), else "": the suggested command then runs."""
    from ..clustering import cluster_timesteps

    try:
        cluster_timesteps(diffusion.schedule, k, "gradient", affinity=result.affinity,
                          bin_edges=result.bin_edges)  # fmt: skip
    except ValueError:
        return " --min-size none --max-size none"
    return ""

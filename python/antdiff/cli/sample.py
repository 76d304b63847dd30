"""``antdiff sample``: draw images from a trainer checkpoint (EMA weights by default).

    antdiff sample --ckpt runs/digits_adm --num 64 --sampler ddim --steps 50 --out samples/

Writes ``<out>/samples.png`` (a grid of the first ``--grid`` images), ``<out>/samples.npy``
(or ``.pt`` with ``--format pt``: float32 [N, C, H, W] in [-1, 1], undecoded latents in their
own range; a .pt also holds the labels),
``<out>/labels.npy`` for class-conditional models and ``<out>/sample.json`` (the settings). Every
file is written atomically; samples and labels an earlier run left in ``<out>`` (as its
sample.json lists them) that this run does not rewrite are removed, and named. Latent runs are
decoded through the run's codec; a run on a latent file is decoded through ``--vae DIR`` (the
local diffusers VAE folder that encoded the file), and without it writes the sampled latents
unclipped, and sample.json says "space": "latent" with the run's latent_scale and latent_shift
(decode x / latent_scale + latent_shift with the autoencoder that made the latents; samples.png
shows their first channels rescaled).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..utils import check_device

OUTPUTS = {"samples.png", "samples.npy", "labels.npy", "samples.pt"}  # what a run may write


def _earlier_outputs(out: Path) -> set[str]:
    """The files an earlier ``antdiff sample`` into ``out`` wrote, from its sample.json; empty
    without one. A sample.json from before it listed every file (no "spacing" key) left
    labels.npy out of its list: a labels.npy beside one of those is taken as that run's."""
    try:
        meta = json.loads((out / "sample.json").read_text())
        files = set(meta["files"]) if isinstance(meta.get("files"), list) else set()
        if "spacing" not in meta:
            files.add("labels.npy")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return set()
    return files & OUTPUTS


def _cfg_channels(text: str) -> int | str | None:
    """--cfg-channels: 'all' (None), 'run' (the run's own) or a positive int."""
    if text in ("all", "run"):
        return None if text == "all" else text
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be 'all', 'run' or an int >= 1, got {text!r}")
    return n


def add_common(p: argparse.ArgumentParser) -> None:
    """Arguments shared by ``antdiff sample`` and ``antdiff eval``."""
    p.add_argument("--ckpt", type=Path, required=True, help="checkpoint file or run directory")
    p.add_argument("--num", type=int, required=True, help="number of samples (>= 1)")
    p.add_argument("--sampler", default=None, choices=("ddim", "ddpm"),
                   help="default: the run's own, sample.sampler (a paper preset's protocol)")
    p.add_argument("--steps", type=int, default=None,
                   help="sampling steps (default: the run's own, sample.steps)")
    p.add_argument(
        "--spacing",
        default="linspace",
        choices=("linspace", "leading", "trailing"),
        help="which timesteps the steps visit (leading: 0, T//N, ...; ddimN when N divides T)",
    )
    p.add_argument("--eta", type=float, default=0.0, help="DDIM stochasticity in [0, 1]")
    p.add_argument(
        "--cfg-scale",
        type=float,
        default=None,
        help="classifier-free guidance (default: the run's own, sample.cfg_scale)",
    )
    p.add_argument(
        "--cfg-channels",
        type=_cfg_channels,
        default="run",
        help="guide the first N mean channels only, or 'all' (default 'run': the run's own, "
        "sample.cfg_channels; 3 reproduces the DiT code's sampler on 4 latent channels)",
    )
    p.add_argument(
        "--variance",
        default="run",
        choices=("run", "small", "large"),
        help="DDPM's reverse variance for a model without learn_sigma: small (beta_tilde) or "
        "large (beta_t); default 'run': the run's own, sample.variance (small if unset)",
    )
    p.add_argument(
        "--ema",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="EMA weights (default) or the raw ones (--no-ema)",
    )
    p.add_argument("--seed", type=int, default=0,
                   help="noise seed: image i draws from its own stream, seeded from (seed, i), "
                   "so the samples are the same for any --batch-size")
    p.add_argument("--batch-size", type=int, default=500, help="samples per sampling batch")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if any)")
    p.add_argument("--vae", type=Path, default=None,
                   help="a run on a latent file: the local diffusers VAE folder (AutoencoderKL "
                   "or VQModel) that encoded it, to decode the samples to images")


def check_seed_flag(seed: Any) -> None:
    """``--seed`` in torch's range, refused by the flag's name."""
    from ..sampling import check_seed

    try:
        check_seed(seed)
    except ValueError as exc:  # "seed must ...": the flag's name
        raise ValueError(f"--{exc}") from None


def check_settings(args: argparse.Namespace, loaded: Any = None) -> None:
    """--steps, --eta, --sampler and --spacing checked before any work starts (they failed once
    the progress bar had started): what needs no checkpoint before it loads, the rest (steps <=
    the run's T, eta with the run's own sampler) once it has loaded (``loaded``)."""
    from ..sampling import check_settings as check

    check_seed_flag(args.seed)
    if args.num < 1:
        raise ValueError(f"--num must be >= 1, got {args.num}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    T = None if loaded is None else loaded.diffusion.T  # noqa: N806
    check(T, sampler=args.sampler, steps=args.steps, eta=args.eta, spacing=args.spacing)


def pick_device(name: str | None) -> str:
    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    check_device(name, "--device")
    return name


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common(p)
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--format", default="npy", choices=("npy", "pt"), help="samples file type")
    p.add_argument("--grid", type=int, default=100, help="images in the PNG grid (>= 1)")


def run(args: argparse.Namespace) -> int:
    from ..evaluate import NOISE, generate, load_for_sampling, run_settings, variance_used
    from ..logging_utils import image_grid, save_png
    from ..utils import atomic_write, atomic_write_text, check_output

    check_settings(args)  # before the checkpoint loads
    if args.grid < 1:
        raise ValueError(f"--grid must be >= 1 (images in samples.png), got {args.grid}")
    check_output(args.out, "--out", folder=True)  # before the sampling, not after it
    loaded = load_for_sampling(
        args.ckpt, ema=args.ema, device=pick_device(args.device), vae=args.vae
    )
    args.sampler, args.steps, args.cfg_scale, args.cfg_channels = run_settings(
        loaded, args.sampler, args.steps, args.cfg_scale, args.cfg_channels
    )
    check_settings(args, loaded)  # the run's own settings and T: before the progress bar
    x, y = generate(
        loaded,
        args.num,
        sampler=args.sampler,
        steps=args.steps,
        cfg_scale=args.cfg_scale,
        seed=args.seed,
        batch_size=args.batch_size,
        progress=not args.no_progress,
        spacing=args.spacing,
        eta=args.eta,
        cfg_channels=args.cfg_channels,
        variance=args.variance,
    )
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    earlier = _earlier_outputs(out)  # read before this run rewrites sample.json
    # the earlier run's record and files go first: a run stopped while writing leaves some of
    # its own files and no sample.json, never a folder that mixes two runs (only files that
    # sample.json names are removed, never the user's)
    (out / "sample.json").unlink(missing_ok=True)
    for name in earlier:
        (out / name).unlink(missing_ok=True)
    grid = x[: args.grid]
    raw = loaded.latent and loaded.data.codec is None  # undecoded latents
    scale = max(1, 32 // x.shape[-1])
    png = save_png(image_grid(grid, latent=raw), out / "samples.png", scale=scale)
    labels = []
    if args.format == "npy":
        data = atomic_write(out / "samples.npy", lambda f: np.save(f, x.numpy()))
        if y is not None:
            labels.append(atomic_write(out / "labels.npy", lambda f: np.save(f, y.numpy())))
    else:
        blob = {"x": x, "y": y} if y is not None else {"x": x}
        data = atomic_write(out / "samples.pt", lambda f: torch.save(blob, f))
    written = [png, data, *labels]
    stale = sorted(earlier - {f.name for f in written})  # removed above, and not written again
    meta = {
        "ckpt": str(loaded.path),
        "step": loaded.step,
        "weights": "ema" if args.ema else "raw",
        "sampler": args.sampler,
        "steps": args.steps,
        "spacing": args.spacing,
        "eta": args.eta,
        "num": args.num,
        "seed": args.seed,
        "noise": NOISE,
        "cfg_scale": args.cfg_scale,
        "cfg_channels": args.cfg_channels,
        "variance": variance_used(loaded, args.sampler, args.variance),
        "batch_size": args.batch_size,
        "shape": list(x.shape),
        "space": "latent" if raw else "pixel",
        **({"vae": str(args.vae)} if args.vae is not None else {}),
        # the file's latents are (z - shift) * scale: decode(x / scale + shift)
        **({"latent_scale": loaded.cfg.data.latent_scale,
            "latent_shift": loaded.cfg.data.latent_shift} if raw else {}),  # fmt: skip
        "files": [f.name for f in written],
    }
    atomic_write_text(out / "sample.json", json.dumps(meta, indent=2) + "\n")
    print(f"wrote {args.num} samples {list(x.shape)} to {data} and a grid to {png}")
    if stale:
        print(f"removed the earlier run's {', '.join(stale)} from {out}")
    return 0

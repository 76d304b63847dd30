"""``antdiff encode``: an image folder -> a latent file to train on (``data.source latents``).

    antdiff encode --vae sd-vae-ft-ema/ --images ffhq256/ --out ffhq_latents.pt --flip
    antdiff train --config ldm_ffhq256 --data.path ffhq_latents.pt ...

Every image under ``--images`` is read and prepared as the trainer reads an image folder
(``--image-size S``: box-halved, bicubic, centre square, as data.image_size; ``--channels``),
encoded by the local diffusers VAE folder ``--vae`` (an AutoencoderKL: a draw from q(z | x), image
i from its own stream seeded from (--seed, i), so the file is the same for any --batch-size; or its
mode with ``--mode mean``; a VQModel: its encoder's output before quantisation) and normalised as
(z - shift_factor) * scaling_factor with the VAE config's factors: the latents that the presets
read with data.latent_scale 1 and that ``antdiff sample / eval --vae`` decode back. ``--flip``
stores the mirror images' latents after the originals' (the trainer does not flip latents as it
reads them). ``--class-conditional`` labels each image by its sub-folder (sorted names), as
training on the folder does. The .pt file holds ``{"latents": float32 [N, c, h, w], "labels":
int64 [N] (class-conditional), "class_names", "normalised": True, "scaling_factor",
"shift_factor", "vae", "flip", "mode"}`` and is written atomically.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vae", type=Path, required=True,
                   help="local diffusers VAE folder (AutoencoderKL or VQModel, save_pretrained)")
    p.add_argument("--images", type=Path, required=True, help="image folder (read recursively)")
    p.add_argument("--out", type=Path, required=True, help="the latent file to write (.pt)")
    p.add_argument("--image-size", type=int, default=None,
                   help="prepare each image as a centre S x S square, as data.image_size "
                   "(default: the images' own size, which must then be one size)")
    p.add_argument("--channels", type=int, default=None, choices=(1, 3),
                   help="read the images as grey (1) or RGB (3) (default: the VAE's input "
                   "channels)")
    p.add_argument("--class-conditional", action="store_true",
                   help="label each image by its sub-folder (one per class)")
    p.add_argument("--flip", action="store_true",
                   help="also store the latents of every image mirrored left-right")
    p.add_argument("--mode", default="sample", choices=("sample", "mean"),
                   help="an AutoencoderKL's latent: a draw from q(z | x), or its mode")
    p.add_argument("--seed", type=int, default=0, help="the draws' seed (image i: (seed, i))")
    p.add_argument("--batch-size", type=int, default=32, help="images per encoder call")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if any)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    p.add_argument("--force", action="store_true", help="replace an existing --out file")


def _images(args: argparse.Namespace) -> tuple[list[Path], list[int], list[str]]:
    from ..data import MissingLabels, _list_images

    root = args.images
    if not root.is_dir():
        what = "does not exist" if not root.exists() else "is not a folder"
        raise ValueError(f"--images {str(root)!r} {what}: give the folder of images to encode")
    try:
        return _list_images(root, args.class_conditional)
    except MissingLabels as e:
        raise ValueError(
            f"--class-conditional needs one sub-folder per class under {str(root)!r}, and "
            f"images lie directly in it ({e}); move each class into its own folder, or drop "
            "--class-conditional"
        ) from None
    except ValueError as e:  # the trainer's words for the folder: data.path here is --images
        raise ValueError(str(e).replace("data.path", "--images")) from None


def _encode(codec, x: torch.Tensor, first: int, seed: int, sample: bool) -> torch.Tensor:
    """Latents of images ``first`` .. ``first + len(x) - 1`` on the CPU; a draw takes image i's
    noise from its own generator, seeded from (seed, i)."""
    from ..sampling import image_generators

    gens = image_generators(seed, first, len(x), x.device) if sample else None
    return codec.encode(x, sample=sample, generator=gens).cpu()


def _read(p: Path, channels: int, size: int | None) -> np.ndarray:
    """One image as the trainer reads a folder's, its errors in encode's flags."""
    from ..data import _read_image

    try:
        return _read_image(p, channels, size)
    except ValueError as e:  # the trainer's words for the setting: --channels here
        msg = str(e).replace("--data.channels", "--channels")
        raise ValueError(msg.replace("data.channels=", "--channels ")) from None


def _check_size(shape: tuple[int, ...], p: Path, f: int) -> None:
    """Latents the trainer takes: square (the models' inputs), of a size the VAE divides."""
    h, w = shape[1:]
    if h != w:
        raise ValueError(
            f"{str(p)!r} is {h}x{w}: the models take square inputs and latents keep the size "
            "they were encoded at; pass --image-size S to prepare every image as an S x S square"
        )
    if h % f:
        raise ValueError(
            f"images of {h}x{w} pixels: the VAE downsamples by {f}, so their size must be a "
            f"multiple of {f} (else the latents decode to another size); pass --image-size S "
            f"with S a multiple of {f}"
        )


def run(args: argparse.Namespace) -> int:
    from ..data import as_float
    from ..models import DiffusersVAE
    from ..utils import atomic_write, check_output
    from .sample import check_seed_flag, pick_device

    check_seed_flag(args.seed)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.image_size is not None and args.image_size < 1:
        raise ValueError(f"--image-size must be >= 1, got {args.image_size}")
    if args.out.suffix != ".pt":
        raise ValueError(f"--out {str(args.out)!r}: the latent file is a .pt (torch.save)")
    check_output(args.out, "--out", folder=False)
    if args.out.exists() and not args.force:  # hours of encoding: never replaced unasked
        raise ValueError(f"--out {str(args.out)!r} exists; pass --force to replace it")
    files, labels, classes = _images(args)
    device = pick_device(args.device)
    codec = DiffusersVAE.from_local(args.vae, device=device)
    want = int(getattr(codec.vae.config, "in_channels", 3))
    channels = want if args.channels is None else args.channels
    if want != channels:
        raise ValueError(
            f"--vae {args.vae} encodes {want}-channel images, but --channels is {channels}: "
            f"pass --channels {want} (or leave it out)"
        )
    bar = None
    if not args.no_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(files), desc="encode", unit="img", dynamic_ncols=True)
    n_all, shape = len(files), None
    latents = torch.empty(0)  # [n_all (x 2 with --flip), c, h, w], allocated at the first batch
    sample = args.mode == "sample"
    try:
        for start in range(0, n_all, args.batch_size):
            batch = files[start : start + args.batch_size]
            arrays = [_read(p, channels, args.image_size) for p in batch]
            for p, a in zip(batch, arrays):
                if shape is None:
                    shape, first = a.shape, p
                    _check_size(shape, p, codec.downsample)
                elif a.shape != shape:
                    raise ValueError(
                        f"images of different sizes under --images: {str(first)!r} is "
                        f"{shape[1]}x{shape[2]} but {str(p)!r} is {a.shape[1]}x{a.shape[2]}; pass "
                        "--image-size S to prepare every image as an S x S square"
                    )
            x = as_float(torch.from_numpy(np.stack(arrays))).to(device)
            z = _encode(codec, x, start, args.seed, sample)
            if not latents.numel():  # the whole file once: no list of parts to concatenate
                latents = torch.empty((2 if args.flip else 1) * n_all, *z.shape[1:])
            latents[start : start + len(z)] = z
            if args.flip:  # the mirror images draw as images n_all .. 2 n_all - 1
                zf = _encode(codec, x.flip(-1), n_all + start, args.seed, sample)
                latents[n_all + start : n_all + start + len(zf)] = zf
            if bar is not None:
                bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()
    if not bool(torch.isfinite(latents).all()):
        raise ValueError(f"--vae {args.vae} gave NaN/inf latents: check the VAE's weights")
    blob: dict = {
        "latents": latents,
        "normalised": True,  # (z - shift_factor) * scaling_factor: read with latent_scale 1
        "scaling_factor": codec.scale_factor,
        "shift_factor": codec.shift_factor,
        "vae": str(args.vae),
        "flip": bool(args.flip),
        # a VQModel's latent is its encoder's output (no draw): "vq"
        "mode": "vq" if hasattr(codec.vae, "quantize") else args.mode,
    }
    if args.class_conditional:
        y = torch.tensor(labels, dtype=torch.int64)
        blob["labels"] = torch.cat([y, y]) if args.flip else y
        blob["class_names"] = list(classes)
    atomic_write(args.out, lambda f: torch.save(blob, f))
    c = latents.shape[1]
    cond = (f" --data.class_conditional true --data.num_classes {len(classes)}"
            if args.class_conditional else "")  # fmt: skip
    print(
        f"wrote {len(latents)} latents {list(latents.shape[1:])} of {n_all} images"
        f"{' and their mirror images' if args.flip else ''} to {args.out} (normalised with "
        f"scaling_factor {codec.scale_factor:g}, shift_factor {codec.shift_factor:g}). Train on "
        f"them with --data.source latents --data.path {args.out} --data.channels {c}{cond}, "
        f"and decode samples with antdiff sample / eval --vae {args.vae}"
    )
    return 0

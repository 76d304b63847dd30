"""Sampling from trainer checkpoints and scoring the samples: FID, precision and recall.

``load_for_sampling(ckpt)`` rebuilds a run's model (EMA weights by default) with its diffusion
and dataset (which holds the latent codec of a latent run); ``generate(...)`` draws samples in
batches, decoding latents to images; ``evaluate_checkpoint(...)`` scores them against reference
statistics of a data set with a named feature network (the result says which one, because FIDs
from different networks are not comparable).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = [
    "FEATURES",
    "Loaded",
    "evaluate_checkpoint",
    "generate",
    "load_for_sampling",
    "make_extractor",
    "reference_images",
    "score",
]

IS_SPLITS = 10  # the Inception Score's parts, as reported in the literature
FEATURES = ("digits", "inception", "inception-clean", "fid-helper")
# how sampled images draw their noise, recorded with results (a study or comparison should not
# pair FIDs drawn otherwise): image i from its own stream, seeded from (seed, i)
NOISE = "per-image"


@dataclass
class Loaded:
    """A checkpoint made ready to sample: model in eval mode, its diffusion, config and data."""

    model: nn.Module
    diffusion: Any  # GaussianDiffusion
    cfg: Any  # Config
    data: Any  # Dataset: shape, num_classes, codec (latent runs)
    step: int
    path: Path
    ema: bool

    @property
    def latent(self) -> bool:
        return self.cfg.data.source == "latents" or self.data.codec is not None


def load_for_sampling(
    ckpt: str | Path,
    ema: bool = True,
    device: str | torch.device = "cpu",
    vae: str | Path | None = None,
) -> Loaded:
    """Model, diffusion, config and dataset of a trainer checkpoint file or run directory.

    Args:
        ckpt: a ``ckpt_*.pt`` file, or a run / checkpoints directory (its newest complete one).
        ema: load the EMA weights (default) instead of the raw ones.
        device: where the model (and the codec) go.
        vae: for a run on a latent file, the local diffusers VAE folder that made the latents
            (AutoencoderKL or VQModel): the samples are then decoded to images through it,
            from the run's latents as :class:`~antdiff.models.StoredLatentDecoder` maps them.
    """
    from .checkpoint import load_checkpoint, model_from_state
    from .diffusion import GaussianDiffusion
    from .schedules import make_schedule

    state, path = load_checkpoint(ckpt, "cpu")
    model, cfg, data = model_from_state(state, weights="ema" if ema else "model")
    dc = cfg.diffusion
    diffusion = GaussianDiffusion(
        make_schedule(dc.schedule, dc.T), dc.prediction, dc.learn_sigma, dc.loss_weighting
    )
    model = model.to(device).eval().requires_grad_(False)
    if data.codec is not None:
        data = data.to(device)
    if vae is not None:
        data = _with_vae(cfg, data, vae, path, device)
    return Loaded(model, diffusion, cfg, data, int(state["step"]), path, ema)


def _with_vae(cfg: Any, data: Any, vae: str | Path, path: Path, device: Any) -> Any:
    """``data`` with a codec that decodes the run's latents through the VAE at ``vae``."""
    from dataclasses import replace

    from .models import DiffusersVAE, StoredLatentDecoder

    if cfg.data.source != "latents":
        what = ("its own tiny autoencoder decodes its samples" if data.codec is not None
                else "its samples are images")  # fmt: skip
        raise ValueError(
            f"--vae {vae}: {path} trained on data.source {cfg.data.source!r}, not on a latent "
            f"file: {what}. Drop --vae"
        )
    codec = DiffusersVAE.from_local(vae, device=device)
    if codec.latent_channels != data.shape[0]:
        raise ValueError(
            f"--vae {vae} makes {codec.latent_channels}-channel latents, but {path} diffuses "
            f"latents of shape {list(data.shape)}: pass the VAE that encoded its latent file"
        )
    dc = cfg.data
    return replace(data, codec=StoredLatentDecoder(codec, dc.latent_scale, dc.latent_shift))


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        flag = "--" + name.replace("_", "-")  # the sample / eval command's flag of that name
        raise ValueError(f"{name} ({flag}) must be an integer >= {low}, got {value!r}")


def run_settings(
    loaded: Loaded,
    sampler: str | None = None,
    steps: int | None = None,
    cfg_scale: float | None = None,
    cfg_channels: int | None | str = "run",
) -> tuple[str, int, float, int | None]:
    """(sampler, steps, cfg_scale, cfg_channels) with the unset ones (None; "run" for
    cfg_channels, whose None means all channels) taken from the run's own ``sample`` config:
    what its preview grids used, a paper preset's evaluation protocol."""
    sc = loaded.cfg.sample
    return (
        sampler or sc.sampler,
        sc.steps if steps is None else steps,
        sc.cfg_scale if cfg_scale is None else cfg_scale,
        sc.cfg_channels if cfg_channels == "run" else cfg_channels,
    )


def ddpm_variance(loaded: Loaded, sampler: str, variance: str | None = "run") -> str | None:
    """The ``variance`` for :func:`antdiff.sampling.sample`: "run" (default) takes the run's own
    ``sample.variance`` for DDPM (None for DDIM, whose noise eta sets); anything else passes."""
    return loaded.cfg.sample.ddpm_variance(sampler) if variance == "run" else variance


def variance_used(loaded: Loaded, sampler: str, variance: str | None = "run") -> str | None:
    """What a record names as the reverse variance of ``variance`` (as :func:`ddpm_variance`
    takes it): "small" / "large" for DDPM on a fixed-variance model, "learned" for learn_sigma
    models, None for DDIM."""
    from .sampling import variance_name

    return variance_name(loaded.diffusion, sampler, ddpm_variance(loaded, sampler, variance))


def generate(
    loaded: Loaded,
    num: int,
    *,
    sampler: str = "ddim",
    steps: int = 50,
    cfg_scale: float = 1.0,
    seed: int = 0,
    batch_size: int = 500,
    progress: bool = True,
    spacing: str = "linspace",
    eta: float = 0.0,
    on_batch: Callable[[torch.Tensor], None] | None = None,
    cfg_channels: int | None | str = "run",
    variance: str | None = "run",
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Draw ``num`` images from a loaded checkpoint, batch by batch, with a tqdm bar.

    ``on_batch``: called with each batch (float32 on the model's device) instead of
    keeping it: the images are then not returned (None), e.g. to keep only their features
    (50,000 RGB samples at 256 px are 39 GB as float32).

    ``spacing`` picks the ``steps`` timesteps ("linspace"; "leading": 0, T//N, 2 T//N, ...,
    guided-diffusion's "ddimN" when N divides T; "trailing" ends at T - 1); ``eta`` is DDIM's
    stochasticity. ``cfg_channels``: the mean channels that guidance acts on (None: all),
    "run" (default) the run's own ``sample.cfg_channels``. ``variance``: DDPM's reverse variance
    for a fixed-variance model ("small" / "large"; "run", the default: the run's own
    ``sample.variance``).
    Image i's noise comes from its own generator, seeded from (seed, i)
    (:func:`antdiff.sampling.image_generators`): ``seed`` fixes the images whatever the
    ``batch_size`` (up to the float rounding of batched operators).
    Class-conditional models get balanced labels ``i % num_classes``. Latents are sampled
    unclipped and decoded through the run's codec; a run on precomputed latents without one
    returns the latents themselves, unclipped (decode them with the autoencoder that made them).

    Returns:
        (images [num, C, H, W] float32 in [-1, 1] (raw latents: their own range) on the CPU,
        labels [num] int64 or None).
    """
    from .sampling import check_seed, image_generators, sample

    check_seed(seed)
    _check_int("num", num, 1)
    _check_int("batch_size", batch_size, 1)
    _check_int("steps", steps, 1)
    device = next(loaded.model.parameters()).device
    classes = loaded.data.num_classes if loaded.cfg.data.class_conditional else None
    labels = torch.arange(num) % classes if classes else None
    if cfg_scale != 1.0 and labels is None:
        raise ValueError(f"cfg_scale={cfg_scale} needs a class-conditional model; this one is not")
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=num, desc=f"{sampler}-{steps}", unit="img", dynamic_ncols=True)
    out = []
    try:
        for start in range(0, num, batch_size):
            n = min(batch_size, num - start)
            y = None if labels is None else labels[start : start + n].to(device)
            x = sample(
                loaded.model,
                loaded.diffusion,
                (n, *loaded.data.shape),
                sampler=sampler,
                steps=steps,
                eta=eta,
                spacing=spacing,
                y=y,
                cfg_scale=cfg_scale,
                cfg_channels=loaded.cfg.sample.cfg_channels if cfg_channels == "run"
                else cfg_channels,
                variance=ddpm_variance(loaded, sampler, variance),
                generator=image_generators(seed, start, n, device),
                clip_denoised=not loaded.latent,
            )
            if loaded.data.codec is not None:
                with torch.no_grad():
                    x = loaded.data.codec.decode(x)
            if not bool(torch.isfinite(x).all()):  # clamp keeps NaN: say why, not "[nan, nan]"
                raise ValueError(
                    f"{loaded.path}: the samples are not finite (NaN/inf): the model's weights "
                    "diverged or hold NaN. Sample an earlier checkpoint (--ckpt PATH of a "
                    "checkpoint file), and retrain with a lower train.lr"
                )
            x = x.float()
            if loaded.data.codec is not None or not loaded.latent:  # pixels: raw latents are
                x = x.clamp(-1.0, 1.0)  # unbounded (clipped, they decoded to wrong images)
            if on_batch is not None:
                on_batch(x)
            else:
                out.append(x.cpu())
            if bar is not None:
                bar.update(n)
    finally:
        if bar is not None:
            bar.close()
    return (torch.cat(out) if on_batch is None else None), labels


def make_extractor(features: str, inception: str | Path | None = None, device: Any = "cpu"):
    """The feature network named ``features`` ("digits", "inception", "inception-clean",
    "fid-helper").

    ``inception``: path of inception-2015-12-05.pt ("inception": its own TF1 bilinear resize, as
    StyleGAN and clean-fid's "legacy_tensorflow" mode; "inception-clean": clean-fid's default
    "clean" mode, PIL bicubic resize) or default_1.pt ("fid-helper");
    a missing file raises the metrics module's FileNotFoundError, which says where to get it.
    """
    from .metrics import DigitsFeatures, FidHelperInception, InceptionTorchScript

    if features == "digits":
        if inception is not None:  # a given path is used or refused, never dropped silently
            raise ValueError(
                f"an Inception file ({str(inception)!r}) was given with features='digits', "
                "which uses its own network: drop --inception, or pick --features inception, "
                "inception-clean or fid-helper"
            )
        return DigitsFeatures(device=device)
    if features == "inception":
        return InceptionTorchScript(inception, device=device)
    if features == "inception-clean":
        return InceptionTorchScript(inception, device=device, mode="clean")
    if features == "fid-helper":
        return FidHelperInception(inception, device=device)
    raise ValueError(f"features must be one of {list(FEATURES)}, got {features!r}")


def check_reference_range(real: torch.Tensor, name: str, rows: int = 256) -> None:
    """Refuse float reference images that never reach below 0 in their first ``rows``: floats
    in [0, 1] (a common way to save images) would pass the range check as [-1, 1] ones and give
    a large FID with no word; real images in [-1, 1] always have dark pixels near -1."""
    if real.dtype == torch.uint8 or not real.is_floating_point():
        return
    head = torch.as_tensor(real[:rows])
    if not bool(torch.isfinite(head).all()):  # NaN passed the comparison below
        raise ValueError(f"{name}: its first {len(head)} images hold NaN or inf values")
    low = float(head.min())
    if low >= -0.05:
        raise ValueError(
            f"{name}: the lowest value of its first {len(head)} images is {low:.3f}, so they look "
            "like floats in [0, 1]; reference floats must be in [-1, 1] like the samples: save "
            "2 * x - 1 (or uint8 pixels)"
        )


def reference_images(ref: str | Path) -> tuple[str, torch.Tensor]:
    """(label, images [N, C, H, W]) of a known data set name or a .npy / .pt file.

    The images are floats in [-1, 1] or uint8 pixels, left as stored: a .npy file (and a .pt
    saved by torch.save) is memory-mapped, and the feature network and the data hash read it a
    batch at a time, so a reference set larger than memory works.
    """
    from .metrics.reference_stats import DATASETS

    if isinstance(ref, str) and ref in DATASETS:
        return ref, DATASETS[ref]()
    p = Path(ref)
    if not p.is_file() and str(ref) in DATASETS:  # a Path("digits-test") meant the data set
        raise FileNotFoundError(
            f"--ref {str(ref)!r}: no such file; for the known data set pass its name as a str"
        )
    if not p.is_file():
        raise FileNotFoundError(
            f"--ref {str(ref)!r} is neither a known data set {sorted(DATASETS)} nor a file"
        )
    return p.stem, load_image_file(p, "--ref")[0]


def load_image_file(path: str | Path, flag: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(images [N, C, H, W], labels [N] or None) of a .npy array or a .pt tensor / dict with
    "x" (and "y"), left as stored (floats, or uint8 pixels): memory-mapped where the format
    allows, so a set larger than memory is read only where it is used. ``flag`` names the
    source in errors."""
    from .checkpoint import is_torch_file
    from .utils import load_npy

    p, y = Path(path), None
    if p.suffix == ".npy":
        a = load_npy(p, f"{flag}: images [N, C, H, W]", mmap_mode="r")
        if not a.dtype.isnative:  # torch reads native byte order only
            a = a.astype(a.dtype.newbyteorder("="))
        with warnings.catch_warnings():  # read-only map: nothing here writes to it
            warnings.filterwarnings("ignore", "The given NumPy array is not writable")
            x = torch.from_numpy(a)
    elif p.suffix == ".pt":
        if not is_torch_file(p):
            raise ValueError(f"{flag} {str(p)!r} is not a torch.save file (images [N, C, H, W])")
        try:
            x = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # the legacy (non-zip) format cannot be mapped
            x = torch.load(p, map_location="cpu", weights_only=True)
        if isinstance(x, dict):  # e.g. antdiff sample's {"x": samples, "y": labels}
            if "x" not in x:
                raise ValueError(
                    f"{flag} {str(p)!r}: a dict must hold the images under 'x' (and may hold "
                    f"labels under 'y'); got keys {sorted(x)}"
                )
            x, y = x["x"], x.get("y")
    else:
        raise ValueError(f"{flag} file must be .npy or .pt images [N, C, H, W], got {str(p)!r}")
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(
            f"{flag} {str(p)!r} must hold images [N, C, H, W] (or a dict with them under 'x'): "
            f"floats in [-1, 1], or uint8 pixels; got {got}"
        )
    if y is not None and (not isinstance(y, torch.Tensor) or tuple(y.shape) != (len(x),)):
        raise ValueError(f"{flag} {str(p)!r}: labels 'y' must be a tensor [N] = [{len(x)}]")
    return x, y


def _real_features(label: str, images: torch.Tensor, extractor: Any, cache_dir: Path) -> np.ndarray:
    """Features [N, D] of the reference images, cached like the reference statistics."""
    from .metrics.reference_stats import UNREADABLE, cache_path, data_hash
    from .utils import atomic_write

    digest = data_hash(images)
    path = cache_path(label, extractor.name, digest, cache_dir / "features")
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                if str(z["extractor"]) == extractor.name and str(z["data_sha256"]) == digest:
                    return z["features"]
        except UNREADABLE:
            pass  # truncated, corrupt or from an older antdiff: recompute and overwrite
    feats = extractor(images)
    atomic_write(path, lambda f: np.savez(
        f, features=feats, extractor=np.str_(extractor.name), data_sha256=np.str_(digest)
    ))  # fmt: skip
    return feats


def score(
    fake: torch.Tensor | None,
    extractor: Any,
    ref: str | Path = "digits",
    *,
    k: int = 3,
    cache_dir: str | Path | None = None,
    fake_features: np.ndarray | None = None,
) -> dict[str, Any]:
    """FID (against cached reference statistics) and precision / recall (k-NN, ``k``), and,
    for the Inception network's features, the samples' Inception Score (``inception_score``
    and ``inception_score_std`` over ``inception_score_splits`` = 10 parts) from the same pass.

    Args:
        fake: images [N, C, H, W] in [-1, 1] (None with ``fake_features``).
        fake_features: ``extractor(fake)`` [N, dim], if the caller already has it.
    """
    from .metrics import fid_vs_reference, precision_recall, reference_stats
    from .metrics.features import default_cache_dir

    root = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "reference_stats"
    label, real = reference_images(ref)
    check_reference_range(real, f"ref {ref}")
    if fake is not None and tuple(fake.shape[1:]) != tuple(real.shape[1:]):
        raise ValueError(
            f"fake images of shape {list(fake.shape[1:])} against references of shape "
            f"{list(real.shape[1:])} (ref {ref}): features of different sizes do not compare; "
            "score samples of the references' size"
        )
    stats = reference_stats(real, extractor, root, label=label)
    if fake_features is None:  # one pass of the network for FID and precision / recall
        fake_features = extractor(fake)
    fake_f = fake_features
    out = fid_vs_reference(fake, stats, extractor, fake_features=fake_f)
    pr = precision_recall(  # on the network's device: 50k x 50k distances are slow on a CPU
        _real_features(label, real, extractor, root), fake_f, k=k, features=extractor.name,
        device=extractor.device,
    )
    out.update(precision=pr["precision"], recall=pr["recall"], k=k, reference=label)
    if getattr(extractor, "has_classifier", False) and len(fake_f) >= IS_SPLITS:
        from .metrics import inception_score

        mean, std = inception_score(extractor.class_probabilities(fake_f), IS_SPLITS)
        out.update(inception_score=mean, inception_score_std=std, inception_score_splits=IS_SPLITS)
    return out


def evaluate_checkpoint(
    ckpt: str | Path,
    num: int,
    *,
    sampler: str | None = None,
    steps: int | None = None,
    cfg_scale: float | None = None,
    seed: int = 0,
    ema: bool = True,
    features: str = "digits",
    inception: str | Path | None = None,
    ref: str | Path = "digits",
    k: int = 3,
    batch_size: int = 500,
    progress: bool = True,
    cache_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
    spacing: str = "linspace",
    eta: float = 0.0,
    cfg_channels: int | None | str = "run",
    variance: str | None = "run",
    vae: str | Path | None = None,
) -> dict[str, Any]:
    """Sample ``num`` images from ``ckpt`` and score them; a JSON-able dict of results + settings.

    The feature network is built (and its file found) before any sampling, so a missing
    Inception file fails fast, and so does ``num`` below the feature dimension + 1 (the metrics
    module's ValueError, which says how many samples are needed).

    Args:
        ckpt: checkpoint file or run directory.
        num: samples to draw (>= dim + 1 of the features: 65 digits, 2049 Inception).
        sampler, steps, cfg_scale: None takes the run's own (sample.sampler, sample.steps,
            sample.cfg_scale: a paper preset's evaluation protocol); cfg_channels: "run" takes
            its sample.cfg_channels (the mean channels guidance acts on; None: all);
            variance: DDPM's "small" / "large" reverse variance, "run" the run's own.
        features: "digits", "inception", "inception-clean" or "fid-helper" (see
            :func:`make_extractor`).
        ref: "digits" or a .npy / .pt file of reference images [N, C, H, W]: floats in [-1, 1]
            or uint8 pixels (channels first).
        k: neighbours for precision / recall.
        cache_dir: reference statistics / features cache (default ~/.cache/antdiff/...).
        device: where the model, the codec and the feature network run.
        vae: for a run on a latent file, the local diffusers VAE folder that decodes its
            samples (see :func:`load_for_sampling`).
    """
    from .metrics.fid import check_enough_samples
    from .sampling import check_seed

    check_seed(seed)
    _check_int("num", num, 1)
    _check_int("k", k, 1)
    extractor = make_extractor(features, inception, device)
    # the metrics' own checks, before minutes of sampling rather than after
    check_enough_samples(num, extractor.dim, f"--num {num}", False, api=False)
    from .metrics.features import check_images

    _, real = reference_images(ref)
    check_enough_samples(len(real), extractor.dim, f"--ref {ref}", False, api=False)
    for name, n in ((f"--num {num}", num), (f"--ref {ref}", len(real))):
        if k >= n:  # precision / recall
            raise ValueError(f"--k {k} neighbours need at least {k + 1} samples; got {name}")
    # the format the feature network takes, checked now rather than after the sampling
    how = ("Reference images are [N, C, H, W] floats in [-1, 1], as the samples are, or uint8 "
           "pixels")  # fmt: skip
    shape, chans = tuple(real.shape), extractor.channels
    if len(shape) != 4 or shape[0] == 0 or shape[1] not in chans:
        last = len(shape) == 4 and shape[3] in chans and shape[1] not in chans
        raise ValueError(
            f"--ref {ref} holds an array of shape {shape}: images must be [N, C, H, W] with "
            f"N >= 1 and C in {chans}."
            + (" It looks channels-last ([N, H, W, C]): transpose it to [N, C, H, W] "
               "(np.transpose(x, (0, 3, 1, 2)))." if last else "")  # fmt: skip
            + f" {how}"
        )
    try:
        check_images(real[:2], chans)
    except ValueError as e:
        raise ValueError(f"--ref {ref}: {e}. {how}") from e
    check_reference_range(real, f"--ref {ref}")
    ref_shape = tuple(real.shape[1:])
    del real
    loaded = load_for_sampling(ckpt, ema=ema, device=device, vae=vae)
    if loaded.latent and loaded.data.codec is None:
        raise ValueError(
            f"{ckpt} diffuses precomputed latents {list(loaded.data.shape)}, and eval scores "
            "images: pass --vae DIR (vae=), the local diffusers VAE folder that encoded them"
        )
    made = tuple(loaded.data.shape)
    if loaded.data.codec is not None:  # a latent run scores decoded images: of what shape
        z = torch.zeros(1, *made, device=loaded.data.x.device)
        with torch.no_grad():
            made = tuple(loaded.data.codec.decode(z).shape[1:])
    if made[0] not in extractor.channels:
        raise ValueError(
            f"{ckpt} makes {made[0]}-channel images; {extractor.name} takes "
            f"{extractor.channels} channels"
        )
    if ref_shape != made:
        size, digits = loaded.cfg.data.image_size, loaded.cfg.data.source == "digits"
        hint = (f", e.g. antdiff.data.load_digits_tensor({size})[0] for digits resized as in "
                "training" if size and digits else "")  # fmt: skip
        raise ValueError(
            f"--ref {ref} holds images of shape {list(ref_shape)}, {ckpt} makes {list(made)}: "
            "features of different sizes do not compare (the network resizes both, and a "
            "resize does not undo the other's blur); pass --ref FILE with reference images of "
            f"shape {list(made)}{hint}, saved with torch.save or np.save"
        )
    t0 = time.perf_counter()
    feats: list[np.ndarray] = []  # the samples' features, batch by batch: not the images
    t_feat = [0.0]  # seconds of it inside the sampling loop: reported with the metrics

    def keep_features(x: torch.Tensor) -> None:
        start = time.perf_counter()
        feats.append(extractor(x))
        t_feat[0] += time.perf_counter() - start

    sampler, steps, cfg_scale, cfg_channels = run_settings(
        loaded, sampler, steps, cfg_scale, cfg_channels
    )
    from .sampling import check_settings, check_variance

    # steps <= the run's T, eta and variance with its sampler: refused here, not after the
    # progress bar starts
    check_settings(loaded.diffusion.T, sampler=sampler, steps=steps, eta=eta, spacing=spacing)
    check_variance(loaded.diffusion, sampler, ddpm_variance(loaded, sampler, variance))
    generate(
        loaded,
        num,
        sampler=sampler,
        steps=steps,
        cfg_scale=cfg_scale,
        seed=seed,
        batch_size=batch_size,
        progress=progress,
        spacing=spacing,
        eta=eta,
        on_batch=keep_features,
        cfg_channels=cfg_channels,
        variance=variance,
    )
    t1 = time.perf_counter()
    metrics = score(None, extractor, ref, k=k, cache_dir=cache_dir,
                    fake_features=np.concatenate(feats))  # fmt: skip
    cfg = loaded.cfg
    return {
        **metrics,
        "features_key": features,
        "ckpt": str(loaded.path),
        "step": loaded.step,
        "weights": "ema" if ema else "raw",
        "sampler": sampler,
        "steps": steps,
        "spacing": spacing,
        "eta": eta,
        "num": num,
        "seed": seed,
        "noise": NOISE,
        "cfg_scale": cfg_scale,
        "cfg_channels": cfg_channels,
        "variance": variance_used(loaded, sampler, variance),
        "batch_size": batch_size,
        **({"vae": str(vae)} if vae is not None else {}),
        "model": cfg.model.name,
        "method": cfg.ant.method,
        "clustering": cfg.ant.clustering,
        "k_clusters": cfg.ant.k,
        "train_seed": cfg.train.seed,
        "seconds_sampling": round(t1 - t0 - t_feat[0], 3),
        "seconds_metrics": round(time.perf_counter() - t1 + t_feat[0], 3),
    }

"""Latent codecs for latent diffusion: a trainable tiny autoencoder, a local diffusers VAE, and
latents precomputed to a file.

Every codec follows :class:`LatentCodec`: ``encode(x) -> z`` returns latents normalised as
``(raw - shift_factor) * scale_factor`` (so they have roughly zero mean and unit variance, the
scale diffusion expects; shift_factor is 0 for SD-style VAEs, nonzero for SD3 / FLUX ones) and
``decode(z)`` undoes that normalisation before decoding.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

__all__ = [
    "DiffusersVAE",
    "LatentCodec",
    "PrecomputedLatents",
    "StoredLatentDecoder",
    "TinyAutoencoder",
    "train_autoencoder",
]


class LatentCodec:
    """Interface: encode(x [B, C, H, W]) -> z [B, c, h, w]; decode(z) -> x; latent_shape."""

    scale_factor: float = 1.0
    shift_factor: float = 0.0

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def latent_shape(self, image_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Latent shape for an image shape (C, H, W) or (B, C, H, W); same rank returned."""
        raise NotImplementedError


def _split_shape(image_shape: tuple[int, ...]) -> tuple[tuple[int, ...], int, int, int]:
    if len(image_shape) not in (3, 4):
        raise ValueError(f"image_shape must be (C, H, W) or (B, C, H, W), got {image_shape}")
    *lead, c, h, w = image_shape
    return tuple(lead), c, h, w


class TinyAutoencoder(nn.Module, LatentCodec):
    """Small conv autoencoder with a 2^n_down spatial reduction (8x8 digits -> 4x4x4 by default).

    Args:
        in_channels: image channels.
        latent_channels: c of the latent.
        hidden: conv width.
        n_down: number of stride-2 stages.
    """

    def __init__(
        self, in_channels: int = 1, latent_channels: int = 4, hidden: int = 32, n_down: int = 1
    ) -> None:
        super().__init__()
        self.in_channels, self.latent_channels, self.n_down = in_channels, latent_channels, n_down
        enc: list[nn.Module] = [nn.Conv2d(in_channels, hidden, 3, padding=1), nn.SiLU()]
        dec: list[nn.Module] = [nn.Conv2d(latent_channels, hidden, 3, padding=1), nn.SiLU()]
        for _ in range(n_down):
            enc += [nn.Conv2d(hidden, hidden, 3, stride=2, padding=1), nn.SiLU()]
            dec += [
                nn.Upsample(scale_factor=2, mode="nearest"),
                nn.Conv2d(hidden, hidden, 3, padding=1),
                nn.SiLU(),
            ]
        self.encoder = nn.Sequential(*enc, nn.Conv2d(hidden, latent_channels, 3, padding=1))
        self.decoder = nn.Sequential(*dec, nn.Conv2d(hidden, in_channels, 3, padding=1))
        self.register_buffer("_scale", torch.ones(()))

    @property
    def scale_factor(self) -> float:  # type: ignore[override]
        return float(self._scale)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        self.latent_shape(x.shape)  # an odd size would decode to another size
        return self.encoder(x) * self._scale

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z / self._scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction without latent scaling. x: [B, C, H, W] -> [B, C, H, W]."""
        self.latent_shape(x.shape)
        return self.decoder(self.encoder(x))

    def latent_shape(self, image_shape: tuple[int, ...]) -> tuple[int, ...]:
        lead, _, h, w = _split_shape(tuple(image_shape))
        f = 2**self.n_down
        if h % f or w % f:
            raise ValueError(f"image H, W = {h}, {w} must be divisible by {f}")
        return (*lead, self.latent_channels, h // f, w // f)


_STD_CHUNK = 512  # images per encoder call when train_autoencoder measures the latents' std


def train_autoencoder(
    data: Any,
    steps: int = 300,
    batch_size: int = 64,
    lr: float = 2e-3,
    model: TinyAutoencoder | None = None,
    seed: int = 0,
    **model_kwargs: Any,
) -> tuple[TinyAutoencoder, torch.Tensor]:
    """Train a TinyAutoencoder by MSE on `data` (in [-1, 1]); set its scale_factor.

    Args:
        data: a [N, C, H, W] float tensor, or an ``antdiff.data.Dataset``, whose rows are
            scaled to float batch by batch (its uint8 pixels are never copied whole).

    Returns:
        (model in eval mode, losses [steps] float32 on CPU). scale_factor = 1 / std of the
        unscaled latents of `data`, as in latent diffusion.
    """
    if isinstance(data, torch.Tensor):
        x_all = data
        get = lambda idx: data[idx.to(data.device)]  # noqa: E731
    else:  # a Dataset: float rows on demand
        x_all, get = data.x, data.rows
    if x_all.ndim != 4:
        raise ValueError(f"data must be [N, C, H, W], got shape {tuple(x_all.shape)}")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps}, {batch_size}")
    n_all = x_all.shape[0]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    if model is None:  # initialised from ``seed``, leaving the caller's global stream as it was
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = TinyAutoencoder(in_channels=x_all.shape[1], **model_kwargs)
    model = model.to(x_all.device).train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, n_all, (min(batch_size, n_all),), generator=gen)
        x = get(idx)
        loss = F.mse_loss(model(x), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    model.eval()
    with torch.no_grad():  # the latents' std over the data, in chunks (the whole set at once
        total = torch.zeros(3, dtype=torch.float64, device=x_all.device)  # held ~2 N*32*H*W*4 B)
        for start in range(0, n_all, _STD_CHUNK):
            z = model.encoder(get(torch.arange(start, min(start + _STD_CHUNK, n_all)))).double()
            total += torch.stack([z.new_tensor(z.numel()), z.sum(), z.square().sum()])
        n, s1, s2 = total.unbind()
        var = (s2 - s1 * s1 / n) / (n - 1).clamp(min=1)  # unbiased, as Tensor.std
        model._scale.copy_(1.0 / var.clamp(min=0).sqrt().clamp(min=1e-8))
    return model, torch.stack(losses).float().cpu()


def _local_dir(path: str | Path) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"VAE directory {str(p)!r} does not exist")
    if not (p / "config.json").is_file():
        raise FileNotFoundError(
            f"{str(p)!r} has no config.json; expected a diffusers AutoencoderKL directory "
            "written by save_pretrained"
        )
    return p


class DiffusersVAE(LatentCodec):
    """A diffusers AutoencoderKL (or VQModel) loaded from a local directory (never from the hub).

    encode draws z ~ q(z|x) (or takes its mode with sample=False; a VQModel's encoder output
    before quantisation, which LDM diffuses: its decode quantises) and returns
    (z - shift_factor) * scale_factor: the config's scaling_factor (e.g. 0.18215 for SD's VAE)
    and shift_factor (SD3 / FLUX VAEs; 0 where the config has none) unless given. Inputs are
    cast to the VAE's dtype, and latents and images come back in float32.
    """

    def __init__(
        self, vae: Any, scale_factor: float | None = None, shift_factor: float | None = None
    ) -> None:
        self.vae = vae
        cfg = vae.config
        if scale_factor is None:  # a config's null means none, as a missing shift_factor
            scale_factor = getattr(cfg, "scaling_factor", None)
        self.scale_factor = float(1.0 if scale_factor is None else scale_factor)
        if shift_factor is None:
            shift_factor = getattr(cfg, "shift_factor", None)
        self.shift_factor = float(shift_factor or 0.0)
        # a VQModel's latents are its quant_conv's output: vq_embed_dim channels (None: the same)
        self.latent_channels = int(getattr(cfg, "vq_embed_dim", None) or cfg.latent_channels)
        self.downsample = 2 ** (len(cfg.block_out_channels) - 1)

    @classmethod
    def from_local(
        cls,
        path: str | Path,
        scale_factor: float | None = None,
        device: Any = None,
        dtype: torch.dtype | None = None,
        shift_factor: float | None = None,
    ) -> DiffusersVAE:
        """Load `path` (a directory holding config.json and the weights), in ``dtype``."""
        p = _local_dir(path)
        try:
            from diffusers import AutoencoderKL
        except ImportError as e:
            raise ImportError(
                "DiffusersVAE needs the `diffusers` package: pip install diffusers"
            ) from e
        import json

        try:
            raw_cfg = json.loads((p / "config.json").read_text())
            kind = raw_cfg.get("_class_name", "AutoencoderKL")
        except (ValueError, AttributeError) as e:
            raise ValueError(f"{str(p / 'config.json')!r} is not a diffusers config: {e}") from e
        if kind == "VQModel":
            # LDM diffuses a VQ model's latents unscaled; diffusers fills in SD's 0.18215 for a
            # config that names no scaling_factor (as LDM's converted VQ models do)
            if scale_factor is None and "scaling_factor" not in raw_cfg:
                scale_factor = 1.0
            elif scale_factor is None and raw_cfg["scaling_factor"] == 0.18215:
                warnings.warn(
                    f"{str(p)!r}: a VQModel whose config.json says scaling_factor 0.18215, "
                    "diffusers' default (SD's VAE's), which save_pretrained writes for a model "
                    "whose own config named none; LDM diffuses its VQ models' latents unscaled: "
                    'if this is one of them, set "scaling_factor": 1.0 in that file',
                    stacklevel=3,
                )
            from diffusers import VQModel as Kind
        elif kind == "AutoencoderKL":
            Kind = AutoencoderKL  # noqa: N806
        else:
            raise ValueError(
                f"{str(p)!r} holds a diffusers {kind!r}; antdiff decodes with an AutoencoderKL "
                "or a VQModel"
            )
        kwargs = {} if dtype is None else {"torch_dtype": dtype}
        vae = Kind.from_pretrained(str(p), local_files_only=True, **kwargs)
        vae = vae.to(device=device).eval().requires_grad_(False)
        return cls(vae, scale_factor, shift_factor)

    @torch.no_grad()
    def encode(
        self, x: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        enc = self.vae.encode(x.to(self.vae.dtype))
        if hasattr(enc, "latent_dist"):
            dist = enc.latent_dist
            z = dist.sample(generator=generator) if sample else dist.mode()
        else:  # VQModel: the encoder's output before quantisation
            z = enc.latents
        return (z.float() - self.shift_factor) * self.scale_factor

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        raw = z.float() / self.scale_factor + self.shift_factor
        return self.vae.decode(raw.to(self.vae.dtype)).sample.float()

    def latent_shape(self, image_shape: tuple[int, ...]) -> tuple[int, ...]:
        lead, _, h, w = _split_shape(tuple(image_shape))
        f = self.downsample
        if h % f or w % f:
            raise ValueError(f"image H, W = {h}, {w} must be divisible by {f}")
        return (*lead, self.latent_channels, h // f, w // f)


class PrecomputedLatents(LatentCodec):
    """Latents [N, c, h, w] stored in a .pt (tensor, or dict with "latents" and optional
    "labels") or .npy file. encode(idx [B] int64) looks latents up by dataset index.

    Args:
        path: the file.
        expected_shape: per-sample (c, h, w) to check against, or None.
        scale_factor: diffusion-space latents are (stored - shift_factor) * scale_factor
            (scale 1 and shift 0 if the file already holds normalised latents).
        shift_factor: subtracted from the stored latents before the scaling (SD3 / FLUX VAEs).
        decoder: a codec that can decode these latents. The stored latents are taken to be
            `decoder`'s raw latents when (scale_factor, shift_factor) != (1, 0), and its
            normalised latents otherwise.
    """

    def __init__(
        self,
        path: str | Path,
        expected_shape: tuple[int, ...] | None = None,
        scale_factor: float = 1.0,
        decoder: LatentCodec | None = None,
        shift_factor: float = 0.0,
    ) -> None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"latent file {str(p)!r} does not exist")
        self.labels: torch.Tensor | None = None
        if p.suffix not in (".npy", ".pt"):
            raise ValueError(f"latent file must end in .pt or .npy, got {p.name!r}")
        try:
            if p.suffix == ".npy":
                obj = np.load(p, allow_pickle=False)
                if isinstance(obj, np.ndarray) and not obj.dtype.isnative:  # saved big-endian
                    obj = obj.astype(obj.dtype.newbyteorder("="))
                obj = torch.from_numpy(obj) if isinstance(obj, np.ndarray) else obj
            else:
                obj = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch / numpy raise many kinds for a file they cannot read
            kind = ("a numpy array saved with np.save" if p.suffix == ".npy" else
                    "a tensor, or a dict of tensors, saved with torch.save")  # fmt: skip
            first = (str(exc).strip().splitlines() or [""])[0][:200]  # torch's run on for pages
            if first.startswith("Weights only load failed"):  # not advice to follow here
                first = "not plain tensors: torch.load(weights_only=True) refuses it"
            raise ValueError(
                f"cannot read latent file {str(p)!r} ({type(exc).__name__}: {first}); it must "
                f"hold {kind}"
            ) from exc
        if p.suffix == ".npy":
            z = obj
        else:
            if isinstance(obj, dict):
                if "latents" not in obj:
                    raise ValueError(
                        f"{str(p)!r} holds a dict without a 'latents' key: keys {sorted(obj)}"
                    )
                z, self.labels = obj["latents"], obj.get("labels")
                written = obj.get("scaling_factor")
                if obj.get("normalised") is True and (scale_factor != 1.0 or shift_factor != 0.0):
                    warnings.warn(
                        f"{str(p)!r} holds latents that antdiff encode normalised already "
                        f"(scaling_factor {written}), and data.latent_scale {scale_factor} / "
                        f"latent_shift {shift_factor} map them again: leave both at their "
                        "defaults (1, 0) for such a file",
                        stacklevel=2,
                    )
            else:
                z = obj
        if not isinstance(z, torch.Tensor) or z.ndim != 4:
            shape = tuple(z.shape) if hasattr(z, "shape") else type(z).__name__
            raise ValueError(f"latents in {str(p)!r} must be a [N, c, h, w] tensor, got {shape}")
        if expected_shape is not None and tuple(z.shape[1:]) != tuple(expected_shape):
            raise ValueError(
                f"latents in {str(p)!r} have per-sample shape "
                f"{tuple(z.shape[1:])}, expected {tuple(expected_shape)}"
            )
        labels = self.labels
        if labels is not None and (
            not isinstance(labels, torch.Tensor) or labels.shape != (z.shape[0],)
            or labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool
        ):  # fmt: skip
            got = (f"{labels.dtype} {tuple(labels.shape)}" if isinstance(labels, torch.Tensor)
                   else type(labels).__name__)  # fmt: skip
            raise ValueError(
                f"labels in {str(p)!r} must be an integer tensor of shape [{z.shape[0]}], got "
                f"{got} (e.g. torch.tensor(labels, dtype=torch.int64))"
            )
        # in place (the tensor was just loaded from the file: ours), finiteness in chunks: the
        # set once in memory (the ImageNet latents are 20 GiB as float32), not three times
        z = z.float()
        for chunk in z.split(max(1, (1 << 22) // max(1, z.shape[1:].numel()))):
            if not torch.isfinite(chunk).all():
                raise ValueError(f"latents in {str(p)!r} hold inf/NaN values")
        if shift_factor != 0.0:
            z.sub_(shift_factor)
        if scale_factor != 1.0:
            z.mul_(scale_factor)
        self.latents = z
        self.scale_factor, self.shift_factor = float(scale_factor), float(shift_factor)
        self.decoder = decoder

    def __len__(self) -> int:
        return self.latents.shape[0]

    def to(self, device: Any) -> PrecomputedLatents:
        """Move the stored latents (and labels) to `device`, so encode() never copies."""
        self.latents = self.latents.to(device)
        if self.labels is not None:
            self.labels = self.labels.to(device)
        return self

    def encode(self, idx: torch.Tensor) -> torch.Tensor:
        """Latents of dataset items idx [B] int64 -> [B, c, h, w] on the latents' device."""
        return self.latents[idx.to(self.latents.device)]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        if self.decoder is None:
            raise ValueError("PrecomputedLatents has no decoder: pass decoder=<a LatentCodec>")
        return StoredLatentDecoder(self.decoder, self.scale_factor, self.shift_factor).decode(z)

    def latent_shape(self, image_shape: tuple[int, ...] | None = None) -> tuple[int, ...]:
        """The stored per-sample shape (c, h, w); image_shape is accepted and ignored."""
        return tuple(self.latents.shape[1:])


class StoredLatentDecoder(LatentCodec):
    """Decodes the diffusion-space latents of a latent file, (stored - shift_factor) *
    scale_factor, through ``decoder`` (e.g. a :class:`DiffusersVAE`).

    The stored latents are ``decoder``'s raw latents when (scale_factor, shift_factor) !=
    (1, 0) (the file was read with data.latent_scale / latent_shift), and its normalised latents
    otherwise (a file that ``antdiff encode`` wrote, read with the defaults). ``z`` is moved to
    the decoder's device and decoded ``chunk`` latents at a time (a VAE decoder's activations at
    full resolution are large: 500 SD-VAE decodes at 256 px at once would take tens of GB);
    images come back there.
    """

    def __init__(
        self,
        decoder: LatentCodec,
        scale_factor: float = 1.0,
        shift_factor: float = 0.0,
        chunk: int = 16,
    ) -> None:
        self.decoder = decoder
        self.scale_factor, self.shift_factor = float(scale_factor), float(shift_factor)
        self.chunk = int(chunk)

    def to(self, device: Any) -> StoredLatentDecoder:  # the decoder stays where it was loaded
        return self

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        vae = getattr(self.decoder, "vae", None)
        if isinstance(vae, nn.Module):
            z = z.to(next(vae.parameters()).device)
        if self.scale_factor != 1.0 or self.shift_factor != 0.0:  # raw, then the decoder's
            raw = z / self.scale_factor + self.shift_factor
            z = (raw - self.decoder.shift_factor) * self.decoder.scale_factor
        if len(z) <= self.chunk:
            return self.decoder.decode(z)
        return torch.cat([self.decoder.decode(part) for part in z.split(self.chunk)])

    def latent_shape(self, image_shape: tuple[int, ...]) -> tuple[int, ...]:
        return self.decoder.latent_shape(image_shape)

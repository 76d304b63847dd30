"""Training configuration: nested dataclasses, YAML presets in the package, dotted overrides.

``load_config("digits_adm", ["--ant.method", "nash", "--train.steps", "200"])`` reads the preset
``antdiff/presets/digits_adm.yaml`` (or any YAML path), applies the overrides (each value parsed
with ``yaml.safe_load``, so ``--train.betas [0.9,0.99]`` and ``--ant.update_every null`` work)
and validates every section in its ``__post_init__``. Keys missing from a YAML file keep their
defaults; an unknown key is an error that lists the section's valid keys.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import re
import types
import typing
import warnings
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Union

import yaml

SOURCES = ("digits", "folder", "latents")
SCHEDULES = ("linear", "scaled_linear", "cosine")
PREDICTIONS = ("eps", "x0", "v")
WEIGHTINGS = (None, "p2", "min_snr")
CLUSTERINGS = ("snr", "timestep", "gradient")
_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")  # YAML 1.1 reads 1e-3 as text
SAMPLINGS = ("proportional", "equal", "uniform")
SAMPLERS = ("ddim", "ddpm")
VARIANCES = (None, "small", "large")  # DDPM's fixed reverse variance (None: "small")
# keys a resumed run may change without --allow-config-change (they never touch the numbers)
RESUME_FREE = (
    "name",
    "train.steps",
    "train.log_every",
    "train.sample_every",
    "train.ckpt_every",
    "train.keep_ckpts",
    "train.out_dir",
    "train.num_workers",
    "train.progress",
    "sample.",
)


def _choice(section: str, key: str, value: Any, valid: tuple) -> None:
    if value not in valid:
        raise ValueError(f"{section}.{key} must be one of {list(valid)}, got {value!r}")


def _positive(section: str, key: str, value: Any, zero_ok: bool = False) -> None:
    # NaN compares False with everything, so it is refused by name, like inf
    try:
        finite = value is not None and math.isfinite(value)
    except OverflowError:  # an int past float's range (a 400-digit seed): finite, checked below
        finite = True
    if not finite or value < 0 or (value == 0 and not zero_ok):
        bound = ">= 0" if zero_ok else "> 0"
        raise ValueError(f"{section}.{key} must be finite and {bound}, got {value!r}")


@dataclass
class DataConfig:
    """Where the images (or latents) come from. Images are scaled to [-1, 1]."""

    source: str = "digits"  # digits (sklearn, 8x8) | folder (image files) | latents (.pt/.npy)
    path: str | None = None  # folder or latent file
    image_size: int | None = None  # resize on load; None keeps the native size (8 for digits)
    channels: int = 1  # 1 (grey) or 3 (RGB) for images; latents: checked against the file
    class_conditional: bool = False  # labels: digits 0-9, folder sub-directories, latent labels
    num_classes: int | None = None  # None: inferred from the data
    latent_scale: float = 1.0  # multiplies stored latents (1 when the file holds scaled ones)
    latent_shift: float = 0.0  # subtracted before the scaling (SD3 / FLUX VAEs' shift_factor)
    autoencoder: str | None = None  # "tiny": train a TinyAutoencoder, diffuse its latents
    autoencoder_steps: int = 300
    # mirror each image left-right with probability 1/2 as it is read (ADM, DiT and the ANT
    # code do; LDM's FFHQ loader does not); None: a fresh run takes ``flips`` (on for image
    # folders, off for digits, which are not mirror-symmetric, and latents), a resume the
    # checkpoint's own setting
    random_flip: bool | None = None

    def __post_init__(self) -> None:
        _choice("data", "source", self.source, SOURCES)
        if self.source != "digits" and not self.path:
            raise ValueError(f"data.path is required for data.source={self.source!r}")
        if self.image_size is not None:
            _positive("data", "image_size", self.image_size)
            if self.source == "latents":
                raise ValueError(
                    f"data.image_size={self.image_size} resizes images on load, but latents "
                    "(data.source='latents') keep the size they were saved at: drop it "
                    "(--data.image_size null)"
                )
        if self.source != "latents":
            _choice("data", "channels", self.channels, (1, 3))
        _positive("data", "channels", self.channels)
        if self.num_classes is not None:
            _positive("data", "num_classes", self.num_classes)
            if not self.class_conditional:
                raise ValueError(
                    f"data.num_classes={self.num_classes} applies to class-conditional training: "
                    "add --data.class_conditional true, or drop it (--data.num_classes null)"
                )
        _choice("data", "autoencoder", self.autoencoder, (None, "tiny"))
        if self.random_flip and (self.source == "latents" or self.autoencoder):
            fix = (
                "store mirrored copies in the latent file when extracting it (DiT's pipeline "
                "encodes flipped images)" if self.source == "latents" else
                "the tiny autoencoder encodes each image once, unflipped"
            )  # fmt: skip
            raise ValueError(
                "data.random_flip mirrors images as they are read, but this run diffuses "
                f"latents encoded once (data.source='latents' or data.autoencoder): {fix}; set "
                "--data.random_flip false"
            )
        if self.autoencoder and self.source == "latents":
            raise ValueError("data.autoencoder encodes images; data.source='latents' has none")
        _positive("data", "autoencoder_steps", self.autoencoder_steps)
        # (random_flip's None is resolved by the trainer: see ``flips``)
        _positive("data", "latent_scale", self.latent_scale)
        if isinstance(self.latent_shift, bool) or not math.isfinite(self.latent_shift):
            shift = self.latent_shift
            raise ValueError(f"data.latent_shift must be a finite number, got {shift!r}")
        if self.latent_shift != 0.0 and self.source != "latents":
            raise ValueError(
                f"data.latent_shift={self.latent_shift} applies to stored latents "
                "(data.source='latents'); drop it for images"
            )
        if self.latent_scale != 1.0 and self.source != "latents":
            raise ValueError(
                f"data.latent_scale={self.latent_scale} applies to stored latents "
                "(data.source='latents'); drop it for images"
            )
        if self.source == "digits" and self.path:
            raise ValueError(
                f"data.path={self.path!r} is not read by data.source='digits' (the built-in "
                "set): add --data.source folder (images) or latents, or drop data.path "
                "(--data.path null)"
            )

    @property
    def flips(self) -> bool:
        """Whether images are mirrored: ``random_flip``, or where it is None, True for image
        folders diffused as pixels."""
        if self.random_flip is not None:
            return self.random_flip
        return self.source == "folder" and self.autoencoder is None


@dataclass
class ModelConfig:
    """A registered model size (antdiff.models.available_models()) plus constructor overrides.

    Input size, channels, classes and learn_sigma are filled in from data / diffusion."""

    name: str = "adm-tiny"
    overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from .models import available_models, model_config

        if self.name not in available_models():
            close = difflib.get_close_matches(self.name, available_models(), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(
                f"model.name {self.name!r} is not a registered model{hint}; "
                f"available: {available_models()}"
            )
        if not isinstance(self.overrides, dict):
            raise ValueError(f"model.overrides must be a mapping, got {self.overrides!r}")
        model_config(self.name, **self.overrides)  # names and kinds, before any data loads


@dataclass
class DiffusionConfig:
    schedule: str = "linear"
    T: int = 1000
    prediction: str = "eps"
    learn_sigma: bool = False
    loss_weighting: str | None = None  # None | p2 | min_snr
    p2_gamma: float = 1.0
    p2_k: float = 1.0
    min_snr_gamma: float = 5.0

    def __post_init__(self) -> None:
        _choice("diffusion", "schedule", self.schedule, SCHEDULES)
        _positive("diffusion", "T", self.T)
        _choice("diffusion", "prediction", self.prediction, PREDICTIONS)
        _choice("diffusion", "loss_weighting", self.loss_weighting, WEIGHTINGS)
        _positive("diffusion", "min_snr_gamma", self.min_snr_gamma)
        _positive("diffusion", "p2_gamma", self.p2_gamma, zero_ok=True)
        _positive("diffusion", "p2_k", self.p2_k, zero_ok=True)


@dataclass
class AntConfig:
    """ANT: k timestep clusters and the MTL method on them ("vanilla" = plain training)."""

    k: int = 5
    # snr | timestep | gradient (needs affinity) | a clusters file (`antdiff cluster --json`)
    clustering: str = "snr"
    affinity: str | None = None  # "gradient"'s task affinity: `antdiff affinity`'s .npz (bins
    # and their edges) or a .npy/.pt [T, T] matrix
    method: str = "uw"
    sampling: str = "proportional"  # proportional | equal | uniform
    mode: str = (
        "auto"  # auto (onepass if the model allows, else micro) | onepass | micro | retain_graph
    )
    update_every: int | None = None
    min_size: int | str | None = "default"
    max_size: int | str | None = "default"
    method_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from .mtl import make_method

        _positive("ant", "k", self.k)
        if not (isinstance(self.clustering, str) and self.clustering.lower().endswith(".json")):
            if self.clustering not in CLUSTERINGS:
                raise ValueError(
                    f"ant.clustering must be one of {list(CLUSTERINGS)} or a clusters .json file "
                    f"(antdiff cluster --json FILE), got {self.clustering!r}"
                )
        if self.affinity and self.clustering != "gradient":
            raise ValueError(
                f"ant.affinity={self.affinity!r} is read only by ant.clustering='gradient' (this "
                f"run clusters by {self.clustering!r}): add --ant.clustering gradient, or drop "
                "ant.affinity (--ant.affinity null)"
            )
        if self.clustering == "gradient" and not self.affinity:
            raise ValueError(
                "ant.clustering='gradient' needs ant.affinity=<file from `antdiff affinity`>"
            )
        _choice("ant", "sampling", self.sampling, SAMPLINGS)
        _choice("ant", "mode", self.mode, ("auto", "onepass", "micro", "retain_graph"))
        if self.update_every is not None:
            _positive("ant", "update_every", self.update_every)
        for key in ("min_size", "max_size"):
            v = getattr(self, key)
            if isinstance(v, str) and v != "default":
                raise ValueError(f"ant.{key} must be an int, null or 'default', got {v!r}")
            if isinstance(v, int) and v < 1:  # refused at the start, not once the run is built
                raise ValueError(f"ant.{key} must be a positive number of timesteps, got {v}")
        lo, hi = self.min_size, self.max_size
        if isinstance(lo, int) and isinstance(hi, int) and lo > hi:
            raise ValueError(f"ant.min_size={lo} exceeds ant.max_size={hi}: no cluster fits both")
        # YAML 1.1 reads 1e-3 as text: numbers as the typed float keys take them
        self.method_kwargs = {
            k: float(v) if isinstance(v, str) and _SCIENTIFIC.fullmatch(v.strip()) else v
            for k, v in self.method_kwargs.items()
        }
        try:
            method = make_method(self.method, self.k, **self.method_kwargs)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"ant.method / ant.method_kwargs: {exc}") from None
        # the registry's own spelling ("UW + PCGrad" -> "uw+pcgrad"): what the trainer and the
        # CLI compare against ("vanilla") and what config.yaml records
        self.method = method.name
        if self.update_every is not None and method.grad is None:
            raise ValueError(
                f"ant.update_every applies to gradient methods; {self.method!r} has none "
                "(set it to null)"
            )
        if (self.update_every or 1) > 1 and method.grad.needs == "grads":
            raise ValueError(
                f"ant.update_every={self.update_every} with {self.method!r}: it combines the "
                "per-cluster gradients elementwise every step and keeps no weights to reuse "
                "(set it to null or 1)"
            )


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 64
    # 0: the whole batch at once; else batch_size / micro_batch micro-batches accumulated into
    # each optimiser step (ant.backward(accumulate=True)), each with its own timesteps
    micro_batch: int = 0
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    ema_decay: float = 0.9999
    grad_clip: float | None = 1.0  # None or 0: no clipping; the model's gradient norm only
    bf16: bool = False  # bf16 autocast (CPU or CUDA)
    compile: bool = False
    seed: int = 0
    log_every: int = 50
    sample_every: int = 0  # 0: only at the end
    # every N steps and at the last step; 0: never, not even at the last step (unlike
    # sample_every's 0), so the trained weights are not kept: `antdiff train` warns
    ckpt_every: int = 1000
    keep_ckpts: int = 2  # the last N checkpoints stay (a corrupted last one falls back)
    out_dir: str = "runs/default"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    num_workers: int = 0  # threads decoding an image folder
    threads: int = 0  # torch intra-op threads for the whole process (0: torch's default)
    # torch.use_deterministic_algorithms for the run: GPU reruns bit-identical (CPU runs are)
    deterministic: bool = False
    progress: bool = True
    t_range: list[int] | None = None  # [t1, t2): train only on t1 <= t < t2 (NTG specialists)

    def __post_init__(self) -> None:
        for key in ("steps", "batch_size", "lr", "log_every", "keep_ckpts"):
            _positive("train", key, getattr(self, key))
        for key in ("weight_decay", "sample_every", "ckpt_every", "num_workers", "seed", "threads",
                    "micro_batch"):  # fmt: skip
            _positive("train", key, getattr(self, key), zero_ok=True)
        if self.micro_batch and self.batch_size % self.micro_batch:
            raise ValueError(
                f"train.micro_batch={self.micro_batch} does not divide train.batch_size="
                f"{self.batch_size}: every optimiser step takes batch_size / micro_batch "
                "micro-batches of one size; pick a divisor (or 0 for the whole batch)"
            )
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"train.betas must be two numbers in [0, 1), got {self.betas!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"train.ema_decay must be in [0, 1), got {self.ema_decay!r}")
        if self.grad_clip is not None:
            _positive("train", "grad_clip", self.grad_clip, zero_ok=True)
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(f"train.device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.seed >= 2**63:
            raise ValueError(f"train.seed must be below 2**63 (torch seeds), got {self.seed}")
        if not str(self.out_dir).strip():  # "" trained into the working directory
            raise ValueError(f"train.out_dir must name a folder for the run, got {self.out_dir!r}")
        tr = self.t_range
        if tr is not None and (len(tr) != 2 or not 0 <= tr[0] < tr[1]):
            raise ValueError(f"train.t_range must be [t1, t2] with 0 <= t1 < t2, got {tr!r}")


@dataclass
class SampleConfig:
    """Preview grids written during training (EMA weights)."""

    sampler: str = "ddim"
    steps: int = 50
    cfg_scale: float = 1.0
    # guidance on the first N mean channels, the rest from the conditional output (None: all;
    # the DiT code guides 3 of the 4 latent channels, which its published FIDs used)
    cfg_channels: int | None = None
    n: int = 16
    # DDPM's reverse variance where diffusion.learn_sigma is off: "small" (beta_tilde; None
    # means it too) or "large" (beta_t)
    variance: str | None = None

    def ddpm_variance(self, sampler: str | None = None) -> str | None:
        """The ``variance`` for :func:`antdiff.sampling.sample` with ``sampler`` (default this
        config's own): ``variance`` for DDPM, None for DDIM (whose noise eta sets)."""
        return self.variance if (sampler or self.sampler) == "ddpm" else None

    def __post_init__(self) -> None:
        _choice("sample", "sampler", self.sampler, SAMPLERS)
        _choice("sample", "variance", self.variance, VARIANCES)
        if self.cfg_channels is not None:
            _positive("sample", "cfg_channels", self.cfg_channels)
        _positive("sample", "steps", self.steps)
        _positive("sample", "n", self.n)
        if not isinstance(self.cfg_scale, (int, float)) or not math.isfinite(self.cfg_scale):
            raise ValueError(f"sample.cfg_scale must be a finite number, got {self.cfg_scale!r}")


@dataclass
class Config:
    name: str = "custom"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    ant: AntConfig = field(default_factory=AntConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def __post_init__(self) -> None:
        # a t_range draws t uniformly in it, not by cluster: no stratified batch to fill
        stratified = self.ant.sampling != "uniform" and self.train.t_range is None
        if stratified and self.train.batch_size < self.ant.k:
            raise ValueError(
                f"train.batch_size={self.train.batch_size} is smaller than ant.k={self.ant.k}: "
                "stratified sampling (equal or proportional) draws batches of at least k samples "
                "(proportional ones may still leave a short cluster out); raise the batch size, "
                "lower k, or set ant.sampling=uniform"
            )
        mb = self.train.micro_batch
        if stratified and 0 < mb < self.ant.k:
            raise ValueError(
                f"train.micro_batch={mb} is smaller than ant.k={self.ant.k}: each micro-batch "
                "draws its own stratified timesteps, at least k of them; raise micro_batch, "
                "lower k, or set ant.sampling=uniform"
            )
        t_range = self.train.t_range
        if t_range is not None and not 0 <= t_range[0] < t_range[1] <= self.diffusion.T:
            raise ValueError(
                f"train.t_range={t_range!r} must satisfy 0 <= t1 < t2 <= diffusion.T="
                f"{self.diffusion.T} (half-open [t1, t2), 0-based)"
            )
        if self.sample.cfg_scale != 1.0 and not self.data.class_conditional:
            raise ValueError(
                f"sample.cfg_scale={self.sample.cfg_scale} needs a class-conditional model "
                "(data.class_conditional=true); set it to 1 for this run"
            )
        if self.sample.variance is not None and self.diffusion.learn_sigma:
            raise ValueError(
                f"sample.variance={self.sample.variance!r} applies to a fixed variance; this model "
                "learns its variance (diffusion.learn_sigma=true), which DDPM uses: leave "
                "sample.variance unset"
            )
        if self.sample.steps > self.diffusion.T:
            raise ValueError(
                f"sample.steps={self.sample.steps} exceeds diffusion.T={self.diffusion.T}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------ building from dicts
def _unknown_key(where: str, key: str, valid: list[str]) -> ValueError:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" Did you mean {(f'{where}.' if where else '') + close[0]!r}?" if close else ""
    full = f"{where}.{key}" if where else key
    section = f" of {where!r}" if where else ""
    return ValueError(f"unknown config key {full!r}.{hint} Valid keys{section}: {sorted(valid)}")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if type(None) in args and (value is None or value in ("none", "None")):
            return None
        text_error = None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except ValueError as exc:
                text_error = exc if arg is str else text_error
        if text_error is not None and len(args) <= 2:  # text or None: say how to quote it
            raise text_error
        raise ValueError(f"{where} must be {tp}, got {value!r}")
    if tp is bool and isinstance(value, bool):
        return value
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is float and not isinstance(value, bool):
        try:
            return float(value)  # "1e-4" arrives as a string from YAML 1.1
        except (TypeError, ValueError, OverflowError):  # OverflowError: an int past 1.8e308
            pass
    if tp is str and isinstance(value, str):
        return value
    if tp is str and value is not None and not isinstance(value, (list, dict)):
        raise ValueError(  # YAML read a date, number or true/false where text was meant
            f"{where} must be text, got {value!r} (YAML read a {type(value).__name__}): quote "
            f"it, --{where} \"'TEXT'\" on the command line or '...' in a YAML file"
        )
    if origin is list and isinstance(value, (list, tuple)):
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict and isinstance(value, dict):
        return dict(value)
    if origin is dict and value is None:  # an empty mapping in YAML ("method_kwargs:")
        return {}
    if tp is Any:
        return value
    raise ValueError(f"{where} must be {getattr(tp, '__name__', tp)}, got {value!r}")


def _build(cls: type, d: Any, where: str) -> Any:
    if not isinstance(d, dict):
        raise ValueError(f"config section {where or 'top level'} must be a mapping, got {d!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in d.items():
        if key not in names:
            raise _unknown_key(where, str(key), names)
        tp = hints[key]
        sub = f"{where}.{key}" if where else key
        if dataclasses.is_dataclass(tp):
            # an empty section (YAML's "train:") keeps the defaults; false or [] is refused
            kwargs[key] = _build(tp, {} if value is None else value, sub)
        else:
            kwargs[key] = _coerce(value, tp, sub)
    return cls(**kwargs)


def config_from_dict(d: dict[str, Any]) -> Config:
    """Build and validate a Config from a (possibly partial) nested dict."""
    return _build(Config, d, "")


def config_from_saved(d: dict[str, Any]) -> Config:
    """The Config of a checkpoint's config dict (``upgrade_saved_config``, then validated)."""
    return config_from_dict(upgrade_saved_config(d))


def upgrade_saved_config(d: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's config dict as the current Config accepts it (a copy). Older versions
    took settings that the run did not read and ignored them (data.image_size with latents,
    data.path with the built-in digits, data.latent_scale for images, data.num_classes without
    data.class_conditional, ant.affinity without gradient clustering): each is dropped with a
    warning, so their checkpoints still sample, evaluate and resume. A config from before
    data.random_flip gets it false (those runs never flipped), so a resume that would start
    flipping says so."""
    if not isinstance(d, dict):
        return d
    data, ant = (dict(v) if isinstance(v, dict) else v for v in (d.get("data"), d.get("ant")))
    dropped, added = [], False
    if isinstance(data, dict):
        source = data.get("source", "digits")
        if "random_flip" not in data:  # written before data.random_flip: it never flipped
            data["random_flip"], added = False, True
        unread = {
            "image_size": source == "latents" and data.get("image_size") is not None,
            "path": source == "digits" and bool(data.get("path")),
            "latent_scale": source != "latents" and data.get("latent_scale", 1.0) != 1.0,
            "num_classes": not data.get("class_conditional") and data.get("num_classes")
            is not None,
        }  # fmt: skip
        for key, drop in unread.items():
            if drop:
                dropped.append(f"data.{key}={data[key]!r}")
                data[key] = 1.0 if key == "latent_scale" else None
    if isinstance(ant, dict) and ant.get("affinity") and ant.get("clustering", "snr") != "gradient":
        dropped.append(f"ant.affinity={ant['affinity']!r}")
        ant["affinity"] = None
    if not dropped:
        return {**d, "data": data} if added else d
    warnings.warn(
        f"the checkpoint's config sets {', '.join(dropped)}, which the run did not read: ignored",
        stacklevel=2,
    )
    return {**d, **{k: v for k, v in (("data", data), ("ant", ant)) if k in d}}


# ------------------------------------------------------------------ presets and overrides
def available_presets() -> list[str]:
    root = resources.files("antdiff") / "presets"
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a mapping key given twice (plain YAML keeps the last silently)."""


def _no_duplicate_keys(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False):
    seen = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # <<: *anchor; its keys may be overridden
            continue
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} is given twice (the first value would be lost)",
                key_node.start_mark,
            )  # fmt: skip
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicate_keys)


def load_yaml(text: str, where: str) -> Any:
    """YAML ``text`` (safe types only, no duplicate keys); a ValueError naming ``where`` (a file
    or an override) and the problem for text that does not parse."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as e:
        raise ValueError(f"{where} is not valid YAML: {' '.join(str(e).split())}") from None


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``top``'s keys on it, section by section (a copy)."""
    out = dict(base)
    for key, value in top.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merge(out[key], value) if both else value
    return out


def _read_yaml(
    name_or_path: str | Path, _bases: tuple[str, ...] = ()
) -> tuple[dict[str, Any], str]:
    """A preset's or YAML file's mapping; a ``base:`` key (a preset name or another YAML file,
    relative to this one) is read first and this file's keys are laid over it."""
    d, name = _read_one_yaml(name_or_path)
    if "base" not in d:
        return d, name
    base = d.pop("base")
    if not isinstance(base, str) or not base:
        raise ValueError(
            f"config {str(name_or_path)!r}: base must name a preset or a YAML file, got {base!r}"
        )
    here = Path(name_or_path)
    if Path(base).suffix in (".yaml", ".yml") and not Path(base).is_absolute() and here.is_file():
        base = str(here.parent / base)
    seen = (*_bases, _base_key(name_or_path))
    if _base_key(base) in seen:  # a file compared by where it is, however it is spelt
        raise ValueError(f"config {str(name_or_path)!r}: its bases form a cycle ({base!r})")
    if len(seen) > 16:
        raise ValueError(
            f"config {str(name_or_path)!r}: its bases go more than 16 deep (at {base!r}); "
            "merge some of them"
        )
    under, _ = _read_yaml(base, seen)
    # an empty section ("train:" with nothing under it) keeps the base's, as it keeps defaults
    d = {k: v for k, v in d.items() if v is not None or k == "name"}
    return _merge(under, d), name  # (d's name: its own, or the file's stem)


def _base_key(name_or_path: str | Path) -> str:
    """What a ``base:`` chain compares: a file's resolved path, a preset's name."""
    p = Path(name_or_path)
    return str(p.resolve()) if p.suffix in (".yaml", ".yml") or p.is_file() else str(p)


def _read_one_yaml(name_or_path: str | Path) -> tuple[dict[str, Any], str]:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.is_file():
        if not p.is_file():
            raise FileNotFoundError(f"config file {str(p)!r} does not exist")
        text, name = p.read_text(), p.stem
    else:
        res = resources.files("antdiff") / "presets" / f"{name_or_path}.yaml"
        if not res.is_file():
            close = difflib.get_close_matches(str(name_or_path), available_presets(), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(
                f"unknown preset {str(name_or_path)!r}.{hint} Available presets: "
                f"{', '.join(available_presets())}; or pass the path of a YAML file"
            )
        text, name = res.read_text(), str(name_or_path)
    d = load_yaml(text, f"config {str(name_or_path)!r}") or {}
    if not isinstance(d, dict):
        raise ValueError(f"config {str(name_or_path)!r} must hold a YAML mapping")
    d.setdefault("name", name)
    return d, name


def parse_overrides(args: list[str], once: bool = False) -> list[tuple[str, Any]]:
    """["--a.b", "1", "--c.d=x"] -> [("a.b", 1), ("c.d", "x")]; values via yaml.safe_load.

    A key given twice takes its last value, or with ``once`` (a user's command line) raises.
    """
    out, i, seen = [], 0, {}
    while i < len(args):
        tok = args[i]
        if not tok.startswith("--") or len(tok) < 3:
            raise ValueError(f"expected a --section.key override, got {tok!r}")
        key, eq, raw = tok[2:].partition("=")
        if not eq:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raise ValueError(f"override --{key} needs a value (--{key} VALUE)")
            raw, i = args[i + 1], i + 1
        if once and key in seen:
            raise ValueError(
                f"--{key} is given twice ({seen[key]!r}, then {raw!r}); give it once"
            )
        seen[key] = raw
        out.append((key, load_yaml(raw, f"the value of --{key} ({raw!r})") if raw.strip() else raw))
        i += 1
    return out


def apply_overrides(d: dict[str, Any], overrides: list[tuple[str, Any]]) -> dict[str, Any]:
    """Set dotted keys in the nested dict ``d`` (checked against the dataclass fields)."""
    hints_of = {f.name: f.type for f in dataclasses.fields(Config)}
    for key, value in overrides:
        parts = key.split(".")
        if parts[0] not in hints_of:
            raise _unknown_key("", parts[0], list(hints_of))
        section_cls = typing.get_type_hints(Config)[parts[0]]
        if not dataclasses.is_dataclass(section_cls):
            if len(parts) > 1:
                raise ValueError(f"config key {parts[0]!r} has no sub-keys (got {key!r})")
            d[parts[0]] = value
            continue
        if len(parts) < 2:
            raise ValueError(f"override --{key} names a section; use --{key}.<key>")
        fields = [f.name for f in dataclasses.fields(section_cls)]
        if parts[1] not in fields:
            raise _unknown_key(parts[0], parts[1], fields)
        section = d.get(parts[0])
        if section is None:  # absent, or empty in the YAML ("train:")
            section = {}
        elif not isinstance(section, dict):  # refused as _build refuses it without an override
            raise ValueError(f"config section {parts[0]} must be a mapping, got {section!r}")
        d[parts[0]] = section
        if len(parts) == 2:
            section[parts[1]] = value
        elif typing.get_origin(typing.get_type_hints(section_cls)[parts[1]]) is dict:
            node = section
            for i, p in enumerate(parts[1:-1], 2):  # an empty YAML mapping reads as null
                if node.get(p) is None:
                    node[p] = {}
                elif not isinstance(node[p], dict):
                    where = ".".join(parts[:i])
                    raise ValueError(f"{where} is {node[p]!r}, not a mapping; cannot set {key!r}")
                node = node[p]
            node[parts[-1]] = value
        else:
            raise ValueError(f"{parts[0]}.{parts[1]} is not a mapping; cannot set {key!r}")
    return d


def load_config(name_or_path: str | Path, overrides: list[str] | None = None) -> Config:
    """Preset name or YAML path, plus ``--section.key value`` overrides -> validated Config.

    A clusters file given as an override (``--ant.clustering c.json``, from ``antdiff cluster
    --json``) brings its own k and T: they replace the preset's ``ant.k`` and ``diffusion.T``
    unless those are overridden too (then the run checks that they agree with the file)."""
    d, _ = _read_yaml(name_or_path)
    pairs = parse_overrides(list(overrides or []))
    d = apply_overrides(d, pairs)
    _adopt_clusters_file(d, {key for key, _ in pairs})
    return config_from_dict(d)


def _adopt_clusters_file(d: dict[str, Any], overridden: set[str]) -> None:
    ant = d.get("ant")
    path = ant.get("clustering") if isinstance(ant, dict) else None
    if "ant.clustering" not in overridden or not isinstance(path, str):
        return
    if not path.lower().endswith(".json"):
        return
    from .clustering import Clusters

    fixed = Clusters.load(path)  # a missing or malformed file is named now, not at the start
    for section, key, value in (("ant", "k", fixed.k), ("diffusion", "T", fixed.T)):
        if f"{section}.{key}" in overridden:  # given too: the run checks it against the file
            continue
        if d.get(section) is None:  # an empty section in a YAML (``diffusion:``)
            d[section] = {}
        if isinstance(d[section], dict):
            was = d[section].get(key)
            d[section][key] = value
            if was is not None and was != value:
                logging.getLogger("antdiff.config").info(
                    "%s.%s=%s from %s (the config's %s)", section, key, value, path, was
                )


def config_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ (leaves of nested dicts)."""

    def flat(x: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(x, dict):  # an empty mapping adds no keys: {} vs {"a": 1} differs at .a
            return {k: v for key, val in x.items() for k, v in flat(val, f"{prefix}{key}.").items()}
        return {prefix[:-1]: x}

    a, b = flat(old), flat(new)
    return sorted(k for k in set(a) | set(b) if a.get(k, "<unset>") != b.get(k, "<unset>"))


def resume_conflicts(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The differing keys a resume may not change silently (everything but steps / logging)."""
    return [
        k
        for k in config_diff(old, new)
        if not any(k == free or (free.endswith(".") and k.startswith(free)) for free in RESUME_FREE)
    ]


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)

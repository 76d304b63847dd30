"""Samplers: DDPM ancestral sampling and DDIM, both on a respaced subsequence of timesteps.

Respacing keeps `steps` of the T training timesteps, tau_0 < ... < tau_{S-1}, and builds a new
S-step diffusion whose alphas_cumprod are a[tau_i] (so its betas are 1 - a[tau_i] / a[tau_{i-1}]).
The network still sees the ORIGINAL indices tau_i. Spacings (:func:`space_timesteps`):

- "linspace" (default): 0, d, 2d, ..., T-1 with d = (T-1)/(S-1), each rounded half to even
  after summing the strides one by one: guided-diffusion's respacing of one section (ADM's
  ``--timestep_respacing S``), timestep for timestep; always keeps t = 0 and t = T-1.
- "trailing": T-1, T-1-T/S, ... (rounded half to even, as diffusers' "trailing" spacing);
  keeps t = T-1, spreads evenly from the noisy end.
- "leading": 0, T//S, 2T//S, ... (the original DDIM spacing; never reaches t = T-1). Where
  T % S is large (S = 334 or 501 at T = 1000) the chain starts well inside the process;
  sampling warns when the start keeps a visible part of the data (never for S dividing T).

One step (S = 1) is t = T-1 under every spacing: a single denoising step from pure noise.

Classifier-free guidance: the conditional and unconditional (y = null class) inputs go through
one batched forward, and the mean channels become u + s * (c - u). A learned variance (second
half of the channels) is taken from the conditional half; DDPM uses it, DDIM ignores it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from antdiff.diffusion import FIXED_VARIANCES as _VARIANCES
from antdiff.diffusion import GaussianDiffusion
from antdiff.schedules import Schedule
from antdiff.utils import eval_mode

__all__ = [
    "check_seed", "check_settings", "guided_output", "image_generators", "respace", "sample",
    "space_timesteps",
]

_SPACINGS = ("linspace", "trailing", "leading")
_SAMPLERS = ("ddim", "ddpm")


def space_timesteps(T: int, steps: int, spacing: str = "linspace") -> np.ndarray:  # noqa: N803
    """Choose `steps` of the T timesteps. Returns [steps] int64, strictly increasing."""
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= steps <= T:
        raise ValueError(f"steps must be an integer in [1, T={T}], got {steps!r}")
    if spacing not in _SPACINGS:
        raise ValueError(f"spacing={spacing!r} is not valid; use one of {_SPACINGS}")
    if steps == 1:  # one step can only start from pure noise (t = T-1), whatever the spacing
        return np.array([T - 1], dtype=np.int64)
    if spacing == "linspace":
        # the strides summed in float64 one at a time and rounded half to even (Python's
        # round), as guided-diffusion does: its ties (S = 25: 166.5, 832.5) go its way; no two
        # steps merge, since the stride is > 1 wherever a tie can occur
        stride, cur, taken = (T - 1) / (steps - 1), 0.0, []
        for _ in range(steps):
            taken.append(round(cur))
            cur += stride
        ts = np.array(taken, dtype=np.float64)
    elif spacing == "trailing":
        ts = np.round(np.arange(T, 0, -T / steps)[:steps])[::-1] - 1.0
    else:
        ts = np.arange(steps, dtype=np.float64) * (T // steps)
    out = ts.astype(np.int64)
    if np.any(np.diff(out) <= 0) or out[0] < 0 or out[-1] > T - 1:
        raise AssertionError(f"internal error: bad spacing {out}")
    return out


def check_settings(
    T: int | None = None,  # noqa: N803
    *,
    sampler: str | None = None,
    steps: int | None = None,
    eta: float = 0.0,
    spacing: str = "linspace",
) -> None:
    """The checks :func:`sample` makes of these settings, with the same errors, for a caller
    that validates before any work starts (``antdiff sample`` before loading and before its
    progress bar). None (sampler, steps, T) leaves what depends on it unchecked."""
    if sampler is not None and sampler not in _SAMPLERS:
        raise ValueError(f"sampler={sampler!r} is not valid; use one of {_SAMPLERS}")
    if not 0.0 <= eta <= 1.0:  # NaN too; above 1 the DDIM direction term would be clamped off
        raise ValueError(f"eta must be in [0, 1] (0: DDIM, 1: DDPM-like), got {eta}")
    if sampler == "ddpm" and eta != 0:
        raise ValueError(f"eta={eta} applies to sampler='ddim' only; DDPM's variance is fixed")
    if spacing not in _SPACINGS:
        raise ValueError(f"spacing={spacing!r} is not valid; use one of {_SPACINGS}")
    if steps is None:
        return
    if T is not None:
        space_timesteps(T, steps, spacing)  # steps in [1, T]
    elif isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")


def respace(
    diffusion: GaussianDiffusion, timesteps: np.ndarray, fixed_variance: str | None = None
) -> tuple[GaussianDiffusion, np.ndarray]:
    """A diffusion over the kept timesteps, and the map from its indices to the original ones.

    Args:
        diffusion: the training diffusion (T steps).
        timesteps: [S] strictly increasing original indices to keep.
        fixed_variance: "small" / "large" reverse variance of the respaced chain (None: the
            diffusion's own).

    Returns:
        (respaced diffusion with S steps, timestep_map [S] int64).
    """
    ts = np.asarray(timesteps, dtype=np.int64)
    if ts.ndim != 1 or ts.size == 0 or np.any(np.diff(ts) <= 0):
        raise ValueError(f"timesteps must be a non-empty increasing 1-D array, got {ts}")
    if ts[0] < 0 or ts[-1] >= diffusion.T:
        raise ValueError(f"timesteps must lie in [0, {diffusion.T - 1}], got {ts[0]}..{ts[-1]}")
    ab = diffusion.schedule.alphas_cumprod[ts]
    sched = Schedule(ab, name=f"{diffusion.schedule.name}[respaced {ts.size}]")
    new = GaussianDiffusion(
        sched,
        prediction=diffusion.prediction,
        learn_sigma=diffusion.learn_sigma,
        fixed_variance=fixed_variance or diffusion.fixed_variance,
    )
    return new, ts


def check_variance(diffusion: GaussianDiffusion, sampler: str, variance: str | None) -> None:
    """The checks :func:`sample` makes of ``variance``, for a caller that validates before any
    work starts."""
    if variance is None:
        return
    if variance not in _VARIANCES:
        raise ValueError(f"variance={variance!r} is not valid; use one of {_VARIANCES}")
    if sampler != "ddpm":
        raise ValueError(
            f"variance={variance!r} applies to sampler='ddpm', not {sampler!r} (whose noise "
            "eta sets): sample with ddpm, or leave variance unset"
        )
    if diffusion.learn_sigma:
        raise ValueError(
            f"variance={variance!r} applies to models with a fixed variance; this one learns "
            "its variance (learn_sigma), which DDPM uses: leave variance unset"
        )


def variance_name(
    diffusion: GaussianDiffusion, sampler: str, variance: str | None = None
) -> str | None:
    """What a record names as the reverse variance that :func:`sample` used with ``variance``:
    "small" / "large" for DDPM on a fixed-variance model, "learned" for learn_sigma, None for
    DDIM (whose noise eta sets)."""
    if sampler != "ddpm":
        return None
    return "learned" if diffusion.learn_sigma else variance or diffusion.fixed_variance


def guided_output(
    model: Callable[..., torch.Tensor],
    x: torch.Tensor,
    t: torch.Tensor,
    y: torch.Tensor,
    cfg_scale: float,
    null_class: int,
    channels: int,
    guided: int | None = None,
) -> torch.Tensor:
    """Classifier-free guided model output from one batched cond + uncond forward.

    Args:
        x: [B, C, ...]; t: [B] int64 original timesteps; y: [B] int64 labels.
        null_class: the label index meaning "no class".
        channels: C, the number of mean channels (extra channels = learned variance).
        guided: guide the first ``guided`` mean channels only (None: all C), as the DiT code
            guides 3 of 4 latent channels.

    Returns:
        [B, C_out, ...]: guided channels u + s (c - u), every other channel from the cond half.
    """
    b, g = x.shape[0], channels if guided is None else guided
    out = model(
        torch.cat([x, x]), torch.cat([t, t]), y=torch.cat([y, torch.full_like(y, null_class)])
    ).float()  # the guidance extrapolation in float32, also for a bf16 / fp16 model
    cond, uncond = out[:b], out[b:]
    mean = uncond[:, :g] + cfg_scale * (cond[:, :g] - uncond[:, :g])
    return torch.cat([mean, cond[:, g:]], dim=1)


def _default_device(model: Any) -> torch.device:
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return p.device
    return torch.device("cpu")


def _input_dtype(model: Any) -> torch.dtype:
    """The dtype a model cast with .to(bf16 / fp16) takes; float32 otherwise (and for autocast,
    whose parameters stay float32). The chain itself is always kept in float32."""
    layer = getattr(model, "input_layer", None)  # antdiff's models: the layer that takes x
    if isinstance(layer, torch.nn.Module) and getattr(layer, "weight", None) is not None:
        return layer.weight.dtype
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            if p.is_floating_point():
                return p.dtype
    return torch.float32


def _null_class(model: Any, null_class: int | None) -> int:
    if null_class is not None:
        return int(null_class)
    num = getattr(model, "num_classes", None)
    if num is None:
        raise ValueError(
            "cfg_scale != 1 needs a null class: pass null_class=... or use a model with a "
            "`num_classes` attribute (the null class is num_classes)"
        )
    check_guidance_trained(model)
    return int(num)


def check_guidance_trained(model: Any, cfg_scale: float | None = None) -> None:
    """Refuse guidance through a null class that training never saw: the model's null label
    (index num_classes) is trained only by label dropout, so with class_dropout_prob = 0 the
    "unconditional" branch is its random initial embedding."""
    if cfg_scale == 1.0:
        return
    if getattr(model, "class_dropout_prob", None) == 0:
        raise ValueError(
            "classifier-free guidance (cfg_scale != 1) uses the model's null class, which only "
            "label dropout trains, but this model has class_dropout_prob=0: its unconditional "
            "branch is untrained. Train with label dropout (--model.overrides."
            "class_dropout_prob 0.1), or sample with cfg_scale 1"
        )


def sample(
    model: Callable[..., torch.Tensor],
    diffusion: GaussianDiffusion,
    shape: tuple[int, ...],
    *,
    sampler: str = "ddim",
    steps: int = 50,
    eta: float = 0.0,
    y: torch.Tensor | None = None,
    cfg_scale: float = 1.0,
    generator: torch.Generator | list[torch.Generator] | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    clip_denoised: bool = True,
    spacing: str = "linspace",
    null_class: int | None = None,
    cfg_channels: int | None = None,
    variance: str | None = None,
) -> torch.Tensor:
    """Draw samples [B, C, ...] = `shape` from the model.

    Args:
        model: called as model(x_t, t, **kw) with t the ORIGINAL timestep indices [B]. An
            nn.Module is put in eval mode while sampling (label dropout and dropout off) and
            back after; a plain callable must switch its model to eval itself.
        diffusion: the training diffusion (its schedule, prediction and learn_sigma).
        sampler: "ddim" or "ddpm" (ancestral; uses the learned variance when learn_sigma).
        steps: number of sampling steps S (<= T), chosen by `spacing`.
        eta: DDIM stochasticity (0 = deterministic DDIM, 1 = DDPM-like variance).
        y: [B] int64 class labels for class-conditional models, or None.
        cfg_scale: classifier-free guidance scale; 1 means plain conditional sampling.
        generator: makes the run deterministic; must live on `device`. One generator draws
            the batch's noise as a whole (the images then depend on the batch they are in);
            a list of B generators (:func:`image_generators`) draws each image's noise from
            its own, so an image is the same in any batch.
        device: defaults to the model's parameters' device.
        clip_denoised: clamp predicted x0 to [-1, 1] (turn off for latents). DDIM then takes
            its noise direction from the clamped x0, as ADM does (diffusers' DDIMScheduler
            keeps the model's eps unless ``use_clipped_model_output=True``).
        null_class: the unconditional label (defaults to model.num_classes).
        cfg_channels: guide the first N of the C mean channels, the others taken from the
            conditional output (None: all; 3 reproduces the DiT code's sampler on 4 channels).
        variance: DDPM's reverse variance for a model without learn_sigma: "small" (beta_tilde,
            the posterior's) or "large" (beta_t, the DDPM paper's other choice); None: the
            diffusion's own (``fixed_variance``, "small" by default).
    """
    if sampler not in _SAMPLERS:
        raise ValueError(f"sampler={sampler!r} is not valid; use one of {_SAMPLERS}")
    check_settings(sampler=sampler, eta=eta)
    check_variance(diffusion, sampler, variance)
    if not math.isfinite(cfg_scale):  # NaN / inf: every sample non-finite
        raise ValueError(f"cfg_scale must be a finite number, got {cfg_scale}")
    if cfg_scale != 1.0 and y is None:
        raise ValueError(f"cfg_scale={cfg_scale} needs class labels y=[B] (got y=None)")
    device = torch.device(device) if device is not None else _default_device(model)
    b, c = shape[0], shape[1]
    per_image = isinstance(generator, (list, tuple))
    gens = list(generator) if per_image else [generator]
    if per_image and len(gens) != b:
        raise ValueError(
            f"generator: a list needs one generator per image, {b}, got {len(gens)} (use "
            "image_generators(seed, start, B, device))"
        )
    for g in gens:
        if g is not None and not isinstance(g, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator or a list of them, got {g!r}")
        if g is not None and g.device.type != device.type:
            raise ValueError(f"generator is on {g.device} but sampling runs on {device}")
    ts = space_timesteps(diffusion.T, steps, spacing)
    signal = np.sqrt(diffusion.schedule.alphas_cumprod[[ts[-1], diffusion.T - 1]])
    # "leading" where T % steps is large (stride T // steps); a divisor is DDIM's own spacing
    if diffusion.T % steps and signal[0] > 2 * signal[1] + 0.02:
        warnings.warn(
            f"spacing={spacing!r} with steps={steps} starts the chain at t={ts[-1]} of "
            f"{diffusion.T}, where x_t keeps sqrt(alpha_bar) = {signal[0]:.3f} of the data, "
            f"but from pure noise (training saw {signal[1]:.3f} at t={diffusion.T - 1}); use "
            "spacing='linspace' or 'trailing', or steps that divide T",
            stacklevel=2,
        )
    resp, tmap = respace(diffusion, ts, variance)
    tmap_t = torch.as_tensor(tmap, device=device)
    if cfg_channels is not None and not (
        isinstance(cfg_channels, int) and not isinstance(cfg_channels, bool)
        and 1 <= cfg_channels <= c
    ):  # fmt: skip
        raise ValueError(
            f"cfg_channels must be None (all channels; 'all' on the command line) or an int in "
            f"[1, {c}] (the channels sampled), got {cfg_channels!r}"
        )
    if y is not None:
        y = torch.as_tensor(y)
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise ValueError(
                f"y must hold integer class labels, got dtype {y.dtype} (a float label would be "
                "truncated to another class): pass y.long() of whole labels"
            )
        y = y.to(device=device, dtype=torch.long)
        if y.shape != (b,):
            raise ValueError(f"y must have shape [B] = [{b}], got {tuple(y.shape)}")
    guided = y is not None and cfg_scale != 1.0
    null = _null_class(model, null_class) if guided else -1
    dtype = _input_dtype(model)

    def forward(x: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        t, x = tmap_t[i], x.to(dtype)
        if guided:
            return guided_output(model, x, t, y, cfg_scale, null, c, cfg_channels)
        return (model(x, t) if y is None else model(x, t, y=y)).float()

    # label dropout / dropout off while sampling, each submodule's mode back afterwards. no_grad
    # here, not as a decorator: its wrapper frame would be the one the warnings above name
    # (torch/utils/_contextlib.py) instead of the caller's line
    def randn() -> torch.Tensor:
        if not per_image:
            return torch.randn(shape, generator=generator, device=device)
        if not gens:  # no images: stack takes no empty list
            return torch.empty(shape, device=device)
        return torch.stack([torch.randn(shape[1:], generator=g, device=device) for g in gens])

    # deterministic DDIM uses no noise after the start: one generator still draws it (its
    # stream, and so later batches, stay as they were), per-image generators skip it
    stochastic = sampler == "ddpm" or eta > 0 or not per_image
    with eval_mode(model), torch.no_grad():
        x = randn()
        order = range(resp.T - 1, -1, -1)
        if progress:
            from tqdm.auto import tqdm

            order = tqdm(order, desc=f"{sampler}-{steps}")
        for k in order:
            i = torch.full((b,), k, dtype=torch.long, device=device)
            p = resp.p_mean_variance(forward(x, i), x, i, clip_denoised=clip_denoised)
            noise = randn() if stochastic else None
            x = (
                _ddpm_step(p, x, i, noise)
                if sampler == "ddpm"
                else _ddim_step(resp, p, x, i, noise, eta)
            )
    return x


def image_generators(
    seed: int, start: int, n: int, device: torch.device | str = "cpu"
) -> list[torch.Generator]:
    """One generator per image for images ``start`` .. ``start + n - 1`` of a draw seeded
    ``seed``, each seeded from (seed, image index) through numpy's SeedSequence (the index as
    its spawn key, so no (seed, index) pair shares another's stream): an image's noise is then
    the same whatever batch draws it (any batch size, order or process), and nearby seeds or
    indices give unrelated streams. Pass the list as ``sample(generator=...)``. ``seed`` is an
    int in [-2**63, 2**64), as torch's seeds (a negative one counts modulo 2**64).
    """
    check_seed(seed)
    if start < 0 or n < 0:
        raise ValueError(f"image indices must be >= 0, got start={start}, n={n}")
    root = int(seed) % 2**64
    seeds = [
        int(np.random.SeedSequence(root, spawn_key=(i,)).generate_state(1, np.uint64)[0])
        for i in range(start, start + n)
    ]
    return [torch.Generator(device).manual_seed(s) for s in seeds]


def check_seed(seed: Any) -> None:
    """A sampling seed: an int (numpy's too) in [-2**63, 2**64), the range torch seeds take."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if not -(2**63) <= int(seed) < 2**64:
        raise ValueError(f"seed must lie in [-2**63, 2**64), as torch's seeds, got {seed}")


def _ddpm_step(
    p: dict[str, torch.Tensor], x: torch.Tensor, i: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    nonzero = (i > 0).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    return p["mean"] + nonzero * torch.exp(0.5 * p["log_variance"]) * noise


def _ddim_step(
    resp: GaussianDiffusion,
    p: dict[str, torch.Tensor],
    x: torch.Tensor,
    i: torch.Tensor,
    noise: torch.Tensor | None,
    eta: float,
) -> torch.Tensor:
    ab_prev = resp._gather("ab_prev", i, x)
    # sigma^2 at eta = 1 is the posterior variance (1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev):
    # gathered from its float64 table (in float32 the product lost up to 1.3e-4 near t = 0)
    sigma = eta * resp._gather("post_var", i, x).sqrt()
    eps = p["pred_eps"]
    mean = (
        ab_prev.sqrt() * p["pred_x0"] + torch.sqrt((1.0 - ab_prev - sigma**2).clamp(min=0.0)) * eps
    )
    return mean if noise is None else mean + sigma * noise

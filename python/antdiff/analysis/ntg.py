"""Negative transfer gap (the paper's observation O2, Eq. 3 and Fig. 2).

For a timestep interval [t1, t2) a *specialist* is trained on the tasks t1 <= t < t2 only
(``train.t_range``, vanilla loss, same data / model / diffusion as the full model). Samples are
then drawn twice with the same sampler and the same noise: once with the full model, once with
:class:`IntervalRouter`, which hands every denoising step whose timestep lies in [t1, t2) to the
specialist and every other step to the full model. With a metric P where lower is better (FID):

    NTG([t1, t2)) = P(samples with the specialist inside [t1, t2)) - P(samples of the full model)

NTG < 0 means the specialist denoises its interval better than the jointly trained model: the
interval suffers negative transfer from the other tasks. Both runs share their Gaussian noise
(one generator per image, seeded from the seed and the image's index), so the difference comes
from the models, not from the draws; ``seed_gap`` (the full model's FID change under another
noise seed) shows the size of a gap the sampling noise alone produces. Intervals are 0-based and
half-open: the paper's [1, 200] is [0, 200) here.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..utils import atomic_write, atomic_write_text, git_describe

log = logging.getLogger(__name__)

__all__ = [
    "IntervalRouter",
    "check_intervals",
    "interval_label",
    "negative_transfer_gap",
    "load_run",
    "plot_ntg",
    "run_ntg",
    "sample_images",
    "specialist_config",
    "uniform_intervals",
    "write_ntg",
]

DEFINITION = (
    "NTG = FID(full model with the specialist inside [t1, t2)) - FID(full model); NTG < 0: the "
    "interval suffers negative transfer"
)


def check_visited(intervals: list[tuple[int, int]], T: int, steps: int, sampler: str) -> Any:  # noqa: N803
    """The sampler's timesteps; a ValueError when one of ``intervals`` holds none of them (its
    specialist would never run)."""
    from ..sampling import space_timesteps

    ts = space_timesteps(T, steps)
    for t1, t2 in intervals:
        if not ((ts >= t1) & (ts < t2)).any():
            raise ValueError(
                f"intervals: no step of the {steps}-step {sampler} sampler falls in "
                f"{interval_label(t1, t2)}, so the specialist would never run; use more steps"
            )
    return ts


def check_intervals(intervals: Any, T: int) -> list[tuple[int, int]]:  # noqa: N803
    """Validate ``[(t1, t2), ...]`` (0-based, half-open) against [0, T); return int pairs."""

    def whole(v: Any) -> bool:  # an int, or an integral finite float (numpy's included)
        number = isinstance(v, (int, float, np.integer, np.floating))
        return number and not isinstance(v, bool) and math.isfinite(v) and int(v) == v

    out = []
    for iv in intervals:
        if len(iv) != 2 or not all(whole(v) for v in iv):
            raise ValueError(f"intervals: each must be a pair of integers (t1, t2), got {iv!r}")
        t1, t2 = int(iv[0]), int(iv[1])
        if not 0 <= t1 < t2 <= T:
            raise ValueError(
                f"intervals: [{t1}, {t2}) is empty or outside [0, T={T}); valid intervals are "
                f"half-open [t1, t2) with 0 <= t1 < t2 <= {T}"
            )
        if (t1, t2) in out:  # a second specialist of the same interval would share its folder
            raise ValueError(f"intervals: [{t1}, {t2}) is given twice; name each interval once")
        out.append((t1, t2))
    if not out:
        raise ValueError("intervals: need at least one (t1, t2) pair")
    return out


def uniform_intervals(T: int, k: int) -> list[tuple[int, int]]:  # noqa: N803
    """The k equal intervals [i T / k, (i + 1) T / k) (Fig. 2 uses k = 5, T = 1000)."""
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= T:
        raise ValueError(f"k must be an integer in [1, T={T}], got {k!r}")
    return [(i * T // k, (i + 1) * T // k) for i in range(k)]


def interval_label(t1: int, t2: int) -> str:
    return f"[{t1}, {t2})"


class IntervalRouter(nn.Module):
    """``full`` everywhere except timesteps t1 <= t < t2, which go to ``specialist``.

    Routing is per sample (the batch is split by mask), so mixed timesteps are served exactly;
    samplers pass one timestep per step, which sends the whole batch to one model.
    """

    def __init__(self, full: nn.Module, specialist: nn.Module, t1: int, t2: int) -> None:
        super().__init__()
        if not 0 <= t1 < t2:
            raise ValueError(f"IntervalRouter: need 0 <= t1 < t2, got [{t1}, {t2})")
        self.full, self.specialist, self.t1, self.t2 = full, specialist, int(t1), int(t2)
        self.num_classes = getattr(full, "num_classes", None)

    def forward(self, x: torch.Tensor, t: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """x: [B, C, H, W]; t: [B] original timesteps; kwargs (e.g. y [B]) follow the split."""
        inside = (t >= self.t1) & (t < self.t2)
        n_in = int(inside.sum())  # sampling, not training: a host read is fine here
        if n_in == t.shape[0]:
            return self.specialist(x, t, **kwargs)
        if n_in == 0:
            return self.full(x, t, **kwargs)

        def part(m: torch.Tensor) -> dict[str, Any]:
            return {
                k: v[m] if isinstance(v, torch.Tensor) and v.shape[:1] == t.shape else v
                for k, v in kwargs.items()
            }

        a = self.specialist(x[inside], t[inside], **part(inside))
        b = self.full(x[~inside], t[~inside], **part(~inside))
        out = a.new_empty((t.shape[0], *a.shape[1:]))
        out[inside], out[~inside] = a, b
        return out


def specialist_config(cfg: Any, t1: int, t2: int, steps: int, out_dir: str | Path) -> Any:
    """The full model's config restricted to [t1, t2): vanilla loss, ``steps`` steps."""
    from ..config import config_from_dict

    d = cfg.to_dict()
    d["name"] = f"{cfg.name}-specialist-{t1}-{t2}"
    d["ant"].update(method="vanilla", method_kwargs={}, update_every=None)
    d["train"].update(t_range=[int(t1), int(t2)], steps=int(steps), out_dir=str(out_dir))
    return config_from_dict(d)


def sample_images(
    model: nn.Module,
    diffusion: Any,
    n: int,
    shape: tuple[int, ...],
    *,
    seed: int,
    sampler: str = "ddim",
    steps: int = 50,
    batch: int = 500,
    num_classes: int | None = None,
    cfg_scale: float = 1.0,
    clip_denoised: bool = True,
    cfg_channels: int | None = None,
    variance: str | None = None,
) -> torch.Tensor:
    """``n`` samples [n, *shape]; image i draws its noise from its own generator, seeded from
    (seed, i), so two models sampled with the same seed see identical noise (any ``batch``).
    ``variance``: DDPM's fixed reverse variance (see :func:`antdiff.sampling.sample`)."""
    from ..sampling import image_generators, sample

    device = next(model.parameters()).device
    out = []
    for lo in range(0, n, batch):
        b = min(batch, n - lo)
        y = None if num_classes is None else (torch.arange(lo, lo + b, device=device) % num_classes)
        x = sample(
            model, diffusion, (b, *shape), sampler=sampler, steps=steps, y=y,
            cfg_scale=cfg_scale, generator=image_generators(seed, lo, b, device),
            clip_denoised=clip_denoised, cfg_channels=cfg_channels, variance=variance,
        )  # fmt: skip
        out.append(x.cpu())
    return torch.cat(out)


def _quality(real: np.ndarray, images: torch.Tensor, extractor: Any, rank_def: bool) -> dict:
    from ..metrics import fid_from_features, precision_recall

    fake = extractor(images)
    pr = precision_recall(real, fake, k=3, features=extractor.name)
    fid = fid_from_features(real, fake, allow_rank_deficient=rank_def)
    return {"fid": float(fid), "precision": float(pr["precision"]), "recall": float(pr["recall"])}


def negative_transfer_gap(
    full: nn.Module,
    specialists: dict[tuple[int, int], nn.Module],
    diffusion: Any,
    real_images: torch.Tensor,
    extractor: Any,
    *,
    n_samples: int,
    shape: tuple[int, ...],
    seed: int = 0,
    sampler: str = "ddim",
    steps: int = 50,
    batch: int = 500,
    num_classes: int | None = None,
    cfg_scale: float = 1.0,
    clip_denoised: bool = True,
    decode: Any = None,
    cfg_channels: int | None = None,
    variance: str | None = None,
    seed_gap: bool = True,
    allow_rank_deficient: bool = False,
) -> dict[str, Any]:
    """NTG of every interval: specialists keyed by (t1, t2), all sampled with the same noise.

    Args:
        full: the model trained on all T tasks (EMA weights, eval mode).
        specialists: {(t1, t2): model trained on t1 <= t < t2}.
        diffusion: the training GaussianDiffusion (T, schedule, prediction).
        real_images: [N, C, H, W] reference images in [-1, 1].
        extractor: a FeatureExtractor (DigitsFeatures for digits: domain features).
        n_samples / shape / seed / sampler / steps / batch / num_classes / cfg_scale /
            clip_denoised / cfg_channels / variance: see :func:`sample_images`.
        decode: maps samples to images (latent models), or None.
        seed_gap: also sample the full model with seed + 10**6 (the noise-only FID change).
        allow_rank_deficient: accept n_samples <= feature dim (biased FID; tiny tests only).

    Returns:
        {"definition", "metric", "features", "full": {fid, precision, recall}, "seed_gap",
        "intervals": [{"t_range", "label", "steps_inside", "fid", "precision", "recall",
        "ntg"}, ...], plus the sampling settings}.
    """
    from ..sampling import variance_name

    intervals = check_intervals(list(specialists), diffusion.T)
    ts = check_visited(intervals, diffusion.T, steps, sampler)
    kw = dict(
        shape=shape, sampler=sampler, steps=steps, batch=batch, num_classes=num_classes,
        cfg_scale=cfg_scale, clip_denoised=clip_denoised, cfg_channels=cfg_channels,
        variance=variance,
    )  # fmt: skip
    real_feats = extractor(real_images)

    def quality(model: nn.Module, s: int) -> dict[str, float]:
        x = sample_images(model, diffusion, n_samples, seed=s, **kw)
        if decode is not None:
            with torch.no_grad():  # decoded images can leave [-1, 1]: clamp as eval does
                x = decode(x).float().clamp(-1.0, 1.0)
        return _quality(real_feats, x, extractor, allow_rank_deficient)

    base = quality(full, seed)
    gap = abs(quality(full, seed + 10**6)["fid"] - base["fid"]) if seed_gap else None
    rows = []
    for t1, t2 in intervals:
        spec = specialists[(t1, t2)]
        # sampling puts the router's modules back in their own modes, both models' included
        q = quality(IntervalRouter(full, spec, t1, t2), seed)
        inside = int(((ts >= t1) & (ts < t2)).sum())
        rows.append(
            {"t_range": [t1, t2], "label": interval_label(t1, t2), "steps_inside": inside,
             **q, "ntg": q["fid"] - base["fid"]}
        )  # fmt: skip
    return {
        "definition": DEFINITION,
        "metric": "FID",
        "features": extractor.name,
        "T": diffusion.T,
        "n_samples": n_samples,
        "n_real": int(real_images.shape[0]),
        "sampler": sampler,
        "sampling_steps": steps,
        "variance": variance_name(diffusion, sampler, variance),
        "seed": seed,
        "full": base,
        "seed_gap": gap,
        "intervals": rows,
    }


def plot_ntg(result: dict[str, Any], path: str | Path, title: str | None = None) -> Path:
    """Bar chart of NTG per interval (Fig. 2 style); bars below 0 mark negative transfer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["intervals"]
    ntg = np.array([r["ntg"] for r in rows], dtype=np.float64)
    fig, ax = plt.subplots(figsize=(1.3 * len(rows) + 2.6, 3.8), dpi=120)
    colors = ["tab:red" if v < 0 else "tab:blue" for v in ntg]
    x = np.arange(len(rows))
    ax.bar(x, ntg, color=colors, width=0.6)
    gap = result.get("seed_gap")
    if gap is not None and math.isfinite(gap):
        ax.axhspan(-gap, gap, color="0.85", zorder=0, label=f"noise-seed FID change ({gap:.3g})")
        ax.legend(loc="best", fontsize=8)
    ax.axhline(0.0, color="black", lw=0.8)
    for xi, v in zip(x, ntg):
        up = v >= 0
        ax.annotate(f"{v:+.3g}", (xi, v), xytext=(0, 2 if up else -2), textcoords="offset points",
                    ha="center", va="bottom" if up else "top", fontsize=8)  # fmt: skip
    ax.set_xticks(x, [r["label"] for r in rows])
    ax.set_xlabel("denoising tasks D[t1, t2) (0-based timesteps)")
    ax.set_ylabel("NTG (FID difference)")
    band = gap if gap is not None and math.isfinite(gap) else 0.0
    lo, hi = min(0.0, ntg.min(), -band), max(0.0, ntg.max(), band)
    pad = 0.15 * max(hi - lo, 1e-9)
    ax.set_ylim(lo - pad, hi + pad)
    feats = result.get("features", "")
    short = "domain (digits classifier) features" if "digits" in feats else feats
    ax.set_title(
        title or f"negative transfer gap, FID on {short}\n(red: NTG < 0, negative transfer)",
        fontsize=9,
    )
    fig.tight_layout()
    try:
        return atomic_write(path, lambda f: fig.savefig(f, format="png"))
    finally:
        plt.close(fig)


def write_ntg(result: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """``ntg.json`` and ``ntg.png`` in ``out_dir``, both written atomically: an earlier
    ntg.json goes first and the new one comes last, so a stop in between never leaves one
    run's figure beside another's numbers."""
    import json

    out = Path(out_dir)
    (out / "ntg.json").unlink(missing_ok=True)
    png = plot_ntg(result, out / "ntg.png")
    return atomic_write_text(out / "ntg.json", json.dumps(result, indent=2) + "\n"), png


# ------------------------------------------------------------------ training the models
def load_run(path: str | Path) -> Any:
    """A trained antdiff.train.Run from a checkpoint file or run directory (no training)."""
    from ..checkpoint import load_checkpoint
    from ..config import config_from_saved
    from ..train import build_run, restore

    state, _ = load_checkpoint(path)
    run = build_run(config_from_saved(state["config"]), state.get("codec"))
    restore(run, state)
    return run


def _trained(cfg: Any, what: str, flag: str) -> Any:
    """Train ``cfg``, resuming from its out_dir's newest checkpoint when there is one (a run
    already at train.steps just loads; one past it is refused: its results would not be those
    of train.steps)."""
    from ..checkpoint import list_checkpoints
    from ..train import train

    found = list_checkpoints(cfg.train.out_dir)
    done = int(found[-1].stem.split("_")[-1]) if found else 0  # ckpt_<step>.pt
    if done > cfg.train.steps:
        raise ValueError(
            f"{cfg.train.out_dir} holds a {what} trained for {done} steps, not the "
            f"{cfg.train.steps} asked for: pass {flag} {done} or another --out"
        )
    try:
        run = train(cfg, resume=True if found else None)["run"]
    except ValueError as exc:
        if not found or "config differs" not in str(exc):
            raise
        keys = "\n".join(ln for ln in str(exc).splitlines() if ln.startswith("  "))
        raise ValueError(  # train's advice (--allow-config-change) is not an ntg flag
            f"{cfg.train.out_dir} holds a {what} trained with another config:\n{keys}\n"
            "use another --out, pass the values it was trained with (e.g. --ant.sampling equal "
            "for a vanilla full model that an earlier antdiff trained from a paper preset), or "
            "remove that folder"
        ) from None
    if run.step != cfg.train.steps:
        raise ValueError(
            f"{cfg.train.out_dir} holds a {what} trained for {run.step} steps, not the "
            f"{cfg.train.steps} asked for: pass {flag} {run.step} or another --out"
        )
    return run


def run_ntg(
    cfg: Any | None,
    intervals: list[tuple[int, int]],
    *,
    specialist_steps: int,
    out_dir: str | Path,
    full: str | Path | None = None,
    n_samples: int = 1000,
    seed: int = 0,
    batch: int = 500,
    extractor: Any = None,
) -> dict[str, Any]:
    """Train (or reuse) the full model and one specialist per interval, measure NTG, and write
    ``ntg.json`` / ``ntg.png`` in ``out_dir``.

    Args:
        cfg: the full model's Config, trained as given (the paper's NTG uses
            ``ant.method="vanilla"``, as ``antdiff ntg --config`` does by default); None or
            ignored when ``full`` is given (its checkpoint's config is used).
        intervals: [(t1, t2), ...], 0-based half-open, inside [0, T).
        specialist_steps: training steps of each specialist.
        out_dir: results; the full model trains in ``full/``, specialists in
            ``specialist_<t1>_<t2>/`` (their checkpoints are reused by a later call).
        full: a trained run directory or checkpoint to use as the full model.
        n_samples, seed, batch: sampling (cfg.sample gives sampler, steps and guidance).
        extractor: feature network; default DigitsFeatures for digits (domain features, not
            comparable to published FIDs), else the Inception TorchScript network.
    """
    from ..config import config_from_dict
    from ..metrics.fid import check_enough_samples

    out = Path(out_dir)
    if full is None and cfg is None:
        raise ValueError("cfg: give the full model's Config, or full= a trained run")
    full_run = None if full is None else load_run(full)
    base = cfg if full_run is None else full_run.cfg
    intervals = check_intervals(intervals, base.diffusion.T)  # fail before any training
    check_visited(intervals, base.diffusion.T, base.sample.steps, base.sample.sampler)
    if base.data.source == "latents":  # no decoder: FID would read raw latents as images
        raise ValueError(
            f"the full model diffuses precomputed latents ({base.data.path}), and antdiff holds "
            "no decoder for them, so its samples cannot be scored as images: NTG compares FIDs. "
            "Run it on image data (data.source digits or folder, with data.autoencoder tiny for "
            "latent diffusion), or sample each model with `antdiff sample --vae DIR` (the VAE "
            "that encoded the latents) and score the images with antdiff.evaluate.score"
        )
    if base.ant.method != "vanilla":
        log.warning("the full model trains / trained with method %r; the paper's NTG compares "
                    "vanilla models (ant.method vanilla)", base.ant.method)  # fmt: skip
    if extractor is None:
        from ..metrics import DigitsFeatures, InceptionTorchScript

        source = base.data.source
        extractor = DigitsFeatures() if source == "digits" else InceptionTorchScript()
    # the metrics' own check, before the full model and the specialists train
    check_enough_samples(n_samples, extractor.dim, f"--n-samples {n_samples}", False, api=False)
    if full_run is None:
        d = cfg.to_dict()
        d["train"]["out_dir"] = str(out / "full")
        full_run = _trained(config_from_dict(d), "full model", "--train.steps")
    fc, data = full_run.cfg, full_run.data
    intervals = check_intervals(intervals, fc.diffusion.T)
    specialists = {}
    for t1, t2 in intervals:
        scfg = specialist_config(fc, t1, t2, specialist_steps, out / f"specialist_{t1}_{t2}")
        specialists[(t1, t2)] = _trained(scfg, "specialist", "--specialist-steps").ema.model
    decode = data.codec.decode if data.codec is not None else None
    with torch.no_grad():  # latent data: the reference is the decoded training set
        # images as stored (uint8 pixels are a quarter of a float32 copy; the extractor takes
        # them), on the host
        real = data.x if decode is None else decode(data.x).float().clamp(-1.0, 1.0)
    real = real.cpu()
    latents = fc.data.source == "latents" or decode is not None
    result = negative_transfer_gap(
        full_run.ema.model, specialists, full_run.diffusion, real, extractor,
        n_samples=n_samples, shape=tuple(data.shape), seed=seed, sampler=fc.sample.sampler,
        steps=fc.sample.steps, batch=batch, cfg_scale=fc.sample.cfg_scale,
        num_classes=data.num_classes if fc.data.class_conditional else None,
        clip_denoised=not latents, decode=decode, cfg_channels=fc.sample.cfg_channels,
        variance=fc.sample.ddpm_variance(),
    )  # fmt: skip
    result["full_model"] = {
        "run": str(full or out / "full"),
        "steps": full_run.step,
        "method": fc.ant.method,
    }
    result["specialist_steps"] = specialist_steps
    result["cfg_scale"] = fc.sample.cfg_scale
    result["cfg_channels"] = fc.sample.cfg_channels
    result["git_sha"] = git_describe()  # the code that made it
    write_ntg(result, out)
    return result

"""Gaussian diffusion: forward process, per-sample training losses, posterior helpers.

Conventions: timesteps are integer indices t in 0..T-1 (t = 0 least noisy), the forward process
is x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps with a_t = alphas_cumprod[t], and the network is
called as ``model(x_t, t, **model_kwargs)`` with t an int64 tensor [B].

:meth:`GaussianDiffusion.training_losses` returns PER-SAMPLE losses [B]: the ANT engine reduces
them into cluster losses afterwards, so nothing here averages over the batch.

With ``learn_sigma`` the model outputs 2C channels; the second half v in [-1, 1] sets the
log-variance log(sigma^2) = (v+1)/2 log(beta_t) + (1-v)/2 log(beta_tilde_t) (improved DDPM).
The loss is then the hybrid mse + vb, where vb is the variational bound term computed on a
stop-gradient mean (so it trains the variance only), scaled by T / 1000.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from antdiff.schedules import Schedule, as_schedule

__all__ = ["GaussianDiffusion", "mean_flat", "normal_kl", "discretized_gaussian_log_likelihood"]

_PREDICTIONS = ("eps", "x0", "v")
_WEIGHTINGS = (None, "p2", "min_snr")
FIXED_VARIANCES = ("small", "large")


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the first. x: [B, ...] -> [B]."""
    return x.reshape(x.shape[0], -1).mean(dim=1)


def normal_kl(
    mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor
) -> torch.Tensor:
    """Elementwise KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) in nats."""
    return 0.5 * (
        logvar2
        - logvar1
        + torch.exp(logvar1 - logvar2)
        + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
        - 1.0
    )


def _std_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor
) -> torch.Tensor:
    """Elementwise log-likelihood (nats) of data in [-1, 1] quantised to 256 bins.

    The end bins extend to -inf / +inf so the probabilities sum to one. The normal CDF is the
    exact one (erf); guided-diffusion's tanh approximation of it gives t = 0's decoder term
    up to ~1e-2 bits/dim more or less (0.4%), every other term alike.
    """
    centred = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = _std_normal_cdf(inv_std * (centred + 1.0 / 255.0))
    cdf_min = _std_normal_cdf(inv_std * (centred - 1.0 / 255.0))
    tiny = 1e-12
    log_cdf_plus = torch.log(cdf_plus.clamp(min=tiny))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=tiny))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=tiny))
    return torch.where(
        x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta)
    )


class GaussianDiffusion:
    """Discrete-time Gaussian diffusion over a :class:`~antdiff.schedules.Schedule`.

    Args:
        schedule: a Schedule, a schedule name, or an alphas_cumprod array [T].
        prediction: what the network predicts: "eps", "x0" or "v".
        learn_sigma: the network also outputs a variance interpolation (2C channels).
        loss_weighting: None, "p2" (1 / (p2_k + SNR)^p2_gamma) or "min_snr" (Min-SNR-gamma).
        p2_gamma, p2_k: P2 weighting constants.
        min_snr_gamma: the Min-SNR clamp.
        fixed_variance: reverse variance when not learned: "small" (beta_tilde) or "large"
            (beta, with beta_tilde_1 at t = 0).
    """

    def __init__(
        self,
        schedule: Any,
        prediction: str = "eps",
        learn_sigma: bool = False,
        loss_weighting: str | None = None,
        p2_gamma: float = 1.0,
        p2_k: float = 1.0,
        min_snr_gamma: float = 5.0,
        fixed_variance: str = "small",
    ) -> None:
        if prediction not in _PREDICTIONS:
            raise ValueError(f"prediction={prediction!r} is not valid; use one of {_PREDICTIONS}")
        if loss_weighting not in _WEIGHTINGS:
            raise ValueError(
                f"loss_weighting={loss_weighting!r} is not valid; use one of {_WEIGHTINGS}"
            )
        if fixed_variance not in FIXED_VARIANCES:
            raise ValueError(
                f"fixed_variance={fixed_variance!r} is not valid; use one of {FIXED_VARIANCES}"
            )
        if min_snr_gamma <= 0:
            raise ValueError(f"min_snr_gamma must be > 0, got {min_snr_gamma}")
        if p2_k < 0:
            raise ValueError(f"p2_k must be >= 0, got {p2_k}")
        self.schedule: Schedule = as_schedule(schedule)
        self.prediction = prediction
        self.learn_sigma = bool(learn_sigma)
        self.loss_weighting = loss_weighting
        self.p2_gamma = float(p2_gamma)
        self.p2_k = float(p2_k)
        self.min_snr_gamma = float(min_snr_gamma)
        self.fixed_variance = fixed_variance
        self._np = self._numpy_tables()
        self._cache: dict[torch.device, dict[str, torch.Tensor]] = {}

    @property
    def T(self) -> int:  # noqa: N802 - the number of timesteps
        return self.schedule.T

    def _numpy_tables(self) -> dict[str, np.ndarray]:
        ab = self.schedule.alphas_cumprod
        ab_prev = np.concatenate([[1.0], ab[:-1]])
        betas = 1.0 - ab / ab_prev
        post_var = betas * (1.0 - ab_prev) / (1.0 - ab)
        # beta_tilde_0 = 0; improved DDPM replaces log(0) by log(beta_tilde_1).
        first = post_var[1] if ab.size > 1 else betas[0]
        log_post_var = np.log(np.concatenate([[first], post_var[1:]]))
        large = np.concatenate([[first], betas[1:]])
        snr = ab / (1.0 - ab)
        return {
            "ab": ab,
            "ab_prev": ab_prev,
            "sqrt_ab": np.sqrt(ab),
            "sqrt_1m_ab": np.sqrt(1.0 - ab),
            "sqrt_recip_ab": np.sqrt(1.0 / ab),
            "sqrt_recipm1_ab": np.sqrt(1.0 / ab - 1.0),
            "betas": betas,
            "log_betas": np.log(betas),
            "post_var": post_var,
            "log_post_var": log_post_var,
            "fixed_var": post_var if self.fixed_variance == "small" else large,
            "log_fixed_var": log_post_var if self.fixed_variance == "small" else np.log(large),
            "post_c1": betas * np.sqrt(ab_prev) / (1.0 - ab),
            "post_c2": (1.0 - ab_prev) * np.sqrt(1.0 - betas) / (1.0 - ab),
            "snr": snr,
        }

    def table(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """Float64 table `name` (e.g. "snr", "ab", "betas") gathered at t [B] -> [B].

        The tables are moved to t's device once and cached there.
        """
        tables = self._cache.get(t.device)
        if tables is None:
            tables = {
                k: torch.from_numpy(np.array(v, dtype=np.float64)).to(t.device)
                for k, v in self._np.items()
            }
            self._cache[t.device] = tables
        # index_select, not tables[name][t]: a negative t is an index error, not t + T
        return tables[name].index_select(0, t)

    def _gather(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Table `name` at t, cast to like.dtype, shaped [B, 1, ..., 1] to broadcast."""
        out = self.table(name, t).to(like.dtype)
        return out.reshape(t.shape[0], *([1] * (like.ndim - 1)))

    # ---------------------------------------------------------------- forward process
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x0). x0, noise: [B, ...]; t: [B] int64 -> [B, ...]."""
        if (not isinstance(t, torch.Tensor) or t.dim() != 1
                or t.dtype not in (torch.int64, torch.int32)):  # fmt: skip
            raise ValueError(
                f"t must be a 1-D integer tensor [B] of int64 or int32, got "
                f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}"
                " (convert it with t.long())"
            )
        try:  # no read of t's values (a host sync on a GPU): the gather checks its bounds
            a = self._gather("sqrt_ab", t, x0)
        except IndexError as e:  # on the CPU; a GPU stops at a device-side assert
            raise ValueError(f"t must hold timesteps in [0, {self.T}): {e}") from e
        return a * x0 + self._gather("sqrt_1m_ab", t, x0) * noise

    def v_target(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """v = sqrt(a_t) eps - sqrt(1 - a_t) x0."""
        return self._gather("sqrt_ab", t, x0) * noise - self._gather("sqrt_1m_ab", t, x0) * x0

    def posterior_mean_variance(
        self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q(x_{t-1} | x_t, x0): (mean [B, ...], variance [B, 1..], clipped log-variance)."""
        mean = self._gather("post_c1", t, x_t) * x0 + self._gather("post_c2", t, x_t) * x_t
        return mean, self._gather("post_var", t, x_t), self._gather("log_post_var", t, x_t)

    # ------------------------------------------------------------ parameterisations
    def predict_x0(self, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x0 implied by a model output `out` [B, C, ...] (mean channels only)."""
        if self.prediction == "eps":
            return (
                self._gather("sqrt_recip_ab", t, x_t) * x_t
                - self._gather("sqrt_recipm1_ab", t, x_t) * out
            )
        if self.prediction == "x0":
            return out
        return self._gather("sqrt_ab", t, x_t) * x_t - self._gather("sqrt_1m_ab", t, x_t) * out

    def predict_eps(self, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """eps implied by a model output `out` [B, C, ...] (mean channels only)."""
        if self.prediction == "eps":
            return out
        if self.prediction == "x0":
            return self.eps_from_x0(out, x_t, t)
        return self._gather("sqrt_1m_ab", t, x_t) * x_t + self._gather("sqrt_ab", t, x_t) * out

    def eps_from_x0(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """eps = (x_t / sqrt(a_t) - x0) / sqrt(1/a_t - 1)."""
        return (self._gather("sqrt_recip_ab", t, x_t) * x_t - x0) / self._gather(
            "sqrt_recipm1_ab", t, x_t
        )

    def split_output(self, out: torch.Tensor, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Split [B, 2C, ...] into (prediction [B, C, ...], variance values [B, C, ...])."""
        if not self.learn_sigma:
            if out.shape[1] != channels:
                raise ValueError(
                    f"learn_sigma=False needs a model output with C = {channels} channels, got "
                    f"shape {tuple(out.shape)} (a learn_sigma model? set learn_sigma=True)"
                )
            return out, out.new_zeros(())
        if out.shape[1] != 2 * channels:
            raise ValueError(
                f"learn_sigma=True needs a model output with 2*C = {2 * channels} channels, "
                f"got shape {tuple(out.shape)}"
            )
        return out[:, :channels], out[:, channels:]

    def p_mean_variance(
        self, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, clip_denoised: bool = False
    ) -> dict[str, torch.Tensor]:
        """Reverse step p(x_{t-1} | x_t) from a raw model output [B, C or 2C, ...].

        Returns a dict with "mean", "log_variance" (learned or fixed), "pred_x0" and "pred_eps".
        """
        pred, var_values = self.split_output(out, x_t.shape[1])
        if self.learn_sigma:
            frac = (var_values + 1.0) / 2.0
            log_var = frac * self._gather("log_betas", t, x_t) + (1.0 - frac) * self._gather(
                "log_post_var", t, x_t
            )
        else:
            log_var = self._gather("log_fixed_var", t, x_t).expand_as(x_t)
        pred_x0 = self.predict_x0(pred, x_t, t)
        if clip_denoised:
            pred_x0 = pred_x0.clamp(-1.0, 1.0)
        mean, _, _ = self.posterior_mean_variance(pred_x0, x_t, t)
        pred_eps = (
            self.eps_from_x0(pred_x0, x_t, t) if clip_denoised else self.predict_eps(pred, x_t, t)
        )
        return {"mean": mean, "log_variance": log_var, "pred_x0": pred_x0, "pred_eps": pred_eps}

    # ------------------------------------------------------------------- training loss
    def per_sample_weight(self, t: torch.Tensor) -> torch.Tensor:
        """Loss weight w(t) [B] float32 (float64 tables gathered, then cast); ones if unweighted.

        P2: 1 / (p2_k + SNR)^p2_gamma on the MSE of whatever the model predicts (as P2's own
        code applies it; defined for eps prediction, where an x0 or v MSE differs by SNR or
        SNR / (SNR + 1), which P2 does not convert). Min-SNR-gamma, converted per prediction:
        min(SNR, g) / SNR (eps), min(SNR, g) (x0), min(SNR, g) / (SNR + 1) (v).
        """
        snr = self.table("snr", t)
        if self.loss_weighting == "p2":
            w = (self.p2_k + snr) ** (-self.p2_gamma)
        elif self.loss_weighting == "min_snr":
            clamped = snr.clamp(max=self.min_snr_gamma)
            denom = {"eps": snr, "x0": torch.ones_like(snr), "v": snr + 1.0}[self.prediction]
            w = clamped / denom
        else:
            w = torch.ones_like(snr)
        return w.float()

    def _vb_term(
        self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, out: torch.Tensor
    ) -> torch.Tensor:
        """Variational-bound term [B] in bits/dim; KL for t > 0, decoder NLL at t = 0."""
        true_mean, _, true_log_var = self.posterior_mean_variance(x0, x_t, t)
        p = self.p_mean_variance(out, x_t, t, clip_denoised=False)
        kl = mean_flat(normal_kl(true_mean, true_log_var, p["mean"], p["log_variance"]))
        nll = -mean_flat(
            discretized_gaussian_log_likelihood(x0, p["mean"], 0.5 * p["log_variance"])
        )
        return torch.where(t == 0, nll, kl) / math.log(2.0)

    def training_losses(
        self,
        model: torch.nn.Module,
        x0: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor | None = None,
        model_kwargs: dict[str, Any] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-sample losses for one batch. No reduction over the batch and no host sync.

        Args:
            model: called as model(x_t, t, **model_kwargs).
            x0: [B, C, ...] clean data.
            t: [B] int64 timestep indices in 0..T-1.
            noise: [B, C, ...] or None (drawn with randn_like).
            model_kwargs: extra model inputs (e.g. {"y": labels}).

        Returns:
            {"loss": [B], "mse": [B] (unweighted), "weight": [B], "vb": [B] if learn_sigma}.
            loss = weight * mse (+ vb); the weight multiplies the mse term only.
        """
        if t.ndim != 1 or t.shape[0] != x0.shape[0]:
            raise ValueError(f"t must have shape [B] = [{x0.shape[0]}], got {tuple(t.shape)}")
        if noise is None:
            noise = torch.randn_like(x0)
        elif noise.shape != x0.shape:  # broadcasting would give every sample the same noise
            raise ValueError(
                f"noise must have x0's shape {tuple(x0.shape)} (one draw per sample), got "
                f"{tuple(noise.shape)}"
            )
        x_t = self.q_sample(x0, t, noise)
        out = model(x_t, t, **(model_kwargs or {}))
        pred, var_values = self.split_output(out, x0.shape[1])
        if pred.shape != x0.shape:
            raise ValueError(
                f"model output mean part has shape {tuple(pred.shape)}, expected "
                f"{tuple(x0.shape)} (learn_sigma={self.learn_sigma})"
            )
        if self.prediction == "eps":
            target = noise
        elif self.prediction == "x0":
            target = x0
        else:
            target = self.v_target(x0, t, noise)
        mse = mean_flat((target - pred) ** 2)
        weight = self.per_sample_weight(t).to(mse.dtype)
        terms = {"mse": mse, "weight": weight}
        loss = weight * mse
        if self.learn_sigma:
            frozen = torch.cat([pred.detach(), var_values], dim=1)
            vb = self._vb_term(x0, x_t, t, frozen) * (self.T / 1000.0)
            terms["vb"] = vb
            loss = loss + vb
        terms["loss"] = loss
        return terms

    def __repr__(self) -> str:
        return (
            f"GaussianDiffusion({self.schedule!r}, prediction={self.prediction!r}, "
            f"learn_sigma={self.learn_sigma}, loss_weighting={self.loss_weighting!r})"
        )

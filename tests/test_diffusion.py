"""GaussianDiffusion against float64 closed forms computed independently here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from antdiff.diffusion import GaussianDiffusion, discretized_gaussian_log_likelihood, normal_kl
from antdiff.schedules import cosine_schedule, linear_schedule


def _ref_alphas_cumprod(T: int = 1000) -> np.ndarray:  # noqa: N803
    betas = np.linspace(1e-4 * 1000 / T, 0.02 * 1000 / T, T)
    return np.cumprod(1.0 - betas)


class ConstModel(nn.Module):
    """Returns a learnable constant [B, C_out, H, W]; gradients show which channels train."""

    def __init__(self, out: torch.Tensor) -> None:
        super().__init__()
        self.out = nn.Parameter(out.clone())

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.out * 1.0


class Oracle(nn.Module):
    """Outputs the true eps (mean channels) and a fixed variance value v (extra channels)."""

    def __init__(self, noise: torch.Tensor, v: float | None) -> None:
        super().__init__()
        self.noise, self.v = noise, v

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.v is None:
            return self.noise
        return torch.cat([self.noise, torch.full_like(self.noise, self.v)], dim=1)


def test_q_sample_closed_form_and_statistics():
    torch.manual_seed(0)
    diff = GaussianDiffusion(linear_schedule(1000))
    ab = _ref_alphas_cumprod()
    x0 = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 17, 500, 999])
    want = (
        np.sqrt(ab[t.numpy()])[:, None, None, None] * x0.numpy()
        + np.sqrt(1 - ab[t.numpy()])[:, None, None, None] * noise.numpy()
    )
    np.testing.assert_allclose(diff.q_sample(x0, t, noise).numpy(), want, rtol=1e-12, atol=1e-12)
    # Monte Carlo: x0 = 0.7, t = 300 -> mean sqrt(ab) * 0.7, variance 1 - ab.
    n = 200_000
    xs = diff.q_sample(torch.full((n, 1), 0.7), torch.full((n,), 300), torch.randn(n, 1))
    assert abs(xs.mean().item() - math.sqrt(ab[300]) * 0.7) < 0.01
    assert abs(xs.var().item() - (1 - ab[300])) < 0.01


def test_float32_inputs_stay_float32_and_float64_stays_float64():
    diff = GaussianDiffusion("cosine")
    t = torch.tensor([3, 900])
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(2, 1, 2, 2, dtype=dtype)
        assert diff.q_sample(x, t, x).dtype == dtype
        assert diff.predict_x0(x, x, t).dtype == dtype


def test_posterior_matches_bayes_rule():
    diff = GaussianDiffusion(linear_schedule(1000))
    ab = _ref_alphas_cumprod()
    ab_prev = np.concatenate([[1.0], ab[:-1]])
    alpha = ab / ab_prev
    beta = 1 - alpha
    t = torch.tensor([1, 2, 50, 999])
    x0 = torch.randn(4, 3, dtype=torch.float64)
    xt = torch.randn(4, 3, dtype=torch.float64)
    mean, var, _ = diff.posterior_mean_variance(x0, xt, t)
    tn = t.numpy()
    prec = alpha[tn] / beta[tn] + 1.0 / (1.0 - ab_prev[tn])
    ref_var = 1.0 / prec
    ref_mean = ref_var[:, None] * (
        np.sqrt(alpha[tn] / beta[tn] ** 2)[:, None] * xt.numpy()
        + (np.sqrt(ab_prev[tn]) / (1.0 - ab_prev[tn]))[:, None] * x0.numpy()
    )
    np.testing.assert_allclose(var.reshape(-1).numpy(), ref_var, rtol=1e-10)
    np.testing.assert_allclose(mean.numpy(), ref_mean, rtol=1e-9, atol=1e-12)
    # t = 0: x_{-1} is x0 itself.
    m0, v0, _ = diff.posterior_mean_variance(x0[:1], xt[:1], torch.tensor([0]))
    np.testing.assert_allclose(m0.numpy(), x0[:1].numpy(), atol=1e-12)
    assert v0.item() == 0.0


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_parameterisations_round_trip_float64(prediction):
    torch.manual_seed(1)
    diff = GaussianDiffusion(cosine_schedule(1000), prediction=prediction)
    ab = torch.tensor(np.array(cosine_schedule(1000).alphas_cumprod))
    t = torch.tensor([0, 1, 250, 700, 999])
    x0 = torch.randn(5, 2, 4, dtype=torch.float64)
    eps = torch.randn_like(x0)
    a = ab[t].reshape(-1, 1, 1)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
    target = {"eps": eps, "x0": x0, "v": a.sqrt() * eps - (1 - a).sqrt() * x0}[prediction]
    torch.testing.assert_close(diff.predict_x0(target, xt, t), x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(diff.predict_eps(target, xt, t), eps, rtol=1e-9, atol=1e-8)
    if prediction == "v":  # the training target is the one predict_* invert (its sign too)
        torch.testing.assert_close(diff.v_target(x0, t, eps), target, rtol=1e-12, atol=1e-12)


def test_the_log_variances_at_t0_take_beta_tilde_1():
    """beta_tilde_0 = 0: log(beta_tilde_1) stands in at t = 0 (improved DDPM), in the posterior
    log-variance (the learned-sigma interpolation, the hybrid loss's t = 0 term) and in the
    "large" variance; no sampling test sees it (DDPM adds no noise at t = 0)."""
    s = linear_schedule(1000)
    b, ab = s.betas, s.alphas_cumprod
    want = b[1] * (1 - ab[0]) / (1 - ab[1])
    zero = torch.tensor([0])
    for variance in ("small", "large"):
        d = GaussianDiffusion(s, fixed_variance=variance)
        assert float(d.table("log_post_var", zero)) == pytest.approx(np.log(want), rel=1e-12)
        assert float(d.table("log_fixed_var", zero)) == pytest.approx(np.log(want), rel=1e-12)
    assert float(d.table("log_fixed_var", torch.tensor([7]))) == pytest.approx(np.log(b[7]))


def test_training_losses_shape_mse_and_per_sample_independence():
    torch.manual_seed(2)
    diff = GaussianDiffusion("linear")
    net = nn.Sequential(
        nn.Conv2d(2, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.SiLU(), nn.Conv2d(8, 2, 3, padding=1)
    )

    def model(x, t):
        return net(x) * (1.0 + t.float()[:, None, None, None] / 1000.0)

    x0 = torch.randn(6, 2, 5, 5)
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 10, 200, 400, 800, 999])
    out = diff.training_losses(model, x0, t, noise)
    assert out["loss"].shape == (6,) and out["mse"].shape == (6,)
    with torch.no_grad():
        ref = ((model(diff.q_sample(x0, t, noise), t) - noise) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(out["mse"], ref)
    torch.testing.assert_close(out["loss"], out["mse"])
    x0b = x0.clone()
    x0b[3] += 5.0
    out_b = diff.training_losses(model, x0b, t, noise)
    changed = (out_b["loss"] - out["loss"]).abs() > 1e-6
    assert changed.tolist() == [False, False, False, True, False, False]


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_loss_weights_match_formulas(prediction):
    sched = linear_schedule(1000)
    ab = _ref_alphas_cumprod()
    snr = ab / (1 - ab)
    t = torch.arange(0, 1000, 37)
    s = snr[t.numpy()]
    p2 = GaussianDiffusion(sched, prediction, loss_weighting="p2", p2_gamma=0.5, p2_k=2.0)
    np.testing.assert_allclose(p2.per_sample_weight(t).numpy(), (2.0 + s) ** -0.5, rtol=1e-6)
    ms = GaussianDiffusion(sched, prediction, loss_weighting="min_snr", min_snr_gamma=5.0)
    denom = {"eps": s, "x0": np.ones_like(s), "v": s + 1.0}[prediction]
    np.testing.assert_allclose(
        ms.per_sample_weight(t).numpy(), np.minimum(s, 5.0) / denom, rtol=1e-6
    )
    plain = GaussianDiffusion(sched, prediction)
    assert torch.equal(plain.per_sample_weight(t), torch.ones(len(t)))
    x0 = torch.randn(len(t), 1, 2, 2)
    out = ms.training_losses(ConstModel(torch.zeros_like(x0)), x0, t)
    torch.testing.assert_close(out["loss"], out["mse"] * ms.per_sample_weight(t))


def test_hybrid_vb_closed_forms_and_stop_gradient():
    torch.manual_seed(3)
    T = 200  # noqa: N806 - vb is scaled by T / 1000
    diff = GaussianDiffusion(linear_schedule(T), learn_sigma=True)
    ab = _ref_alphas_cumprod(T)
    ab_prev = np.concatenate([[1.0], ab[:-1]])
    beta = 1 - ab / ab_prev
    bt = beta * (1 - ab_prev) / (1 - ab)
    t = torch.tensor([1, 5, 60, 199])
    x0 = torch.rand(4, 1, 3, 3) * 2 - 1
    noise = torch.randn_like(x0)
    # True eps + v = -1 (posterior variance): KL = 0. v = +1 (beta): closed-form Gaussian KL.
    vb = diff.training_losses(Oracle(noise, -1.0), x0, t, noise)["vb"]
    torch.testing.assert_close(vb, torch.zeros(4), atol=1e-5, rtol=0)
    vb = diff.training_losses(Oracle(noise, 1.0), x0, t, noise)["vb"]
    tn = t.numpy()
    kl = 0.5 * (np.log(beta[tn] / bt[tn]) + bt[tn] / beta[tn] - 1.0) / math.log(2.0)
    np.testing.assert_allclose(vb.numpy(), kl * T / 1000, rtol=1e-4, atol=1e-7)
    # Random outputs, all t including 0: finite, >= 0, gradient reaches the variance only.
    tt = torch.tensor([0, 0, 3, 100, 199, 150])
    x0 = torch.rand(6, 2, 4, 4) * 2 - 1
    model = ConstModel(torch.randn(6, 4, 4, 4) * 0.5)
    out = diff.training_losses(model, x0, tt)
    assert torch.isfinite(out["vb"]).all() and (out["vb"] >= 0).all()
    torch.testing.assert_close(out["loss"], out["mse"] + out["vb"])
    out["vb"].sum().backward()
    assert torch.all(model.out.grad[:, :2] == 0)
    assert torch.all(model.out.grad[:, 2:].abs().sum(dim=(1, 2, 3)) > 0)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="prediction"):
        GaussianDiffusion("linear", prediction="score")
    with pytest.raises(ValueError, match="loss_weighting"):
        GaussianDiffusion("linear", loss_weighting="snr")
    diff = GaussianDiffusion("linear", learn_sigma=True)
    x0 = torch.zeros(2, 3, 2, 2)
    with pytest.raises(ValueError, match="2\\*C"):
        diff.training_losses(ConstModel(torch.zeros(2, 3, 2, 2)), x0, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="shape \\[B\\]"):
        diff.training_losses(ConstModel(torch.zeros(2, 6, 2, 2)), x0, torch.tensor([1]))
    # noise that only broadcasts would give every sample the same draw
    model = ConstModel(torch.zeros(2, 6, 2, 2))
    for noise in (torch.zeros(1, 3, 2, 2), torch.zeros(3, 2, 2)):
        with pytest.raises(ValueError, match="noise must have x0's shape \\(2, 3, 2, 2\\)"):
            diff.training_losses(model, x0, torch.tensor([1, 2]), noise)
    with pytest.raises(ValueError, match="1-D integer tensor.*bool"):  # not an index error
        diff.q_sample(x0, torch.tensor([True, False]), x0)


def test_split_output_checks_the_channels_without_learned_sigma():
    """A learn_sigma model's 2C output with learn_sigma=False used to be broadcast into a
    2-channel sample."""
    diff = GaussianDiffusion("linear")
    x = torch.randn(2, 1, 4, 4)
    with pytest.raises(ValueError, match="learn_sigma=False needs a model output with C = 1"):
        diff.split_output(torch.randn(2, 2, 4, 4), 1)
    out, _ = diff.split_output(x, 1)
    assert out is x


def test_normal_kl_matches_torch_distributions_with_different_means():
    """normal_kl against torch.distributions where the means differ (the suite's only KL check
    has equal means, so the (m1 - m2)^2 / var2 term was never exercised)."""
    g = torch.Generator().manual_seed(0)
    m1, m2 = torch.randn(50, generator=g).double(), torch.randn(50, generator=g).double()
    lv1, lv2 = torch.randn(50, generator=g).double(), torch.randn(50, generator=g).double()
    normal = torch.distributions.Normal
    ref = torch.distributions.kl_divergence(normal(m1, (0.5 * lv1).exp()),
                                            normal(m2, (0.5 * lv2).exp()))  # fmt: skip
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), ref, rtol=1e-10, atol=1e-12)


def _ref_loglik(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    n = torch.distributions.Normal(mean, log_scale.exp())
    hi, lo = n.cdf(x + 1 / 255), n.cdf(x - 1 / 255)
    hi = torch.where(x > 0.999, torch.ones_like(hi), hi)  # last bin reaches +inf
    lo = torch.where(x < -0.999, torch.zeros_like(lo), lo)  # first bin reaches -inf
    return (hi - lo).log()


def test_discretized_loglik_is_a_distribution_over_the_256_bins():
    """Every one of the 256 bins, end bins included, against the Normal CDF; the probabilities
    sum to one for any mean / scale."""
    x = torch.linspace(-1.0, 1.0, 256, dtype=torch.float64)  # the bin centres of 8-bit data
    for mean, log_scale in [(0.1, -3.0), (-0.95, -2.0), (0.99, -4.0), (0.0, -1.0)]:
        m = torch.full_like(x, mean)
        ls = torch.full_like(x, log_scale)
        ll = discretized_gaussian_log_likelihood(x, m, ls)
        ref = _ref_loglik(x, m, ls)
        keep = ref > -20.0  # the implementation clamps probabilities at 1e-12
        assert keep.sum() > 5
        torch.testing.assert_close(ll[keep], ref[keep], rtol=1e-6, atol=1e-9)
        assert abs(float(ll.exp().sum()) - 1.0) < 1e-9


class _Const(nn.Module):
    def __init__(self, out: torch.Tensor) -> None:
        super().__init__()
        self.out = out

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.out


def test_vb_at_t0_is_the_decoder_nll_in_bits():
    """vb at t = 0 is -mean log p(x0 | x_1) / ln 2 (times T / 1000), at t > 0 the KL: the suite
    only checked t = 0's term for finiteness."""
    torch.manual_seed(1)
    T = 200  # noqa: N806
    diff = GaussianDiffusion(linear_schedule(T), learn_sigma=True)
    x0 = (torch.randint(0, 256, (3, 1, 4, 4)).double() / 127.5 - 1.0).float()
    t = torch.zeros(3, dtype=torch.long)
    noise = torch.randn_like(x0)
    out = torch.cat([torch.randn_like(x0) * 0.3, torch.rand_like(x0) * 2 - 1], dim=1)
    vb = diff.training_losses(_Const(out), x0, t, noise)["vb"]
    x_t = diff.q_sample(x0, t, noise)
    p = diff.p_mean_variance(out, x_t, t)
    ll = _ref_loglik(x0.double(), p["mean"].double(), 0.5 * p["log_variance"].double())
    want = -ll.reshape(3, -1).mean(1) / math.log(2.0) * (T / 1000)
    torch.testing.assert_close(vb.double(), want, rtol=1e-4, atol=1e-6)


# --- training targets, hybrid weighting, posterior/fixed variance tables, argument checks ---


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_training_mse_against_each_prediction_target(prediction):
    """The mse regresses eps, x0 or v = sqrt(a) eps - sqrt(1 - a) x0 (Salimans & Ho 2022)."""
    g = torch.Generator().manual_seed(4)
    diff = GaussianDiffusion(linear_schedule(1000), prediction=prediction)
    ab = _ref_alphas_cumprod()
    t = torch.tensor([0, 9, 333, 999])
    x0 = torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64)
    noise = torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64)
    pred = torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64)
    out = diff.training_losses(ConstModel(pred), x0, t, noise)
    a = ab[t.numpy()][:, None, None, None]
    x0n, en = x0.numpy(), noise.numpy()
    target = {"eps": en, "x0": x0n, "v": np.sqrt(a) * en - np.sqrt(1 - a) * x0n}[prediction]
    want = ((target - pred.numpy()) ** 2).reshape(4, -1).mean(axis=1)
    np.testing.assert_allclose(out["mse"].detach().numpy(), want, rtol=1e-10)


def test_hybrid_loss_weights_the_mse_term_only():
    """With a per-sample weighting and learned sigma: loss = w(t) * mse + vb (Min-SNR / P2 code)."""
    torch.manual_seed(5)
    T = 200  # noqa: N806
    sched = linear_schedule(T)
    ab = _ref_alphas_cumprod(T)
    t = torch.tensor([1, 20, 120, 199])
    x0 = torch.rand(4, 1, 3, 3) * 2 - 1
    noise = torch.randn_like(x0)
    model = ConstModel(torch.randn(4, 2, 3, 3) * 0.5)
    weighted = GaussianDiffusion(sched, learn_sigma=True, loss_weighting="min_snr")
    plain = GaussianDiffusion(sched, learn_sigma=True)
    out = weighted.training_losses(model, x0, t, noise)
    ref = plain.training_losses(model, x0, t, noise)
    snr = ab[t.numpy()] / (1 - ab[t.numpy()])
    w = np.minimum(snr, 5.0) / snr
    assert (w < 0.9).any() and (ref["vb"] > 1e-4).all()
    want = w * ref["mse"].detach().numpy() + ref["vb"].detach().numpy()
    np.testing.assert_allclose(out["loss"].detach().numpy(), want, rtol=1e-5)


def _beta_tilde(s) -> np.ndarray:
    """The posterior variance beta_t (1 - abar_{t-1}) / (1 - abar_t) (DDPM), float64."""
    ab = s.alphas_cumprod
    return s.betas * (1 - np.concatenate([[1.0], ab[:-1]])) / (1 - ab)


def test_posterior_log_variance_is_clipped_at_t0():
    s = linear_schedule(1000)
    bt = _beta_tilde(s)
    t = torch.tensor([0, 1, 40, 999])
    x = torch.zeros(4, 1, 2, 2, dtype=torch.float64)
    _, var, log_var = GaussianDiffusion(s).posterior_mean_variance(x, x, t)
    want = np.log(np.array([bt[1], bt[1], bt[40], bt[999]]))
    np.testing.assert_allclose(log_var.reshape(-1).numpy(), want, rtol=1e-12)
    np.testing.assert_allclose(var.reshape(-1).numpy(), bt[t.numpy()], rtol=1e-12)


def test_fixed_variance_tables_small_and_large():
    """The "small" table is beta_tilde_t, "large" beta_t with beta_tilde_1 at t = 0 (iDDPM)."""
    s = linear_schedule(1000)
    b, bt = s.betas, _beta_tilde(s)
    t = torch.tensor([0, 1, 500, 999])
    tn = t.numpy()
    small = GaussianDiffusion(s, fixed_variance="small").table("fixed_var", t).numpy()
    large = GaussianDiffusion(s, fixed_variance="large").table("fixed_var", t).numpy()
    np.testing.assert_allclose(small, bt[tn], rtol=1e-12)
    np.testing.assert_allclose(large, np.concatenate([[bt[1]], b[tn[1:]]]), rtol=1e-12)


def test_constructor_rejects_bad_constants():
    for gamma in (0.0, -1.0):
        with pytest.raises(ValueError, match="min_snr_gamma"):
            GaussianDiffusion("linear", loss_weighting="min_snr", min_snr_gamma=gamma)
    with pytest.raises(ValueError, match="p2_k"):
        GaussianDiffusion("linear", loss_weighting="p2", p2_k=-0.5)
    GaussianDiffusion("linear", loss_weighting="p2", p2_k=0.0)  # k = 0 is allowed
    with pytest.raises(ValueError, match="fixed_variance"):
        GaussianDiffusion("linear", fixed_variance="learned")


def test_q_sample_rejects_float_and_2d_timesteps():
    """and integer dtypes that cannot index (uint8, int16: a bare RuntimeError from the gather
    before); int32 indexes as int64 does."""
    diff = GaussianDiffusion("linear")
    x = torch.randn(2, 1, 2, 2)
    t = torch.tensor([1, 2])
    bads = (torch.tensor([1.0, 2.0]), torch.tensor([[1, 2]]), torch.tensor(3), t.to(torch.uint8),
            t.to(torch.int16))  # fmt: skip
    for bad in bads:
        with pytest.raises(ValueError, match="1-D integer tensor.*int64 or int32"):
            diff.q_sample(x, bad, x)
    assert torch.equal(diff.q_sample(x, t.int(), x), diff.q_sample(x, t, x))


def test_model_output_with_another_spatial_shape_raises():
    """A [B, C, 1, 1] output would broadcast against the [B, C, H, W] target."""
    diff = GaussianDiffusion("linear")
    x0 = torch.zeros(2, 1, 3, 3)
    with pytest.raises(ValueError, match="model output mean part has shape"):
        diff.training_losses(ConstModel(torch.zeros(2, 1, 1, 1)), x0, torch.tensor([1, 2]))


def test_training_losses_passes_model_kwargs():
    class Labelled(nn.Module):
        def forward(self, x, t, y):
            return torch.zeros_like(x) + y.to(x.dtype).view(-1, 1, 1, 1)

    diff = GaussianDiffusion("linear")
    x0 = torch.randn(3, 1, 2, 2, dtype=torch.float64)
    noise = torch.randn_like(x0)
    y = torch.tensor([0, 1, 2])
    out = diff.training_losses(Labelled(), x0, torch.tensor([5, 6, 7]), noise, {"y": y})
    want = ((noise - y.double().view(-1, 1, 1, 1)) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(out["mse"], want, rtol=1e-12, atol=1e-12)


def test_default_noise_is_a_standard_normal_draw():
    """noise=None: eps ~ N(0, I), so a zero eps prediction has E[mse] = 1 (4096 values/sample)."""
    torch.manual_seed(6)
    diff = GaussianDiffusion("linear")
    x0 = torch.zeros(3, 1, 64, 64)
    mse = diff.training_losses(ConstModel(torch.zeros_like(x0)), x0, torch.tensor([0, 500, 999]))
    assert ((mse["mse"] - 1.0).abs() < 0.15).all()  # sd of the mean ~ 0.022

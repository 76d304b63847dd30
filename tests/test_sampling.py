"""Samplers: respacing, oracle recovery, DDIM(eta=1) == DDPM, classifier-free guidance."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from antdiff.diffusion import GaussianDiffusion
from antdiff.models import create_model
from antdiff.sampling import guided_output, respace, sample, space_timesteps
from antdiff.schedules import cosine_schedule, linear_schedule


class PointOracle(nn.Module):
    """Exact denoiser for the one-point data distribution x0 = c, in any parameterisation.

    Uses its own float64 alphas_cumprod at the ORIGINAL timestep index, so a wrong timestep
    map in the sampler gives a wrong answer.
    """

    def __init__(self, c: torch.Tensor, ab: np.ndarray, prediction: str, learn_sigma: bool):
        super().__init__()
        self.c, self.ab, self.prediction, self.learn_sigma = c, ab, prediction, learn_sigma

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = torch.tensor(self.ab)[t.cpu()].reshape(-1, 1, 1, 1)
        xd = x.double()
        eps = (xd - a.sqrt() * self.c) / (1 - a).sqrt()
        out = {
            "eps": eps,
            "x0": self.c.expand_as(xd),
            "v": a.sqrt() * eps - (1 - a).sqrt() * self.c,
        }
        out = out[self.prediction].float()
        return torch.cat([out, torch.zeros_like(out)], 1) if self.learn_sigma else out


class Wavy(nn.Module):
    """A smooth, timestep-dependent stand-in for a trained network (no parameters)."""

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None):
        s = (t.float() / 1000.0).reshape(-1, 1, 1, 1)
        return 0.8 * torch.tanh(x) * (1 - s) + 0.3 * torch.sin(2 * x) * s


@pytest.mark.parametrize("spacing", ["linspace", "trailing", "leading"])
def test_space_timesteps(spacing):
    for T, S in [(1000, 50), (1000, 250), (1000, 7), (97, 13), (10, 10), (5, 1)]:  # noqa: N806
        ts = space_timesteps(T, S, spacing)
        assert ts.shape == (S,) and ts.dtype == np.int64
        assert np.all(np.diff(ts) > 0) and ts[0] >= 0 and ts[-1] <= T - 1
        if S == T:
            assert np.array_equal(ts, np.arange(T))
    assert space_timesteps(1000, 50, "linspace")[[0, -1]].tolist() == [0, 999]
    assert space_timesteps(1000, 50, "trailing").tolist()[-2:] == [979, 999]
    assert space_timesteps(1000, 50, "leading").tolist()[:2] == [0, 20]
    # one step starts from pure noise under every spacing (t = 0 would return the noise)
    assert space_timesteps(1000, 1, spacing).tolist() == [999]
    with pytest.raises(ValueError, match="steps"):
        space_timesteps(10, 11, spacing)
    with pytest.raises(ValueError, match="spacing"):
        space_timesteps(10, 5, "uniform")


def test_spacings_round_ties_as_guided_diffusion_and_diffusers_do():
    """linspace rounded ties half up (S = 25 at T = 1000 visited 167 and 833 where ADM's
    --timestep_respacing 25 visits 166 and 832: 299 of the 1000 S differed); trailing rounded
    half up where diffusers' trailing spacing rounds half to even (S = 400 started at t = 2)."""
    ts = space_timesteps(1000, 25, "linspace").tolist()
    assert 166 in ts and 832 in ts and 167 not in ts and 833 not in ts
    assert space_timesteps(1000, 400, "trailing").tolist()[:4] == [1, 4, 7, 9]
    for S in range(2, 1001):  # noqa: N806 - no two steps merge, whatever the ties
        for spacing in ("linspace", "trailing"):
            assert np.all(np.diff(space_timesteps(1000, S, spacing)) > 0)


def test_leading_spacing_that_starts_inside_the_process_warns():
    """"leading" with stride T // S = 1 (S > T/2) or 2 (S = 334) started sampling from pure
    noise at t = S - 1 or 666, where x_t still holds 28% or 10% of the data, silently."""
    diff = GaussianDiffusion("linear")
    zero = Wavy()
    for steps, start in ((501, 500), (334, 666)):
        with pytest.warns(UserWarning, match=f"steps={steps} starts the chain at t={start}"):
            sample(zero, diff, (1, 1, 2, 2), sampler="ddim", steps=steps, spacing="leading")
    with warnings.catch_warnings():  # 50 steps divide T; 30 start at t = 957; linspace ends at T-1
        warnings.simplefilter("error")
        for steps, spacing in ((50, "leading"), (30, "leading"), (501, "linspace")):
            sample(zero, diff, (1, 1, 2, 2), sampler="ddim", steps=steps, spacing=spacing)
        # the cosine schedule: DDIM-50 (a divisor of T) starts at t = 980, sqrt(alpha_bar) 0.03
        cos = GaussianDiffusion("cosine")
        for steps in (10, 25, 50):
            sample(zero, cos, (1, 1, 2, 2), sampler="ddim", steps=steps, spacing="leading")


def test_respaced_schedule_consistent_with_original():
    diff = GaussianDiffusion(linear_schedule(1000), learn_sigma=True)
    ab = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    kept = space_timesteps(1000, 250)
    resp, tmap = respace(diff, kept)
    assert resp.T == 250 and np.array_equal(tmap, kept)
    np.testing.assert_allclose(resp.schedule.alphas_cumprod, ab[kept], rtol=1e-12)
    prev = np.concatenate([[1.0], ab[kept][:-1]])
    np.testing.assert_allclose(resp.schedule.betas, 1 - ab[kept] / prev, rtol=1e-10)
    assert resp.learn_sigma and resp.prediction == "eps"


@pytest.mark.parametrize(
    "sampler,prediction,learn_sigma,steps,sched,spacing",
    [
        ("ddim", "eps", False, 50, "linear", "linspace"),
        ("ddim", "eps", False, 50, "linear", "trailing"),
        ("ddim", "v", True, 20, "cosine", "trailing"),
        ("ddim", "x0", False, 13, "linear", "leading"),
        ("ddpm", "eps", True, 250, "cosine", "linspace"),
        ("ddpm", "eps", False, 40, "linear", "trailing"),
        ("ddpm", "v", False, 40, "linear", "trailing"),
    ],
)
def test_oracle_recovers_the_data_point(sampler, prediction, learn_sigma, steps, sched, spacing):
    schedule = linear_schedule(1000) if sched == "linear" else cosine_schedule(1000)
    diff = GaussianDiffusion(schedule, prediction=prediction, learn_sigma=learn_sigma)
    c = torch.tensor([0.5, -0.25, 0.9], dtype=torch.float64).reshape(1, 3, 1, 1)
    oracle = PointOracle(c, np.array(schedule.alphas_cumprod), prediction, learn_sigma)
    g = torch.Generator().manual_seed(0)
    x = sample(
        oracle, diff, (4, 3, 2, 2), sampler=sampler, steps=steps, generator=g, spacing=spacing
    )
    torch.testing.assert_close(x, c.float().expand(4, 3, 2, 2), atol=2e-4, rtol=0)


def test_model_sees_original_timesteps_in_descending_order():
    seen = []

    def model(x, t):
        seen.append(t.clone())
        return torch.zeros_like(x)

    diff = GaussianDiffusion("linear")
    for spacing in ("linspace", "trailing"):
        seen.clear()
        sample(model, diff, (2, 1, 2, 2), steps=7, spacing=spacing)
        want = space_timesteps(1000, 7, spacing)[::-1]
        assert [s.tolist() for s in seen] == [[int(v), int(v)] for v in want]
        assert all(s.dtype == torch.int64 for s in seen)


def test_ddim_eta0_deterministic_and_seeded():
    diff = GaussianDiffusion("linear")
    shape = (3, 2, 4, 4)
    a = sample(Wavy(), diff, shape, steps=10, generator=torch.Generator().manual_seed(1))
    b = sample(Wavy(), diff, shape, steps=10, generator=torch.Generator().manual_seed(1))
    c = sample(Wavy(), diff, shape, steps=10, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert torch.isfinite(a).all()


def test_ddim_eta1_equals_ddpm_with_posterior_variance():
    # DDIM's eta = 1 variance is exactly beta_tilde and its mean the q(x_{t-1}|x_t, x0) mean.
    diff = GaussianDiffusion("cosine", fixed_variance="small")
    shape = (2, 1, 3, 3)
    kw = dict(steps=25, clip_denoised=True)
    ddim = sample(
        Wavy(),
        diff,
        shape,
        sampler="ddim",
        eta=1.0,
        generator=torch.Generator().manual_seed(5),
        **kw,
    )
    ddpm = sample(
        Wavy(), diff, shape, sampler="ddpm", generator=torch.Generator().manual_seed(5), **kw
    )
    torch.testing.assert_close(ddim, ddpm, atol=1e-4, rtol=1e-4)


def test_ddim_eta1_matches_ddpm_over_all_steps():
    """Over all 1000 steps (down to t = 1, where sigma^2's float32 product lost 1.3e-4
    relative), DDIM's eta = 1 chain stays on DDPM's: 1.0e-5 apart before, 1.6e-6 now."""
    diff = GaussianDiffusion("linear", fixed_variance="small")
    kw = dict(steps=1000, clip_denoised=True)
    runs = [sample(Wavy(), diff, (2, 1, 3, 3), sampler=name, generator=torch.Generator()
                   .manual_seed(5), **kw, **extra)
            for name, extra in (("ddim", {"eta": 1.0}), ("ddpm", {}))]  # fmt: skip
    assert float((runs[0] - runs[1]).abs().max()) < 4e-6


def _randomised(model: nn.Module) -> nn.Module:
    """Re-draw zero-initialised weights so outputs depend on the class label."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def test_cfg_formula_and_scale_one_equals_conditional():
    model = _randomised(create_model("dit-tiny"))
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([5, 500, 999])
    y = torch.tensor([1, 7, 3])
    with torch.no_grad():
        cond = model(x, t, y=y)
        uncond = model(x, t, y=torch.full_like(y, 10))
        g1 = guided_output(model, x, t, y, 1.0, 10, channels=1)
        g4 = guided_output(model, x, t, y, 4.0, 10, channels=1)
    assert not torch.allclose(cond, uncond)
    torch.testing.assert_close(g1, cond, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g4, uncond + 4.0 * (cond - uncond), atol=1e-5, rtol=1e-5)


def test_cfg_learned_variance_taken_from_conditional_half():
    model = _randomised(create_model("dit-tiny", learn_sigma=True))
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 700]), torch.tensor([2, 9])
    with torch.no_grad():
        g = guided_output(model, x, t, y, 3.0, 10, channels=1)
        cond = model(x, t, y=y)
    assert g.shape == (2, 2, 8, 8)
    torch.testing.assert_close(g[:, 1:], cond[:, 1:], atol=1e-5, rtol=1e-5)


def test_cfg_sampling_runs_and_restores_training_mode():
    model = _randomised(create_model("dit-tiny", learn_sigma=True)).train()
    diff = GaussianDiffusion("cosine", learn_sigma=True)
    y = torch.tensor([0, 4, 9])
    kw = dict(steps=8, y=y, generator=None)
    for sampler in ("ddim", "ddpm"):
        x1 = sample(model, diff, (3, 1, 8, 8), sampler=sampler, cfg_scale=1.0, **kw)
        g = torch.Generator().manual_seed(0)
        x4 = sample(
            model, diff, (3, 1, 8, 8), sampler=sampler, cfg_scale=4.0, **{**kw, "generator": g}
        )
        assert x1.shape == x4.shape == (3, 1, 8, 8)
        assert torch.isfinite(x4).all()
    assert model.training  # sample() switched to eval for label dropout, then back


def test_sample_bad_arguments():
    diff = GaussianDiffusion("linear")
    with pytest.raises(ValueError, match="sampler"):
        sample(Wavy(), diff, (1, 1, 2, 2), sampler="euler")
    with pytest.raises(ValueError, match="steps"):
        sample(Wavy(), diff, (1, 1, 2, 2), steps=1001)
    with pytest.raises(ValueError, match="y must have shape"):
        sample(Wavy(), diff, (2, 1, 2, 2), y=torch.tensor([1]))
    for y in (torch.tensor([2.7, 9.9]), torch.tensor([True, False])):  # 2.7 became class 2
        with pytest.raises(ValueError, match="y must hold integer class labels"):
            sample(Wavy(), diff, (2, 1, 2, 2), y=y)
    with pytest.raises(ValueError, match="null class"):
        sample(Wavy(), diff, (1, 1, 2, 2), y=torch.tensor([1]), cfg_scale=2.0)
    with pytest.raises(ValueError, match="needs class labels"):
        sample(Wavy(), diff, (1, 1, 2, 2), cfg_scale=2.0)
    with pytest.raises(ValueError, match="sampler='ddim' only"):
        sample(Wavy(), diff, (1, 1, 2, 2), sampler="ddpm", eta=0.5)
    for eta in (float("nan"), 1.5, -0.1):  # NaN gave NaN samples; > 1 clamped DDIM's direction
        with pytest.raises(ValueError, match=r"eta must be in \[0, 1\]"):
            sample(Wavy(), diff, (1, 1, 2, 2), eta=eta)
    for scale in (float("nan"), float("inf")):  # every sample was NaN, without a word
        with pytest.raises(ValueError, match="cfg_scale must be a finite number"):
            sample(Wavy(), diff, (1, 1, 2, 2), y=torch.tensor([1]), cfg_scale=scale)


def test_guidance_through_an_untrained_null_class_is_refused(tmp_path):
    """The null label is trained only by label dropout: with class_dropout_prob = 0 (the ADM
    default) guidance mixed in a random embedding. sample() and the trainer (whose previews
    guide) refuse it; DiT's default dropout (0.1) and an explicit null_class are accepted."""
    from antdiff.config import load_config
    from antdiff.train import build_run

    diff = GaussianDiffusion(linear_schedule(50))
    adm = create_model("adm-tiny", num_classes=10, in_channels=1)
    assert adm.class_dropout_prob == 0
    y = torch.tensor([1, 2])
    with pytest.raises(ValueError, match="class_dropout_prob=0.*class_dropout_prob 0.1"):
        sample(adm, diff, (2, 1, 8, 8), steps=2, y=y, cfg_scale=2.0)
    sample(adm, diff, (2, 1, 8, 8), steps=2, y=y, cfg_scale=1.0)  # plain conditional: fine
    dit = create_model("dit-tiny", num_classes=10)
    sample(dit, diff, (2, 1, 8, 8), steps=2, y=y, cfg_scale=2.0)
    base = ["--data.class_conditional", "true", "--sample.cfg_scale", "2.0",
            "--train.out_dir", str(tmp_path / "run"), "--train.progress", "false"]  # fmt: skip
    with pytest.raises(ValueError, match="class_dropout_prob=0"):
        build_run(load_config("digits_adm", base))
    cfg = load_config("digits_adm", [*base, "--model.overrides.class_dropout_prob", "0.1"])
    assert build_run(cfg).model.class_dropout_prob == 0.1


def test_timesteps_outside_the_range_are_an_error_not_wrapped():
    """t = -1 used t = T - 1's coefficients (negative indexing)."""
    diff = GaussianDiffusion(linear_schedule(50))
    x = torch.zeros(2, 1, 2, 2)
    for bad in (-1, 50):
        with pytest.raises(ValueError, match=r"t must hold timesteps in \[0, 50\)"):
            diff.q_sample(x, torch.tensor([bad, 3]), x)


def test_cfg_on_the_first_channels_only():
    """cfg_channels=N guides the first N mean channels and takes the others (and the learned
    variance) from the conditional half, as the DiT code does with 3 of 4 latent channels;
    N = C is plain guidance, and an N outside [1, C] is refused."""
    model = _randomised(create_model("dit-tiny", in_channels=4, learn_sigma=True))
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.tensor([2, 9])
    with torch.no_grad():
        cond = model(x, t, y=y)
        uncond = model(x, t, y=torch.full_like(y, 10))
        g3 = guided_output(model, x, t, y, 3.0, 10, channels=4, guided=3)
        g4 = guided_output(model, x, t, y, 3.0, 10, channels=4, guided=4)
        gall = guided_output(model, x, t, y, 3.0, 10, channels=4)
    torch.testing.assert_close(g3[:, :3], (uncond + 3.0 * (cond - uncond))[:, :3])
    torch.testing.assert_close(g3[:, 3:], cond[:, 3:])
    torch.testing.assert_close(g4, gall)
    diff = GaussianDiffusion("cosine", learn_sigma=True)
    draw = [sample(model, diff, (2, 4, 8, 8), steps=4, y=y, cfg_scale=3.0, cfg_channels=n,
                   generator=torch.Generator().manual_seed(0), clip_denoised=False)
            for n in (3, None)]  # fmt: skip
    assert not torch.equal(*draw)
    for bad in (0, 5, True, 2.0):
        with pytest.raises(ValueError, match=r"must be None \(all.*an int in \[1, 4\]"):
            sample(model, diff, (2, 4, 8, 8), steps=2, y=y, cfg_scale=3.0, cfg_channels=bad)


def test_ddpm_variance_large_is_beta_t_and_checked():
    """variance="large" samples DDPM with beta_t (the diffusion built with fixed_variance=
    "large" gives the same chain), "small" with beta_tilde; DDIM and learn_sigma refuse it."""
    shape, kw = (2, 1, 3, 3), dict(sampler="ddpm", steps=20)

    def draw(diff, **extra):
        return sample(Wavy(), diff, shape, generator=torch.Generator().manual_seed(3), **kw,
                      **extra)  # fmt: skip

    small = GaussianDiffusion("linear")
    large = draw(small, variance="large")
    torch.testing.assert_close(large, draw(GaussianDiffusion("linear", fixed_variance="large")),
                               rtol=0, atol=0)  # fmt: skip
    assert torch.equal(draw(small, variance="small"), draw(small))
    assert (large - draw(small)).abs().max() > 1e-3
    with pytest.raises(ValueError, match="one of"):
        draw(small, variance="huge")
    with pytest.raises(ValueError, match="applies to sampler='ddpm', not 'ddim'"):
        sample(Wavy(), small, shape, steps=5, variance="large")
    with pytest.raises(ValueError, match="learns its variance"):
        draw(GaussianDiffusion("linear", learn_sigma=True), variance="large")


class _LabelSpy(nn.Module):
    num_classes = 10

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, x, t, y=None):  # noqa: ANN001, ANN201
        self.seen.append(y.clone())
        return torch.zeros_like(x)


def test_default_null_class_is_num_classes():
    """cfg without null_class: the unconditional half gets label model.num_classes."""
    model = _LabelSpy()
    y = torch.tensor([0, 3, 9])
    sample(model, GaussianDiffusion("cosine"), (3, 1, 4, 4), steps=2, y=y, cfg_scale=3.0)
    assert model.seen
    for labels in model.seen:
        assert labels.tolist() == [0, 3, 9, 10, 10, 10]


def test_space_timesteps_refuses_steps_that_are_not_a_count():
    for bad in (0, -1, 50.0, 2.5, "50", True, np.bool_(True)):
        with pytest.raises(ValueError, match=r"steps must be an integer in \[1, T=1000\]"):
            space_timesteps(1000, bad)
    from antdiff.sampling import check_settings

    with pytest.raises(ValueError, match="steps must be an integer"):  # with T as without it
        check_settings(1000, sampler="ddim", steps=True)


def test_check_settings_makes_samples_checks_up_front():
    """check_settings raises what sample() would, before any work: sampler, eta, spacing,
    steps against T (with T) or steps >= 1 (without)."""
    from antdiff.sampling import check_settings

    check_settings(1000, sampler="ddim", steps=1000, eta=1.0, spacing="trailing")
    check_settings(sampler="ddpm", steps=7)
    check_settings()
    with pytest.raises(ValueError, match=r"sampler='euler' is not valid; use one of"):
        check_settings(sampler="euler")
    with pytest.raises(ValueError, match=r"spacing='uniform' is not valid; use one of"):
        check_settings(spacing="uniform")
    with pytest.raises(ValueError, match=r"steps must be an integer in \[1, T=50\], got 51"):
        check_settings(50, sampler="ddim", steps=51)
    for bad in (0, -2, True, 2.0):
        with pytest.raises(ValueError, match="steps must be an integer >= 1"):
            check_settings(sampler="ddim", steps=bad)
    with pytest.raises(ValueError, match="sampler='ddim' only"):
        check_settings(sampler="ddpm", eta=0.5)


def test_respace_refuses_repeated_or_out_of_range_timesteps():
    """A repeated step (a zero beta), t = T (past the end) and t = -1 (wrapping to T - 1)."""
    diff = GaussianDiffusion(linear_schedule(50))
    with pytest.raises(ValueError, match="non-empty increasing 1-D array"):
        respace(diff, np.array([0, 5, 5, 9]))
    for bad in ([0, 50], [-1, 3]):
        with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 49\]"):
            respace(diff, np.array(bad))


def _reference_chain(model, ab, ts, shape, seed, sampler, eta=0.0, clip=True):
    """DDPM ancestral / DDIM(eta) sampling in float64 from the published formulas, for an eps
    model on the respaced chain a_k = ab[ts[k]], drawing the generator's normals in sample()'s
    order (x_T, then one draw per step)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).double()
    a = ab[ts]
    a_prev = np.concatenate([[1.0], a[:-1]])
    for k in range(len(ts) - 1, -1, -1):
        out = model(x.float(), torch.full((shape[0],), int(ts[k]))).double()
        x0 = (x - np.sqrt(1 - a[k]) * out) / np.sqrt(a[k])
        if clip:
            x0 = x0.clamp(-1, 1)
        eps = (x - np.sqrt(a[k]) * x0) / np.sqrt(1 - a[k])
        noise = torch.randn(shape, generator=g).double()
        beta = 1 - a[k] / a_prev[k]
        post_var = beta * (1 - a_prev[k]) / (1 - a[k])  # beta_tilde
        if sampler == "ddim":  # Song et al. (12), sigma from (16)
            sigma = eta * np.sqrt(post_var)
            x = np.sqrt(a_prev[k]) * x0 + np.sqrt(1 - a_prev[k] - sigma**2) * eps + sigma * noise
        else:  # Ho et al. (7): the q(x_{t-1} | x_t, x0) mean, beta_tilde variance
            mean = (np.sqrt(a_prev[k]) * beta / (1 - a[k])) * x0 + (
                np.sqrt(1 - beta) * (1 - a_prev[k]) / (1 - a[k])
            ) * x
            x = mean + (np.sqrt(post_var) * noise if k > 0 else 0.0)
    return x


class GaussOracle(nn.Module):
    """Exact eps denoiser for data x0 ~ N(0, s^2): E[eps | x_t] = sqrt(1 - a) x_t / (a s^2 + 1 - a),
    at the ORIGINAL timestep's float64 alphas_cumprod. Keeps an unclipped chain bounded."""

    def __init__(self, ab: np.ndarray, s: float = 0.5) -> None:
        super().__init__()
        self.ab, self.s = torch.tensor(ab), s

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = self.ab[t.cpu()].reshape(-1, 1, 1, 1)
        return ((1 - a).sqrt() * x.double() / (a * self.s**2 + 1 - a)).float()


@pytest.mark.parametrize(
    "sampler,eta,clip",
    [
        ("ddim", 0.5, True),
        ("ddim", 0.3, False),
        ("ddim", 0.0, True),
        ("ddpm", 0.0, True),
        ("ddpm", 0.0, False),
    ],
)
def test_chain_matches_a_float64_reference(sampler, eta, clip):
    """The whole chain against the formulas re-implemented in float64, for an eta strictly
    between 0 and 1 too (eta = 0 and 1 alone cannot tell eta from eta^2 in sigma)."""
    diff = GaussianDiffusion("cosine")
    ab = np.array(diff.schedule.alphas_cumprod)
    model = Wavy() if clip else GaussOracle(ab)  # Wavy's x0 leaves [-1, 1] (clipped) early on
    shape, ts = (2, 2, 3, 3), space_timesteps(1000, 12, "trailing")
    x = sample(model, diff, shape, sampler=sampler, steps=12, eta=eta, spacing="trailing",
               clip_denoised=clip, generator=torch.Generator().manual_seed(11))  # fmt: skip
    ref = _reference_chain(model, ab, ts, shape, 11, sampler, eta, clip)
    assert float(ref.abs().max()) < 3  # a bounded chain: the tolerance below means something
    torch.testing.assert_close(x.double(), ref, atol=2e-5, rtol=0)


def test_clip_denoised_false_leaves_x0_unclamped():
    """Latents live outside [-1, 1]: with clip_denoised=False the oracle's point 1.5 / -2 comes
    back; with clipping the chain ends at the clamped point."""
    schedule = linear_schedule(1000)
    diff = GaussianDiffusion(schedule)
    c = torch.tensor([1.5, -2.0, 0.3], dtype=torch.float64).reshape(1, 3, 1, 1)
    oracle = PointOracle(c, np.array(schedule.alphas_cumprod), "eps", False)
    for sampler in ("ddim", "ddpm"):
        kw = dict(sampler=sampler, steps=25, generator=torch.Generator().manual_seed(0))
        x = sample(oracle, diff, (2, 3, 2, 2), clip_denoised=False, **kw)
        torch.testing.assert_close(x, c.float().expand(2, 3, 2, 2), atol=2e-4, rtol=0)
        kw["generator"] = torch.Generator().manual_seed(0)
        x = sample(oracle, diff, (2, 3, 2, 2), clip_denoised=True, **kw)
        torch.testing.assert_close(x, c.clamp(-1, 1).float().expand(2, 3, 2, 2), atol=2e-4,
                                   rtol=0)  # fmt: skip


def test_generator_on_another_device_is_refused():
    with pytest.raises(ValueError, match="generator is on cpu but sampling runs on meta"):
        sample(Wavy(), GaussianDiffusion("linear"), (1, 1, 2, 2), steps=2,
               generator=torch.Generator(), device="meta")  # fmt: skip


def test_spacings_that_end_at_T_minus_1_never_warn_and_the_warning_names_the_fix():
    """The warning looks at the chain's first step (ts[-1]) only: linspace / trailing with few
    steps (a much less noisy second step) start from pure noise and stay silent."""
    diff = GaussianDiffusion("linear")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for steps in (2, 3, 7):
            for spacing in ("linspace", "trailing"):
                sample(Wavy(), diff, (1, 1, 2, 2), steps=steps, spacing=spacing)
    with pytest.warns(UserWarning, match="use spacing='linspace' or 'trailing', or steps that "
                      "divide T"):  # fmt: skip
        sample(Wavy(), diff, (1, 1, 2, 2), steps=334, spacing="leading")


def test_labels_reach_the_model_as_int64_and_an_explicit_null_class_is_used():
    model = _LabelSpy()
    diff = GaussianDiffusion("cosine")
    sample(model, diff, (3, 1, 4, 4), steps=2, y=torch.tensor([0, 3, 9], dtype=torch.int32))
    assert model.seen and all(s.dtype == torch.int64 for s in model.seen)
    model.seen.clear()
    sample(model, diff, (3, 1, 4, 4), steps=2, y=torch.tensor([0, 3, 9]), cfg_scale=2.0,
           null_class=7)  # fmt: skip
    assert model.seen
    for labels in model.seen:
        assert labels.tolist() == [0, 3, 9, 7, 7, 7]


def test_guidance_extrapolates_in_float32_for_a_low_precision_model():
    """A bf16 model's cond / uncond outputs are upcast before u + s (c - u)."""

    def model(x, t, y):
        return (x + y.reshape(-1, 1, 1, 1).to(x.dtype) / 3.0).to(torch.bfloat16)

    x, t, y = torch.randn(2, 1, 4, 4), torch.tensor([3, 700]), torch.tensor([1, 2])
    g = guided_output(model, x, t, y, 4.5, 10, channels=1)
    cond = model(x, t, y).float()
    uncond = model(x, t, torch.full_like(y, 10)).float()
    assert g.dtype == torch.float32
    torch.testing.assert_close(g, uncond + 4.5 * (cond - uncond), rtol=0, atol=0)


class _DtypeSpy(nn.Module):
    """Records the dtype of x and whether it runs in training mode; a float32 parameter comes
    before the bf16 input layer, so only the input layer tells the model's input dtype."""

    def __init__(self, out_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.input_layer = nn.Linear(2, 2).to(torch.bfloat16)
        self.out_dtype, self.seen = out_dtype, []

    def forward(self, x, t):  # noqa: ANN001, ANN201
        self.seen.append((x.dtype, self.training))
        xf = x.float()
        mean = 0.5 * torch.tanh(xf)
        var = torch.full_like(xf, 0.3)  # the learned-variance half
        return torch.cat([mean, var], 1).to(torch.bfloat16).to(self.out_dtype)  # same values


def test_model_input_dtype_eval_mode_and_a_float32_chain():
    """x goes in the input layer's dtype (bf16), the model runs in eval mode and is back in
    training after; a bf16 output is upcast before any arithmetic of the chain (the learned
    variance's (v + 1) / 2 included), so it samples the same as the same values in float32."""
    diff = GaussianDiffusion("linear", learn_sigma=True)
    draws = []
    for out_dtype in (torch.bfloat16, torch.float32):
        model = _DtypeSpy(out_dtype).train()
        x = sample(model, diff, (2, 1, 2, 2), sampler="ddpm", steps=5, clip_denoised=False,
                   generator=torch.Generator().manual_seed(4))  # fmt: skip
        assert model.seen and all(s == (torch.bfloat16, False) for s in model.seen)
        assert model.training and x.dtype == torch.float32
        draws.append(x)
    assert torch.equal(*draws)


def test_variance_name_and_guidance_check_at_scale_one():
    from types import SimpleNamespace

    from antdiff.sampling import check_guidance_trained, variance_name

    small = GaussianDiffusion("linear")
    assert variance_name(small, "ddpm") == "small"
    assert variance_name(small, "ddpm", "large") == "large"
    assert variance_name(GaussianDiffusion("linear", fixed_variance="large"), "ddpm") == "large"
    assert variance_name(GaussianDiffusion("linear", learn_sigma=True), "ddpm") == "learned"
    assert variance_name(small, "ddim") is None
    assert variance_name(GaussianDiffusion("linear", learn_sigma=True), "ddim") is None
    untrained = SimpleNamespace(class_dropout_prob=0)
    check_guidance_trained(untrained, 1.0)  # no guidance: the null class is never used
    with pytest.raises(ValueError, match="class_dropout_prob=0"):
        check_guidance_trained(untrained, 2.0)


class _FrozenPart(nn.Module):
    """A training model with a part its owner keeps in eval (a pretrained, frozen BatchNorm):
    records every module's mode at each forward."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 1)
        self.frozen = nn.BatchNorm2d(1).eval()
        self.seen: list[tuple[bool, ...]] = []

    def forward(self, x, t):
        self.seen.append(tuple(m.training for m in self.modules()))
        return self.frozen(self.conv(x))


@pytest.mark.parametrize("top", [True, False], ids=["training", "eval"])
def test_sampling_runs_every_module_in_eval_and_gives_each_its_own_mode_back(top):
    """Sampling runs every module in eval mode, and afterwards each is back in its own mode:
    a frozen part stays in eval (model.train() after sampling put it in training, and the
    engine's next step then refused its BatchNorm), the rest as it was."""
    model = _FrozenPart().train(top)
    model.frozen.eval()
    before = [m.training for m in model.modules()]
    sample(model, GaussianDiffusion(linear_schedule(40)), (2, 1, 2, 2), steps=3,
           generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert model.seen and all(not any(modes) for modes in model.seen)
    assert [m.training for m in model.modules()] == before
    with pytest.raises(RuntimeError, match="stop"):  # also when sampling fails
        model.conv.register_forward_hook(lambda *a: (_ for _ in ()).throw(RuntimeError("stop")))
        sample(model, GaussianDiffusion(linear_schedule(40)), (2, 1, 2, 2), steps=3)
    assert [m.training for m in model.modules()] == before


def test_image_generators_draw_each_image_alike_in_any_batch():
    """Per-image generators: image i's noise is seeded from (seed, i), so the images of a
    draw in batches of 2 + 3 equal those of one batch of 5 (DDPM: fresh noise every step;
    DDIM eta = 0.5 too), and each image's chain follows the float64 reference drawn from its
    own generator's normals."""
    from antdiff.sampling import image_generators

    diff = GaussianDiffusion("cosine")
    ab = np.array(diff.schedule.alphas_cumprod)
    for sampler, eta in (("ddpm", 0.0), ("ddim", 0.5), ("ddim", 0.0)):
        kw = dict(sampler=sampler, eta=eta, steps=6, spacing="trailing")
        whole = sample(Wavy(), diff, (5, 1, 3, 3), generator=image_generators(7, 0, 5), **kw)
        parts = [sample(Wavy(), diff, (n, 1, 3, 3), generator=image_generators(7, lo, n), **kw)
                 for lo, n in ((0, 2), (2, 3))]  # fmt: skip
        torch.testing.assert_close(torch.cat(parts), whole, atol=1e-6, rtol=0)
        assert not torch.allclose(whole[0], whole[1])  # images draw different noise
    ts = space_timesteps(1000, 6, "trailing")
    for i, gen_seed in enumerate(g.initial_seed() for g in image_generators(7, 0, 5)):
        ref = _reference_chain(Wavy(), ab, ts, (1, 1, 3, 3), gen_seed, "ddpm")
        x = sample(Wavy(), diff, (1, 1, 3, 3), sampler="ddpm", steps=6, spacing="trailing",
                   generator=image_generators(7, i, 1))  # fmt: skip
        torch.testing.assert_close(x.double(), ref, atol=2e-5, rtol=0)


def test_image_generators_seeds_are_unrelated_and_checked():
    from antdiff.sampling import image_generators

    a = [g.initial_seed() for g in image_generators(0, 0, 4)]
    b = [g.initial_seed() for g in image_generators(1, 0, 4)]
    assert len(set(a + b)) == 8  # no image shares a stream with another seed's or index's
    assert [g.initial_seed() for g in image_generators(0, 2, 2)] == a[2:]
    assert [g.initial_seed() for g in image_generators(-1, 0, 1)] != a[:1]  # negative seeds ok
    # a seed past 32 bits is no other seed at another index (SeedSequence's words of
    # [seed, i] would be: seed 2**32 at image 0 read as seed 0 at image 1)
    wide = [g.initial_seed() for g in image_generators(2**32, 0, 2)]
    assert not set(wide) & set(a) and wide[0] != a[1]
    assert image_generators(5 + 7 * 2**32, 0, 1)[0].initial_seed() != (
        image_generators(5, 7, 1)[0].initial_seed())  # fmt: skip
    assert image_generators(np.int64(3), 0, 1)[0].initial_seed() == (
        image_generators(3, 0, 1)[0].initial_seed())  # fmt: skip
    assert image_generators(2**64 - 1, 0, 1)[0].initial_seed() == (
        image_generators(-1, 0, 1)[0].initial_seed())  # modulo 2**64, as torch
    with pytest.raises(ValueError, match="seed must be an int"):
        image_generators(1.5, 0, 1)
    for bad in (2**64, -(2**63) - 1):  # torch refuses them: no silent wrap to another seed
        with pytest.raises(ValueError, match=r"seed must lie in \[-2\*\*63, 2\*\*64\)"):
            image_generators(bad, 0, 1)
    with pytest.raises(ValueError, match="image indices must be >= 0"):
        image_generators(0, -1, 1)
    x = sample(Wavy(), GaussianDiffusion("linear"), (0, 1, 2, 2), steps=2, sampler="ddpm",
               generator=image_generators(0, 0, 0))  # fmt: skip
    assert x.shape == (0, 1, 2, 2)  # no images: an empty batch, as one generator gives


def test_a_list_of_generators_needs_one_per_image():
    from antdiff.sampling import image_generators

    diff = GaussianDiffusion("linear")
    with pytest.raises(ValueError, match="one generator per image, 3, got 2"):
        sample(Wavy(), diff, (3, 1, 2, 2), steps=2, generator=image_generators(0, 0, 2))
    with pytest.raises(ValueError, match="torch.Generator or a list of them, got 5"):
        sample(Wavy(), diff, (2, 1, 2, 2), steps=2, generator=[torch.Generator(), 5])
    with pytest.raises(ValueError, match="generator is on cpu but sampling runs on meta"):
        sample(Wavy(), diff, (1, 1, 2, 2), steps=2, generator=image_generators(0, 0, 1),
               device="meta")  # fmt: skip

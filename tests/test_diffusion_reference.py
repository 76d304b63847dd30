"""Independent float64 cross-checks of the losses and samplers: whole DDPM / DDIM chains (every
prediction type, variance, spacing, eta, clipping and guidance setting) and the training losses
(every weighting, learned sigma's vb term) against references written from the published
formulas (Ho et al. 2020; Song et al. 2021; Nichol & Dhariwal 2021; Ho & Salimans; Salimans &
Ho; Hang et al.; Choi et al.)."""

import math

import numpy as np
import pytest
import torch

from antdiff.diffusion import GaussianDiffusion
from antdiff.sampling import sample, space_timesteps
from antdiff.schedules import cosine_schedule, linear_schedule


def _tables(ab):
    abp = np.concatenate([[1.0], ab[:-1]])
    be = 1.0 - ab / abp
    pv = be * (1.0 - abp) / (1.0 - ab)
    lpv = np.log(np.append(pv[1] if ab.size > 1 else be[0], pv[1:]))
    large = np.append(pv[1] if ab.size > 1 else be[0], be[1:])
    return abp, be, pv, lpv, large


def _x0_from(pred, m, x, a):
    if pred == "eps":
        return (x - math.sqrt(1 - a) * m) / math.sqrt(a)
    if pred == "x0":
        return m
    return math.sqrt(a) * x - math.sqrt(1 - a) * m


def _ref_step(ab, k, out, x, pred, learn, clip, sampler, eta, noise, var):
    abp, be, pv, lpv, large = _tables(ab)
    a, ap, c = ab[k], abp[k], x.shape[1]
    x0 = _x0_from(pred, out[:, :c], x, a)
    if clip:
        x0 = x0.clamp(-1, 1)
    eps = (x - math.sqrt(a) * x0) / math.sqrt(1 - a)
    if sampler == "ddim":  # Song et al. eq. 12 / 16
        s = eta * math.sqrt((1 - ap) / (1 - a) * (1 - a / ap))
        return math.sqrt(ap) * x0 + math.sqrt(max(1 - ap - s * s, 0.0)) * eps + s * noise
    mean = (math.sqrt(ap) * be[k] / (1 - a)) * x0 + (math.sqrt(1 - be[k]) * (1 - ap) / (1 - a)) * x
    if learn:  # improved DDPM eq. 15 in the respaced chain
        fr = (out[:, c:] + 1) / 2
        lv = fr * math.log(be[k]) + (1 - fr) * lpv[k]
    else:
        lv = torch.full_like(x, lpv[k] if var == "small" else math.log(large[k]))
    return mean + (k > 0) * torch.exp(0.5 * lv) * noise


def _toy(learn, T):
    def model(x, t, y=None):
        x = x.double()
        tt = t.double().reshape(-1, 1, 1, 1) / T
        o = torch.tanh(0.7 * x + 0.3 * tt)
        if y is not None:
            o = o * (1 + 0.1 * y.double().reshape(-1, 1, 1, 1))
        if learn:
            o = torch.cat([o, torch.tanh(x - 0.5 + tt)], 1)
        return o

    return model


@pytest.mark.parametrize(
    "pred,learn,sampler,eta,spacing,steps,clip,var,cfg,cch",
    [
        ("eps", False, "ddim", 0.0, "linspace", 7, True, None, 1.0, None),
        ("v", False, "ddim", 0.5, "trailing", 7, False, None, 1.0, None),
        ("x0", False, "ddpm", 0.0, "linspace", 5, False, "large", 1.0, None),
        ("v", True, "ddpm", 0.0, "trailing", 9, True, None, 1.0, None),
        ("eps", True, "ddpm", 0.0, "linspace", 6, True, None, 4.0, 1),
        ("v", False, "ddim", 1.0, "linspace", 6, True, None, 2.0, None),
    ],
)
def test_sampler_chain_matches_independent_float64_reference(
    pred, learn, sampler, eta, spacing, steps, clip, var, cfg, cch
):
    T = 40
    sched = cosine_schedule(T)
    d = GaussianDiffusion(sched, prediction=pred, learn_sigma=learn)
    shape, c = (3, 2, 2, 2), 2
    model = _toy(learn, T)
    y = torch.tensor([0, 1, 2]) if cfg != 1.0 else None
    got = sample(model, d, shape, sampler=sampler, steps=steps, eta=eta, spacing=spacing,
                 generator=torch.Generator().manual_seed(0), clip_denoised=clip, variance=var,
                 y=y, cfg_scale=cfg, null_class=5, cfg_channels=cch)  # fmt: skip
    ts = space_timesteps(T, steps, spacing)
    ab = sched.alphas_cumprod[ts]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).double()
    for k in range(len(ts) - 1, -1, -1):
        t = torch.full((3,), int(ts[k]))
        if cfg != 1.0:  # Ho & Salimans: eps_u + s (eps_c - eps_u) on the guided channels only
            cc, u = model(x, t, y), model(x, t, torch.full_like(y, 5))
            n = c if cch is None else cch
            out = torch.cat([u[:, :n] + cfg * (cc[:, :n] - u[:, :n]), cc[:, n:]], 1)
        else:
            out = model(x, t)
        noise = torch.randn(shape, generator=g).double()
        x = _ref_step(ab, k, out, x, pred, learn, clip, sampler, eta, noise, var or "small")
    assert torch.allclose(got.double(), x, atol=2e-6, rtol=1e-5)


def _phi(z):
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


@pytest.mark.parametrize("pred", ["eps", "x0", "v"])
@pytest.mark.parametrize("weighting", [None, "p2", "min_snr"])
def test_training_losses_match_independent_reference(pred, weighting):
    T = 50
    sched = linear_schedule(T)
    ab = sched.alphas_cumprod
    abp, be, pv, lpv, _ = _tables(ab)
    snr = ab / (1 - ab)
    gamma, p2g, p2k = 3.0, 0.5, 1.0
    d = GaussianDiffusion(sched, prediction=pred, learn_sigma=True, loss_weighting=weighting,
                          p2_gamma=p2g, p2_k=p2k, min_snr_gamma=gamma)  # fmt: skip
    torch.manual_seed(0)
    b, c = 5, 2
    x0 = torch.randint(0, 256, (b, c, 2, 2)).double() / 127.5 - 1
    t = torch.tensor([0, 1, 7, 25, 49])
    noise = torch.randn(b, c, 2, 2, dtype=torch.float64)
    seen = {}

    def model(x, tt):
        o = torch.cat([torch.tanh(0.3 * x + 0.01 * tt.double().reshape(-1, 1, 1, 1)),
                       torch.tanh(0.8 * x - 0.2)], 1)  # fmt: skip
        seen["o"] = o.detach()
        return o

    r = d.training_losses(model, x0, t, noise)
    out = seen["o"]
    for i in range(b):
        k, a, s = int(t[i]), ab[int(t[i])], snr[int(t[i])]
        xt = math.sqrt(a) * x0[i] + math.sqrt(1 - a) * noise[i]
        tgt = {"eps": noise[i], "x0": x0[i],
               "v": math.sqrt(a) * noise[i] - math.sqrt(1 - a) * x0[i]}[pred]  # fmt: skip
        m = out[i, :c]
        mse = ((tgt - m) ** 2).mean().item()
        w = {None: 1.0, "p2": (p2k + s) ** -p2g,
             "min_snr": {"eps": min(s, gamma) / s, "x0": min(s, gamma),
                         "v": min(s, gamma) / (s + 1)}[pred]}[weighting]  # fmt: skip
        c1 = be[k] * math.sqrt(abp[k]) / (1 - a)
        c2 = (1 - abp[k]) * math.sqrt(1 - be[k]) / (1 - a)
        pm = c1 * _x0_from(pred, m, xt, a) + c2 * xt
        tm = c1 * x0[i] + c2 * xt
        fr = (out[i, c:] + 1) / 2
        lv = fr * math.log(be[k]) + (1 - fr) * lpv[k]
        if k > 0:
            kl = 0.5 * (lv - lpv[k] + torch.exp(lpv[k] - lv) + (tm - pm) ** 2 * torch.exp(-lv) - 1)
            vb = kl.mean().item() / math.log(2)
        else:
            ll = []
            for xx, mm, ss in zip(x0[i].ravel().tolist(), pm.ravel().tolist(),
                                  torch.exp(0.5 * lv).ravel().tolist()):  # fmt: skip
                hi = 1.0 if xx > 0.999 else _phi((xx + 1 / 255 - mm) / ss)
                lo = 0.0 if xx < -0.999 else _phi((xx - 1 / 255 - mm) / ss)
                ll.append(math.log(max(hi - lo, 1e-12)))
            vb = -float(np.mean(ll)) / math.log(2)
        vb *= T / 1000  # L_hybrid = L_simple + 0.001 * L_vlb, L_vlb = T * E_t[L_t]
        assert r["mse"][i].item() == pytest.approx(mse, rel=1e-9, abs=1e-12)
        assert r["weight"][i].item() == pytest.approx(w, rel=1e-6)
        assert r["vb"][i].item() == pytest.approx(vb, rel=1e-6, abs=1e-9)
        assert r["loss"][i].item() == pytest.approx(w * mse + vb, rel=1e-6, abs=1e-9)

"""The README's "Use antdiff from your trainer" snippets, on real models.

- DiT / ADM-style loops: ``diffusion.training_losses(...)["loss"]`` is per sample;
- a diffusers loop: a real ``UNet2DModel`` built from a config (no download), timesteps from
  ``ant.sample_timesteps``, per-sample MSE, ``ant.reduce`` or ``ant.backward``.
"""

from __future__ import annotations

import pytest
import torch

import antdiff
from antdiff.diffusion import GaussianDiffusion
from antdiff.models import create_model
from antdiff.schedules import linear_schedule


def _randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Zero-initialised layers (adaLN-Zero, output convs) would give trivial gradients."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def _J(ant, model, loss_fn, batch, t, mode):
    ant.mode = mode
    buf = ant._grad_buffer()
    ant._fill_J(buf, loss_fn, batch, t, ant.sampler.counts_for(t), None)
    return buf.J.clone()


@pytest.mark.parametrize("name", ["adm-tiny", "dit-tiny"])
def test_micro_batched_J_equals_retain_graph_J(name):
    torch.manual_seed(0)
    model = _randomise(create_model(name))
    model.train()
    diffusion = GaussianDiffusion(linear_schedule(1000))
    ant = antdiff.ANT(linear_schedule(1000), k=5, method="pcgrad", model=model)
    B = 11
    x = torch.randn(B, 1, 8, 8)
    y = torch.randint(0, 10, (B,))
    noise = torch.randn_like(x)
    batch = {"x": x, "y": y, "noise": noise}
    t = ant.sample_timesteps(B)
    kwargs_of = (lambda b: {"y": b["y"]}) if name.startswith("dit") else (lambda b: {})
    if name.startswith("dit"):
        model.class_dropout_prob = 0.0  # label dropout draws random numbers per forward

    def loss_fn(b, tb):
        return diffusion.training_losses(model, b["x"], tb, noise=b["noise"],
                                         model_kwargs=kwargs_of(b))["loss"]

    J_micro = _J(ant, model, loss_fn, batch, t, "micro")
    J_retain = _J(ant, model, loss_fn, batch, t, "retain_graph")
    assert J_micro.abs().sum() > 0
    torch.testing.assert_close(J_micro, J_retain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["uw", "uw+pcgrad"])
def test_adm_style_loop(method):
    torch.manual_seed(0)
    model = create_model("adm-tiny")
    diffusion = GaussianDiffusion(linear_schedule(1000))
    # --- README snippet (ADM / DiT style) ---
    ant = antdiff.ANT(linear_schedule(1000), k=5, clustering="snr", method=method, model=model)
    opt = torch.optim.AdamW([{"params": model.parameters()}, *ant.param_groups()], lr=1e-3)
    loader = [torch.randn(10, 1, 8, 8) for _ in range(2)]
    for x0 in loader:
        opt.zero_grad(set_to_none=True)
        assert all(p.grad is None for p in model.parameters())  # (the test's own check)
        t = ant.sample_timesteps(x0.shape[0])
        if ant.needs_gradients:
            ant.backward(lambda x, tt: diffusion.training_losses(model, x, tt)["loss"], x0, t)
        else:
            ant.reduce(diffusion.training_losses(model, x0, t)["loss"], t).backward()
        ant.step(opt)
    # ---
    assert all(torch.isfinite(p).all() for p in model.parameters())
    s = next(ant.method.loss.parameters())
    assert s.grad is not None and torch.isfinite(s.grad).all()
    assert ant.stats()["steps"] == 2


@pytest.mark.parametrize("method", ["uw", "uw+pcgrad", "nash"])
def test_diffusers_loop(method):
    import diffusers  # a test extra (pyproject's [test]): installed by `make test`
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
        block_out_channels=(16, 32), down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8,
    )
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000)
    # --- README snippet (diffusers) ---
    ant = antdiff.ANT(scheduler.alphas_cumprod, k=5, method=method, model=unet)
    opt = torch.optim.AdamW([{"params": list(unet.parameters())}, *ant.param_groups()], lr=1e-4)
    def per_sample_mse(x, tt):
        noise = torch.randn_like(x)
        pred = unet(scheduler.add_noise(x, noise, tt), tt).sample
        return ((pred - noise) ** 2).mean(dim=(1, 2, 3))

    loader = [torch.randn(10, 1, 8, 8) for _ in range(2)]
    for clean in loader:
        opt.zero_grad(set_to_none=True)
        t = ant.sample_timesteps(clean.shape[0])
        if ant.needs_gradients:
            ant.backward(per_sample_mse, clean, t)
        else:
            ant.reduce(per_sample_mse(clean, t), t).backward()
        ant.step(opt)
    # ---
    assert ant.T == 1000
    assert all(torch.isfinite(p).all() for p in unet.parameters())
    assert bool(ant.last.finite) and ant.stats()["steps"] == 2

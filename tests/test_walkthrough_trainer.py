"""Findings of a walkthrough that integrates antdiff into a user's own training loop: a float64
model's loss-space total keeps float64, an ant.backward loop whose optimiser lacks UW's
log-variances is warned of, and mode="onepass" names the layer setting it does not cover.

The references are computed independently of antdiff (plain autograd, one backward per cluster,
in float64).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import antdiff

T = 100


def _alphas() -> torch.Tensor:
    return torch.as_tensor(antdiff.linear_schedule(T).alphas_cumprod.copy(), dtype=torch.float32)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(T, 16)
        self.l1 = nn.Linear(8, 16)
        self.l2 = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.tanh(self.l1(x) + self.emb(t)))


def _per_sample(model: nn.Module, ac: torch.Tensor):
    def loss_fn(batch, t):
        x, noise = batch
        a = ac.to(x.dtype)[t].view(-1, 1)
        return ((model(a.sqrt() * x + (1 - a).sqrt() * noise, t) - noise) ** 2).mean(1)

    return loss_fn


@pytest.mark.parametrize("method", ["ls", "uw"])
def test_float64_loss_space_reduce_keeps_float64_precision(method: str) -> None:
    ac = _alphas()
    torch.manual_seed(0)
    model = _Net().double()
    ant = antdiff.ANT(ac, k=3, method=method, model=model)
    x = torch.randn(9, 8, dtype=torch.float64)
    noise = torch.randn(9, 8, dtype=torch.float64)
    t = ant.sample_timesteps(9)
    loss_fn = _per_sample(model, ac)
    total = ant.reduce(loss_fn((x, noise), t), t)
    grads = torch.autograd.grad(total, list(model.parameters()))
    # reference: the method's total on the float64 cluster means (s = 0 for a fresh UW)
    cid = ant.clusters.cluster_of(t)
    L = torch.stack([loss_fn((x[cid == c], noise[cid == c]), t[cid == c]).mean() for c in range(3)])
    ref_total = L.mean() if method == "ls" else (0.5 * L / 3).sum()
    ref = torch.autograd.grad(ref_total, list(model.parameters()))
    assert total.dtype == torch.float64
    g = torch.cat([q.flatten() for q in grads])
    r = torch.cat([q.flatten() for q in ref])
    assert ((g - r).norm() / r.norm()).item() < 1e-12


@pytest.mark.parametrize("method", ["uw+pcgrad", "uw"])
def test_backward_warns_when_optimizer_lacks_uw_parameters(method: str) -> None:
    ac = _alphas()
    torch.manual_seed(0)
    model = _Net()
    ant = antdiff.ANT(ac, k=3, method=method, model=model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)  # ant.param_groups() forgotten
    loss_fn = _per_sample(model, ac)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            x, noise = torch.randn(6, 8), torch.randn(6, 8)
            t = ant.sample_timesteps(6)
            ant.backward(loss_fn, (x, noise), t)
            opt.step()
    assert torch.equal(ant.method.loss.s.detach(), torch.zeros(3))  # UW never trained
    assert any("log-variances" in str(w.message) for w in caught), [str(w.message) for w in caught]


class _Circular(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(T, 4)
        self.conv = nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular")

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.conv(x + self.emb(t)[:, :, None, None])


class _FreqEmbedding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(10, 8, scale_grad_by_freq=True)
        self.out = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.out(self.tok(x))


@pytest.mark.parametrize(
    ("make", "setting"),
    [(_Circular, "padding_mode"), (_FreqEmbedding, "scale_grad_by_freq")],
)
def test_onepass_refusal_names_the_unsupported_setting(make, setting: str) -> None:
    with pytest.raises(ValueError) as info:
        antdiff.ANT(_alphas(), k=2, method="pcgrad", model=make(), mode="onepass")
    assert setting in str(info.value)

"""Mode "onepass": J from one forward + one backward equals per-cluster autograd, on every layer
type it serves and on the registry's models; state is restored; unsupported models fall back."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F  # noqa: N812
import torch.utils.checkpoint
from torch import nn

from antdiff import ANT
from antdiff.diffusion import GaussianDiffusion
from antdiff.engine import onepass
from antdiff.engine.onepass import unsupported_parameters
from antdiff.models import create_model
from antdiff.schedules import linear_schedule

T = 100


class Toy(nn.Module):
    """Every served layer type: strided/grouped/dilated/'same' convs, 1x1 and strided Conv1d,
    patch convs (kernel == stride, one dropping the input's last rows and columns), GroupNorm,
    Linear on [B, N, D], LayerNorm, Embeddings (one with padding_idx), a layer called twice,
    a layer used only under no_grad and a Linear with a frozen bias."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 8, 3, stride=2, padding=1)
        self.emb = nn.Embedding(T, 8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=2)
        self.c3 = nn.Conv2d(8, 8, 3, padding="same")
        self.c4 = nn.Conv2d(8, 8, 1, stride=2)
        self.gn = nn.GroupNorm(4, 8)
        self.pw = nn.Conv1d(8, 8, 1)
        self.c1d = nn.Conv1d(8, 8, 3, stride=2, padding=1)
        self.patch = nn.Conv2d(2, 8, 3, stride=3)  # 8x8 -> 2x2: rows and columns 6, 7 unused
        self.p1d = nn.Conv1d(8, 8, 2, stride=2, bias=False)
        self.tok = nn.Embedding(7, 8, padding_idx=0)
        self.lin = nn.Linear(8, 8)
        self.ln = nn.LayerNorm(8)
        self.shared = nn.Linear(8, 8)
        self.aux = nn.Linear(8, 8)
        self.frozen = nn.Linear(8, 8)
        self.frozen.bias.requires_grad_(False)
        self.out = nn.Linear(8, 1)

    def forward(self, x, t, tok):
        h = self.c1(x) + self.emb(t)[:, :, None, None]  # [B, 8, 4, 4]
        h = self.gn(self.c3(F.silu(self.c2(h))) + h)
        s = self.c1d(self.pw(h.flatten(2))) + self.c4(h).flatten(2).repeat(1, 1, 2)  # [B, 8, 8]
        s = s + self.patch(x).flatten(2).repeat(1, 1, 2)
        s = s + self.p1d(s).repeat(1, 1, 2)
        z = s.transpose(1, 2) + self.tok(tok)  # [B, 8 tokens, 8]
        z = self.ln(torch.tanh(self.lin(z)))
        z = self.shared(torch.tanh(self.shared(z)))
        with torch.no_grad():
            gate = torch.tanh(self.aux(z))
        z = self.frozen(z * (1.0 + 0.1 * gate))
        return self.out(z).squeeze(-1)  # [B, 8]


def toy_batch(B: int, dtype=torch.float32, seed: int = 1):  # noqa: N803
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 2, 8, 8, generator=g, dtype=dtype)
    tok = torch.randint(0, 7, (B, 8), generator=g)
    target = torch.randn(B, 8, generator=g, dtype=dtype)
    return {"x": x, "tok": tok, "target": target}


def toy_loss(model):
    def fn(b, t):
        return ((model(b["x"], t, b["tok"]) - b["target"]) ** 2).mean(dim=1)

    return fn


def fill(ant, loss_fn, batch, t, mode, scaler=None, counts=None):
    """J [k, P] of the engine in ``mode`` (the rows before any method touches them)."""
    ant.mode = mode
    buf = ant._grad_buffer()
    counts = ant.sampler.counts_for(t) if counts is None else counts
    ant._fill_J(buf, loss_fn, batch, t, counts, scaler)
    return buf.J.clone()


def reference_J(model, loss_fn, batch, t, clusters, k):  # noqa: N802
    """[k, P]: autograd.grad of each cluster's mean loss, one call per cluster."""
    params = [p for p in model.parameters() if p.requires_grad]
    per = loss_fn(batch, t)
    cid = clusters.cluster_of(t)
    rows = []
    for i in range(k):
        m = cid == i
        if not bool(m.any()):
            rows.append(torch.zeros(sum(p.numel() for p in params), dtype=per.dtype))
            continue
        g = torch.autograd.grad(per[m].mean(), params, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(z if z is not None else torch.zeros_like(p)).reshape(-1)
                               for z, p in zip(g, params)]))  # fmt: skip
    return torch.stack(rows)


def _engine(model: nn.Module, B: int, dims: tuple[int, ...], k: int = 2):  # noqa: N803
    """``model`` under a PCGrad engine, a random batch [B, *dims] and stratified timesteps."""
    ant = ANT(linear_schedule(T), k=k, method="pcgrad", model=model)
    x = torch.randn(B, *dims)
    return ant, x, ant.sample_timesteps(B)


def close(a, b, rtol=1e-5, atol=1e-6):
    """Equal up to rtol and atol relative to the scale of b."""
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol * float(b.abs().max()))


def test_toy_float64_equals_per_cluster_autograd():
    torch.manual_seed(0)
    model = Toy().double()
    ant = ANT(linear_schedule(T), k=4, method="pcgrad", model=model, mode="onepass")
    batch = toy_batch(13, torch.float64)
    t = ant.sample_timesteps(13)
    J = fill(ant, toy_loss(model), batch, t, "onepass")  # noqa: N806
    ref = reference_J(model, toy_loss(model), batch, t, ant.clusters, ant.k)
    assert ref.abs().sum(1).min() > 0
    torch.testing.assert_close(J, ref, rtol=1e-10, atol=1e-12)
    assert all(p.requires_grad for n, p in model.named_parameters() if n != "frozen.bias")
    assert not model.frozen.bias.requires_grad
    assert all(not m._forward_hooks for m in model.modules())


def test_toy_float32_and_scaled_equal_micro():
    torch.manual_seed(0)
    model = Toy()
    ant = ANT(linear_schedule(T), k=4, method="pcgrad", model=model)
    batch = toy_batch(16)
    t = ant.sample_timesteps(16)
    close(fill(ant, toy_loss(model), batch, t, "onepass"),
          fill(ant, toy_loss(model), batch, t, "micro"))  # fmt: skip
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    close(fill(ant, toy_loss(model), batch, t, "onepass", scaler),
          fill(ant, toy_loss(model), batch, t, "micro", scaler))  # fmt: skip


@pytest.mark.parametrize("calls", ["default", "per-cluster"])
def test_toy_bf16_autocast_equals_micro(calls, monkeypatch):
    """Under bf16 autocast the hooks get bf16 activations and gradients (products formed in
    bf16, stored in the fp32 rows), as autograd forms bf16 weight gradients in micro mode; the
    per-cluster convolution calls take a bf16 stand-in for the fp32 weight."""
    if calls == "per-cluster":
        monkeypatch.setitem(onepass.GROUPED_CONV, "cpu", None)
    torch.manual_seed(0)
    model = Toy()
    ant = ANT(linear_schedule(T), k=4, method="pcgrad", model=model)
    batch = toy_batch(16)
    t = ant.sample_timesteps(16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        one = fill(ant, toy_loss(model), batch, t, "onepass")
        micro = fill(ant, toy_loss(model), batch, t, "micro")
    assert one.dtype == micro.dtype == torch.float32
    ref = fill(ant, toy_loss(model), batch, t, "micro")  # fp32: how far bf16 is from exact
    err_micro = (micro - ref).norm() / ref.norm()
    err_one = (one - ref).norm() / ref.norm()
    assert 0 < err_micro < 0.05 and err_one < 2 * err_micro + 1e-3


def _randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Zero-initialised layers (adaLN-Zero, output convs) would give trivial rows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


NO_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU here")
CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, NO_GPU])


# the paper's ADM-light at 1/8 of its width on 32x32 inputs: its up/down-sampling ResBlocks and
# six levels, which the tiny ADM lacks. In float64: with perturbed weights its float32 forward
# already differs by 0.9% between the whole batch and one sample at a time (float32 rounding
# amplified through its six levels), which the backward carries into J; in float64 one-pass ==
# micro to 1e-10.
NARROW = {"adm-light": dict(model_channels=16, num_head_channels=16, image_size=32,
                           learn_sigma=False)}


@pytest.mark.parametrize("calls", ["default", "per-cluster", "one-call"])
@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("name", ["adm-tiny", "dit-tiny", "ldm-tiny", "adm-light"])
def test_registry_models_equal_micro(name, device, calls, monkeypatch):
    """onepass == micro with each layer's k rows formed as the device's policy picks, by k
    per-cluster calls, or by one call over the cluster-padded batch (grouped convolutions,
    batched products) wherever it applies."""
    if calls != "default":
        limit = None if calls == "per-cluster" else 10**9
        for policy in (onepass.GROUPED_CONV, onepass.BATCHED_PRODUCTS):
            monkeypatch.setitem(policy, device, limit)
    if device == "cuda":  # full fp32 products on both sides (TF32 would differ between paths)
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    torch.manual_seed(0)
    dtype = torch.float64 if name in NARROW else torch.float32
    model = _randomise(create_model(name, **NARROW.get(name, {}))).to(device, dtype)
    if name.startswith("dit"):
        model.class_dropout_prob = 0.0  # label dropout draws random numbers per forward
    diffusion = GaussianDiffusion(linear_schedule(1000))
    ant = ANT(linear_schedule(1000), k=5, method="pcgrad", model=model)
    assert ant._onepass is not None and "mode='auto' (onepass)" in repr(ant)
    B, size = 11, {"ldm-tiny": 4, "adm-light": 32}.get(name, 8)  # noqa: N806
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, model.in_channels, size, size, generator=g, dtype=dtype)
    noise = torch.randn(x.shape, generator=g, dtype=dtype)
    batch = {"x": x, "noise": noise, "y": torch.randint(0, 10, (B,))}
    batch = {key: v.to(device) for key, v in batch.items()}
    cond = name.startswith("dit")

    def loss_fn(b, tb):
        kw = {"y": b["y"]} if cond else None
        return diffusion.training_losses(model, b["x"], tb, noise=b["noise"], model_kwargs=kw)[
            "loss"
        ]

    t = ant.sample_timesteps(B, device=device)
    micro = fill(ant, loss_fn, batch, t, "micro")
    assert micro.abs().sum(1).min() > 0
    close(fill(ant, loss_fn, batch, t, "onepass"), micro, atol=2e-6)


def test_diffusers_unet_equals_micro():
    import diffusers

    torch.manual_seed(0)
    unet = _randomise(diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
        block_out_channels=(16, 32), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8,
    ))  # fmt: skip
    ant = ANT(linear_schedule(1000), k=5, method="pcgrad", model=unet)
    assert unsupported_parameters(unet) == [] and ant._onepass is not None
    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(10, 1, 8, 8, generator=g), torch.randn(10, 1, 8, 8, generator=g))

    def loss_fn(b, tb):
        return ((unet(b[0], tb).sample - b[1]) ** 2).mean(dim=(1, 2, 3))

    t = ant.sample_timesteps(10)
    close(fill(ant, loss_fn, batch, t, "onepass"), fill(ant, loss_fn, batch, t, "micro"))


@pytest.mark.parametrize("method", ["pcgrad", "uw+pcgrad", "nash"])
def test_engine_step_equals_micro(method):
    grads = {}
    for mode in ("micro", "onepass"):
        torch.manual_seed(0)
        model = Toy()
        ant = ANT(linear_schedule(T), k=4, method=method, model=model, mode=mode, seed=3)
        batch = toy_batch(16)
        t = ant.sample_timesteps(16)
        out = ant.backward(toy_loss(model), batch, t)
        flat = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.requires_grad])
        grads[mode] = (flat, out.weights)
    close(grads["onepass"][0], grads["micro"][0])
    torch.testing.assert_close(grads["onepass"][1], grads["micro"][1], rtol=1e-4, atol=1e-6)


def _spy(monkeypatch, name: str) -> list:
    """Calls of the one-call layouts (``_Step.blocks``: the grouped convolution;
    ``_Step.blocks_major``: the batched products), one entry per layer call that used them."""
    calls: list = []
    real = getattr(onepass._Step, name)
    monkeypatch.setattr(onepass._Step, name, lambda st: calls.append(1) or real(st))
    return calls


@pytest.mark.parametrize("size", [4, 16])
@pytest.mark.parametrize("empty", [False, True])
def test_grouped_conv_weight_gradients_of_a_conv_called_twice(size, empty, monkeypatch):
    """On the CPU the conv weight gradients of all clusters come from one grouped call over
    cluster-padded inputs when the clusters have few output positions (4x4: 9 * 16 <= 512 per
    live cluster), else from one call per cluster (16x16); uneven counts, a one-sample cluster,
    empty clusters (their padding slots read another cluster's sample), and a conv run twice,
    whose second call's rows add to the first's."""

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c = nn.Conv2d(3, 3, 3, padding=1)
            self.g = nn.Conv2d(3, 6, 3, padding=1, groups=3)
            self.out = nn.Linear(6 * size * size, 1)

        def forward(self, x, t):
            h = self.c(torch.tanh(self.c(x)))
            return self.out(torch.tanh(self.g(h)).flatten(1)).squeeze(1) * (1 + t / T)

    torch.manual_seed(0)
    model = Twice().double()
    ant = ANT(linear_schedule(T), k=4, method="pcgrad", model=model, sampling="uniform")
    x = torch.randn(9, 3, size, size, dtype=torch.float64)
    ts = [3, 4, 5, 6, 60, 80, 85, 90, 95] if empty else [3, 4, 5, 6, 40, 41, 60, 61, 95]
    t = torch.tensor(ts)
    b2, t2, counts = ant._sorted(x, t)
    assert sorted(counts) != [counts[0]] * 4 and 1 in counts  # padding is exercised
    assert (0 in counts) == empty

    def loss_fn(b, tt):
        return model(b, tt) ** 2

    grouped = _spy(monkeypatch, "blocks")
    J = fill(ant, loss_fn, b2, t2, "onepass", counts=counts)  # noqa: N806
    assert len(grouped) == (3 if size == 4 else 0)  # c twice and g: grouped at 4x4 only
    close(J, reference_J(model, loss_fn, b2, t2, ant.clusters, 4), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    ("ts", "grouped"),
    [([1, 2, 3, 4, 5, 6, 7, 60, 95], False),  # [7, 0, 1, 1]: 28 slots for 9 samples
     ([1, 2, 3, 4, 5, 6, 30, 60, 95], False),  # [6, 1, 1, 1]: 24 > 2 * 9
     ([1, 2, 3, 4, 30, 31, 60, 95], True)],  # [4, 2, 1, 1]: 16 = 2 * 8, the bound itself
)  # fmt: skip
def test_one_call_is_refused_where_padding_would_more_than_double_the_batch(
    ts, grouped, monkeypatch
):
    """A uniform draw can put most of the batch in one cluster: padding every cluster to it
    would multiply the work, so the k calls stay where k times the largest cluster exceeds
    twice the batch, whatever the policy; the rows are right either way."""
    monkeypatch.setitem(onepass.GROUPED_CONV, "cpu", 10**9)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.Tanh(), nn.Flatten(),
                          nn.Linear(48, 1)).double()  # fmt: skip
    ant = ANT(linear_schedule(T), k=4, method="pcgrad", model=model, sampling="uniform")
    x = torch.randn(len(ts), 3, 4, 4, dtype=torch.float64)
    b2, t2, counts = ant._sorted(x, torch.tensor(ts))
    assert (4 * max(counts) <= 2 * len(ts)) == grouped
    calls = _spy(monkeypatch, "blocks")

    def loss_fn(b, tt):
        return model(b).squeeze(1) ** 2 * (1 + tt / T)

    J = fill(ant, loss_fn, b2, t2, "onepass", counts=counts)  # noqa: N806
    assert len(calls) == int(grouped)
    close(J, reference_J(model, loss_fn, b2, t2, ant.clusters, 4), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("empty", [False, True])
def test_batched_products_of_layers_called_twice(empty, monkeypatch):
    """One batched product per layer over the cluster-padded batch (BATCHED_PRODUCTS, forced on
    here; also the grouped convolutions): uneven counts, a one-sample cluster, empty clusters,
    a linear layer over tokens (several rows per sample) and over [B, C], a 1x1 Conv1d and a
    patch convolution, each run twice so that the second call's rows add to the first's."""
    monkeypatch.setitem(onepass.BATCHED_PRODUCTS, "cpu", 10**9)
    monkeypatch.setitem(onepass.GROUPED_CONV, "cpu", 10**9)

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.patch = nn.Conv2d(2, 12, 2, stride=2)
            self.tok = nn.Linear(12, 12)
            self.mix = nn.Conv1d(12, 12, 1)  # 12 * 12 > 4 tokens * 24: products, not per sample
            self.head = nn.Linear(12, 12)

        def forward(self, x, t):
            h = self.patch(x).flatten(2)  # [B, 12, 4 tokens]
            h = self.mix(torch.tanh(self.mix(h)))
            h = self.tok(torch.tanh(self.tok(h.transpose(1, 2))))  # [B, tokens, 4]
            v = h.mean(1)
            return self.head(torch.tanh(self.head(v))).sum(1) * (1 + t / T)

    torch.manual_seed(0)
    model = Twice().double()
    ant = ANT(linear_schedule(T), k=4, method="pcgrad", model=model, sampling="uniform")
    x = torch.randn(9, 2, 4, 4, dtype=torch.float64)
    ts = [3, 4, 5, 6, 60, 80, 85, 90, 95] if empty else [3, 4, 5, 6, 40, 41, 60, 61, 95]
    b2, t2, counts = ant._sorted(x, torch.tensor(ts))
    assert sorted(counts) != [counts[0]] * 4 and 1 in counts and (0 in counts) == empty

    def loss_fn(b, tt):
        return model(b, tt) ** 2

    calls = _spy(monkeypatch, "blocks_major")
    J = fill(ant, loss_fn, b2, t2, "onepass", counts=counts)  # noqa: N806
    assert len(calls) == 7  # every product layer call: patch, mix x2, tok x2, head x2
    close(J, reference_J(model, loss_fn, b2, t2, ant.clusters, 4), rtol=1e-10, atol=1e-12)


def test_batched_products_under_bf16_autocast_equal_the_per_cluster_products(monkeypatch):
    """Half-precision activations (bf16 autocast) take the batched product in their dtype and
    store it in J's float32 rows, as the per-cluster products do: the two agree to bf16
    rounding of the sums, and the rows of a fresh step are set, not added."""
    torch.manual_seed(0)
    model = _randomise(create_model("dit-tiny"))  # at init adaLN-zero leaves one layer's rows
    model.class_dropout_prob = 0.0
    diffusion = GaussianDiffusion(linear_schedule(1000))
    ant = ANT(linear_schedule(1000), k=5, method="pcgrad", model=model)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(11, model.in_channels, 8, 8, generator=g)
    batch = {"x": x, "noise": torch.randn(x.shape, generator=g), "y": torch.randint(0, 10, (11,))}

    def loss_fn(b, tb):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = diffusion.training_losses(model, b["x"], tb, noise=b["noise"],
                                            model_kwargs={"y": b["y"]})["loss"]  # fmt: skip
        return out.float()

    t = ant.sample_timesteps(11)
    Js = {}  # noqa: N806
    for limit in (None, 10**9):
        monkeypatch.setitem(onepass.BATCHED_PRODUCTS, "cpu", limit)
        fill(ant, loss_fn, batch, t, "onepass")  # a step before: its rows must be replaced
        Js[limit] = fill(ant, loss_fn, batch, t, "onepass")
    nonzero = (Js[None].abs().sum(0) > 0).float().mean()
    assert Js[None].dtype == torch.float32 and nonzero > 0.9  # every layer's rows, not one's
    close(Js[10**9], Js[None], rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("frozen", [None, "weight", "bias"])
def test_group_norm_rows_from_the_forward_statistics_and_without_them(frozen, monkeypatch):
    """GroupNorm's rows: from the statistics the forward kept (its backward node's mean and
    1 / std: one native backward call per norm on an activation), recomputed for a norm on
    the raw batch (its input does not require grad, so no statistics were kept); a
    channels-last activation, an output gradient expanded over the positions (a sum right
    after the norm), a [B, C] input, and a frozen weight or bias (the other keeps its rows)."""

    class Norms(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.n0 = nn.GroupNorm(2, 4)  # on the batch itself
            self.c = nn.Conv2d(4, 6, 3, padding=1)
            self.n1 = nn.GroupNorm(3, 6)
            self.n2 = nn.GroupNorm(2, 6)
            self.n3 = nn.GroupNorm(3, 6)
            self.out = nn.Linear(6, 1)

        def forward(self, x, t):
            h = self.c(self.n0(x) * (1 + t[:, None, None, None] / T))
            h = self.n1(torch.tanh(h).contiguous(memory_format=torch.channels_last))
            s = self.n3(h).sum(dim=(2, 3))  # n3's output gradient: stride 0 over positions
            v = self.n2(torch.tanh(h).mean(dim=(2, 3)) + s)  # [B, C]
            return self.out(torch.tanh(v)).squeeze(1)

    native = torch.ops.aten.native_group_norm_backward
    calls = []

    def counted(*args):
        calls.append(args[0].shape)
        return native(*args)

    monkeypatch.setattr(torch.ops.aten, "native_group_norm_backward", counted)

    torch.manual_seed(0)
    model = _randomise(Norms().double())
    if frozen is not None:
        for m in (model.n0, model.n1, model.n2, model.n3):
            getattr(m, frozen).requires_grad_(False)
    ant = ANT(linear_schedule(T), k=3, method="pcgrad", model=model, mode="onepass")
    x = torch.randn(10, 4, 5, 5, dtype=torch.float64) * 2 + 1
    t = ant.sample_timesteps(10)

    def loss_fn(b, tt):
        return model(b, tt) ** 2

    J = fill(ant, loss_fn, x, t, "onepass")  # noqa: N806
    assert calls == [(1, 60, 1), (1, 60, 25), (1, 60, 25)]  # n2, n3, n1 (not n0)
    del calls[:]
    ref = reference_J(model, loss_fn, x, t, ant.clusters, 3)
    assert ref.abs().sum(1).min() > 0
    torch.testing.assert_close(J, ref, rtol=1e-10, atol=1e-12)


def test_empty_clusters_give_zero_rows():
    torch.manual_seed(0)
    model = Toy()
    ant = ANT(linear_schedule(T), k=5, method="pcgrad", model=model, sampling="uniform")
    batch = toy_batch(3)
    t = torch.tensor([5, 7, 90])  # clusters 0 and 4 only (sorted below by the engine)
    fill(ant, toy_loss(model), toy_batch(20), ant.sample_timesteps(20), "onepass")  # dirty J
    counts = ant.sampler.counts_for(t)
    assert counts is None  # not drawn by the sampler: the engine counts and sorts itself
    b2, t2, counts = ant._sorted(batch, t)
    J = fill(ant, toy_loss(model), b2, t2, "onepass", counts=counts)  # noqa: N806
    empty = torch.as_tensor(counts) == 0
    assert empty.sum() >= 2 and J[empty].abs().max() == 0 and J[~empty].abs().sum(1).min() > 0
    close(J, fill(ant, toy_loss(model), b2, t2, "micro", counts=counts))


def test_exception_in_loss_restores_model():
    torch.manual_seed(0)
    model = Toy()
    ant = ANT(linear_schedule(T), k=4, method="pcgrad", model=model, mode="onepass")
    batch = toy_batch(8)
    t = ant.sample_timesteps(8)

    def broken(b, tb):
        model(b["x"], tb, b["tok"])
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        ant.backward(broken, batch, t)
    assert all(p.requires_grad for n, p in model.named_parameters() if n != "frozen.bias")
    assert all(not m._forward_hooks for m in model.modules())
    model.zero_grad(set_to_none=True)  # normal use: summed gradients on every parameter
    toy_loss(model)(batch, t).mean().backward()
    used = [p for n, p in model.named_parameters() if n != "frozen.bias" and "aux" not in n]
    assert all(p.grad is not None for p in used)
    with torch.no_grad():  # sampling between steps: no graph, no hooks
        assert not model(batch["x"], t, batch["tok"]).requires_grad


class WithBare(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.scale = nn.Parameter(torch.ones(4))
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)

    def forward(self, x, t):
        h = self.lin(x) * self.scale
        return self.attn(h, h, h)[0].mean(dim=(1, 2))


def test_unsupported_parameters_fall_back_or_raise():
    model = WithBare()
    bad = unsupported_parameters(model)
    assert bad[:2] == ["scale", "attn.in_proj_weight"] and "attn.out_proj.weight" in bad
    ant = ANT(linear_schedule(T), k=4, method="pcgrad", model=model)
    assert ant._onepass is None and "mode='auto' (micro)" in repr(ant)
    x = torch.randn(6, 3, 4)
    t = ant.sample_timesteps(6)
    ant.backward(lambda b, tb: model(b, tb), x, t)  # micro serves it
    with pytest.raises(ValueError, match="scale, attn.in_proj_weight"):
        ANT(linear_schedule(T), k=4, method="pcgrad", model=model, mode="onepass")
    with pytest.raises(ValueError, match="BatchNorm"):
        ANT(linear_schedule(T), k=4, method="pcgrad", model=nn.BatchNorm1d(3), mode="onepass")
    with pytest.raises(ValueError, match="mode must be one of"):
        ANT(linear_schedule(T), k=4, method="pcgrad", mode="one-pass")


class OffBatch(nn.Module):
    """A Linear on a table shared by all samples: not batch-major, so onepass cannot split it."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Embedding(5, 4)
        self.proj = nn.Linear(4, 4)
        self.lin = nn.Linear(4, 4)

    def forward(self, x, t):
        shared = self.proj(self.table.weight[:3] * 0 + torch.ones(3, 4))  # [3, 4]
        return (self.lin(x) @ shared.t()).pow(2).mean(1) + self.table(t % 5).sum(1)


def test_layer_off_the_batch_dim_falls_back_at_runtime():
    torch.manual_seed(0)
    model = OffBatch()
    ant, x, t = _engine(model, 6, (4,))
    assert ant._onepass is not None  # every parameter sits in a served layer
    with pytest.warns(UserWarning, match="uses 'micro' from now on"):
        J = fill(ant, lambda b, tb: model(b, tb), x, t, "auto")  # noqa: N806
    assert ant._onepass is None and all(p.requires_grad for p in model.parameters())
    close(J, fill(ant, lambda b, tb: model(b, tb), x, t, "micro"))
    # the table's weight is also read outside its layer: the first-forward audit says so
    with pytest.raises(ValueError, match="'table.weight' is used outside its layer"):
        fill(ant, lambda b, tb: model(b, tb), x, t, "onepass")



class Checkpointed(nn.Module):
    """A block under activation checkpointing (recomputed in the backward)."""

    def __init__(self, reentrant: bool | None) -> None:  # None: no checkpointing
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.blk = nn.Sequential(nn.Linear(8, 8), nn.SiLU(), nn.Linear(8, 8))
        self.out = nn.Linear(8, 4)
        self.reentrant = reentrant

    def forward(self, x, t):
        h = self.a(x) + t[:, None].float() / T
        if self.reentrant is None:
            h = self.blk(h)
        else:
            h = torch.utils.checkpoint.checkpoint(self.blk, h, use_reentrant=self.reentrant)
        return self.out(F.silu(h)).pow(2).mean(1)


@pytest.mark.parametrize("reentrant", [True, False])
def test_activation_checkpointing_falls_back_or_raises(reentrant):
    """The recompute runs the block's layers in the backward, where the forward hooks are not
    (reentrant: the first forward ran them under no_grad; otherwise the recompute disagrees
    with the hooked forward): auto must not keep a J missing those layers."""
    torch.manual_seed(0)
    model = Checkpointed(reentrant)
    ant, x, t = _engine(model, 9, (4,), k=3)
    fn = lambda b, tb: model(b, tb)  # noqa: E731
    plain = Checkpointed(None)
    plain.load_state_dict(model.state_dict())  # autograd.grad refuses reentrant checkpoints
    ref = reference_J(plain, lambda b, tb: plain(b, tb), x, t, ant.clusters, 3)
    with pytest.warns(UserWarning, match="checkpointing"):
        J = fill(ant, fn, x, t, "auto")  # noqa: N806
    assert ant._onepass is None
    close(J, ref)
    with pytest.raises(ValueError, match="checkpointing recomputes"):
        fill(ant, fn, x, t, "onepass")
    assert all(p.requires_grad for p in model.parameters())


class InPlaceAfter(nn.Module):
    """Layer b's input is scaled in place after b used it."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x, t):
        h = self.a(x) + t[:, None].float() / T
        y = self.b(h)
        h.mul_(2.0)
        return (h + y).pow(2).mean(1)


def test_input_modified_in_place_after_the_layer_is_refused():
    """Autograd refuses this in micro mode (b saves h); onepass reads h in the backward, so it
    must refuse it too instead of taking b's weight gradient from the doubled h."""
    torch.manual_seed(0)
    model = InPlaceAfter()
    ant, x, t = _engine(model, 8, (4,))
    with pytest.raises(ValueError, match="'b' was modified in place"):
        fill(ant, lambda b, tb: model(b, tb), x, t, "onepass")
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        fill(ant, lambda b, tb: model(b, tb), x, t, "micro")


class NormThenInPlace(nn.Module):
    """A GroupNorm, then a Linear whose input changes in place after use (``modify``) or that
    is called on all samples but the last (``drop``: refused in the forward)."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(2, 4, 3, padding=1)
        self.gn = nn.GroupNorm(2, 4)
        self.lin = nn.Linear(64, 1)

    def forward(self, x, t, modify=False, drop=False):
        h = torch.tanh(self.gn(self.c(x))).flatten(1) * (1 + t[:, None] / T)
        out = self.lin(h[:-1] if drop else h)
        if modify:
            h.mul_(2.0)
        return out.squeeze(1) ** 2


def test_steps_leave_no_reference_cycles():
    """The hooks drop what they hold (a layer's input, GroupNorm's backward node) when the step
    ends, also when the backward stops early (here at the Linear, before the GroupNorm's hook
    ran) or the forward does (the Linear on B - 1 samples, after the GroupNorm ran): the
    GroupNorm's input is freed as soon as the step is over, and no step leaves a reference
    cycle, which would keep its graph and saved activations alive until a full garbage
    collection (or as long as the engine holds them)."""
    torch.manual_seed(0)
    model = NormThenInPlace()
    ant, x, t = _engine(model, 8, (2, 4, 4))
    inputs = []
    model.gn.register_forward_hook(lambda m, args, out: inputs.append(weakref.ref(args[0])))
    fill(ant, lambda b, tb: model(b, tb), x, t, "onepass")  # warm-up: one-time objects
    gc.collect()
    gc.disable()
    try:
        fill(ant, lambda b, tb: model(b, tb), x, t, "onepass")
        assert inputs[-1]() is None and gc.collect() == 0
        for kw, error in (("modify", "'lin' was modified in place"), ("drop", "not batch-major")):
            try:
                fill(ant, lambda b, tb: model(b, tb, **{kw: True}), x, t, "onepass")  # noqa: B023
            except ValueError as e:
                assert error in str(e)  # noqa: PT017
                e.__traceback__ = None  # its frames would be a cycle of the test's own making
            else:
                raise AssertionError(f"{kw}: not refused")
            assert inputs[-1]() is None, kw
            assert gc.collect() == 0, kw
    finally:
        gc.enable()


class PositionTable(nn.Module):
    """A learned position table indexed by arange(L), broadcast over the batch."""

    def __init__(self, L: int) -> None:  # noqa: N803
        super().__init__()
        self.L = L
        self.inp = nn.Linear(2, 4)
        self.pos = nn.Embedding(L, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x, t):
        h = self.inp(x) + self.pos(torch.arange(self.L))[None] + t[:, None, None].float() / T
        return self.out(torch.tanh(h)).pow(2).mean((1, 2))


def _falls_back_and_is_refused(model: nn.Module, why: str, refused: str) -> None:
    """At B = L = 8: auto warns ``why`` and takes micro's J (equal to the reference); an
    explicit onepass raises ``refused``."""
    ant, x, t = _engine(model, 8, (8, 2))
    fn = lambda b, tb: model(b, tb)  # noqa: E731
    ref = reference_J(model, fn, x, t, ant.clusters, 2)
    with pytest.warns(UserWarning, match=why):
        J = fill(ant, fn, x, t, "auto")  # noqa: N806
    close(J, ref)
    ant._onepass = None
    with pytest.raises(ValueError, match=refused):
        fill(ant, fn, x, t, "onepass")


def test_layer_on_a_batch_free_tensor_is_refused_even_when_its_length_is_b():
    """pos(arange(L)) is shared by all samples (autograd sums its output gradient over the
    batch): with L == B the shape check passes, so the first forward's audit must see that the
    index tensor was made without the batch."""
    torch.manual_seed(0)
    _falls_back_and_is_refused(PositionTable(8), "computed without the batch",
                               "'pos' .*computed without the batch")  # fmt: skip


class AttributeTable(PositionTable):
    """The index tensor made once and kept as a plain attribute (neither buffer nor made in the
    forward)."""

    def __init__(self, L: int) -> None:  # noqa: N803
        super().__init__(L)
        self.ids = torch.arange(L)

    def forward(self, x, t):
        h = self.inp(x) + self.pos(self.ids)[None] + t[:, None, None].float() / T
        return self.out(torch.tanh(h)).pow(2).mean((1, 2))


class SequenceFirst(nn.Module):
    """A block run on [L, B, D] (nn.Transformer's default layout), through transpose, permute,
    movedim or .mT."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.inp, self.mix, self.out = nn.Linear(2, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x, t):
        h = self.inp(x) + t[:, None, None].float() / T  # [B, L, 4]
        h = {"transpose": lambda v: v.transpose(0, 1), "permute": lambda v: v.permute(1, 0, 2),
             "movedim": lambda v: torch.movedim(v, 0, 1),
             "mT": lambda v: v.permute(1, 2, 0).mT}[self.how](h)  # fmt: skip
        h = torch.tanh(self.mix(h)).transpose(0, 1)  # back to [B, L, 4]
        return self.out(h).pow(2).mean((1, 2))


@pytest.mark.parametrize("how", ["transpose", "permute", "movedim", "mT"])
def test_sequence_first_layer_is_refused_even_when_its_length_is_b(how):
    """A layer on [L, B, D] passes the shape check when L == B, but its rows are positions,
    not samples (J was 11% off): the first forward follows the batch dimension from the batch
    to the layer's input."""
    torch.manual_seed(0)
    _falls_back_and_is_refused(SequenceFirst(how), "'mix' .*batch dimension is 1, not 0",
                               "sequence-first")  # fmt: skip


def test_a_position_index_kept_as_a_plain_attribute_is_a_constant():
    """self.ids = torch.arange(L) set in __init__ is neither a buffer nor made in the forward:
    the audit takes modules' tensor attributes as constants too (J was off by 0.10 at L == B)."""
    torch.manual_seed(0)
    _falls_back_and_is_refused(AttributeTable(8), "'pos' .*computed without the batch",
                               "'pos' .*computed without the batch")  # fmt: skip


def test_batch_dimension_rules():
    from antdiff.engine.onepass import _batch_dim_after as after

    x = torch.empty(5, 3, 4)
    cases = [
        (torch.transpose, (x, 0, 1), {}, 0, 1), (torch.transpose, (x, -1, 0), {}, 0, 2),
        (torch.Tensor.permute, (x, 2, 0, 1), {}, 0, 1), (torch.Tensor.permute, (x, (1, 2, 0)), {},
                                                         0, 2),
        (torch.movedim, (x, 0, 2), {}, 0, 2), (torch.movedim, (x, (0, 1), (2, 0)), {}, 0, 2),
        (torch.movedim, (x, (0, 1), (2, 0)), {}, 1, 0),
        (torch.add, (x, 1.0), {}, 0, 0), (torch.Tensor.reshape, (x, 5, 12), {}, 0, 0),
        (torch.Tensor.reshape, (x, 15, 4), {}, 0, None), (torch.sum, (x, 1), {}, 0, 0),
    ]  # fmt: skip
    for func, args, kwargs, d, want in cases:
        r = func(*args, **kwargs)
        assert after(func, args, kwargs, x, r, d) == want, (func, args, d)
    got = {}

    class Spy(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if getattr(func, "__name__", "") == "__get__":
                got[func.__self__.__name__] = after(func, args, kwargs or {}, args[0], out, 0)
            return out

    with Spy():
        x.mT  # noqa: B018
        x[0].T  # noqa: B018
    assert got == {"mT": 0, "T": 1}
    assert after(torch.Tensor.permute, (x, 1, 0, 2), {}, x, x.permute(1, 0, 2), None) is None


class BufferTable(nn.Module):
    """A Linear applied to a fixed float buffer [L, 2] (no batch in it), broadcast over B."""

    def __init__(self, L: int) -> None:  # noqa: N803
        super().__init__()
        self.register_buffer("grid", torch.randn(L, 2))
        self.pe = nn.Linear(2, 4)
        self.inp = nn.Linear(2, 4)

    def forward(self, x, t):
        h = self.inp(x) + self.pe(self.grid)[None] + t[:, None, None].to(x.dtype) / T
        return torch.tanh(h).pow(2).mean((1, 2))


def test_buffers_replaced_after_attach_are_still_constants():
    """Module.to() replaces buffer tensors: the audit reads the buffers at the first forward,
    not when the plan was made at attach."""
    torch.manual_seed(0)
    model = BufferTable(8)
    ant, x, t = _engine(model, 8, (8, 2))
    model.double()  # a new grid tensor
    with pytest.raises(ValueError, match="'pe' .*computed without the batch"):
        fill(ant, lambda b, tb: model(b, tb), x.double(), t, "onepass")

class Tied(nn.Module):
    """An output projection tied to the embedding table (F.linear on emb.weight)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(T, 4)
        self.lin = nn.Linear(4, 4)

    def forward(self, x, t):
        h = torch.tanh(self.lin(x) + self.emb(t))
        return torch.nn.functional.linear(h, self.emb.weight).pow(2).mean(1)


def test_tied_weights_are_detected_not_silently_missed():
    torch.manual_seed(0)
    model = Tied()
    ant, x, t = _engine(model, 6, (4,))
    with pytest.warns(UserWarning, match="used outside its layer"):
        J = fill(ant, lambda b, tb: model(b, tb), x, t, "auto")  # noqa: N806
    assert ant._onepass is None
    close(J, fill(ant, lambda b, tb: model(b, tb), x, t, "micro"))
    with pytest.raises(ValueError, match="'emb.weight' is used outside its layer"):
        fill(ant, lambda b, tb: model(b, tb), x, t, "onepass")


def test_ddp_single_process_gloo(tmp_path):
    """DDP(model) under onepass: no reducer wait, J all-reduced once, same update as micro."""
    torch.manual_seed(0)
    ref = Toy()
    ant = ANT(linear_schedule(T), k=4, method="pcgrad", model=ref, mode="micro", seed=0)
    batch = toy_batch(12)
    ant.backward(toy_loss(ref), batch, ant.sample_timesteps(12))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0,
                            world_size=1)  # fmt: skip
    try:
        torch.manual_seed(0)
        model = nn.parallel.DistributedDataParallel(Toy())
        ant2 = ANT(linear_schedule(T), k=4, method="pcgrad", model=model, seed=0)
        assert ant2.comm.active and ant2._onepass is not None
        ant2.backward(toy_loss(model), batch, ant2.sample_timesteps(12))
        got = [p.grad.clone() for p in model.module.parameters() if p.requires_grad]
        model.module.zero_grad(set_to_none=True)  # a plain DDP step still works afterwards
        toy_loss(model)(batch, ant2.sample_timesteps(12)).mean().backward()
    finally:
        dist.destroy_process_group()
    want = [p.grad for p in ref.parameters() if p.requires_grad]
    close(torch.cat([g.reshape(-1) for g in got]), torch.cat([g.reshape(-1) for g in want]))


class _ConvNet(nn.Module):
    def __init__(self, cin: int, cout: int, side: int) -> None:
        super().__init__()
        self.c = nn.Conv2d(cin, cout, 3, padding=1)
        self.out = nn.Linear(cout * side * side, 1)

    def forward(self, x, t):
        return self.out(torch.tanh(self.c(x)).flatten(1)).squeeze(1) * (1 + t / T)


def test_grouped_conv_rows_with_the_last_cluster_empty():
    """The grouped CPU conv call pads an empty cluster with a real sample: with the LAST
    cluster empty its start bound is B, past the batch (only middle ones were tested)."""
    torch.manual_seed(0)
    model = _ConvNet(3, 3, 4).double()
    ant = ANT(linear_schedule(T), k=4, method="pcgrad", model=model, sampling="uniform")
    x = torch.randn(9, 3, 4, 4, dtype=torch.float64)
    t = torch.tensor([3, 4, 5, 6, 40, 41, 60, 61, 62])  # clusters 0, 1, 2; cluster 3 empty
    b2, t2, counts = ant._sorted(x, t)
    assert counts[-1] == 0 and sum(c > 0 for c in counts) > 1

    def loss_fn(b, tt):
        return model(b, tt) ** 2

    J = fill(ant, loss_fn, b2, t2, "onepass", counts=counts)  # noqa: N806
    close(J, reference_J(model, loss_fn, b2, t2, ant.clusters, 4), rtol=1e-10, atol=1e-12)


def test_float64_rows_keep_float64_precision_in_every_mode():
    """micro and retain_graph summed a float64 loss in float32, so the backward's 1 / N was
    float32 (J 3e-8 off in relative terms): every mode now matches autograd to 1e-10; and a
    channels_last conv weight's rows are in its memory order in every mode alike."""
    torch.manual_seed(0)
    for layout in (torch.contiguous_format, torch.channels_last):
        model = _ConvNet(2, 4, 6).double().to(memory_format=layout)
        ant = ANT(linear_schedule(T), k=3, method="pcgrad", model=model)
        x = torch.randn(9, 2, 6, 6, dtype=torch.float64)
        b2, t2, counts = ant._sorted(x, ant.sample_timesteps(9))

        def loss_fn(b, tt, model=model):
            return model(b, tt) ** 2

        rows = {m: fill(ant, loss_fn, b2, t2, m, counts=counts)
                for m in ("onepass", "micro", "retain_graph")}  # fmt: skip
        want = (reference_J(model, loss_fn, b2, t2, ant.clusters, 3)
                if layout == torch.contiguous_format else rows["onepass"])  # fmt: skip
        assert layout == torch.contiguous_format or not model.c.weight.is_contiguous()
        for J in rows.values():  # noqa: N806
            close(J, want, rtol=1e-10, atol=1e-13)


def test_ab_onepass_calls_compares_every_policy(tmp_path):
    """benchmarks/ab_onepass_calls.py (the GPU A/B of one call against k calls per layer) runs
    on this machine: a row per policy, each policy's gradient within float32 rounding of the
    per-cluster one."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "ab.md"
    subprocess.run(
        [sys.executable, str(root / "benchmarks" / "ab_onepass_calls.py"), "unet", "--rounds",
         "1", "--out", str(out)], check=True, cwd=tmp_path, capture_output=True,
    )  # fmt: skip
    rows = [r.split("|") for r in out.read_text().splitlines() if r.startswith("| unet")]
    assert [r[4].strip() for r in rows] == ["default", "per-cluster", "grouped-conv",
                                            "one-call", "one-call-2048"]
    assert all(float(r[8]) < 1e-5 for r in rows)
    assert all(r[9].strip() == "-" for r in rows)  # host syncs: counted on CUDA only

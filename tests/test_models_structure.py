"""ADM / DiT structure and formulas checked on tiny configurations against hand-computed values
(gaps found by a second mutation-testing pass over antdiff.models)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from antdiff.models import create_model
from antdiff.models.adm import (
    AttentionBlock,
    Downsample,
    ResBlock,
    UNetModel,
    Upsample,
    timestep_embedding,
)


def _perturb(module: nn.Module, std: float = 0.1) -> nn.Module:
    """Every parameter made non-zero, so zero-initialised layers no longer hide the rest."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * std)
    return module


def _sinusoids(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """ADM / DiT timestep embedding by its definition: [cos(t w_i), sin(t w_i)] with
    w_i = max_period^(-i / half), zero-padded to an odd dim."""
    half = dim // 2
    w = torch.tensor([max_period ** (-i / half) for i in range(half)], dtype=torch.float64)
    ang = t.double()[:, None] * w[None]
    out = torch.cat([torch.cos(ang), torch.sin(ang)], 1)
    return torch.cat([out, torch.zeros(len(t), dim % 2, dtype=torch.float64)], 1).float()


def _nearest_up(x: torch.Tensor) -> torch.Tensor:
    return x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)


def _avg_down(x: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    return x.reshape(b, c, h // 2, 2, w // 2, 2).mean(dim=(3, 5))


# ---------------------------------------------------------------------------------- ADM


def test_timestep_embedding_odd_dim_pads_a_trailing_zero():
    t = torch.tensor([0, 3, 250])
    emb = timestep_embedding(t, 7)
    assert emb.shape == (3, 7)
    torch.testing.assert_close(emb, _sinusoids(t, 7), rtol=0, atol=1e-5)
    assert torch.equal(emb[:, -1], torch.zeros(3))


def test_fresh_adm_outputs_zero_and_fresh_attention_is_identity():
    """Zero-initialised output conv (the whole UNet starts at 0) and attention projection (an
    attention block starts as the identity)."""
    torch.manual_seed(0)
    model = create_model("adm-tiny").eval()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([4, 900])
    with torch.no_grad():
        assert torch.equal(model(x, t), torch.zeros(2, 1, 8, 8))
        blk = AttentionBlock(16, num_heads=2, num_head_channels=-1)
        h = torch.randn(2, 16, 4, 4)
        assert torch.equal(blk(h), h)


@pytest.mark.parametrize("resample", ["up", "down"])
def test_adm_resblock_resamples_both_paths_nearest_and_average(resample):
    """Up / down ResBlocks (resblock_updown): h = in_conv(R(silu(in_norm(x)))), skip = R(x),
    R = nearest x2 or 2x2 average pool; the resample comes before in_conv. Gradients reach the
    embedding through both scale and shift."""
    blk = _perturb(ResBlock(8, 12, 8, 0.0, True, resample)).eval()
    resamp = _nearest_up if resample == "up" else _avg_down
    x = torch.randn(2, 8, 4, 4)
    emb = torch.randn(2, 12, requires_grad=True)
    got = blk(x, emb)
    h = blk.in_conv(resamp(F.silu(blk.in_norm(x))))
    e = blk.emb(F.silu(emb))[:, :, None, None]
    h = blk.out_norm(h) * (1 + e[:, :8]) + e[:, 8:]
    want = resamp(x) + blk.out_conv(F.silu(h))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(want)
    (gg,) = torch.autograd.grad((got * g).sum(), emb)
    (gw,) = torch.autograd.grad((want * g).sum(), emb)
    torch.testing.assert_close(gg, gw, rtol=1e-4, atol=1e-6)


def test_adm_resblock_dropout_comes_after_silu():
    """ADM's out layers: norm -> SiLU -> Dropout -> conv (the dropout mask scales silu(h))."""
    blk = _perturb(ResBlock(8, 12, 8, 0.5, False)).train()
    x, emb = torch.randn(2, 8, 4, 4), torch.randn(2, 12)
    with torch.no_grad():
        e = blk.emb(F.silu(emb))[..., None, None]
        h = blk.out_norm(blk.in_conv(F.silu(blk.in_norm(x))) + e)
        torch.manual_seed(5)
        got = blk(x, emb)
        torch.manual_seed(5)
        mask = F.dropout(torch.ones_like(h), 0.5, training=True)
        assert 0 < int((mask == 0).sum()) < mask.numel()
        want = x + blk.out_conv(F.silu(h) * mask)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_adm_plain_down_and_up_sampling_layers():
    """conv_resample=False: 2x2 average pool / nearest x2; with convs: a 3x3 stride-2 conv with
    padding 1 / nearest x2 then a 3x3 conv."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(Downsample(4, False)(x), _avg_down(x))
        torch.testing.assert_close(Upsample(4, False)(x), _nearest_up(x))
        d = Downsample(4, True)
        torch.testing.assert_close(d(x), F.conv2d(x, d.op.weight, d.op.bias, stride=2, padding=1))
        u = Upsample(4, True)
        torch.testing.assert_close(u(x), F.conv2d(_nearest_up(x), u.conv.weight, u.conv.bias,
                                                  padding=1))  # fmt: skip


def test_adm_embedding_skip_order_and_output_head():
    """The embedding every ResBlock receives is time_embed = Linear-SiLU-Linear of the sinusoids
    (max period 10000) plus the class embedding; each decoder stage takes cat([h, skip]) (h
    first, as guided-diffusion); the head is conv(silu(norm(h))); the middle block is
    ResBlock-attention-ResBlock."""
    model = _perturb(create_model("adm-tiny", num_classes=5)).eval()
    assert [type(m) for m in model.middle_block] == [ResBlock, AttentionBlock, ResBlock]
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([7, 640]), torch.tensor([3, 5])
    seen = {}
    hooks = [
        model.middle_block.register_forward_hook(lambda m, a, o: seen.__setitem__("mid", o)),
        model.input_blocks[-1].register_forward_hook(lambda m, a, o: seen.__setitem__("enc", o)),
        model.output_blocks[0].register_forward_hook(lambda m, a, o: seen.__setitem__("dec", a)),
        model.output_blocks[-1].register_forward_hook(lambda m, a, o: seen.__setitem__("last", o)),
    ]
    with torch.no_grad():
        out = model(x, t, y)
        for hk in hooks:
            hk.remove()
        te = model.time_embed
        s = _sinusoids(t, model.model_channels)
        emb = te[2](F.silu(te[0](s))) + model.label_emb.weight[y]
        torch.testing.assert_close(seen["dec"][1], emb, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(seen["dec"][0], torch.cat([seen["mid"], seen["enc"]], 1))
        norm, conv = model.out[0], model.out[2]
        torch.testing.assert_close(out, conv(F.silu(norm(seen["last"]))), rtol=1e-5, atol=1e-5)


def test_unconditional_models_add_no_class_embedding():
    """Without classes the conditioning is the timestep embedding alone (ADM emb, DiT c)."""
    t = torch.tensor([7, 640])
    for name in ("adm-tiny", "dit-tiny"):
        model = _perturb(create_model(name, num_classes=None)).eval()
        te = model.time_embed if name == "adm-tiny" else model.t_embed
        first = model.input_blocks[1][0] if name == "adm-tiny" else model.blocks[0]
        seen = {}
        hk = first.register_forward_hook(lambda m, a, o, s=seen: s.update(emb=a[1]))
        with torch.no_grad():
            model(torch.randn(2, 1, 8, 8), t)
            want = te[2](F.silu(te[0](_sinusoids(t, te[0].in_features))))
        hk.remove()
        torch.testing.assert_close(seen["emb"], want, rtol=1e-4, atol=1e-4)


def test_adm_constructor_and_input_checks():
    with pytest.raises(ValueError, match="H and W must be divisible"):
        create_model("adm-tiny")(torch.randn(1, 1, 8, 9), torch.tensor([1]))
    with pytest.raises(ValueError, match=r"t must be \[B\] = \[2\]"):
        create_model("adm-tiny")(torch.randn(2, 1, 8, 8), torch.tensor([[1], [2]]))
    with pytest.raises(ValueError, match=r"class_dropout_prob must be in \[0, 1\)"):
        create_model("adm-tiny", class_dropout_prob=-0.1)
    with pytest.raises(ValueError, match=r"attention_resolutions \[2\] never occur"):
        create_model("adm-tiny", attention_resolutions=(2,))
    with pytest.raises(ValueError, match="num_heads must be a positive integer"):
        create_model("adm-tiny", num_heads=0, num_head_channels=0)
    with pytest.raises(ValueError, match="num_classes must be a positive integer"):
        UNetModel(image_size=8, num_classes=True)
    with pytest.raises(ValueError, match="model_channels must be a positive integer"):
        UNetModel(image_size=8, model_channels=None)
    with pytest.raises(ValueError, match="not divisible by num_heads 3"):
        AttentionBlock(16, num_heads=3, num_head_channels=-1)
    with pytest.raises(ValueError, match="not divisible by num_head_channels 5"):
        AttentionBlock(16, num_heads=1, num_head_channels=5)


def test_adm_runs_on_other_dtype_input_under_autocast():
    """The dtype check lets autocast through: a float32 model takes bf16 x under autocast."""
    model = create_model("adm-tiny")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(1, 1, 8, 8).bfloat16(), torch.tensor([3]))
    assert out.shape == (1, 1, 8, 8)


# ---------------------------------------------------------------------------------- DiT


def test_dit_layer_norms_use_eps_1e6_and_mlp_uses_tanh_gelu():
    """DiT's LayerNorms (eps 1e-6, no affine) and MLP (fc - GELU(tanh) - fc), seen on tokens of
    tiny variance (where eps matters) and large pre-activations (where the tanh GELU differs)."""
    model = _perturb(create_model("dit-tiny"))
    blk, d = model.blocks[0], 64
    x = 3.0 + 1e-3 * torch.randn(2, 16, d)  # variance 1e-6 ~ eps
    ln = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-6)
    with torch.no_grad():
        for norm in (blk.norm1, blk.norm2, model.final_norm):
            torch.testing.assert_close(norm(x), ln, rtol=1e-3, atol=1e-3)
        z = 4 * torch.randn(2, 16, d)
        a = blk.mlp[0](z)
        gelu = 0.5 * a * (1 + torch.tanh(math.sqrt(2 / math.pi) * (a + 0.044715 * a**3)))
        torch.testing.assert_close(blk.mlp(z), blk.mlp[2](gelu), rtol=1e-6, atol=1e-6)


def test_dit_conditioning_mlps_use_silu():
    """c = Linear(SiLU(Linear(sinusoids(t, 256)))) + y_emb; every adaLN map is Linear(SiLU(c))."""
    model = _perturb(create_model("dit-tiny")).eval()
    t, y = torch.tensor([5, 700]), torch.tensor([1, 10])
    with torch.no_grad():
        l1, l2 = model.t_embed[0], model.t_embed[2]
        c = l2(F.silu(l1(_sinusoids(t, 256)))) + model.y_embed.weight[y]
        seen = {}
        hk = model.blocks[0].ada.register_forward_hook(lambda m, a, o: seen.update(c=a[0], o=o))
        model(torch.randn(2, 1, 8, 8), t, y)
        hk.remove()
        torch.testing.assert_close(seen["c"], c, rtol=1e-4, atol=1e-4)
        for ada in [b.ada for b in model.blocks] + [model.final_ada]:
            torch.testing.assert_close(ada(c), ada[1](F.silu(c)))


def test_dit_init_as_published():
    """DiT's initialize_weights: Linear weights xavier-uniform, biases zero; the patch conv
    xavier-uniform on its flattened weight; t and y embeddings N(0, 0.02); the adaLN maps and the
    final linear zero, so a fresh model's output is final(LN(patch(x) + pos)) once `final` is
    made non-zero (the final adaLN modulation starts off)."""
    torch.manual_seed(0)
    model = create_model("dit-tiny", hidden_size=128)
    blk = model.blocks[0]
    for lin in (blk.qkv, blk.proj, blk.mlp[0], blk.mlp[2]):
        fan_out, fan_in = lin.weight.shape
        bound = math.sqrt(6 / (fan_in + fan_out))
        assert 0.97 * bound < lin.weight.abs().max() <= bound
        assert torch.equal(lin.bias, torch.zeros_like(lin.bias))
    w = model.patch.weight
    bound = math.sqrt(6 / (w[0].numel() + w.shape[0]))
    assert 0.9 * bound < w.abs().max() <= bound
    assert torch.equal(model.patch.bias, torch.zeros_like(model.patch.bias))
    for p in (model.t_embed[0].weight, model.t_embed[2].weight, model.y_embed.weight):
        assert abs(p.std().item() - 0.02) < 0.002 and abs(p.mean().item()) < 0.002
    for p in (model.final_ada[1].weight, model.final_ada[1].bias, blk.ada[1].weight):
        assert torch.equal(p, torch.zeros_like(p))
    model.eval()
    with torch.no_grad():
        model.final.weight.normal_(0, 0.1)
        model.final.bias.normal_(0, 0.1)
        x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([2, 300]), torch.tensor([0, 4])
        h = model.patch(x).flatten(2).transpose(1, 2) + model.pos_embed
        want = model.unpatchify(model.final(F.layer_norm(h, (128,), eps=1e-6)))
        torch.testing.assert_close(model(x, t, y), want, rtol=1e-5, atol=1e-5)


def test_dit_position_table_not_in_state_dict():
    """The fixed table is a non-persistent buffer: state dicts (and checkpoints) do not hold it."""
    model = create_model("dit-tiny")
    assert "pos_embed" not in model.state_dict()
    assert "pos_embed" in dict(model.named_buffers())


def test_dit_paper_registry_settings():
    """The DiT paper's ImageNet-256 setup: 32 x 32 x 4 latents, patch 2 / 4 / 8 (256 / 64 / 16
    tokens), label dropout 0.1, learned sigma; the class default is the same."""
    for size, p, tokens, width in (("XL", 2, 256, 1152), ("S", 4, 64, 384), ("S", 8, 16, 384)):
        with torch.device("meta"):
            model = create_model(f"DiT-{size}/{p}")
        assert model.patch_size == p and model.input_size == 32 and model.in_channels == 4
        assert model.pos_embed.shape == (1, tokens, width)
        assert model.class_dropout_prob == 0.1 and model.learn_sigma and model.num_classes == 1000
    from antdiff.models import DiT

    with torch.device("meta"):
        default = DiT(depth=1)
    assert default.class_dropout_prob == 0.1 and default.freq_dim == 256


def test_dit_constructor_and_input_checks():
    with pytest.raises(ValueError, match="hidden size 64 is not divisible by num_heads 5"):
        create_model("dit-tiny", num_heads=5)
    with pytest.raises(ValueError, match="mlp_ratio must give an MLP at least 1 wide"):
        create_model("dit-tiny", mlp_ratio=0.001)
    with pytest.raises(ValueError, match=r"class_dropout_prob must be in \[0, 1\)"):
        create_model("dit-tiny", class_dropout_prob=-0.1)
    with pytest.raises(ValueError, match="divisible by 4 for 2-D sin-cos"):
        create_model("dit-tiny", hidden_size=66, num_heads=2)
    with pytest.raises(ValueError, match=r"x must be \[B, C, 8, 8\]"):
        create_model("dit-tiny")(torch.randn(1, 1, 16, 8), torch.tensor([1]), torch.tensor([0]))


# ------------------------------------------------------------------------------ registry


def test_registry_override_kinds():
    """Overrides are judged by their default's kind: YAML-1.1 float text becomes a float, an int
    fits a float, bools and ints do not stand in for each other, None switches an option off."""
    from antdiff.models import available_models, model_config

    assert available_models() == sorted(available_models())
    cfg = model_config("dit-tiny", class_dropout_prob="1e-1", mlp_ratio=2, num_classes=None)
    assert cfg["class_dropout_prob"] == 0.1 and isinstance(cfg["class_dropout_prob"], float)
    assert create_model("dit-tiny", class_dropout_prob="1e-1").class_dropout_prob == 0.1
    assert create_model("dit-tiny", mlp_ratio=2).blocks[0].mlp[0].out_features == 128
    assert create_model("dit-tiny", num_classes=None).y_embed is None
    for name, key, value in (("adm-tiny", "learn_sigma", 1), ("adm-tiny", "model_channels", True),
                             ("dit-tiny", "mlp_ratio", True)):  # fmt: skip
        with pytest.raises(ValueError, match="must be of the kind of its default"):
            model_config(name, **{key: value})
    with pytest.raises(ValueError, match=r"default \(1, 2\) \(a list of integers\)"):
        model_config("adm-tiny", channel_mult="12")
    with pytest.raises(ValueError, match=r"channel_mult must list one positive width .*got 2 "
                       r"\(--model.overrides.channel_mult\)"):  # fmt: skip
        create_model("adm-tiny", channel_mult=2)  # one item alone passes the kind check

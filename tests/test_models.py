"""Model registry, ADM/LDM/DiT networks and the latent codecs."""

from __future__ import annotations

import copy
import math
import sys

import numpy as np
import pytest
import torch
from torch import nn

from antdiff.diffusion import GaussianDiffusion
from antdiff.models import (
    DiffusersVAE,
    PrecomputedLatents,
    TinyAutoencoder,
    available_models,
    create_model,
    train_autoencoder,
)
from antdiff.models.adm import timestep_embedding

CPU_SIZES = {  # name -> (input shape per sample, overrides)
    "adm-tiny": ((1, 8, 8), {}),
    "adm-tiny+cls+sigma": ((1, 8, 8), {"num_classes": 10, "learn_sigma": True, "dropout": 0.1}),
    "adm-small": ((1, 16, 16), {}),
    "ldm-tiny": ((4, 4, 4), {}),
    "dit-tiny": ((1, 8, 8), {}),
    "dit-tiny+sigma": ((1, 8, 8), {"learn_sigma": True, "num_classes": None}),
}


def _build(key: str) -> tuple[nn.Module, tuple[int, ...]]:
    name = key.split("+")[0]
    shape, overrides = CPU_SIZES[key]
    torch.manual_seed(0)
    model = create_model(name, **overrides)
    # Zero-initialised layers would make every gradient below trivially zero.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model, shape


def _labels(model: nn.Module, b: int) -> dict:
    return {"y": torch.arange(b) % model.num_classes} if model.num_classes else {}


@pytest.mark.parametrize("key", sorted(CPU_SIZES))
def test_cpu_sizes_train_step(key):
    model, shape = _build(key)
    diff = GaussianDiffusion("linear", learn_sigma=model.learn_sigma)
    x0 = torch.randn(3, *shape)
    t = torch.tensor([0, 400, 999])
    out = diff.training_losses(model, x0, t, model_kwargs=_labels(model, 3))
    assert out["loss"].shape == (3,) and torch.isfinite(out["loss"]).all()
    out["loss"].mean().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert model(x0, t, **_labels(model, 3)).shape == (
        3,
        shape[0] * (1 + model.learn_sigma),
        *shape[1:],
    )


@pytest.mark.parametrize("key", ["adm-tiny+cls+sigma", "ldm-tiny", "dit-tiny"])
def test_model_cast_to_bf16_trains_and_samples(key):
    """model.to(bfloat16) (not autocast): the float32 timestep sinusoids are cast to the model's
    dtype, and sample() feeds the model its dtype while keeping the chain in float32."""
    from antdiff.sampling import sample

    model, shape = _build(key)
    model.eval()
    model.class_dropout_prob = 0.1  # a guided draw below needs a (nominally) trained null class
    x, t = torch.randn(3, *shape), torch.tensor([0, 400, 999])
    ref = model(x, t, **_labels(model, 3))
    half = copy.deepcopy(model).to(torch.bfloat16)
    out = half(x.bfloat16(), t, **_labels(model, 3))
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() <= 0.05 * ref.abs().max()
    diff = GaussianDiffusion("linear", learn_sigma=model.learn_sigma)
    half.train()
    loss = diff.training_losses(half, x.bfloat16(), t, model_kwargs=_labels(model, 3))["loss"]
    loss.float().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in half.parameters() if p.grad is not None)
    y = torch.arange(2) % 10 if model.num_classes else None
    draws = [
        sample(m, diff, (2, *shape), steps=3, y=y, cfg_scale=2.0 if y is not None else 1.0,
               generator=torch.Generator().manual_seed(1), clip_denoised=False)
        for m in (model, half)
    ]
    assert draws[1].dtype == torch.float32
    assert (draws[1] - draws[0]).abs().max() <= 0.05 * draws[0].abs().max()


@pytest.mark.parametrize("key", sorted(CPU_SIZES))
def test_no_cross_sample_coupling(key):
    model, shape = _build(key)
    model.eval()
    x = torch.randn(4, *shape, requires_grad=True)
    t = torch.tensor([3, 250, 600, 990])
    model(x, t, **_labels(model, 4))[1].sum().backward()
    g = x.grad
    assert g[1].abs().sum() > 0
    assert torch.all(g[[0, 2, 3]] == 0), "output of sample 1 depends on other samples"


def test_paper_sizes_param_counts_on_meta():
    """Exact counts, so a missing or extra layer fails. DiT's fixed sin-cos position table is a
    buffer here (a frozen parameter in the DiT code): DiT-XL/2's 674,834,720 + its 256 x 1152 =
    294,912 entries = the published 675,129,632. ADM-light and LDM-FFHQ equal guided-diffusion's
    UNet built with the paper's flags, shape for shape."""
    known = {
        "DiT-XL/2": 674_834_720,
        "DiT-S/2": 32_865_056,
        "DiT-B/2": 130_315_808,
        "DiT-L/2": 457_840_672,
        "ldm-ffhq": 274_056_163,
        "adm-light": 93_563_910,
    }
    for name, want in known.items():
        with torch.device("meta"):
            model = create_model(name)
        params = list(model.parameters())
        assert all(p.is_meta for p in params)
        assert sum(p.numel() for p in params) == want, name
    with torch.device("meta"):
        adm = create_model("adm-light")
    assert adm.out_channels == 6 and adm.model_channels == 128


def test_registry_names_and_errors():
    names = available_models()
    for n in [
        "adm-light",
        "adm-tiny",
        "adm-small",
        "ldm-ffhq",
        "ldm-tiny",
        "dit-tiny",
        "DiT-S/2",
        "DiT-B/4",
        "DiT-L/2",
        "DiT-XL/2",
        "DiT-XL/8",
    ]:
        assert n in names
    with pytest.raises(ValueError, match="unknown model"):
        create_model("DiT-M/2")
    with pytest.raises(ValueError, match="unknown override"):
        create_model("dit-tiny", hidden=3)
    m = create_model("DiT-S/2", input_size=8, in_channels=1, depth=1, num_classes=3)
    assert len(m.blocks) == 1 and m.num_classes == 3
    with pytest.raises(ValueError, match=r"attention_resolutions \[3\] never occur at "
                       r"image_size 8: the levels are \[8, 4\].*model.overrides"):  # fmt: skip
        create_model("adm-tiny", attention_resolutions=(3,))
    # one size, as a CLI override gives it, is that size; anything else is a clear error
    def names(res):
        model = create_model("adm-tiny", attention_resolutions=res)
        return [n for n, _ in model.named_parameters()]

    assert names(4) == names((4,)) != names(()) and names(8) == names((8,)) != names((4,))
    with pytest.raises(ValueError, match="must be feature-map sizes .integers."):
        create_model("adm-tiny", attention_resolutions=("4",))


def test_timestep_embedding_formula():
    t = torch.tensor([0, 1, 17, 999])
    emb = timestep_embedding(t, 6).double().numpy()
    freqs = np.exp(-math.log(10000.0) * np.arange(3) / 3)
    ang = t.numpy()[:, None] * freqs[None]
    np.testing.assert_allclose(emb, np.concatenate([np.cos(ang), np.sin(ang)], 1), atol=1e-4)


def test_dit_adaln_zero_init_patch_layout_and_pos_embed():
    torch.manual_seed(0)
    model = create_model("dit-tiny").eval()
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([1, 2]), torch.tensor([0, 10])
    assert torch.equal(model(x, t, y=y), torch.zeros(2, 1, 8, 8))  # zero final layer
    h = torch.randn(2, 16, 64)
    assert torch.equal(model.blocks[0](h, torch.randn(2, 64)), h)  # zero gates
    # unpatchify inverts a row-major patchify with (i, j, c) order inside each patch.
    m2 = create_model("dit-tiny", in_channels=3)
    img = torch.randn(2, 3, 8, 8)
    tokens = img.reshape(2, 3, 4, 2, 4, 2).permute(0, 2, 4, 3, 5, 1).reshape(2, 16, 12)
    assert torch.equal(m2.unpatchify(tokens), img)
    assert "pos_embed" not in dict(model.named_parameters())
    pe = model.pos_embed[0]
    assert pe.shape == (16, 64) and torch.cdist(pe, pe).add(torch.eye(16)).min() > 0.1


def test_dit_built_on_meta_and_loaded_has_its_position_table():
    """A DiT built on the meta device, materialised with to_empty() and loaded from a state
    dict computes what the model it was saved from does (the fixed position table is not in
    state dicts: it held uninitialised memory)."""
    torch.manual_seed(0)
    ref = create_model("dit-tiny")
    for p in ref.parameters():  # nonzero everywhere, so the position table reaches the output
        p.data.normal_(0, 0.05)
    with torch.device("meta"):
        model = create_model("dit-tiny")
    model = model.to_empty(device="cpu")
    model.pos_embed.fill_(1e4)  # what to_empty() may leave there
    model.load_state_dict(ref.state_dict())
    assert torch.equal(model.pos_embed, ref.pos_embed)
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([1, 700]), torch.tensor([0, 3])
    assert torch.equal(model.eval()(x, t, y=y), ref.eval()(x, t, y=y))


def test_label_dropout_only_in_training_mode():
    model, _ = _build("dit-tiny")
    x = torch.randn(200, 1, 8, 8)
    t = torch.full((200,), 100)
    y = torch.full((200,), 3)
    with torch.no_grad():
        cond = model.eval()(x, t, y=y)
        null = model(x, t, y=torch.full_like(y, 10))
        assert torch.equal(model(x, t, y=y), cond)
        out = model.train()(x, t, y=y)
    dropped = (out - null).abs().amax(dim=(1, 2, 3)) < 1e-6
    kept = (out - cond).abs().amax(dim=(1, 2, 3)) < 1e-6
    assert torch.all(dropped ^ kept)
    assert 5 <= int(dropped.sum()) <= 40  # p = 0.1 of 200


def test_conditioning_errors():
    with pytest.raises(ValueError, match="class-conditional"):
        create_model("dit-tiny")(torch.randn(1, 1, 8, 8), torch.tensor([1]))
    with pytest.raises(ValueError, match="unconditional"):
        create_model("adm-tiny")(torch.randn(1, 1, 8, 8), torch.tensor([1]), y=torch.tensor([0]))


# ----------------------------------------------------------------------------- autoencoders
def _digits() -> torch.Tensor:
    from sklearn.datasets import load_digits

    x = load_digits().images.astype(np.float32) / 16.0 * 2.0 - 1.0
    return torch.from_numpy(x)[:, None]


def test_tiny_autoencoder_shapes_and_training():
    data = _digits()[:512]
    ae = TinyAutoencoder(hidden=16)
    assert ae.latent_shape((1, 8, 8)) == (4, 4, 4)
    assert ae.latent_shape((5, 1, 8, 8)) == (5, 4, 4, 4)
    with torch.no_grad():
        before = nn.functional.mse_loss(ae(data), data).item()
    ae, losses = train_autoencoder(data, steps=40, batch_size=32, lr=5e-3, seed=0, hidden=16)
    with torch.no_grad():
        after = nn.functional.mse_loss(ae(data), data).item()
        z = ae.encode(data[:32])
        rec = ae.decode(z)
        z_all = ae.encode(data)
    assert losses.shape == (40,)
    assert after < 0.5 * before, (before, after)
    assert z.shape == (32, 4, 4, 4) and rec.shape == (32, 1, 8, 8)
    assert abs(z_all.std().item() - 1.0) < 1e-3  # scale_factor makes latents unit-variance
    torch.testing.assert_close(rec, ae(data[:32]))
    # an odd size decoded to another size (7x7 -> 8x8)
    for run in (ae.encode, ae):
        with pytest.raises(ValueError, match="must be divisible by 2"):
            run(torch.zeros(1, 1, 7, 7))


def test_diffusers_vae_missing_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        DiffusersVAE.from_local(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="config.json"):
        DiffusersVAE.from_local(tmp_path)


def test_diffusers_vae_without_diffusers(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(ImportError, match="pip install diffusers"):
        DiffusersVAE.from_local(tmp_path)


def _tiny_vae(**config):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=16,
        **config,
    )


def test_diffusers_vae_round_trip(tmp_path):
    try:
        import diffusers  # noqa: F401
    except ImportError:  # without diffusers the loader must say how to get it
        (tmp_path / "config.json").write_text("{}")
        with pytest.raises(ImportError, match="pip install diffusers"):
            DiffusersVAE.from_local(tmp_path)
        return
    vae = _tiny_vae(scaling_factor=0.5)
    vae.save_pretrained(tmp_path / "vae")
    codec = DiffusersVAE.from_local(tmp_path / "vae")
    assert codec.scale_factor == 0.5
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    z = codec.encode(x, sample=False)
    assert z.shape == codec.latent_shape(x.shape) == (2, 4, 8, 8)
    with torch.no_grad():
        want = vae.encode(x).latent_dist.mode() * 0.5
        torch.testing.assert_close(z, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            codec.decode(z), vae.decode(want / 0.5).sample, atol=1e-5, rtol=1e-5
        )


def test_diffusers_vae_shift_factor_and_low_precision(tmp_path):
    """A VAE whose config has a shift_factor (SD3 / FLUX style) gives (z - shift) * scale and
    decodes z / scale + shift; a bf16 VAE takes float32 images and latents and gives float32."""
    vae = _tiny_vae(scaling_factor=1.5, shift_factor=0.25)  # diffusers: a test extra
    vae.save_pretrained(tmp_path / "vae")
    codec = DiffusersVAE.from_local(tmp_path / "vae")
    assert (codec.scale_factor, codec.shift_factor) == (1.5, 0.25)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    z = codec.encode(x, sample=False)
    with torch.no_grad():
        raw = vae.encode(x).latent_dist.mode()
        torch.testing.assert_close(z, (raw - 0.25) * 1.5, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(codec.decode(z), vae.decode(raw).sample, atol=1e-5, rtol=1e-5)
    assert DiffusersVAE(vae, shift_factor=0.0).shift_factor == 0.0  # an explicit value wins
    # latents stored raw: the file's (scale, shift) map them, the decoder's map them back
    torch.save(raw, tmp_path / "raw.pt")
    stored = PrecomputedLatents(tmp_path / "raw.pt", scale_factor=0.5, shift_factor=-1.0,
                                decoder=codec)  # fmt: skip
    torch.testing.assert_close(stored.latents, (raw + 1.0) * 0.5)
    with torch.no_grad():
        torch.testing.assert_close(
            stored.decode(stored.latents), vae.decode(raw).sample, atol=1e-5, rtol=1e-5
        )
    low = DiffusersVAE.from_local(tmp_path / "vae", dtype=torch.bfloat16)
    assert low.vae.dtype == torch.bfloat16
    zl = low.encode(x, sample=False)
    assert zl.dtype == torch.float32 and low.decode(zl).dtype == torch.float32
    torch.testing.assert_close(zl, z, atol=0.1, rtol=0.1)


def test_autoencoder_scale_from_chunked_latent_std(monkeypatch):
    """train_autoencoder measures the latents' std over the data in chunks: the same scale as
    one pass over all of it."""
    import antdiff.models.autoencoder as ae_mod

    data = _digits()[:300]
    monkeypatch.setattr(ae_mod, "_STD_CHUNK", 64)  # 5 chunks, the last one short
    ae, _ = train_autoencoder(data, steps=3, batch_size=16, seed=0, hidden=8)
    with torch.no_grad():
        want = 1.0 / ae.encoder(data).double().std()
    assert ae.scale_factor == pytest.approx(float(want), rel=1e-6)


def test_autoencoder_trains_on_a_pixel_dataset_row_by_row(monkeypatch):
    """An image folder's Dataset (uint8 pixels) trains the autoencoder through float rows on
    demand: the same weights and scale as its whole float copy (4x the pixels in memory,
    which ds.images() made), and that copy is never made."""
    import antdiff.models.autoencoder as ae_mod
    from antdiff.data import Dataset

    g = torch.Generator().manual_seed(0)
    ds = Dataset(torch.randint(0, 256, (96, 3, 8, 8), dtype=torch.uint8, generator=g), None, None)
    monkeypatch.setattr(ae_mod, "_STD_CHUNK", 40)
    ref, ref_losses = train_autoencoder(ds.images(), steps=3, batch_size=16, seed=0, hidden=8)
    monkeypatch.setattr(Dataset, "images", lambda self: pytest.fail("the whole set as float"))
    got, losses = train_autoencoder(ds, steps=3, batch_size=16, seed=0, hidden=8)
    assert torch.equal(losses, ref_losses) and got.scale_factor == ref.scale_factor
    for a, b in zip(got.state_dict().values(), ref.state_dict().values()):
        assert torch.equal(a, b)


def test_precomputed_latents(tmp_path):
    z = torch.randn(6, 4, 2, 2)
    torch.save(z, tmp_path / "a.pt")
    torch.save({"latents": z, "labels": torch.arange(6)}, tmp_path / "b.pt")
    np.save(tmp_path / "c.npy", z.numpy())
    a = PrecomputedLatents(tmp_path / "a.pt", expected_shape=(4, 2, 2), scale_factor=2.0)
    torch.testing.assert_close(a.encode(torch.tensor([4, 1])), z[[4, 1]] * 2.0)
    assert len(a) == 6 and a.latent_shape() == (4, 2, 2)
    b = PrecomputedLatents(tmp_path / "b.pt")
    assert torch.equal(b.labels, torch.arange(6))
    assert torch.equal(PrecomputedLatents(tmp_path / "c.npy").latents, z)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        PrecomputedLatents(tmp_path / "missing.pt")
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(ValueError, match=r"\.pt or \.npy"):
        PrecomputedLatents(tmp_path / "d.txt")
    with pytest.raises(ValueError, match="per-sample shape"):
        PrecomputedLatents(tmp_path / "a.pt", expected_shape=(3, 2, 2))
    torch.save(torch.randn(6, 4), tmp_path / "e.pt")
    with pytest.raises(ValueError, match=r"\[N, c, h, w\]"):
        PrecomputedLatents(tmp_path / "e.pt")
    torch.save({"z": z}, tmp_path / "f.pt")
    with pytest.raises(ValueError, match="'latents'"):
        PrecomputedLatents(tmp_path / "f.pt")
    for labels in ([0, 1, 2, 3, 4, 5], torch.tensor([0.7, 2.9, 1, 1, 0, 0])):  # list; truncated
        torch.save({"latents": z, "labels": labels}, tmp_path / "g.pt")
        with pytest.raises(ValueError, match="labels in .* must be an integer tensor of shape"):
            PrecomputedLatents(tmp_path / "g.pt")
    # a file torch / numpy cannot read: the error names it and says what it must hold
    (tmp_path / "i.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"cannot read latent file .*i\.pt.*torch\.save"):
        PrecomputedLatents(tmp_path / "i.pt")
    np.save(tmp_path / "j.npy", np.array([{"z": 1}], dtype=object))  # needs pickle
    with pytest.raises(ValueError, match=r"cannot read latent file .*j\.npy.*np\.save"):
        PrecomputedLatents(tmp_path / "j.npy")
    bad = z.clone()
    bad[2, 0, 0, 0] = float("nan")
    torch.save(bad, tmp_path / "h.pt")
    with pytest.raises(ValueError, match="hold inf/NaN"):
        PrecomputedLatents(tmp_path / "h.pt")
    with pytest.raises(ValueError, match="no decoder"):
        a.decode(z)
    ae = TinyAutoencoder()
    ae._scale.fill_(0.25)
    dec = PrecomputedLatents(tmp_path / "a.pt", scale_factor=2.0, decoder=ae)
    with torch.no_grad():  # stored latents are the decoder's raw latents
        torch.testing.assert_close(dec.decode(dec.encode(torch.arange(6))), ae.decoder(z))


@pytest.mark.parametrize("name", ["adm-tiny", "dit-tiny"])
def test_wrong_inputs_get_errors_naming_the_argument(name):
    """Shape and dtype checks (no value reads): each of these raised an unrelated torch error
    or was broadcast silently (y of one label for a batch of two)."""
    model = create_model(name, num_classes=10)
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 500]), torch.tensor([1, 2])
    assert model(x, t, y).shape[:1] == (2,)
    with pytest.raises(ValueError, match=r"x must be \[B, 1, H, W\]"):
        model(torch.randn(2, 3, 8, 8), t, y)
    with pytest.raises(ValueError, match=r"t must be \[B\] = \[2\]"):
        model(x, torch.tensor(3), y)
    with pytest.raises(ValueError, match=r"y must be \[B\] = \[2\] integer"):
        model(x, t, torch.tensor([1]))
    for bad in (torch.tensor([1.0, 2.0]), torch.tensor([True, False]), y.to(torch.uint8)):
        with pytest.raises(ValueError, match="integer class labels"):
            model(x, t, bad)
    assert torch.equal(model(x, t, y.int()), model(x, t, y))
    with pytest.raises(ValueError, match=r"x is torch.float32 but the model's input layer is "
                       r"torch.bfloat16: pass x.to\(torch.bfloat16\)"):  # fmt: skip
        copy.deepcopy(model).to(torch.bfloat16)(x, t, y)


@pytest.mark.parametrize(
    "name, overrides, match",
    [
        ("adm-tiny", dict(model_channels=0), r"model_channels must be a positive integer, got 0 "
         r"\(--model.overrides.model_channels\)"),
        ("adm-tiny", dict(num_heads=0, num_head_channels=-1), "num_heads must be a positive"),
        ("adm-tiny", dict(channel_mult=()), "channel_mult must list one positive width"),
        ("adm-tiny", dict(channel_mult=(1, 0)), "channel_mult must list one positive width"),
        ("adm-tiny", dict(num_classes=0), r"None for an unconditional model"),
        ("adm-tiny", dict(num_res_blocks=0), "num_res_blocks must be a positive integer"),
        ("adm-tiny", dict(image_size=7), r"not divisible by 2 = 2\^1: .*--data.image_size"),
        ("dit-tiny", dict(patch_size=0), r"patch_size must be a positive integer"),
        ("dit-tiny", dict(depth=0), r"depth must be a positive integer"),
        ("dit-tiny", dict(num_classes=0), r"None for an unconditional model"),
        ("dit-tiny", dict(patch_size=3), "--model.overrides.patch_size to a divisor"),
        # these built a model blind to t, an MLP 0 wide, or a negative-size tensor error
        ("dit-tiny", dict(frequency_embedding_size=1), "timestep embedding needs dim >= 2"),
        ("dit-tiny", dict(mlp_ratio=0.0), "mlp_ratio must give an MLP at least 1 wide"),
        ("dit-tiny", dict(mlp_ratio=-1.0), "mlp_ratio must give an MLP at least 1 wide"),
        # every label dropped in training: no conditional model to guide with
        ("dit-tiny", dict(class_dropout_prob=1.0), r"class_dropout_prob must be in \[0, 1\)"),
        ("adm-tiny", dict(class_dropout_prob=1.0), r"class_dropout_prob must be in \[0, 1\)"),
    ],
)
def test_model_sizes_are_checked_by_name(name, overrides, match):
    """Sizes that gave a ZeroDivisionError, an empty model or a misleading message."""
    with pytest.raises(ValueError, match=match):
        model = create_model(name, **overrides)
        model(torch.randn(2, 1, 8, 8), torch.tensor([1, 2]))  # the embedding checks its width


def test_unet_built_directly_refuses_a_channel_mult_that_is_no_list():
    """UNetModel(channel_mult=2) raised "object of type 'int' has no len()"."""
    from antdiff.models.adm import UNetModel

    for bad in (2, 2.0, None):
        with pytest.raises(ValueError, match=rf"channel_mult must list .*got {bad!r}"):
            UNetModel(image_size=8, in_channels=1, model_channels=32, channel_mult=bad)


def test_adm_size_must_divide_by_its_downsamplings():
    model = create_model("adm-tiny")
    model(torch.randn(1, 1, 16, 16), torch.tensor([5]))  # fully convolutional: any multiple
    with pytest.raises(ValueError, match="divisible by 2"):
        model(torch.randn(1, 1, 9, 9), torch.tensor([5]))


def test_train_autoencoder_leaves_the_global_stream_alone():
    """Its initial weights come from ``seed`` without reseeding the caller's stream (after the
    call, torch.rand continued from ``seed`` whatever the caller had seeded)."""
    data = torch.rand(16, 1, 8, 8) * 2 - 1
    torch.manual_seed(123)
    want = torch.rand(3)
    torch.manual_seed(123)
    a, _ = train_autoencoder(data, steps=1, batch_size=4, seed=0, hidden=4)
    assert torch.equal(torch.rand(3), want)
    b, _ = train_autoencoder(data, steps=1, batch_size=4, seed=0, hidden=4)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_adm_attention_scales_logits_by_inverse_sqrt_head_dim():
    """ADM's AttentionBlock = x + proj(softmax(q k^T / sqrt(d)) v); its projection starts at
    zero, so only a block with a non-zero projection shows the attention itself."""
    from antdiff.models.adm import AttentionBlock

    torch.manual_seed(0)
    blk = AttentionBlock(16, num_heads=2, num_head_channels=-1)
    with torch.no_grad():
        for p in blk.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    x = torch.randn(2, 16, 4, 4) * 2
    b, c, n, heads = 2, 16, 16, 2
    qkv = blk.qkv(blk.norm(x).reshape(b, c, n)).reshape(b, 3, heads, c // heads, n)
    q, k, v = (qkv[:, i].transpose(-1, -2) for i in range(3))  # [B, heads, N, d]
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(c // heads), dim=-1)
    h = (w @ v).transpose(-1, -2).reshape(b, c, n)
    want = x + blk.proj(h).reshape(b, c, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(blk(x), want, rtol=1e-4, atol=1e-5)


def test_adm_residual_blocks_start_as_their_skip_path():
    """Zero-initialised last conv: every fresh ResBlock returns skip(resample(x))."""
    from antdiff.models import create_model
    from antdiff.models.adm import ResBlock

    torch.manual_seed(0)
    model = create_model("adm-tiny")
    blocks = [m for m in model.modules() if isinstance(m, ResBlock)]
    assert blocks
    for m in blocks:
        x = torch.randn(2, m.in_norm.num_channels, 8, 8)
        emb = torch.randn(2, m.emb.in_features)
        with torch.no_grad():
            assert torch.equal(m(x, emb), m.skip(m._resample(x)))


def test_dit_block_adaln_modulation_formula():
    """A DiT block with non-zero adaLN outputs: x + g1 * attn(LN(x)(1 + sc1) + sh1), then
    + g2 * mlp(LN(.)(1 + sc2) + sh2), chunks in the order shift, scale, gate (x2). The suite's
    only block check has the zero gates of a fresh model, where the modulation is invisible."""
    from antdiff.models import create_model

    torch.manual_seed(0)
    blk = create_model("dit-tiny").blocks[0]
    d = blk.norm1.normalized_shape[0]
    with torch.no_grad():
        blk.ada[1].weight.normal_(0, 0.2)
        blk.ada[1].bias.normal_(0, 0.5)
    x, c = torch.randn(2, 16, d), torch.randn(2, d)
    with torch.no_grad():
        sh1, sc1, g1, sh2, sc2, g2 = (u[:, None] for u in blk.ada(c).chunk(6, dim=1))
        ln = lambda z: torch.nn.functional.layer_norm(z, (d,), eps=1e-6)  # noqa: E731
        h = x + g1 * blk._attn(ln(x) * (1 + sc1) + sh1)
        want = h + g2 * blk.mlp(ln(h) * (1 + sc2) + sh2)
        torch.testing.assert_close(blk(x, c), want, rtol=1e-5, atol=1e-5)


def test_dit_pos_embed_row_half_first():
    """sincos_pos_embed_2d's documented layout: token r * grid + c gets
    [sin(r w), cos(r w), sin(c w), cos(c w)] with w = 10000^(-i / (dim / 4))."""
    from antdiff.models.dit import sincos_pos_embed_2d

    dim, grid = 16, 5
    pe = sincos_pos_embed_2d(dim, grid).double()
    w = 1.0 / 10000.0 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    for r in range(grid):
        for c in range(grid):
            want = torch.cat([torch.sin(r * w), torch.cos(r * w), torch.sin(c * w),
                              torch.cos(c * w)])  # fmt: skip
            torch.testing.assert_close(pe[r * grid + c], want, rtol=0, atol=1e-6)


# ---------------------------------------------------------------- gaps found by mutation testing


@pytest.mark.parametrize("scale_shift", [True, False])
def test_adm_resblock_conditioning_formula(scale_shift):
    """A ResBlock with a non-zero last conv: skip(x) + out(drop(silu(cond(h)))), h =
    in_conv(silu(in_norm(x))), cond = out_norm(h) * (1 + scale) + shift with (scale, shift)
    the two halves of emb(silu(emb)) in that order, or out_norm(h + e) without scale-shift.
    The zero-initialised conv of a fresh block hides all of it."""
    from antdiff.models.adm import ResBlock

    torch.manual_seed(0)
    blk = ResBlock(16, 24, 32, 0.0, scale_shift).eval()
    with torch.no_grad():
        for p in blk.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    x, emb = torch.randn(2, 16, 4, 4), torch.randn(2, 24)
    silu = nn.functional.silu
    with torch.no_grad():
        h = blk.in_conv(silu(blk.in_norm(x)))
        e = blk.emb(silu(emb))[:, :, None, None]
        if scale_shift:
            scale, shift = e[:, :32], e[:, 32:]
            h = blk.out_norm(h) * (1 + scale) + shift
        else:
            h = blk.out_norm(h + e)
        want = blk.skip(x) + blk.out_conv(silu(h))
        torch.testing.assert_close(blk(x, emb), want, rtol=1e-5, atol=1e-5)


def test_norm_groups_are_gcd_with_32():
    """_norm's documented groups: 32 where ch is a multiple of 32, else gcd(32, ch); a width
    like 48 (16 groups) builds and runs."""
    from antdiff.models.adm import _norm

    for ch, groups in ((32, 32), (64, 32), (224, 32), (48, 16), (8, 8), (33, 1)):
        assert _norm(ch).num_groups == groups, ch
    model = create_model("adm-tiny", model_channels=48)
    assert model(torch.randn(1, 1, 8, 8), torch.tensor([3])).shape == (1, 1, 8, 8)


def test_paper_sizes_attention_heads():
    """Heads as published: num_head_channels wins over num_heads (LDM-FFHQ: 32 channels a head,
    ADM-light: 64), and DiT-S / B / L / XL have 6 / 12 / 16 / 16 heads (DiT paper, Table 1).
    Parameter counts do not see the head count."""
    from antdiff.models.adm import AttentionBlock

    assert AttentionBlock(64, num_heads=1, num_head_channels=32).heads == 2
    for name, per_head in (("ldm-ffhq", 32), ("adm-light", 64)):
        with torch.device("meta"):
            model = create_model(name)
        blocks = [m for m in model.modules() if isinstance(m, AttentionBlock)]
        assert blocks and all(b.heads == b.norm.num_channels // per_head for b in blocks), name
    for name, heads in (("DiT-S/2", 6), ("DiT-B/2", 12), ("DiT-L/2", 16), ("DiT-XL/2", 16)):
        with torch.device("meta"):
            model = create_model(name)
        assert {b.heads for b in model.blocks} == {heads}, name


def test_dit_attention_and_final_layer_formulas():
    """DiT's multi-head attention proj(concat_h softmax(q_h k_h^T / sqrt(d)) v_h) with the
    heads side by side in the channels, and the final adaLN (shift first, then scale)."""
    torch.manual_seed(0)
    model = create_model("dit-tiny").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    blk, (b, n, d), heads = model.blocks[0], (2, 16, 64), model.blocks[0].heads
    x = torch.randn(b, n, d)
    with torch.no_grad():
        q, k, v = blk.qkv(x).reshape(b, n, 3, d).unbind(2)
        split = lambda z: z.reshape(b, n, heads, d // heads).transpose(1, 2)  # noqa: E731
        w = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(d // heads), -1)
        want = blk.proj((w @ split(v)).transpose(1, 2).reshape(b, n, d))
        torch.testing.assert_close(blk._attn(x), want, rtol=1e-5, atol=1e-5)
        img, t, y = torch.randn(b, 1, 8, 8), torch.tensor([5, 600]), torch.tensor([2, 10])
        h = model.patch(img).flatten(2).transpose(1, 2) + model.pos_embed
        c = model.t_embed(timestep_embedding(t, model.freq_dim)) + model.y_embed(y)
        for block in model.blocks:
            h = block(h, c)
        shift, scale = model.final_ada(c)[:, :d], model.final_ada(c)[:, d:]
        out = model.final(model.final_norm(h) * (1 + scale[:, None]) + shift[:, None])
        torch.testing.assert_close(model(img, t, y), model.unpatchify(out), rtol=1e-5, atol=1e-5)


def test_dit_refuses_another_input_size_by_name():
    model = create_model("dit-tiny")
    with pytest.raises(ValueError, match=r"x must be \[B, C, 8, 8\], got \(1, 1, 16, 16\)"):
        model(torch.randn(1, 1, 16, 16), torch.tensor([1]), torch.tensor([0]))


def test_latent_sizes_check_both_sides_and_big_endian_and_bool_labels(tmp_path):
    """H and W must both divide by the downsampling (8 x 7 decoded to 8 x 8); a big-endian .npy
    of latents reads as its values; bool labels are refused like float ones."""
    ae = TinyAutoencoder(hidden=4)
    for shape in ((1, 8, 7), (1, 7, 8)):
        with pytest.raises(ValueError, match="must be divisible by 2"):
            ae.latent_shape(shape)
    with pytest.raises(ValueError, match="must be divisible by 2"):
        ae.encode(torch.zeros(1, 1, 8, 7))
    z = np.random.default_rng(0).normal(size=(3, 4, 2, 2))
    np.save(tmp_path / "big.npy", z.astype(">f4"))
    np.testing.assert_array_equal(
        PrecomputedLatents(tmp_path / "big.npy").latents.numpy(), z.astype(np.float32)
    )
    zt = torch.from_numpy(z).float()
    torch.save({"latents": zt, "labels": torch.tensor([True, False, True])}, tmp_path / "b.pt")
    with pytest.raises(ValueError, match="labels in .* must be an integer tensor of shape"):
        PrecomputedLatents(tmp_path / "b.pt")

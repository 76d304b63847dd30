"""antdiff.models.autoencoder beyond the model tests: the trained autoencoder's checks and mode,
DiffusersVAE sampling, loading and shape checks, precomputed latents' labels and file reads."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from antdiff.models.autoencoder import DiffusersVAE, train_autoencoder


def _data(n=16):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, 8, 8, generator=g) * 2 - 1


def test_train_autoencoder_returns_the_model_in_eval_mode():
    """Documented: '(model in eval mode, losses ...)', also for a model passed in."""
    ae, losses = train_autoencoder(_data(), steps=1, batch_size=4, seed=0, hidden=4)
    assert not ae.training and not any(m.training for m in ae.modules())
    assert losses.shape == (1,) and losses.dtype == torch.float32


def test_train_autoencoder_refuses_zero_steps_and_a_non_4d_tensor():
    with pytest.raises(ValueError, match="steps and batch_size must be >= 1, got 0, 4"):
        train_autoencoder(_data(), steps=0, batch_size=4, hidden=4)
    with pytest.raises(ValueError, match="steps and batch_size must be >= 1, got 1, 0"):
        train_autoencoder(_data(), steps=1, batch_size=0, hidden=4)
    with pytest.raises(ValueError, match=r"data must be \[N, C, H, W\], got shape \(16, 8, 8\)"):
        train_autoencoder(_data()[:, 0], steps=1, batch_size=4, hidden=4)


def _fake_vae(**cfg):
    config = SimpleNamespace(latent_channels=4, block_out_channels=(8, 16, 32), **cfg)
    return SimpleNamespace(config=config)


def test_diffusers_vae_latent_shape_checks_height_and_width():
    """Downsampling 2^(len(block_out_channels) - 1) = 4: both H and W must divide by it."""
    codec = DiffusersVAE(_fake_vae(scaling_factor=0.5))
    assert codec.latent_shape((3, 16, 8)) == (4, 4, 2)
    assert codec.latent_shape((2, 3, 16, 8)) == (2, 4, 4, 2)
    for shape in ((3, 16, 6), (3, 6, 16)):
        with pytest.raises(ValueError, match="must be divisible by 4"):
            codec.latent_shape(shape)


def test_diffusers_vae_without_scale_or_shift_in_its_config_uses_1_and_0():
    codec = DiffusersVAE(_fake_vae())
    assert (codec.scale_factor, codec.shift_factor) == (1.0, 0.0)
    codec = DiffusersVAE(_fake_vae(scaling_factor=0.18215, shift_factor=None))
    assert (codec.scale_factor, codec.shift_factor) == (0.18215, 0.0)


def _tiny_vae():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=4, sample_size=16, scaling_factor=0.5,
        shift_factor=0.25,
    )  # fmt: skip


def test_diffusers_vae_encode_samples_q_z_given_x_with_the_generator():
    """sample=True draws z ~ q(z|x) = mean + std * eps from `generator` (the global stream
    untouched in between does not matter); sample=False is the mode."""
    vae = _tiny_vae().eval()
    codec = DiffusersVAE(vae)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
    mode = (dist.mode() - 0.25) * 0.5
    torch.manual_seed(1)
    a = codec.encode(x, generator=torch.Generator().manual_seed(7))
    torch.manual_seed(2)
    b = codec.encode(x, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(a, b)
    eps = torch.randn(mode.shape, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(a, (dist.mean + dist.std * eps - 0.25) * 0.5)
    assert not torch.allclose(a, mode)
    torch.testing.assert_close(codec.encode(x, sample=False), mode)


def test_diffusers_vae_from_local_loads_offline_frozen_and_in_eval_mode(tmp_path, monkeypatch):
    """'never from the hub': from_pretrained gets local_files_only=True; the VAE comes back
    in eval mode with no parameter requiring grad."""
    diffusers = pytest.importorskip("diffusers")
    vae = _tiny_vae().train()
    (tmp_path / "config.json").write_text("{}")
    seen = {}

    def fake_from_pretrained(path, **kwargs):
        seen.update(kwargs, path=path)
        return vae

    monkeypatch.setattr(diffusers.AutoencoderKL, "from_pretrained", fake_from_pretrained)
    codec = DiffusersVAE.from_local(tmp_path)
    assert seen["local_files_only"] is True and seen["path"] == str(tmp_path)
    assert not codec.vae.training
    assert not any(p.requires_grad for p in codec.vae.parameters())


def test_precomputed_latents_refuse_labels_of_another_length(tmp_path):
    from antdiff.models.autoencoder import PrecomputedLatents

    z = torch.randn(6, 4, 2, 2)
    for labels in (torch.arange(5), torch.arange(7), torch.arange(6)[:, None]):
        torch.save({"latents": z, "labels": labels}, tmp_path / "z.pt")
        with pytest.raises(ValueError, match=r"must be an integer tensor of shape \[6\]"):
            PrecomputedLatents(tmp_path / "z.pt")


def test_precomputed_latents_to_moves_the_labels_too(tmp_path):
    from antdiff.models.autoencoder import PrecomputedLatents

    torch.save({"latents": torch.randn(3, 2, 2, 2), "labels": torch.arange(3)}, tmp_path / "z.pt")
    lat = PrecomputedLatents(tmp_path / "z.pt").to("meta")
    assert lat.latents.device.type == "meta" and lat.labels.device.type == "meta"


_UNPICKLED: list[int] = []


def _record_unpickle() -> int:
    _UNPICKLED.append(1)
    return 1


class _Evil:
    def __reduce__(self):
        return (_record_unpickle, ())


def test_precomputed_npy_is_read_without_unpickling(tmp_path):
    """A .npy holding pickled objects is refused before any of them is unpickled (unpickling
    runs code named in the file)."""
    import numpy as np

    from antdiff.models.autoencoder import PrecomputedLatents

    arr = np.empty(1, dtype=object)
    arr[0] = _Evil()
    np.save(tmp_path / "evil.npy", arr, allow_pickle=True)
    _UNPICKLED.clear()
    with pytest.raises(ValueError, match=r"cannot read latent file .*evil\.npy"):
        PrecomputedLatents(tmp_path / "evil.npy")
    assert _UNPICKLED == []


class _NotATensor:
    pass


def test_precomputed_pt_of_arbitrary_objects_gets_a_short_reason(tmp_path):
    """torch's 'Weights only load failed ...' advice (to reload with weights_only=False) is
    replaced by what is wrong with the file."""
    from antdiff.models.autoencoder import PrecomputedLatents

    torch.save({"latents": _NotATensor()}, tmp_path / "obj.pt")
    with pytest.raises(ValueError, match=r"not plain tensors: torch\.load\(weights_only=True\) "
                       r"refuses it\); it must hold a tensor") as info:  # fmt: skip
        PrecomputedLatents(tmp_path / "obj.pt")
    assert "Weights only load failed" not in str(info.value)

"""Review findings on `antdiff encode` and `--vae`: non-square images and sizes the VAE does
not divide are refused before encoding, a VQModel with its own vq_embed_dim decodes the file it
wrote, and encode's errors name its own flags."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from antdiff.cli import main

pytest.importorskip("diffusers")

from tests.test_encode_vae import _folder, _kl_vae  # noqa: E402


def _err(capsys, argv: list[str]) -> str:
    assert main(argv) == 2, "expected antdiff to refuse the input"
    return capsys.readouterr().err


def test_encode_refuses_non_square_images_without_image_size(tmp_path, capsys) -> None:
    from PIL import Image

    vae = _kl_vae(tmp_path / "vae")
    (tmp_path / "imgs").mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)).save(
            tmp_path / "imgs" / f"{i}.png")  # fmt: skip
    msg = _err(capsys, ["encode", "--vae", str(vae), "--images", str(tmp_path / "imgs"),
                        "--out", str(tmp_path / "z.pt"), "--device", "cpu", "--no-progress"])
    assert "--image-size" in msg
    assert not (tmp_path / "z.pt").exists()


def test_encode_refuses_an_image_size_the_vae_does_not_divide(tmp_path, capsys) -> None:
    vae = _kl_vae(tmp_path / "vae")  # two blocks: downsampling factor 2
    _folder(tmp_path / "imgs", n=2, size=16)
    msg = _err(capsys, ["encode", "--vae", str(vae), "--images", str(tmp_path / "imgs"),
                        "--out", str(tmp_path / "z.pt"), "--image-size", "15", "--device", "cpu",
                        "--no-progress"])  # fmt: skip
    assert "divisible" in msg or "multiple" in msg
    assert not (tmp_path / "z.pt").exists()


@pytest.mark.filterwarnings("ignore:.*a VQModel whose config.json says scaling_factor")
def test_vq_model_with_its_own_embed_dim_decodes_the_file_it_encoded(tmp_path) -> None:
    from diffusers import VQModel

    from antdiff.data import Dataset
    from antdiff.evaluate import _with_vae

    torch.manual_seed(0)
    VQModel(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4,
            num_vq_embeddings=16, vq_embed_dim=3, sample_size=16).save_pretrained(tmp_path / "vq")
    _folder(tmp_path / "imgs", n=2, size=16)
    assert main(["encode", "--vae", str(tmp_path / "vq"), "--images", str(tmp_path / "imgs"),
                 "--out", str(tmp_path / "z.pt"), "--device", "cpu", "--no-progress"]) == 0
    z = torch.load(tmp_path / "z.pt", weights_only=True)["latents"]
    assert z.shape[1:] == (3, 8, 8)  # vq_embed_dim channels
    # what load_for_sampling(vae=...) does for a run trained on that file
    cfg = SimpleNamespace(data=SimpleNamespace(source="latents", latent_scale=1.0,
                                               latent_shift=0.0))  # fmt: skip
    data = Dataset(torch.empty(0, *z.shape[1:]), None, None)
    out = _with_vae(cfg, data, tmp_path / "vq", Path("run"), "cpu")
    assert out.codec.decode(z).shape == (2, 3, 16, 16)


def test_encode_colour_images_with_channels_1_name_encodes_flag(tmp_path, capsys) -> None:
    vae = _kl_vae(tmp_path / "vae", in_channels=1)
    _folder(tmp_path / "imgs", n=2, size=16)  # RGB images
    msg = _err(capsys, ["encode", "--vae", str(vae), "--images", str(tmp_path / "imgs"),
                        "--out", str(tmp_path / "z.pt"), "--channels", "1", "--device", "cpu",
                        "--no-progress"])  # fmt: skip
    assert "in colour" in msg
    assert "data.channels" not in msg

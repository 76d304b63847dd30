"""`antdiff encode` (an image folder -> a VAE's latent file) and `sample` / `eval --vae` (a
latent-file run's samples decoded to images), on tiny diffusers VAEs saved to local folders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from antdiff.cli import main
from antdiff.config import load_config
from antdiff.data import _read_image, as_float
from antdiff.sampling import image_generators
from antdiff.train import train

pytest.importorskip("diffusers")  # a test extra: installed by `make test`


def _kl_vae(folder: Path, in_channels: int = 3, **config) -> Path:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(
        in_channels=in_channels, out_channels=in_channels, latent_channels=4,
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4,
        sample_size=16, **config,
    ).save_pretrained(folder)  # fmt: skip
    return folder


def _folder(root: Path, n: int = 7, size: int = 16) -> list[Path]:
    """n RGB PNGs in two class folders, a and b (a holds the first n // 2 + 1)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        d = root / ("a" if i <= n // 2 else "b")
        d.mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 256, (size // 4, size // 4, 3), dtype=np.uint8)
        img = np.kron(base, np.ones((4, 4, 1), dtype=np.uint8))
        Image.fromarray(img).save(d / f"{i:02d}.png")
        paths.append(d / f"{i:02d}.png")
    return sorted(paths)


def _pixels(paths: list[Path]) -> torch.Tensor:
    return as_float(torch.from_numpy(np.stack([_read_image(p, 3, None) for p in paths])))


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    """A tiny AutoencoderKL (scaling_factor 0.5), 7 images in 2 classes, and the latent file
    `antdiff encode --flip --class-conditional` wrote in batches of 3."""
    root = tmp_path_factory.mktemp("enc")
    vae = _kl_vae(root / "vae", scaling_factor=0.5)
    paths = _folder(root / "imgs")
    out = root / "z.pt"
    assert main(["encode", "--vae", str(vae), "--images", str(root / "imgs"), "--out", str(out),
                 "--class-conditional", "--flip", "--batch-size", "3", "--device", "cpu",
                 "--no-progress"]) == 0  # fmt: skip
    return root, vae, paths, torch.load(out, weights_only=True)


def test_encode_writes_the_vaes_normalised_draws_for_any_batch_size(encoded) -> None:
    """Image i's latent is (a draw from q(z | x_i) with its own (seed, i) stream) * the VAE's
    scaling_factor, as the VAE itself gives it in one batch; the mirror images follow as images
    n .. 2n - 1; labels follow the sorted class folders, repeated for the mirrors."""
    from diffusers import AutoencoderKL

    root, vae_dir, paths, blob = encoded
    vae = AutoencoderKL.from_pretrained(str(vae_dir), local_files_only=True).eval()
    x = _pixels(paths)
    with torch.no_grad():
        want = vae.encode(x).latent_dist.sample(generator=image_generators(0, 0, 7)) * 0.5
        want_flip = vae.encode(x.flip(-1)).latent_dist.sample(
            generator=image_generators(0, 7, 7)) * 0.5  # fmt: skip
    z = blob["latents"]
    assert z.shape == (14, 4, 8, 8) and z.dtype == torch.float32
    torch.testing.assert_close(z[:7], want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(z[7:], want_flip, atol=1e-5, rtol=1e-5)
    assert blob["labels"].tolist() == [0, 0, 0, 0, 1, 1, 1] * 2
    assert blob["class_names"] == ["a", "b"] and blob["flip"] and blob["mode"] == "sample"
    assert (blob["scaling_factor"], blob["shift_factor"]) == (0.5, 0.0)
    # --mode mean: the distribution's mode, no draw
    out = root / "mean.pt"
    assert main(["encode", "--vae", str(vae_dir), "--images", str(root / "imgs"), "--out",
                 str(out), "--mode", "mean", "--device", "cpu", "--no-progress"]) == 0  # fmt: skip
    with torch.no_grad():
        mode = vae.encode(x).latent_dist.mode() * 0.5
    mean = torch.load(out, weights_only=True)
    torch.testing.assert_close(mean["latents"], mode, atol=1e-5, rtol=1e-5)
    assert "labels" not in mean and mean["mode"] == "mean"


def _latent_run(root: Path, z_file: Path, out: str) -> Path:
    train(load_config("digits_dit", [
        "--data.source", "latents", "--data.path", str(z_file), "--data.channels", "4",
        "--data.class_conditional", "true", "--data.num_classes", "2",
        "--sample.cfg_scale", "1.0", "--train.steps", "1", "--train.batch_size", "8",
        "--train.ckpt_every", "1", "--train.progress", "false", "--sample.n", "2",
        "--sample.steps", "1", "--train.out_dir", str(root / out)]))  # fmt: skip
    return root / out


def test_sample_and_eval_decode_a_latent_runs_samples_through_the_vae(encoded) -> None:
    """A run trained on the encoded file samples images with --vae: the VAE's decode of the
    latents the same command draws without it (x / scaling_factor), clamped to [-1, 1]; eval
    scores them (digits features on 16 x 16 RGB: averaged and area-resized) and records the VAE.
    """
    from diffusers import AutoencoderKL

    root, vae_dir, _, _ = encoded
    run = _latent_run(root, root / "z.pt", "run")
    base = ["sample", "--ckpt", str(run), "--num", "3", "--steps", "2", "--format", "pt",
            "--no-progress", "--device", "cpu"]  # fmt: skip
    assert main([*base, "--out", str(root / "raw")]) == 0
    assert main([*base, "--out", str(root / "img"), "--vae", str(vae_dir)]) == 0
    lat = torch.load(root / "raw" / "samples.pt")["x"]
    img = torch.load(root / "img" / "samples.pt")["x"]
    vae = AutoencoderKL.from_pretrained(str(vae_dir), local_files_only=True).eval()
    with torch.no_grad():
        want = vae.decode(lat / 0.5).sample.clamp(-1, 1)
    assert img.shape == (3, 3, 16, 16)
    torch.testing.assert_close(img, want, atol=1e-5, rtol=1e-5)
    meta = json.loads((root / "img" / "sample.json").read_text())
    assert meta["space"] == "pixel" and meta["vae"] == str(vae_dir)
    ref = root / "ref.npy"
    np.save(ref, (torch.rand(80, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1)
            .numpy())  # fmt: skip
    js = root / "e.json"
    assert main(["eval", "--ckpt", str(run), "--num", "70", "--steps", "1", "--ref", str(ref),
                 "--vae", str(vae_dir), "--no-progress", "--device", "cpu", "--cache-dir",
                 str(root / "cache"), "--json", str(js)]) == 0  # fmt: skip
    res = json.loads(js.read_text())
    assert np.isfinite(res["fid"]) and res["vae"] == str(vae_dir) and res["num"] == 70


def test_raw_latents_read_with_their_scale_decode_through_the_vaes_own(tmp_path) -> None:
    """Latents stored raw and trained with data.latent_scale s decode as raw = x / s, then the
    VAE's own normalisation: StoredLatentDecoder maps them as the trainer read them."""
    from antdiff.evaluate import load_for_sampling
    from antdiff.models import DiffusersVAE

    vae_dir = _kl_vae(tmp_path / "vae", scaling_factor=0.5)
    torch.save({"latents": torch.randn(16, 4, 8, 8), "labels": torch.arange(16) % 2},
               tmp_path / "raw.pt")  # fmt: skip
    train(load_config("digits_dit", [
        "--data.source", "latents", "--data.path", str(tmp_path / "raw.pt"), "--data.channels",
        "4", "--data.latent_scale", "0.25", "--data.latent_shift", "0.5",
        "--data.class_conditional", "true", "--data.num_classes", "2", "--sample.cfg_scale",
        "1.0", "--train.steps", "1", "--train.batch_size", "8", "--train.ckpt_every", "1",
        "--train.progress", "false", "--sample.n", "2", "--sample.steps", "1",
        "--train.out_dir", str(tmp_path / "run")]))  # fmt: skip
    loaded = load_for_sampling(tmp_path / "run", vae=vae_dir)
    z = torch.randn(2, 4, 8, 8)
    codec = DiffusersVAE.from_local(vae_dir)
    with torch.no_grad():
        want = codec.vae.decode(z / 0.25 + 0.5).sample
        torch.testing.assert_close(loaded.data.codec.decode(z), want, atol=1e-5, rtol=1e-5)


def test_vq_model_latents_are_the_encoders_output_and_unscaled_without_a_factor(tmp_path):
    """A VQModel encodes to its pre-quantisation output; a config that names no scaling_factor
    (LDM's converted VQ models) is read with 1, not diffusers' filled-in 0.18215."""
    from diffusers import VQModel

    from antdiff.models import DiffusersVAE

    torch.manual_seed(0)
    vq = VQModel(in_channels=3, out_channels=3, latent_channels=3, block_out_channels=(8, 16),
                 down_block_types=("DownEncoderBlock2D",) * 2,
                 up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1,
                 norm_num_groups=4, num_vq_embeddings=16, vq_embed_dim=3,
                 sample_size=16)  # fmt: skip
    vq.save_pretrained(tmp_path / "vq")
    cfg = json.loads((tmp_path / "vq" / "config.json").read_text())
    cfg.pop("scaling_factor", None)
    (tmp_path / "vq" / "config.json").write_text(json.dumps(cfg))
    _folder(tmp_path / "imgs", n=3)
    assert main(["encode", "--vae", str(tmp_path / "vq"), "--images", str(tmp_path / "imgs"),
                 "--out", str(tmp_path / "z.pt"), "--device", "cpu", "--no-progress"]) == 0
    blob = torch.load(tmp_path / "z.pt", weights_only=True)
    x = _pixels(sorted((tmp_path / "imgs").rglob("*.png")))
    with torch.no_grad():
        want = vq.eval().encode(x).latents
    torch.testing.assert_close(blob["latents"], want, atol=1e-5, rtol=1e-5)
    assert blob["scaling_factor"] == 1.0 and blob["mode"] == "vq"
    codec = DiffusersVAE.from_local(tmp_path / "vq")
    with torch.no_grad():
        torch.testing.assert_close(codec.decode(want), vq.decode(want).sample, atol=1e-5,
                                   rtol=1e-5)  # fmt: skip


def test_bad_input_is_named(tmp_path, capsys, encoded) -> None:
    root, vae_dir, _, _ = encoded
    imgs = root / "imgs"

    def err(argv: list[str]) -> str:
        assert main(argv) == 2
        return capsys.readouterr().err

    enc = ["encode", "--vae", str(vae_dir), "--device", "cpu", "--no-progress"]
    assert "--images" in err([*enc, "--images", str(tmp_path / "none"), "--out",
                              str(tmp_path / "z.pt")])  # fmt: skip
    (tmp_path / "empty").mkdir()
    assert "no images (.png" in (e := err([*enc, "--images", str(tmp_path / "empty"), "--out",
                                            str(tmp_path / "z.pt")]))  # fmt: skip
    assert "found under --images" in e
    assert "--seed must" in err([*enc, "--images", str(imgs), "--out", str(tmp_path / "z.pt"),
                                 "--seed", str(2**64)])  # fmt: skip
    assert "the latent file is a .pt" in err([*enc, "--images", str(imgs), "--out",
                                             str(tmp_path / "z.npy")])  # fmt: skip
    assert "pass --channels 3" in err([*enc, "--images", str(imgs), "--out",
                                       str(tmp_path / "z.pt"), "--channels", "1"])  # fmt: skip
    loose = tmp_path / "loose"
    loose.mkdir()
    _folder(loose / "x", n=2, size=16)
    _folder(loose / "y", n=1, size=8)
    for p in (loose / "y").rglob("*.png"):
        p.rename(loose / p.name)  # a loose image of another size
    msg = err([*enc, "--images", str(loose), "--out", str(tmp_path / "z.pt")])
    assert "different sizes" in msg and "--image-size" in msg
    assert "drop --class-conditional" in err([*enc, "--images", str(loose), "--out",
                                              str(tmp_path / "z.pt"), "--class-conditional"])
    assert not (tmp_path / "z.pt").exists()
    # --vae on a pixel run, and a VAE of other latent channels
    run = tmp_path / "pix"
    train(load_config("digits_adm", ["--train.steps", "1", "--train.batch_size", "8",
                                     "--train.ckpt_every", "1", "--train.progress", "false",
                                     "--sample.n", "2", "--sample.steps", "1",
                                     "--train.out_dir", str(run)]))  # fmt: skip
    smp = ["sample", "--ckpt", str(run), "--num", "2", "--out", str(tmp_path / "s"), "--device",
           "cpu", "--vae", str(vae_dir)]  # fmt: skip
    assert "not on a latent file: its samples are images. Drop --vae" in err(smp)
    from diffusers import AutoencoderKL

    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=2, block_out_channels=(8,),
                  down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                  layers_per_block=1, norm_num_groups=4).save_pretrained(tmp_path / "vae2")
    lat_run = root / "run" if (root / "run").exists() else _latent_run(root, root / "z.pt", "run")
    smp = ["sample", "--ckpt", str(lat_run), "--num", "2", "--out", str(tmp_path / "s"),
           "--device", "cpu", "--vae", str(tmp_path / "vae2")]  # fmt: skip
    assert "makes 2-channel latents" in err(smp)


def test_encode_defaults_replacing_and_the_files_own_scale(tmp_path, capsys) -> None:
    """--channels defaults to the VAE's input channels (grey images for a 1-channel VAE); an
    existing --out is replaced only with --force; a file encode wrote, read with a
    data.latent_scale other than 1, is warned of (its latents would be scaled twice)."""
    from antdiff.models import PrecomputedLatents

    vae = _kl_vae(tmp_path / "vae", in_channels=1)
    _folder(tmp_path / "imgs", n=2)
    out = tmp_path / "z.pt"
    argv = ["encode", "--vae", str(vae), "--images", str(tmp_path / "imgs"), "--out", str(out),
            "--device", "cpu", "--no-progress"]  # fmt: skip
    assert main(argv) == 2  # RGB images for a grey VAE: read as grey, so refused
    assert "is in colour but --channels 1" in capsys.readouterr().err
    from PIL import Image

    for p in (tmp_path / "imgs").rglob("*.png"):
        Image.open(p).convert("L").save(p)
    assert main(argv) == 0 and torch.load(out, weights_only=True)["latents"].shape[1] == 4
    assert main(argv) == 2 and "exists; pass --force" in capsys.readouterr().err
    assert main([*argv, "--force"]) == 0
    with pytest.warns(UserWarning, match="antdiff encode normalised already"):
        PrecomputedLatents(out, scale_factor=0.5)


def test_the_decode_runs_in_chunks_equal_to_one_call(tmp_path) -> None:
    """StoredLatentDecoder decodes `chunk` latents at a time (a VAE decoder's full-resolution
    activations): the images equal one call's."""
    from antdiff.models import DiffusersVAE, StoredLatentDecoder

    codec = DiffusersVAE.from_local(_kl_vae(tmp_path / "vae", scaling_factor=0.5))
    z = torch.randn(5, 4, 8, 8)
    calls = []
    inner = codec.decode
    codec.decode = lambda part: calls.append(len(part)) or inner(part)
    whole = StoredLatentDecoder(codec, chunk=16).decode(z)
    chunked = StoredLatentDecoder(codec, chunk=2).decode(z)
    assert calls == [5, 2, 2, 1]
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-5)


def test_a_resaved_vq_model_with_diffusers_default_scale_is_warned_of(tmp_path) -> None:
    """diffusers writes scaling_factor 0.18215 into a re-saved VQModel whose own config had
    none; LDM's VQ latents are unscaled, so the load says how to set it."""
    from diffusers import VQModel

    from antdiff.models import DiffusersVAE

    VQModel(in_channels=3, out_channels=3, latent_channels=3, block_out_channels=(8,),
            down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
            layers_per_block=1, norm_num_groups=4, num_vq_embeddings=8,
            vq_embed_dim=3).save_pretrained(tmp_path / "vq")  # fmt: skip
    with pytest.warns(UserWarning, match='set "scaling_factor": 1.0'):
        assert DiffusersVAE.from_local(tmp_path / "vq").scale_factor == pytest.approx(0.18215)


def test_a_null_scaling_factor_is_one_and_other_files_factors_are_not_warned_of(tmp_path):
    """A config whose scaling_factor is null reads as 1 (as a missing shift_factor reads as 0),
    not a bare TypeError; a latent file of another tool that stores its VAE's factor beside raw
    latents, read with that factor, gets no "normalised already" warning (only encode's files,
    marked "normalised", do)."""
    import warnings

    from antdiff.models import DiffusersVAE, PrecomputedLatents

    vae = _kl_vae(tmp_path / "vae")
    cfg = json.loads((vae / "config.json").read_text())
    cfg["scaling_factor"] = None
    (vae / "config.json").write_text(json.dumps(cfg))
    assert DiffusersVAE.from_local(vae).scale_factor == 1.0
    torch.save({"latents": torch.randn(3, 4, 8, 8), "scaling_factor": 0.18215}, tmp_path / "r.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PrecomputedLatents(tmp_path / "r.pt", scale_factor=0.18215)

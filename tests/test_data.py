"""Data: digits, image folders (and their bad inputs), latent files, the resumable iterator."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from antdiff.config import DataConfig
from antdiff.data import BatchIterator, get_batch, load_dataset


def _png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_digits_scaling_and_labels():
    from sklearn.datasets import load_digits

    raw = load_digits()
    ds = load_dataset(DataConfig(source="digits", class_conditional=True))
    assert ds.x.shape == (1797, 1, 8, 8) and ds.y.shape == (1797,)
    ref = torch.from_numpy(raw.images).double() / 16.0 * 2.0 - 1.0  # 0..16 -> [-1, 1]
    torch.testing.assert_close(ds.x[:, 0].double(), ref, rtol=0, atol=1e-7)
    assert ds.x.min() == -1.0 and ds.x.max() == 1.0
    assert torch.equal(ds.y, torch.from_numpy(raw.target).long()) and ds.num_classes == 10
    assert load_dataset(DataConfig(source="digits")).y is None


def test_digits_resize():
    ds = load_dataset(DataConfig(source="digits", image_size=16))
    assert ds.x.shape == (1797, 1, 16, 16)
    # bilinear upsampling of a constant image stays constant: the mean is roughly preserved
    small = load_dataset(DataConfig(source="digits")).x
    torch.testing.assert_close(
        ds.x.mean(dim=(1, 2, 3)), small.mean(dim=(1, 2, 3)), atol=0.05, rtol=0
    )


def test_image_folder_values(tmp_path):
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (6, 6, 3), dtype=np.uint8) for _ in range(3)]
    for i, a in enumerate(arrays):
        _png(tmp_path / f"im{i}.png", a)
    ds = load_dataset(DataConfig(source="folder", path=str(tmp_path), channels=3))
    ref = np.stack([a.transpose(2, 0, 1) for a in arrays]).astype(np.float64) / 127.5 - 1.0
    np.testing.assert_allclose(ds.images().double().numpy(), ref, atol=1e-6)
    # held as uint8 pixels (a quarter of float32's memory), scaled as each batch is read
    assert ds.x.dtype == torch.uint8
    assert torch.equal(ds.x, torch.from_numpy(np.stack([a.transpose(2, 0, 1) for a in arrays])))
    batch = get_batch(ds, torch.tensor([2, 0]))["x"]
    assert batch.dtype == torch.float32
    np.testing.assert_allclose(batch.double().numpy(), ref[[2, 0]], atol=1e-6)
    # colour images are not silently trained as grey levels under the default channels=1
    with pytest.raises(ValueError, match="is in colour but data.channels=1.*--data.channels 3"):
        load_dataset(DataConfig(source="folder", path=str(tmp_path), channels=1))
    grey_dir = tmp_path / "grey"
    for i, a in enumerate(arrays):  # RGB files whose three channels agree are grey
        _png(grey_dir / f"g{i}.png", np.repeat(a[..., :1], 3, axis=2))
    grey = load_dataset(DataConfig(source="folder", path=str(grey_dir), channels=1), num_workers=2)
    assert grey.x.shape == (3, 1, 6, 6)
    ref_grey = np.stack([a[None, :, :, 0] for a in arrays]).astype(np.float64) / 127.5 - 1.0
    np.testing.assert_allclose(grey.images().double().numpy(), ref_grey, atol=1e-6)


def test_image_folder_follows_linked_class_folders_and_skips_hidden_entries(tmp_path):
    """Class folders may be symlinks (they were skipped); hidden folders and files
    (.ipynb_checkpoints, macOS ._ files) are not data (they shifted every label or failed)."""
    store, root = tmp_path / "store", tmp_path / "root"
    for cls, n in (("cat", 3), ("dog", 2)):
        for i in range(n):
            _png(store / cls / f"{i}.png", np.full((4, 4, 3), 40 * i, np.uint8))
    root.mkdir()
    (root / "cat").symlink_to(store / "cat", target_is_directory=True)
    (root / "dog").symlink_to(store / "dog", target_is_directory=True)
    _png(root / ".ipynb_checkpoints" / "0-checkpoint.png", np.zeros((4, 4, 3), np.uint8))
    (root / "cat" / "._0.png").write_bytes(b"not an image")
    ds = load_dataset(DataConfig(source="folder", path=str(root), channels=3,
                                 class_conditional=True))  # fmt: skip
    assert ds.x.shape[0] == 5 and ds.num_classes == 2
    assert ds.y.tolist() == [0, 0, 0, 1, 1]


def test_image_folder_crops_before_resizing_and_follows_exif(tmp_path):
    """The centre crop takes the centre (at scale 1 no pixel from outside the square), and a
    photo's EXIF orientation is applied as viewers apply it."""
    from PIL import Image

    a = np.zeros((8, 16, 3), np.uint8)
    a[:, :4] = a[:, 12:] = 255  # white outside the centre 8x8 square, black inside
    _png(tmp_path / "wide" / "a.png", a)
    ds = load_dataset(DataConfig(source="folder", path=str(tmp_path / "wide"), channels=3,
                                 image_size=4))  # fmt: skip
    assert float(ds.images().max()) == -1.0  # all black
    im = Image.fromarray(np.zeros((4, 8, 3), np.uint8))  # 8 wide, 4 high as stored
    exif = im.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees to display
    (tmp_path / "photo").mkdir()
    im.save(tmp_path / "photo" / "p.jpg", exif=exif)
    ds = load_dataset(DataConfig(source="folder", path=str(tmp_path / "photo"), channels=3))
    assert ds.x.shape == (1, 3, 8, 4)  # shown 4 wide, 8 high
    # the size check sees photos as they are read: an upright 4x8 beside it is the same size
    # (was numpy's "all input arrays must have the same shape"), a stored 8x4 one is not
    Image.fromarray(np.zeros((8, 4, 3), np.uint8)).save(tmp_path / "photo" / "q.jpg")
    ds = load_dataset(DataConfig(source="folder", path=str(tmp_path / "photo"), channels=3))
    assert ds.x.shape == (2, 3, 8, 4)
    Image.fromarray(np.zeros((4, 8, 3), np.uint8)).save(tmp_path / "photo" / "r.jpg")
    with pytest.raises(ValueError, match="images of different sizes"):
        load_dataset(DataConfig(source="folder", path=str(tmp_path / "photo"), channels=3))


def test_image_folder_mixed_sizes_is_an_error_naming_two_files(tmp_path):
    _png(tmp_path / "a.png", np.zeros((8, 8, 3), np.uint8))
    _png(tmp_path / "b.png", np.zeros((8, 10, 3), np.uint8))
    with pytest.raises(ValueError) as e:
        load_dataset(DataConfig(source="folder", path=str(tmp_path), channels=3))
    msg = str(e.value)
    assert "a.png" in msg and "b.png" in msg and "data.image_size" in msg and "8x8" in msg
    ds = load_dataset(DataConfig(source="folder", path=str(tmp_path), channels=3, image_size=4))
    assert ds.x.shape == (2, 3, 4, 4)


def test_image_folder_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_dataset(DataConfig(source="folder", path=str(tmp_path / "nowhere")))
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ValueError, match="is not a directory"):
        load_dataset(DataConfig(source="folder", path=str(tmp_path / "file.txt")))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no images"):
        load_dataset(DataConfig(source="folder", path=str(empty)))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(ValueError, match="broken.png"):
        load_dataset(DataConfig(source="folder", path=str(bad), image_size=4))
    with pytest.raises(ValueError, match="broken.png"):
        load_dataset(DataConfig(source="folder", path=str(bad)))


def test_sixteen_bit_images_are_refused_not_clipped(tmp_path):
    Image.fromarray(np.linspace(0, 65535, 16, dtype=np.uint16).reshape(4, 4)).save(
        tmp_path / "deep.png"
    )
    with pytest.raises(ValueError, match="deep.png.*16-bit"):
        load_dataset(DataConfig(source="folder", path=str(tmp_path), channels=1))


def test_transparent_pixels_are_refused_and_an_opaque_alpha_is_read(tmp_path):
    """convert('RGB') dropped alpha: a transparent pixel trained on the colour stored under
    it (green here, where a viewer shows the background). An alpha channel that is opaque
    everywhere (common in PNG folders) reads as the RGB it holds."""
    px = np.zeros((4, 4, 4), dtype=np.uint8)
    px[..., 1], px[..., 3] = 255, 255
    Image.fromarray(px, "RGBA").save(tmp_path / "opaque.png")
    ds = load_dataset(DataConfig(source="folder", path=str(tmp_path), channels=3))
    assert ds.images()[0, 1].min() == 1.0 and ds.images()[0, 0].max() == -1.0
    px[0, 0, 3] = 0
    Image.fromarray(px, "RGBA").save(tmp_path / "sprite.png")
    with pytest.raises(ValueError, match="sprite.png.*transparent pixels.*alpha_composite"):
        load_dataset(DataConfig(source="folder", path=str(tmp_path), channels=3))


def test_labels_beyond_num_classes_are_an_error_naming_the_setting():
    with pytest.raises(ValueError, match=r"data.num_classes=3 but the labels run from 0 to 9"):
        load_dataset(DataConfig(source="digits", class_conditional=True, num_classes=3))


def test_image_folder_class_labels_from_subdirectories(tmp_path):
    for cls, n in (("cat", 2), ("dog", 3)):
        for i in range(n):
            _png(tmp_path / cls / f"{i}.png", np.full((4, 4), 10 * i, np.uint8))
    ds = load_dataset(
        DataConfig(source="folder", path=str(tmp_path), channels=1, class_conditional=True)
    )
    assert ds.y.tolist() == [0, 0, 1, 1, 1] and ds.num_classes == 2
    # a class folder without images was dropped, shifting the labels of the ones after it
    (tmp_path / "cow").mkdir()
    (tmp_path / "cow" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"class folders without images .*\['cow'\]"):
        load_dataset(
            DataConfig(source="folder", path=str(tmp_path), channels=1, class_conditional=True)
        )
    (tmp_path / "cow" / "notes.txt").unlink()
    (tmp_path / "cow").rmdir()
    _png(tmp_path / "loose.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="sub-directory per class"):
        load_dataset(
            DataConfig(source="folder", path=str(tmp_path), channels=1, class_conditional=True)
        )


def test_image_folder_symlink_loop_is_named(tmp_path):
    _png(tmp_path / "a" / "0.png", np.zeros((4, 4), np.uint8))
    _png(tmp_path / "shared" / "1.png", np.zeros((4, 4), np.uint8))
    # two links to one folder are no loop: its images count once per link
    (tmp_path / "a" / "s1").symlink_to(tmp_path / "shared", target_is_directory=True)
    (tmp_path / "a" / "s2").symlink_to(tmp_path / "shared", target_is_directory=True)
    assert len(load_dataset(DataConfig(source="folder", path=str(tmp_path), channels=1)).x) == 4
    (tmp_path / "a" / "up").symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(ValueError, match="symlink loop"):
        load_dataset(DataConfig(source="folder", path=str(tmp_path), channels=1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU here")
def test_pixels_scale_to_the_same_bits_on_the_gpu():
    """The GPU divides by a scalar as a multiply by its reciprocal: the lookup table keeps the
    CPU's p / 127.5 - 1 bits there (a resumed run reads the same data on either device)."""
    from antdiff.data import Dataset

    u = torch.arange(256, dtype=torch.uint8).view(256, 1, 1, 1)
    cpu = u.float().div_(127.5).sub_(1.0)
    gpu = Dataset(u, None, None).to("cuda").rows(torch.arange(256))
    assert torch.equal(gpu.cpu(), cpu)


def test_latent_files(tmp_path):
    z, y = torch.randn(5, 4, 2, 2), torch.tensor([0, 3, 1, 2, 3])
    torch.save({"latents": z, "labels": y}, tmp_path / "z.pt")
    ds = load_dataset(
        DataConfig(
            source="latents",
            path=str(tmp_path / "z.pt"),
            channels=4,
            class_conditional=True,
            latent_scale=0.5,
        )
    )
    torch.testing.assert_close(ds.x, z * 0.5)
    assert torch.equal(ds.y, y) and ds.num_classes == 4
    np.save(tmp_path / "z.npy", z.numpy())
    ds = load_dataset(DataConfig(source="latents", path=str(tmp_path / "z.npy"), channels=4))
    assert torch.equal(ds.x, z) and ds.y is None
    np.save(tmp_path / "big.npy", z.numpy().astype(">f4"))  # a big-endian machine's file
    ds = load_dataset(DataConfig(source="latents", path=str(tmp_path / "big.npy"), channels=4))
    assert torch.equal(ds.x, z)
    shifted = DataConfig(source="latents", path=str(tmp_path / "z.npy"), channels=4,
                         latent_scale=0.5, latent_shift=0.25)  # fmt: skip
    torch.testing.assert_close(load_dataset(shifted).x, (z - 0.25) * 0.5)
    with pytest.raises(ValueError, match="4 channels but data.channels=3"):
        load_dataset(DataConfig(source="latents", path=str(tmp_path / "z.npy"), channels=3))
    # channels-last latents get the permute that fixes them
    np.save(tmp_path / "nhwc.npy", torch.randn(5, 8, 8, 4).numpy())
    with pytest.raises(ValueError, match=r"channels-last.*permute\(0, 3, 1, 2\)"):
        load_dataset(DataConfig(source="latents", path=str(tmp_path / "nhwc.npy"), channels=4))
    np.save(tmp_path / "nhwc3.npy", torch.randn(5, 16, 16, 3).numpy())  # and of other c
    with pytest.raises(ValueError, match=r"channels-last.*permute.*set --data.channels 3"):
        load_dataset(DataConfig(source="latents", path=str(tmp_path / "nhwc3.npy"), channels=4))
    # ... but channels-first latents that merely end in a size equal to data.channels do not
    np.save(tmp_path / "nchw.npy", torch.randn(5, 8, 4, 4).numpy())
    with pytest.raises(ValueError, match="have 8 channels but data.channels=4; set --data.chan"):
        load_dataset(DataConfig(source="latents", path=str(tmp_path / "nchw.npy"), channels=4))
    # image_size resizes images; latents keep their saved size, so it is refused, not ignored
    with pytest.raises(ValueError, match="data.image_size=32 resizes images.*drop it"):
        DataConfig(source="latents", path=str(tmp_path / "z.npy"), channels=4, image_size=32)
    with pytest.raises(ValueError, match="needs labels"):
        load_dataset(
            DataConfig(
                source="latents", path=str(tmp_path / "z.npy"), channels=4, class_conditional=True
            )
        )
    # a negative label was told to set the num_classes it had; N = 0 was a torch error
    cond = dict(source="latents", channels=4, class_conditional=True)
    torch.save({"latents": z, "labels": torch.tensor([0, -1, 1, 2, 2])}, tmp_path / "neg.pt")
    with pytest.raises(ValueError, match="labels must be class indices >= 0; the smallest is -1"):
        load_dataset(DataConfig(path=str(tmp_path / "neg.pt"), num_classes=3, **cond))
    torch.save({"latents": z[:0], "labels": y[:0]}, tmp_path / "none.pt")
    with pytest.raises(ValueError, match="holds no samples"):
        load_dataset(DataConfig(path=str(tmp_path / "none.pt"), **cond))


def test_tiny_autoencoder_latents():
    ds = load_dataset(DataConfig(source="digits", autoencoder="tiny", autoencoder_steps=3))
    assert ds.x.shape == (1797, 4, 4, 4) and ds.codec is not None
    again = load_dataset(
        DataConfig(source="digits", autoencoder="tiny"), codec_state=ds.codec.state_dict()
    )
    assert torch.equal(again.x, ds.x)  # restored codec -> identical latents, no retraining


@pytest.mark.parametrize("n, batch", [(10, 3), (10, 10), (7, 16), (1, 2)])
def test_iterator_covers_each_epoch_exactly_once(n, batch):
    it = BatchIterator(n, batch, seed=3)
    flat = torch.cat([it.next_indices() for _ in range(12)])
    assert all(len(b) == batch for b in flat.split(batch))
    epochs = flat[: (len(flat) // n) * n].view(-1, n)
    for e in epochs:
        assert sorted(e.tolist()) == list(range(n))
    if n > 1:
        assert not torch.equal(epochs[0], epochs[1]) or n < 3


def test_iterator_state_resumes_the_exact_sequence():
    a = BatchIterator(13, 5, seed=7)
    for _ in range(4):
        a.next_indices()
    state = a.state_dict()
    want = [a.next_indices() for _ in range(6)]
    b = BatchIterator(13, 5, seed=0)
    b.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(want, [b.next_indices() for _ in range(6)]))
    with pytest.raises(ValueError, match="data changed"):
        BatchIterator(12, 5).load_state_dict(state)
    assert not torch.equal(
        BatchIterator(13, 13, 1).next_indices(), BatchIterator(13, 13, 2).next_indices()
    )


def test_iterator_flips_keep_the_order_and_resume_exactly():
    """Mirroring is drawn per epoch position after the order, from the same generator: the
    order is the one without flips, about half the images flip, and a restored state gives the
    same flips (a resume stays bit-exact)."""
    plain, flipping = BatchIterator(50, 7, seed=4), BatchIterator(50, 7, seed=4, flip=True)
    assert plain.next_batch()[1] is None
    plain = BatchIterator(50, 7, seed=4)
    got = [flipping.next_batch() for _ in range(30)]
    assert all(torch.equal(plain.next_indices(), idx) for idx, _ in got)
    rate = torch.cat([f for _, f in got]).float().mean().item()
    assert 0.35 < rate < 0.65
    state = flipping.state_dict()
    want = [flipping.next_batch() for _ in range(9)]
    again = BatchIterator(50, 7, seed=0, flip=True)
    again.load_state_dict(state)
    for (i1, f1), (i2, f2) in zip(want, [again.next_batch() for _ in range(9)]):
        assert torch.equal(i1, i2) and torch.equal(f1, f2)


def test_get_batch_mirrors_the_flagged_images():
    ds = load_dataset(DataConfig(source="digits", class_conditional=True))
    idx, flip = torch.tensor([5, 0, 1796]), torch.tensor([True, False, True])
    b = get_batch(ds, idx, flip)
    plain = get_batch(ds, idx)
    assert torch.equal(b["x"][1], plain["x"][1]) and torch.equal(b["y"], plain["y"])
    assert torch.equal(b["x"][[0, 2]], plain["x"][[0, 2]].flip(-1))
    assert not torch.equal(b["x"][0], plain["x"][0])


def test_random_flip_defaults_and_refusals(tmp_path):
    """On for image folders (as ADM, DiT and the ANT code train), off for digits and
    latents; asked for on latents (encoded once) it is refused with the way to get flips."""
    from antdiff.config import upgrade_saved_config

    assert DataConfig(source="folder", path="x").flips is True
    assert DataConfig(source="digits").flips is False
    assert DataConfig(source="digits", autoencoder="tiny").flips is False
    assert DataConfig(source="latents", path="z.pt", channels=4).flips is False
    assert DataConfig(source="digits", random_flip=True).flips is True  # if asked
    assert DataConfig(source="folder", path="x", random_flip=False).flips is False
    with pytest.raises(ValueError, match="store mirrored copies in the latent file"):
        DataConfig(source="latents", path="z.pt", channels=4, random_flip=True)
    with pytest.raises(ValueError, match="encodes each image once, unflipped"):
        DataConfig(source="folder", path="x", autoencoder="tiny", random_flip=True)
    old = {"data": {"source": "folder", "path": "x"}, "train": {"steps": 3}}
    assert upgrade_saved_config(old)["data"]["random_flip"] is False  # those runs never flipped
    assert "random_flip" not in old["data"]


def test_resize_is_box_halving_then_bicubic_then_centre_crop(tmp_path):
    """The preparation of ADM, DiT and the ANT code: a 2x2-block image halved to the target
    size is its exact block averages (one bicubic resize of the crop blended them)."""
    blocks = np.random.default_rng(0).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    a = blocks.repeat(2, axis=0).repeat(2, axis=1)  # 12 x 16: 2x2 blocks of one colour
    _png(tmp_path / "f" / "a.png", a)
    ds = load_dataset(DataConfig(source="folder", path=str(tmp_path / "f"), channels=3,
                                 image_size=6))  # fmt: skip
    want = blocks[:, 1:7].transpose(2, 0, 1)  # halved to 6 x 8, then the centre 6 columns
    assert torch.equal(ds.x[0], torch.from_numpy(np.ascontiguousarray(want)))


def test_get_batch_keeps_labels_aligned():
    ds = load_dataset(DataConfig(source="digits", class_conditional=True))
    idx = torch.tensor([5, 0, 1796])
    b = get_batch(ds, idx)
    assert torch.equal(b["x"], ds.x[idx]) and torch.equal(b["y"], ds.y[idx])


def test_batch_iterator_refuses_a_broken_state():
    it = BatchIterator(11, 4, seed=0)
    good = it.state_dict()
    for bad in ({"pos": 99}, {"pos": -1}, {"epoch": -2}):
        with pytest.raises(ValueError, match="data iterator state is broken"):
            it.load_state_dict({**good, **bad})
    it.load_state_dict(good)
    assert it.next_indices().shape == (4,)


def test_class_names_are_recorded_and_a_renamed_class_is_refused_on_resume(tmp_path):
    """Labels follow the sorted class folder names: the checkpoint records them, sampling
    knows them, and a resume whose folders changed (same count) is refused."""
    from antdiff.config import load_config
    from antdiff.evaluate import load_for_sampling
    from antdiff.train import train

    data = tmp_path / "data"
    for cls in ("cat", "dog", "emu"):
        for i in range(4):
            _png(data / cls / f"{i}.png", np.full((8, 8), 60 * i, np.uint8))
    args = ["--data.source", "folder", "--data.path", str(data), "--data.class_conditional",
            "true", "--train.batch_size", "6", "--train.ckpt_every", "1", "--train.progress",
            "false", "--sample.steps", "2", "--sample.n", "3", "--train.out_dir",
            str(tmp_path / "run")]  # fmt: skip
    train(load_config("digits_adm", [*args, "--train.steps", "1"]))
    assert load_for_sampling(tmp_path / "run").data.class_names == ("cat", "dog", "emu")
    (data / "emu").rename(data / "ant")  # still 3 classes, but "ant" now takes label 0
    with pytest.raises(ValueError, match=r"class folders changed.*\['cat', 'dog', 'emu'\]"):
        train(load_config("digits_adm", [*args, "--train.steps", "2"]), resume=True)


def test_digits_with_three_channels_is_refused():
    """data.channels=3 on the grey digits: load_dataset must refuse (the model would be built
    for 3 channels, or train silently on 1)."""
    with pytest.raises(ValueError, match=r"images have 1 channels but data.channels=3"):
        load_dataset(DataConfig(source="digits", channels=3))


def test_precomputed_latents_decode_undoes_shift_and_scale(tmp_path):
    """Stored raw latents z: encode gives (z - shift) * scale, and decode hands the decoder its
    own normalised latents (raw - d.shift) * d.scale: with an identity decoder of scale 2,
    shift 0.25, decode(encode(i)) == (z - 0.25) * 2 for a file read with shift 0.5, scale 3."""
    from antdiff.models import PrecomputedLatents
    from antdiff.models.autoencoder import LatentCodec

    class Identity(LatentCodec):
        scale_factor, shift_factor = 2.0, 0.25

        def decode(self, z):
            return z

    raw = torch.randn(5, 2, 3, 3)
    torch.save(raw, tmp_path / "z.pt")
    lat = PrecomputedLatents(tmp_path / "z.pt", scale_factor=3.0, shift_factor=0.5,
                             decoder=Identity())
    idx = torch.tensor([4, 1])
    torch.testing.assert_close(lat.encode(idx), (raw[idx] - 0.5) * 3.0)
    torch.testing.assert_close(lat.decode(lat.encode(idx)), (raw[idx] - 0.25) * 2.0)


def test_label_and_size_errors_name_the_option_that_fixes_them(tmp_path):
    """Data without labels under data.class_conditional offered only to add labels; images
    that are not square failed only once the model was built (after a tiny autoencoder had
    trained on them): both now name the option that fixes them."""
    z = torch.randn(5, 4, 2, 2)
    torch.save(z, tmp_path / "z.pt")
    with pytest.raises(ValueError, match=r"'.*z.pt' holds none: save a .pt dict .*, or train "
                       r"without labels: --data.class_conditional false$"):  # fmt: skip
        load_dataset(DataConfig(source="latents", path=str(tmp_path / "z.pt"), channels=4,
                                class_conditional=True))  # fmt: skip
    _png(tmp_path / "flat" / "a.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="per class .*--data.class_conditional false"):
        load_dataset(DataConfig(source="folder", path=str(tmp_path / "flat"),
                                class_conditional=True))  # fmt: skip
    _png(tmp_path / "wide" / "a.png", np.zeros((8, 12, 3), np.uint8))
    with pytest.raises(ValueError, match=r"square inputs, the data are 8x12 \(height x width\): "
                       r"set --data.image_size S to resize and centre-crop .*image_size 8\)"):
        load_dataset(DataConfig(source="folder", path=str(tmp_path / "wide"), channels=3,
                                autoencoder="tiny", autoencoder_steps=1))  # fmt: skip
    ds = load_dataset(DataConfig(source="folder", path=str(tmp_path / "wide"), channels=3))
    assert ds.x.shape == (1, 3, 8, 12)  # without an autoencoder the trainer's model refuses it


# ------------------------------------------------------------ images, resizing, labels, iterators
def test_pixel_lookup_scales_every_chunk_of_a_large_tensor():
    """as_float looks the pixels up 2**24 at a time: the values past the first chunk are
    scaled too (p / 127.5 - 1, recomputed here in float64)."""
    from antdiff.data import as_float

    u = torch.randint(0, 256, ((1 << 24) + 4099,), dtype=torch.uint8,
                      generator=torch.Generator().manual_seed(0))  # fmt: skip
    got = as_float(u)
    assert got.dtype == torch.float32 and got.shape == u.shape
    tail = slice((1 << 24) - 3, None)  # the chunk boundary and everything after it
    want = u[tail].double() / 127.5 - 1.0
    torch.testing.assert_close(got[tail].double(), want, rtol=0, atol=1e-7)


def _bilinear_half_pixel(a: np.ndarray, out: int) -> np.ndarray:
    """Bilinear resize of the last two axes to out x out with pixel centres at i + 0.5
    (align_corners=False, the usual image convention), in float64."""
    n = a.shape[-1]
    src = np.maximum((np.arange(out) + 0.5) * n / out - 0.5, 0.0)
    i0 = np.floor(src).astype(int)
    i1 = np.minimum(i0 + 1, n - 1)
    w = src - i0
    m = np.zeros((out, n))
    m[np.arange(out), i0] += 1 - w
    m[np.arange(out), i1] += w
    return m @ a @ m.T


def test_digits_resize_is_bilinear_with_half_pixel_centres():
    from sklearn.datasets import load_digits

    raw = load_digits().images[:20].astype(np.float64) / 8.0 - 1.0
    ds = load_dataset(DataConfig(source="digits", image_size=12))
    want = np.stack([_bilinear_half_pixel(im, 12) for im in raw])
    np.testing.assert_allclose(ds.x[:20, 0].double().numpy(), want, rtol=0, atol=1e-5)


def test_image_suffixes_are_matched_whatever_their_case(tmp_path):
    """Cameras and Windows tools write IMG_0001.JPG / .PNG: those are images too."""
    _png(tmp_path / "a.PNG", np.zeros((4, 4), np.uint8))
    _png(tmp_path / "b.Png", np.full((4, 4), 255, np.uint8))
    ds = load_dataset(DataConfig(source="folder", path=str(tmp_path), channels=1))
    assert ds.x.shape == (2, 1, 4, 4)
    assert ds.x[:, 0, 0, 0].tolist() == [0, 255]  # sorted by name: a.PNG, b.Png


def test_a_link_to_its_own_folder_is_named_as_the_loop(tmp_path):
    """The error names the link itself (a/self), the one to remove, not a path inside it."""
    _png(tmp_path / "a" / "0.png", np.zeros((4, 4), np.uint8))
    (tmp_path / "a" / "self").symlink_to(tmp_path / "a", target_is_directory=True)
    with pytest.raises(ValueError, match=r"symlink loop: '[^']*/a/self' is the folder"):
        load_dataset(DataConfig(source="folder", path=str(tmp_path), channels=1))


def test_class_labels_ignore_loose_non_image_files_and_come_from_the_top_folder(tmp_path):
    """Only sub-directories are classes (a README beside them is not an empty class), and an
    image nested deeper in a class folder takes that class folder's label."""
    _png(tmp_path / "cat" / "0.png", np.zeros((4, 4), np.uint8))
    _png(tmp_path / "cat" / "indoor" / "1.png", np.zeros((4, 4), np.uint8))
    _png(tmp_path / "dog" / "outdoor" / "2.png", np.zeros((4, 4), np.uint8))
    (tmp_path / "README.txt").write_text("cats and dogs")
    ds = load_dataset(DataConfig(source="folder", path=str(tmp_path), channels=1,
                                 class_conditional=True))  # fmt: skip
    assert ds.y.tolist() == [0, 0, 1] and ds.class_names == ("cat", "dog")


def test_centre_crop_of_an_odd_margin_starts_at_its_floor(tmp_path):
    """(w - size) // 2 as ADM's center_crop_arr: a 7-wide strip cropped to 4 keeps columns
    1..4 (margin 3: one column dropped on the left, two on the right)."""
    a = (np.arange(7, dtype=np.uint8) * 30)[None].repeat(4, axis=0)  # column j holds 30 j
    _png(tmp_path / "a.png", a)
    ds = load_dataset(DataConfig(source="folder", path=str(tmp_path), channels=1, image_size=4))
    assert ds.x[0, 0].tolist() == [[30, 60, 90, 120]] * 4


def _bicubic_1d(n_in: int, n_out: int) -> np.ndarray:
    """The [n_out, n_in] matrix of a Keys bicubic resize (a = -0.5, pixel centres at i + 0.5,
    weights normalised to 1 near the border) for upscaling, as Pillow's BICUBIC defines it."""

    def keys(x):
        x = abs(x)
        if x < 1:
            return (1.5 * x - 2.5) * x * x + 1
        return ((-0.5 * x + 2.5) * x - 4) * x + 2 if x < 2 else 0.0

    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        c = (i + 0.5) * n_in / n_out
        lo, hi = max(int(c - 2 + 0.5), 0), min(int(c + 2 + 0.5), n_in)
        w = np.array([keys(j - c + 0.5) for j in range(lo, hi)])
        m[i, lo:hi] = w / w.sum()
    return m


def test_upscaling_is_bicubic_to_a_rounded_short_side_then_centre_crop(tmp_path):
    """A 3 x 5 image to image_size 4: scale 4 / 3 gives 4 x round(6.67) = 4 x 7 (bicubic:
    rows, then columns, each pass rounded to 8 bits), then the centre columns 1..4."""
    a = np.random.default_rng(1).integers(0, 256, (3, 5), dtype=np.uint8)
    _png(tmp_path / "a.png", a)
    ds = load_dataset(DataConfig(source="folder", path=str(tmp_path), channels=1, image_size=4))
    rows = np.clip(np.floor(a @ _bicubic_1d(5, 7).T + 0.5), 0, 255)  # horizontal pass first
    full = np.clip(np.floor(_bicubic_1d(3, 4) @ rows + 0.5), 0, 255)
    got = ds.x[0, 0].numpy().astype(np.int64)
    assert np.abs(got - full[:, 1:5]).max() <= 1  # Pillow's fixed-point weights: +-1


def test_colour_with_equal_red_and_green_is_still_colour(tmp_path):
    px = np.zeros((4, 4, 3), np.uint8)
    px[..., 2] = 200  # red = green = 0, blue 200: a blue image, not grey
    _png(tmp_path / "blue.png", px)
    with pytest.raises(ValueError, match="blue.png' is in colour but data.channels=1"):
        load_dataset(DataConfig(source="folder", path=str(tmp_path), channels=1))


def test_half_transparent_and_palette_transparent_pixels_are_refused(tmp_path):
    """Any alpha below 255 hides part of a colour; a palette PNG marks its transparent entry
    in im.info["transparency"] (no alpha band) and is refused alike."""
    px = np.full((4, 4, 4), 255, dtype=np.uint8)
    px[1, 2, 3] = 128
    (tmp_path / "half").mkdir()
    Image.fromarray(px, "RGBA").save(tmp_path / "half" / "h.png")
    with pytest.raises(ValueError, match="h.png.*transparent pixels"):
        load_dataset(DataConfig(source="folder", path=str(tmp_path / "half"), channels=3))
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([0, 255, 0] + [255, 255, 255] * 255)  # entry 0 green (hidden), 1 white
    pal.putpixel((0, 0), 1)
    (tmp_path / "pal").mkdir()
    pal.save(tmp_path / "pal" / "p.png", transparency=0)
    with pytest.raises(ValueError, match="p.png.*transparent pixels"):
        load_dataset(DataConfig(source="folder", path=str(tmp_path / "pal"), channels=3))


@pytest.mark.parametrize("orientation", [5, 7, 8])
def test_size_check_turns_every_rotated_exif_orientation(tmp_path, orientation):
    """Orientations 5..8 all swap width and height when shown (6 was tested): an 8 x 4
    stored photo of each beside an upright 4 x 8 one is one size."""
    im = Image.fromarray(np.zeros((4, 8, 3), np.uint8))
    exif = im.getexif()
    exif[0x0112] = orientation
    im.save(tmp_path / "p.jpg", exif=exif)
    Image.fromarray(np.zeros((8, 4, 3), np.uint8)).save(tmp_path / "q.jpg")
    ds = load_dataset(DataConfig(source="folder", path=str(tmp_path), channels=3))
    assert ds.x.shape == (2, 3, 8, 4)


def test_num_classes_set_above_the_class_folders_is_kept(tmp_path):
    """data.num_classes larger than the folders (classes to add later) is the model's size."""
    for cls in ("cat", "dog"):
        _png(tmp_path / cls / "0.png", np.zeros((4, 4), np.uint8))
    ds = load_dataset(DataConfig(source="folder", path=str(tmp_path), channels=1,
                                 class_conditional=True, num_classes=5))  # fmt: skip
    assert ds.num_classes == 5 and ds.y.tolist() == [0, 1]
    digits = load_dataset(DataConfig(source="digits", class_conditional=True, num_classes=12))
    assert digits.num_classes == 12


def test_label_equal_to_num_classes_is_refused_and_unconditional_data_has_no_classes():
    """Labels must lie in 0 .. num_classes - 1: digit 9 has no row when num_classes is 9."""
    with pytest.raises(ValueError, match="data.num_classes=9 but the labels run from 0 to 9"):
        load_dataset(DataConfig(source="digits", class_conditional=True, num_classes=9))
    assert load_dataset(DataConfig(source="digits")).num_classes is None


def test_wide_channels_last_latents_are_named(tmp_path):
    """[N, h, w, c] with c = data.channels is channels-last also for c > 16."""
    np.save(tmp_path / "z.npy", torch.randn(3, 4, 4, 32).numpy())
    with pytest.raises(ValueError, match=r"channels-last.*permute\(0, 3, 1, 2\)"):
        load_dataset(DataConfig(source="latents", path=str(tmp_path / "z.npy"), channels=32))


def test_latent_labels_of_any_integer_dtype_become_int64(tmp_path):
    z, y = torch.randn(4, 2, 2, 2), torch.tensor([1, 0, 2, 1], dtype=torch.int32)
    torch.save({"latents": z, "labels": y}, tmp_path / "z.pt")
    ds = load_dataset(DataConfig(source="latents", path=str(tmp_path / "z.pt"), channels=2,
                                 class_conditional=True))  # fmt: skip
    assert ds.y.dtype == torch.int64 and ds.y.tolist() == [1, 0, 2, 1] and ds.num_classes == 3


def test_batch_iterator_refuses_an_empty_dataset_and_a_zero_batch():
    with pytest.raises(ValueError, match="the dataset is empty"):
        BatchIterator(0, 4)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        BatchIterator(5, 0)


def test_iterator_epochs_of_nearby_seeds_are_all_different():
    """Each (seed, epoch) has its own order: seed s + 1 does not replay seed s one epoch late
    (a seed + epoch generator seed did)."""
    orders = set()
    for seed in range(4):
        it = BatchIterator(20, 20, seed=seed)
        for _ in range(4):
            orders.add(tuple(it.next_indices().tolist()))
    assert len(orders) == 16


def test_iterator_takes_a_seed_beyond_64_bits_after_mixing():
    it = BatchIterator(10, 10, seed=2**62)
    assert sorted(it.next_indices().tolist()) == list(range(10))


def test_batch_iterator_refuses_a_position_at_the_end():
    """Position n is not a place in an epoch of n: a saved state never holds it."""
    it = BatchIterator(11, 4, seed=0)
    with pytest.raises(ValueError, match="data iterator state is broken"):
        it.load_state_dict({**it.state_dict(), "pos": 11})


def test_dataset_to_keeps_every_field():
    from antdiff.data import Dataset

    ds = Dataset(torch.zeros(2, 1, 2, 2), torch.tensor([0, 1]), 2, None, ("a", "b"))
    moved = ds.to("cpu")
    assert moved.class_names == ("a", "b") and moved.num_classes == 2
    assert torch.equal(moved.y, ds.y) and torch.equal(moved.x, ds.x)


def test_tiny_autoencoder_encodes_every_row_of_a_one_image_folder(tmp_path):
    """Encoding runs 512 rows at a time: a set of 1 (or 513) rows ends in a short chunk, which
    is encoded too; each latent is the codec's encoding of that image alone."""
    _png(tmp_path / "a.png", np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8))
    ds = load_dataset(DataConfig(source="folder", path=str(tmp_path), autoencoder="tiny",
                                 autoencoder_steps=1))  # fmt: skip
    assert ds.x.shape == (1, 4, 4, 4)
    img = torch.from_numpy(np.array(Image.open(tmp_path / "a.png"))).double() / 127.5 - 1.0
    with torch.no_grad():
        want = ds.codec.encode(img.float()[None, None])
    torch.testing.assert_close(ds.x, want)

"""Walkthrough of data loading and configuration: EXIF-turned TIFFs (size check, pixels, and
Pillow's unturned grey ones refused), a too-large image and a broken class-folder link named,
an empty YAML section keeping its base's, scientific notation in ant.method_kwargs."""

from __future__ import annotations

import os

import numpy as np
import pytest

from antdiff.config import DataConfig, load_config
from antdiff.data import load_dataset

Image = pytest.importorskip("PIL.Image")


def _folder(path, channels=3, **kw):
    return load_dataset(DataConfig(source="folder", path=str(path), channels=channels, **kw))


def test_exif_rotated_tiff_passes_the_size_check(tmp_path):
    a = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)  # stored 6 wide, 4 high
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = 6  # displayed turned: 4 wide, 6 high
    im.save(tmp_path / "a.tiff", exif=exif)
    Image.fromarray(np.zeros((6, 4, 3), np.uint8)).save(tmp_path / "b.png")  # 4 wide, 6 high
    ds = _folder(tmp_path)
    assert tuple(ds.x.shape) == (2, 3, 6, 4)


def test_mixed_tiff_orientations_get_the_size_message(tmp_path):
    a = np.zeros((4, 6, 3), np.uint8)
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = 6
    im.save(tmp_path / "a.tiff", exif=exif)  # read as 4 x 6 (w x h)
    Image.fromarray(a).save(tmp_path / "c.tiff")  # read as 6 x 4
    with pytest.raises(ValueError, match="images of different sizes"):
        _folder(tmp_path)


def test_a_very_large_image_is_named(tmp_path, monkeypatch):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # 64 px > 2 * 10: PIL refuses it
    for size in (None, 4):
        with pytest.raises(ValueError, match="big.png"):
            _folder(tmp_path, image_size=size)


def test_a_broken_class_folder_link_is_not_dropped_silently(tmp_path):
    root = tmp_path / "data"
    for name in ("a", "c"):
        (root / name).mkdir(parents=True)
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(root / name / "1.png")
    os.symlink(tmp_path / "unmounted", root / "b")  # class b's images are elsewhere, gone
    with pytest.raises(ValueError, match="'b'"):
        _folder(root, channels=1, class_conditional=True)


def test_an_empty_section_keeps_the_bases_section(tmp_path):
    (tmp_path / "mine.yaml").write_text("base: digits_dit\ntrain:\nsample:\n")
    preset = load_config("digits_dit")
    cfg = load_config(tmp_path / "mine.yaml")
    assert cfg.train == preset.train and cfg.sample == preset.sample


def test_method_kwargs_take_scientific_notation(tmp_path):
    cfg = load_config("digits_adm", ["--ant.method", "famo", "--ant.method_kwargs.lr", "1e-3"])
    assert cfg.ant.method_kwargs == {"lr": 0.001}
    (tmp_path / "c.yaml").write_text(
        "base: digits_adm\nant:\n  method: cagrad\n  method_kwargs: {c: 5e-1}\n"
    )
    assert load_config(tmp_path / "c.yaml").ant.method_kwargs == {"c": 0.5}


def test_exif_turned_tiffs_load_upright_or_are_refused(tmp_path):
    """An RGB TIFF with orientation 6 loads as a viewer shows it (turned 90 degrees clockwise);
    a grey one, which Pillow 13 loads unturned though it reports the turned size, is refused by
    name rather than trained on sideways."""
    from pathlib import Path

    from antdiff.data import _read_image

    rgb = (np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3) * 3)
    grey = np.arange(4 * 6, dtype=np.uint8).reshape(4, 6) * 10
    for name, a in (("rgb.tiff", rgb), ("grey.tiff", grey)):
        im = Image.fromarray(a)
        exif = im.getexif()
        exif[0x0112] = 6
        im.save(tmp_path / name, exif=exif)
    got = _read_image(Path(tmp_path / "rgb.tiff"), 3, None).transpose(1, 2, 0)
    np.testing.assert_array_equal(got, np.rot90(rgb, -1))
    with Image.open(tmp_path / "grey.tiff") as probe:
        probe.load()
        unturned = probe.size == (6, 4)  # this Pillow's grey TIFFs: not turned on load
    if unturned:
        with pytest.raises(ValueError, match="grey.tiff.*TIFF whose EXIF orientation"):
            _read_image(Path(tmp_path / "grey.tiff"), 1, None)
    else:
        got = _read_image(Path(tmp_path / "grey.tiff"), 1, None)[0]
        np.testing.assert_array_equal(got, np.rot90(grey, -1))

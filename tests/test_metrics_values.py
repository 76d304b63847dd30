"""Value-level tests of antdiff.metrics found by a mutation-testing pass: FID and its input
checks against hand / numpy values, precision-recall edge cases, reference statistics, the
public wrappers and the feature-extractor plumbing (all CPU, no network weights needed)."""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from test_metrics import (
    CountingExtractor,
    PixelExtractor,
    fid_scipy,
    gaussian_features,
    pr_brute_force,
)

from antdiff.metrics import (
    evaluate,
    feature_stats,
    fid_from_features,
    fid_from_stats,
    fid_vs_reference,
    precision_recall,
    reference_stats,
)
from antdiff.metrics import features as features_mod
from antdiff.metrics import fid as fid_mod
from antdiff.metrics.fid import check_enough_samples

refstats_mod = importlib.import_module("antdiff.metrics.reference_stats")
# ---------------------------------------------------------------- FID: inputs


def test_fid_accepts_bfloat16_and_half_tensors() -> None:
    """Low-precision tensors are widened to float64 before numpy sees them (numpy has no
    bfloat16: ``.numpy()`` on one raises)."""
    f, g = gaussian_features(60, 3, 21), gaussian_features(60, 3, 22) * 1.5
    for dt in (torch.bfloat16, torch.float16):
        a, b = torch.from_numpy(f).to(dt), torch.from_numpy(g).to(dt)
        want = fid_scipy(a.double().numpy(), b.double().numpy())
        assert fid_from_features(a, b) == pytest.approx(want, rel=1e-9)
        mu, sigma = feature_stats(a)
        np.testing.assert_allclose(mu, a.double().numpy().mean(0), rtol=1e-12)


@pytest.mark.parametrize(
    "bad,msg",
    [
        (np.zeros((0, 3)), r"f1 must be a non-empty 2-D array \[N, D\]; got shape \(0, 3\)"),
        (np.zeros((5, 0)), r"f1 must be a non-empty 2-D array \[N, D\]; got shape \(5, 0\)"),
        (np.zeros((5, 2, 1)), r"f1 must be a non-empty 2-D array"),
        (np.array([[0.0, np.inf]] * 5), "f1 holds NaN or inf values"),
        (np.array([[0.0, -np.inf]] * 5), "f1 holds NaN or inf values"),
    ],
)
def test_fid_features_shape_and_finiteness_messages(bad: np.ndarray, msg: str) -> None:
    good = np.random.default_rng(0).normal(size=(5, bad.shape[1] if bad.ndim == 2 else 2))
    with pytest.raises(ValueError, match=msg):
        fid_from_features(bad, good, allow_rank_deficient=True)


def test_fid_minimum_sample_count_is_exactly_dim_plus_one() -> None:
    """N = D + 1 samples can give a full-rank covariance: accepted; N = D is refused."""
    f, g = gaussian_features(17, 16, 23), gaussian_features(17, 16, 24)
    assert fid_from_features(f, g) == pytest.approx(fid_scipy(f, g), rel=1e-6)
    check_enough_samples(17, 16, "x", allow_rank_deficient=False)
    with pytest.raises(ValueError, match=r"x: 16 samples of 16-dim .* \(rank <= N - 1 = 15 < 16\)"):
        check_enough_samples(16, 16, "x", allow_rank_deficient=False)
    with pytest.raises(ValueError, match=r"at least 17 samples \(published FIDs use 10K-50K\)\.$"):
        check_enough_samples(16, 16, "x", allow_rank_deficient=False, api=False)


def test_feature_stats_needs_two_samples_and_is_unbiased() -> None:
    with pytest.raises(ValueError, match="features: a covariance needs at least 2 samples; got 1"):
        feature_stats(np.ones((1, 3)))
    f = np.array([[0.0, 1.0], [2.0, 5.0], [4.0, 0.0]])
    mu, sigma = feature_stats(f)
    np.testing.assert_array_equal(mu, [2.0, 2.0])
    # by hand: deviations (-2, -1), (0, 3), (2, -2); sums of products over N - 1 = 2
    np.testing.assert_allclose(sigma, [[4.0, -1.0], [-1.0, 7.0]], rtol=1e-15)
    mu1, sigma1 = feature_stats(np.array([[1.0], [3.0]]))  # D = 1 still gives [D] and [D, D]
    assert mu1.shape == (1,) and sigma1.shape == (1, 1) and sigma1[0, 0] == 2.0


@pytest.mark.parametrize("first", [True, False])
def test_fid_round_off_negative_eigenvalues_count_as_zero(first: bool) -> None:
    """An eigenvalue a little below 0 (within the round-off tolerance) is a zero variance in
    the square root, whichever covariance carries it (not |lambda|, which adds its root)."""
    neg = np.diag([2.0, 1.0, -1e-8])
    other = np.diag([1.0, 0.5, 1.0])
    s1, s2 = (neg, other) if first else (other, neg)
    mu = np.zeros(3)
    want = np.trace(s1) + np.trace(s2) - 2 * (np.sqrt(2.0) + np.sqrt(0.5) + 0.0)
    assert fid_from_stats(mu, s1, mu, s2) == pytest.approx(want, rel=1e-12, abs=1e-12)


def test_fid_slightly_asymmetric_covariance_is_read_as_its_symmetric_part() -> None:
    """Asymmetry at round-off level (<= 1e-6 of the largest entry) is accepted and averaged
    away, on either side; more than that is an error, not a covariance."""
    f, g = gaussian_features(200, 5, 25), gaussian_features(200, 5, 26) * 1.4
    (mu1, s1), (mu2, s2) = feature_stats(f), feature_stats(g)
    want = fid_from_stats(mu1, s1, mu2, s2)
    skew = np.triu(np.ones((5, 5)), 1)
    skew = (skew - skew.T) * 1e-7 * np.abs(s1).max()
    assert fid_from_stats(mu1, s1 + skew, mu2, s2) == pytest.approx(want, rel=1e-12)
    assert fid_from_stats(mu1, s1, mu2, s2 - skew) == pytest.approx(want, rel=1e-12)
    with pytest.raises(ValueError, match="stats 1: sigma is not symmetric"):
        fid_from_stats(mu1, s1 + skew * 1e3, mu2, s2)
    with pytest.raises(ValueError, match="stats 2: sigma is not symmetric"):
        fid_from_stats(mu1, s1, mu2, s2 + skew * 1e3)


@pytest.mark.parametrize(
    "mu,sigma,msg",
    [
        (np.zeros((2, 1)), np.eye(2), r"stats 2: need mu \[D\] and sigma \[D, D\]; got mu \(2,"),
        (np.array([0.0, np.nan]), np.eye(2), "stats 2: mu/sigma hold NaN or inf values"),
        (np.array([0.0, np.inf]), np.eye(2), "stats 2: mu/sigma hold NaN or inf values"),
        (np.zeros(2), np.array([[1.0, np.nan], [np.nan, 1.0]]), "stats 2: mu/sigma hold NaN"),
        (np.zeros(2), np.diag([1.0, np.inf]), "stats 2: mu/sigma hold NaN or inf values"),
    ],
)
def test_fid_from_stats_rejects_malformed_stats(mu: np.ndarray, sigma: np.ndarray, msg: str):
    with pytest.raises(ValueError, match=msg):
        fid_from_stats(np.zeros(2), np.eye(2), mu, sigma)


def test_fid_negative_eigenvalue_tolerance_is_relative_to_the_scale() -> None:
    """-1e-8 of the scale is round-off and accepted; -1e-4 of it is not a covariance."""
    ok = np.diag([1e4, 1.0, -1e-4])  # -1e-8 * scale
    bad = np.diag([1.0, 1.0, -1e-4])
    assert np.isfinite(fid_from_stats(np.zeros(3), ok, np.zeros(3), np.eye(3)))
    with pytest.raises(ValueError, match=r"stats 1: sigma has a negative eigenvalue \(-0.0001\)"):
        fid_from_stats(np.zeros(3), bad, np.zeros(3), np.eye(3))


def test_fid_from_stats_dims_and_sample_counts() -> None:
    with pytest.raises(ValueError, match="feature dims differ: 3 vs 2"):
        fid_from_stats(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))
    f, g = gaussian_features(40, 16, 27), gaussian_features(12, 16, 28)
    (mu1, s1), (mu2, s2) = feature_stats(f), feature_stats(g)
    with pytest.raises(ValueError, match="set 2: 12 samples of 16-dim"):
        fid_from_stats(mu1, s1, mu2, s2, n1=40, n2=12)
    with pytest.raises(ValueError, match="set 1: 12 samples of 16-dim"):
        fid_from_stats(mu2, s2, mu1, s1, n1=12, n2=40)
    # allow_rank_deficient reaches the check, for either set
    want = fid_from_features(f, g, allow_rank_deficient=True)
    got = fid_from_stats(mu1, s1, mu2, s2, n1=40, n2=12, allow_rank_deficient=True)
    assert got == pytest.approx(want, rel=1e-12) and got == pytest.approx(fid_scipy(f, g), rel=1e-6)
    assert fid_from_stats(mu2, s2, mu1, s1, n1=12, n2=40, allow_rank_deficient=True) > 0


def test_fid_round_off_below_zero_is_clipped_to_exactly_zero(monkeypatch) -> None:
    """A distance that round-off pushes below 0 is reported as 0.0 (not negative, and not
    its absolute value)."""
    monkeypatch.setattr(
        fid_mod, "trace_sqrt_product", lambda s1, s2: float(np.trace(s1)) * (1 + 1e-12)
    )
    assert fid_from_stats(np.zeros(4), np.eye(4), np.zeros(4), np.eye(4)) == 0.0


def test_fid_from_features_hand_value() -> None:
    """1-D sets with known mean and variance: FID = (m1 - m2)^2 + (s1 - s2)^2."""
    a = np.array([[0.0], [2.0]])  # mean 1, variance 2
    b = np.array([[3.0], [5.0], [7.0]])  # mean 5, variance 4
    want = (1.0 - 5.0) ** 2 + (np.sqrt(2.0) - 2.0) ** 2
    assert fid_from_features(a, b) == pytest.approx(want, rel=1e-13)
    assert fid_from_features(b, a) == pytest.approx(want, rel=1e-13)


# ---------------------------------------------------------------- precision / recall


@pytest.mark.parametrize(
    "bad,msg",
    [
        (
            np.zeros((0, 3)),
            r"real_features must be a non-empty 2-D \[N, D\] array; got shape \(0, 3",
        ),
        (
            np.zeros((6, 0)),
            r"real_features must be a non-empty 2-D \[N, D\] array; got shape \(6, 0",
        ),
        (np.array([[np.nan, 0.0, 0.0]] * 6), "real_features holds NaN or inf values"),
        (np.array([[np.inf, 0.0, 0.0]] * 6), "real_features holds NaN or inf values"),
    ],
)
def test_precision_recall_real_feature_checks(bad: np.ndarray, msg: str) -> None:
    good = np.random.default_rng(0).normal(size=(6, 3))
    with pytest.raises(ValueError, match=msg):
        precision_recall(bad, good, k=1)


def test_precision_recall_fake_feature_checks() -> None:
    x = np.random.default_rng(1).normal(size=(10, 3))
    with pytest.raises(ValueError, match=r"fake_features holds NaN or inf"):
        precision_recall(x, np.array([[0.0, np.nan, 0.0]] * 10))
    with pytest.raises(ValueError, match="fake_features: k=3 neighbours need at least 4 rows"):
        precision_recall(x, x[:3], k=3)
    with pytest.raises(ValueError, match="real and fake features must share the dim; got 3 vs 2"):
        precision_recall(x, x[:, :2])
    with pytest.raises(ValueError, match="block must be a positive int; got True"):
        precision_recall(x, x, block=True)
    out = precision_recall(x, x[:4], k=3)  # k + 1 rows are enough
    assert (out["n_real"], out["n_fake"], out["k"]) == (10, 4, 3)


def test_precision_recall_integer_features_far_from_the_origin() -> None:
    """Integer features are widened to float64 before centring: cast to float32 first, values
    near 1e9 fall on a grid of 64 and every point lands in every ball."""
    rng = np.random.default_rng(3)
    real = rng.integers(0, 30, (60, 4))
    fake = rng.integers(5, 40, (50, 4))
    want = pr_brute_force(real.astype(float), fake.astype(float), 3)
    assert 0 < want[0] < 1 and 0 < want[1] < 1
    out = precision_recall(real + 10**9, fake + 10**9, k=3, dtype=torch.float64)
    assert (out["precision"], out["recall"]) == want


def test_precision_recall_half_features_are_centred_in_float32_or_wider() -> None:
    """float16 features are widened before the centring subtraction: done in float16, two
    clusters at +-1500 (the centre between them) are rounded to a grid of 1 and a fake point
    changes sides of a ball's boundary."""
    rng = np.random.default_rng(7)
    sets = []
    for _ in range(2):
        side = np.where(rng.random((200, 1)) < 0.5, -1500, 1500)
        sets.append(rng.normal(size=(200, 2)) * 20 + side)
    real, fake = sets[0].astype(np.float16), (sets[1] + 8).astype(np.float16)
    want = pr_brute_force(real.astype(np.float64), fake.astype(np.float64), 3)
    out = precision_recall(torch.from_numpy(real), torch.from_numpy(fake), dtype=torch.float64)
    assert (out["precision"], out["recall"]) == want


@pytest.mark.parametrize("block", [1, 2, 4, 5, 13, 40])
def test_knn_radii_and_membership_match_brute_force_for_every_tiling(block: int) -> None:
    """Squared k-NN radii and ball membership, tile by tile, equal the brute force for tile
    edges that do and do not divide N (the last partial tile included)."""
    prdc = importlib.import_module("antdiff.metrics.prdc")
    rng = np.random.default_rng(7)
    x = rng.normal(size=(13, 3))
    q = rng.normal(size=(9, 3)) * 2.0
    d = ((x[:, None] - x[None]) ** 2).sum(-1)
    for k in (1, 2, 12):
        want = np.sort(d, axis=1)[:, k]  # column 0 is the point itself
        got = prdc.knn_sq_radii(torch.from_numpy(x), k, block).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    r = np.sort(d, axis=1)[:, 2]
    inside = (((q[:, None] - x[None]) ** 2).sum(-1) <= r[None]).any(1)
    assert 0 < inside.sum() < len(q)
    got = prdc.inside_manifold(torch.from_numpy(q), torch.from_numpy(x), torch.from_numpy(r), block)
    np.testing.assert_array_equal(got.numpy(), inside)


def test_precision_recall_ball_radius_is_exact() -> None:
    """A fake point just outside a ball (radius 1, at 1 + 1e-6) is outside: the radius is the
    k-th neighbour distance itself, no slack."""
    real = torch.tensor([[0.0], [1.0], [2.0], [3.0]], dtype=torch.float64)
    fake = torch.tensor([[4.000001], [4.000001]], dtype=torch.float64)
    out = precision_recall(real, fake, k=1, dtype=torch.float64)
    assert out["precision"] == 0.0


def test_squared_distances_are_clamped_at_zero() -> None:
    """|a|^2 + |b|^2 - 2 a.b of a point with itself rounds below 0 in float32; it is clamped."""
    prdc = importlib.import_module("antdiff.metrics.prdc")
    a = torch.from_numpy(np.random.default_rng(5).normal(size=(64, 200)) * 10).float()
    raw = (a * a).sum(1, keepdim=True) + (a * a).sum(1)[None, :] - 2.0 * (a @ a.T)
    assert float(raw.min()) < 0  # the data exercises the clamp
    d = prdc._sq_dists(a, a)
    assert float(d.min()) == 0.0
    torch.testing.assert_close(d, raw.clamp_min(0.0), rtol=0, atol=0)


def test_precision_recall_centre_is_subtracted_in_the_inputs_precision() -> None:
    """float64 features at 1e12 scored in float32: the centre is subtracted in float64 before
    the cast (a float32 centre is off by up to 2^15 there, which float32 distances cannot
    survive)."""
    rng = np.random.default_rng(6)
    real = rng.standard_normal((200, 8))
    fake = rng.standard_normal((200, 8)) * 0.9 + 0.2
    want_p, want_r = pr_brute_force(real, fake, 3)
    assert 0 < want_p < 1 and 0 < want_r < 1
    out = precision_recall(real + 1e12 + 12345.678, fake + 1e12 + 12345.678, k=3)
    assert abs(out["precision"] - want_p) <= 2 / 200 and abs(out["recall"] - want_r) <= 2 / 200


def test_precision_recall_result_is_json_serialisable_for_numpy_k() -> None:
    x = np.random.default_rng(0).normal(size=(12, 3))
    out = precision_recall(x, x, k=np.int64(3), block=np.int32(8))
    assert type(out["k"]) is int
    json.dumps(out)


# ---------------------------------------------------------------- reference statistics


def test_cache_file_names() -> None:
    """Labels and extractor names are slugged (no path separators, at most 80 characters,
    "x" when nothing is left) and the key ends with 16 hex digits of the data hash."""
    digest = "0123456789abcdef" * 4
    root = Path("/cache")
    assert refstats_mod.cache_path("!!!", "???", digest, root) == root / (
        "x__x__0123456789abcdef.npz"
    )
    p = refstats_mod.cache_path("a/b c", "net:v1.2-x", digest, root)
    assert p.parent == root and p.name == "a_b_c__net_v1.2-x__0123456789abcdef.npz"
    long = refstats_mod.cache_path("L" * 90, "n", digest, root)
    assert long.name == "L" * 80 + "__n__0123456789abcdef.npz"


def test_data_hash_covers_every_row_and_not_the_chunking() -> None:
    x = torch.rand(7, 1, 4, 4) * 2 - 1
    full = refstats_mod.data_hash(x)
    assert refstats_mod.data_hash(x, chunk_bytes=64 * 2) == full  # two rows per chunk
    assert refstats_mod.data_hash(x, chunk_bytes=1) == full
    y = x.clone()
    y[-1, 0, 3, 3] = -y[-1, 0, 3, 3]
    assert refstats_mod.data_hash(y, chunk_bytes=64 * 2) != full
    assert refstats_mod.data_hash(y) != full


def test_data_hash_of_uint8_pixels_is_that_of_their_floats() -> None:
    """uint8 pixels hash as the float32 values in [-1, 1] they stand for; float64 images hash
    as their float32 values (the same images give the same cache key)."""
    u8 = torch.randint(0, 256, (5, 1, 3, 3), dtype=torch.uint8)
    floats = u8.float() / 127.5 - 1.0
    assert refstats_mod.data_hash(u8) == refstats_mod.data_hash(floats)
    assert refstats_mod.data_hash(floats.double()) == refstats_mod.data_hash(floats)
    assert refstats_mod.data_hash(u8) != refstats_mod.data_hash(floats + 1e-3)


def test_reference_stats_of_a_named_split(tmp_path: Path) -> None:
    """A dataset name is the default label of the cache file, and each name is its own split."""
    ext = CountingExtractor()
    test = reference_stats("digits-test", ext, tmp_path)
    (path,) = tmp_path.glob("*.npz")
    x = features_mod.digits_images("test")[0]
    digest = refstats_mod.data_hash(x)[:16]
    assert path.name == f"digits-test__counting_test_extractor__{digest}.npz"
    assert test.n == 359
    np.testing.assert_allclose(test.mu, ext(x).mean(0), rtol=1e-12)
    assert reference_stats("digits-train", ext, tmp_path).n == 1438


def _rewrite(path: Path, **changes: object) -> None:
    with np.load(path) as z:
        record = {k: z[k] for k in z.files}
    record.update(changes)
    np.savez(path, **record)


def test_reference_stats_recompute_a_file_of_other_data_or_a_broken_file(tmp_path: Path) -> None:
    """The stored data hash is checked (not only the file name), and a file with a missing
    array or that is no .npz at all is recomputed and overwritten."""
    images = torch.rand(30, 1, 4, 4) * 2 - 1
    ext = CountingExtractor()
    first = reference_stats(images, ext, tmp_path, label="toy")
    (path,) = tmp_path.glob("*.npz")
    for damage in (
        lambda: _rewrite(path, data_sha256=np.str_("f" * 64), mu=first.mu + 1.0),
        lambda: _rewrite(path, extractor=np.str_("other"), mu=first.mu + 1.0),
        lambda: np.savez(path, mu=first.mu),  # the other arrays missing: KeyError
        lambda: path.write_bytes(b"not an npz file at all" * 10),  # ValueError in np.load
    ):
        damage()
        ext.calls = 0
        again = reference_stats(images, ext, tmp_path, label="toy")
        assert ext.calls > 0
        np.testing.assert_array_equal(again.mu, first.mu)
        assert again.n == 30 and again.extractor == ext.name


def test_reference_stats_default_cache_dir(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    reference_stats(torch.rand(10, 1, 2, 2) * 2 - 1, CountingExtractor(), label="toy")
    (path,) = (tmp_path / "xdg").rglob("*.npz")
    assert path.parent == tmp_path / "xdg" / "antdiff" / "reference_stats"


# ---------------------------------------------------------------- fid_vs_reference, evaluate


def _toy_images(n: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return ((torch.rand(n, 1, 2, 2, generator=g) * 1.6 - 0.8) + shift).clamp(-1, 1)


def test_fid_vs_reference_values_counts_and_checks(tmp_path: Path) -> None:
    ext = PixelExtractor(dim=4)
    real, fake = _toy_images(40, 0), _toy_images(30, 1, 0.1)
    ref = reference_stats(real, ext, tmp_path, label="toy")
    out = fid_vs_reference(fake, ref, ext)
    rf, ff = real.reshape(40, 4).double().numpy(), fake.reshape(30, 4).double().numpy()
    assert out["fid"] == pytest.approx(fid_scipy(rf, ff), rel=1e-9)
    assert (out["n_fake"], out["n_real"], out["dim"], out["features"]) == (30, 40, 4, "pixels")
    # features instead of images: the same value, the count from the features
    from_feats = fid_vs_reference(None, ref, ext, fake_features=torch.from_numpy(ff))
    assert from_feats == out
    with pytest.raises(ValueError, match="needs fake_images or fake_features"):
        fid_vs_reference(None, ref, ext)
    with pytest.raises(ValueError, match=r"fake_features must be \[30, 4\] .*got \(30, 3\)"):
        fid_vs_reference(fake, ref, ext, fake_features=ff[:, :3])
    with pytest.raises(ValueError, match="fake_features holds NaN"):
        fid_vs_reference(None, ref, ext, fake_features=np.full((30, 4), np.nan))


def test_fid_vs_reference_checks_both_sample_counts(tmp_path: Path) -> None:
    """Both sides need D + 1 samples (the reference's n from its file, the samples' count),
    unless allow_rank_deficient is passed on."""
    ext = PixelExtractor(dim=4)
    small_ref = reference_stats(_toy_images(3, 2), ext, tmp_path, label="small")
    big_ref = reference_stats(_toy_images(40, 3), ext, tmp_path, label="big")
    with pytest.raises(ValueError, match="set 1: 3 samples of 4-dim"):
        fid_vs_reference(_toy_images(30, 4), small_ref, ext)
    with pytest.raises(ValueError, match="set 2: 3 samples of 4-dim"):
        fid_vs_reference(_toy_images(3, 5), big_ref, ext)
    out = fid_vs_reference(_toy_images(3, 5), small_ref, ext, allow_rank_deficient=True)
    want = fid_scipy(_toy_images(3, 2).reshape(3, 4).double().numpy(),
                     _toy_images(3, 5).reshape(3, 4).double().numpy())  # fmt: skip
    assert out["fid"] == pytest.approx(want, rel=1e-6) and out["n_real"] == 3


def test_evaluate_against_independent_values() -> None:
    """evaluate() passes k on, scores fake against real (not the other way round) and passes
    allow_rank_deficient on to the FID."""
    real, fake = _toy_images(50, 6), _toy_images(40, 7, 0.3)
    rf, ff = real.reshape(50, 4).double().numpy(), fake.reshape(40, 4).double().numpy()
    ext = PixelExtractor(dim=4)
    out = evaluate(real, fake, ext, k=5)
    want_p, want_r = pr_brute_force(rf, ff, 5)
    assert want_p != want_r and (want_p, want_r) != pr_brute_force(rf, ff, 3)
    assert out["precision"] == pytest.approx(want_p) and out["recall"] == pytest.approx(want_r)
    assert out["fid"] == pytest.approx(fid_scipy(rf, ff), rel=1e-9)
    assert (out["k"], out["n_real"], out["n_fake"], out["dim"]) == (5, 50, 40, 4)
    assert out["features"] == "pixels"
    with pytest.raises(ValueError, match="f1: 4 samples of 4-dim"):
        evaluate(real[:4], fake, ext, k=3)
    small = evaluate(real[:4], fake, ext, k=3, allow_rank_deficient=True)
    assert small["fid"] == pytest.approx(fid_scipy(rf[:4], ff), rel=1e-6)


# ---------------------------------------------------------------- extractor plumbing


@pytest.mark.parametrize(
    "images,msg",
    [
        (torch.zeros(0, 1, 4, 4), r"\[N, C, H, W\] with N >= 1 and C in \(1, 3\); got \(0, 1, 4,"),
        (torch.zeros(2, 2, 4, 4), r"\[N, C, H, W\] with N >= 1 and C in \(1, 3\); got \(2, 2, 4,"),
        (torch.full((1, 1, 4, 4), 1.6), r"floats in \[-1, 1\]; got values in \[1.6"),
        (torch.full((1, 1, 4, 4), -1.6), r"floats in \[-1, 1\]; got values in \[-1.6"),
        (torch.full((1, 1, 4, 4), float("nan")), r"floats in \[-1, 1\]; got values in \[nan"),
        (torch.full((1, 1, 4, 4), float("inf")), r"floats in \[-1, 1\]; got values in \[inf"),
    ],
)
def test_image_checks(images: torch.Tensor, msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        PixelExtractor()(images)


def test_images_up_to_one_and_a_half_are_clamped_not_refused() -> None:
    x = torch.tensor([-1.49, -1.0, 0.5, 1.49]).reshape(1, 1, 2, 2)
    np.testing.assert_array_equal(PixelExtractor(dim=4)(x), [[-1.0, -1.0, 0.5, 1.0]])


def test_zero_one_warning_threshold(recwarn) -> None:
    """The warning fires when the darkest value is within 0.05 of 0 (either side), not for
    images that reach -1, nor for a darkest value a little further from 0."""
    base = torch.rand(64, 1, 8, 8) * 0.9 + 0.1  # 4096 values in [0.1, 1]
    for lo, warns in ((0.03, True), (-0.03, True), (0.07, False), (-1.0, False)):
        x = base.clone()
        x[0, 0, 0, 0] = lo
        recwarn.clear()
        PixelExtractor(dim=64)(x)
        got = [w for w in recwarn if "floats in [0, 1]" in str(w.message)]
        assert bool(got) == warns, lo


def test_extractor_batches_and_input_types() -> None:
    """Batches of batch_size rows cover every image once, in order; the network gets float32
    in [-1, 1] whatever the input dtype (float64, uint8 tensor or numpy uint8)."""
    seen: list[tuple[int, torch.dtype]] = []

    class Recording(PixelExtractor):
        def _forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append((int(x.shape[0]), x.dtype))
            return super()._forward(x)

    ext = Recording(dim=4)
    ext.batch_size = 3
    x = torch.linspace(-1, 1, 7 * 4, dtype=torch.float64).reshape(7, 1, 2, 2)
    got = ext(x)
    np.testing.assert_array_equal(got, x.float().double().reshape(7, 4).numpy())
    assert seen == [(3, torch.float32), (3, torch.float32), (1, torch.float32)]
    u8 = np.arange(28, dtype=np.uint8).reshape(7, 1, 2, 2) * 9
    want = torch.from_numpy(u8).float() / 127.5 - 1
    np.testing.assert_allclose(ext(u8), want.reshape(7, 4).double().numpy(), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(ext(torch.from_numpy(u8)), ext(u8))


def test_to_pixels_rounds_and_clamps() -> None:
    x = torch.tensor([-1.2, -1.0, -0.999, 0.0, 0.003, 1.0, 1.2], dtype=torch.float64)
    want = np.clip((x.numpy() + 1) * 127.5, 0, 255)
    np.testing.assert_allclose(features_mod.to_pixels(x, False).numpy(), want, rtol=1e-15)
    np.testing.assert_array_equal(features_mod.to_pixels(x, True).numpy(), np.round(want))
    assert features_mod.to_pixels(torch.tensor([0.0]), True).item() == 128.0  # 127.5 -> 128


def test_find_inception_default_places(tmp_path: Path, monkeypatch) -> None:
    """The working directory, the temp dir and StyleGAN's dnnlib cache are searched (each place
    once); an explicit $ANT_INCEPTION that is missing is an error even when a default exists."""
    name = features_mod.INCEPTION_FILENAME
    monkeypatch.delenv("ANT_INCEPTION", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(features_mod, "CLEANFID_DIR", tmp_path / "tmpdir")
    monkeypatch.setattr(features_mod.tempfile, "tempdir", str(tmp_path / "tmpdir"))
    monkeypatch.chdir(tmp_path)
    paths = features_mod.inception_search_paths()
    assert len(paths) == len(set(paths)) and tmp_path / "tmpdir" / name in paths
    monkeypatch.setattr(features_mod.tempfile, "tempdir", str(tmp_path / "other-tmp"))
    assert tmp_path / "other-tmp" / name in features_mod.inception_search_paths()
    dnnlib = tmp_path / "home" / ".cache" / "dnnlib" / "downloads"
    dnnlib.mkdir(parents=True)
    (dnnlib / f"0123abcd_{name}").write_bytes(b"x")
    assert features_mod.find_inception() == dnnlib / f"0123abcd_{name}"
    (tmp_path / name).write_bytes(b"x")  # the working directory comes before dnnlib
    assert features_mod.find_inception() == tmp_path / name
    monkeypatch.setenv("ANT_INCEPTION", str(tmp_path / "missing.pt"))
    with pytest.raises(FileNotFoundError, match=r"looked in \$ANT_INCEPTION:\n  \S*missing.pt\n"):
        features_mod.find_inception()


def test_fid_helper_missing_files(tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(FileNotFoundError, match="fid-helper default_1.pt not found at .*nope.pt"):
        features_mod.FidHelperInception(path=tmp_path / "nope.pt", device="cpu")
    monkeypatch.setattr(features_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="package not installed"):
        features_mod.find_fid_helper_model()


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_fid_helper_float_input_is_not_quantised(tmp_path: Path) -> None:
    path = tmp_path / "default_1.pt"
    torch.jit.script(torch.nn.Identity()).save(str(path))
    q = features_mod.FidHelperInception(path=path, device="cpu")
    f = features_mod.FidHelperInception(path=path, device="cpu", quantize=False)
    x = torch.linspace(-1, 1, 299 * 299).reshape(1, 1, 299, 299)
    want = ((x.double() + 1) * 127.5 / 128 - 1).clamp(-1, 127 / 128).expand(1, 3, 299, 299)
    np.testing.assert_allclose(f.prepare(x).double().numpy(), want.numpy(), rtol=0, atol=1e-6)
    assert float((q.prepare(x).double() - want).abs().max()) > 1e-3  # rounded to 8-bit levels
    assert f.name == q.name.replace("InceptionV3,", "InceptionV3 [float input],") != q.name


def test_file_digest_follows_a_rewritten_file(tmp_path: Path) -> None:
    """The digest cache is keyed by size and mtime: a file rewritten in place with the same
    size gets the digest of its new bytes."""
    import hashlib

    p = tmp_path / "w.pt"
    p.write_bytes(b"a" * 64)
    os.utime(p, ns=(1_000_000_000, 1_000_000_000))
    first = features_mod.file_digest(p)
    assert first == hashlib.sha256(b"a" * 64).hexdigest()[:12]
    p.write_bytes(b"b" * 64)
    os.utime(p, ns=(2_000_000_000, 2_000_000_000))
    assert features_mod.file_digest(p) == hashlib.sha256(b"b" * 64).hexdigest()[:12]


def test_fingerprint_covers_parameter_names() -> None:
    lin = torch.nn.Linear(2, 2)
    a = features_mod._fingerprint(torch.nn.Sequential(lin))
    b = features_mod._fingerprint(torch.nn.Sequential(torch.nn.Identity(), lin))
    assert a != b and a == features_mod._fingerprint(torch.nn.Sequential(lin))


def test_digits_weights_default_path_per_seed_and_saved(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    trained: list[int] = []

    def quick(seed: int = 0, epochs: int = 25):
        trained.append(seed)
        torch.manual_seed(seed)
        return features_mod.DigitsNet(), 0.5

    monkeypatch.setattr(features_mod, "train_digits_classifier", quick)
    ext = features_mod.DigitsFeatures(seed=4)
    assert ext.path == tmp_path / "antdiff" / "digits_classifier_seed4.pt"
    assert ext.path.is_file() and trained == [4]
    again = features_mod.DigitsFeatures(seed=4)
    assert trained == [4] and again.name == ext.name and again.test_accuracy == 0.5


def test_training_the_digits_classifier_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    want = torch.rand(3)
    torch.manual_seed(123)
    features_mod.train_digits_classifier(seed=0, epochs=1)
    assert torch.equal(torch.rand(3), want)

"""antdiff.evaluate's own logic and `antdiff info`: gaps found by a mutation-testing pass.

Sampling is replaced by stand-ins where only the plumbing is under test (which settings reach
:func:`antdiff.sampling.sample`, what the record says); metric values are checked against the
independent float64 computations of test_evaluate on images drawn here.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_evaluate import _coverage, _frechet64, run_dir  # noqa: F401  (a fixture)

import antdiff.evaluate as ev
import antdiff.sampling
from antdiff import info
from antdiff.config import SampleConfig
from antdiff.metrics import DigitsFeatures, digits_images

pytestmark = pytest.mark.usefixtures("one_thread")


def _fake_loaded(*, conditional: bool = False, latent: bool = False, codec=None, sc=None):
    """A stand-in for :class:`antdiff.evaluate.Loaded` of a 1 x 2 x 2 image model."""
    return SimpleNamespace(
        model=torch.nn.Linear(1, 1),
        diffusion=None,
        data=SimpleNamespace(num_classes=4 if conditional else None, shape=(1, 2, 2), codec=codec),
        cfg=SimpleNamespace(
            data=SimpleNamespace(class_conditional=conditional), sample=sc or SampleConfig()
        ),
        latent=latent,
        path="fake",
    )


@pytest.fixture
def sample_spy(monkeypatch):
    """Replace antdiff.sampling.sample: record its keyword arguments, return ``value`` images
    (float64, to see the cast) of the requested shape."""
    calls: list[dict] = []
    state = {"value": 0.25}

    def fake_sample(model, diffusion, shape, **kw):  # noqa: ARG001
        calls.append(kw)
        return torch.full(shape, state["value"], dtype=torch.float64)

    monkeypatch.setattr(antdiff.sampling, "sample", fake_sample)
    return calls, state


# ------------------------------------------------------------------ load_for_sampling


def test_loaded_model_is_in_eval_mode_frozen_and_says_which_weights(run_dir):  # noqa: F811
    for ema in (True, False):
        loaded = ev.load_for_sampling(run_dir, ema=ema)
        assert loaded.ema is ema and loaded.step == 20 and not loaded.latent
        assert not any(m.training for m in loaded.model.modules())
        assert not any(p.requires_grad for p in loaded.model.parameters())
        assert loaded.path.is_file() and loaded.path.suffix == ".pt"


# ------------------------------------------------------------------ generate


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(num=0), r"num \(--num\) must be an integer >= 1, got 0"),
        (dict(num=True), r"num \(--num\) must be an integer >= 1, got True"),
        (dict(batch_size=0), r"batch_size \(--batch-size\) must be an integer >= 1, got 0"),
        (dict(steps=0), r"steps \(--steps\) must be an integer >= 1, got 0"),
        (dict(steps=2.0), r"steps \(--steps\) must be an integer >= 1, got 2.0"),
    ],
)
def test_generate_checks_its_counts(sample_spy, kw, match):
    calls, _ = sample_spy
    args = {"num": 3, "steps": 2, "batch_size": 2, **kw}
    with pytest.raises(ValueError, match=match):
        ev.generate(_fake_loaded(), args.pop("num"), progress=False, **args)
    assert not calls


def test_generate_takes_counts_of_one_and_numpy_integers(sample_spy):
    calls, _ = sample_spy
    x, _ = ev.generate(_fake_loaded(), 1, steps=1, batch_size=1, progress=False)
    assert x.shape == (1, 1, 2, 2)
    x, _ = ev.generate(_fake_loaded(), np.int64(3), steps=np.int32(1), batch_size=np.int64(2),
                       progress=False)  # fmt: skip
    assert x.shape == (3, 1, 2, 2) and len(calls) == 3


def test_generate_hands_the_sampler_the_run_s_settings_and_its_own(sample_spy):
    """cfg_channels / variance "run" take the run's sample config, anything else passes as
    given; each image's generator is seeded from (``seed``, its index); pixels are sampled
    clipped."""
    calls, _ = sample_spy
    sc = SampleConfig(sampler="ddpm", cfg_channels=1, variance="large", cfg_scale=2.0)
    loaded = _fake_loaded(conditional=True, sc=sc)
    ev.generate(loaded, 2, sampler="ddpm", steps=3, seed=11, cfg_scale=2.0, eta=0.0,
                spacing="trailing", progress=False)  # fmt: skip
    kw = calls[-1]
    assert (kw["cfg_channels"], kw["variance"], kw["clip_denoised"]) == (1, "large", True)
    want = ("ddpm", 3, "trailing", 2.0)
    assert (kw["sampler"], kw["steps"], kw["spacing"], kw["cfg_scale"]) == want
    seeds = [g.initial_seed() for g in antdiff.sampling.image_generators(11, 0, 2)]
    assert [g.initial_seed() for g in kw["generator"]] == seeds
    ev.generate(loaded, 2, sampler="ddpm", steps=3, cfg_scale=2.0, cfg_channels=None,
                variance="small", progress=False)  # fmt: skip
    assert (calls[-1]["cfg_channels"], calls[-1]["variance"]) == (None, "small")
    seeds = [g.initial_seed() for g in antdiff.sampling.image_generators(0, 0, 2)]
    assert [g.initial_seed() for g in calls[-1]["generator"]] == seeds
    # DDIM: no DDPM variance, whatever the run's
    ev.generate(loaded, 2, sampler="ddim", steps=3, progress=False)
    assert calls[-1]["variance"] is None


def test_generate_refuses_any_guidance_scale_on_an_unconditional_model(sample_spy):
    with pytest.raises(ValueError, match="cfg_scale=0.5 needs a class-conditional model"):
        ev.generate(_fake_loaded(), 2, steps=1, cfg_scale=0.5, progress=False)


def test_generate_returns_float32_pixels_clamped_to_the_unit_range(sample_spy):
    calls, state = sample_spy
    state["value"] = 3.0
    x, labels = ev.generate(_fake_loaded(), 3, steps=1, progress=False)
    assert x.dtype == torch.float32 and labels is None
    assert torch.equal(x, torch.ones(3, 1, 2, 2))
    state["value"] = -0.5  # in range: untouched
    x, _ = ev.generate(_fake_loaded(), 2, steps=1, progress=False)
    assert torch.equal(x, torch.full((2, 1, 2, 2), -0.5))


def test_generate_decodes_latents_and_clamps_the_decoded_images(sample_spy):
    """A latent run with a codec: latents sampled unclipped, decoded, the images clamped."""
    calls, state = sample_spy
    seen = []

    def decode(z):
        seen.append(z.clone())
        return 4.0 * z - 0.5  # 0.25 -> 0.5, 1.0 -> 3.5

    codec = SimpleNamespace(decode=decode)
    x, _ = ev.generate(_fake_loaded(latent=True, codec=codec), 2, steps=1, progress=False)
    assert calls[-1]["clip_denoised"] is False and len(seen) == 1
    assert x.dtype == torch.float32 and torch.equal(x, torch.full((2, 1, 2, 2), 0.5))
    state["value"] = 1.0
    x, _ = ev.generate(_fake_loaded(latent=True, codec=codec), 2, steps=1, progress=False)
    assert torch.equal(x, torch.ones(2, 1, 2, 2))
    # precomputed latents without a codec: returned as sampled, unclipped
    state["value"] = 3.0
    x, _ = ev.generate(_fake_loaded(latent=True), 2, steps=1, progress=False)
    assert calls[-1]["clip_denoised"] is False and torch.equal(x, torch.full((2, 1, 2, 2), 3.0))


def test_generate_progress_bar_counts_every_image_and_is_closed(sample_spy, monkeypatch):
    import tqdm.auto

    bars = []

    class Bar:
        def __init__(self, total, **kw):
            self.total, self.desc, self.n, self.closed = total, kw.get("desc"), 0, False
            bars.append(self)

        def update(self, n):
            self.n += n

        def close(self):
            self.closed = True

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    ev.generate(_fake_loaded(), 5, sampler="ddim", steps=2, batch_size=2, progress=True)
    assert len(bars) == 1 and (bars[0].total, bars[0].n, bars[0].closed) == (5, 5, True)
    assert bars[0].desc == "ddim-2"
    _, state = sample_spy
    state["value"] = float("nan")  # an error inside the loop still closes the bar
    with pytest.raises(ValueError, match="not finite"):
        ev.generate(_fake_loaded(), 5, steps=2, batch_size=2, progress=True)
    assert bars[-1].closed and bars[-1].n == 0


# ------------------------------------------------------------------ settings helpers


def test_ddpm_variance_and_its_record():
    from antdiff.diffusion import GaussianDiffusion
    from antdiff.schedules import make_schedule

    loaded = _fake_loaded(sc=SampleConfig(sampler="ddpm", variance="large"))
    assert ev.ddpm_variance(loaded, "ddpm") == "large"
    assert ev.ddpm_variance(loaded, "ddpm", None) is None  # None: the sampler's default
    assert ev.ddpm_variance(loaded, "ddpm", "small") == "small"
    assert ev.ddpm_variance(loaded, "ddim") is None
    loaded.diffusion = GaussianDiffusion(make_schedule("linear", 100))
    assert ev.variance_used(loaded, "ddpm") == "large"
    assert ev.variance_used(loaded, "ddpm", "small") == "small"
    assert ev.variance_used(loaded, "ddim") is None


def test_make_extractor_refuses_any_given_file_with_digits(tmp_path, monkeypatch):
    import antdiff.metrics

    built = []
    monkeypatch.setattr(antdiff.metrics, "DigitsFeatures", lambda **kw: built.append(kw))
    ev.make_extractor("digits", None, "cuda:1")
    assert built == [{"device": "cuda:1"}]  # the network goes where it is told
    monkeypatch.undo()
    with pytest.raises(ValueError, match="was given with features='digits'"):
        ev.make_extractor("digits", "")
    with pytest.raises(FileNotFoundError, match="inception-2015-12-05.pt"):
        ev.make_extractor("inception", tmp_path / "none.pt")
    with pytest.raises(ValueError, match=r"features must be one of \['digits', 'inception'"):
        ev.make_extractor("Digits")


# ------------------------------------------------------------------ reference images


def test_reference_range_check_bounds_and_rows():
    """Refused: floats whose first 256 images never go below -0.05 (the message says how
    many were looked at); only those rows count; integer pixels are not checked."""
    x = torch.rand(300, 1, 2, 2)
    x[0, 0, 0, 0] = -0.04
    with pytest.raises(ValueError, match=r"lowest value of its first 256 images is -0.040"):
        ev.check_reference_range(x, "r")
    x[0, 0, 0, 0] = -0.06
    ev.check_reference_range(x, "r")
    with pytest.raises(ValueError, match="images is -0.050"):  # the bound is refused
        ev.check_reference_range(torch.tensor([[[[-0.05, 0.5]]]], dtype=torch.float64), "r")
    nan = torch.rand(300, 1, 2, 2) * 2 - 1
    nan[100, 0, 1, 1] = float("nan")  # past the two rows check_images reads first
    with pytest.raises(ValueError, match="r: its first 256 images hold NaN or inf values"):
        ev.check_reference_range(nan, "r")
    y = torch.rand(300, 1, 2, 2)
    y[5, 0, 0, 0] = -1.0  # in the rows looked at: accepted
    ev.check_reference_range(y, "r")
    z = torch.rand(300, 1, 2, 2)
    z[280, 0, 0, 0] = -1.0  # past them: not looked at
    with pytest.raises(ValueError, match="r: the lowest value of its first 256 images"):
        ev.check_reference_range(z, "r")
    with pytest.raises(ValueError, match="its first 3 images"):
        ev.check_reference_range(torch.rand(3, 1, 2, 2), "r")
    ev.check_reference_range(torch.randint(0, 256, (4, 1, 2, 2), dtype=torch.uint8), "r")
    ev.check_reference_range(torch.randint(0, 256, (4, 1, 2, 2), dtype=torch.int16), "r")


def test_reference_images_names_files_by_stem_and_refuses_folders(tmp_path):
    x = np.random.default_rng(0).uniform(-1, 1, (4, 1, 2, 2)).astype(np.float32)
    np.save(tmp_path / "my.set.npy", x)
    label, got = ev.reference_images(tmp_path / "my.set.npy")
    assert label == "my.set" and np.array_equal(got.numpy(), x)
    assert ev.reference_images(str(tmp_path / "my.set.npy"))[0] == "my.set"
    label, got = ev.reference_images("digits-test")
    assert label == "digits-test" and torch.equal(got, digits_images("test")[0])
    (tmp_path / "folder.npy").mkdir()
    with pytest.raises(FileNotFoundError, match="is neither a known data set .* nor a file"):
        ev.reference_images(tmp_path / "folder.npy")


def test_image_file_errors(tmp_path):
    imgs = torch.zeros(5, 1, 2, 2)
    torch.save({"images": imgs}, tmp_path / "nox.pt")
    with pytest.raises(ValueError, match=r"--data .*nox.pt.*under 'x'.*got keys \['images'\]"):
        ev.load_image_file(tmp_path / "nox.pt", "--data")
    np.save(tmp_path / "three.npy", np.zeros((5, 2, 2), np.float32))
    with pytest.raises(ValueError, match=r"--ref .*three.npy.* must hold images .*got \(5, 2, 2\)"):
        ev.load_image_file(tmp_path / "three.npy", "--ref")
    np.save(tmp_path / "five.npy", np.zeros((5, 1, 1, 2, 2), np.float32))
    with pytest.raises(ValueError, match=r"got \(5, 1, 1, 2, 2\)"):
        ev.load_image_file(tmp_path / "five.npy", "--ref")
    torch.save([imgs], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="got list"):
        ev.load_image_file(tmp_path / "list.pt", "--ref")
    (tmp_path / "a.png").write_bytes(b"png")
    with pytest.raises(ValueError, match=r"--ref file must be .npy or .pt .*a.png"):
        ev.load_image_file(tmp_path / "a.png", "--ref")
    torch.save({"x": imgs, "y": [0, 1, 2, 3, 4]}, tmp_path / "ylist.pt")
    with pytest.raises(ValueError, match=r"labels 'y' must be a tensor \[N\] = \[5\]"):
        ev.load_image_file(tmp_path / "ylist.pt", "--data")


# ------------------------------------------------------------------ cached reference features


class _Counting:
    """A feature network stand-in: features = the flattened images, counted calls."""

    name, dim, device, channels = "flat", 4, torch.device("cpu"), (1, 3)

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, x: torch.Tensor) -> np.ndarray:
        self.calls += 1
        return np.asarray(x, dtype=np.float64).reshape(len(x), -1)


def test_real_features_are_cached_per_data_and_network(tmp_path):
    from antdiff.metrics.reference_stats import cache_path, data_hash

    ext = _Counting()
    a, b = torch.rand(6, 1, 2, 2), torch.rand(6, 1, 2, 2)
    fa = ev._real_features("ref", a, ext, tmp_path)
    np.testing.assert_array_equal(fa, a.reshape(6, -1).numpy())
    path = cache_path("ref", ext.name, data_hash(a), tmp_path / "features")
    assert path.is_file() and ext.calls == 1
    np.testing.assert_array_equal(ev._real_features("ref", a, ext, tmp_path), fa)
    assert ext.calls == 1  # read back, not recomputed
    fb = ev._real_features("ref", b, ext, tmp_path)  # same label, other images
    assert ext.calls == 2 and np.array_equal(fb, b.reshape(6, -1).numpy())
    # a file there of another network (or another data hash) is not used
    np.savez(path, features=np.zeros((6, 4)), extractor=np.str_("other"),
             data_sha256=np.str_(data_hash(a)))  # fmt: skip
    np.testing.assert_array_equal(ev._real_features("ref", a, ext, tmp_path), fa)
    assert ext.calls == 3
    np.savez(path, features=np.zeros((6, 4)), extractor=np.str_(ext.name),
             data_sha256=np.str_("0" * 64))  # fmt: skip
    np.testing.assert_array_equal(ev._real_features("ref", a, ext, tmp_path), fa)
    assert ext.calls == 4
    path.write_bytes(b"PK\x03\x04 truncated")  # a corrupt file: recomputed and rewritten
    np.testing.assert_array_equal(ev._real_features("ref", a, ext, tmp_path), fa)
    assert ext.calls == 5
    with np.load(path) as z:
        assert str(z["extractor"]) == ext.name and np.array_equal(z["features"], fa)
    assert not list(path.parent.glob(".*.tmp"))


# ------------------------------------------------------------------ score


def test_score_k_reference_label_and_values(tmp_path):
    """score() against a reference file: FID and precision / recall with the given k equal
    independent float64 computations; the record names the file's stem and k."""
    imgs = digits_images("all")[0]
    np.save(tmp_path / "refs.npy", imgs[:300].numpy())
    fake = imgs[300:400]
    ext = DigitsFeatures()
    res = ev.score(fake, ext, tmp_path / "refs.npy", k=5, cache_dir=tmp_path / "c")
    assert (res["k"], res["reference"]) == (5, "refs")
    f_real, f_fake = ext(imgs[:300]), ext(fake)
    assert res["fid"] == pytest.approx(_frechet64(f_real, f_fake), rel=1e-5, abs=1e-6)
    assert res["precision"] == pytest.approx(_coverage(f_real, f_fake, 5), abs=1e-9)
    assert res["recall"] == pytest.approx(_coverage(f_fake, f_real, 5), abs=1e-9)
    assert _coverage(f_fake, f_real, 5) != _coverage(f_fake, f_real, 3)  # k tells
    # the same with the features handed over
    res2 = ev.score(None, ext, tmp_path / "refs.npy", k=5, cache_dir=tmp_path / "c",
                    fake_features=f_fake)  # fmt: skip
    assert (res2["fid"], res2["precision"], res2["recall"]) == (res["fid"], res["precision"],
                                                                res["recall"])  # fmt: skip


def test_score_refuses_unit_range_references_and_caches_by_default(tmp_path, monkeypatch):
    import antdiff.metrics.features as features

    ext = DigitsFeatures()  # its weights from the usual cache, before it moves
    unit = np.random.default_rng(0).random((100, 1, 8, 8), dtype=np.float32)
    np.save(tmp_path / "unit.npy", unit)
    with pytest.raises(ValueError, match=r"look like floats in \[0, 1\]"):
        ev.score(torch.zeros(70, 1, 8, 8), ext, tmp_path / "unit.npy", cache_dir=tmp_path)
    monkeypatch.setattr(features, "default_cache_dir", lambda: tmp_path / "home")
    np.save(tmp_path / "ok.npy", 2 * unit - 1)
    ev.score(2 * torch.rand(70, 1, 8, 8) - 1, ext, tmp_path / "ok.npy")
    cached = sorted(p.relative_to(tmp_path / "home").parts[0]
                    for p in (tmp_path / "home").rglob("*.npz"))  # fmt: skip
    assert cached and set(cached) == {"reference_stats"}


# ------------------------------------------------------------------ evaluate_checkpoint


def _spy_eval(monkeypatch, *, delay: float = 0.0):
    """evaluate_checkpoint with generate() replaced: its keyword arguments recorded and fixed
    images (seeded) handed to on_batch in batches of batch_size; make_extractor recorded and
    answered with the digits network, slowed by ``delay`` s a call."""
    seen: dict = {}

    def fake_generate(loaded, num, **kw):
        seen["generate"] = (loaded, num, kw)
        x = 2 * torch.rand(num, *loaded.data.shape, generator=torch.Generator().manual_seed(1)) - 1
        for s in range(0, num, kw["batch_size"]):
            kw["on_batch"](x[s : s + kw["batch_size"]])
        seen["images"] = x
        return None, None

    digits = DigitsFeatures()

    class Slow(DigitsFeatures):
        def __call__(self, x):
            time.sleep(delay)
            return super().__call__(x)

    def fake_make_extractor(features, inception=None, device=None):
        seen["extractor"] = (features, inception, device)
        return Slow()

    monkeypatch.setattr(ev, "generate", fake_generate)
    monkeypatch.setattr(ev, "make_extractor", fake_make_extractor)
    return seen, digits


def test_eval_hands_generate_and_the_record_every_setting(run_dir, tmp_path, monkeypatch):  # noqa: F811
    seen, _ = _spy_eval(monkeypatch)
    res = ev.evaluate_checkpoint(
        run_dir, 70, sampler="ddpm", steps=3, cfg_scale=2.5, seed=9, ema=False,
        features="inception", inception=None, k=4, batch_size=32, progress=False,
        cache_dir=tmp_path, device="cpu", spacing="trailing", eta=0.0, cfg_channels=2,
        variance="large",
    )  # fmt: skip
    loaded, num, kw = seen["generate"]
    assert num == 70 and loaded.ema is False
    want = dict(sampler="ddpm", steps=3, cfg_scale=2.5, seed=9, batch_size=32, progress=False,
                spacing="trailing", eta=0.0, cfg_channels=2, variance="large")  # fmt: skip
    assert {key: kw[key] for key in want} == want
    assert seen["extractor"] == ("inception", None, "cpu")
    ckpt = ev.load_for_sampling(run_dir).path
    assert res["ckpt"] == str(ckpt) and res["ckpt"].endswith(".pt") and res["step"] == 20
    record = dict(features_key="inception", weights="raw", sampler="ddpm", steps=3,
                  spacing="trailing", eta=0.0, num=70, seed=9, cfg_scale=2.5, cfg_channels=2,
                  variance="large", batch_size=32, model="adm-tiny", method="uw",
                  clustering="snr", k_clusters=5, train_seed=0, k=4,
                  reference="digits")  # fmt: skip
    assert {key: res[key] for key in record} == record
    # its cfg_channels (None: all), cfg_scale, steps are those of the run where unset
    seen2, _ = _spy_eval(monkeypatch)
    res = ev.evaluate_checkpoint(run_dir, 70, batch_size=70, progress=False, cache_dir=tmp_path)
    kw = seen2["generate"][2]
    run_own = ("ddim", 5, 1.0, None)  # the run's sample.* (its sample.steps is 5)
    assert (kw["sampler"], kw["steps"], kw["cfg_scale"], kw["cfg_channels"]) == run_own
    assert (res["variance"], res["weights"], res["batch_size"]) == (None, "ema", 70)


def test_eval_scores_the_features_of_every_batch(run_dir, tmp_path, monkeypatch):  # noqa: F811
    """The metrics are those of all the images handed over (3 batches of 32, 32, 6), and the
    feature time inside the sampling loop counts as metrics time, not sampling."""
    seen, digits = _spy_eval(monkeypatch, delay=0.2)
    res = ev.evaluate_checkpoint(run_dir, 70, batch_size=32, progress=False, cache_dir=tmp_path)
    f_fake, f_real = digits(seen["images"]), digits(digits_images("all")[0])
    assert res["fid"] == pytest.approx(_frechet64(f_real, f_fake), rel=1e-5, abs=1e-6)
    assert res["precision"] == pytest.approx(_coverage(f_real, f_fake, 3), abs=1e-9)
    assert res["seconds_sampling"] < 0.3 <= 0.6 <= res["seconds_metrics"]


def test_eval_samples_batch_by_batch_as_generate_does(run_dir, tmp_path):  # noqa: F811
    """The seed fixes the samples: eval's metrics equal those of generate() with the same batch
    size (32: three batches) and, up to float rounding, with one batch; another seed differs."""
    res = ev.evaluate_checkpoint(run_dir, 70, steps=2, seed=5, batch_size=32, progress=False,
                                 cache_dir=tmp_path)  # fmt: skip
    loaded = ev.load_for_sampling(run_dir)
    x, _ = ev.generate(loaded, 70, steps=2, seed=5, batch_size=32, progress=False)
    want = ev.score(x, DigitsFeatures(), "digits", cache_dir=tmp_path)
    assert res["fid"] == pytest.approx(want["fid"], rel=1e-9)
    x1, _ = ev.generate(loaded, 70, steps=2, seed=5, batch_size=70, progress=False)
    torch.testing.assert_close(x1, x, atol=1e-5, rtol=0)
    x2, _ = ev.generate(loaded, 70, steps=2, seed=6, batch_size=32, progress=False)
    assert float((x2 - x).abs().max()) > 0.1


def _fake_run(monkeypatch, *, channels: int = 1, source: str = "folder", size: int = 8):
    """load_for_sampling answering a pixel run of ``channels`` x 8 x 8 from ``source``."""
    loaded = SimpleNamespace(
        latent=False,
        data=SimpleNamespace(shape=(channels, 8, 8), codec=None),
        cfg=SimpleNamespace(data=SimpleNamespace(image_size=size, source=source)),
    )
    monkeypatch.setattr(ev, "load_for_sampling", lambda *a, **k: loaded)
    monkeypatch.setattr(ev, "generate", lambda *a, **k: pytest.fail("sampled first"))


def test_eval_refuses_a_run_of_other_channels_before_sampling(tmp_path, monkeypatch):
    _fake_run(monkeypatch, channels=2)
    with pytest.raises(ValueError, match=r"run makes 2-channel images; .* takes \(1, 3\) channels"):
        ev.evaluate_checkpoint(tmp_path / "run", 70, progress=False)


def test_eval_size_hint_only_for_digits_runs(tmp_path, monkeypatch):
    torch.save(torch.zeros(70, 1, 4, 4) - 1, tmp_path / "small.pt")
    _fake_run(monkeypatch, source="folder")
    with pytest.raises(ValueError, match=r"shape \[1, 4, 4\], .* makes \[1, 8, 8\]") as e:
        ev.evaluate_checkpoint(tmp_path / "run", 70, ref=tmp_path / "small.pt")
    assert "load_digits_tensor" not in str(e.value)
    _fake_run(monkeypatch, source="digits")
    with pytest.raises(ValueError, match=r"load_digits_tensor\(8\)\[0\] for digits"):
        ev.evaluate_checkpoint(tmp_path / "run", 70, ref=tmp_path / "small.pt")


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ((-1.0, 3.0), r"images must be floats in \[-1, 1\]; got values in \[-1.0, 3.0\]"),
        ((-1.0, float("nan")), r"images must be floats in .* got values in \[nan, nan\]"),
    ],
)
def test_eval_checks_the_reference_values_before_loading(tmp_path, monkeypatch, values, match):
    """Floats far outside [-1, 1] (or NaN) that still reach below 0 are refused by the feature
    network's own check, before the checkpoint is read."""
    monkeypatch.setattr(ev, "load_for_sampling", lambda *a, **k: pytest.fail("loaded"))
    x = np.full((70, 1, 8, 8), values[0], np.float32)
    x[0, 0, 0, 0] = values[1]
    np.save(tmp_path / "r.npy", x)
    with pytest.raises(ValueError, match=r"--ref .*r.npy: " + match + r"\. Reference images"):
        ev.evaluate_checkpoint(tmp_path / "run", 70, ref=tmp_path / "r.npy")
    ints = np.zeros((70, 1, 8, 8), np.int64)
    np.save(tmp_path / "i.npy", ints)
    with pytest.raises(ValueError, match=r"i.npy: images must be floats .* got dtype torch.int64"):
        ev.evaluate_checkpoint(tmp_path / "run", 70, ref=tmp_path / "i.npy")


def test_eval_k_bound_is_one_below_the_sample_counts(tmp_path, monkeypatch):
    """k = num - 1 neighbours are enough (the check passes on to the checkpoint)."""
    monkeypatch.setattr(ev, "load_for_sampling", lambda *a, **k: pytest.fail("loaded"))
    with pytest.raises(pytest.fail.Exception, match="loaded"):
        ev.evaluate_checkpoint(tmp_path / "run", 70, k=69)
    with pytest.raises(ValueError, match="--k 70 neighbours need at least 71 samples"):
        ev.evaluate_checkpoint(tmp_path / "run", 70, k=70)


# ------------------------------------------------------------------ antdiff info


def test_info_versions_and_import_failures(tmp_path, monkeypatch):
    (tmp_path / "antdiff_broken_mod.py").write_text("raise RuntimeError('boom')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert info._version("antdiff_broken_mod") == "not available (RuntimeError: boom)"
    missing = "not available (ModuleNotFoundError: No module named 'antdiff_no_such_mod'"
    assert info._version("antdiff_no_such_mod").startswith(missing)
    assert info._version("antdiff.info") == "installed"  # no __version__
    assert info._version("numpy") == np.__version__


def test_info_collect_fields(monkeypatch):
    import antdiff.interval_dp as interval_dp

    monkeypatch.setenv("ANT_INCEPTION", "/x/inception.pt")
    for k in info.ENV_VARS:
        if k not in ("ANT_INCEPTION", "ANT_REQUIRE_CPP", "TRITON_INTERPRET",
                     "ANT_KERNELS_BACKEND"):  # fmt: skip
            monkeypatch.delenv(k, raising=False)
    d = info.collect()
    assert d["python"] == platform.python_version()
    assert d["ANT_INCEPTION"] == "/x/inception.pt" and d["ANT_DIST_TIMEOUT"] == "(unset)"
    assert set(info.ENV_VARS) <= set(d)

    def gone():
        raise ImportError("no _C here")

    monkeypatch.setattr(interval_dp, "import_extension", gone)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: f"GPU{i}")
    d = info.collect()
    assert d["antdiff._C"] == f"NOT usable (no _C here); {interval_dp.BUILD_HINT}"
    assert d["cuda"] == f"{torch.version.cuda}, devices: GPU0, GPU1"


def test_info_flags_an_invalid_kernels_backend(monkeypatch):
    """A bad ANT_KERNELS_BACKEND fails the first kernel call of a run: info says so."""
    monkeypatch.setenv("ANT_KERNELS_BACKEND", "tritonn")
    assert info.collect()["ANT_KERNELS_BACKEND"] == (
        "tritonn  (NOT valid: use one of auto, triton, torch)")  # fmt: skip
    for ok in ("Torch", "auto", ""):
        monkeypatch.setenv("ANT_KERNELS_BACKEND", ok)
        assert info.collect()["ANT_KERNELS_BACKEND"] == ok


def test_info_survives_a_kernels_package_that_fails_to_import(monkeypatch):
    """`antdiff info` is the diagnostic for a broken install: a Triton that raises on import
    (not only ImportError) leaves the backend's value unflagged, not a traceback."""
    import builtins

    real = builtins.__import__

    def broken(name, *a, **k):
        if name.startswith("ant_kernels"):
            raise RuntimeError("triton: bad driver")
        return real(name, *a, **k)

    monkeypatch.setenv("ANT_KERNELS_BACKEND", "tritonn")
    monkeypatch.setattr(builtins, "__import__", broken)
    assert info.collect()["ANT_KERNELS_BACKEND"] == "tritonn"


def test_info_shows_the_memory_a_run_can_use(monkeypatch):
    """The memory the interval DP and affinity check against, and the container's limit when
    one caps it (/proc/meminfo shows a container the host's memory)."""
    from antdiff import utils

    monkeypatch.setattr(utils, "available_host_bytes", lambda: 3 * 2**30)
    monkeypatch.setattr(utils, "cgroup_free_bytes", lambda: None)
    assert info.collect()["host memory"] == "3.0 GiB available"
    monkeypatch.setattr(utils, "cgroup_free_bytes", lambda: 2**29)
    assert info.collect()["host memory"] == (
        "3.0 GiB available (the memory cgroup's limit leaves 0.5 GiB)")  # fmt: skip


def test_info_main_prints_an_aligned_table(capsys):
    d = info.collect()
    info.main()
    lines = capsys.readouterr().out.splitlines()
    width = max(map(len, d))
    assert len(lines) == len(d)
    for line, (k, v) in zip(lines, d.items()):
        assert line == f"{k.ljust(width)}  {v}"
    assert json.dumps(d)  # plain strings


# ------------------------------------------------------------------ latent runs


def test_eval_refuses_a_reference_of_another_size_for_a_latent_run(tmp_path, monkeypatch):
    """A digits_ldm run decodes to 8x8 images; 16x16 references are refused for a pixel run
    (the features of different sizes do not compare), and must be for a latent run too."""
    from antdiff.config import load_config
    from antdiff.data import load_digits_tensor
    from antdiff.train import train

    train(load_config("digits_ldm", [
        "--train.steps", "1", "--train.batch_size", "8", "--train.ckpt_every", "1",
        "--data.autoencoder_steps", "2", "--train.progress", "false", "--sample.n", "2",
        "--sample.steps", "1", "--train.out_dir", str(tmp_path / "run")]))  # fmt: skip
    x, _ = ev.generate(ev.load_for_sampling(tmp_path / "run"), 1, steps=1, progress=False)
    assert x.shape == (1, 1, 8, 8)  # what the run makes
    torch.save(load_digits_tensor(16)[0], tmp_path / "digits16.pt")

    def sampled(*a, **k):
        raise AssertionError("sampled before the reference's size was checked")

    monkeypatch.setattr(ev, "generate", sampled)
    with pytest.raises(ValueError, match=r"holds images of shape \[1, 16, 16\]"):
        ev.evaluate_checkpoint(tmp_path / "run", 100, ref=tmp_path / "digits16.pt",
                               progress=False)  # fmt: skip


def test_score_refuses_fake_images_of_another_size_than_the_references(tmp_path):
    """score() compared 16x16 samples with 8x8 references without a word (the network resizes
    both); evaluate_checkpoint refuses that, and so does score now, before any feature."""
    ref = 2 * np.random.default_rng(0).random((40, 1, 8, 8), dtype=np.float32) - 1
    np.save(tmp_path / "ref.npy", ref)
    with pytest.raises(ValueError, match=r"fake images of shape \[1, 16, 16\] against references "
                       r"of shape \[1, 8, 8\]"):  # fmt: skip
        ev.score(torch.zeros(40, 1, 16, 16), DigitsFeatures(), tmp_path / "ref.npy",
                 cache_dir=tmp_path)  # fmt: skip


def test_a_path_named_like_a_data_set_says_to_pass_the_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="for the known data set pass its name as a str"):
        ev.reference_images(Path("digits"))
    assert ev.reference_images("digits")[0] == "digits"


@pytest.mark.parametrize(
    ("sampler", "variance", "match"),
    [
        ("ddim", "large", r"variance='large' applies to sampler='ddpm', not 'ddim'"),
        ("ddpm", "wide", r"variance='wide' is not valid"),
    ],
)
def test_eval_refuses_a_variance_its_sampler_cannot_take_before_sampling(
    run_dir, tmp_path, monkeypatch, sampler, variance, match  # noqa: F811
):
    """Refused inside sample(), once the progress bar had started; now with the other
    settings, before any image is drawn."""

    def sampled(*a, **k):
        raise AssertionError("sampled before the variance was checked")

    monkeypatch.setattr(ev, "generate", sampled)
    with pytest.raises(ValueError, match=match):
        ev.evaluate_checkpoint(run_dir, 70, sampler=sampler, steps=3, variance=variance,
                               progress=False, cache_dir=tmp_path)  # fmt: skip

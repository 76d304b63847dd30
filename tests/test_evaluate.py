"""antdiff sample / antdiff eval and antdiff.evaluate on a 20-step digits run trained once here.

The metric values are checked against independent float64 computations (scipy's sqrtm for the
Frechet distance, brute-force k-NN balls for precision / recall) on the very samples that
``antdiff sample`` writes with the same seed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from antdiff.checkpoint import load_checkpoint
from antdiff.cli import main
from antdiff.config import load_config
from antdiff.evaluate import generate, load_for_sampling
from antdiff.metrics import DIGITS_NAME, DigitsFeatures, digits_images
from antdiff.train import train

FAST = ["--steps", "10", "--no-progress"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> Path:
    out = tmp_path_factory.mktemp("digits_run")
    overrides = [
        *("--train.steps", "20", "--train.batch_size", "16", "--train.ckpt_every", "20"),
        *("--train.out_dir", str(out), "--train.progress", "false", "--sample.n", "4"),
        *("--sample.steps", "5", "--train.ema_decay", "0.9"),
    ]
    train(load_config("digits_adm", overrides))
    return out


def _sample(run_dir: Path, out: Path, *extra: str, num: int = 12) -> np.ndarray:
    argv = ["sample", "--ckpt", str(run_dir), "--num", str(num), *FAST, "--out", str(out)]
    assert main([*argv, *extra]) == 0
    return np.load(out / "samples.npy")


def test_sample_writes_grid_array_and_settings(run_dir: Path, tmp_path: Path) -> None:
    x = _sample(run_dir, tmp_path / "s", "--seed", "3", "--batch-size", "5")
    assert x.shape == (12, 1, 8, 8) and x.dtype == np.float32
    assert np.all(np.abs(x) <= 1.0) and np.isfinite(x).all()
    png = tmp_path / "s" / "samples.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    meta = json.loads((tmp_path / "s" / "sample.json").read_text())
    assert meta["step"] == 20 and meta["weights"] == "ema" and meta["seed"] == 3
    assert meta["num"] == 12 and meta["sampler"] == "ddim" and meta["steps"] == 10
    assert not list((tmp_path / "s").glob(".*.tmp"))  # atomic writes leave no temp files


def test_sample_pt_format(run_dir: Path, tmp_path: Path) -> None:
    rc = main(["sample", "--ckpt", str(run_dir), "--num", "3", *FAST, "--format", "pt",
               "--out", str(tmp_path)])  # fmt: skip
    assert rc == 0
    blob = torch.load(tmp_path / "samples.pt", weights_only=True)
    assert blob["x"].shape == (3, 1, 8, 8)
    # the same --out in the other format: no samples of the earlier run are left beside them;
    # a labels.npy the earlier run's sample.json does not list is not its own: it stays
    (tmp_path / "labels.npy").write_bytes(b"the user's own")
    (tmp_path / "notes.txt").write_text("mine")
    x = _sample(run_dir, tmp_path, num=2)
    assert x.shape == (2, 1, 8, 8)
    assert sorted(f.name for f in tmp_path.iterdir()) == [
        "labels.npy", "notes.txt", "sample.json", "samples.npy", "samples.png"]  # fmt: skip
    assert json.loads((tmp_path / "sample.json").read_text())["files"] == [
        "samples.png", "samples.npy"]  # fmt: skip
    # a sample.json written before every file was listed (no "spacing"): its run's labels.npy
    meta = json.loads((tmp_path / "sample.json").read_text())
    del meta["spacing"]
    (tmp_path / "sample.json").write_text(json.dumps(meta))
    _sample(run_dir, tmp_path, num=2)
    assert not (tmp_path / "labels.npy").exists()
    # a folder no sample run wrote keeps its files, whatever their names
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "samples.pt").write_bytes(b"the user's own")
    _sample(run_dir, mine, num=2)
    assert (mine / "samples.pt").read_bytes() == b"the user's own"


def test_an_interrupted_sample_run_never_leaves_two_runs_mixed(
    run_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    """A rerun into the same --out stopped while writing samples.npy left the new grid beside
    the old samples and the old sample.json (seed 1 claimed, seed 2's grid)."""
    import antdiff.utils as utils

    out = tmp_path / "g"
    _sample(run_dir, out, "--seed", "1", num=3)
    real = utils.atomic_write

    def stop_at_the_array(path, write):
        if Path(path).name == "samples.npy":
            raise KeyboardInterrupt
        return real(path, write)

    monkeypatch.setattr(utils, "atomic_write", stop_at_the_array)
    assert main(["sample", "--ckpt", str(run_dir), "--num", "3", *FAST, "--seed", "2",
                 "--out", str(out)]) == 130  # interrupted  # fmt: skip
    assert not (out / "sample.json").exists() and not (out / "samples.npy").exists()
    assert main(["sample", "--ckpt", str(run_dir), "--num", "3", *FAST, "--grid", "0", "--out",
                 str(tmp_path / "h")]) == 2  # fmt: skip


def test_sample_spacing_and_eta_reach_the_sampler(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """--spacing leading (guided-diffusion's ddimN timesteps) and --eta change the samples and
    are recorded; a bad eta is refused before anything is written."""
    base = _sample(run_dir, tmp_path / "a", "--seed", "1", num=4)
    lead = _sample(run_dir, tmp_path / "b", "--seed", "1", "--spacing", "leading", num=4)
    noisy = _sample(run_dir, tmp_path / "c", "--seed", "1", "--eta", "1.0", num=4)
    assert np.abs(base - lead).max() > 1e-3 and np.abs(base - noisy).max() > 1e-3
    meta = json.loads((tmp_path / "b" / "sample.json").read_text())
    assert (meta["spacing"], meta["eta"]) == ("leading", 0.0)
    err = _err(capsys, ["sample", "--ckpt", str(run_dir), "--num", "2", *FAST, "--eta", "2",
                        "--out", str(tmp_path / "d")])  # fmt: skip
    assert "eta must be in [0, 1]" in err and not (tmp_path / "d").exists()


def test_seeded_sampling_is_deterministic(run_dir: Path, tmp_path: Path) -> None:
    a = _sample(run_dir, tmp_path / "a", "--seed", "7")
    b = _sample(run_dir, tmp_path / "b", "--seed", "7")
    c = _sample(run_dir, tmp_path / "c", "--seed", "8")
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3


def test_ema_and_raw_weights_differ(run_dir: Path, tmp_path: Path) -> None:
    state, _ = load_checkpoint(run_dir)
    ema, raw = load_for_sampling(run_dir), load_for_sampling(run_dir, ema=False)
    for name, p in ema.model.state_dict().items():
        torch.testing.assert_close(p, state["ema"][name], rtol=0, atol=0)
    for name, p in raw.model.state_dict().items():
        torch.testing.assert_close(p, state["model"][name], rtol=0, atol=0)
    a = _sample(run_dir, tmp_path / "ema", "--ema")
    b = _sample(run_dir, tmp_path / "raw", "--no-ema")
    assert np.abs(a - b).max() > 1e-3


def test_generate_batches_match_one_batch_per_seed(run_dir: Path) -> None:
    loaded = load_for_sampling(run_dir)
    x, y = generate(loaded, 6, steps=5, seed=1, batch_size=6, progress=False)
    x2, _ = generate(loaded, 6, steps=5, seed=1, batch_size=6, progress=False)
    assert y is None and x.shape == (6, 1, 8, 8)
    torch.testing.assert_close(x, x2, rtol=0, atol=0)
    seen: list[torch.Tensor] = []  # handed over batch by batch, not kept (eval's features)
    kept, _ = generate(loaded, 6, steps=5, seed=1, batch_size=4, progress=False,
                       on_batch=seen.append)  # fmt: skip
    assert kept is None and [len(b) for b in seen] == [4, 2]
    x4, _ = generate(loaded, 6, steps=5, seed=1, batch_size=4, progress=False)
    torch.testing.assert_close(torch.cat(seen), x4, rtol=0, atol=0)


def test_samples_of_diverged_weights_are_an_error(run_dir: Path) -> None:
    """A model whose weights hold NaN wrote NaN samples without a word (sample) or failed with
    "images must be floats in [-1, 1]; got values in [nan, nan]" (eval)."""
    loaded = load_for_sampling(run_dir)
    with torch.no_grad():
        next(loaded.model.parameters()).fill_(float("nan"))
    with pytest.raises(ValueError, match="samples are not finite.*diverged.*lower train.lr"):
        generate(loaded, 2, steps=2, progress=False)


def test_eval_keeps_features_not_images(run_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """eval hands each batch of samples to the feature network and keeps only the features
    (50,000 RGB samples at 256 px would be 39 GB as float32 images)."""
    import antdiff.evaluate as ev

    real_generate = ev.generate
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs.get("on_batch"))
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(ev, "generate", spy)
    res = ev.evaluate_checkpoint(run_dir, 70, steps=2, batch_size=32, progress=False,
                                 cache_dir=tmp_path / "cache")  # fmt: skip
    assert calls and calls[0] is not None and res["n_fake"] == 70


def _frechet64(a: np.ndarray, b: np.ndarray) -> float:
    from scipy import linalg

    m1, m2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def _coverage(support: np.ndarray, queries: np.ndarray, k: int) -> float:
    """Fraction of queries inside some support point's k-NN ball (float64, scipy distances)."""
    from scipy.spatial.distance import cdist

    radii = np.sort(cdist(support, support, "sqeuclidean"), axis=1)[:, k]  # [:, 0] is itself
    d_qs = cdist(queries, support, "sqeuclidean")
    return float((d_qs <= radii[None]).any(axis=1).mean())


def test_eval_json_matches_independent_metrics(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval.json"
    rc = main(["eval", "--ckpt", str(run_dir), "--num", "100", *FAST, "--seed", "4",
               "--features", "digits", "--ref", "digits", "--cache-dir", str(tmp_path / "cache"),
               "--json", str(out)])  # fmt: skip
    assert rc == 0
    res = json.loads(out.read_text())
    for key in ("fid", "precision", "recall", "ckpt", "step", "sampler", "steps", "num", "seed"):
        assert key in res
    assert res["features"].startswith(DIGITS_NAME) and res["dim"] == 64 and res["k"] == 3
    assert (res["step"], res["num"], res["seed"], res["steps"]) == (20, 100, 4, 10)
    assert res["n_real"] == 1797 and res["weights"] == "ema"
    fake = _sample(run_dir, tmp_path / "s", "--seed", "4", num=100)
    ext = DigitsFeatures()
    f_real, f_fake = ext(digits_images("all")[0]), ext(torch.from_numpy(fake))
    assert res["fid"] == pytest.approx(_frechet64(f_real, f_fake), rel=1e-5, abs=1e-6)
    assert res["precision"] == pytest.approx(_coverage(f_real, f_fake, 3), abs=1e-9)
    assert res["recall"] == pytest.approx(_coverage(f_fake, f_real, 3), abs=1e-9)
    assert list((tmp_path / "cache").rglob("*.npz"))  # reference statistics were cached


def _err(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


def test_errors(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    j = ["--json", str(tmp_path / "e.json")]
    missing = str(tmp_path / "nope")
    assert "does not exist" in _err(capsys, ["eval", "--ckpt", missing, "--num", "99", *j])
    assert "--num must be >= 1" in _err(capsys, ["sample", "--ckpt", str(run_dir), "--num", "0",
                                                 "--out", str(tmp_path)])  # fmt: skip
    ck = ["eval", "--ckpt", str(run_dir), *FAST, *j]
    assert "features must be one of" in _err(capsys, [*ck, "--num", "5", "--features", "vgg"])
    err = _err(capsys, [*ck, "--num", "5", "--features", "inception",
                        "--inception", str(tmp_path / "inception.pt")])  # fmt: skip
    assert "not found" in err and "inception-2015-12-05.pt" in err
    err = _err(capsys, [*ck, "--num", "70", "--features", "digits",  # the file was ignored
                        "--inception", str(tmp_path / "inception.pt")])  # fmt: skip
    assert "features='digits', which uses its own network: drop --inception" in err
    err = _err(capsys, [*ck, "--num", "20"])
    assert "rank-deficient" in err and "at least 65 samples" in err
    assert "allow_rank_deficient" not in err  # an argument of the API the CLI does not have
    assert not (tmp_path / "e.json").exists()


def test_cuda_device_without_cuda_is_a_clear_error(monkeypatch) -> None:
    from antdiff.cli.sample import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="--device cuda:1: CUDA is not available here"):
        pick_device("cuda:1")
    assert pick_device(None) == "cpu" and pick_device("cpu") == "cpu"


def test_latent_run_is_decoded(tmp_path: Path) -> None:
    overrides = [
        *("--train.steps", "2", "--train.batch_size", "8", "--train.ckpt_every", "2"),
        *("--data.autoencoder_steps", "3", "--train.progress", "false", "--sample.n", "2"),
        *("--sample.steps", "2", "--train.out_dir", str(tmp_path / "run")),
    ]
    train(load_config("digits_ldm", overrides))
    loaded = load_for_sampling(tmp_path / "run")
    assert loaded.latent and tuple(loaded.data.shape) != (1, 8, 8)
    x, _ = generate(loaded, 3, steps=2, progress=False)
    assert x.shape == (3, 1, 8, 8) and float(x.abs().max()) <= 1.0


def test_eval_k_is_checked_before_sampling(tmp_path: Path) -> None:
    """k neighbours need k + 1 samples: refused before the checkpoint is even read."""
    from antdiff.evaluate import evaluate_checkpoint

    with pytest.raises(ValueError, match="--k 150 neighbours need at least 151 samples"):
        evaluate_checkpoint(tmp_path / "no_such_run", 100, k=150)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(k=0), r"k \(--k\) must be an integer >= 1, got 0"),
        (dict(k=-1), "must be an integer >= 1, got -1"),
        (dict(k=2.5), "must be an integer >= 1, got 2.5"),
        (dict(k=True), "must be an integer >= 1, got True"),  # a bool is not a count
        (dict(k=100), "--k 100 neighbours need at least 101 samples; got --num 100"),
        (dict(ref="few.npy"), "--ref .*few.npy: 3 samples of 64-dim features"),
        (dict(ref="many.npy", k=80), "--k 80 neighbours need at least 81 samples; got --ref"),
        # the file's own shape (not that of the rows checked), and the transpose that fixes it
        (dict(ref="nhwc.npy"), r"--ref .*nhwc.npy holds an array of shape \(70, 8, 8, 1\): "
         r"images must be \[N, C, H, W\] .* C in .*channels-last.*\(0, 3, 1, 2\)"),
        (dict(ref="pixels.npy"), "--ref .*pixels.npy: .*far outside|--ref .*pixels.npy: .*-1, 1"),
        (dict(ref="unit.npy"), r"--ref .*unit.npy: .*look like floats in \[0, 1\].*2 \* x - 1"),
    ],
)
def test_eval_bad_k_and_small_reference_fail_before_sampling(tmp_path: Path, kw, match) -> None:
    """k and the reference set's size are checked before the checkpoint is read (they failed
    only after every sample was drawn)."""
    from antdiff.evaluate import evaluate_checkpoint

    np.save(tmp_path / "few.npy", np.zeros((3, 1, 8, 8), np.float32))
    np.save(tmp_path / "many.npy", np.zeros((70, 1, 8, 8), np.float32))
    np.save(tmp_path / "nhwc.npy", np.zeros((70, 8, 8, 1), np.float32))  # channels last
    np.save(tmp_path / "pixels.npy", np.full((70, 1, 8, 8), 255.0, np.float32))  # [0, 255]
    unit = np.random.default_rng(0).random((70, 1, 8, 8), dtype=np.float32)  # [0, 1]: passed
    np.save(tmp_path / "unit.npy", unit)
    if "ref" in kw:
        kw = {**kw, "ref": tmp_path / kw["ref"]}
    with pytest.raises(ValueError, match=match):
        evaluate_checkpoint(tmp_path / "no_such_run", 100, **kw)


@pytest.mark.parametrize(
    ("kw", "match"),
    [(dict(steps=2000), r"steps must be an integer in \[1, T=\d+\], got 2000"),
     (dict(sampler="ddpm", eta=0.5), "eta=0.5 applies to sampler='ddim' only")],
)  # fmt: skip
def test_eval_checks_the_run_s_settings_before_sampling(run_dir: Path, monkeypatch, kw, match):
    """Settings that need the run (its T, its sampler) are refused once it is loaded, before
    the sampling and its progress bar start."""
    import antdiff.evaluate as ev

    monkeypatch.setattr(ev, "generate", lambda *a, **k: pytest.fail("sampled first"))
    with pytest.raises(ValueError, match=match):
        ev.evaluate_checkpoint(run_dir, 100, progress=False, **kw)


def test_eval_refuses_a_reference_of_another_size_before_sampling(
    run_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    """8x8 samples against 16x16 references were scored (the feature network resized both):
    even the training data read as FID 144 against itself resized. Refused, before sampling."""
    import antdiff.evaluate as ev
    from antdiff.data import load_digits_tensor

    torch.save(load_digits_tensor(16)[0], tmp_path / "digits16.pt")
    monkeypatch.setattr(ev, "generate", lambda *a, **k: pytest.fail("sampled first"))
    with pytest.raises(ValueError, match=r"holds images of shape \[1, 16, 16\], .* makes "
                       r"\[1, 8, 8\].*shape \[1, 8, 8\]"):  # fmt: skip
        ev.evaluate_checkpoint(run_dir, 100, ref=tmp_path / "digits16.pt", progress=False)


@pytest.mark.parametrize("suffix", [".npy", ".pt"])
def test_reference_files_are_memory_mapped_and_read_in_batches(tmp_path: Path, suffix) -> None:
    """--ref files were read whole and turned into float32 (4x a uint8 FFHQ set in memory).
    Now a .npy / .pt is mapped, uint8 stays uint8, and the features and the cache's data hash
    read it a batch at a time, equal to those of the float images it stands for."""
    from antdiff.evaluate import reference_images
    from antdiff.metrics import DigitsFeatures
    from antdiff.metrics.reference_stats import data_hash

    rng = np.random.default_rng(0)
    u = rng.integers(0, 256, (70, 1, 8, 8), dtype=np.uint8)
    path = tmp_path / f"u8{suffix}"
    if suffix == ".npy":
        np.save(path, u)
    else:
        torch.save({"x": torch.from_numpy(u.copy())}, path)
    _, x = reference_images(path)
    assert x.dtype == torch.uint8 and torch.equal(x, torch.from_numpy(u))
    if suffix == ".npy":  # a write to the file shows through: the tensor maps it, no copy
        m = np.load(path, mmap_mode="r+")
        m[3, 0, 2, 5] = 255 - u[3, 0, 2, 5]
        m.flush()
        assert int(x[3, 0, 2, 5]) == 255 - int(u[3, 0, 2, 5])
        u[3, 0, 2, 5] = 255 - u[3, 0, 2, 5]
    floats = torch.from_numpy(u).float() / 127.5 - 1.0  # as the float32 images were made
    ext = DigitsFeatures()
    ext.batch_size = 16  # several batches
    np.testing.assert_array_equal(ext(x), ext(floats))
    assert data_hash(x) == data_hash(floats) == data_hash(x, chunk_bytes=300)
    assert data_hash(x) != data_hash(x[:69])
    legacy = tmp_path / "legacy.pt"  # torch's pre-zip format: read, though it cannot be mapped
    torch.save(torch.from_numpy(u), legacy, _use_new_zipfile_serialization=False)
    assert torch.equal(reference_images(legacy)[1], torch.from_numpy(u))
    (tmp_path / "notes.pt").write_text("not a tensor file")  # was a bare KeyError
    with pytest.raises(ValueError, match="is not a torch.save file"):
        reference_images(tmp_path / "notes.pt")


def _latent_run(tmp_path: Path, z: torch.Tensor) -> None:
    """A one-step DiT run on the precomputed latents ``z`` (no decoder) in tmp_path / "run"."""
    torch.save(z, tmp_path / "z.pt")
    train(load_config("digits_dit", [
        "--data.source", "latents", "--data.path", str(tmp_path / "z.pt"), "--data.channels",
        "4", "--data.class_conditional", "false", "--sample.cfg_scale", "1.0",
        "--train.steps", "1", "--train.batch_size", "8", "--train.ckpt_every", "1",
        "--train.progress", "false", "--sample.n", "2", "--sample.steps", "1",
        "--train.out_dir", str(tmp_path / "run")]))  # fmt: skip


def test_eval_of_a_latent_run_without_a_decoder_fails_before_sampling(
    tmp_path: Path, monkeypatch
) -> None:
    """A run on precomputed latents has no decoder in antdiff: eval said so only after drawing
    every sample ("C in (1, 3); got (N, 4, ...)")."""
    import antdiff.evaluate as ev
    from antdiff.evaluate import evaluate_checkpoint

    _latent_run(tmp_path, torch.randn(24, 4, 4, 4))
    monkeypatch.setattr(ev, "generate", lambda *a, **k: pytest.fail("sampled first"))
    with pytest.raises(ValueError, match="and eval scores images: pass --vae DIR"):
        evaluate_checkpoint(tmp_path / "run", 100)


def test_samples_of_a_latent_run_without_a_decoder_are_not_clipped(tmp_path: Path) -> None:
    """`antdiff sample` of a run on precomputed latents writes the latents to decode elsewhere:
    they were clamped to [-1, 1] (a quarter of unit-variance latents hard-clipped), so the
    decoded images were wrong. Pixel runs stay clamped."""
    from antdiff.sampling import image_generators, sample

    _latent_run(tmp_path, 2.0 * torch.randn(24, 4, 4, 4))
    out = tmp_path / "s"
    main(["sample", "--ckpt", str(tmp_path / "run"), "--num", "6", "--steps", "3",
          "--format", "pt", "--no-progress", "--out", str(out)])  # fmt: skip
    x = torch.load(out / "samples.pt")["x"]
    assert x.abs().max() > 1.0  # unclipped
    meta = json.loads((out / "sample.json").read_text())
    assert meta["space"] == "latent" and (meta["latent_scale"], meta["latent_shift"]) == (1.0, 0.0)
    loaded = load_for_sampling(tmp_path / "run")
    direct = sample(loaded.model, loaded.diffusion, (6, 4, 4, 4), sampler="ddim", steps=3,
                    generator=image_generators(0, 0, 6), clip_denoised=False)  # fmt: skip
    torch.testing.assert_close(x, direct)


def test_loading_a_checkpoint_leaves_the_global_stream_alone(tmp_path: Path) -> None:
    """The model is built (its random init, then overwritten by the saved weights) without
    drawing from the caller's torch stream: a seeded script's draws after a load were shifted
    by each checkpoint it loaded."""
    train(load_config("digits_adm", ["--train.steps", "1", "--train.batch_size", "8",
                                     "--train.ckpt_every", "1", "--train.progress", "false",
                                     "--sample.n", "2", "--sample.steps", "1",
                                     "--train.out_dir", str(tmp_path / "run")]))  # fmt: skip
    torch.manual_seed(5)
    want = torch.rand(2)
    torch.manual_seed(5)
    load_for_sampling(tmp_path / "run")
    assert torch.equal(torch.rand(2), want)


@pytest.mark.parametrize("preset", ["digits_ldm", "digits_adm"])
def test_checkpoint_samples_without_its_data_set(tmp_path: Path, monkeypatch, preset) -> None:
    """The checkpoint records the data's shape and classes (and holds a latent run's codec):
    sampling must not read the training set, which may be gone or be 20 GB of latents."""
    import antdiff.data

    overrides = [
        *("--train.steps", "1", "--train.batch_size", "8", "--train.ckpt_every", "1"),
        *("--data.autoencoder_steps", "2", "--train.progress", "false", "--sample.n", "2"),
        *("--sample.steps", "2", "--train.out_dir", str(tmp_path / "run")),
    ]
    if preset == "digits_adm":
        overrides = [*overrides, "--data.class_conditional", "true"]
    train(load_config(preset, overrides))
    full = load_for_sampling(tmp_path / "run")

    def gone(*args, **kwargs):
        raise FileNotFoundError("the training data moved")

    monkeypatch.setattr(antdiff.data, "load_dataset", gone)
    loaded = load_for_sampling(tmp_path / "run")
    assert loaded.data.shape == full.data.shape and loaded.latent == full.latent
    assert loaded.data.num_classes == full.data.num_classes
    a, _ = generate(full, 3, steps=2, progress=False, seed=4)
    b, _ = generate(loaded, 3, steps=2, progress=False, seed=4)
    assert torch.equal(a, b) and a.shape == (3, 1, 8, 8)


def test_train_device_is_checked_like_the_cli_device(monkeypatch) -> None:
    """train.device names a device that exists here (cuda:5 on a one-GPU machine failed at
    .to() with torch's error), as --device does."""
    from antdiff.train import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"train.device cuda:5: this machine has 1 CUDA device"):
        resolve_device("cuda:5")
    with pytest.raises(ValueError, match=r"train.device cuda:1: this machine has 1 CUDA device"):
        resolve_device("cuda:1")  # devices are numbered from 0
    with pytest.raises(ValueError, match="train.device 'tpu' is not a device antdiff runs on"):
        resolve_device("tpu")
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="train.device cuda: CUDA is not available here"):
        resolve_device("cuda")


def test_sample_and_eval_default_to_the_runs_own_sampler(tmp_path: Path) -> None:
    """A paper preset sets its evaluation protocol in sample.* (DDPM-250 for the DiT presets),
    but sample and eval always drew DDIM-50 unless told: they now take the run's own sampler
    and steps, as they took its guidance."""
    run = tmp_path / "run"
    train(load_config("digits_adm", [
        "--train.steps", "2", "--train.batch_size", "8", "--train.out_dir", str(run),
        "--train.progress", "false", "--sample.n", "2", "--sample.sampler", "ddpm",
        "--sample.steps", "3"]))  # fmt: skip
    assert main(["sample", "--ckpt", str(run), "--num", "2", "--no-progress",
                 "--out", str(tmp_path / "s")]) == 0  # fmt: skip
    meta = json.loads((tmp_path / "s" / "sample.json").read_text())
    assert (meta["sampler"], meta["steps"]) == ("ddpm", 3)
    assert main(["sample", "--ckpt", str(run), "--num", "2", "--no-progress", "--sampler",
                 "ddim", "--steps", "4", "--out", str(tmp_path / "t")]) == 0  # fmt: skip
    meta = json.loads((tmp_path / "t" / "sample.json").read_text())
    assert (meta["sampler"], meta["steps"]) == ("ddim", 4)
    from antdiff.evaluate import evaluate_checkpoint

    res = evaluate_checkpoint(run, 70, batch_size=70, progress=False)
    assert (res["sampler"], res["steps"]) == ("ddpm", 3)


def test_cfg_channels_follow_the_run_and_are_checked(tmp_path: Path) -> None:
    """sample.cfg_channels (the DiT presets: 3) reaches sample / eval as the run's own, with
    --cfg-channels N | all over it, and is recorded; more channels than the run diffuses is
    refused before training, 0 when the config is read."""
    base = ["--train.steps", "1", "--train.batch_size", "10", "--train.progress", "false",
            "--sample.n", "2", "--sample.steps", "2", "--data.class_conditional", "true",
            "--sample.cfg_scale", "2.0"]  # fmt: skip
    assert load_config("dit_s2_imagenet256").sample.cfg_channels == 3
    with pytest.raises(ValueError, match="sample.cfg_channels must be finite and > 0"):
        load_config("digits_dit", [*base, "--sample.cfg_channels", "0"])
    with pytest.raises(ValueError, match="sample.cfg_channels=2 exceeds the 1 channels"):
        train(load_config("digits_dit", [*base, "--sample.cfg_channels", "2",
                                         "--train.out_dir", str(tmp_path / "bad")]))  # fmt: skip
    run = tmp_path / "run"
    train(load_config("digits_dit", [*base, "--sample.cfg_channels", "1",
                                     "--train.out_dir", str(run)]))  # fmt: skip
    for extra, want in (((), 1), (("--cfg-channels", "all"), None)):
        out = tmp_path / f"s{want}"
        assert main(["sample", "--ckpt", str(run), "--num", "2", "--no-progress",
                     "--out", str(out), *extra]) == 0  # fmt: skip
        assert json.loads((out / "sample.json").read_text())["cfg_channels"] == want
    with pytest.raises(SystemExit):
        main(["sample", "--ckpt", str(run), "--num", "2", "--cfg-channels", "0",
              "--out", str(tmp_path / "x")])  # fmt: skip


def test_ddpm_variance_follows_the_run_and_the_flag(tmp_path: Path, capsys) -> None:
    """sample.variance (DDPM's beta_t "large" or beta_tilde "small") reaches previews, sample and
    eval as the run's own, with --variance over it, and is recorded; DDIM records none, and a
    learn_sigma model refuses it when the config is read."""
    run = tmp_path / "run"
    train(load_config("digits_adm", [
        "--train.steps", "2", "--train.batch_size", "8", "--train.out_dir", str(run),
        "--train.progress", "false", "--sample.n", "2", "--sample.sampler", "ddpm",
        "--sample.steps", "3", "--sample.variance", "large"]))  # fmt: skip
    got = {}
    for name, extra in (("run", []), ("small", ["--variance", "small"]),
                        ("large", ["--variance", "large"]), ("ddim", ["--sampler", "ddim"])):
        out = tmp_path / name
        assert main(["sample", "--ckpt", str(run), "--num", "3", "--no-progress", "--seed", "1",
                     "--out", str(out), *extra]) == 0  # fmt: skip
        got[name] = (np.load(out / "samples.npy"),
                     json.loads((out / "sample.json").read_text())["variance"])  # fmt: skip
    assert [got[n][1] for n in ("run", "small", "large", "ddim")] == [
        "large", "small", "large", None]
    assert np.array_equal(got["run"][0], got["large"][0])
    assert np.abs(got["run"][0] - got["small"][0]).max() > 1e-3
    from antdiff.evaluate import evaluate_checkpoint

    assert evaluate_checkpoint(run, 70, batch_size=70, progress=False)["variance"] == "large"
    err = _err(capsys, ["sample", "--ckpt", str(run), "--num", "2", "--no-progress", "--sampler",
                        "ddim", "--variance", "large", "--out", str(tmp_path / "bad")])  # fmt: skip
    assert "applies to sampler='ddpm'" in err and not (tmp_path / "bad").exists()
    with pytest.raises(ValueError, match="learns its variance"):
        load_config("digits_adm", ["--diffusion.learn_sigma", "true", "--sample.variance", "large"])
    with pytest.raises(ValueError, match="sample.variance must be one of"):
        load_config("digits_adm", ["--sample.variance", "big"])


def test_generate_labels_are_i_mod_num_classes_batch_by_batch(monkeypatch):
    """A class-conditional run: generate() hands batch [start, start + n) the labels
    (start..start+n-1) % num_classes, and returns exactly those (the suite's run is
    unconditional, so the label path was never exercised)."""
    from types import SimpleNamespace

    import antdiff.sampling
    from antdiff.config import SampleConfig
    from antdiff.evaluate import generate

    calls: list[torch.Tensor] = []

    def fake_sample(model, diffusion, shape, *, y=None, **kw):  # noqa: ANN001, ANN202
        calls.append(y.clone())
        return torch.zeros(shape)

    monkeypatch.setattr(antdiff.sampling, "sample", fake_sample)
    loaded = SimpleNamespace(
        model=torch.nn.Linear(1, 1),
        diffusion=None,
        data=SimpleNamespace(num_classes=4, shape=(1, 2, 2), codec=None),
        cfg=SimpleNamespace(data=SimpleNamespace(class_conditional=True),
                            sample=SampleConfig()),
        latent=False,
        path="fake",
    )
    x, labels = generate(loaded, 11, steps=2, batch_size=3, progress=False)
    assert x.shape == (11, 1, 2, 2)
    want = [i % 4 for i in range(11)]
    assert labels.tolist() == want
    assert [c.tolist() for c in calls] == [want[0:3], want[3:6], want[6:9], want[9:11]]


def test_sample_cli_flags_reach_generate_and_the_grid(run_dir, tmp_path, monkeypatch):
    """--seed, --batch-size, --spacing reach evaluate.generate; --grid N puts the first N
    samples in samples.png, upscaled 4x for 8 px images (both axes)."""
    from matplotlib import image as mpimg

    import antdiff.evaluate as ev
    from antdiff.cli import main

    seen = {}
    real = ev.generate

    def spy(*a, **kw):
        seen.update(kw)
        return real(*a, **kw)

    monkeypatch.setattr(ev, "generate", spy)
    out = tmp_path / "s"
    argv = ["sample", "--ckpt", str(run_dir), "--num", "6", "--steps", "2", "--no-progress",
            "--seed", "5", "--batch-size", "4", "--spacing", "leading", "--grid", "4",
            "--out", str(out)]
    assert main(argv) == 0
    assert (seen["seed"], seen["batch_size"], seen["spacing"]) == (5, 4, "leading")
    png = mpimg.imread(out / "samples.png")
    side = (2 * 9 + 1) * 4  # a 2 x 2 grid of 8 px images with 1 px borders, times 4
    assert png.shape[:2] == (side, side)


# ---------------------------------------------------------------- gaps found by mutation testing


def test_eval_samples_with_the_weights_eta_and_spacing_it_records(run_dir: Path, tmp_path: Path):
    """evaluate_checkpoint's ema / eta / spacing reach the sampling, not only the record: its
    metrics equal score() of generate() with the same settings (raw weights, DDIM eta 1,
    leading timesteps), drawn here."""
    from antdiff.evaluate import evaluate_checkpoint, score

    kw = dict(steps=2, seed=3, batch_size=70, eta=1.0, spacing="leading")
    res = evaluate_checkpoint(run_dir, 70, ema=False, progress=False, cache_dir=tmp_path, **kw)
    assert (res["weights"], res["eta"], res["spacing"]) == ("raw", 1.0, "leading")
    x, _ = generate(load_for_sampling(run_dir, ema=False), 70, progress=False, **kw)
    want = score(x, DigitsFeatures(), "digits", cache_dir=tmp_path)
    for key in ("fid", "precision", "recall"):
        assert res[key] == pytest.approx(want[key], rel=1e-9, abs=1e-12), key


def _fake_loaded(class_conditional: bool, sample_cfg=None):
    from types import SimpleNamespace

    from antdiff.config import SampleConfig

    return SimpleNamespace(
        model=torch.nn.Linear(1, 1),
        diffusion=None,
        data=SimpleNamespace(num_classes=4 if class_conditional else None, shape=(1, 2, 2),
                             codec=None),  # fmt: skip
        cfg=SimpleNamespace(data=SimpleNamespace(class_conditional=class_conditional),
                            sample=sample_cfg or SampleConfig()),  # fmt: skip
        latent=False,
        path="fake",
    )


def test_run_settings_take_the_run_s_own_only_where_unset():
    """run_settings fills only the unset (None / "run") settings from the run's sample config;
    a given cfg_scale (and sampler, steps, cfg_channels) wins."""
    from antdiff.config import SampleConfig
    from antdiff.evaluate import run_settings

    sc = SampleConfig(sampler="ddpm", steps=7, cfg_scale=3.0, cfg_channels=1)
    loaded = _fake_loaded(True, sc)
    assert run_settings(loaded) == ("ddpm", 7, 3.0, 1)
    assert run_settings(loaded, "ddim", 4, 1.5, None) == ("ddim", 4, 1.5, None)
    assert run_settings(loaded, cfg_scale=1.0) == ("ddpm", 7, 1.0, 1)


def test_guidance_on_an_unconditional_model_is_refused_before_sampling(monkeypatch):
    import antdiff.sampling

    monkeypatch.setattr(antdiff.sampling, "sample", lambda *a, **k: pytest.fail("sampled"))
    with pytest.raises(ValueError, match="cfg_scale=2.0 needs a class-conditional model"):
        generate(_fake_loaded(False), 3, cfg_scale=2.0, progress=False)


def test_image_files_big_endian_and_labels(tmp_path: Path):
    """A big-endian .npy reference reads as its values (torch maps native byte order only);
    a .pt dict's labels 'y' come back with the images, and labels of the wrong shape are
    refused."""
    from antdiff.evaluate import load_image_file, reference_images

    x = np.random.default_rng(0).uniform(-1, 1, (5, 1, 4, 4))
    np.save(tmp_path / "big.npy", x.astype(">f4"))
    _, got = reference_images(tmp_path / "big.npy")
    np.testing.assert_array_equal(got.numpy(), x.astype(np.float32))
    imgs, y = torch.from_numpy(x).float(), torch.arange(5)
    torch.save({"x": imgs, "y": y}, tmp_path / "xy.pt")
    gx, gy = load_image_file(tmp_path / "xy.pt", "--data")
    assert torch.equal(gx, imgs) and torch.equal(gy, y)
    torch.save({"x": imgs, "y": y[:4]}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"labels 'y' must be a tensor \[N\] = \[5\]"):
        load_image_file(tmp_path / "bad.pt", "--data")

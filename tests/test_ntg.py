"""Negative transfer gap: interval checks, the routing wrapper, interval specialists (the
train.t_range config key), the NTG sign/definition against an independent FID computation,
and the JSON / PNG outputs."""

from __future__ import annotations

import csv
import json
import math
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from antdiff.analysis.ntg import (
    IntervalRouter,
    check_intervals,
    negative_transfer_gap,
    run_ntg,
    sample_images,
    uniform_intervals,
    write_ntg,
)
from antdiff.cli import main as cli_main
from antdiff.config import load_config
from antdiff.metrics import DigitsFeatures, fid_from_features
from antdiff.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(tmp_path, *extra, steps=3):
    return load_config(
        "digits_adm",
        ["--ant.method", "vanilla", "--train.steps", str(steps), "--train.batch_size", "10",
         "--train.log_every", "1", "--train.ckpt_every", str(steps), "--train.progress", "false",
         "--train.ema_decay", "0.5", "--sample.steps", "4", "--sample.n", "4",
         "--train.out_dir", str(tmp_path), *extra],
    )  # fmt: skip


@pytest.mark.parametrize(
    "bad",
    [[(-1, 10)], [(10, 10)], [(50, 30)], [(900, 1001)], [], [(0, 1, 2)], [(0.5, 10)],
     [(0, float("inf"))], [(0, float("nan"))], [("0", 10)]],
)  # fmt: skip
def test_bad_intervals_raise(bad):
    with pytest.raises(ValueError, match="intervals"):
        check_intervals(bad, 1000)


def test_intervals_of_numpy_numbers_become_ints():
    got = check_intervals([(np.int64(3), 10.0), (np.float32(10), np.int32(20))], 1000)
    assert got == [(3, 10), (10, 20)] and all(type(v) is int for iv in got for v in iv)


def test_uniform_intervals_tile_0_T():
    assert uniform_intervals(1000, 5) == [(0, 200), (200, 400), (400, 600), (600, 800), (800, 1000)]
    iv = uniform_intervals(10, 3)
    assert iv[0][0] == 0 and iv[-1][1] == 10
    assert all(a[1] == b[0] for a, b in zip(iv, iv[1:])) and all(t1 < t2 for t1, t2 in iv)
    with pytest.raises(ValueError, match="k must be"):
        uniform_intervals(10, 11)


class _Affine(torch.nn.Module):
    """out = a * x + t / 1000 + y: distinct, easy to recompute, uses every input."""

    def __init__(self, a: float) -> None:
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(a, dtype=torch.float64))

    def forward(self, x, t, y=None):
        out = self.a * x + (t.double() / 1000).view(-1, 1, 1, 1)
        return out if y is None else out + y.double().view(-1, 1, 1, 1)


@pytest.mark.parametrize("t", [[5, 250, 199, 200, 0, 999, 399, 400], [210] * 4, [10, 900]])
def test_router_picks_the_specialist_exactly_inside(t):
    full, spec = _Affine(2.0), _Affine(-3.0)
    router = IntervalRouter(full, spec, 200, 400)
    t = torch.tensor(t)
    x = torch.randn(len(t), 1, 4, 4, dtype=torch.float64)
    y = torch.arange(len(t))
    with torch.no_grad():
        got = router(x, t, y=y)
        inside = ((t >= 200) & (t < 400)).view(-1, 1, 1, 1)
        want = torch.where(inside, spec(x, t, y=y), full(x, t, y=y))
    assert torch.equal(got, want)
    with torch.no_grad():
        assert torch.equal(router(x, t), torch.where(inside, spec(x, t), full(x, t)))


def test_t_range_config_trains_only_inside(tmp_path):
    with pytest.raises(ValueError, match="t_range"):
        _cfg(tmp_path, "--train.t_range", "[0,1001]")
    with pytest.raises(ValueError, match="t_range"):
        _cfg(tmp_path, "--train.t_range", "[300,300]")
    # t is drawn uniformly inside, not by cluster: pcgrad trained on one cluster, k - 1 empty
    with pytest.raises(ValueError, match="ant.method='pcgrad' would see clusters that never"):
        train(_cfg(tmp_path, "--train.t_range", "[0,10]", "--ant.method", "pcgrad"))
    assert not (tmp_path / "config.yaml").exists()  # refused before anything was written
    # log-SNR clusters of T=1000, k=5 start [0, 153), [153, 394), ...: [160, 380) is inside c2
    cfg = _cfg(tmp_path, "--train.t_range", "[160,380]", "--train.ckpt_every", "0", steps=4)
    seen = []
    orig = torch.randint

    def spy(*a, **kw):
        out = orig(*a, **kw)
        seen.append(out.clone())
        return out

    torch.randint = spy
    try:
        train(cfg)
    finally:
        torch.randint = orig
    t = torch.cat(seen)
    assert t.numel() == 40 and int(t.min()) >= 160 and int(t.max()) < 380
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    for r in rows:  # only cluster 2 ever holds samples: the others have no loss (NaN)
        assert float(r["loss_c2"]) > 0
        assert all(math.isnan(float(r[f"loss_c{i}"])) for i in (1, 3, 4, 5))
        assert all(float(r[f"weight_c{i}"]) == 0 for i in (1, 3, 4, 5))


def _fid_of(model, diffusion, real_feats, extractor, n, seed):
    x = sample_images(model, diffusion, n, (1, 8, 8), seed=seed, steps=4, batch=40)
    return fid_from_features(real_feats, extractor(x))


def test_ntg_definition_against_independent_fid(tmp_path):
    full_run = train(_cfg(tmp_path / "full"))["run"]
    spec_run = train(_cfg(tmp_path / "spec", "--train.t_range", "[500,1000]", "--train.seed", "3"))
    full, spec, diffusion = full_run.ema.model, spec_run["run"].ema.model, full_run.diffusion
    full.eval(), spec.eval()
    extractor = DigitsFeatures()
    real = full_run.data.x[:300]
    kw = dict(n_samples=70, shape=(1, 8, 8), seed=5, steps=4, batch=40)
    res = negative_transfer_gap(
        full, {(0, 500): full, (500, 1000): spec}, diffusion, real, extractor, **kw
    )
    # sampling through the router restores the router's mode: the models keep their own
    assert not full.training and not spec.training
    real_f = extractor(real)
    base = _fid_of(full, diffusion, real_f, extractor, 70, 5)
    routed = _fid_of(IntervalRouter(full, spec, 500, 1000), diffusion, real_f, extractor, 70, 5)
    assert res["full"]["fid"] == pytest.approx(base, rel=1e-9)
    same, other = res["intervals"]
    # routing to the full model itself cannot change a single sample: NTG is exactly 0
    assert same["ntg"] == 0.0 and same["steps_inside"] == 2
    assert other["fid"] == pytest.approx(routed, rel=1e-9)
    assert other["ntg"] == pytest.approx(routed - base, rel=1e-9) and other["ntg"] != 0.0
    assert res["seed_gap"] > 0 and "digits" in res["features"]
    js, png = write_ntg(res, tmp_path / "out")
    assert json.loads(js.read_text())["intervals"][1]["ntg"] == other["ntg"]
    with Image.open(png) as im:
        im.verify()
    # a rewrite stopped at the figure leaves no numbers of the earlier result beside it
    import antdiff.analysis.ntg as ntg_mod

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    real_plot, ntg_mod.plot_ntg = ntg_mod.plot_ntg, stop
    try:
        with pytest.raises(KeyboardInterrupt):
            write_ntg(res, tmp_path / "out")
    finally:
        ntg_mod.plot_ntg = real_plot
    assert not js.exists()
    with pytest.raises(ValueError, match="no step"):  # 4 DDIM steps: 0, 333, 666, 999
        negative_transfer_gap(full, {(400, 600): spec}, diffusion, real, extractor, **kw)


def test_run_ntg_writes_outputs_and_reuses_specialists(tmp_path):
    cfg = _cfg(tmp_path / "unused", steps=2)
    out = tmp_path / "ntg"
    kw = dict(specialist_steps=2, out_dir=out, n_samples=66, batch=33)
    res = run_ntg(cfg, uniform_intervals(1000, 2), **kw)
    assert [r["t_range"] for r in res["intervals"]] == [[0, 500], [500, 1000]]
    for r in res["intervals"]:
        assert r["ntg"] == pytest.approx(r["fid"] - res["full"]["fid"], rel=1e-12)
    saved = json.loads((out / "ntg.json").read_text())
    assert saved["intervals"] == res["intervals"] and saved["specialist_steps"] == 2
    with Image.open(out / "ntg.png") as im:
        assert im.format == "PNG" and im.size[0] > 200
    spec_cfg = (out / "specialist_0_500" / "config.yaml").read_text()
    assert "t_range:\n  - 0\n  - 500" in spec_cfg and "method: vanilla" in spec_cfg
    assert saved["full_model"]["method"] == "vanilla" and saved["cfg_channels"] is None
    # a second call loads the checkpoints (no training) and reproduces every number; with
    # full= the config comes from its checkpoint (none needed, another T not consulted)
    again = run_ntg(None, uniform_intervals(1000, 2), full=out / "full", **kw)
    assert [r["fid"] for r in again["intervals"]] == [r["fid"] for r in res["intervals"]]
    assert again["full"]["fid"] == res["full"]["fid"]
    # specialists trained past the steps asked for are not passed off as fewer
    with pytest.raises(ValueError, match="specialist trained for 2 steps.*--specialist-steps 2"):
        run_ntg(cfg, uniform_intervals(1000, 2), **{**kw, "specialist_steps": 1})
    # a full model of another config: ntg's own advice (train's --allow-config-change is not
    # an ntg flag)
    other = _cfg(tmp_path / "unused", "--train.lr", "0.001", steps=2)
    with pytest.raises(ValueError, match=r"full model trained with another config:\n  train.lr"
                                         r".*\nuse another --out"):  # fmt: skip
        run_ntg(other, uniform_intervals(1000, 2), **kw)


def test_latent_ntg_clamps_decoded_images(tmp_path, monkeypatch):
    """Decoded latents can leave [-1, 1] (the codec is not bounded); NTG clamps the decoded
    samples and the decoded reference as eval does, where the feature check used to raise
    after all the training."""
    from antdiff.models.autoencoder import TinyAutoencoder

    decode = TinyAutoencoder.decode
    monkeypatch.setattr(TinyAutoencoder, "decode", lambda self, z: decode(self, z) + 2.0)
    cfg = load_config(
        "digits_ldm",
        ["--ant.method", "vanilla", "--train.steps", "2", "--train.batch_size", "8",
         "--train.ckpt_every", "2", "--train.progress", "false", "--sample.steps", "4",
         "--data.autoencoder_steps", "2", "--train.out_dir", str(tmp_path / "unused")],
    )  # fmt: skip
    res = run_ntg(cfg, [(0, 500)], specialist_steps=1, out_dir=tmp_path / "ntg", n_samples=66,
                  batch=33)  # fmt: skip
    assert res["intervals"][0]["fid"] >= 0.0 and res["full"]["fid"] >= 0.0


def test_cli_rejects_bad_intervals(tmp_path, capsys):
    args = ["--intervals", "0:0", "--out", str(tmp_path), "--train.steps", "1"]
    rc = cli_main(["ntg", "--config", "digits_adm", *args])
    assert rc == 2
    assert "[0, 0)" in capsys.readouterr().err


def test_cli_full_model_trains_vanilla_unless_told(tmp_path, monkeypatch):
    """The paper's NTG compares a vanilla full model with vanilla specialists; from a preset
    whose method is UW the CLI trained the full model with UW."""
    import antdiff.analysis.ntg as ntg

    seen = []
    monkeypatch.setattr(ntg, "run_ntg", lambda cfg, *a, **kw: seen.append(cfg) or {
        "full": {}, "seed_gap": 0.0, "intervals": [], "features": "x"})  # fmt: skip
    base = ["ntg", "--config", "digits_adm", "--out", str(tmp_path), "--train.steps", "1"]
    assert load_config("digits_adm").ant.method != "vanilla"
    assert cli_main(base) == 0 and seen[-1].ant.method == "vanilla"
    assert cli_main([*base, "--ant.method", "uw"]) == 0 and seen[-1].ant.method == "uw"
    assert cli_main([*base, "--full", str(tmp_path)]) == 2  # one source of the full model
    # a paper preset stratifies "equal" for ANT's methods: the vanilla full model drew t by
    # cluster (B / k each), a reweighted objective; it draws t uniformly unless told
    paper = ["ntg", "--config", "adm_light_ffhq256", "--out", str(tmp_path),
             "--data.path", str(tmp_path), "--train.steps", "1"]  # fmt: skip
    assert load_config("adm_light_ffhq256").ant.sampling == "equal"
    assert cli_main(paper) == 0 and seen[-1].ant.sampling == "proportional"
    assert cli_main([*paper, "--ant.sampling", "equal"]) == 0
    assert seen[-1].ant.sampling == "equal"
    assert cli_main([*paper, "--ant.method", "uw"]) == 0 and seen[-1].ant.sampling == "equal"
    assert cli_main([*paper, "--ant.method", "vanilla"]) == 0  # vanilla named: the same
    assert seen[-1].ant.sampling == "proportional"
    for spelled in ("Vanilla", " VANILLA"):  # method names ignore case: the same again
        assert cli_main([*paper, "--ant.method", spelled]) == 0
        assert seen[-1].ant.sampling == "proportional" and seen[-1].ant.method == "vanilla"


def test_a_fresh_vanilla_run_with_equal_sampling_warns(tmp_path):
    """vanilla with "equal" sampling (a paper preset with --ant.method vanilla) trains a
    reweighted objective, not the plain-training baseline: said at the start of the run."""
    from antdiff.train import train

    args = ["--ant.method", "vanilla", "--train.steps", "1", "--train.batch_size", "10",
            "--train.progress", "false", "--train.ckpt_every", "0", "--sample.n", "2",
            "--sample.steps", "2", "--train.out_dir", str(tmp_path / "run")]  # fmt: skip
    with pytest.warns(UserWarning, match="not the plain-training baseline. Add --ant.sampling "
                      "proportional"):  # fmt: skip
        train(load_config("digits_adm", [*args, "--ant.sampling", "equal"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(load_config("digits_adm", [*args, "--train.out_dir", str(tmp_path / "b")]))


def test_too_few_samples_fail_before_any_training(tmp_path):
    """The metrics' sample count check runs before the full model and the specialists train
    (it used to come after all of them)."""
    with pytest.raises(ValueError, match="--n-samples 4: 4 samples"):
        run_ntg(_cfg(tmp_path / "unused", steps=2), uniform_intervals(1000, 2),
                specialist_steps=2, out_dir=tmp_path / "ntg", n_samples=4)  # fmt: skip
    assert not (tmp_path / "ntg").exists()


def test_precomputed_latents_fail_before_any_training(tmp_path):
    """Precomputed latents have no decoder here: their NTG failed on the FID's image check
    after the full model and every specialist had trained."""
    torch.save(torch.randn(40, 1, 8, 8) * 2, tmp_path / "z.pt")
    cfg = _cfg(tmp_path / "unused", "--data.source", "latents", "--data.path",
               str(tmp_path / "z.pt"), steps=2)  # fmt: skip
    with pytest.raises(ValueError, match="precomputed latents .* no decoder"):
        run_ntg(cfg, uniform_intervals(1000, 2), specialist_steps=2, out_dir=tmp_path / "ntg",
                n_samples=66)  # fmt: skip
    assert not (tmp_path / "ntg").exists()


def test_sample_images_passes_the_guided_channels(monkeypatch):
    """NTG samples with the run's own sample.cfg_channels (it was left out: all channels)."""
    import antdiff.sampling

    seen = []

    def fake(model, diffusion, shape, **kw):
        seen.append(kw.get("cfg_channels"))
        return torch.zeros(shape)

    monkeypatch.setattr(antdiff.sampling, "sample", fake)
    model = torch.nn.Linear(1, 1)
    sample_images(model, None, 4, (1, 2, 2), seed=0, batch=2, cfg_channels=1)
    assert seen == [1, 1]


def test_ntg_samples_with_the_runs_ddpm_variance(tmp_path, monkeypatch):
    """sample.variance (DDPM's beta_t "large") reached sample / eval but not NTG, whose FIDs
    then came from beta_tilde samples: not comparable with eval's. It is passed and recorded."""
    import antdiff.sampling

    real, seen = antdiff.sampling.sample, []

    def spy(*args, **kw):
        seen.append(kw.get("variance"))
        return real(*args, **kw)

    monkeypatch.setattr(antdiff.sampling, "sample", spy)
    cfg = _cfg(tmp_path / "unused", "--sample.sampler", "ddpm", "--sample.variance", "large",
               steps=2)  # fmt: skip
    res = run_ntg(cfg, uniform_intervals(1000, 2), specialist_steps=2, out_dir=tmp_path / "ntg",
                  n_samples=66, batch=66)  # fmt: skip
    assert seen and set(seen) == {"large"}
    assert res["variance"] == "large" and res["sampler"] == "ddpm"


def test_sample_images_seeds_each_image_and_numbers_classes_globally(monkeypatch):
    """Image i draws its noise from its own generator, seeded from (seed, i): two models
    sampled alike see the same noise, in any batches; the class labels run over the global
    sample index (0, 1, 2, 0, 1, 2), not restarting in each batch."""
    import antdiff.sampling

    labels = []

    def fake(model, diffusion, shape, *, generator, y=None, **kw):
        labels.append(y.clone())
        assert len(generator) == shape[0]
        return torch.stack([torch.randn(shape[1:], generator=g) for g in generator])

    monkeypatch.setattr(antdiff.sampling, "sample", fake)
    x = sample_images(torch.nn.Linear(1, 1), None, 6, (1, 2, 2), seed=5, batch=4, num_classes=3)
    gens = antdiff.sampling.image_generators(5, 0, 6)
    assert torch.equal(x, torch.stack([torch.randn((1, 2, 2), generator=g) for g in gens]))
    assert torch.cat(labels).tolist() == [0, 1, 2, 0, 1, 2]
    assert torch.equal(sample_images(torch.nn.Linear(1, 1), None, 6, (1, 2, 2), seed=5, batch=5,
                                     num_classes=3), x)  # fmt: skip


class _Zero(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, t, **kw):
        return x * self.w


class _StubFeatures:
    name, dim = "stub", 2

    def __call__(self, x):
        return torch.zeros(len(x), 2).numpy()


def test_ntg_rows_count_the_sampler_steps_inside_each_half_open_interval(monkeypatch):
    """With the FIDs given (full 5, full under the other noise seed 3, then 4 and 7 for the
    intervals): seed_gap = |3 - 5| = 2, NTG = 4 - 5 = -1 and 7 - 5 = +2. The 4 DDIM steps are
    t = 0, 333, 666, 999: [0, 333) holds one of them (333 belongs to the next interval),
    [333, 1000) three."""
    import antdiff.analysis.ntg as ntg
    from antdiff.diffusion import GaussianDiffusion
    from antdiff.schedules import linear_schedule

    fids = iter([5.0, 3.0, 4.0, 7.0])
    monkeypatch.setattr(ntg, "_quality", lambda real, images, extractor, rank_def: {
        "fid": next(fids), "precision": 0.0, "recall": 0.0})  # fmt: skip
    spec = _Zero()
    res = negative_transfer_gap(
        _Zero(), {(0, 333): spec, (333, 1000): spec}, GaussianDiffusion(linear_schedule(1000)),
        torch.zeros(3, 1, 2, 2), _StubFeatures(), n_samples=2, shape=(1, 2, 2), steps=4, batch=2,
    )  # fmt: skip
    assert res["seed_gap"] == 2.0
    assert [(r["label"], r["steps_inside"], r["ntg"]) for r in res["intervals"]] == [
        ("[0, 333)", 1, -1.0), ("[333, 1000)", 3, 2.0)]  # fmt: skip


def test_plot_marks_negative_transfer_red_and_shows_the_noise_band(tmp_path, monkeypatch):
    """Bars with NTG < 0 (negative transfer) are red, the others blue; the y range holds the
    whole noise band [-seed_gap, seed_gap], even where every bar is smaller."""
    from matplotlib.axes import Axes

    from antdiff.analysis.ntg import plot_ntg

    got = {}
    bar, set_ylim = Axes.bar, Axes.set_ylim

    def spy_bar(self, x, height, *a, color=None, **kw):
        got["colors"] = list(color)
        return bar(self, x, height, *a, color=color, **kw)

    def spy_ylim(self, *a, **kw):
        if len(a) == 2:
            got["ylim"] = a
        return set_ylim(self, *a, **kw)

    monkeypatch.setattr(Axes, "bar", spy_bar)
    monkeypatch.setattr(Axes, "set_ylim", spy_ylim)
    res = {"intervals": [{"ntg": -1.0, "label": "[0, 500)"}, {"ntg": 0.5, "label": "[500, 1000)"}],
           "seed_gap": 3.0, "features": "stub"}  # fmt: skip
    plot_ntg(res, tmp_path / "n.png")
    assert got["colors"] == ["tab:red", "tab:blue"]
    lo, hi = got["ylim"]
    assert lo <= -3.0 and hi >= 3.0


@pytest.mark.parametrize("t1, t2", [(5, 5), (7, 3), (-1, 5)])
def test_router_refuses_an_empty_or_negative_interval(t1, t2):
    m = torch.nn.Linear(1, 1)
    with pytest.raises(ValueError, match="need 0 <= t1 < t2"):
        IntervalRouter(m, m, t1, t2)


@pytest.fixture
def stubbed_ntg(monkeypatch):
    """run_ntg with its models built but not trained, and negative_transfer_gap replaced by a
    recorder: ``trained`` lists (what, ant.method) of each model, ``seen`` the sampling
    arguments run_ntg passed."""
    import antdiff.analysis.ntg as ntg
    from antdiff.train import build_run

    trained, seen = [], {}

    def fake_trained(cfg, what, flag):
        trained.append((what, cfg.ant.method))
        return build_run(cfg)

    def fake_gap(full, specialists, diffusion, real, extractor, **kw):
        seen.update(kw)
        return {"intervals": [], "full": {}, "seed_gap": None}

    monkeypatch.setattr(ntg, "_trained", fake_trained)
    monkeypatch.setattr(ntg, "negative_transfer_gap", fake_gap)
    monkeypatch.setattr(ntg, "write_ntg", lambda result, out: None)
    return ntg, trained, seen


def _small(tmp_path, preset="digits_adm", *extra):
    return load_config(
        preset,
        ["--train.steps", "2", "--train.progress", "false", "--sample.steps", "4",
         "--train.out_dir", str(tmp_path / "unused"), *extra],
    )  # fmt: skip


def test_run_ntg_refuses_a_bad_interval_before_training(tmp_path, stubbed_ntg):
    ntg, trained, _ = stubbed_ntg
    with pytest.raises(ValueError, match=r"\[0, 2000\) is empty or outside"):
        ntg.run_ntg(_small(tmp_path), [(0, 2000)], specialist_steps=1, out_dir=tmp_path / "a",
                    n_samples=66, extractor=_StubFeatures())  # fmt: skip
    assert trained == []


def test_run_ntg_specialists_are_vanilla_and_a_non_vanilla_full_model_is_warned(
    tmp_path, stubbed_ntg, caplog
):
    """The paper's specialists train the plain loss whatever the full model's method; a full
    model that is not vanilla is trained as asked, with a warning (digits_adm's method is UW)."""
    ntg, trained, _ = stubbed_ntg
    with caplog.at_level("WARNING", logger="antdiff.analysis.ntg"):
        ntg.run_ntg(_small(tmp_path), [(0, 500)], specialist_steps=1, out_dir=tmp_path / "b",
                    n_samples=66, extractor=_StubFeatures())  # fmt: skip
    assert trained == [("full model", "uw"), ("specialist", "vanilla")]
    assert "method 'uw'" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="antdiff.analysis.ntg"):
        ntg.run_ntg(_small(tmp_path, "digits_adm", "--ant.method", "vanilla"), [(0, 500)],
                    specialist_steps=1, out_dir=tmp_path / "c", n_samples=66,
                    extractor=_StubFeatures())  # fmt: skip
    assert caplog.text == ""


def test_run_ntg_samples_with_the_runs_classes_guidance_and_clipping(tmp_path, stubbed_ntg):
    """A class-conditional run is sampled with its 10 digit classes and its own
    sample.cfg_scale, clipped to [-1, 1]; a latent-diffusion run is decoded and not clipped
    in latent space."""
    ntg, _, seen = stubbed_ntg
    dit = _small(tmp_path, "digits_dit", "--ant.method", "vanilla", "--sample.cfg_scale", "3.5")
    ntg.run_ntg(dit, [(0, 500)], specialist_steps=1, out_dir=tmp_path / "d", n_samples=66,
                extractor=_StubFeatures())  # fmt: skip
    assert (seen["num_classes"], seen["cfg_scale"], seen["clip_denoised"]) == (10, 3.5, True)
    assert seen["decode"] is None
    ldm = _small(tmp_path, "digits_ldm", "--ant.method", "vanilla",
                 "--data.autoencoder_steps", "2")  # fmt: skip
    ntg.run_ntg(ldm, [(0, 500)], specialist_steps=1, out_dir=tmp_path / "e", n_samples=66,
                extractor=_StubFeatures())  # fmt: skip
    assert seen["clip_denoised"] is False and seen["decode"] is not None
    assert seen["num_classes"] is None


def test_run_ntg_records_the_full_run_it_was_given(tmp_path, stubbed_ntg, monkeypatch):
    ntg, trained, _ = stubbed_ntg
    from antdiff.train import build_run

    van = _small(tmp_path, "digits_adm", "--ant.method", "vanilla")
    monkeypatch.setattr(ntg, "load_run", lambda path: build_run(van))
    res = ntg.run_ntg(None, [(0, 500)], specialist_steps=1, out_dir=tmp_path / "f",
                      full=tmp_path / "myrun", n_samples=66, extractor=_StubFeatures())  # fmt: skip
    assert res["full_model"]["run"] == str(tmp_path / "myrun")
    assert trained == [("specialist", "vanilla")]  # the full model is loaded, not trained


# ---------------------------------------- intervals, routing, quality, specialists
def test_interval_bounds_are_integers_not_bools_and_may_end_at_T():
    """True == 1 in Python, but a bool is no timestep; the last interval may end at T."""
    with pytest.raises(ValueError, match="pair of integers"):
        check_intervals([(True, 5)], 1000)
    assert check_intervals([(999, 1000), (0, 1)], 1000) == [(999, 1000), (0, 1)]


def test_uniform_intervals_take_k_from_1_to_T():
    assert uniform_intervals(4, 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]  # one task each
    assert uniform_intervals(7, 1) == [(0, 7)]
    for bad in (0, True, 2.0):
        with pytest.raises(ValueError, match="k must be"):
            uniform_intervals(10, bad)


def test_router_keeps_the_full_models_classes_for_guidance():
    """Guided sampling takes the null class from model.num_classes: through the router it is
    the full model's, and routing to an identical specialist changes no sample."""
    from antdiff.diffusion import GaussianDiffusion
    from antdiff.schedules import linear_schedule

    class Classes(_Affine):
        num_classes = 3

    full, spec = Classes(0.5), Classes(0.5)
    router = IntervalRouter(full, spec, 0, 500)
    diffusion = GaussianDiffusion(linear_schedule(1000))
    kw = dict(seed=3, steps=4, batch=4, num_classes=3, cfg_scale=2.0)
    got = sample_images(router, diffusion, 6, (1, 2, 2), **kw)
    assert router.num_classes == 3
    assert torch.equal(got, sample_images(full, diffusion, 6, (1, 2, 2), **kw))


def test_an_interval_ending_on_a_sampler_step_does_not_hold_it():
    """[334, 666) is half-open: of the 4 DDIM steps 0, 333, 666, 999 it holds none."""
    from antdiff.diffusion import GaussianDiffusion
    from antdiff.schedules import linear_schedule

    with pytest.raises(ValueError, match=r"no step of the 4-step ddim sampler falls in \[334"):
        negative_transfer_gap(
            _Zero(), {(334, 666): _Zero()}, GaussianDiffusion(linear_schedule(1000)),
            torch.zeros(3, 1, 2, 2), _StubFeatures(), n_samples=2, shape=(1, 2, 2), steps=4,
        )  # fmt: skip


def test_plot_colours_a_zero_gap_blue(tmp_path, monkeypatch):
    """NTG = 0 is no negative transfer (that is NTG < 0): its bar is blue."""
    from matplotlib.axes import Axes

    from antdiff.analysis.ntg import plot_ntg

    got, bar = {}, Axes.bar

    def spy_bar(self, x, height, *a, color=None, **kw):
        got["colors"] = list(color)
        return bar(self, x, height, *a, color=color, **kw)

    monkeypatch.setattr(Axes, "bar", spy_bar)
    res = {"intervals": [{"ntg": 0.0, "label": "[0, 500)"}, {"ntg": -0.5, "label": "[500, 1000)"}],
           "seed_gap": None, "features": "stub"}  # fmt: skip
    plot_ntg(res, tmp_path / "n.png")
    assert got["colors"] == ["tab:blue", "tab:red"]


class _Flat:
    """Features = the flattened pixels (in float64)."""

    name, dim = "flat", 8

    def __call__(self, x):
        return torch.as_tensor(x).reshape(len(x), -1).double().numpy()


def _knn_precision_recall(real, fake, k):
    """Improved precision / recall (Kynkaanniemi et al. 2019) from the definition: a ball
    around each point reaching its k-th nearest other point of the same set."""
    from scipy.spatial.distance import cdist

    r_real = np.sort(cdist(real, real), axis=1)[:, k]  # column 0 is the point itself
    r_fake = np.sort(cdist(fake, fake), axis=1)[:, k]
    d = cdist(fake, real)
    return (d <= r_real[None]).any(1).mean(), (d.T <= r_fake[None]).any(1).mean()


def test_ntg_quality_is_fid_and_k3_precision_recall_of_the_samples(monkeypatch):
    """The full model's row: FID (Frechet distance of the feature Gaussians, scipy's sqrtm)
    and precision / recall with k = 3 of the samples' features against the real ones; too few
    samples for a full-rank covariance are refused unless allow_rank_deficient."""
    import scipy.linalg

    import antdiff.sampling
    from antdiff.diffusion import GaussianDiffusion
    from antdiff.schedules import linear_schedule

    drawn = []

    def fake(model, diffusion, shape, *, generator, **kw):
        noise = [torch.randn(shape[1:], generator=g, dtype=torch.float64) for g in generator]
        drawn.append(torch.stack(noise) * 0.8 + 0.3)
        return drawn[-1]

    monkeypatch.setattr(antdiff.sampling, "sample", fake)
    real = torch.randn(40, 1, 2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    diffusion = GaussianDiffusion(linear_schedule(1000))
    kw = dict(shape=(1, 2, 4), steps=4, seed_gap=False)
    res = negative_transfer_gap(_Zero(), {(0, 500): _Zero()}, diffusion, real, _Flat(),
                                n_samples=30, batch=30, **kw)  # fmt: skip
    r, f = real.reshape(40, -1).numpy(), drawn[0].reshape(30, -1).numpy()
    mu1, mu2 = r.mean(0), f.mean(0)
    s1, s2 = np.cov(r, rowvar=False), np.cov(f, rowvar=False)
    fid = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    precision, recall = _knn_precision_recall(r, f, 3)
    assert res["full"]["fid"] == pytest.approx(fid, rel=1e-6)
    assert res["full"]["precision"] == pytest.approx(precision, abs=1e-12)
    assert res["full"]["recall"] == pytest.approx(recall, abs=1e-12)
    assert res["n_real"] == 40 and res["n_samples"] == 30
    with pytest.raises(ValueError, match="rank-deficient"):  # 6 samples of 8-dim features
        negative_transfer_gap(_Zero(), {(0, 500): _Zero()}, diffusion, real, _Flat(),
                              n_samples=6, batch=6, **kw)  # fmt: skip
    ok = negative_transfer_gap(_Zero(), {(0, 500): _Zero()}, diffusion, real, _Flat(),
                               n_samples=6, batch=6, allow_rank_deficient=True, **kw)  # fmt: skip
    assert math.isfinite(ok["full"]["fid"])


def test_run_ntg_samples_with_the_runs_guided_channels(tmp_path, stubbed_ntg):
    ntg, _, seen = stubbed_ntg
    dit = _small(tmp_path, "digits_dit", "--ant.method", "vanilla", "--sample.cfg_scale", "2",
                 "--sample.cfg_channels", "1")  # fmt: skip
    ntg.run_ntg(dit, [(0, 500)], specialist_steps=1, out_dir=tmp_path / "g", n_samples=66,
                extractor=_StubFeatures())  # fmt: skip
    assert seen["cfg_channels"] == 1


def test_ntg_samples_every_model_with_the_guided_channels(monkeypatch):
    """cfg_channels reaches every model sampled: the full model, its other noise seed and
    each routed interval."""
    import antdiff.analysis.ntg as ntg
    import antdiff.sampling
    from antdiff.diffusion import GaussianDiffusion
    from antdiff.schedules import linear_schedule

    got = []

    def fake(model, diffusion, shape, **kw):
        got.append(kw.get("cfg_channels"))
        return torch.zeros(shape)

    monkeypatch.setattr(antdiff.sampling, "sample", fake)
    monkeypatch.setattr(ntg, "_quality", lambda *a: {"fid": 1.0, "precision": 0.0, "recall": 0.0})
    negative_transfer_gap(
        _Zero(), {(0, 500): _Zero()}, GaussianDiffusion(linear_schedule(1000)),
        torch.zeros(3, 1, 2, 2), _StubFeatures(), n_samples=2, shape=(1, 2, 2), steps=4,
        cfg_channels=1,
    )  # fmt: skip
    assert got == [1, 1, 1]


def test_run_ntg_scores_digits_with_domain_features_and_folders_with_inception(
    tmp_path, stubbed_ntg, monkeypatch
):
    """The default extractor: DigitsFeatures for digits, the Inception network (stubbed here:
    no download) for any other images."""
    import antdiff.metrics

    ntg, _, _ = stubbed_ntg

    class Inception:
        name, dim = "inception-stub", 2

    used = []
    monkeypatch.setattr(antdiff.metrics, "InceptionTorchScript", Inception)
    monkeypatch.setattr(ntg, "negative_transfer_gap", lambda *a, **kw: used.append(a[4]) or {
        "intervals": [], "full": {}, "seed_gap": None})  # fmt: skip
    for i in range(4):
        Image.fromarray(np.full((8, 8), 50 * i, np.uint8)).save(tmp_path / f"{i}.png")
    folder = _small(tmp_path, "digits_adm", "--ant.method", "vanilla", "--data.source",
                    "folder", "--data.path", str(tmp_path))  # fmt: skip
    ntg.run_ntg(folder, [(0, 500)], specialist_steps=1, out_dir=tmp_path / "h", n_samples=66)
    digits = _small(tmp_path, "digits_adm", "--ant.method", "vanilla")
    ntg.run_ntg(digits, [(0, 500)], specialist_steps=1, out_dir=tmp_path / "i", n_samples=66)
    assert isinstance(used[0], Inception) and isinstance(used[1], DigitsFeatures)


def test_specialists_drop_the_full_models_method_settings(tmp_path):
    """A specialist trains the plain loss: the full model's method_kwargs (UW's lr) and
    update_every (Nash's) are not carried over (vanilla refuses both)."""
    from antdiff.analysis.ntg import specialist_config

    for extra in (["--ant.method", "uw", "--ant.method_kwargs", "{lr: 0.01}"],
                  ["--ant.method", "nash", "--ant.update_every", "2"]):  # fmt: skip
        cfg = _cfg(tmp_path, *extra)
        spec = specialist_config(cfg, 200, 400, 7, tmp_path / "s")
        assert (spec.ant.method, spec.ant.method_kwargs, spec.ant.update_every) == (
            "vanilla", {}, None)  # fmt: skip
        assert list(spec.train.t_range) == [200, 400] and spec.train.steps == 7
        assert spec.train.out_dir == str(tmp_path / "s")

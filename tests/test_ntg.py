"""Negative transfer gap: interval checks, the routing wrapper, interval specialists (the
train.t_range config key), the NTG sign/definition against an independent FID computation,
and the JSON / PNG outputs."""

from __future__ import annotations

import csv
import json
import math
import warnings

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
    "bad", [[(-1, 10)], [(10, 10)], [(50, 30)], [(900, 1001)], [], [(0, 1, 2)], [(0.5, 10)]]
)
def test_bad_intervals_raise(bad):
    with pytest.raises(ValueError, match="intervals"):
        check_intervals(bad, 1000)


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

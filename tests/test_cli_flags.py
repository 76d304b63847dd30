"""Command-line flags reach what they configure: affinity, ntg, cluster, train and plot."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from antdiff.cli import main as cli_main
from antdiff.models import create_model

pytestmark = pytest.mark.usefixtures("one_thread")


# -- antdiff affinity -------------------------------------------------------------------------


def _checkpoint(path, diffusion: bool = True, **extra) -> None:
    """A minimal-format adm-tiny checkpoint (8 channels), T = 100 linear unless diffusion=False."""
    torch.manual_seed(0)
    overrides = dict(model_channels=8, num_head_channels=8, **extra)
    model = create_model("adm-tiny", **overrides)
    for p in model.parameters():  # the zero-initialised output conv would hide the rest
        p.data.add_(0.05 * torch.randn_like(p))
    cfg = {"model": {"name": "adm-tiny", "overrides": overrides}}
    if diffusion:
        cfg["diffusion"] = {"schedule": "linear", "T": 100}
    torch.save({"model": model.state_dict(), "config": cfg}, path)


@pytest.fixture
def affinity_spy(monkeypatch):
    """Records what ``antdiff affinity`` hands task_affinity (which still runs)."""
    import antdiff.cli.affinity as cli_affinity

    seen: dict = {}
    real = cli_affinity.task_affinity

    def spy(ckpts, diffusion, x, **kw):
        seen.clear()
        seen.update(kw, T=diffusion.T)
        return real(ckpts, diffusion, x, **kw)

    monkeypatch.setattr(cli_affinity, "task_affinity", spy)
    return seen


def _affinity(*argv) -> int:
    return cli_main(["affinity", *argv, "--device", "cpu", "--no-plot"])


def test_affinity_cli_forwards_the_pass_options(tmp_path, affinity_spy):
    ck = tmp_path / "c.pt"
    _checkpoint(ck)
    assert _affinity(str(ck), "--bins", "3", "--n-samples", "3", "--block-rows", "2",
                     "--max-bytes", "123456", "--seed", "7", "--batch-size", "2",
                     "--out", str(tmp_path / "a.npz")) == 0  # fmt: skip
    got = {k: affinity_spy[k] for k in ("bins", "n_samples", "block_rows", "max_bytes", "seed",
                                        "batch_size", "bin_edges")}  # fmt: skip
    assert got == dict(bins=3, n_samples=3, block_rows=2, max_bytes=123456, seed=7,
                       batch_size=2, bin_edges=None)  # fmt: skip
    with np.load(tmp_path / "a.npz") as z:
        meta = json.loads(str(z["meta"]))
    assert meta["seed"] == 7 and meta["block_rows"] == 2


def test_affinity_cli_bin_edges_file_wins_over_bins(tmp_path, capsys):
    """--bin-edges sets the bins (a --bins beside it is left aside); with fewer than 5 bins the
    suggested cluster command names --k (cluster's default k = 5 needs 5 bins)."""
    ck, edges, out = tmp_path / "c.pt", tmp_path / "e.npy", tmp_path / "b.npz"
    _checkpoint(ck)
    np.save(edges, np.array([0, 10, 30, 100]))
    capsys.readouterr()
    assert _affinity(str(ck), "--bin-edges", str(edges), "--bins", "7", "--n-samples", "2",
                     "--out", str(out)) == 0  # fmt: skip
    with np.load(out) as z:
        assert z["bin_edges"].tolist() == [0, 10, 30, 100] and z["affinity"].shape == (3, 3)
    text = capsys.readouterr().out
    # bins of 10, 20 and 70 steps: no 3 clusters meet the default limits [16, 66], so the
    # suggestion lifts them, and it runs
    hint = "--k 3 --min-size none --max-size none\n"
    assert f"--affinity {out} --T 100 --schedule linear {hint}" in text
    suggested = text.split("next: antdiff ")[1].split()
    assert cli_main(suggested) == 0


def test_affinity_cli_T_and_schedule_serve_a_checkpoint_without_diffusion(tmp_path, capsys):
    ck, out = tmp_path / "nodiff.pt", tmp_path / "c.npz"
    _checkpoint(ck, diffusion=False)
    capsys.readouterr()
    assert _affinity(str(ck), "--T", "50", "--schedule", "cosine", "--bins", "2",
                     "--n-samples", "2", "--out", str(out)) == 0  # fmt: skip
    with np.load(out) as z:
        meta = json.loads(str(z["meta"]))
        assert z["bin_edges"].tolist() == [0, 25, 50]  # 2 equal bins of T = 50
    assert meta["T"] == 50 and meta["schedule"].startswith("cosine")
    text = capsys.readouterr().out
    assert "--T 50 --schedule cosine --k 2\n" in text  # equal bins meet the default limits


def test_affinity_cli_unlabelled_data_feeds_the_null_class(tmp_path, affinity_spy):
    """A class-conditional model trained with label dropout, given --data without labels, is
    measured on its unconditional branch: every sample gets the null class (index 10 of 10)."""
    ck, data = tmp_path / "cond.pt", tmp_path / "x.npy"
    _checkpoint(ck, num_classes=10, class_dropout_prob=0.1)
    np.save(data, (np.random.rand(4, 1, 8, 8) * 2 - 1).astype(np.float32))
    assert _affinity(str(ck), "--data", str(data), "--bins", "2", "--n-samples", "2",
                     "--out", str(tmp_path / "d.npz")) == 0  # fmt: skip
    assert affinity_spy["model_kwargs"]["y"].tolist() == [10, 10, 10, 10]


def test_affinity_cli_keeps_an_existing_default_output(tmp_path, capsys, monkeypatch):
    """Without --out, an affinity.npz an earlier pass wrote was silently replaced; now it is
    an error naming the file and the fixes (--force, or --out), and nothing is computed."""
    ck = tmp_path / "c.pt"
    _checkpoint(ck)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "affinity.npz").write_bytes(b"an earlier pass")
    args = [str(ck), "--bins", "2", "--n-samples", "2"]
    capsys.readouterr()
    assert _affinity(*args) == 2
    err = capsys.readouterr().err
    assert "'affinity.npz' already exists" in err and "--force" in err and "--out" in err
    assert (tmp_path / "affinity.npz").read_bytes() == b"an earlier pass"
    assert _affinity(*args, "--force") == 0
    with np.load(tmp_path / "affinity.npz") as z:
        assert z["affinity"].shape == (2, 2)
    assert _affinity(*args, "--out", "affinity.npz") == 0  # a file named with --out: replaced
    (tmp_path / "affinity.npz").unlink()
    assert _affinity(*args) == 0 and (tmp_path / "affinity.npz").is_file()  # free: written


# -- antdiff ntg ------------------------------------------------------------------------------


@pytest.fixture
def ntg_spy(monkeypatch):
    """Replaces the training and sampling of run_ntg: records (cfg, intervals, kwargs)."""
    import antdiff.analysis.ntg as ntg

    calls: list = []

    def spy(cfg, intervals, **kw):
        calls.append((cfg, intervals, kw))
        return {"full": {}, "seed_gap": 0.0, "intervals": [], "features": "x"}

    monkeypatch.setattr(ntg, "run_ntg", spy)
    return calls


def _ntg_base(tmp_path) -> list[str]:
    return ["ntg", "--config", "digits_adm", "--out", str(tmp_path / "o"), "--train.steps", "7"]


def test_ntg_cli_defaults(tmp_path, ntg_spy):
    """By default the paper's 5 equal intervals of [0, T = 1000), specialists trained as long
    as the full model (--train.steps), 1000 samples per FID in batches of 500, seed 0."""
    assert cli_main(_ntg_base(tmp_path)) == 0
    cfg, intervals, kw = ntg_spy[-1]
    assert intervals == [(0, 200), (200, 400), (400, 600), (600, 800), (800, 1000)]
    assert kw["specialist_steps"] == 7 and cfg.train.steps == 7
    assert (kw["n_samples"], kw["batch"], kw["seed"]) == (1000, 500, 0)


def test_ntg_cli_forwards_its_flags(tmp_path, ntg_spy):
    assert cli_main([*_ntg_base(tmp_path), "--seed", "3", "--batch", "20", "--n-samples", "100",
                     "--intervals", "0:200,800:1000", "--specialist-steps", "4"]) == 0  # fmt: skip
    _, intervals, kw = ntg_spy[-1]
    assert intervals == [(0, 200), (800, 1000)]  # t1:t2 pairs, in the order given
    assert (kw["seed"], kw["batch"], kw["n_samples"], kw["specialist_steps"]) == (3, 20, 100, 4)
    assert cli_main([*_ntg_base(tmp_path), "--intervals", "3"]) == 0
    assert ntg_spy[-1][1] == [(0, 333), (333, 666), (666, 1000)]


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_ntg_cli_feature_network_flags(tmp_path, capsys, ntg_spy):
    """--features / --inception build the named network before anything trains (a missing file
    or an unknown name is a message, and run_ntg is never called); without them run_ntg picks
    its default (extractor None)."""
    from antdiff.metrics import InceptionTorchScript

    class Layered(torch.nn.Module):  # the interface of inception-2015-12-05.pt, 2048 features
        def __init__(self) -> None:
            super().__init__()
            self.layers = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                              torch.nn.Linear(3, 2048))  # fmt: skip

        def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            return self.layers(img)

    net = tmp_path / "inception-2015-12-05.pt"
    torch.jit.script(Layered()).save(str(net))
    assert cli_main(_ntg_base(tmp_path)) == 0 and ntg_spy[-1][2]["extractor"] is None
    assert cli_main([*_ntg_base(tmp_path), "--features", "inception-clean",
                     "--inception", str(net)]) == 0  # fmt: skip
    ext = ntg_spy[-1][2]["extractor"]
    assert isinstance(ext, InceptionTorchScript) and ext.mode == "clean" and ext.path == net
    # --inception alone: the data's default network (inception for non-digits data) from it
    assert cli_main([*_ntg_base(tmp_path), "--data.source", "folder", "--data.path",
                     str(tmp_path), "--inception", str(net)]) == 0  # fmt: skip
    ext = ntg_spy[-1][2]["extractor"]
    assert isinstance(ext, InceptionTorchScript) and ext.mode == "legacy_tensorflow"
    calls = len(ntg_spy)
    for extra, message in [
        (["--features", "inception", "--inception", str(tmp_path / "none.pt")], "not found"),
        (["--features", "bicubic"], "features must be one of"),
        (["--inception", str(net)], "features='digits', which uses its own network"),
    ]:
        assert cli_main([*_ntg_base(tmp_path), *extra]) == 2
        assert message in capsys.readouterr().err
    assert len(ntg_spy) == calls


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--n-samples", "1"], "--n-samples must be >= 2"),
        (["--batch", "0"], "--batch >= 1"),
        (["--specialist-steps", "0"], "--specialist-steps must be >= 1, got 0"),
    ],
)
def test_ntg_cli_bad_values_are_messages(tmp_path, capsys, ntg_spy, extra, message):
    assert cli_main([*_ntg_base(tmp_path), *extra]) == 2
    assert message in capsys.readouterr().err and not ntg_spy


def test_ntg_cli_overrides_do_not_apply_to_a_trained_full_run(tmp_path, capsys, ntg_spy):
    argv = ["ntg", "--full", str(tmp_path / "run"), "--out", str(tmp_path / "o"),
            "--train.steps", "7"]  # fmt: skip
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert "apply to --config, not to a trained --full run" in err and not ntg_spy


# -- antdiff cluster --------------------------------------------------------------------------


def _l1_best_split(v: np.ndarray, k: int) -> list[int]:
    """The bounds minimising sum over clusters of sum |v_t - median|, by trying every split."""

    def cost(bounds):
        return sum(np.abs(v[l:r] - np.median(v[l:r])).sum() for l, r in itertools.pairwise(bounds))

    T = len(v)  # noqa: N806
    splits = ((0, *cut, T) for cut in itertools.combinations(range(1, T), k - 1))
    return list(min(splits, key=cost))


def test_cluster_cli_snr_scale(tmp_path):
    """--snr raw clusters on SNR = abar / (1 - abar) itself, log (the default) on its log: on
    this 24-step schedule the two optima differ, each found here by trying every split."""
    abar = np.cumprod(1 - np.linspace(1e-3, 0.3, 24))
    np.save(tmp_path / "ac.npy", abar)
    snr = abar / (1 - abar)
    want = {"log": _l1_best_split(np.log(snr), 3), "raw": _l1_best_split(snr, 3)}
    assert want["log"] != want["raw"]
    js = tmp_path / "c.json"
    for scale in ("log", "raw"):
        assert cli_main(["cluster", "--schedule", str(tmp_path / "ac.npy"), "--k", "3",
                         "--snr", scale, "--min-size", "none", "--max-size", "none",
                         "--json", str(js)]) == 0  # fmt: skip
        d = json.loads(js.read_text())
        assert d["bounds"] == want[scale] and d["meta"]["snr"] == scale


def test_cluster_cli_size_limits(tmp_path):
    """--max-size 200 with k = 5 over T = 1000 leaves one split: five clusters of 200 each;
    'None' (as Python prints it) means no limit like 'none'."""
    js = tmp_path / "c.json"
    assert cli_main(["cluster", "--k", "5", "--min-size", "None", "--max-size", "200",
                     "--json", str(js)]) == 0  # fmt: skip
    d = json.loads(js.read_text())
    assert d["bounds"] == [0, 200, 400, 600, 800, 1000]
    assert d["meta"]["min_size"] is None and d["meta"]["max_size"] == 200


def test_cluster_cli_affinity_of_a_custom_schedule(tmp_path, capsys):
    """An affinity .npz measured on a schedule without a name (meta 'custom') clusters on the
    linear one; four blocks of equal affinity give their four intervals."""
    T = 100  # noqa: N806
    blocks = np.arange(T) // 25
    A = np.where(blocks[:, None] == blocks[None, :], 1.0, 0.0)  # noqa: N806
    np.savez(tmp_path / "cu.npz", affinity=A[::5, ::5], bin_edges=np.arange(0, T + 1, 5),
             meta=np.array(json.dumps({"schedule": "custom"})))  # fmt: skip
    capsys.readouterr()
    assert cli_main(["cluster", "--k", "4", "--objective", "gradient",
                     "--affinity", str(tmp_path / "cu.npz")]) == 0  # fmt: skip
    assert '"bounds": [0, 25, 50, 75, 100]' in capsys.readouterr().out


# -- antdiff train ----------------------------------------------------------------------------


def test_train_cli_prints_the_cluster_weights_and_allows_config_change(tmp_path, capsys):
    """The printed summary's cluster_weights are the method's k weights (UW, k = 5: five
    positive numbers); a resume with a changed lr is refused, and allowed with
    --allow-config-change."""
    base = ["train", "--config", "digits_adm", "--train.batch_size", "10",
            "--train.ckpt_every", "1", "--train.out_dir", str(tmp_path / "r"),
            "--sample.steps", "2", "--sample.n", "4", "--train.progress", "false"]  # fmt: skip
    capsys.readouterr()
    assert cli_main([*base, "--train.steps", "1"]) == 0
    out = capsys.readouterr().out
    w = json.loads(out[out.index("{") :])["cluster_weights"]
    assert isinstance(w, list) and len(w) == 5 and all(v > 0 for v in w)
    resume = [*base, "--train.steps", "2", "--train.lr", "0.002", "--resume"]
    assert cli_main(resume) == 2
    assert "--allow-config-change" in capsys.readouterr().err
    assert cli_main([*resume, "--allow-config-change"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out[out.index("{") :])["step"] == 2


# -- antdiff plot -----------------------------------------------------------------------------


@pytest.fixture
def plot_spy(monkeypatch):
    import antdiff.analysis.report as report

    calls: list = []

    def spy(run_dir, out_dir=None):
        calls.append((str(run_dir), None if out_dir is None else str(out_dir)))
        return {"losses": "losses.png"}

    monkeypatch.setattr(report, "plot_run", spy)
    return calls


def test_plot_cli_out(tmp_path, capsys, plot_spy):
    """--out names the folder of the figures; a file there is a message before any plotting."""
    run, figs = str(tmp_path / "run"), str(tmp_path / "figs")
    assert cli_main(["plot", "--run", run]) == 0
    assert cli_main(["plot", "--run", run, "--out", figs]) == 0
    assert plot_spy == [(run, None), (run, figs)]
    (tmp_path / "f.txt").write_text("x")
    capsys.readouterr()
    assert cli_main(["plot", "--run", run, "--out", str(tmp_path / "f.txt")]) == 2
    assert "--out" in capsys.readouterr().err and len(plot_spy) == 2


# -- antdiff affinity: outputs, defaults, data and trainer checkpoints --------------------------


def test_affinity_cli_out_under_a_file_is_refused_before_the_pass(tmp_path, capsys, affinity_spy):
    """An --out that cannot be written (its folder is a file) is a message before any work."""
    ck, a_file = tmp_path / "c.pt", tmp_path / "f.txt"
    _checkpoint(ck)
    a_file.write_text("x")
    capsys.readouterr()
    assert _affinity(str(ck), "--bins", "2", "--n-samples", "2",
                     "--out", str(a_file / "a.npz")) == 2  # fmt: skip
    assert "is a file, not a folder" in capsys.readouterr().err and not affinity_spy


def test_affinity_cli_checkpoint_without_diffusion_defaults_to_linear_1000(tmp_path, capsys):
    """Without a diffusion in the checkpoint nor --schedule / --T: linear over T = 1000."""
    ck, out = tmp_path / "nodiff.pt", tmp_path / "d.npz"
    _checkpoint(ck, diffusion=False)
    capsys.readouterr()
    assert _affinity(str(ck), "--bins", "2", "--n-samples", "2", "--out", str(out)) == 0
    with np.load(out) as z:
        meta = json.loads(str(z["meta"]))
        assert z["bin_edges"].tolist() == [0, 500, 1000]
    assert meta["T"] == 1000 and meta["schedule"].startswith("linear")
    assert "--T 1000 --schedule linear --k 2" in capsys.readouterr().out


def test_affinity_cli_takes_the_checkpoint_s_prediction(tmp_path):
    """The checkpoint's diffusion settings (here v-prediction) are those the pass uses."""
    ck = tmp_path / "v.pt"
    _checkpoint(ck)
    blob = torch.load(ck, weights_only=True)
    blob["config"]["diffusion"]["prediction"] = "v"
    torch.save(blob, ck)
    out = tmp_path / "v.npz"
    assert _affinity(str(ck), "--bins", "2", "--n-samples", "2", "--out", str(out)) == 0
    with np.load(out) as z:
        assert json.loads(str(z["meta"]))["prediction"] == "v"


@pytest.fixture
def affinity_data(monkeypatch):
    """Records the x0 ``antdiff affinity`` hands task_affinity (which still runs)."""
    import antdiff.cli.affinity as cli_affinity

    seen: dict = {}
    real = cli_affinity.task_affinity

    def spy(ckpts, diffusion, x, **kw):
        seen["x"] = x
        return real(ckpts, diffusion, x, **kw)

    monkeypatch.setattr(cli_affinity, "task_affinity", spy)
    return seen


def test_affinity_cli_data_digits_by_name(tmp_path, affinity_data):
    """--data digits is sklearn's 1797 digits in [-1, 1]."""
    ck = tmp_path / "c.pt"
    _checkpoint(ck)
    assert _affinity(str(ck), "--data", "digits", "--bins", "2", "--n-samples", "2",
                     "--out", str(tmp_path / "d.npz")) == 0  # fmt: skip
    x = affinity_data["x"]
    assert tuple(x.shape) == (1797, 1, 8, 8) and x.min() >= -1 and x.max() <= 1


def test_affinity_cli_missing_data_file_is_named(tmp_path, capsys):
    ck = tmp_path / "c.pt"
    _checkpoint(ck)
    capsys.readouterr()
    assert _affinity(str(ck), "--data", str(tmp_path / "gone.npy"), "--bins", "2",
                     "--out", str(tmp_path / "d.npz")) == 2  # fmt: skip
    assert f"--data {tmp_path / 'gone.npy'} does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("bins, hint", [(4, " --k 4\n"), (5, "\n")])
def test_affinity_cli_hint_names_k_only_below_five_bins(tmp_path, capsys, bins, hint):
    """cluster's default k = 5 needs 5 bins: the suggested command adds --k below that only."""
    ck, out = tmp_path / "c.pt", tmp_path / "h.npz"
    _checkpoint(ck)
    capsys.readouterr()
    assert _affinity(str(ck), "--bins", str(bins), "--n-samples", "2", "--out", str(out)) == 0
    assert f"--affinity {out} --T 100 --schedule linear{hint}" in capsys.readouterr().out


@pytest.fixture(scope="module")
def trainer_run(tmp_path_factory):
    """A trainer run (small digits_adm, T = 100) with one checkpoint whose raw weights differ
    from its EMA ones; returns (run dir, checkpoint file)."""
    from antdiff.checkpoint import save_checkpoint
    from antdiff.config import load_config
    from antdiff.train import build_run, checkpoint_state

    small = ["--model.overrides.model_channels", "8", "--model.overrides.num_head_channels", "8"]
    run = build_run(load_config("digits_adm", [*small, "--diffusion.T", "100"]))
    with torch.no_grad():
        for p in run.model.parameters():  # the raw weights move, the EMA ones stay
            p.add_(0.05 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("trainer") / "run"
    return folder, save_checkpoint(folder, 1, checkpoint_state(run), keep=1)


def test_affinity_cli_trainer_checkpoint_gives_its_raw_weights(trainer_run):
    from antdiff.checkpoint import load_checkpoint
    from antdiff.cli.affinity import CheckpointLoader

    _, ck = trainer_run
    state, _ = load_checkpoint(ck, "cpu")
    model, _ = CheckpointLoader()(ck, "cpu")
    got = model.state_dict()
    assert any(not torch.equal(state["model"][k], state["ema"][k]) for k in state["model"])
    for name, p in state["model"].items():
        torch.testing.assert_close(got[name], p, rtol=0, atol=0)


def test_affinity_cli_latest_pointer_is_its_checkpoint(trainer_run, tmp_path):
    """<run>/checkpoints/latest stands for the checkpoint it names: the same affinity."""
    run, ck = trainer_run
    latest = run / "checkpoints" / "latest"
    got = {}
    for name, path in (("latest", latest), ("file", ck)):
        out = tmp_path / f"{name}.npz"
        assert _affinity(str(path), "--bins", "2", "--n-samples", "2", "--out", str(out)) == 0
        with np.load(out) as z:
            got[name] = z["affinity"]
    np.testing.assert_array_equal(got["latest"], got["file"])


def test_affinity_cli_data_file_wins_over_the_trainer_checkpoint_s_data(
    trainer_run, tmp_path, affinity_data
):
    _, ck = trainer_run
    x = (np.random.rand(4, 1, 8, 8) * 2 - 1).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    assert _affinity(str(ck), "--data", str(tmp_path / "x.npy"), "--bins", "2", "--n-samples",
                     "2", "--out", str(tmp_path / "a.npz")) == 0  # fmt: skip
    torch.testing.assert_close(affinity_data["x"], torch.from_numpy(x))


def test_affinity_cli_loads_a_trainer_run_s_data_once(trainer_run, tmp_path, monkeypatch):
    """Checkpoints of one run share their data set: it is loaded once, not per checkpoint."""
    import antdiff.data

    calls = []
    real = antdiff.data.load_dataset

    def counted(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(antdiff.data, "load_dataset", counted)
    run, ck = trainer_run
    assert _affinity(str(ck), str(run), "--bins", "2", "--n-samples", "2",
                     "--out", str(tmp_path / "a.npz")) == 0  # fmt: skip
    assert len(calls) == 1


# -- antdiff affinity: --device and --T checked before the pass ---------------------------------


def test_affinity_cli_device_is_checked_like_sample_s(tmp_path, capsys, monkeypatch):
    """--device tpu, or cuda without CUDA, is a message naming --device (as for sample and
    eval), not torch's RuntimeError from deep in the checkpoint loading."""
    ck = tmp_path / "c.pt"
    _checkpoint(ck)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    base = ["affinity", str(ck), "--bins", "2", "--n-samples", "2", "--no-plot",
            "--out", str(tmp_path / "a.npz")]  # fmt: skip
    capsys.readouterr()
    for device, message in (("tpu", "--device 'tpu' is not a device antdiff runs on"),
                            ("cuda", "--device cuda: CUDA is not available here")):  # fmt: skip
        assert cli_main([*base, "--device", device]) == 2, device
        assert message in capsys.readouterr().err, device


def test_affinity_cli_T_zero_is_refused_not_read_as_unset(tmp_path, capsys, affinity_spy):
    """--T 0 for a checkpoint without a diffusion is an error (T must be positive), not the
    default T = 1000 (a 0 was taken for "not given")."""
    ck = tmp_path / "nodiff.pt"
    _checkpoint(ck, diffusion=False)
    capsys.readouterr()
    assert _affinity(str(ck), "--T", "0", "--bins", "2", "--n-samples", "2",
                     "--out", str(tmp_path / "z.npz")) == 2  # fmt: skip
    assert "got 0" in capsys.readouterr().err and not affinity_spy


# -- antdiff sample ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cond_run(tmp_path_factory):
    """A one-step class-conditional digits_adm run (10 classes, 8 x 8 images)."""
    run = tmp_path_factory.mktemp("cond") / "run"
    assert cli_main(["train", "--config", "digits_adm", "--data.class_conditional", "true",
                     "--train.steps", "1", "--train.batch_size", "10", "--train.progress",
                     "false", "--sample.n", "2", "--sample.steps", "2", "--train.threads", "1",
                     "--train.out_dir", str(run)]) == 0  # fmt: skip
    return run


def _sample(run, out, *extra) -> int:
    return cli_main(["sample", "--ckpt", str(run), "--steps", "2", "--out", str(out), *extra])


def test_sample_cli_labels_are_written_listed_and_replaced(cond_run, tmp_path, capsys):
    """A class-conditional run's labels (sample i has class i % 10) go to labels.npy, listed
    in sample.json, or into the .pt; a rerun in the other format removes the earlier run's
    samples and labels, and names just those."""
    out = tmp_path / "s"
    assert _sample(cond_run, out, "--num", "12", "--no-progress") == 0
    assert np.load(out / "labels.npy").tolist() == [i % 10 for i in range(12)]
    meta = json.loads((out / "sample.json").read_text())
    assert meta["files"] == ["samples.png", "samples.npy", "labels.npy"]
    capsys.readouterr()
    assert _sample(cond_run, out, "--num", "3", "--no-progress", "--format", "pt") == 0
    blob = torch.load(out / "samples.pt", weights_only=True)
    assert blob["x"].shape == (3, 1, 8, 8) and blob["y"].tolist() == [0, 1, 2]
    assert sorted(f.name for f in out.iterdir()) == ["sample.json", "samples.png", "samples.pt"]
    text = capsys.readouterr().out
    assert f"removed the earlier run's labels.npy, samples.npy from {out}\n" in text


def test_sample_cli_records_the_weights_and_batch_size(cond_run, tmp_path):
    """sample.json names the weights drawn from and the batch size (which changes the samples
    only by float rounding): EMA and 500 by default, --no-ema and --batch-size as given."""
    for extra, want in (([], ("ema", 500)), (["--no-ema", "--batch-size", "2"], ("raw", 2))):
        out = tmp_path / want[0]
        assert _sample(cond_run, out, "--num", "3", "--no-progress", *extra) == 0
        meta = json.loads((out / "sample.json").read_text())
        assert (meta["weights"], meta["batch_size"]) == want
        assert meta["noise"] == "per-image"  # how the seed made the noise


def test_sample_and_eval_name_a_seed_torch_cannot_take_before_loading(tmp_path, capsys):
    """A seed past torch's range is named as the flag before the checkpoint or the feature
    network loads (a missing checkpoint would be the error otherwise)."""
    from antdiff.cli import main

    for cmd in (["sample", "--out", str(tmp_path / "s")], ["eval", "--json", str(tmp_path / "e")]):
        assert main([*cmd, "--ckpt", str(tmp_path / "none"), "--num", "3",
                     "--seed", str(2**64)]) == 2  # fmt: skip
        err = capsys.readouterr().err
        assert "--seed must lie in [-2**63, 2**64)" in err, err


def test_sample_cli_one_sample_in_batches_of_one(cond_run, tmp_path):
    """--num and --batch-size take any value >= 1, 1 included."""
    out = tmp_path / "one"
    assert _sample(cond_run, out, "--num", "1", "--batch-size", "1", "--no-progress") == 0
    assert np.load(out / "samples.npy").shape == (1, 1, 8, 8)


def test_sample_cli_no_progress_hides_the_bar(cond_run, tmp_path, capsys):
    """The tqdm bar (named after the sampler and steps, "ddim-2") is shown unless
    --no-progress."""
    capsys.readouterr()
    for extra, shown in (([], True), (["--no-progress"], False)):
        assert _sample(cond_run, tmp_path / str(shown), "--num", "2", *extra) == 0
        assert ("ddim-2" in capsys.readouterr().err) == shown, extra


def test_sample_cli_grid_holds_the_first_n_samples(cond_run, tmp_path):
    """--grid 5 of 6 samples: the first five, in rows of ceil(sqrt(5)) = 3 (two rows) of 8 px
    images with 1 px borders, upscaled 4x."""
    from matplotlib import image as mpimg

    from antdiff.logging_utils import image_grid

    out = tmp_path / "g"
    assert _sample(cond_run, out, "--num", "6", "--grid", "5", "--no-progress") == 0
    png = mpimg.imread(out / "samples.png")
    assert png.shape[:2] == ((2 * 9 + 1) * 4, (3 * 9 + 1) * 4)
    x = torch.from_numpy(np.load(out / "samples.npy"))
    want = image_grid(x[:5]).repeat(4, axis=0).repeat(4, axis=1)
    np.testing.assert_array_equal(np.round(png[..., :3] * 255).astype(np.uint8), want)


def test_sample_cli_out_is_created_with_its_parents(cond_run, tmp_path):
    out = tmp_path / "a" / "b" / "c"
    assert _sample(cond_run, out, "--num", "2", "--no-progress") == 0
    assert (out / "samples.npy").is_file() and (out / "sample.json").is_file()


def test_sample_cli_unreadable_or_foreign_sample_json(cond_run, tmp_path):
    """An --out whose sample.json is not JSON is no error (nothing there counts as a run's);
    of what a sample.json lists, only the names a sample run writes are removed, never
    another file."""
    out = tmp_path / "s"
    out.mkdir()
    (out / "sample.json").write_text("{not json")
    assert _sample(cond_run, out, "--num", "2", "--no-progress") == 0
    assert json.loads((out / "sample.json").read_text())["num"] == 2
    meta = json.loads((out / "sample.json").read_text())
    meta["files"] = [*meta["files"], "notes.txt"]
    (out / "sample.json").write_text(json.dumps(meta))
    (out / "notes.txt").write_text("mine")
    assert _sample(cond_run, out, "--num", "2", "--no-progress", "--format", "pt") == 0
    assert (out / "notes.txt").read_text() == "mine" and not (out / "samples.npy").exists()


def _stop_while_writing(monkeypatch, name: str | None = None) -> None:
    """utils.atomic_write interrupted (KeyboardInterrupt) after writing "{" into ``name`` (any
    file when None), as a kill in the middle of the write."""
    from pathlib import Path

    import antdiff.utils as utils

    real = utils.atomic_write

    def stop(path, write, mode="wb"):
        if name is not None and Path(path).name != name:
            return real(path, write, mode)

        def half(f):
            f.write("{")
            raise KeyboardInterrupt

        return real(path, half, mode)

    monkeypatch.setattr(utils, "atomic_write", stop)


def test_sample_cli_json_is_written_atomically(cond_run, tmp_path, monkeypatch):
    """A run stopped while sample.json is being written leaves no sample.json at all (never a
    truncated one) and no temp file."""
    _stop_while_writing(monkeypatch, "sample.json")
    out = tmp_path / "s"
    assert _sample(cond_run, out, "--num", "2", "--no-progress") == 130
    assert not (out / "sample.json").exists() and not list(out.glob(".*.tmp"))


def test_sample_cli_decoded_latent_run_writes_pixels(tmp_path):
    """A latent run with its codec (digits_ldm) is decoded: sample.json says "space": "pixel"
    and has no latent_scale / latent_shift; the images are 8 x 8 in [-1, 1]."""
    run = tmp_path / "ldm"
    assert cli_main(["train", "--config", "digits_ldm", "--train.steps", "1",
                     "--train.batch_size", "8", "--data.autoencoder_steps", "2",
                     "--train.progress", "false", "--sample.n", "2", "--sample.steps", "1",
                     "--train.threads", "1", "--train.out_dir", str(run)]) == 0  # fmt: skip
    out = tmp_path / "s"
    assert _sample(run, out, "--num", "2", "--no-progress") == 0
    meta = json.loads((out / "sample.json").read_text())
    assert meta["space"] == "pixel" and "latent_scale" not in meta
    x = np.load(out / "samples.npy")
    assert x.shape == (2, 1, 8, 8) and np.abs(x).max() <= 1


# -- antdiff cluster: T, backend, outputs -----------------------------------------------------


def test_cluster_cli_T_zero_is_refused_as_not_positive(capsys):
    """--T 0 is a T that is not positive, not "no --T" (1000) with advice to drop --T."""
    capsys.readouterr()
    assert cli_main(["cluster", "--T", "0"]) == 2
    err = capsys.readouterr().err
    assert "T must be a positive integer, got 0" in err and "drop --T" not in err


def test_cluster_cli_backend_reaches_the_dp(monkeypatch):
    import antdiff.cli.cluster as cluster_cli

    seen = []
    real = cluster_cli.cluster_timesteps

    def spy(*a, **kw):
        seen.append(kw["backend"])
        return real(*a, **kw)

    monkeypatch.setattr(cluster_cli, "cluster_timesteps", spy)
    for backend in ("numpy", "cpp", "auto"):
        assert cli_main(["cluster", "--T", "100", "--k", "2", "--backend", backend]) == 0
    assert seen == ["numpy", "cpp", "auto"]


def test_cluster_cli_json_is_written_atomically(tmp_path, monkeypatch):
    """A run stopped while --json is being written keeps the earlier file whole."""
    js = tmp_path / "c.json"
    js.write_text('{"earlier": true}')
    _stop_while_writing(monkeypatch, "c.json")
    assert cli_main(["cluster", "--T", "100", "--k", "2", "--json", str(js)]) == 130
    assert js.read_text() == '{"earlier": true}' and not list(tmp_path.glob(".*.tmp"))


def test_cluster_cli_prints_the_bounds_json_only_without_outputs(tmp_path, capsys, monkeypatch):
    """The one-line {"bounds", "cost"} JSON goes to stdout when neither --json nor --plot is
    given; with either, the file is the output and "wrote ..." is said instead."""
    import antdiff.cli.cluster as cluster_cli

    monkeypatch.setattr(cluster_cli, "plot_clusters", lambda c, s, path: path.write_bytes(b"x"))
    base = ["cluster", "--T", "100", "--k", "2"]
    capsys.readouterr()
    for extra in ([], ["--plot", str(tmp_path / "c.png")], ["--json", str(tmp_path / "c.json")]):
        assert cli_main([*base, *extra]) == 0
        out = capsys.readouterr().out
        assert ('{"bounds": [0, ' in out) == (not extra), extra
        assert ("wrote " in out) == bool(extra), extra


# -- antdiff ntg: the full model's source, --out, abbreviations -------------------------------


def test_ntg_cli_config_and_full_together_are_refused(tmp_path, capsys, ntg_spy):
    argv = ["ntg", "--config", "digits_adm", "--full", str(tmp_path / "run"),
            "--out", str(tmp_path / "o")]  # fmt: skip
    capsys.readouterr()
    assert cli_main(argv) == 2
    assert "--config and --full: give one" in capsys.readouterr().err and not ntg_spy


def test_ntg_cli_out_that_is_a_file_is_refused_before_any_training(tmp_path, capsys, ntg_spy):
    (tmp_path / "f.txt").write_text("x")
    argv = ["ntg", "--config", "digits_adm", "--out", str(tmp_path / "f.txt")]
    capsys.readouterr()
    assert cli_main(argv) == 2
    assert "--out" in capsys.readouterr().err and not ntg_spy


def test_ntg_cli_full_run_is_handed_to_run_ntg_with_its_config(tmp_path, ntg_spy, monkeypatch):
    """--full RUN: run_ntg gets that run (not a fresh full model) and the run's saved config,
    whose train.steps the specialists default to."""
    import yaml

    import antdiff.checkpoint
    from antdiff.config import dump_config, load_config

    saved = yaml.safe_load(dump_config(load_config("digits_adm", ["--train.steps", "9"])))
    monkeypatch.setattr(antdiff.checkpoint, "load_checkpoint",
                        lambda path, *a, **k: ({"config": saved}, path))  # fmt: skip
    run = str(tmp_path / "run")
    assert cli_main(["ntg", "--full", run, "--out", str(tmp_path / "o")]) == 0
    cfg, _, kw = ntg_spy[-1]
    assert kw["full"] == run and cfg.train.steps == 9 and kw["specialist_steps"] == 9


def test_ntg_cli_options_are_not_abbreviated(tmp_path, capsys, ntg_spy):
    """--specialist 4 is not --specialist-steps 4 (an abbreviation would also swallow config
    keys): it is an unknown key."""
    capsys.readouterr()
    assert cli_main([*_ntg_base(tmp_path), "--specialist", "4"]) == 2
    assert "unknown config key 'specialist'" in capsys.readouterr().err and not ntg_spy


def test_ntg_cli_a_key_given_twice_is_refused(tmp_path, capsys, ntg_spy):
    """As for train: a config key given twice is an error, not "the last one wins"."""
    capsys.readouterr()
    assert cli_main([*_ntg_base(tmp_path), "--train.steps", "8"]) == 2
    err = capsys.readouterr().err
    assert "--train.steps is given twice ('7', then '8'); give it once" in err and not ntg_spy


def test_ntg_cli_prints_a_summary_naming_the_out_folder(tmp_path, capsys, ntg_spy):
    capsys.readouterr()
    assert cli_main(_ntg_base(tmp_path)) == 0
    out = capsys.readouterr().out
    summary = json.loads(out[out.index("{") :])
    assert summary == {"full": {}, "seed_gap": 0.0, "ntg": {}, "features": "x",
                       "out": str(tmp_path / "o")}  # fmt: skip


# -- antdiff eval -----------------------------------------------------------------------------


@pytest.fixture
def eval_spy(monkeypatch):
    """Replaces evaluate_checkpoint: records its (ckpt, num, kwargs), returns fixed metrics."""
    import antdiff.evaluate as ev

    calls: list = []

    def spy(ckpt, num, **kw):
        calls.append((ckpt, num, kw))
        return {"fid": 1.5, "precision": 0.25, "recall": 0.75, "num": num, "features": "digits"}

    monkeypatch.setattr(ev, "evaluate_checkpoint", spy)
    return calls


def test_eval_cli_forwards_every_flag(tmp_path, eval_spy):
    inc, ref, cache, js = (tmp_path / n for n in ("inc.pt", "ref.npy", "cache", "r.json"))
    assert cli_main(["eval", "--ckpt", str(tmp_path / "run"), "--num", "7", "--sampler", "ddim",
                     "--steps", "3", "--spacing", "leading", "--eta", "0.5", "--cfg-scale", "2",
                     "--cfg-channels", "3", "--variance", "large", "--no-ema", "--seed", "4",
                     "--batch-size", "5", "--no-progress", "--device", "cpu",
                     "--features", "inception", "--inception", str(inc), "--ref", str(ref),
                     "--k", "4", "--cache-dir", str(cache), "--json", str(js),
                     "--vae", str(tmp_path / "vae")]) == 0  # fmt: skip
    ckpt, num, kw = eval_spy[-1]
    assert (str(ckpt), num) == (str(tmp_path / "run"), 7)
    assert kw == dict(sampler="ddim", steps=3, cfg_scale=2.0, seed=4, ema=False,
                      features="inception", inception=inc, ref=str(ref), k=4, batch_size=5,
                      progress=False, cache_dir=cache, device="cpu", spacing="leading", eta=0.5,
                      cfg_channels=3, variance="large", vae=tmp_path / "vae")  # fmt: skip
    assert json.loads(js.read_text())["fid"] == 1.5


def test_eval_cli_defaults(tmp_path, eval_spy):
    """EMA weights, digits features and reference, k = 3, seed 0, batches of 500, progress bar,
    no cache folder, the run's own sampler / steps / guidance / variance."""
    assert cli_main(["eval", "--ckpt", str(tmp_path / "run"), "--num", "7", "--device", "cpu",
                     "--json", str(tmp_path / "r.json")]) == 0  # fmt: skip
    kw = eval_spy[-1][2]
    assert kw == dict(sampler=None, steps=None, cfg_scale=None, seed=0, ema=True,
                      features="digits", inception=None, ref="digits", k=3, batch_size=500,
                      progress=True, cache_dir=None, device="cpu", spacing="linspace", eta=0.0,
                      cfg_channels="run", variance="run", vae=None)  # fmt: skip


def test_eval_cli_json_is_written_atomically(tmp_path, eval_spy, monkeypatch):
    """A run stopped while --json is being written keeps the earlier results whole."""
    js = tmp_path / "r.json"
    js.write_text('{"earlier": true}')
    _stop_while_writing(monkeypatch)
    assert cli_main(["eval", "--ckpt", str(tmp_path / "run"), "--num", "7", "--device", "cpu",
                     "--json", str(js)]) == 130  # fmt: skip
    assert js.read_text() == '{"earlier": true}' and not list(tmp_path.glob(".*.tmp"))


# -- antdiff train: the printed summary, ranks, option typos ----------------------------------


@pytest.fixture
def train_stub(monkeypatch):
    """Replaces antdiff.train.train: records its config and options, returns ``summary``."""
    import antdiff.train as tr

    calls: list = []
    summary: dict = {}

    def stub(cfg, resume=None, allow_config_change=False):
        calls.append((cfg, resume, allow_config_change))
        return dict(summary)

    monkeypatch.setattr(tr, "train", stub)
    return calls, summary


def test_train_cli_summary_is_strict_json_with_null_for_non_finite(capsys, train_stub):
    """A NaN loss and an infinite cluster weight (numpy or torch values) print as null."""
    from types import SimpleNamespace

    _, summary = train_stub
    summary.update(step=3, loss=float("nan"), run=SimpleNamespace(dist=None),
                   stats={"weight": torch.tensor([0.5, float("inf")])})  # fmt: skip
    capsys.readouterr()
    assert cli_main(["train", "--config", "digits_adm"]) == 0
    out = capsys.readouterr().out

    def refuse(name):
        raise AssertionError(f"non-strict JSON: {name}")

    got = json.loads(out[out.index("{") :], parse_constant=refuse)
    assert got == {"step": 3, "loss": None, "cluster_weights": [0.5, None]}


def test_train_cli_only_the_main_process_prints_the_summary(capsys, train_stub):
    """Under torchrun the summary is printed by rank 0 (dist.is_main) alone."""
    from types import SimpleNamespace

    _, summary = train_stub
    for is_main in (False, True):
        summary.update(step=1, run=SimpleNamespace(dist=SimpleNamespace(is_main=is_main)))
        capsys.readouterr()
        assert cli_main(["train", "--config", "digits_adm"]) == 0
        assert ('"step": 1' in capsys.readouterr().out) == is_main, is_main


def test_train_cli_other_ranks_do_not_warn(caplog, monkeypatch, train_stub):
    """The ckpt_every=0 warning is said once, by rank 0 (RANK unset or "0"), not by rank 1."""
    import logging

    argv = ["train", "--config", "digits_adm", "--train.ckpt_every", "0"]
    for rank, warned in (("1", False), ("0", True)):
        monkeypatch.setenv("RANK", rank)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="antdiff.train"):
            assert cli_main(argv) == 0
        assert ("train.ckpt_every=0" in caplog.text) == warned, rank


def test_train_cli_a_shortened_option_gets_a_suggestion(capsys, train_stub):
    calls, _ = train_stub
    capsys.readouterr()
    assert cli_main(["train", "--config", "digits_adm", "--conf", "x"]) == 2
    assert "unknown option --conf (did you mean --config?)" in capsys.readouterr().err
    assert not calls


# -- antdiff: exit codes and help --------------------------------------------------------------


def test_cli_without_a_command_prints_help_and_exits_2(capsys):
    assert cli_main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_cli_a_missing_extra_is_a_message(capsys, monkeypatch):
    """An ImportError (an optional package not installed) is a one-line error, exit 2."""
    import antdiff.cli.cluster as cluster_cli

    def needs_an_extra(args):
        raise ImportError("pip install 'antdiff[extra]'")

    monkeypatch.setattr(cluster_cli, "run", needs_an_extra)
    capsys.readouterr()
    assert cli_main(["cluster"]) == 2
    assert capsys.readouterr().err == "antdiff cluster: error: pip install 'antdiff[extra]'\n"


def test_cli_help_that_names_its_default_gets_no_second_one(capsys):
    """--min-size's help says "default: T/(2k)": no "(default: default)" is appended."""
    with pytest.raises(SystemExit):
        cli_main(["cluster", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "default: T/(2k)" in text and "(default: default)" not in text

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
    assert f"--affinity {out} --T 100 --schedule linear --k 3\n" in text


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
    assert "--T 50 --schedule cosine --k 2" in capsys.readouterr().out


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

"""Task affinity: exactness against a float64 reference, blocking, averaging, bad input, CLI, O1."""

from __future__ import annotations

import copy
import json
import time

import numpy as np
import pytest
import torch
from torch import nn

from antdiff.analysis import AffinityResult, AffinityTasks, make_bin_edges, task_affinity
from antdiff.cli import main
from antdiff.diffusion import GaussianDiffusion
from antdiff.models import create_model
from antdiff.schedules import linear_schedule

T_SMALL = 40


class TinyNet(nn.Module):
    """eps(x_t, t) for 2x2 single-channel images: a one-hidden-layer MLP with a t embedding."""

    def __init__(self, hidden: int = 16, T: int = T_SMALL) -> None:  # noqa: N803
        super().__init__()
        self.emb = nn.Embedding(T, hidden)
        self.inp = nn.Linear(4, hidden)
        self.out = nn.Linear(hidden, 4)
        self.drop = nn.Dropout(0.5)  # must be off during the affinity pass

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = self.drop(torch.tanh(self.inp(x.flatten(1)) + self.emb(t)))
        return self.out(h).view_as(x)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def setup():
    torch.manual_seed(1)
    diffusion = GaussianDiffusion(linear_schedule(T_SMALL))
    data = torch.rand(13, 1, 2, 2) * 2 - 1
    return TinyNet(), diffusion, data


def reference_affinity(model, schedule, data, edges, n, seed) -> np.ndarray:
    """float64 model, whole-bin autograd.grad, explicit eps-MSE loss, cosine in float64."""
    m = copy.deepcopy(model).double().eval()
    tasks = AffinityTasks(edges, data.shape[0], n, data.shape[1:], seed)
    x0 = data[tasks.index].double()
    ab = torch.from_numpy(np.array(schedule.alphas_cumprod))
    rows = []
    for b in range(edges.size - 1):
        t, eps = tasks.draw(b)
        assert int(t.min()) >= edges[b] and int(t.max()) < edges[b + 1]
        a = ab[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps.double()
        loss = ((m(x_t, t) - eps.double()) ** 2).flatten(1).mean(1).mean()
        grads = torch.autograd.grad(loss, list(m.parameters()), allow_unused=True)
        rows.append(
            torch.cat(
                [
                    torch.zeros(p.numel(), dtype=torch.float64) if g is None else g.flatten()
                    for p, g in zip(m.parameters(), grads)
                ]
            )
        )
    J = torch.stack(rows)  # noqa: N806
    G = J @ J.T  # noqa: N806
    d = G.diagonal().sqrt()
    return (G / d[:, None] / d[None, :]).numpy()


def test_matches_float64_reference(setup):
    model, diffusion, data = setup
    model.train()
    before = [p.grad for p in model.parameters()]
    res = task_affinity(model, diffusion, data, bins=7, n_samples=11, batch_size=4, seed=3)
    ref = reference_affinity(model, diffusion.schedule, data, res.bin_edges, 11, 3)
    np.testing.assert_allclose(res.affinity, ref, atol=1e-5, rtol=0)
    assert res.affinity.dtype == np.float64 and res.affinity.shape == (7, 7)
    np.testing.assert_array_equal(res.bin_edges, (np.arange(8) * T_SMALL) // 7)
    np.testing.assert_array_equal(res.affinity, res.affinity.T)
    np.testing.assert_array_equal(np.diag(res.affinity), np.ones(7))
    assert res.n_samples == 11 and res.n_checkpoints == 1
    # the pass leaves the model as it found it
    assert model.training and all(p.grad is g for p, g in zip(model.parameters(), before))


class ScaledNet(TinyNet):
    """TinyNet with a learnable scalar (a 0-d parameter) on its output."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(0.7))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.gain * super().forward(x, t)


def test_a_scalar_parameter_is_a_column_of_the_gradients(setup):
    """A 0-d parameter's gradient view (it raised a TypeError) is one column of J."""
    _, diffusion, data = setup
    torch.manual_seed(2)
    model = ScaledNet()
    res = task_affinity(model, diffusion, data, bins=5, n_samples=7, batch_size=4, seed=3)
    ref = reference_affinity(model, diffusion.schedule, data, res.bin_edges, 7, 3)
    np.testing.assert_allclose(res.affinity, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("weighting", ["p2", "min_snr"])
def test_training_weights_do_not_change_the_tasks(setup, weighting):
    """A task is the unweighted L_t: the weighted training loss reweighted the timesteps inside
    a bin (0.03 off the eps-MSE affinity with P2 or Min-SNR)."""
    model, _, data = setup
    diffusion = GaussianDiffusion(linear_schedule(T_SMALL), loss_weighting=weighting)
    res = task_affinity(model, diffusion, data, bins=4, n_samples=16, batch_size=16, seed=2)
    ref = reference_affinity(model, diffusion.schedule, data, res.bin_edges, 16, 2)
    np.testing.assert_allclose(res.affinity, ref, atol=1e-5, rtol=0)


def test_explicit_bin_edges_and_per_timestep(setup):
    model, diffusion, data = setup
    edges = np.array([0, 3, 4, 17, 40])
    res = task_affinity(model, diffusion, data, bin_edges=edges, n_samples=5, batch_size=5)
    ref = reference_affinity(model, diffusion.schedule, data, edges, 5, 0)
    np.testing.assert_allclose(res.affinity, ref, atol=1e-5, rtol=0)
    full = task_affinity(model, diffusion, data, bins=T_SMALL, n_samples=2, batch_size=2)
    assert full.affinity.shape == (T_SMALL, T_SMALL)
    np.testing.assert_array_equal(full.bin_edges, np.arange(T_SMALL + 1))


def test_tasks_fixed_by_seed_only():
    edges = make_bin_edges(100, 4)
    a = AffinityTasks(edges, 10, 23, (1, 2, 2), seed=5)
    b = AffinityTasks(edges, 10, 23, (1, 2, 2), seed=5)
    c = AffinityTasks(edges, 10, 23, (1, 2, 2), seed=6)
    assert torch.equal(a.index, b.index) and sorted(set(a.index.tolist())) == list(range(10))
    for k in range(4):
        (ta, ea), (tb, eb), (tc, _) = a.draw(k), b.draw(k), c.draw(k)
        assert torch.equal(ta, tb) and torch.equal(ea, eb) and not torch.equal(ta, tc)
        assert int(ta.min()) >= edges[k] and int(ta.max()) < edges[k + 1]


def test_blocked_bf16_model_sums_every_entry_in_float32(setup):
    """A bf16 model's J is bf16: the streamed bins' entries of G came from a bf16 product (the
    others from gram's float32 sums), so the affinity moved with block_rows (1.3e-3)."""
    model, diffusion, data = setup
    model, data = copy.deepcopy(model).bfloat16(), data.bfloat16()
    kw = dict(bins=7, n_samples=6, batch_size=4, seed=1)
    one = task_affinity(model, diffusion, data, **kw)
    blocked = task_affinity(model, diffusion, data, block_rows=2, **kw)
    np.testing.assert_allclose(blocked.affinity, one.affinity, atol=1e-6, rtol=0)


@pytest.mark.parametrize("rows, passes", [(2, 7 + 6 + 5 + 4 + 3 + 2), (3, 7 + 5 + 3), (4, 7 + 4)])
def test_blocked_equals_single_pass(setup, rows, passes):
    model, diffusion, data = setup
    kw = dict(bins=7, n_samples=6, batch_size=4, seed=1)
    one = task_affinity(model, diffusion, data, **kw)
    assert one.meta["block_rows"] == 7 and one.meta["bin_passes"] == [7]
    blocked = task_affinity(model, diffusion, data, block_rows=rows, **kw)
    np.testing.assert_allclose(blocked.affinity, one.affinity, atol=1e-6, rtol=0)
    assert blocked.meta["block_rows"] == rows and blocked.meta["bin_passes"] == [passes]
    # the same blocking from a memory budget of `rows` fp32 rows of P numbers
    P = sum(p.numel() for p in model.parameters())  # noqa: N806
    budget = task_affinity(model, diffusion, data, max_bytes=rows * P * 4 + 3, **kw)
    assert budget.meta["block_rows"] == rows
    np.testing.assert_allclose(budget.affinity, blocked.affinity, atol=1e-12, rtol=0)


def test_average_over_checkpoints(setup):
    model, diffusion, data = setup
    other = TinyNet()
    kw = dict(bins=5, n_samples=8, batch_size=8, seed=2)
    both = task_affinity([model, other], diffusion, data, **kw)
    a = task_affinity(model, diffusion, data, **kw).affinity
    b = task_affinity(other, diffusion, data, **kw).affinity
    assert both.n_checkpoints == 2 and not np.allclose(a, b, atol=1e-3)
    np.testing.assert_allclose(both.affinity, (a + b) / 2, atol=1e-12, rtol=0)
    assert len(both.meta["grad_norms"]) == 2


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(bins=T_SMALL + 1), "bins must be an integer in \\[1, T=40\\], got 41"),
        (dict(bins=0), "bins must be an integer in \\[1, T=40\\], got 0"),
        (dict(n_samples=0), "n_samples must be an integer >= 1, got 0"),
        (dict(batch_size=0), "batch_size must be an integer >= 1"),
        (dict(bin_edges=np.array([0, 10, 20])), "cover \\[0, T\\).*\\[0, 10, 20\\]"),
        (dict(bin_edges=np.array([1, 10, 40])), "from 0 to T=40"),
        (dict(bin_edges=np.array([0, 10, 10, 40])), "increase strictly"),
        (dict(bin_edges=np.array([0.0, 20.5, 40.0])), "integer array"),
        (dict(bins=3, bin_edges=np.array([0, 20, 40])), "bins=3 disagrees"),
        (dict(bins=4, block_rows=1), "block_rows must be an integer >= 2, got 1"),
    ],
)
def test_bad_input(setup, kwargs, match):
    model, diffusion, data = setup
    with pytest.raises(ValueError, match=match):
        task_affinity(model, diffusion, data, **{"n_samples": 2, **kwargs})


def test_mixed_models_are_rejected(setup):
    model, diffusion, data = setup
    with pytest.raises(ValueError, match=r"models\[0\] \(TinyNet\) and models\[2\] \(TinyNet\)"):
        task_affinity([model, TinyNet(), TinyNet(hidden=8)], diffusion, data, n_samples=2)
    with pytest.raises(ValueError, match="class and parameter shapes differ"):
        task_affinity([model, nn.Linear(4, 4)], diffusion, data, n_samples=2)
    with pytest.raises(TypeError, match="models_or_checkpoints"):
        task_affinity([], diffusion, data)
    with pytest.raises(ValueError, match="data must be a tensor"):
        task_affinity(model, diffusion, data[0, 0, 0])


def test_save_load_roundtrip(setup, tmp_path):
    model, diffusion, data = setup
    res = task_affinity(model, diffusion, data, bins=4, n_samples=3)
    back = AffinityResult.load(res.save(tmp_path / "a.npz"))
    np.testing.assert_array_equal(back.affinity, res.affinity)
    np.testing.assert_array_equal(back.bin_edges, res.bin_edges)
    assert back.meta["checkpoints"] == res.meta["checkpoints"]
    res.save(tmp_path / "b.npy")
    np.testing.assert_array_equal(np.load(tmp_path / "b_edges.npy"), res.bin_edges)
    with pytest.raises(ValueError, match=r"\.npz or \.npy"):
        res.save(tmp_path / "c.txt")


def _tiny_adm_checkpoint(path, seed: int, channels: int = 8, T: int = 100, **extra) -> None:  # noqa: N803
    torch.manual_seed(seed)
    overrides = dict(model_channels=channels, num_head_channels=channels, **extra)
    model = create_model("adm-tiny", **overrides)
    for p in model.parameters():  # the zero-initialised output conv would hide the rest
        p.data.add_(0.05 * torch.randn_like(p))
    cfg = {
        "model": {"name": "adm-tiny", "overrides": overrides},
        "diffusion": {"schedule": "linear", "T": T},
    }
    torch.save({"model": model.state_dict(), "config": cfg}, path)


def test_cli_writes_what_cluster_accepts(tmp_path, capsys):
    a, b = tmp_path / "c1.pt", tmp_path / "c2.pt"
    _tiny_adm_checkpoint(a, 0)
    _tiny_adm_checkpoint(b, 1)
    out = tmp_path / "aff.npz"
    args = ["affinity", str(a), str(b), "--bins", "5", "--n-samples", "4", "--batch-size", "4"]
    capsys.readouterr()
    assert main([*args, "--out", str(out), "--device", "cpu"]) == 0
    # the hint names the checkpoint's schedule (cluster's default is linear, whatever trained)
    assert f"--affinity {out} --T 100 --schedule linear" in capsys.readouterr().out
    for name in ("aff.npz", "aff_timestep.png", "aff_logsnr.png"):
        assert (tmp_path / name).stat().st_size > 0
    with np.load(out) as z:
        assert z["affinity"].shape == (5, 5) and int(z["n_samples"]) == 4
        np.testing.assert_array_equal(z["bin_edges"], [0, 20, 40, 60, 80, 100])
        assert list(z["checkpoints"]) == [str(a), str(b)]
        assert json.loads(str(z["meta"]))["T"] == 100
    js = tmp_path / "clusters.json"
    cluster = ["cluster", "--objective", "gradient", "--T", "100", "--k", "2"]
    assert main([*cluster, "--affinity", str(out), "--json", str(js)]) == 0
    bounds = json.loads(js.read_text())["bounds"]
    assert bounds[0] == 0 and bounds[-1] == 100 and set(bounds) <= {0, 20, 40, 60, 80, 100}
    # .npy + <stem>_edges.npy works the same way
    npy = tmp_path / "aff2.npy"
    assert (
        main(
            [
                *args[:2],
                "--bins",
                "4",
                "--n-samples",
                "2",
                "--out",
                str(npy),
                "--no-plot",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert main([*cluster, "--affinity", str(npy)]) == 0


def test_cli_data_files_labels_pixels_and_early_errors(tmp_path, capsys, monkeypatch):
    """--data files: a .pt's labels reach a class-conditional model (they were dropped for the
    null class), uint8 pixels are scaled to [-1, 1] (they were used as 0..255), an untrained
    null class, a dict without 'x' and a bad --out are clear errors, the last before the pass;
    the default bins fit T < 50."""
    import antdiff.cli.affinity as cli_affinity

    seen: dict = {}
    real = cli_affinity.task_affinity

    def spy(ckpts, diffusion, x, **kw):
        seen.update(x=x, y=kw["model_kwargs"].get("y"), bins=kw["bins"])
        return real(ckpts, diffusion, x, **kw)

    monkeypatch.setattr(cli_affinity, "task_affinity", spy)
    ck = tmp_path / "c.pt"
    _tiny_adm_checkpoint(ck, 0, T=40, num_classes=10)  # label dropout 0: null class untrained
    u8 = torch.randint(0, 256, (6, 1, 8, 8), dtype=torch.uint8)
    labels = torch.tensor([3, 1, 4, 1, 5, 9])
    torch.save({"x": u8, "y": labels}, tmp_path / "d.pt")
    np.save(tmp_path / "d.npy", u8.numpy())
    torch.save({"images": u8}, tmp_path / "nox.pt")
    base = ["affinity", str(ck), "--n-samples", "2", "--batch-size", "2", "--device", "cpu",
            "--no-plot", "--out", str(tmp_path / "a.npz")]  # fmt: skip
    assert main([*base, "--data", str(tmp_path / "d.pt")]) == 0
    assert torch.equal(seen["y"], labels) and seen["bins"] is None  # None: min(50, T) = 40
    # as stored: the pass scales the rows it uses to [-1, 1] (the whole file as float32 was
    # four times its size in memory)
    assert seen["x"].dtype == torch.uint8 and torch.equal(seen["x"], u8)
    with np.load(tmp_path / "a.npz") as z:
        assert z["affinity"].shape == (40, 40)
    capsys.readouterr()
    for data, err in (("d.npy", "null class was never trained"), ("nox.pt", "under 'x'")):
        assert main([*base, "--data", str(tmp_path / data)]) == 2
        assert err in capsys.readouterr().err
    # labels outside the model's classes (its null class 10 untrained here): a message, not an
    # IndexError traceback inside the model
    for bad in (12, -1, 10):
        torch.save({"x": u8, "y": labels.clone().fill_(bad)}, tmp_path / "bad.pt")
        assert main([*base, "--data", str(tmp_path / "bad.pt")]) == 2
        assert "labels must be class indices in [0, 9]" in capsys.readouterr().err
    seen.clear()
    assert main([*base[:-1], str(tmp_path / "a.txt"), "--data", str(tmp_path / "d.pt")]) == 2
    assert "--out must end in .npz or .npy" in capsys.readouterr().err and not seen


def test_cli_rejects_mixed_checkpoints(tmp_path, capsys):
    a, b = tmp_path / "small.pt", tmp_path / "wide.pt"
    _tiny_adm_checkpoint(a, 0, channels=8)
    _tiny_adm_checkpoint(b, 0, channels=16)
    rc = main(
        [
            "affinity",
            str(a),
            str(b),
            "--bins",
            "3",
            "--n-samples",
            "2",
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "x.npz"),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and str(a) in err and str(b) in err and "different models" in err
    assert not (tmp_path / "x.npz").exists()


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    try:
        from scipy.stats import spearmanr
    except ImportError:

        def rank(v):  # average ranks for ties
            order = np.argsort(v, kind="stable")
            r = np.empty(len(v))
            r[order] = np.arange(len(v), dtype=np.float64)
            for u in np.unique(v):
                r[v == u] = r[v == u].mean()
            return r

        return float(np.corrcoef(rank(x), rank(y))[0, 1])
    return float(spearmanr(x, y).correlation)


@pytest.mark.slow
def test_o1_affinity_falls_with_timestep_distance():
    """the paper's observation O1 on digits: Spearman(affinity_ij, |i - j|) over i < j <= -0.8.

    adm-tiny, vanilla eps-MSE training (linear schedule, T = 1000, AdamW lr 1e-3, batch 64) for
    500 steps; the 20-bin affinity over 256 samples, averaged over the checkpoints at steps 300
    and 500 as the paper averages over training. Measured: -0.822 (a single checkpoint ranges
    from -0.60 to -0.82 between steps 100 and 1000, hence the average).
    """
    from sklearn.datasets import load_digits

    start = time.perf_counter()
    x = torch.from_numpy(load_digits().images.astype(np.float32) / 8.0 - 1.0)[:, None]
    diffusion = GaussianDiffusion(linear_schedule(1000))
    torch.manual_seed(0)
    model = create_model("adm-tiny")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    checkpoints = []
    for step in range(1, 501):
        idx = torch.randint(0, len(x), (64,), generator=g)
        t = torch.randint(0, 1000, (64,), generator=g)
        loss = diffusion.training_losses(model, x[idx], t)["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step in (300, 500):
            checkpoints.append(copy.deepcopy(model))
    res = task_affinity(checkpoints, diffusion, x, bins=20, n_samples=256, batch_size=128)
    i, j = np.triu_indices(20, 1)
    rho = _spearman(res.affinity[i, j], (j - i).astype(np.float64))
    print(f"O1: Spearman = {rho:.4f} ({time.perf_counter() - start:.1f} s)")
    assert rho <= -0.8


def test_cli_reads_trainer_checkpoints(tmp_path, capsys):
    """Checkpoints written by the trainer (file or run directory); data from their config."""
    from antdiff.checkpoint import save_checkpoint
    from antdiff.config import load_config
    from antdiff.train import build_run, checkpoint_state

    small = ["--model.overrides.model_channels", "8", "--model.overrides.num_head_channels", "8"]
    cfg = load_config("digits_adm", [*small, "--diffusion.T", "100", "--ant.k", "2"])
    run = build_run(cfg)
    first = save_checkpoint(tmp_path / "run", 1, checkpoint_state(run), keep=2)
    with torch.no_grad():
        for p in run.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_checkpoint(tmp_path / "run", 2, checkpoint_state(run), keep=2)
    out = tmp_path / "aff.npz"
    args = ["--bins", "4", "--n-samples", "3", "--device", "cpu", "--no-plot", "--out", str(out)]
    assert main(["affinity", str(first), str(tmp_path / "run"), *args]) == 0
    with np.load(out) as z:
        np.testing.assert_array_equal(z["bin_edges"], [0, 25, 50, 75, 100])
        assert int(z["n_checkpoints"]) == 2 and np.all(np.isfinite(z["affinity"]))
    # the checkpoint's diffusion is the one its weights learned: a contradicting flag is refused
    capsys.readouterr()
    for flag in (["--T", "1000"], ["--schedule", "cosine"]):
        assert main(["affinity", str(first), *args, *flag]) == 2
        assert f"{flag[0]} {flag[1]}: the checkpoint was trained with" in capsys.readouterr().err
    assert main(["affinity", str(first), *args, "--T", "100", "--schedule", "linear"]) == 0
    capsys.readouterr()
    assert main(["affinity", str(first), *args, "--image-size", "16"]) == 2  # ignored before
    assert "drop --image-size" in capsys.readouterr().err
    cut = tmp_path / "cut.pt"  # a truncated checkpoint: a message, not torch's traceback
    cut.write_bytes(first.read_bytes()[: first.stat().st_size // 2])
    assert main(["affinity", str(cut), *args]) == 2
    assert "is corrupted or truncated" in capsys.readouterr().err


def test_paths_equal_modules(tmp_path):
    """The library loads minimal-format checkpoints itself; same numbers as the modules."""
    from antdiff.analysis import load_affinity_checkpoint

    paths = [tmp_path / "a.pt", tmp_path / "b.pt"]
    for i, p in enumerate(paths):
        _tiny_adm_checkpoint(p, i)
    models = [load_affinity_checkpoint(p)[0] for p in paths]
    diffusion = GaussianDiffusion(linear_schedule(100))
    x = torch.rand(6, 1, 8, 8) * 2 - 1
    kw = dict(bins=3, n_samples=4, batch_size=4)
    from_paths = task_affinity(paths, diffusion, x, **kw)
    np.testing.assert_array_equal(
        from_paths.affinity, task_affinity(models, diffusion, x, **kw).affinity
    )
    assert from_paths.meta["checkpoints"] == [str(p) for p in paths]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        task_affinity([tmp_path / "missing.pt"], diffusion, x, **kw)
    # uint8 pixels: only the rows the pass uses are converted (the same numbers)
    pix = torch.randint(0, 256, (6, 1, 8, 8), dtype=torch.uint8)
    np.testing.assert_array_equal(
        task_affinity(models[:1], diffusion, pix, **kw).affinity,
        task_affinity(models[:1], diffusion, pix.float() / 127.5 - 1, **kw).affinity,
    )
    frozen = models[0].requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        task_affinity([frozen], diffusion, x, **kw)
    # weights of another model than the config names: the error says which model they are for
    ckpt = torch.load(paths[0], weights_only=True)
    ckpt["model"]["label_emb.weight"] = torch.zeros(11, 32)
    torch.save(ckpt, tmp_path / "c.pt")
    with pytest.raises(ValueError, match="weights are for model 'adm-tiny'.*unexpected keys"):
        load_affinity_checkpoint(tmp_path / "c.pt")


def test_logsnr_edges_sit_half_a_step_before_each_bin_edge():
    """Bin [e_b, e_{b+1}) spans log-SNR at t = e_b - 1/2 .. e_{b+1} - 1/2, clamped to the first
    and last timestep: an inner edge is the mean of its neighbours' log-SNR."""
    from antdiff.analysis.plots import logsnr_edges
    from antdiff.schedules import as_schedule, linear_schedule

    sched = as_schedule(linear_schedule(100))
    ls = np.asarray(sched.log_snr, dtype=np.float64)
    got = logsnr_edges(np.array([0, 50, 100]), sched)
    np.testing.assert_allclose(got, [ls[0], (ls[49] + ls[50]) / 2, ls[99]], rtol=1e-12)


class GatedNet(nn.Module):
    """eps = w * x for t >= 20 and 0 below: the loss of a bin inside [0, 20) does not depend on
    w, so that bin's gradient is exactly zero."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x * self.w * (t >= 20).to(x.dtype).view(-1, 1, 1, 1)


def test_a_bin_with_zero_gradient_is_an_error():
    """A zero bin gradient has no direction: its cosines are undefined (0 / 0), so the pass
    names the bins instead of returning NaN or made-up entries."""
    diffusion = GaussianDiffusion(linear_schedule(T_SMALL))
    data = torch.rand(5, 1, 2, 2) * 2 - 1
    # 4 bins of 10 timesteps: bins 0 and 1 lie below t = 20
    with pytest.raises(ValueError, match=r"bin\(s\) \[0, 1\] is zero or non-finite"):
        task_affinity(GatedNet(), diffusion, data, bins=4, n_samples=3)


def test_checkpoints_of_different_diffusions_are_not_averaged(tmp_path):
    """Two checkpoints of the same architecture and weights, one trained with T = 100 and one
    with T = 40, learned different tasks: their affinities are not averaged."""
    a, b = tmp_path / "t100.pt", tmp_path / "t40.pt"
    _tiny_adm_checkpoint(a, 0, T=100)
    _tiny_adm_checkpoint(b, 0, T=40)
    diffusion = GaussianDiffusion(linear_schedule(100))
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    with pytest.raises(ValueError, match=r"different models \(their config differ\)"):
        task_affinity([a, b], diffusion, x, bins=2, n_samples=2)


def test_a_module_elsewhere_than_device_is_refused(setup):
    """A module given as such is not moved: one on the CPU with device='cuda' (or any other
    device than its own) is an error naming it, whether CUDA is present or not."""
    model, diffusion, data = setup
    with pytest.raises(ValueError, match=r"models\[0\] \(TinyNet\) is on cpu.*move it first"):
        task_affinity(model, diffusion, data, bins=2, n_samples=2, device="cuda")
    assert task_affinity(model, diffusion, data, bins=2, n_samples=2, device="cpu").nb == 2


def test_affinity_figures_put_t0_top_left_and_name_bins_and_checkpoints(tmp_path, monkeypatch):
    """Both heat maps show t = 0 (the least noise, the highest log-SNR) at the top left, and
    their titles give the bins, checkpoints and samples per bin."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from antdiff.analysis import plot_affinity_figures
    from antdiff.analysis.plots import logsnr_edges
    from antdiff.schedules import as_schedule

    figs = []
    close = plt.close

    def keep(fig=None):
        figs.append(fig)
        return close(fig)

    monkeypatch.setattr(plt, "close", keep)
    edges = np.array([0, 10, 40, 100])
    sched = linear_schedule(100)
    res = AffinityResult(np.eye(3), edges, 4, 2, {})
    paths = plot_affinity_figures(res, sched, tmp_path / "aff")
    assert [p.name for p in paths] == ["aff_timestep.png", "aff_logsnr.png"]
    assert len(figs) == 2
    ls = np.asarray(as_schedule(sched).log_snr, dtype=np.float64)
    # the corner cells' outer coordinates: t = 0 and t = T on the timestep axis; on the log-SNR
    # axis the first and last timestep's log-SNR (log-SNR falls as t grows)
    for fig, (first, last) in zip(figs, [(0.0, 100.0), (ls[0], ls[-1])]):
        ax = fig.axes[0]
        (x0, y0), (x1, y1) = ax.transData.transform([[first, first], [last, last]])
        assert x0 < x1 and y0 > y1  # display y grows upwards: t = 0 left and on top
        title = ax.get_title()
        assert "3 bins" in title and "2 checkpoint(s)" in title and "4 samples/bin" in title
    assert figs[0].axes[0].get_title().startswith("task affinity vs timestep")
    assert figs[1].axes[0].get_title().startswith("task affinity vs log-SNR")
    # bin edges for another T than the schedule's do not describe its timesteps
    with pytest.raises(ValueError, match="end at 50 but the schedule has T=100"):
        logsnr_edges(np.array([0, 25, 50]), sched)


# --- A linear model with labels: affinity and gradient norms in closed form -------------------


class LinearEps(nn.Module):
    """eps(x_t, t, y) = W x_t + c + E[y] on 2x2 single-channel images: the gradient of the
    eps-MSE is closed-form, so the reference below needs no autograd."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.W = nn.Parameter(0.5 * torch.randn(4, 4))
        self.c = nn.Parameter(0.5 * torch.randn(4))
        self.E = nn.Parameter(0.5 * torch.randn(classes, 4))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (x.flatten(1) @ self.W.T + self.c + self.E[y]).view_as(x)


def linear_bin_gradients(model, data, y, edges, n, seed) -> np.ndarray:
    """J [nb, P] in float64, P = (W, c, E) flattened: g_b = grad of (1/n) sum_s mean_d r_sd^2,
    r_s = W x_s + c + E[y_s] - eps_s, x_s = sqrt(ab_t) x0_s + sqrt(1 - ab_t) eps_s, with the
    linear schedule's ab recomputed here (betas rescaled by 1000 / T)."""
    W, c, E = (p.detach().double().numpy() for p in (model.W, model.c, model.E))  # noqa: N806
    betas = np.linspace(1e-4 * 1000 / T_SMALL, 0.02 * 1000 / T_SMALL, T_SMALL)
    ab = np.cumprod(1.0 - betas)
    tasks = AffinityTasks(edges, data.shape[0], n, data.shape[1:], seed)
    idx = tasks.index.numpy()
    x0, ys = data.double().numpy().reshape(len(data), -1)[idx], y.numpy()[idx]
    rows = []
    for b in range(len(edges) - 1):
        t, eps = tasks.draw(b)
        t, eps = t.numpy(), eps.double().numpy().reshape(n, -1)
        x = np.sqrt(ab[t])[:, None] * x0 + np.sqrt(1 - ab[t])[:, None] * eps
        r = x @ W.T + c + E[ys] - eps  # [n, 4]
        k = 2.0 / (n * r.shape[1])
        gE = np.zeros_like(E)  # noqa: N806
        np.add.at(gE, ys, k * r)
        rows.append(np.concatenate([(k * r.T @ x).ravel(), k * r.sum(0), gE.ravel()]))
    return np.stack(rows)


def test_linear_model_with_labels_matches_the_closed_form():
    """Labels follow their data points through the seeded selection (n > N reuses them) and
    the batches; grad_norms are |g_b| of the bin's MEAN loss; the meta records the seed."""
    torch.manual_seed(4)
    model = LinearEps()
    diffusion = GaussianDiffusion(linear_schedule(T_SMALL))
    data = torch.rand(7, 1, 2, 2) * 2 - 1
    y = torch.tensor([0, 2, 1, 1, 0, 2, 2])
    edges = np.array([0, 5, 18, 40])
    res = task_affinity(
        model, diffusion, data, bin_edges=edges, n_samples=10, batch_size=3, seed=9,
        model_kwargs={"y": y},
    )  # fmt: skip
    J = linear_bin_gradients(model, data, y, edges, 10, 9)  # noqa: N806
    norms = np.linalg.norm(J, axis=1)
    np.testing.assert_allclose(res.affinity, (J @ J.T) / np.outer(norms, norms), atol=1e-5, rtol=0)
    np.testing.assert_allclose(res.meta["grad_norms"], [norms], rtol=1e-4, atol=0)
    assert (
        res.meta["seed"] == 9
        and res.meta["T"] == T_SMALL
        and res.meta["checkpoints"] == ["models[0] (LinearEps)"]
    )


# --- The pass leaves the model as it found it: eval mode, existing gradients, errors ----------


def test_an_eval_model_with_gradients_keeps_them(setup):
    model, diffusion, data = setup
    model.eval()
    before = [torch.full_like(p, 0.25 * i) for i, p in enumerate(model.parameters())]
    for p, g in zip(model.parameters(), before):
        p.grad = g
    task_affinity(model, diffusion, data, bins=3, n_samples=4, batch_size=4)
    assert not model.training and not any(m.training for m in model.modules())
    for i, (p, g) in enumerate(zip(model.parameters(), before)):
        assert p.grad is g and torch.equal(g, torch.full_like(p, 0.25 * i))


class FailsLateNet(TinyNet):
    """TinyNet whose forward raises for t >= 30 (the last of 4 bins of T = 40)."""

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if int(t.max()) >= 30:
            raise RuntimeError("late bin")
        return super().forward(x, t)


def test_a_pass_that_raises_still_restores_mode_and_gradients(setup):
    _, diffusion, data = setup
    model = FailsLateNet().train()
    with pytest.raises(RuntimeError, match="late bin"):
        task_affinity(model, diffusion, data, bins=4, n_samples=3, batch_size=3)
    assert model.training and all(p.grad is None for p in model.parameters())


def test_submodule_modes_are_restored(setup):
    """A train-mode model with a submodule its owner keeps in eval (a frozen teacher, an EMA
    copy): the pass gives each module back its own mode, not the top-level one (a restore by
    model.train(was_training) put them all in training)."""
    model, diffusion, data = setup
    model.train()
    model.drop.eval()
    task_affinity(model, diffusion, data, bins=2, n_samples=3, batch_size=3)
    assert model.training and model.inp.training and not model.drop.training


# --- Bad gradients and bad inputs ---------------------------------------------------------------


def test_a_non_finite_gradient_is_an_error(setup):
    model, diffusion, data = setup
    with torch.no_grad():
        model.out.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"bin\(s\) \[0, 1\] is zero or non-finite"):
        task_affinity(model, diffusion, data, bins=2, n_samples=3)


def test_bad_model_kwargs_empty_data_and_boolean_bins(setup):
    model, diffusion, data = setup
    with pytest.raises(ValueError, match=r"model_kwargs\['y'\] must be a tensor with N=13 rows"):
        task_affinity(model, diffusion, data, bins=2, n_samples=2, model_kwargs={"y": data[:5]})
    with pytest.raises(ValueError, match=r"with N >= 1, got a tensor of shape \[0, 1, 2, 2\]"):
        task_affinity(model, diffusion, data[:0], bins=2, n_samples=2)
    with pytest.raises(ValueError, match="bins must be an integer in \\[1, T=40\\], got True"):
        task_affinity(model, diffusion, data, bins=True, n_samples=2)


# --- The fixed tasks and the default bins -------------------------------------------------------


def test_each_bin_has_its_own_noise_and_the_seed_picks_the_data_points():
    edges = np.array([0, 10, 20, 30])
    a = AffinityTasks(edges, 50, 8, (1, 2, 2), seed=5)
    eps = [a.draw(b)[1] for b in range(3)]
    assert not torch.equal(eps[0], eps[1]) and not torch.equal(eps[1], eps[2])
    # bin b's draws depend on (seed, b) only, not on the other bins' edges
    other = AffinityTasks(np.array([0, 10, 20, 40]), 50, 8, (1, 2, 2), seed=5)
    assert torch.equal(other.draw(1)[0], a.draw(1)[0]) and torch.equal(other.draw(1)[1], eps[1])
    assert not torch.equal(AffinityTasks(edges, 50, 8, (1, 2, 2), seed=6).index, a.index)


def test_default_bins_are_min_50_T():
    np.testing.assert_array_equal(make_bin_edges(100), np.arange(51) * 2)
    np.testing.assert_array_equal(make_bin_edges(40), np.arange(41))


# --- Rows of J from block_rows and the memory budget ------------------------------------------


def test_rows_of_j_from_block_rows_and_the_budget(setup, monkeypatch):
    """block_rows above nb allocates nb rows; a budget under two rows still gets two (a single
    row cannot hold a block and a streamed bin); max_bytes=None is half the free memory; the
    budget counts trainable parameters only."""
    import antdiff.analysis.affinity as aff

    model, diffusion, data = setup
    kw = dict(bins=4, n_samples=5, batch_size=5, seed=1)
    one = task_affinity(model, diffusion, data, **kw)
    assert task_affinity(model, diffusion, data, block_rows=10, **kw).meta["block_rows"] == 4
    real_fill, calls = aff._fill_row, []

    def bounded_fill(*args):  # a pass that made no progress would loop forever
        calls.append(args[3])
        assert len(calls) <= 4 * 5 // 2, "more bin gradients than a 2-row pass needs"
        return real_fill(*args)

    monkeypatch.setattr(aff, "_fill_row", bounded_fill)
    tiny = task_affinity(model, diffusion, data, max_bytes=1, **kw)
    assert tiny.meta["block_rows"] == 2 and tiny.meta["bin_passes"] == [4 + 3 + 2]
    np.testing.assert_allclose(tiny.affinity, one.affinity, atol=1e-6, rtol=0)
    monkeypatch.setattr(aff, "_fill_row", real_fill)
    P = sum(p.numel() for p in model.parameters())  # noqa: N806
    monkeypatch.setattr(aff, "_free_bytes", lambda device: 2 * (3 * P * 4 + 3))
    assert task_affinity(model, diffusion, data, **kw).meta["block_rows"] == 3
    model.emb.requires_grad_(False)  # frozen: not a column of J, not in the budget
    P = sum(p.numel() for p in model.parameters() if p.requires_grad)  # noqa: N806
    part = task_affinity(model, diffusion, data, max_bytes=3 * P * 4 + 3, **kw)
    assert part.meta["block_rows"] == 3


# --- Saved files: every field back, written atomically ----------------------------------------


def test_load_gives_back_every_field(tmp_path):
    meta = {"checkpoints": ["a.pt", "b.pt"], "seed": 4, "grad_norms": [[1.0, 2.0]]}
    res = AffinityResult(np.array([[1.0, 0.5], [0.5, 1.0]]), np.array([0, 3, 10]), 7, 2, meta)
    back = AffinityResult.load(res.save(tmp_path / "r.npz"))
    assert (back.n_samples, back.n_checkpoints, back.meta) == (7, 2, meta)
    assert back.bin_edges.dtype == np.int64 and back.affinity.dtype == np.float64


@pytest.mark.parametrize("name, writer", [("r.npz", "savez"), ("r.npy", "save")])
def test_a_failed_save_keeps_the_previous_file(tmp_path, monkeypatch, name, writer):
    old = AffinityResult(np.eye(2), np.array([0, 3, 10]), 7, 1, {})
    path = old.save(tmp_path / name)
    before = path.read_bytes()

    real = getattr(np, writer)

    def broken(f, *args, **kwargs):  # the affinity's write fills the disk halfway
        if writer == "save" and args[0].ndim != 2:  # the .npy's bin edges go through
            return real(f, *args, **kwargs)
        if isinstance(f, (str, type(path))):
            f = open(f, "wb")  # noqa: SIM115
        f.write(b"PK\x03\x04 partial")
        f.close()
        raise OSError("no space left on device")

    monkeypatch.setattr(np, writer, broken)
    new = AffinityResult(np.full((2, 2), 0.5), np.array([0, 3, 10]), 7, 1, {})
    with pytest.raises(OSError, match="no space left"):
        new.save(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [name, "r_edges.npy"] if name.endswith(".npy") else [name]
    )


# --- A module and checkpoint paths in one call ------------------------------------------------


def test_a_module_and_its_checkpoint_path_average_together(tmp_path):
    """A module has no config to compare: it goes with checkpoints of its architecture."""
    from antdiff.analysis import load_affinity_checkpoint

    path = tmp_path / "a.pt"
    _tiny_adm_checkpoint(path, 0)
    module = load_affinity_checkpoint(path)[0]
    diffusion = GaussianDiffusion(linear_schedule(100))
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    kw = dict(bins=2, n_samples=2, batch_size=2)
    both = task_affinity([module, path], diffusion, x, **kw)
    assert both.n_checkpoints == 2
    np.testing.assert_allclose(
        both.affinity, task_affinity(module, diffusion, x, **kw).affinity, atol=1e-12, rtol=0
    )


def test_bin_edges_as_whole_number_floats_are_taken_and_fractions_refused():
    """np.linspace's edges are floats: whole numbers are taken as the timestep indices they
    are (as clustering takes them); a fraction, NaN or a 2-D array is refused by name."""
    np.testing.assert_array_equal(make_bin_edges(100, bin_edges=np.linspace(0, 100, 5)),
                                  [0, 25, 50, 75, 100])  # fmt: skip
    assert make_bin_edges(100, bin_edges=np.linspace(0, 100, 5)).dtype == np.int64
    for bad in (np.array([0, 12.5, 100]), np.array([0, np.nan, 100]), np.zeros((2, 2))):
        with pytest.raises(ValueError, match="bin_edges must be a 1-D integer array"):
            make_bin_edges(100, bin_edges=bad)

"""Walk-through of the analysis tools: ntg refuses an interval its sampler never visits before
anything trains, a complex affinity matrix is refused, and `antdiff cluster --schedule FILE.npy`
warns of per-step alphas as the API does."""

from __future__ import annotations

import types

import numpy as np
import pytest


def test_ntg_rejects_unvisited_interval_before_training(monkeypatch, tmp_path):
    from antdiff.analysis import ntg
    from antdiff.config import load_config

    cfg = load_config("digits_adm", ["--sample.steps", "1", "--ant.method", "vanilla"])

    def no_training(*a, **k):
        raise AssertionError("trained a model before validating the intervals")

    monkeypatch.setattr(ntg, "_trained", no_training)
    stub = types.SimpleNamespace(dim=64, name="stub")
    with pytest.raises(ValueError, match="no step"):
        ntg.run_ntg(cfg, [(0, 200)], specialist_steps=1, out_dir=tmp_path, n_samples=70,
                    extractor=stub)  # fmt: skip


def test_gradient_clusters_refuse_complex_affinity():
    import warnings

    import numpy as np

    from antdiff import cluster_timesteps
    from antdiff.schedules import make_schedule

    A = np.eye(8) + 1j * np.ones((8, 8))  # noqa: N806
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="real"):
            cluster_timesteps(make_schedule("cosine", 8), 2, "gradient", affinity=A)


def test_cluster_cli_warns_on_per_step_alphas_file(tmp_path, capsys):
    import numpy as np

    from antdiff.cli import main

    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    path = tmp_path / "alphas.npy"
    np.save(path, 1.0 - betas)  # the per-step alphas, not alphas_cumprod
    with pytest.warns(UserWarning, match="per-step alphas"):
        assert main(["cluster", "--schedule", str(path), "--k", "5"]) == 0


def test_ntg_refuses_an_interval_given_twice():
    """`--intervals 0:200,0:200` was merged into one specialist silently."""
    from antdiff.analysis.ntg import check_intervals

    with pytest.raises(ValueError, match=r"\[0, 200\) is given twice"):
        check_intervals([(0, 200), (200, 400), (0, 200)], 1000)


def test_cluster_cli_names_missing_bin_edges_of_a_binned_affinity(tmp_path, capsys):
    """A binned [nb, nb] .npy without its *_edges.npy was read as per timestep with T = nb and
    failed with "T=6 is too small for the linear schedule"; the message names the edges."""
    from antdiff.cli import main

    np.save(tmp_path / "aff.npy", np.eye(6))
    assert main(["cluster", "--objective", "gradient", "--affinity", str(tmp_path / "aff.npy"),
                 "--k", "2"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "has no bin edges (no aff_edges.npy beside it)" in err and "--T" in err

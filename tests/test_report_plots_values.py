"""What the run figures and the affinity heat maps hold: read back from the matplotlib figures
(line data, mesh coordinates, image arrays, labels, titles, scales) of small synthetic logs
written into tmp_path, against values computed here."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from antdiff.analysis import report
from antdiff.analysis.plots import logsnr_edges, plot_affinity, plot_affinity_figures
from antdiff.analysis.report import (
    _labels,
    _moving_average,
    load_run_logs,
    plot_cluster_curves,
    plot_matrix,
    plot_run,
)
from antdiff.cli import main as cli_main
from antdiff.schedules import as_schedule, linear_schedule

EDGES = np.array([0, 10, 40, 100])
# not symmetric: a transposed matrix or swapped axes show
A3 = np.array([[1.0, 0.2, -0.3], [0.5, 1.0, 0.1], [-0.7, 0.4, 1.0]])


@pytest.fixture
def figs(monkeypatch):
    """The figures the code under test closes, in order (they stay inspectable once closed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    closed: list = []
    close = plt.close

    def keep(fig=None):
        closed.append(fig)
        return close(fig)

    monkeypatch.setattr(plt, "close", keep)
    return closed


def _write_run(d, rows, tele=None, config=None):
    """A run directory: metrics.csv from ``rows`` [(step, loss, [losses], [weights])],
    telemetry.jsonl from ``tele`` (dicts or raw lines), config.yaml from ``config``."""
    from antdiff.logging_utils import csv_columns

    d.mkdir(parents=True, exist_ok=True)
    k = len(rows[0][2]) if rows else 2
    with open(d / "metrics.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(csv_columns(k))
        for step, loss, losses, weights in rows:
            w.writerow([step, loss, *losses, *weights, 0.1, 1.0, "nan"])
    if tele is not None:
        lines = [t if isinstance(t, str) else json.dumps(t) for t in tele]
        (d / "telemetry.jsonl").write_text("".join(ln + "\n" for ln in lines))
    if config is not None:
        (d / "config.yaml").write_text(config)
    return d


def _centred_mean(y, half):
    """Mean of the finite values of y[i - half .. i + half] (clipped at the ends)."""
    out = []
    for i in range(len(y)):
        win = y[max(0, i - half) : i + half + 1]
        win = win[np.isfinite(win)]
        out.append(win.mean() if win.size else np.nan)
    return np.array(out)


# --- plots.py: the affinity heat maps ---------------------------------------------------------


def test_logsnr_edges_of_unequal_bins_and_a_wrong_last_edge():
    sched = linear_schedule(100)
    ls = np.asarray(as_schedule(sched).log_snr, dtype=np.float64)
    want = [ls[0], (ls[9] + ls[10]) / 2, (ls[39] + ls[40]) / 2, ls[99]]
    np.testing.assert_allclose(logsnr_edges(EDGES, sched), want, rtol=1e-12)
    with pytest.raises(ValueError, match="end at 150 but the schedule has T=100"):
        logsnr_edges(np.array([0, 50, 150]), sched)


def test_timestep_heat_map_cells_labels_and_orientation(tmp_path, figs):
    path = plot_affinity(A3, EDGES, tmp_path / "a.png")
    assert path == tmp_path / "a.png" and path.read_bytes()[:4] == b"\x89PNG"
    (fig,) = figs
    ax = fig.axes[0]
    (mesh,) = ax.collections
    # cell (i, j) = A[i, j] spans rows [e_i, e_i+1) and columns [e_j, e_j+1)
    np.testing.assert_array_equal(np.asarray(mesh.get_array()).reshape(3, 3), A3)
    xy = mesh.get_coordinates()
    np.testing.assert_array_equal(xy[0, :, 0], EDGES)
    np.testing.assert_array_equal(xy[:, 0, 1], EDGES)
    assert mesh.get_cmap().name == "viridis"
    assert ax.get_xlabel() == ax.get_ylabel() == "timestep t"
    assert ax.yaxis_inverted() and not ax.xaxis_inverted()
    assert ax.get_aspect() == 1.0
    assert ax.get_title() == "task affinity (cosine of bin gradients) vs timestep t"
    assert fig.axes[1].get_ylabel() == "cosine similarity"  # the colour bar


def test_logsnr_heat_map_cells_and_orientation(tmp_path, figs):
    sched = linear_schedule(100)
    plot_affinity(A3, EDGES, tmp_path / "b.png", schedule=sched, axis="logsnr", title="mine")
    (fig,) = figs
    ax = fig.axes[0]
    (mesh,) = ax.collections
    np.testing.assert_array_equal(np.asarray(mesh.get_array()).reshape(3, 3), A3)
    want = logsnr_edges(EDGES, sched)
    xy = mesh.get_coordinates()
    np.testing.assert_allclose(xy[0, :, 0], want)
    np.testing.assert_allclose(xy[:, 0, 1], want)
    assert ax.get_xlabel() == ax.get_ylabel() == "log SNR"
    assert ax.xaxis_inverted() and not ax.yaxis_inverted()
    assert ax.get_title() == "mine"


def test_plot_affinity_closes_its_figure(tmp_path):
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    plot_affinity(A3, EDGES, tmp_path / "a.png")
    assert plt.get_fignums() == before


def test_plot_affinity_refuses_bad_shapes_and_axes(tmp_path):
    sched = linear_schedule(100)
    with pytest.raises(ValueError, match=r"affinity must be \[nb, nb\].*got \[3, 2\]"):
        plot_affinity(A3[:, :2], EDGES, tmp_path / "a.png")
    with pytest.raises(ValueError, match=r"affinity must be \[nb, nb\].*got \[3\]"):
        plot_affinity(A3[0], EDGES, tmp_path / "a.png")
    with pytest.raises(ValueError, match=r"nb = len\(bin_edges\) - 1 = 2"):
        plot_affinity(A3, EDGES[:3], tmp_path / "a.png")
    with pytest.raises(ValueError, match="needs the schedule"):
        plot_affinity(A3, EDGES, tmp_path / "a.png", axis="logsnr")
    with pytest.raises(ValueError, match="axis must be 'timestep' or 'logsnr', got 'snr'"):
        plot_affinity(A3, EDGES, tmp_path / "a.png", schedule=sched, axis="snr")
    assert not (tmp_path / "a.png").exists()


def test_affinity_figures_titles_and_files(tmp_path, figs):
    from antdiff.analysis import AffinityResult

    res = AffinityResult(A3, EDGES, 7, 3, {})
    paths = plot_affinity_figures(res, linear_schedule(100), tmp_path / "x" / "aff")
    assert paths == [tmp_path / "x" / "aff_timestep.png", tmp_path / "x" / "aff_logsnr.png"]
    assert all(p.is_file() for p in paths)
    titles = [f.axes[0].get_title() for f in figs]
    assert titles == [
        "task affinity vs timestep\n3 bins, 3 checkpoint(s), 7 samples/bin",
        "task affinity vs log-SNR\n3 bins, 3 checkpoint(s), 7 samples/bin",
    ]


# --- report.py: reading the logs --------------------------------------------------------------


def test_load_run_logs_columns_method_from_config_and_missing_telemetry(tmp_path):
    rows = [(5, 0.5, [1.0, 2.0], [0.25, 0.75]), (10, 0.25, [3.0, 4.0], [0.5, 0.5])]
    run = _write_run(tmp_path / "r", rows, config="ant:\n  method: nash\n")
    logs = load_run_logs(run)
    np.testing.assert_array_equal(logs["steps"], [5, 10])
    np.testing.assert_array_equal(logs["loss"], [0.5, 0.25])
    np.testing.assert_array_equal(logs["cluster_loss"], [[1.0, 2.0], [3.0, 4.0]])
    np.testing.assert_array_equal(logs["weight"], [[0.25, 0.75], [0.5, 0.5]])
    assert logs["k"] == 2 and logs["telemetry"] == [] and logs["bounds"] is None
    assert logs["method"] == "nash"  # no telemetry: the saved config's ant.method
    (run / "config.yaml").write_text("ant: {}\n")
    assert load_run_logs(run)["method"] == "unknown method"
    (run / "config.yaml").unlink()
    assert load_run_logs(run)["method"] == "unknown method"


def test_telemetry_keeps_the_lines_after_an_unreadable_one(tmp_path):
    tele = [{"step": 1}, '{"step": 2, "meth', {"step": 3, "method": "uw", "bounds": [0, 5, 9]}]
    run = _write_run(tmp_path, [(1, 1.0, [1.0, 2.0], [1.0, 1.0])], tele)
    logs = load_run_logs(run)
    assert [t["step"] for t in logs["telemetry"]] == [1, 3]
    assert logs["method"] == "uw" and logs["bounds"] == [0, 5, 9]


def test_a_metrics_file_with_no_complete_row_is_a_clear_error(tmp_path):
    run = _write_run(tmp_path, [])
    with pytest.raises(ValueError, match="has no logged steps yet"):
        load_run_logs(run)
    with open(run / "metrics.csv", "a") as f:
        f.write("1,0.5,1.0\n")  # cut off
    with pytest.raises(ValueError, match="has no logged steps yet"):
        load_run_logs(run)


def test_labels_and_moving_average_edges():
    assert _labels(3, None) == ["I1", "I2", "I3"]
    assert _labels(2, [0, 10, 100]) == ["I1 [0, 10)", "I2 [10, 100)"]
    y = np.array([1.0, np.nan, np.nan, np.nan, 5.0])
    m = _moving_average(y, 3)  # the middle window holds no finite value: NaN, not 0
    np.testing.assert_allclose(m, [1.0, 1.0, np.nan, 5.0, 5.0])
    y = np.arange(9.0) ** 2
    np.testing.assert_allclose(_moving_average(y, 4), _centred_mean(y, 2))


# --- report.py: the figures -------------------------------------------------------------------


def test_cluster_curves_hold_raw_and_smoothed_values(tmp_path, figs):
    n, k = 40, 3  # window n // 20 = 2, made odd: 3 rows
    steps = np.arange(1, n + 1) * 10.0
    rng = np.random.default_rng(0)
    v = rng.uniform(0.5, 2.0, size=(n, k))
    v[7, 1] = np.nan
    labels = ["a", "b", "c"]
    plot_cluster_curves(steps, v, labels, tmp_path / "c.png", title="T", ylabel="Y")
    (fig,) = figs
    ax = fig.axes[0]
    lines = ax.get_lines()
    assert len(lines) == 2 * k  # raw (faint) and smoothed per cluster
    import matplotlib.pyplot as plt

    colors = plt.get_cmap("viridis")(np.linspace(0.0, 0.9, k))
    for i in range(k):
        raw, smooth = lines[2 * i], lines[2 * i + 1]
        np.testing.assert_array_equal(raw.get_xdata(), steps)
        np.testing.assert_array_equal(raw.get_ydata(), v[:, i])
        np.testing.assert_allclose(smooth.get_ydata(), _centred_mean(v[:, i], 1))
        assert raw.get_alpha() < 1 and smooth.get_label() == labels[i]
        np.testing.assert_allclose(smooth.get_color(), colors[i])
        np.testing.assert_allclose(raw.get_color(), colors[i])
    assert [t.get_text() for t in ax.get_legend().get_texts()] == labels
    assert ax.get_xlabel() == "iteration" and ax.get_ylabel() == "Y"
    assert ax.get_title().startswith("T\n(lines: moving average of ")
    assert ax.get_yscale() == "linear"


def test_short_curves_draw_one_line_each_and_a_single_point_is_marked(tmp_path, figs):
    steps = np.arange(1, 11.0)
    v = np.linspace(1, 2, 20).reshape(10, 2)
    plot_cluster_curves(steps, v, ["a", "b"], tmp_path / "c.png", title="T", ylabel="Y")
    plot_cluster_curves(steps[:1], v[:1], ["a", "b"], tmp_path / "d.png", title="T", ylabel="Y")
    ten, one = (f.axes[0] for f in figs)
    assert len(ten.get_lines()) == 2 and ten.get_title() == "T"  # window 1: raw = smoothed
    np.testing.assert_array_equal(ten.get_lines()[1].get_ydata(), v[:, 1])
    assert ten.get_lines()[0].get_marker() == "None"
    assert [ln.get_marker() for ln in one.get_lines()] == ["o", "o"]


def test_log_scale_drops_non_positive_values(tmp_path, figs):
    steps = np.arange(1, 6.0)
    v = np.array([[1.0, 0.0], [2.0, -1.0], [0.0, 3.0], [4.0, 5.0], [8.0, 6.0]])
    plot_cluster_curves(steps, v, ["a", "b"], tmp_path / "c.png", title="T", ylabel="Y", logy=True)
    nothing = np.full((5, 2), np.nan)
    plot_cluster_curves(
        steps, nothing, ["a", "b"], tmp_path / "d.png", title="T", ylabel="Y", logy=True
    )
    ax, empty = (f.axes[0] for f in figs)
    assert ax.get_yscale() == "log"
    np.testing.assert_array_equal(ax.get_lines()[0].get_ydata(), [1, 2, np.nan, 4, 8])
    np.testing.assert_array_equal(ax.get_lines()[1].get_ydata(), [np.nan, np.nan, 3, 5, 6])
    assert empty.get_yscale() == "linear"  # nothing to draw on a log axis


def test_matrix_cells_ticks_and_annotations(tmp_path, figs):
    M = np.array([[0.0, 1.0], [0.25, np.nan]])  # noqa: N806
    labels = ["I1 [0, 10)", "I2 [10, 100)"]
    plot_matrix(M, labels, tmp_path / "m.png", title="TT", cbar="CB", vmin=0.0, vmax=1.0)
    (fig,) = figs
    ax = fig.axes[0]
    (im,) = ax.images
    np.testing.assert_array_equal(np.ma.filled(im.get_array(), np.nan), M)
    assert im.get_clim() == (0.0, 1.0) and im.get_cmap().name == "Reds"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["I1", "I2"]
    assert [t.get_text() for t in ax.get_yticklabels()] == labels
    texts = {tuple(t.get_position()): (t.get_text(), t.get_color()) for t in ax.texts}
    # (x, y) = (column j, row i); no text on the unmeasured pair; white on the dark cell
    assert texts == {
        (0, 0): ("0.00", "black"),
        (1, 0): ("1.00", "white"),
        (0, 1): ("0.25", "black"),
    }
    assert ax.get_title() == "TT" and fig.axes[1].get_ylabel() == "CB"


def _gram_run(d, method="pcgrad", weights=None, rate=None, cos=None):
    """Three logged steps 5, 10, 15; the Gram (conflict and cosine) logged at step 10 only."""
    rate = rate or [[0.0, 0.75], [0.75, 0.0]]
    cos = cos or [[1.0, -0.5], [-0.5, 1.0]]
    weights = weights or [[1.0, 1.0]] * 3
    rows = [(s, 1.0, [1.0 + s, 2.0], w) for s, w in zip((5, 10, 15), weights)]
    tele = [{"step": 5, "method": method},
            {"step": 10, "conflict_rate": rate, "cosine_mean": cos, "method": method},
            {"step": 15, "method": method, "bounds": [0, 40, 100]}]  # fmt: skip
    return _write_run(d, rows, tele)


def test_plot_run_figures_titles_scales_and_matrices(tmp_path, figs):
    # null: a pair never measured (an absent cluster), drawn as an empty cell
    run = _gram_run(tmp_path / "run", rate=[[None, 0.75], [0.75, 0.0]])
    res = plot_run(run, tmp_path / "figs")
    assert res["last_step"] == 15 and res["k"] == 2 and res["method"] == "pcgrad"
    ax = dict(zip(["losses", "weights", "conflict", "cosine"], (f.axes[0] for f in figs)))
    assert ax["losses"].get_title() == "per-cluster losses (pcgrad)"
    assert ax["losses"].get_ylabel() == "cluster loss L_i"
    assert ax["losses"].get_yscale() == "log"
    assert ax["weights"].get_title() == report.WEIGHT_NAMES["pcgrad"]
    assert ax["weights"].get_ylabel() == "weight of cluster i"
    assert ax["weights"].get_yscale() == "linear"
    labels = ["I1 [0, 40)", "I2 [40, 100)"]
    assert [t.get_text() for t in ax["losses"].get_legend().get_texts()] == labels
    n = "(pcgrad, mean over the Gram steps up to step 10)"
    assert ax["conflict"].get_title() == f"conflict rate P(g_i . g_j < 0) between clusters\n{n}"
    assert ax["cosine"].get_title() == f"mean cosine of cluster gradients\n{n}"
    conflict, cosine = ax["conflict"].images[0], ax["cosine"].images[0]
    np.testing.assert_array_equal(
        np.ma.filled(conflict.get_array(), np.nan), [[np.nan, 0.75], [0.75, 0.0]]
    )
    assert sorted(t.get_text() for t in ax["conflict"].texts) == ["0.00", "0.75", "0.75"]
    np.testing.assert_array_equal(cosine.get_array(), [[1.0, -0.5], [-0.5, 1.0]])
    assert conflict.get_clim() == (0.0, 1.0) and conflict.get_cmap().name == "Reds"
    assert cosine.get_clim() == (-1.0, 1.0) and cosine.get_cmap().name == "RdBu_r"
    assert figs[2].axes[1].get_ylabel() == "rate" and figs[3].axes[1].get_ylabel() == "cosine"


@pytest.mark.parametrize(
    ("weights", "scale"),
    [
        ([[1.0, 0.05], [1.0, 0.05], [1.0, 0.05]], "log"),  # 20x apart, all positive
        ([[1.0, 0.2], [1.0, 0.2], [1.0, 0.2]], "linear"),  # 5x apart
        ([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]], "linear"),  # a zero weight: no log axis
        ([[1.0, np.nan], [1.0, 0.05], [1.0, 0.05]], "log"),  # an absent cluster is ignored
    ],
)
def test_weights_get_a_log_axis_when_they_spread_over_a_decade(tmp_path, figs, weights, scale):
    run = _gram_run(tmp_path / "run", method="uw", weights=weights)
    plot_run(run, tmp_path / "figs")
    ax = figs[1].axes[0]
    assert ax.get_yscale() == scale
    assert ax.get_title() == report.WEIGHT_NAMES["uw"]


def test_unknown_method_names_its_weights(tmp_path, figs):
    plot_run(_gram_run(tmp_path / "run", method="famo"), tmp_path / "figs")
    assert figs[1].axes[0].get_title() == "famo cluster weights"


# --- cli/plot.py ------------------------------------------------------------------------------


def test_cli_plot_needs_run_and_prints_indented_json(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli_main(["plot"])
    capsys.readouterr()
    run = _gram_run(tmp_path / "run")
    assert cli_main(["plot", "--run", str(run)]) == 0
    out = capsys.readouterr().out
    assert json.loads(out)["weights"] == str(run / "plots" / "weights.png")
    assert out.startswith('{\n  "')


# --- a run path that is a file; the smoothing window the title names -------------------------


def test_a_run_path_that_is_a_file_is_not_called_missing(tmp_path, capsys):
    f = tmp_path / "metrics.csv"
    f.write_text("step,loss\n")
    assert cli_main(["plot", "--run", str(f)]) == 2
    err = capsys.readouterr().err
    assert "does not exist" not in err and f"{str(f)!r} is a file: give the run's folder" in err


def test_curve_title_gives_the_window_the_lines_average_over(tmp_path, figs):
    """40 logs: window 40 // 20 = 2, which _moving_average makes 3 rows (centred): the title
    names the 3 rows each line point averages, as the lines show."""
    steps = np.arange(1, 41.0)
    v = np.arange(40.0).reshape(40, 1) ** 2
    plot_cluster_curves(steps, v, ["a"], tmp_path / "c.png", title="T", ylabel="Y")
    ax = figs[0].axes[0]
    np.testing.assert_allclose(ax.get_lines()[1].get_ydata(), _centred_mean(v[:, 0], 1))
    assert ax.get_title() == "T\n(lines: moving average of 3 logs)"

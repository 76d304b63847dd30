"""Run figures from training logs: a 10-step pcgrad digits run -> PNGs; the logged conflict
matrix against the per-step cosines; telemetry.jsonl across a resume; missing inputs."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from antdiff.analysis.report import load_run_logs, plot_run
from antdiff.cli import main as cli_main
from antdiff.config import load_config
from antdiff.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(out, method, steps, *extra):
    return load_config(
        "digits_adm",
        ["--ant.method", method, "--train.steps", str(steps), "--train.batch_size", "10",
         "--train.log_every", "1", "--train.ckpt_every", "0", "--train.progress", "false",
         "--sample.steps", "2", "--sample.n", "4", "--train.out_dir", str(out), *extra],
    )  # fmt: skip


@pytest.fixture(scope="module")
def pcgrad_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pcgrad")
    train(_cfg(out, "pcgrad", 10))
    return out


def _valid_png(path):
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and min(im.size) > 100


def test_plot_run_writes_every_figure(pcgrad_run, tmp_path):
    res = plot_run(pcgrad_run, tmp_path / "figs")
    assert res["method"] == "pcgrad" and res["k"] == 5 and res["last_step"] == 10
    for name in ("losses", "weights", "conflict", "cosine"):
        assert res[name] == str(tmp_path / "figs" / f"{name}.png")
        _valid_png(res[name])
    assert not list((tmp_path / "figs").glob(".*.tmp"))  # atomic writes leave no temp files


def test_logs_match_csv_and_conflicts_match_cosines(pcgrad_run):
    logs = load_run_logs(pcgrad_run)
    rows = list(csv.DictReader(open(pcgrad_run / "metrics.csv")))
    assert logs["steps"].tolist() == list(range(1, 11))
    want = np.array([[float(r[f"loss_c{i}"]) for i in range(1, 6)] for r in rows])
    np.testing.assert_array_equal(logs["cluster_loss"], want)
    tele = logs["telemetry"]
    assert [t["step"] for t in tele] == list(range(1, 11))
    # PCGrad computes G every step and every cluster is present (B=10 >= k): the running
    # conflict rate is the fraction of steps whose cosine was negative
    cos = np.array([t["cosine"] for t in tele])  # [steps, k, k]
    np.testing.assert_allclose(tele[-1]["conflict_rate"], (cos < 0).mean(axis=0), atol=1e-6)
    assert logs["bounds"][0] == 0 and logs["bounds"][-1] == 1000


def test_vanilla_run_has_curves_but_no_matrices(pcgrad_run, tmp_path):
    train(_cfg(tmp_path / "run", "vanilla", 3))
    res = plot_run(tmp_path / "run")
    assert res["conflict"] is None and res["cosine"] is None
    # into a folder that holds a gradient run's figures: its matrices are not left beside
    # these curves
    plot_run(pcgrad_run, tmp_path / "shared")
    plot_run(tmp_path / "run", tmp_path / "shared")
    assert sorted(p.name for p in (tmp_path / "shared").iterdir()) == ["losses.png",
                                                                        "weights.png"]
    _valid_png(tmp_path / "run" / "plots" / "losses.png")
    _valid_png(tmp_path / "run" / "plots" / "weights.png")


def test_telemetry_log_is_trimmed_on_resume(tmp_path):
    out = tmp_path / "run"
    train(_cfg(out, "uw", 4, "--train.ckpt_every", "2"))
    ckpt2 = out / "checkpoints" / "ckpt_00000002.pt"
    train(_cfg(out, "uw", 5, "--train.ckpt_every", "2"), resume=ckpt2)
    steps = [json.loads(line)["step"] for line in open(out / "telemetry.jsonl")]
    assert steps == [1, 2, 3, 4, 5]


def test_missing_inputs_give_clear_errors(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        plot_run(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="metrics.csv"):
        plot_run(tmp_path)
    assert cli_main(["plot", "--run", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_plot(pcgrad_run, tmp_path, capsys):
    assert cli_main(["plot", "--run", str(pcgrad_run), "--out", str(tmp_path)]) == 0
    printed = json.loads(capsys.readouterr().out)
    _valid_png(printed["conflict"])


def test_telemetry_is_strict_json_and_a_cut_off_row_is_skipped(pcgrad_run, tmp_path):
    """NaN (a skipped step's loss, an unmeasured pair) is written as null, so strict parsers
    read the log; a run killed mid-write leaves a short last row that plotting skips."""
    import shutil

    def no_nan(token):
        raise AssertionError(f"non-standard JSON token {token}")

    for line in (pcgrad_run / "telemetry.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=no_nan)
    from antdiff.logging_utils import _finite_or_none

    assert _finite_or_none({"a": [float("nan"), 1.0], "b": float("inf")}) == {
        "a": [None, 1.0], "b": None}  # fmt: skip
    run = tmp_path / "cut"
    shutil.copytree(pcgrad_run, run)
    with open(run / "metrics.csv", "a") as f:
        f.write("11,0.9,0.8\n")
    logs = load_run_logs(run)
    assert int(logs["steps"][-1]) == 10


def test_moving_average_is_centred():
    """An even window (steps // 20) was off centre by half a row: a step moved its mean early."""
    from antdiff.analysis.report import _moving_average

    y = np.zeros(21)
    y[10] = 1.0
    for window in (4, 5):
        m = _moving_average(y, window)
        np.testing.assert_allclose(m, m[::-1])  # symmetric around the step, as y is
    m = _moving_average(np.array([1.0, np.nan, 3.0]), 3)
    np.testing.assert_allclose(m, [1.0, 2.0, 3.0])  # NaNs left out, not counted as 0


def test_image_grid_layout_and_nrow():
    """image_grid: nrow columns, image i at row i // nrow, column i % nrow, 1 px borders of
    white, pixel values (v + 1) * 127.5."""
    from antdiff.logging_utils import image_grid

    h, w = 3, 2
    vals = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0])
    x = vals.view(5, 1, 1, 1).expand(5, 1, h, w).clone()
    img = image_grid(x, nrow=2)
    assert img.shape == (3 * (h + 1) + 1, 2 * (w + 1) + 1, 3) and img.dtype == np.uint8
    for i, v in enumerate(vals.tolist()):
        r, q = divmod(i, 2)
        cell = img[1 + r * (h + 1): 1 + r * (h + 1) + h, 1 + q * (w + 1): 1 + q * (w + 1) + w]
        assert (cell == round((v + 1) * 127.5)).all(), i
    assert (img[0] == 255).all() and (img[:, 0] == 255).all()
    # default: ceil(sqrt(n)) columns
    assert image_grid(x).shape == (2 * (h + 1) + 1, 3 * (w + 1) + 1, 3)


def test_save_png_upscales_both_axes(tmp_path):
    from matplotlib import image as mpimg

    from antdiff.logging_utils import save_png

    img = np.zeros((3, 5, 3), dtype=np.uint8)
    img[1, 2] = 200
    out = save_png(img, tmp_path / "a.png", scale=4)
    back = mpimg.imread(out)
    assert back.shape[:2] == (12, 20)
    assert np.allclose(back[4:8, 8:12, 0], 200 / 255, atol=1e-3)
    assert np.allclose(back[:4, :, 0], 0) and np.allclose(back[:, :8, 0], 0)


def test_metrics_csv_columns_hold_their_values(tmp_path):
    """Every metrics.csv value sits under its own header: lr under "lr", the step time under
    "sec_per_step", cluster losses / weights under loss_ci / weight_ci, objective last."""
    import csv

    from antdiff.logging_utils import RunLogger

    log = RunLogger(tmp_path, k=2, start=0, total=1, progress=False)
    log.log(5, 0.75, {"loss": [1.5, 2.5], "weight": [0.25, 0.125]}, lr=0.003, sec=42.0,
            objective=-1.25)
    log.close()
    with open(tmp_path / "metrics.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    got = {k: float(v) for k, v in row.items()}
    assert got == {"step": 5, "loss": 0.75, "loss_c1": 1.5, "loss_c2": 2.5, "weight_c1": 0.25,
                   "weight_c2": 0.125, "lr": 0.003, "sec_per_step": 42.0, "objective": -1.25}


def test_latent_grid_spans_the_full_pixel_range():
    """image_grid(latent=True) rescales each shown channel to its own range: the smallest
    value of a channel is pixel 0, the largest 255."""
    from antdiff.logging_utils import image_grid

    x = torch.linspace(-7.0, 3.0, 2 * 4 * 2 * 2).reshape(2, 4, 2, 2)
    img = image_grid(x, latent=True)
    inner = img[1:3, 1:3]  # the first image's pixels
    assert img[1:-1, 1:-1].min() == 0 and img[1:-1, 1:-1].max() == 255
    assert inner.shape == (2, 2, 3)


def test_report_reads_weights_from_the_weight_columns(tmp_path):
    """load_run_logs: "weight" from weight_ci, "cluster_loss" from loss_ci."""
    from antdiff.analysis.report import load_run_logs
    from antdiff.logging_utils import RunLogger

    log = RunLogger(tmp_path, k=2, start=0, total=2, progress=False)
    log.log(1, 0.75, {"loss": [1.5, 2.5], "weight": [0.25, 0.125]}, lr=0.1, sec=1.0)
    log.log(2, 0.5, {"loss": [1.0, 3.0], "weight": [0.5, 0.0625]}, lr=0.1, sec=1.0)
    log.close()
    logs = load_run_logs(tmp_path)
    np.testing.assert_array_equal(logs["steps"], [1, 2])
    np.testing.assert_array_equal(logs["cluster_loss"], [[1.5, 2.5], [1.0, 3.0]])
    np.testing.assert_array_equal(logs["weight"], [[0.25, 0.125], [0.5, 0.0625]])


def _logged_run(path, records):
    """A run directory written by RunLogger: one row per ``(step, stats)`` of ``records``."""
    from antdiff.logging_utils import RunLogger

    log = RunLogger(path, k=2, start=0, total=len(records), progress=False)
    for step, stats in records:
        log.log(step, 1.0, {"loss": [1.0, 2.0], "weight": [0.5, 0.5], **stats}, lr=0.1, sec=1.0)
    log.close()
    return path


def test_a_row_cut_off_before_its_last_value_is_skipped(tmp_path):
    """A run killed mid-write can leave a row that has every column but an empty last one
    (cut right after its last comma): it is skipped like a shorter one."""
    run = _logged_run(tmp_path, [(1, {}), (2, {})])
    with open(run / "metrics.csv", newline="") as f:
        row = list(csv.reader(f))[-1]
    with open(run / "metrics.csv", "a") as f:
        f.write(",".join(["3", *row[1:-1]]) + ",")  # the objective not written yet
    assert load_run_logs(run)["steps"].tolist() == [1.0, 2.0]


def test_method_bounds_and_matrices_come_from_the_latest_telemetry(tmp_path, monkeypatch):
    """load_run_logs takes the method and bounds of the last telemetry record (earlier ones
    may lack them); plot_run draws the conflict and cosine matrices of the last record that
    has them, with the clusters' intervals as labels."""
    import antdiff.analysis.report as report

    first = {"conflict_rate": [[0.0, 1.0], [1.0, 0.0]], "cosine_mean": [[1.0, -0.5], [-0.5, 1.0]]}
    last = {"conflict_rate": [[0.0, 0.25], [0.25, 0.0]], "cosine_mean": [[1.0, 0.5], [0.5, 1.0]]}
    ids = {"method": "pcgrad", "bounds": [0, 10, 100]}
    run = _logged_run(tmp_path / "run", [(1, first), (2, {**last, **ids}), (3, ids)])
    logs = load_run_logs(run)
    assert logs["method"] == "pcgrad" and logs["bounds"] == [0, 10, 100]
    drawn = {}

    def plot_matrix(M, labels, path, **kw):  # noqa: N803
        drawn[path.name] = (np.asarray(M).tolist(), labels)
        return path

    monkeypatch.setattr(report, "plot_matrix", plot_matrix)
    res = plot_run(run, tmp_path / "figs")
    assert res["method"] == "pcgrad" and res["last_step"] == 3
    labels = ["I1 [0, 10)", "I2 [10, 100)"]
    assert drawn["conflict.png"] == (last["conflict_rate"], labels)
    assert drawn["cosine.png"] == (last["cosine_mean"], labels)
    assert report._labels(2, [0, 10]) == ["I1", "I2"]  # bounds of another k: plain names


def test_non_finite_values_in_tuples_are_written_as_null():
    from antdiff.logging_utils import _finite_or_none

    assert _finite_or_none({"t": (float("nan"), 2.0), "l": [(1.0, float("-inf"))]}) == {
        "t": [None, 2.0], "l": [[1.0, None]]}  # fmt: skip


def test_grids_of_other_channel_counts():
    """Four or more channels show the first three, each rescaled over the whole batch to its
    own range (as latent=True); two channels show as (c0, c1, c0)."""
    from antdiff.logging_utils import image_grid

    x = torch.zeros(2, 4, 1, 1)
    x[:, 0, 0, 0] = torch.tensor([-3.0, 5.0])  # channel 0 spans [-3, 5] over the batch
    x[:, 1, 0, 0] = torch.tensor([0.0, 2.0])
    x[:, 2, 0, 0] = torch.tensor([1.0, 1.5])
    x[:, 3] = 100.0  # not shown
    img = image_grid(x, nrow=2)
    np.testing.assert_array_equal(image_grid(x, nrow=2, latent=True), img)
    assert img[1, 1].tolist() == [0, 0, 0] and img[1, 3].tolist() == [255, 255, 255]
    two = torch.tensor([-1.0, 1.0]).view(1, 2, 1, 1)
    assert image_grid(two)[1, 1].tolist() == [0, 255, 0]


def _csv_rows(path):
    with open(path / "metrics.csv", newline="") as f:
        return list(csv.reader(f))


def test_a_fresh_run_into_a_used_directory_starts_its_logs_over(tmp_path):
    """start=0 (not a resume): the logs hold this run's rows from its first step on, also
    before it saves anything (an earlier run's rows are not kept, even as pending)."""
    from antdiff.logging_utils import RunLogger

    _logged_run(tmp_path, [(1, {}), (2, {}), (3, {})])
    log = RunLogger(tmp_path, k=2, start=0, total=3, progress=False)
    log.log(1, 0.125, {"loss": [1.0, 2.0], "weight": [0.5, 0.5]}, lr=0.1, sec=1.0)
    rows = _csv_rows(tmp_path)  # flushed after each row
    assert [r[:2] for r in rows[1:]] == [["1", "0.125"]]
    assert [json.loads(ln)["step"] for ln in open(tmp_path / "telemetry.jsonl")] == [1]
    log.close(commit=False)
    assert [r[:2] for r in _csv_rows(tmp_path)[1:]] == [["1", "0.125"]]

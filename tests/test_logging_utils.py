"""RunLogger: metrics.csv / telemetry.jsonl rows, a resumed run's logs (rows up to its
checkpoint kept, later ones pending until it saves), TensorBoard scalars, the progress bar.
Fast: no training."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from antdiff import logging_utils
from antdiff.logging_utils import RunLogger, csv_columns

STATS = {"loss": [1.0, 2.0], "weight": [0.5, 0.5]}


def _csv_rows(path):
    with open(path / "metrics.csv", newline="") as f:
        return list(csv.reader(f))


def _steps(path):
    return [int(r[0]) for r in _csv_rows(path)[1:]]


def _jsonl_steps(path):
    return [json.loads(ln)["step"] for ln in open(path / "telemetry.jsonl")]


def _run(path, start, steps, loss=1.0, branch=None, commit=True, total=10):
    """One process: logs ``steps``; returns its branch_state() (taken as a save would)."""
    log = RunLogger(path, k=2, start=start, total=total, progress=False, branch=branch)
    for s in steps:
        log.log(s, loss, STATS, lr=0.1, sec=1.0, objective=loss)
    pending = log.branch_state()
    log.close(commit=commit)
    return pending


def _row(step, value="0.5"):
    return [str(step), *[value] * 5, "0.001", "0.1", value]


def _write_csv(path, rows):
    with open(path / "metrics.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)


def _write_jsonl(path, steps, end="\n"):
    with open(path / "telemetry.jsonl", "w") as f:
        f.write("".join(json.dumps({"step": s, "loss": [1.0, 2.0]}) + end for s in steps))


@pytest.fixture
def fake_tb(monkeypatch):
    """A SummaryWriter stand-in: records add_scalar calls (no tensorboard needed)."""

    class Writer:
        def __init__(self):
            self.scalars, self.closed = {}, False

        def add_scalar(self, tag, value, step):
            self.scalars.setdefault(tag, []).append((step, value))

        def close(self):
            self.closed = True

    writer = Writer()
    monkeypatch.setattr(logging_utils, "_tensorboard", lambda path, start: writer)
    return writer


def test_a_resumed_log_drops_a_row_missing_its_last_column(tmp_path):
    """A crash right after a row's second-to-last value leaves one column short: not a whole
    row, so the resume does not keep it (also when its step is before the checkpoint)."""
    full = [_row(s) for s in (10, 20)]
    _write_csv(tmp_path, [csv_columns(2), *full, _row(30)[:-1]])
    RunLogger(tmp_path, 2, start=30, total=50, progress=False).close()
    assert _csv_rows(tmp_path) == [csv_columns(2), *full]


@pytest.mark.parametrize(
    "csv_steps,jsonl_steps",
    [((1, 2, 3, 4), (1, 2, 3, 4, 5, 6)), ((1, 2, 3, 4, 5, 6), (1, 2, 3, 4))],
)
def test_lines_past_the_checkpoint_in_either_log_stay_until_the_resumed_run_saves(
    tmp_path, csv_steps, jsonl_steps
):
    """Rows past ``start`` of a run continued further belong to newer checkpoints: kept until
    this run commits, also when only one of the two logs holds them (the other lost its tail
    in a crash). Then both logs hold this run's rows after ``start``."""
    _write_csv(tmp_path, [csv_columns(2), *[_row(s) for s in csv_steps]])
    _write_jsonl(tmp_path, jsonl_steps)
    log = RunLogger(tmp_path, 2, start=4, total=6, progress=False)
    log.log(5, 0.25, STATS, lr=0.1, sec=1.0)
    assert _steps(tmp_path) == list(csv_steps) and _jsonl_steps(tmp_path) == list(jsonl_steps)
    log.commit()
    assert _jsonl_steps(tmp_path) == [1, 2, 3, 4, 5] and _steps(tmp_path) == [1, 2, 3, 4, 5]
    log.close()


def test_close_commits_a_pending_run_by_default_and_drops_it_when_told(tmp_path):
    """close(): this run's rows replace the later ones; close(commit=False): the logs stay as
    the superseded run left them."""
    _run(tmp_path, 0, range(1, 7), loss=0.5)
    _run(tmp_path, 4, (5,), loss=0.25, commit=False)
    assert _steps(tmp_path) == [1, 2, 3, 4, 5, 6] and _jsonl_steps(tmp_path) == list(range(1, 7))
    assert _csv_rows(tmp_path)[5][1] == "0.5"
    _run(tmp_path, 4, (5,), loss=0.25)
    assert _steps(tmp_path) == [1, 2, 3, 4, 5] and _jsonl_steps(tmp_path) == [1, 2, 3, 4, 5]
    assert float(_csv_rows(tmp_path)[5][1]) == 0.25
    assert not list(tmp_path.glob(".*.pending"))


def test_values_keep_six_significant_digits(tmp_path):
    """Small learning rates and losses keep their digits (not a fixed number of decimals);
    sec_per_step, a timing, four."""
    log = RunLogger(tmp_path, k=2, start=0, total=1, progress=False)
    vals = {"loss": 1.234567e-5, "lr": 2.5e-7, "objective": 123456.7}
    log.log(1, vals["loss"], {"loss": [3.333333e-4, 7.0], "weight": [1e-3, 0.999]},
            lr=vals["lr"], sec=0.0123456, objective=vals["objective"])  # fmt: skip
    log.close()
    with open(tmp_path / "metrics.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    for key, v in vals.items():
        assert float(row[key]) == pytest.approx(v, rel=1e-5), key
    assert float(row["loss_c1"]) == pytest.approx(3.333333e-4, rel=1e-5)
    assert float(row["sec_per_step"]) == pytest.approx(0.0123456, rel=1e-3)


def test_a_row_without_objective_or_cluster_stats_is_whole_and_nan(tmp_path):
    """objective defaults to NaN; missing "loss" / "weight" stats are NaN per cluster: the
    row still has every column."""
    log = RunLogger(tmp_path, k=3, start=0, total=1, progress=False)
    log.log(1, 0.5, {}, lr=0.1, sec=1.0)
    log.close()
    (header, row) = _csv_rows(tmp_path)
    assert header == csv_columns(3) and len(row) == len(header)
    got = dict(zip(header, row))
    assert float(got["loss"]) == 0.5 and math.isnan(float(got["objective"]))
    assert all(math.isnan(float(got[f"{c}_c{i}"])) for c in ("loss", "weight") for i in (1, 2, 3))
    (line,) = open(tmp_path / "telemetry.jsonl")
    assert json.loads(line) == {"step": 1}


def test_a_resume_after_a_line_cut_before_its_newline_keeps_the_jsonl_one_per_line(tmp_path):
    """A crash between a telemetry object and its newline: the object is whole and is kept,
    and the next line starts on a line of its own."""
    _write_csv(tmp_path, [csv_columns(2), *[_row(s) for s in (1, 2)]])
    _write_jsonl(tmp_path, [1])
    with open(tmp_path / "telemetry.jsonl", "a") as f:
        f.write(json.dumps({"step": 2}))  # no "\n"
    _run(tmp_path, 2, (3,))
    assert _jsonl_steps(tmp_path) == [1, 2, 3]


def test_a_resume_skips_a_telemetry_line_cut_short(tmp_path):
    _write_csv(tmp_path, [csv_columns(2), *[_row(s) for s in (1, 2)]])
    _write_jsonl(tmp_path, [1, 2])
    with open(tmp_path / "telemetry.jsonl", "a") as f:
        f.write('{"step": 2, "lo')  # a kill while a line was written
    _run(tmp_path, 2, (3,))
    assert _jsonl_steps(tmp_path) == [1, 2, 3] and _steps(tmp_path) == [1, 2, 3]


def test_numpy_and_torch_stats_are_written_as_json_numbers(tmp_path):
    log = RunLogger(tmp_path, k=2, start=0, total=1, progress=False)
    log.log(1, 0.5, {**STATS, "a": np.array([[1.0, 0.5]]), "n": np.int64(3),
                     "t": torch.tensor([2.0])}, lr=0.1, sec=1.0)  # fmt: skip
    log.close()
    (line,) = open(tmp_path / "telemetry.jsonl")
    rec = json.loads(line)
    assert rec["a"] == [[1.0, 0.5]] and rec["n"] == 3 and rec["t"] == [2.0]


def test_non_finite_numpy_and_torch_stats_are_null(tmp_path):
    """A NaN or inf inside a numpy / torch value is written as null, as a Python float's is (the
    JSON encoder refused them: log() raised)."""
    log = RunLogger(tmp_path, k=2, start=0, total=1, progress=False)
    log.log(1, 0.5, {**STATS, "a": np.array([1.0, np.nan]), "s": np.float64(np.inf),
                     "t": torch.tensor([[float("-inf"), 2.0]])}, lr=0.1, sec=1.0)  # fmt: skip
    log.close()
    (line,) = open(tmp_path / "telemetry.jsonl")
    rec = json.loads(line)
    assert rec["a"] == [1.0, None] and rec["s"] is None and rec["t"] == [[None, 2.0]]


def test_tensorboard_gets_every_scalar_under_its_tag(tmp_path, fake_tb):
    """loss, objective, lr, sec_per_step, and per cluster i (1-based) cluster_loss/ci and
    cluster_weight/ci; close() closes the writer."""
    log = RunLogger(tmp_path, k=2, start=0, total=1, progress=False)
    log.log(7, 0.75, {"loss": [1.5, 2.5], "weight": [0.25, 0.125]}, lr=0.003, sec=42.0,
            objective=-1.25)  # fmt: skip
    log.close()
    assert fake_tb.scalars == {
        "loss": [(7, 0.75)], "objective": [(7, -1.25)], "lr": [(7, 0.003)],
        "sec_per_step": [(7, 42.0)], "cluster_loss/c1": [(7, 1.5)], "cluster_loss/c2": [(7, 2.5)],
        "cluster_weight/c1": [(7, 0.25)], "cluster_weight/c2": [(7, 0.125)],
    }  # fmt: skip
    assert fake_tb.closed


def test_close_releases_the_log_files(tmp_path):
    """No file of the run directory is left open after close() (Linux: /proc/self/fd)."""
    fds = Path("/proc/self/fd")
    if not fds.is_dir():
        pytest.skip("no /proc/self/fd on this platform")

    def open_here():
        out = []
        for fd in fds.iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith(str(tmp_path)):
                out.append(target)
        return out

    log = RunLogger(tmp_path, k=2, start=0, total=1, progress=False)
    log.log(1, 0.5, STATS, lr=0.1, sec=1.0)
    assert open_here()
    log.close()
    assert open_here() == []


def test_the_progress_bar_starts_at_the_resumed_step(tmp_path, monkeypatch):
    import tqdm.auto

    class Bar:
        def __init__(self, total, initial=0, **kw):
            self.total, self.n, self.closed = total, initial, False

        def update(self, n=1):
            self.n += n

        def set_postfix_str(self, s):
            self.postfix = s

        def close(self):
            self.closed = True

    bars = []
    monkeypatch.setattr(tqdm.auto, "tqdm", lambda *a, **kw: bars.append(Bar(*a, **kw)) or bars[-1])
    log = RunLogger(tmp_path, k=2, start=10, total=20, progress=True)
    log.advance()
    log.advance(3)
    log.log(14, 0.5, STATS, lr=0.1, sec=1.0)
    log.close()
    (bar,) = bars
    assert (bar.total, bar.n, bar.closed) == (20, 14, True)


def test_a_failed_rewrite_of_the_resumed_log_leaves_the_old_one(tmp_path, monkeypatch):
    """A crash (here a full disk) while a resume rewrites metrics.csv leaves the old file
    whole, not a truncated one."""
    rows = [csv_columns(2), *[_row(s) for s in (1, 2, 3)]]
    _write_csv(tmp_path, rows)
    real = csv.writer

    class Full:
        def __init__(self, f, *a, **kw):
            self.w = real(f, *a, **kw)

        def writerows(self, rows):
            self.w.writerow(next(iter(rows)))
            raise OSError("No space left on device")

    monkeypatch.setattr(csv, "writer", Full)
    with pytest.raises(OSError, match="No space"):
        RunLogger(tmp_path, 2, start=3, total=5, progress=False)
    monkeypatch.undo()
    assert _csv_rows(tmp_path) == rows


def test_a_second_kill_before_the_log_commit_keeps_the_first_continuations_rows(tmp_path):
    """Run A logs 1-8; B continues from A's ckpt 4, saves 6 and is
    killed before its rows are committed (its checkpoint carries them as log_branch); C resumes
    from B's 6, saves 8 and is killed before committing too; D resumes from C's 8. The logs
    must be A's 1-4, B's 5-6, C's 7-8 (C's branch_state() carried only its own rows, start 6,
    and D rebuilt 5-6 from the file, which still held A's rows)."""
    _run(tmp_path, 0, range(1, 9), loss=0.5)  # A
    b = _run(tmp_path, 4, (5, 6), loss=0.25, commit=False)  # B: saved 6, killed
    c = _run(tmp_path, 6, (7, 8), loss=0.125, branch=b, commit=False)  # C: saved 8, killed
    _run(tmp_path, 8, (), branch=c)  # D
    assert _steps(tmp_path) == list(range(1, 9)) and _jsonl_steps(tmp_path) == list(range(1, 9))
    losses = [float(r[1]) for r in _csv_rows(tmp_path)[1:]]
    assert losses == [0.5] * 4 + [0.25] * 2 + [0.125] * 2


def test_a_resume_with_nothing_logged_past_its_checkpoint_writes_the_logs_at_once(tmp_path):
    """Rows up to and including the checkpoint's step are kept, none is later: nothing is
    pending, the resumed rows go to metrics.csv / telemetry.jsonl as they are logged."""
    _run(tmp_path, 0, (1, 2, 3, 4))
    log = RunLogger(tmp_path, k=2, start=4, total=6, progress=False)
    assert log.branch_state() is None
    log.log(5, 0.25, STATS, lr=0.1, sec=1.0)
    assert _steps(tmp_path) == [1, 2, 3, 4, 5] and _jsonl_steps(tmp_path) == [1, 2, 3, 4, 5]
    assert not list(tmp_path.glob(".*.pending"))
    log.close(commit=False)
    assert _steps(tmp_path) == [1, 2, 3, 4, 5]


def test_a_metrics_csv_of_another_layout_is_not_read_into_a_resumed_log(tmp_path):
    """Rows under a header that is neither this layout's nor the one before the objective
    column (here lr and sec_per_step swapped) are not kept: their values would sit under the
    wrong names. The resumed log starts over with its own header."""
    other = csv_columns(2)
    other[-3], other[-2] = other[-2], other[-3]
    _write_csv(tmp_path, [other, _row(1), _row(2)])
    RunLogger(tmp_path, 2, start=2, total=4, progress=False).close()
    assert _csv_rows(tmp_path) == [csv_columns(2)]

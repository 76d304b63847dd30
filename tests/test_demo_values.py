"""The demo's pieces, checked value by value without training: the flags, the runs it starts
(through a pool that trains nothing), the summary and README, the figures, the ownership test
of run folders and the removal of an earlier report."""

from __future__ import annotations

import argparse
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest

import antdiff.demo as demo
from antdiff.clustering import Clusters
from antdiff.config import load_config
from antdiff.logging_utils import csv_columns

BOUNDS = (0, 153, 394, 624, 823, 1000)
RED, BLUE = (1.0, 0.0, 0.0), (0.0, 0.0, 1.0)
# what each fake run returns: ANT's and vanilla's numbers all differ, so a swap shows
FAKE = {
    "ant": {
        "loss": 0.25, "objective": 0.75, "seconds": 12.345, "color": RED,
        "stats": {
            "weight": [0.12344, 0.2, 0.3, 0.17778, 0.2],
            "loss_mean": [1.0, 0.9, 0.8, 0.7, 0.6],
            "cosine": [[1.0 - 0.1 * abs(i - j) for j in range(5)] for i in range(5)],
            "conflict_rate": [[0.0 if i == j else 0.37 if (i, j) == (0, 4) else 0.05 * (i + j)
                               for j in range(5)] for i in range(5)],
        },
    },
    "vanilla": {
        "loss": 0.5, "objective": 0.5, "seconds": 7.891, "color": BLUE,
        "stats": {
            "weight": [0.2] * 5,
            "loss_mean": [2.0, 1.9, 1.8, 1.7, 1.6],
            "cosine": [[1.0] * 5 for _ in range(5)],
            "conflict_rate": [[0.0] * 5 for _ in range(5)],
        },
    },
}  # fmt: skip


def _write_csv(path: Path, k: int, rows: list[dict]) -> Path:
    cols = csv_columns(k)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [",".join(cols)] + [",".join(str(r.get(c, 1.0)) for c in cols) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def _png(path: Path, color: tuple[float, float, float]) -> Path:
    plt = demo._plt()
    path.parent.mkdir(parents=True, exist_ok=True)
    plt.imsave(path, np.broadcast_to(np.array(color), (8, 8, 3)).copy())
    return path


def _fake_train(over: list[str]) -> dict:
    """What ``_train_child`` returns, and the files its run leaves, without a step trained."""
    cfg = load_config(demo.PRESET, over)
    name = "vanilla" if cfg.ant.method == "vanilla" else "ant"
    f, out = FAKE[name], Path(cfg.train.out_dir)
    loss = f["stats"]["loss_mean"]
    _write_csv(out / "metrics.csv", 5, [
        {"step": s, **{f"loss_c{i + 1}": loss[i] * (3 - s) for i in range(5)},
         **{f"weight_c{i + 1}": w for i, w in enumerate(f["stats"]["weight"])}}
        for s in (1, 2)
    ])  # fmt: skip
    samples = _png(out / "samples" / "step_00000002.png", f["color"])
    return {
        "loss": f["loss"], "objective": f["objective"], "stats": f["stats"],
        "samples": str(samples), "seconds": f["seconds"],
        "clusters": Clusters(BOUNDS, objective="snr").to_dict(),
    }  # fmt: skip


class _Done:
    def __init__(self, value: dict) -> None:
        self.value = value

    def result(self) -> dict:
        return self.value


class FakePool:
    """The process pool, training in this process with ``_fake_train``; records what it got."""

    made: list[dict] = []
    submitted: list[tuple] = []

    def __init__(self, *args, **kwargs) -> None:
        FakePool.made.append(kwargs)

    def submit(self, fn, over):
        FakePool.submitted.append((fn, list(over)))
        return _Done(_fake_train(over))

    def shutdown(self, wait=True, cancel_futures=False) -> None:
        pass


@pytest.fixture
def fake_pool(monkeypatch):
    FakePool.made, FakePool.submitted = [], []
    monkeypatch.setattr(demo, "ProcessPoolExecutor", FakePool)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    return FakePool


@pytest.fixture
def figures(monkeypatch):
    """The figures the plot functions would save, kept open to be read."""
    plt = demo._plt()
    saved = []

    def keep(fig, path):
        saved.append(fig)
        return path

    monkeypatch.setattr(demo, "_save", keep)
    yield saved
    for fig in saved:
        plt.close(fig)


# -- flags ----------------------------------------------------------------------------------
def test_the_flags_defaults_are_the_documented_ones() -> None:
    p = argparse.ArgumentParser()
    demo.add_arguments(p)
    a = p.parse_args([])
    assert (a.out, a.steps, a.batch_size, a.seed, a.no_progress) == (
        "demo_out", None, None, 0, False)  # fmt: skip
    assert p.parse_args(["--no-progress"]).no_progress is True


def test_main_passes_each_flag_to_its_parameter_and_prints_the_short_summary(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    got = []

    def fake_run_demo(*args):
        got.append(args)
        return {"seconds_total": 1.5, "final_loss": {"ant": 0.1}, "files": {"a": "a.png"},
                "steps": 4}  # fmt: skip

    monkeypatch.setattr(demo, "run_demo", fake_run_demo)
    argv = ["--out", str(tmp_path / "o"), "--steps", "4", "--batch-size", "8", "--seed", "3"]
    assert demo.main([*argv, "--no-progress"]) == 0
    assert got == [(str(tmp_path / "o"), 4, 8, 3, False)]
    printed = json.loads(capsys.readouterr().out)
    assert printed == {"seconds_total": 1.5, "final_loss": {"ant": 0.1}, "files": {"a": "a.png"}}
    assert demo.main(argv) == 0 and got[-1][-1] is True


def test_a_missing_file_is_a_message_not_a_traceback(tmp_path: Path, monkeypatch, capsys) -> None:
    def missing(*args):
        raise FileNotFoundError("no such dataset file: digits.npz")

    monkeypatch.setattr(demo, "run_demo", missing)
    with pytest.raises(SystemExit) as e:
        demo.main(["--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "no such dataset file: digits.npz" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"steps": True}, "--steps must be an integer >= 1, got True"),
        ({"steps": 2.5}, "--steps must be an integer >= 1, got 2.5"),
        ({"batch_size": 8.0}, "--batch-size must be an integer >= 5 (the ANT run stratifies"),
        ({"batch_size": True}, "--batch-size must be an integer >= 5"),
    ],
)
def test_non_integer_steps_and_batch_sizes_are_refused_first(
    tmp_path: Path, kwargs: dict, message: str
) -> None:
    with pytest.raises(ValueError) as e:
        demo.run_demo(tmp_path / "o", progress=False, **kwargs)
    assert message in str(e.value)
    if "steps" in kwargs:  # the batch's reason is not the steps'
        assert "stratifies" not in str(e.value)
    assert not (tmp_path / "o").exists()


def test_a_bad_seed_names_the_demo_flag(tmp_path: Path, capsys, fake_pool) -> None:
    """`antdiff demo --seed -1` said "train.seed must be finite and >= 0", not a demo flag."""
    with pytest.raises(SystemExit):
        demo.main(["--seed", "-1", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert "--seed" in err and "train." not in err
    with pytest.raises(ValueError, match=r"--seed must be below 2\*\*63"):
        demo.run_demo(tmp_path, seed=2**63, progress=False)
    with pytest.raises(ValueError, match=r"--seed must be an integer >= 0, got None"):
        demo.run_demo(tmp_path, seed=None, progress=False)
    assert not fake_pool.submitted


# -- the runs and the report, without training ------------------------------------------------
def test_run_demo_starts_both_runs_with_the_flags_and_reports_their_numbers(
    tmp_path: Path, fake_pool
) -> None:
    out = tmp_path / "demo"
    s = demo.run_demo(out, steps=4, batch_size=8, seed=3, progress=False)

    # two workers, both the real child entry point, one thread each
    assert fake_pool.made[0]["max_workers"] == 2
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    cfgs = {}
    for fn, over in fake_pool.submitted:
        assert fn is demo._train_child
        cfg = load_config(demo.PRESET, over)
        cfgs["vanilla" if cfg.ant.method == "vanilla" else "ant"] = cfg
    assert cfgs["ant"].ant.method == load_config(demo.PRESET).ant.method != "vanilla"
    for name, cfg in cfgs.items():
        t = cfg.train
        assert (t.steps, t.batch_size, t.seed, t.progress, t.threads) == (4, 8, 3, False, 1)
        assert Path(t.out_dir) == out / "runs" / name
        assert (out / "runs" / name / demo.MARK).is_file()

    # the summary: the ANT run's numbers, each run's own loss and time
    preset = load_config(demo.PRESET)
    assert (s["preset"], s["out"], s["steps"], s["batch_size"], s["seed"]) == (
        demo.PRESET, str(out), 4, 8, 3)  # fmt: skip
    assert s["clusters"] == [[0, 153], [153, 394], [394, 624], [624, 823], [823, 1000]]
    assert s["sampler"] == f"{preset.sample.sampler}-{preset.sample.steps}"
    assert s["seconds"] == {"ant": 12.3, "vanilla": 7.9}
    assert s["seconds_total"] == round(s["seconds_total"], 1)
    assert s["final_loss"] == {"ant": 0.25, "vanilla": 0.5}
    assert s["ant_final_weights"] == FAKE["ant"]["stats"]["weight"]
    assert s["ant_mean_cluster_losses"] == FAKE["ant"]["stats"]["loss_mean"]
    assert s["vanilla_mean_cluster_losses"] == FAKE["vanilla"]["stats"]["loss_mean"]
    assert s["conflict_rate"] == FAKE["ant"]["stats"]["conflict_rate"]
    assert s["files"] == {
        "samples": "samples.png", "samples_ant": "samples_ant.png",
        "samples_vanilla": "samples_vanilla.png", "clusters": "clusters.png",
        "curves": "weights_losses.png", "conflicts": "conflict_rate.png",
    }  # fmt: skip
    assert (out / "summary.json").read_text() == json.dumps(s, indent=2) + "\n"
    for name in s["files"].values():
        assert (out / name).stat().st_size > 0

    # each grid under its own name, vanilla on the left of the pair
    runs = out / "runs"
    for name in ("ant", "vanilla"):
        grid = runs / name / "samples" / "step_00000002.png"
        assert (out / f"samples_{name}.png").read_bytes() == grid.read_bytes()
    _assert_left_right(out / "samples.png", left=BLUE, right=RED)

    readme = (out / "README.md").read_text()
    assert "Final effective weights (UW x PCGrad): [0.123, 0.2, 0.3, 0.178, 0.2]." in readme
    assert "the least and the most noisy cluster: 0.37." in readme
    assert "ANT 12.3 s, vanilla\n7.9 s." in readme
    assert f"antdiff demo --out {out} --steps 4 --batch-size 8 --seed 3`" in readme


def test_the_conflict_figure_shows_the_ant_runs_conflict_rates(
    tmp_path: Path, fake_pool, monkeypatch
) -> None:
    shown = []
    monkeypatch.setattr(demo, "plot_conflicts", lambda rate, path: shown.append(rate) or path)
    demo.run_demo(tmp_path, steps=2, batch_size=8, progress=False)
    assert shown == [FAKE["ant"]["stats"]["conflict_rate"]]


def test_an_empty_runs_folder_is_no_reason_to_refuse(tmp_path: Path, fake_pool) -> None:
    (tmp_path / "runs" / "ant").mkdir(parents=True)  # e.g. made by hand, or by a stopped run
    demo.run_demo(tmp_path, steps=2, batch_size=8, progress=False)
    assert (tmp_path / "summary.json").is_file()


def test_the_readme_without_conflict_rates_says_nan() -> None:
    s = {
        "what": "w", "preset": demo.PRESET, "steps": 1, "batch_size": 5, "seed": 0, "out": "o",
        "seconds_total": 1.0, "seconds": {"ant": 0.5, "vanilla": 0.4}, "clusters": [],
        "sampler": "ddim-50", "ant_final_weights": [0.5], "conflict_rate": [],
    }  # fmt: skip
    assert "the least and the most noisy cluster: nan." in demo._readme(s)


# -- the folders the demo may replace ----------------------------------------------------------
def _run_dir(tmp_path: Path, config: str | None, ckpt: bool = False) -> Path:
    d = tmp_path / "runs" / "ant"
    d.mkdir(parents=True)
    if config is not None:
        (d / "config.yaml").write_text(config)
    if ckpt:
        (d / "checkpoints").mkdir()
        (d / "checkpoints" / "ckpt_00000100.pt").write_bytes(b"weights")
    return d


@pytest.mark.parametrize(
    ("config", "ckpt", "owned"),
    [
        (None, False, False),  # an empty folder: nobody's run
        (f"name: {demo.PRESET}\ndata:\n  source: digits\n", False, True),  # a demo from before
        (f"name: {demo.PRESET}\ndata:\n  source: digits\n", True, False),  # the user trained it
        ("name: my_run\ndata:\n  source: digits\n", False, False),
        (f"data:\n  source: digits\nname: {demo.PRESET}\n", False, False),
    ],
)
def test_which_folders_are_the_demos(tmp_path: Path, config, ckpt: bool, owned: bool) -> None:
    d = _run_dir(tmp_path, config, ckpt)
    assert demo._demo_owned(d) is owned
    (d / demo.MARK).write_text("written by antdiff demo\n")
    assert demo._demo_owned(d) is True


def test_a_users_training_run_of_the_preset_is_refused(tmp_path: Path, fake_pool) -> None:
    d = _run_dir(tmp_path, f"name: {demo.PRESET}\n", ckpt=True)
    with pytest.raises(ValueError, match="holds files the demo did not write"):
        demo.run_demo(tmp_path, steps=2, batch_size=8, progress=False)
    assert (d / "checkpoints" / "ckpt_00000100.pt").read_bytes() == b"weights"
    assert not fake_pool.submitted


@pytest.mark.parametrize("file", ["runs", "runs/vanilla"])
def test_a_file_where_a_run_folder_goes_is_a_message(tmp_path: Path, fake_pool, file) -> None:
    """`antdiff demo --out X` with a file X/runs failed with NotADirectoryError's traceback."""
    (tmp_path / file).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / file).write_text("notes")
    with pytest.raises(ValueError, match="another --out"):
        demo.run_demo(tmp_path, steps=2, batch_size=8, progress=False)
    assert (tmp_path / file).read_text() == "notes" and not fake_pool.submitted


# -- the earlier report -----------------------------------------------------------------------
def _old_report(out: Path, summary) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary))
    (out / "README.md").write_text("# antdiff demo\n")


def test_an_old_report_goes_but_only_the_files_its_summary_names(tmp_path: Path) -> None:
    for name in ("samples.png", "b.png", "mine.png"):
        (tmp_path / name).write_bytes(b"png")
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "keep.txt").write_text("kept")
    names = {"samples": "samples.png", "odd": 5, "b": "b.png", "deep": "runs/keep.txt"}
    _old_report(tmp_path, {"preset": demo.PRESET, "files": names})
    demo._remove_old_report(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.png", "runs"]
    assert (tmp_path / "runs" / "keep.txt").read_text() == "kept"


def test_another_presets_summary_names_no_files_to_remove(tmp_path: Path) -> None:
    (tmp_path / "samples.png").write_bytes(b"png")
    _old_report(tmp_path, {"preset": "my_preset", "files": {"samples": "samples.png"}})
    demo._remove_old_report(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples.png"]


@pytest.mark.parametrize(
    "summary", [{"preset": demo.PRESET}, {"preset": demo.PRESET, "files": 3}, [1, 2], "text"]
)
def test_a_summary_of_another_shape_is_left_alone(tmp_path: Path, summary) -> None:
    _old_report(tmp_path, summary)
    demo._remove_old_report(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "summary.json"]


def test_a_summary_naming_a_folder_removes_no_folder(tmp_path: Path) -> None:
    (tmp_path / "runs").mkdir()
    _old_report(tmp_path, {"preset": demo.PRESET, "files": {"a": "runs", "b": ".."}})
    demo._remove_old_report(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]


# -- the figures ------------------------------------------------------------------------------
def _assert_left_right(png: Path, left, right) -> None:
    img = demo._plt().imread(png)[..., :3]
    half = img.shape[1] // 2

    def count(part, color):
        return int(np.all(np.abs(part - np.array(color)) < 0.1, axis=-1).sum())

    assert count(img[:, :half], left) > 0 and count(img[:, :half], right) == 0
    assert count(img[:, half:], right) > 0 and count(img[:, half:], left) == 0


def test_side_by_side_puts_vanilla_left_and_ant_right(tmp_path: Path) -> None:
    ant, van = _png(tmp_path / "ant.png", RED), _png(tmp_path / "van.png", BLUE)
    _assert_left_right(demo.side_by_side(ant, van, tmp_path / "pair.png"), left=BLUE, right=RED)


def _curves(tmp_path: Path, n: int) -> tuple[Path, Path, dict, dict]:
    steps = [10, 20, 30][:n]
    a = {"loss_c1": [1.0, 0.8, 0.6][:n], "loss_c2": [2.0, 1.5, 1.0][:n],
         "weight_c1": [0.5, 0.6, 0.7][:n], "weight_c2": [1.5, 1.4, 1.3][:n]}  # fmt: skip
    v = {"loss_c1": [1.2, 0.9, 0.7][:n], "loss_c2": [4.0, 3.0, 2.0][:n]}

    def rows(d: dict) -> list[dict]:
        return [{"step": s, **{c: x[j] for c, x in d.items()}} for j, s in enumerate(steps)]

    pa = _write_csv(tmp_path / "a.csv", 2, rows(a))
    pv = _write_csv(tmp_path / "v.csv", 2, rows(v))
    return pa, pv, a, v


def test_the_curves_show_ant_weights_and_each_runs_losses(tmp_path: Path, figures) -> None:
    pa, pv, a, v = _curves(tmp_path, 3)
    assert demo.plot_curves(pa, pv, 2, tmp_path / "c.png") == tmp_path / "c.png"
    axes = figures[0].axes
    assert len(axes) == 3
    for ax, run, col in ((axes[0], a, "weight"), (axes[1], a, "loss"), (axes[2], v, "loss")):
        assert [ln.get_label() for ln in ax.lines] == ["I1", "I2"]
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["I1", "I2"]
        for i, ln in enumerate(ax.lines):
            assert list(ln.get_xdata()) == [10, 20, 30]
            assert list(ln.get_ydata()) == run[f"{col}_c{i + 1}"]
            assert ln.get_marker() == "None"  # lines, not dots
        assert ax.get_yscale() == "log"
    assert not np.allclose(axes[1].lines[0].get_color(), axes[1].lines[1].get_color())
    # the loss axes end 1.5 x above the 98th percentile of the highest cluster loss of both runs
    top = 1.5 * max(np.percentile(r[f"loss_c{i}"], 98) for r in (a, v) for i in (1, 2))
    for ax in axes[1:]:
        assert ax.get_ylim()[1] == pytest.approx(top)


def test_a_single_logged_row_is_drawn_as_dots(tmp_path: Path, figures) -> None:
    pa, pv, _, _ = _curves(tmp_path, 1)
    demo.plot_curves(pa, pv, 2, tmp_path / "c.png")
    assert {ln.get_marker() for ax in figures[0].axes for ln in ax.lines} == {"o"}


def test_a_cluster_never_drawn_in_the_ant_run_still_plots(tmp_path: Path) -> None:
    """A short run can log a cluster with no sample (loss nan), e.g. `antdiff demo --steps 1
    --batch-size 5 --seed 4`: the report failed with "Axis limits cannot be NaN or Inf" when
    that cluster was ANT's first."""
    nan = float("nan")
    pa = _write_csv(tmp_path / "a.csv", 2, [{"step": 1, "loss_c1": nan, "loss_c2": 2.0}])
    pv = _write_csv(tmp_path / "v.csv", 2, [{"step": 1, "loss_c1": nan, "loss_c2": 3.0}])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # numpy's, on an all-nan column
        path = demo.plot_curves(pa, pv, 2, tmp_path / "c.png")
    assert path.stat().st_size > 0


def test_the_conflict_map_shows_each_rate_where_it_belongs(figures) -> None:
    m = [[0.0, 0.1, 0.9], [0.3, 0.0, 0.2], [0.45, 0.6, 0.0]]  # not symmetric: a transpose shows
    demo.plot_conflicts(m, Path("unused.png"))
    ax = figures[0].axes[0]
    assert ax.images[0].get_clim() == (0.0, 0.9)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["I1", "I2", "I3"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["I1", "I2", "I3"]
    cells = {}
    for t in ax.texts:
        x, y = t.get_position()
        cells[int(y), int(x)] = (t.get_text(), t.get_color())
    # text in row i, column j: m[i][j]; dark cells (below 0.6 of the top) get white text
    assert cells == {(i, j): (f"{m[i][j]:.2f}", "white" if m[i][j] < 0.54 else "black")
                     for i in range(3) for j in range(3)}  # fmt: skip


def test_the_conflict_scale_reaches_at_least_one_half(figures) -> None:
    demo.plot_conflicts([[0.0, 0.2], [0.2, 0.0]], Path("unused.png"))
    assert figures[0].axes[0].images[0].get_clim() == (0.0, 0.5)

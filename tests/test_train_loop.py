"""The trainer's loop, checkpoints, resume, EMA and logging, for a few CPU steps: the EMA's
update without a device flag and its absence on ranks other than 0; a logged row's interval
means (skipped steps, every micro-batch of a loss-space step, an interval with nothing
measured) and its time per step; where sample grids are drawn and the progress bar; what a
checkpoint records for sampling; the step generator (its own stream, and its reseeding on a
resume across device types); a continuation killed after a save; the divergence guard (a
resumed run's earlier skipped steps, a short last interval, a taken step ending a run of
skipped ones, the checkpoint its message names); the out_dir lock file and flock's errors;
the deterministic mode's restore of the caller's setting; and what a run checks before it
trains (resume=False, a resume into another run's logs, a branch, an unreadable config.yaml
beside old logs, vanilla with equal sampling, model overrides, a clusters file of another T,
train.threads, random flips, compile's engine mode, initial weights independent of the data
loading)."""

from __future__ import annotations

import csv
import errno
import logging
import math
import os
import re
import warnings
from types import SimpleNamespace

import pytest
import torch
from test_train import _cfg
from torch import nn

import antdiff.checkpoint as ck
import antdiff.train as tr
from antdiff.diffusion import GaussianDiffusion
from antdiff.train import (
    EMA,
    LOCK_NAME,
    _LogMeans,
    _SkipWatch,
    build_run,
    checkpoint_state,
    deterministic_algorithms,
    out_dir_lock,
    restore,
    train,
    train_step,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _nan_losses(monkeypatch):
    """Every step's per-sample losses NaN (the diffusion loss times NaN)."""
    real = GaussianDiffusion.training_losses

    def nan_loss(self, model, x0, t, noise=None, model_kwargs=None):
        out = real(self, model, x0, t, noise, model_kwargs)
        return {**out, "loss": out["loss"] * float("nan")}

    monkeypatch.setattr(GaussianDiffusion, "training_losses", nan_loss)


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------- EMA


def test_ema_update_without_a_flag_averages_parameters_and_copies_buffers():
    """EMA.update() (no device flag): every parameter moves by 1 - decay towards the model's,
    and the buffers take the model's values."""
    model = nn.BatchNorm1d(3)
    ema = EMA(model, 0.75)
    with torch.no_grad():
        model.weight.fill_(3.0)  # the EMA's copy is 1
        model.bias.fill_(-2.0)  # the EMA's copy is 0
        model.running_mean.fill_(5.0)
    ema.update()
    assert torch.equal(ema.model.weight, torch.full((3,), 1.5))  # 0.75 * 1 + 0.25 * 3
    assert torch.equal(ema.model.bias, torch.full((3,), -0.5))
    assert torch.equal(ema.model.running_mean, torch.full((3,), 5.0))


# ---------------------------------------------------------------- logged interval means


def _out(loss, cluster_losses, present, finite):
    return SimpleNamespace(
        loss=torch.tensor(loss, dtype=torch.float32),
        cluster_losses=torch.tensor(cluster_losses, dtype=torch.float32),
        present=torch.tensor(present),
        finite=torch.tensor(finite),
    )


def test_interval_means_leave_out_skipped_steps():
    """A skipped step adds nothing to a row: not to the loss, the objective or its clusters'
    columns, and the means divide by the steps that were taken."""
    means = _LogMeans()
    means.add(_out(1.0, [1.0, 3.0, 0.0], [True, True, False], True))  # cluster mean 2
    means.add(_out(100.0, [50.0, 70.0, 90.0], [True, True, True], False))  # skipped
    means.add(_out(3.0, [5.0, 0.0, 6.0], [True, False, True], True))  # cluster mean 5.5
    means.add(None)  # a step that reported nothing
    loss, objective, per = means.take(3)
    assert loss == pytest.approx(3.75)  # (2 + 5.5) / 2
    assert objective == pytest.approx(2.0)  # (1 + 3) / 2
    assert per[0] == pytest.approx(3.0) and per[1] == pytest.approx(3.0)
    assert per[2] == pytest.approx(6.0)
    assert means.steps == []  # a new interval starts


def test_an_interval_with_nothing_measured_is_nan():
    """No step taken in the interval (all skipped, or none recorded: ranks other than 0) gives
    NaN everywhere, for every cluster."""
    loss, objective, per = _LogMeans().take(4)
    assert math.isnan(loss) and math.isnan(objective)
    assert len(per) == 4 and all(math.isnan(v) for v in per)
    means = _LogMeans()
    means.add(_out(2.0, [1.0, 2.0], [True, True], False))
    loss, objective, per = means.take(2)
    assert math.isnan(loss) and math.isnan(objective) and all(math.isnan(v) for v in per)


def test_sec_per_step_divides_a_rows_time_by_its_own_steps(tmp_path, monkeypatch):
    """Each training step takes one (fake) second, a sample grid a hundred: every row reads
    1.0 s a step, the short last interval too, and so does the summary (the grid inside the
    loop counts in its seconds, not in its time per step)."""
    clock = [0.0]
    monkeypatch.setattr(tr, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    real_step, real_samples = tr.train_step, tr.write_samples

    def step(run, batch):
        clock[0] += 1.0
        real_step(run, batch)

    def samples(*a, **kw):
        clock[0] += 100.0
        return real_samples(*a, **kw)

    monkeypatch.setattr(tr, "train_step", step)
    monkeypatch.setattr(tr, "write_samples", samples)
    s = train(_cfg("digits_adm", tmp_path, "--train.log_every", "2", "--train.sample_every", "2",
                   steps=3))  # fmt: skip
    rows = _rows(tmp_path / "metrics.csv")
    assert [r["step"] for r in rows] == ["2", "3"]
    assert [float(r["sec_per_step"]) for r in rows] == [1.0, 1.0]
    assert s["sec_per_step"] == 1.0 and s["seconds"] == 103.0  # 3 steps, the grid at 2


def test_a_row_averages_every_micro_batch_of_a_loss_space_step(tmp_path, monkeypatch):
    """A loss-space method with train.micro_batch reports each micro-batch: the row's loss is
    the mean over all of them, not the last one's; the run's summary repeats the row."""
    from antdiff.train import cluster_mean_loss

    real, reported = tr.engine_step, []

    def spy(run, batch):
        stepped = real(run, batch)
        reported.append([cluster_mean_loss(o) for o in run.outputs])
        return stepped

    monkeypatch.setattr(tr, "engine_step", spy)
    s = train(_cfg("digits_adm", tmp_path, "--ant.method", "uw", "--train.micro_batch", "5",
                   "--train.log_every", "2"))  # fmt: skip
    assert [len(r) for r in reported] == [2, 2]
    (row,) = _rows(tmp_path / "metrics.csv")
    want = sum(sum(r) for r in reported) / 4
    assert float(row["loss"]) == pytest.approx(want, rel=1e-5)
    # the summary gives the last row's loss and objective (UW's objective is another number)
    assert s["loss"] == pytest.approx(float(row["loss"]), rel=1e-5)
    assert s["objective"] == pytest.approx(float(row["objective"]), rel=1e-5)
    assert s["objective"] != pytest.approx(s["loss"], rel=1e-3)


def test_progress_false_draws_no_bar(tmp_path, capsys):
    train(_cfg("digits_adm", tmp_path, steps=1))
    assert "train:" not in capsys.readouterr().err
    train(_cfg("digits_adm", tmp_path / "b", "--train.progress", "true", steps=1))
    assert "train:" in capsys.readouterr().err


# ---------------------------------------------------------------- sample grids


def test_sample_grids_are_drawn_every_sample_every_steps_and_once_at_the_end(
    tmp_path, monkeypatch
):
    """sample_every = 2 over 5 steps: grids at steps 2 and 4 inside the loop and one final grid
    at step 5; a run ending on the cadence draws its last grid once."""
    real, drawn = tr.write_samples, []

    def spy(run, path):
        drawn.append((run.step, path.name))
        return real(run, path)

    monkeypatch.setattr(tr, "write_samples", spy)
    train(_cfg("digits_adm", tmp_path / "a", "--train.sample_every", "2", steps=5))
    assert drawn == [(2, "step_00000002.png"), (4, "step_00000004.png"), (5, "step_00000005.png")]
    drawn.clear()
    s = train(_cfg("digits_adm", tmp_path / "b", "--train.sample_every", "2", steps=4))
    assert drawn == [(2, "step_00000002.png"), (4, "step_00000004.png")]
    assert s["samples"] == str(tmp_path / "b" / "samples" / "step_00000004.png")


# ---------------------------------------------------------------- checkpoints and resume


def test_a_checkpoint_records_what_sampling_needs_of_the_data(tmp_path):
    """data_meta: the shape, the classes and their names (a conditional run on the digits)."""
    run = build_run(_cfg("digits_dit", tmp_path))
    meta = checkpoint_state(run)["data_meta"]
    assert meta["shape"] == list(run.data.shape) == [1, 8, 8]
    assert meta["num_classes"] == run.data.num_classes == 10
    names = run.data.class_names
    assert meta["class_names"] == (None if names is None else list(names))


def test_a_resume_on_another_device_type_does_not_replay_the_first_draws(tmp_path):
    """--allow-config-change on a generator saved on another device type reseeds the step
    generator from the seed and the checkpoint's step: the continuation does not draw the
    timesteps and noise of the run's first steps again."""
    cfg = _cfg("digits_adm", tmp_path)
    run = build_run(cfg)
    for _ in range(2):
        train_step(run, tr.get_batch(run.data, *run.batches.next_batch()))
    state = checkpoint_state(run)
    state["gen"], state["gen_device"] = torch.zeros(16, dtype=torch.uint8), "cuda"
    resumed = build_run(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        restore(resumed, state, allow_config_change=True)
    assert resumed.step == 2
    fresh = build_run(cfg).gen  # the generator a run starts with
    draw = torch.randn(64, generator=resumed.gen)
    assert not torch.equal(draw, torch.randn(64, generator=fresh))


def test_only_rank_0_keeps_an_ema(tmp_path):
    """Rank 0 alone samples and saves: the other ranks build no EMA copy of the model."""
    import torch.distributed as dist

    from antdiff.train_dist import DistContext

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0,
                            world_size=1)  # fmt: skip
    try:
        cfg = _cfg("digits_adm", tmp_path / "run")
        for rank in (0, 1):
            ctx = DistContext(rank, 2, 0, torch.device("cpu"), owns_group=False)
            assert (build_run(cfg, dist=ctx).ema is None) == (rank == 1)
    finally:
        dist.destroy_process_group()


def test_the_step_generator_is_not_the_data_orders_or_the_seeds_stream(tmp_path):
    """The timesteps and noise come from a stream of their own: not that of a generator
    seeded with train.seed, which at seed 0 is also the data order's first epoch's."""
    run = build_run(_cfg("digits_adm", tmp_path, "--train.seed", "0"))
    draw = torch.randn(64, generator=run.gen)
    assert not torch.equal(draw, torch.randn(64, generator=torch.Generator().manual_seed(0)))


def test_restoring_another_methods_state_names_what_a_resume_keeps(tmp_path):
    """The engine's refusal of another method's state is extended with the settings a resume
    must keep and where to find them."""
    uw = build_run(_cfg("digits_adm", tmp_path, "--ant.method", "uw"))
    state = checkpoint_state(uw)
    other = build_run(_cfg("digits_adm", tmp_path, "--ant.method", "rlw"))
    with pytest.raises(ValueError, match=r"trained with method 'uw'.*When resuming, keep the "
                       r"checkpoint's ant.method, ant.k.*--allow-config-change cannot change "
                       r"them"):  # fmt: skip
        restore(other, state)


def test_resume_false_starts_a_fresh_run(tmp_path):
    s = train(_cfg("digits_adm", tmp_path), resume=False)
    assert s["step"] == 2 and len(_rows(tmp_path / "metrics.csv")) == 2


def test_a_resume_into_a_folder_holding_another_runs_logs_is_refused(tmp_path):
    """A run that kept no checkpoints still has logs: a resume of another run into its folder
    is refused, and its metrics.csv stays as it was."""
    a, b = tmp_path / "a", tmp_path / "b"
    train(_cfg("digits_adm", a, "--train.ckpt_every", "2"))
    train(_cfg("digits_adm", b, steps=1))  # logs only
    before = (b / "metrics.csv").read_text()
    with pytest.raises(ValueError, match="holds another run"):
        train(_cfg("digits_adm", b, steps=3), resume=a)
    assert (b / "metrics.csv").read_text() == before


def test_a_branch_into_an_empty_folder_says_so_and_leaves_the_source(tmp_path, caplog):
    """--resume of a run into another, empty out_dir warns that it branches; a run folder that
    lost its config.yaml is still a run (its checkpoints/): the refusal of a busy out_dir
    advises continuing it in place."""
    a = tmp_path / "a"
    train(_cfg("digits_adm", a, "--train.ckpt_every", "2"))
    before = sorted(p.name for p in ck.list_checkpoints(a))
    with caplog.at_level(logging.WARNING, logger="antdiff.train"):
        assert train(_cfg("digits_adm", tmp_path / "c", steps=3), resume=a)["step"] == 3
    assert "branching: the run continues in train.out_dir" in caplog.text
    assert sorted(p.name for p in ck.list_checkpoints(a)) == before
    (a / "config.yaml").unlink()
    with pytest.raises(ValueError, match=rf"--train.out_dir '{re.escape(str(a))}' to continue "
                       "that run in place"):  # fmt: skip
        train(_cfg("digits_adm", tmp_path / "c", steps=4), resume=a)


def test_a_continuation_killed_after_a_save_keeps_its_rows_up_to_it(tmp_path, monkeypatch):
    """Continued in place from step 2 with a new lr, saved at step 4 and killed at step 5: the
    logs hold the continuation's rows to step 4 (the newest checkpoint's), not the old run's."""
    extra = ["--train.ckpt_every", "2", "--train.keep_ckpts", "3"]
    train(_cfg("digits_adm", tmp_path, *extra, steps=6))
    real = tr.train_step

    def killed(run, batch):
        if run.step == 4:  # after the save at step 4
            raise KeyboardInterrupt
        real(run, batch)

    monkeypatch.setattr(tr, "train_step", killed)
    with pytest.raises(KeyboardInterrupt), pytest.warns(UserWarning, match="supersedes"):
        train(_cfg("digits_adm", tmp_path, *extra, "--train.lr", "0.003", steps=6),
              resume=tmp_path / "checkpoints" / "ckpt_00000002.pt", allow_config_change=True)
    assert ck.list_checkpoints(tmp_path)[-1].name == "ckpt_00000004.pt"
    rows = _rows(tmp_path / "metrics.csv")
    assert [(r["step"], float(r["lr"])) for r in rows] == [
        ("1", 2e-4), ("2", 2e-4), ("3", 0.003), ("4", 0.003)]


def test_an_unreadable_config_yaml_beside_old_logs_counts_as_another_config(tmp_path):
    """A folder with metrics.csv and a config.yaml this version cannot parse: a fresh run is
    refused with the out_dir advice, not a YAML traceback."""
    train(_cfg("digits_adm", tmp_path, steps=1))
    (tmp_path / "config.yaml").write_text("data: [unclosed\n  : :\n")
    with pytest.raises(ValueError, match="holds the logs of a run with another config"):
        train(_cfg("digits_adm", tmp_path, steps=1))


# ---------------------------------------------------------------- settings checked up front


def test_vanilla_with_equal_sampling_warns_that_it_is_no_baseline(tmp_path):
    with pytest.warns(UserWarning, match="not the plain-training baseline"):
        train(_cfg("digits_adm", tmp_path / "a", "--ant.method", "vanilla", "--ant.sampling",
                   "equal", steps=1))  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(_cfg("digits_adm", tmp_path / "b", "--ant.method", "vanilla", steps=1))
    # an interval specialist draws t uniformly in its t_range: the sampling does not apply
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        train(_cfg("digits_adm", tmp_path / "c", "--ant.method", "vanilla", "--ant.sampling",
                   "equal", "--train.t_range", "[10,50]", steps=1))  # fmt: skip
    assert not [w for w in seen if "plain-training baseline" in str(w.message)]


def test_model_overrides_that_contradict_the_data_are_refused(tmp_path):
    cfg = _cfg("digits_adm", tmp_path, "--model.overrides", "{in_channels: 3}")
    with pytest.raises(ValueError, match=r"model.overrides.in_channels=3 contradicts the "
                       r"data/diffusion config, which gives 1"):  # fmt: skip
        build_run(cfg)


def test_a_clusters_file_of_another_T_is_refused(tmp_path):
    from antdiff.clustering import Clusters

    path = tmp_path / "c.json"
    path.write_text(Clusters((0, 100, 250, 600, 800, 1000), "custom").to_json())
    cfg = _cfg("digits_adm", tmp_path, "--ant.clustering", str(path), "--diffusion.T", "500")
    with pytest.raises(ValueError, match=r"k=5 clusters of T=1000 .*--diffusion.T 1000"):
        build_run(cfg)


def test_compile_serves_gradient_methods_in_micro_mode(tmp_path):
    """train.compile with ant.mode auto: the engine runs micro mode, without the one-pass
    hooks that would make the compiled model recompile every step."""
    run = build_run(_cfg("digits_adm", tmp_path, "--train.compile", "true", "--ant.method",
                         "pcgrad"))  # fmt: skip
    assert run.ant.mode == "micro" and run.ant._onepass is None
    assert build_run(_cfg("digits_adm", tmp_path, "--ant.method", "pcgrad")).ant.mode == "auto"


def test_train_threads_sets_torchs_thread_count(tmp_path):
    before = torch.get_num_threads()
    try:
        build_run(_cfg("digits_adm", tmp_path, "--train.threads", "2"))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_random_flip_reaches_the_batch_order(tmp_path):
    assert build_run(_cfg("digits_adm", tmp_path, "--data.random_flip", "true")).batches.flip
    assert not build_run(_cfg("digits_adm", tmp_path)).batches.flip


def test_the_models_initial_weights_do_not_depend_on_loading_the_data(tmp_path, monkeypatch):
    """The model is initialised from train.seed after the data is loaded: a data source that
    draws from the global random stream while it loads leaves the initial weights as they
    are."""
    cfg = _cfg("digits_adm", tmp_path)
    want = build_run(cfg).model
    real = tr.load_dataset

    def drawing(*a, **kw):
        torch.rand(1000)  # e.g. a random crop or split while loading
        return real(*a, **kw)

    monkeypatch.setattr(tr, "load_dataset", drawing)
    got = build_run(cfg).model
    for p, q in zip(got.parameters(), want.parameters(), strict=True):
        assert torch.equal(p, q)


# ---------------------------------------------------------------- divergence guard


def _watched_run(step: int, nonfinite, needs_gradients: bool = True) -> SimpleNamespace:
    """What _SkipWatch reads of a run: the config's train section, the telemetry's non-finite
    count (``nonfinite()``) and the step."""
    cfg = SimpleNamespace(train=SimpleNamespace(lr=1e-3, grad_clip=1.0, batch_size=10,
                                                micro_batch=0))  # fmt: skip
    ant = SimpleNamespace(telemetry=SimpleNamespace(nonfinite=nonfinite),
                          needs_gradients=needs_gradients)  # fmt: skip
    return SimpleNamespace(ant=ant, cfg=cfg, step=step, dist=None)


def test_a_resumed_runs_earlier_skipped_steps_do_not_count_again(monkeypatch):
    """The guard starts from the count a resumed run's telemetry holds: skipped steps of the
    run before the checkpoint are not this run's first interval."""
    monkeypatch.setattr(tr, "DIVERGED_STEPS", 2)
    run = _watched_run(12, lambda: 7, needs_gradients=False)
    watch = _SkipWatch(run)
    run.step = 14
    watch.check({"nonfinite_steps": 7}, None)  # two good steps after the resume
    assert watch.row == 0


def test_an_interval_with_a_taken_step_ends_the_run_of_skipped_ones(monkeypatch):
    """Two skipped intervals of 2 steps with a good interval between them are no run of 4
    skipped steps."""
    monkeypatch.setattr(tr, "DIVERGED_STEPS", 4)
    run = _watched_run(0, lambda: 0)
    watch = _SkipWatch(run)
    for now, row in ((2, 2), (3, 0), (5, 2)):  # the second interval: one of its 2 steps taken
        run.step += 2
        watch.check({"nonfinite_steps": now}, None)
        assert watch.row == row


def test_divergence_after_a_checkpoint_names_it_and_the_step(tmp_path, monkeypatch):
    """Steps 3 on are all non-finite: with DIVERGED_STEPS = 2 the run stops at step 4, naming
    the checkpoint of step 3 (which may hold diverged weights)."""
    monkeypatch.setattr(tr, "DIVERGED_STEPS", 2)
    real, calls = GaussianDiffusion.training_losses, []

    def nan_from_step_3(self, model, x0, t, noise=None, model_kwargs=None):
        out = real(self, model, x0, t, noise, model_kwargs)
        calls.append(1)
        return {**out, "loss": out["loss"] * float("nan")} if len(calls) > 2 else out

    monkeypatch.setattr(GaussianDiffusion, "training_losses", nan_from_step_3)
    ckpt = tmp_path / "checkpoints" / "ckpt_00000003.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(tr.TrainingDiverged, match=r"the last 2 steps \(to step 4\) were all "
                           rf"non-finite.*the last checkpoint, {re.escape(str(ckpt))}, may "
                           "already hold"):  # fmt: skip
            train(_cfg("digits_adm", tmp_path, "--ant.method", "uw", "--train.ckpt_every", "1",
                       "--train.keep_ckpts", "5", steps=6))  # fmt: skip


def test_a_short_last_interval_counts_its_own_steps(tmp_path, monkeypatch):
    """Every step non-finite, log_every = 2 over 5 steps, DIVERGED_STEPS = 5: the last row
    covers one step, and with it the skipped steps reach 5 at step 5."""
    monkeypatch.setattr(tr, "DIVERGED_STEPS", 5)
    _nan_losses(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(tr.TrainingDiverged, match=r"the last 5 steps \(to step 5\)"):
            train(_cfg("digits_adm", tmp_path, "--ant.method", "uw", "--train.log_every", "2",
                       steps=5))  # fmt: skip


# ---------------------------------------------------------------- out_dir lock


def test_the_lock_file_holds_the_current_pid_only(tmp_path):
    """A longer pid left by an earlier run is replaced, not overwritten in part."""
    (tmp_path / LOCK_NAME).write_text("123456789012\n")
    with out_dir_lock(tmp_path):
        assert (tmp_path / LOCK_NAME).read_text() == f"{os.getpid()}\n"


def test_a_flock_error_other_than_no_support_is_raised(tmp_path, monkeypatch):
    """Only the errors of file systems without flock train unlocked; another (an I/O error)
    stops the run."""
    import fcntl

    def broken(fd, op):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(fcntl, "flock", broken)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(OSError, match="Input/output error"), out_dir_lock(tmp_path):
            pass


# ---------------------------------------------------------------- deterministic mode


def test_deterministic_mode_restores_the_callers_own_setting(monkeypatch):
    """A caller that had deterministic algorithms on (warn only) gets them back so; a
    CUBLAS_WORKSPACE_CONFIG it set is kept."""
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with deterministic_algorithms(True):
            assert torch.are_deterministic_algorithms_enabled()
            assert not torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    finally:
        torch.use_deterministic_algorithms(False)


def test_a_resumed_run_that_diverges_before_saving_names_the_checkpoint_it_resumed(
    tmp_path, monkeypatch
):
    """Resumed from step 2, every step non-finite: the run stops at step 4, before its own
    first save. The run has a checkpoint (the one it resumed from): the advice names it rather
    than saying none was written and to start over."""
    extra = ["--ant.method", "uw", "--train.ckpt_every", "4"]
    train(_cfg("digits_adm", tmp_path, *extra, steps=2))  # the step-2 checkpoint: the last one
    monkeypatch.setattr(tr, "DIVERGED_STEPS", 2)
    _nan_losses(monkeypatch)
    ckpt = tmp_path / "checkpoints" / "ckpt_00000002.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(tr.TrainingDiverged, match=r"\(to step 4\)") as e:
            train(_cfg("digits_adm", tmp_path, *extra, steps=8), resume=True)
    assert "no checkpoint was written yet" not in str(e.value)
    assert str(ckpt) in str(e.value)


def test_a_resumed_diverging_run_stops_where_an_unbroken_one_does(tmp_path, monkeypatch):
    """Every step non-finite, DIVERGED_STEPS = 4: an unbroken run stops at step 4. Stopped at
    step 2 and resumed, the run counted its skipped steps from 0 again and went on to step 6;
    the guard's count is now in the checkpoint."""
    monkeypatch.setattr(tr, "DIVERGED_STEPS", 4)
    _nan_losses(monkeypatch)
    extra = ["--ant.method", "uw", "--train.ckpt_every", "2"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(tr.TrainingDiverged, match=r"the last 4 steps \(to step 4\)"):
            train(_cfg("digits_adm", tmp_path / "a", *extra, steps=8))
        train(_cfg("digits_adm", tmp_path / "b", *extra, steps=2))  # 2 skipped: not yet 4
        with pytest.raises(tr.TrainingDiverged, match=r"the last 4 steps \(to step 4\)"):
            train(_cfg("digits_adm", tmp_path / "b", *extra, steps=8), resume=True)


def test_the_divergence_guard_state_round_trips_between_log_points(monkeypatch):
    """Saved after a check at step 2 and restored at step 3 (a checkpoint between log points),
    the guard judges steps 3-4 against the count of step 2, as the unbroken run does."""
    monkeypatch.setattr(tr, "DIVERGED_STEPS", 4)
    count = {"n": 0}
    run = _watched_run(0, lambda: count["n"])
    watch = _SkipWatch(run)
    run.step = 2
    watch.check({"nonfinite_steps": 2}, None)
    saved = watch.state_dict()
    assert saved == {"row": 2, "at": 2, "before": 2}
    run.step, count["n"] = 3, 3  # the checkpoint's step and telemetry
    again = _SkipWatch(run, saved)
    run.step = 4
    with pytest.raises(tr.TrainingDiverged, match=r"the last 4 steps \(to step 4\)"):
        again.check({"nonfinite_steps": 4}, None)

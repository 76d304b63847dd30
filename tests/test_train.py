"""Trainer: every family and method for a few CPU steps, exact resume, crashes, bad input,
and the paper presets (real model configs, reduced inputs) for two steps."""

from __future__ import annotations

import contextlib
import copy
import csv
import io
import json
import math
import os
import shutil
import time
import warnings

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch import nn

import antdiff.checkpoint as ck
from antdiff.cli import main as cli_main
from antdiff.config import load_config
from antdiff.data import get_batch
from antdiff.diffusion import GaussianDiffusion
from antdiff.train import build_run, checkpoint_state, engine_step, restore, train, train_step
from antdiff.train_dist import DistContext

METHODS = (
    "vanilla",
    "uw",
    "rlw",
    "dwa",
    "famo",
    "pcgrad",
    "nash",
    "imtl",
    "mgda",
    "cagrad",
    "graddrop",
    "uw+pcgrad",
)


pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(preset, tmp_path, *extra, steps=2):
    return load_config(
        preset,
        ["--train.steps", str(steps), "--train.batch_size", "10", "--train.log_every", "1",
         "--train.ckpt_every", "0", "--train.progress", "false", "--sample.steps", "2",
         "--sample.n", "4", "--data.autoencoder_steps", "3", "--train.out_dir", str(tmp_path),
         *extra],
    )  # fmt: skip


def _every(method):
    """Weight methods recompute their weights every 2nd step (exercises both step kinds);
    GradDrop combines J elementwise every step (update_every > 1 is refused)."""
    grad = any(g in method for g in ("pcgrad", "nash", "imtl", "mgda", "cagrad"))
    return ["--ant.update_every", "2"] if grad else []


def _params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains(method, tmp_path):
    s = train(_cfg("digits_adm", tmp_path, "--ant.method", method, *_every(method), steps=3))
    run = s["run"]
    assert s["step"] == 3 and np.isfinite(s["loss"])
    assert run.ant.method_name == method
    init = _params(build_run(run.cfg).model)
    assert not torch.equal(_params(run.model), init)  # the optimiser moved the weights
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    assert all(np.isfinite(float(r[f"weight_c{i}"])) for r in rows for i in range(1, 6))
    assert (tmp_path / "samples" / "step_00000003.png").is_file()
    # "loss" is one quantity for every method (the mean of the cluster losses: all present at
    # B = 10 with k = 5), "objective" the method's own (UW's goes negative as s falls)
    for r in rows:
        cluster = [float(r[f"loss_c{i}"]) for i in range(1, 6)]
        assert float(r["loss"]) == pytest.approx(np.mean(cluster), rel=1e-5)
    assert float(rows[-1]["objective"]) == pytest.approx(s["objective"], rel=1e-5)
    assert s["objective"] == pytest.approx(float(run.ant.last.loss))


@pytest.mark.parametrize("preset", ["digits_adm", "digits_ldm", "digits_dit"])
@pytest.mark.parametrize("method", ["uw", "uw+pcgrad"])
def test_every_family_trains(preset, method, tmp_path):
    s = train(_cfg(preset, tmp_path, "--ant.method", method))
    assert s["step"] == 2 and np.isfinite(s["loss"])
    img = np.asarray(Image.open(s["samples"]))
    assert img.ndim == 3 and img.shape[2] in (3, 4)


@pytest.mark.parametrize("chunk", [None, 1000], ids=["one-chunk", "chunks"])
def test_ema_follows_every_optimiser_step(chunk, tmp_path, monkeypatch):
    if chunk is not None:  # the EMA's temporary in pieces of at most `chunk` elements
        monkeypatch.setattr("antdiff.train._EMA_CHUNK", chunk)
    cfg = _cfg("digits_adm", tmp_path, "--ant.method", "pcgrad", "--train.ema_decay", "0.75")
    run = build_run(cfg)
    ema_prev = [p.detach().double().clone() for p in run.ema.model.parameters()]
    for _ in range(2):
        idx = run.batches.next_indices()
        train_step(run, {"x": run.data.x[idx]})
        for e, p, prev in zip(run.ema.model.parameters(), run.model.parameters(), ema_prev):
            ref = 0.75 * prev + 0.25 * p.detach().double()  # float64 reference of the EMA rule
            torch.testing.assert_close(e.double(), ref, rtol=1e-6, atol=1e-7)
        ema_prev = [p.detach().double().clone() for p in run.ema.model.parameters()]


@pytest.mark.parametrize("method", ["uw", "uw+pcgrad"])
def test_nonfinite_step_is_skipped_on_the_device(method, tmp_path, monkeypatch):
    """The trainer's AdamW is fused: a non-finite step leaves the parameters, the optimiser
    state and the EMA exactly as they were, reads nothing on the host, and is reported by the
    next ant.stats()."""
    from test_no_sync import NoHostCopy, NoHostSync

    cfg = _cfg("digits_adm", tmp_path, "--ant.method", method, "--train.ema_decay", "0.75")
    run = build_run(cfg)
    assert all(g["fused"] for g in run.opt.param_groups)
    idx = run.batches.next_indices()
    train_step(run, {"x": run.data.x[idx]})

    def state():
        opt = [v for st in run.opt.state.values() for v in st.values()]
        return [t.detach().clone() for t in (*run.model.parameters(),
                                             *run.ema.model.parameters(), *opt)]  # fmt: skip

    before = state()
    real = run.diffusion.training_losses

    def nan_loss(*args, **kwargs):
        out = real(*args, **kwargs)
        return {**out, "loss": out["loss"] * float("nan")}

    monkeypatch.setattr(run.diffusion, "training_losses", nan_loss)
    run.ant.stats()  # as a logger would: reads the earlier step's flag (a CPU tensor here)
    with warnings.catch_warnings(), NoHostCopy(), NoHostSync():
        warnings.simplefilter("error")  # reported later, by stats()
        train_step(run, {"x": run.data.x[idx]})
    for a, b in zip(state(), before, strict=True):
        assert torch.equal(a, b)
    with pytest.warns(UserWarning, match="skipped the step on the device"):
        run.ant.stats()
    monkeypatch.setattr(run.diffusion, "training_losses", real)
    train_step(run, {"x": run.data.x[idx]})  # the next good step moves everything again
    assert any(not torch.equal(a, b) for a, b in zip(state(), before))


def test_resume_from_a_non_fused_optimizer_state(tmp_path):
    """A checkpoint saved before the trainer fused AdamW (groups say fused=None) resumes into a
    fused optimiser and keeps training."""
    cfg = _cfg("digits_adm", tmp_path, "--ant.method", "uw")
    run = build_run(cfg)
    idx = run.batches.next_indices()
    train_step(run, {"x": run.data.x[idx]})
    state = checkpoint_state(run)
    groups = state["optimizer"]["param_groups"]
    state["optimizer"] = {**state["optimizer"],
                          "param_groups": [{**g, "fused": None} for g in groups]}  # fmt: skip
    run2 = build_run(cfg)
    restore(run2, state)
    assert all(g["fused"] for g in run2.opt.param_groups)
    train_step(run2, {"x": run2.data.x[idx]})
    assert all(torch.isfinite(p).all() for p in run2.model.parameters())


@pytest.mark.parametrize("recorded", [True, False])
def test_a_generator_saved_on_another_device_type_is_named(recorded, tmp_path, caplog):
    """A run trained on a GPU (train.device auto) and resumed on a CPU: the step generator's
    CUDA state (16 bytes) does not fit a CPU generator (torch's RuntimeError was a traceback).
    Refused with the device named; --allow-config-change reseeds it with a warning. Checkpoints
    from before gen_device are told by the state's size."""
    cfg = _cfg("digits_adm", tmp_path, "--ant.method", "uw")
    run = build_run(cfg)
    state = checkpoint_state(run)
    assert state["gen_device"] == "cpu"
    state["gen"] = torch.zeros(16, dtype=torch.uint8)  # what a CUDA generator's get_state gives
    if recorded:
        state["gen_device"] = "cuda"
    else:
        del state["gen_device"]
    with pytest.raises(ValueError, match="drew its timesteps and noise on cuda, this one runs on "
                       "cpu.*--train.device cuda.*--allow-config-change"):  # fmt: skip
        restore(build_run(cfg), state)
    run2 = build_run(cfg)
    with caplog.at_level("WARNING", logger="antdiff.train"):
        restore(run2, state, allow_config_change=True)
    assert "step generator is reseeded" in caplog.text
    idx = run2.batches.next_indices()
    train_step(run2, {"x": run2.data.x[idx]})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU here")
@pytest.mark.parametrize("method", ["uw", "uw+pcgrad"])
def test_cuda_train_step_has_no_host_sync(method, tmp_path):
    """The trainer's step on a GPU (fused AdamW, EMA) under torch's own sync detector."""
    cfg = _cfg("digits_adm", tmp_path, "--ant.method", method, "--train.device", "cuda")
    run = build_run(cfg)
    assert run.data.x.is_cuda  # the batch is gathered on the device from host indices
    train_step(run, get_batch(run.data, run.batches.next_indices()))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):  # the trainer's own loop body: indices -> batch -> step
            train_step(run, get_batch(run.data, run.batches.next_indices()))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.parametrize(
    "batch, extra", [(7, []), (11, ["--ant.sampling", "equal"]), (3, ["--ant.sampling", "uniform"])]
)
def test_any_batch_size(batch, extra, tmp_path):
    s = train(
        _cfg(
            "digits_adm",
            tmp_path,
            "--ant.method",
            "pcgrad",
            "--train.batch_size",
            str(batch),
            *extra,
        )
    )
    assert np.isfinite(s["loss"])


def test_labels_travel_with_their_images(tmp_path, monkeypatch):
    # micro mode: one loss call per cluster sub-batch, each of which must keep its labels
    cfg = _cfg("digits_dit", tmp_path, "--ant.method", "pcgrad", "--ant.mode", "micro")
    run = build_run(cfg)
    seen = []
    real = run.diffusion.training_losses

    def check(model, x0, t, noise=None, model_kwargs=None):
        # each image's label must be the dataset label of that very image
        hits = (x0[:, None] == run.data.x[None]).flatten(2).all(-1)  # [b, N]
        seen.append(bool((run.data.y[hits.float().argmax(1)] == model_kwargs["y"]).all()))
        return real(model, x0, t, noise, model_kwargs)

    monkeypatch.setattr(run.diffusion, "training_losses", check)
    idx = run.batches.next_indices()
    train_step(run, {"x": run.data.x[idx], "y": run.data.y[idx]})
    assert len(seen) > 1 and all(seen)  # one call per cluster sub-batch, all aligned


@pytest.mark.parametrize("method", ["pcgrad", "nash"])
def test_micro_batches_are_accumulated_into_one_step(method, tmp_path, monkeypatch):
    """train.micro_batch: each micro-batch draws its own stratified timesteps and goes through
    ant.backward(accumulate=True) but the last; one optimiser step, one logged output."""
    cfg = _cfg("digits_adm", tmp_path, "--ant.method", method, *_every(method),
               "--train.micro_batch", "5")  # fmt: skip
    run = build_run(cfg)
    calls, real = [], run.ant.backward

    def spy(loss_fn, batch, t, **kw):
        calls.append((batch["x"].shape[0], kw.get("accumulate"), t.clone(), batch["x"].clone()))
        return real(loss_fn, batch, t, **kw)

    monkeypatch.setattr(run.ant, "backward", spy)
    for step in range(2):  # Nash: an on- and an off-step
        idx = run.batches.next_indices()
        train_step(run, {"x": run.data.x[idx]})
        # micro-batch m holds the batch's samples 5 m .. 5 m + 4 (the engine sorts each by
        # cluster: compared as sets of rows)
        for m, call in enumerate(calls[-2:]):
            want = run.data.x[idx][5 * m : 5 * m + 5].flatten(1)
            got = call[3].flatten(1)
            assert sorted(map(tuple, got.tolist())) == sorted(map(tuple, want.tolist()))
        assert run.ant.step_count == step + 1 and len(run.outputs) == 1
        assert run.outputs[0] is run.ant.last and bool(run.outputs[0].weights.sum() > 0)
    # two micro-batches of 5 a step, each with timesteps of its own
    assert [c[:2] for c in calls] == [(5, True), (5, False)] * 2
    assert len({tuple(c[2].tolist()) for c in calls}) == 4


def test_loss_space_micro_batches_average_their_gradients(tmp_path, monkeypatch):
    """vanilla with train.micro_batch: the step's gradient is the mean of the micro-batches'
    batch-mean gradients (each ant.reduce(...) / n), from their own timesteps and noise."""
    cfg = _cfg("digits_adm", tmp_path, "--ant.method", "vanilla", "--train.micro_batch", "5",
               "--train.grad_clip", "0")  # fmt: skip
    run = build_run(cfg)
    seen, real = [], run.diffusion.training_losses

    def record(model, x0, t, noise=None, model_kwargs=None):
        seen.append((x0.clone(), t.clone(), noise.clone()))
        return real(model, x0, t, noise, model_kwargs)

    monkeypatch.setattr(run.diffusion, "training_losses", record)
    before = copy.deepcopy(run.model)
    monkeypatch.setattr(run.opt, "step", lambda *a, **kw: None)  # keep the gradients to compare
    idx = run.batches.next_indices()
    train_step(run, {"x": run.data.x[idx]})
    assert [len(t) for _, t, _ in seen] == [5, 5]
    assert not torch.equal(seen[0][1], seen[1][1])  # each micro-batch its own timesteps
    want = [torch.zeros_like(p) for p in before.parameters()]
    for x0, t, noise in seen:
        loss = real(before, x0, t, noise)["loss"].mean() / 2
        for w, g in zip(want, torch.autograd.grad(loss, list(before.parameters()))):
            w += g
    for w, p in zip(want, run.model.parameters()):
        torch.testing.assert_close(p.grad, w, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("micro", ["0", "5"])
def test_a_step_skipped_for_its_gradients_logs_nothing(micro, tmp_path, monkeypatch):
    """Finite losses, a NaN gradient: ant.step skips the step, and none of its (micro-)batches
    enters the logged means (the outputs carry ant.step's verdict)."""
    from antdiff.train import _LogMeans

    cfg = _cfg("digits_adm", tmp_path, "--ant.method", "uw", "--train.micro_batch", micro)
    run = build_run(cfg)
    real, p0 = run.diffusion.training_losses, next(run.model.parameters())

    def poisoned(model, x0, t, noise=None, model_kwargs=None):
        out = real(model, x0, t, noise, model_kwargs)
        z = (p0 - p0.detach()).sum()  # d/dp sqrt(0) = inf: times 0 gives NaN
        return {**out, "loss": out["loss"] + 0.0 * torch.sqrt(z)}

    monkeypatch.setattr(run.diffusion, "training_losses", poisoned)
    idx = run.batches.next_indices()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine_step(run, {"x": run.data.x[idx]})  # (the fused AdamW skips on the device)
    assert not bool(run.ant.last.finite)
    assert len(run.outputs) == (1 if micro == "0" else 2)
    assert not any(bool(o.finite) for o in run.outputs)
    means = _LogMeans()
    for o in run.outputs:
        means.add(o)
    assert math.isnan(means.take(run.ant.k)[0])


def test_loss_space_micro_batches_all_reduce_once_per_step(tmp_path, monkeypatch):
    """Under DDP the micro-batches but the last run inside no_sync (one all-reduce a step)."""
    cfg = _cfg("digits_adm", tmp_path, "--ant.method", "uw", "--train.micro_batch", "2",
               "--train.batch_size", "10", "--ant.sampling", "uniform")  # fmt: skip
    run = build_run(cfg)
    entered = []

    class Wrapped(nn.Module):  # what DDP offers the trainer: no_sync()
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *a, **kw):
            return self.inner(*a, **kw)

        @contextlib.contextmanager
        def no_sync(self):
            entered.append(1)
            yield

    run.forward = Wrapped(run.forward)
    idx = run.batches.next_indices()
    train_step(run, {"x": run.data.x[idx]})
    assert len(entered) == 4  # 5 micro-batches: 4 without DDP's all-reduce


def test_trainer_micro_batches_draw_their_own_timesteps_in_t_range(tmp_path, monkeypatch):
    """train.t_range (an interval specialist) with train.micro_batch: micro-batch m draws its
    own b timesteps in [t1, t2) from the step's generator, then its noise (not B timesteps of
    which it keeps b)."""
    cfg = _cfg("digits_adm", tmp_path, "--ant.method", "vanilla", "--train.micro_batch", "5",
                     "--train.t_range", "[10,50]")  # fmt: skip
    run = build_run(cfg)
    seen, real = [], run.diffusion.training_losses

    def record(model, x0, t, noise=None, model_kwargs=None):
        seen.append((t.clone(), noise.clone()))
        return real(model, x0, t, noise, model_kwargs)

    monkeypatch.setattr(run.diffusion, "training_losses", record)
    g = torch.Generator(run.gen.device)
    g.set_state(run.gen.get_state())  # a copy of the step's generator: the draws it should make
    idx = run.batches.next_indices()
    x = run.data.x[idx]
    want = []
    for _ in range(2):
        t = torch.randint(10, 50, (5,), device=run.device, generator=g)
        want.append((t, torch.randn(x[:5].shape, dtype=x.dtype, device=run.device, generator=g)))
    engine_step(run, {"x": x})
    assert [t.tolist() for t, _ in seen] == [t.tolist() for t, _ in want]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(seen, want))  # the noise


def test_build_run_checks_micro_batch_against_the_processes(tmp_path):
    """Under torchrun train.micro_batch is global too: build_run refuses one that the processes
    do not divide before it builds anything (rank 0 of 4, no process group needed)."""
    cfg = _cfg("digits_adm", tmp_path, "--train.batch_size", "24", "--train.micro_batch", "6")
    with pytest.raises(ValueError, match=r"train.micro_batch=6 is GLOBAL.*\(4\)"):
        build_run(cfg, dist=DistContext(0, 4, 0, torch.device("cpu"), owns_group=False))


def test_a_clusters_file_sets_the_runs_clusters(tmp_path):
    """ant.clustering may name the JSON that `antdiff cluster --json` writes: the run trains on
    those bounds, with the file's k and T in place of the preset's; a k or T given as well
    must agree with the file (refused with the settings that fit it), and a clusters file
    named in a YAML config takes that config's k and T as they are."""
    from antdiff.clustering import Clusters

    want = Clusters((0, 100, 250, 600, 1000), "custom")
    path = tmp_path / "c.json"
    path.write_text(want.to_json())
    run = build_run(_cfg("digits_adm", tmp_path, "--ant.k", "4", "--ant.clustering", str(path)))
    assert run.ant.clusters.bounds == want.bounds
    cfg = _cfg("digits_adm", tmp_path / "a", "--ant.clustering", str(path))
    assert (cfg.ant.k, cfg.diffusion.T) == (4, 1000)
    short = tmp_path / "c500.json"
    short.write_text(Clusters((0, 50, 125, 300, 500), "custom").to_json())
    cfg = _cfg("digits_adm", tmp_path / "a", "--ant.clustering", str(short))
    assert (cfg.ant.k, cfg.diffusion.T) == (4, 500)
    assert build_run(cfg).ant.clusters.bounds == (0, 50, 125, 300, 500)
    with pytest.raises(ValueError, match=r"holds k=4 clusters.*--ant.k 4"):
        build_run(_cfg("digits_adm", tmp_path / "b", "--ant.k", "5", "--ant.clustering",
                       str(path)))  # fmt: skip
    with pytest.raises(ValueError, match=r"holds k=4 clusters of T=500.*--diffusion.T 500"):
        build_run(_cfg("digits_adm", tmp_path / "b", "--diffusion.T", "1000",
                       "--ant.clustering", str(short)))  # fmt: skip
    yaml_cfg = tmp_path / "mine.yaml"
    yaml_cfg.write_text(f"base: digits_adm\nant:\n  clustering: {path}\n")
    assert load_config(str(yaml_cfg)).ant.k == 5  # the config's own k: the run refuses it
    empty = tmp_path / "empty.yaml"  # an empty section reads as None: T is still the file's
    empty.write_text("base: digits_adm\ndiffusion:\n")
    cfg = load_config(str(empty), ["--ant.clustering", str(short)])
    assert (cfg.ant.k, cfg.diffusion.T) == (4, 500)
    with pytest.raises(FileNotFoundError, match="does not exist"):  # named with the config
        _cfg("digits_adm", tmp_path, "--ant.clustering", str(tmp_path / "none.json"))


def test_a_batch_that_micro_batch_does_not_divide_is_refused(tmp_path):
    run = build_run(_cfg("digits_adm", tmp_path, "--train.micro_batch", "5"))
    with pytest.raises(ValueError, match="train.micro_batch=5 does not divide this batch of 7"):
        train_step(run, {"x": run.data.x[:7]})


def test_micro_batch_settings_are_checked():
    with pytest.raises(ValueError, match="micro_batch=4 does not divide train.batch_size=10"):
        load_config("digits_adm", ["--train.batch_size", "10", "--train.micro_batch", "4"])
    with pytest.raises(ValueError, match="train.micro_batch must be"):
        load_config("digits_adm", ["--train.batch_size", "10", "--train.micro_batch", "-5"])
    with pytest.raises(ValueError, match="micro_batch=2 is smaller than ant.k=5"):
        load_config("digits_adm", ["--train.batch_size", "10", "--train.micro_batch", "2"])
    cfg = load_config("digits_adm", ["--train.batch_size", "10", "--train.micro_batch", "2",
                                     "--ant.sampling", "uniform"])  # fmt: skip
    assert cfg.train.micro_batch == 2


def test_bf16_autocast_step(tmp_path):
    s = train(_cfg("digits_adm", tmp_path, "--train.bf16", "true", "--ant.method", "uw+pcgrad"))
    assert np.isfinite(s["loss"])


def _states_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("method", ["uw", "pcgrad", "graddrop"])
def test_deterministic_run_holds_the_mode_and_restores_it(method, tmp_path, monkeypatch):
    """train.deterministic runs every step under torch.use_deterministic_algorithms (no
    operator of the step refuses it) and leaves the caller's setting as it was, also when the
    run fails."""
    import antdiff.train as tr

    seen, real = [], tr.train_step
    monkeypatch.setattr(tr, "train_step", lambda *a, **kw: (
        seen.append(torch.are_deterministic_algorithms_enabled()), real(*a, **kw))[1])
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", "")  # restored (or removed) after the test
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
    assert not torch.are_deterministic_algorithms_enabled()
    s = train(_cfg("digits_adm", tmp_path / "a", "--ant.method", method,
                   "--train.deterministic", "true"))  # fmt: skip
    assert np.isfinite(s["loss"]) and seen == [True, True]
    assert not torch.are_deterministic_algorithms_enabled()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    monkeypatch.setattr(tr, "_train", lambda *a: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        train(_cfg("digits_adm", tmp_path / "b", "--train.deterministic", "true"))
    assert not torch.are_deterministic_algorithms_enabled()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU here")
@pytest.mark.parametrize("method", ["uw", "pcgrad", "nash", "graddrop"])
def test_deterministic_cuda_reruns_are_bit_identical(method, tmp_path):
    """On a GPU, two runs of one config with train.deterministic end with identical weights
    (the cluster sums' index_add, cuDNN and cuBLAS take their deterministic kernels)."""
    runs = [
        train(_cfg("digits_adm", tmp_path / str(i), "--ant.method", method, *_every(method),
                   "--train.device", "cuda", "--train.deterministic", "true", steps=3))["run"]
        for i in range(2)
    ]  # fmt: skip
    assert _states_equal(runs[0].model, runs[1].model)
    assert runs[0].ant.stats()["weight"] == runs[1].ant.stats()["weight"]


@pytest.mark.parametrize(
    "preset, method, more",
    [("digits_adm", "uw+pcgrad", ()), ("digits_dit", "nash", ()), ("digits_ldm", "rlw", ()),
     ("digits_dit", "graddrop", ()), ("digits_adm", "uw", ("--data.random_flip", "true")),
     ("digits_adm", "uw+pcgrad", ("--train.micro_batch", "5")),
     ("digits_dit", "dwa", ("--train.micro_batch", "5"))],
)  # fmt: skip
def test_resume_is_bit_exact(preset, method, more, tmp_path):
    extra = ["--ant.method", method, *_every(method), "--train.ckpt_every", "2", *more]
    full = train(_cfg(preset, tmp_path / "full", *extra, steps=4))["run"]
    train(_cfg(preset, tmp_path / "split", *extra, steps=2))
    split = train(_cfg(preset, tmp_path / "split", *extra, steps=4), resume=True)["run"]
    assert _states_equal(full.model, split.model) and _states_equal(full.ema.model, split.ema.model)
    assert full.ant.stats()["weight"] == split.ant.stats()["weight"]
    rows = [
        list(csv.reader(open(d / "metrics.csv"))) for d in (tmp_path / "full", tmp_path / "split")
    ]
    sec = rows[0][0].index("sec_per_step")  # all but the timing column
    assert [r[:sec] + r[sec + 1 :] for r in rows[0]] == [r[:sec] + r[sec + 1 :] for r in rows[1]]


def test_a_fresh_run_refuses_a_directory_with_checkpoints(tmp_path):
    """A fresh run there would prune the old checkpoints by step number (its own first one
    among them) and leave a later --resume to continue the old run; a run that kept no
    checkpoints still has logs that a fresh run would overwrite."""
    extra = ["--ant.method", "uw", "--train.ckpt_every", "2"]
    train(_cfg("digits_adm", tmp_path / "run", *extra, steps=2))
    with pytest.raises(ValueError, match="already holds checkpoints.*ckpt_00000002.pt.*--resume"):
        train(_cfg("digits_adm", tmp_path / "run", *extra, steps=2))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        train(_cfg("digits_adm", tmp_path / "file", *extra, steps=2))
    train(_cfg("digits_adm", tmp_path / "logs", "--ant.method", "uw", steps=1))  # no checkpoint
    before = (tmp_path / "logs" / "metrics.csv").read_text()
    with pytest.raises(ValueError, match="holds the logs of a run with another config.*out_dir"):
        train(_cfg("digits_adm", tmp_path / "logs", "--ant.method", "vanilla", steps=1))
    assert (tmp_path / "logs" / "metrics.csv").read_text() == before
    # the same config again (a run killed before its first checkpoint, restarted) replaces them
    train(_cfg("digits_adm", tmp_path / "logs", "--ant.method", "uw", steps=1))


def test_crash_mid_checkpoint_resumes_from_the_last_complete_one(tmp_path, monkeypatch):
    extra = ["--ant.method", "uw", "--train.ckpt_every", "2"]
    full = train(_cfg("digits_adm", tmp_path / "full", *extra, steps=6))["run"]
    real_save, calls = torch.save, []

    def crash_on_second(obj, f):
        calls.append(1)
        if len(calls) == 2:  # the step-4 checkpoint: half written, then the process dies
            buf = io.BytesIO()
            real_save(obj, buf)
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            raise KeyboardInterrupt("killed")
        real_save(obj, f)

    monkeypatch.setattr(ck.torch, "save", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg("digits_adm", tmp_path / "crash", *extra, steps=6))
    monkeypatch.undo()
    assert [p.name for p in ck.list_checkpoints(tmp_path / "crash")] == ["ckpt_00000002.pt"]
    resumed = train(_cfg("digits_adm", tmp_path / "crash", *extra, steps=6), resume=True)["run"]
    assert _states_equal(full.model, resumed.model)


def test_resume_with_a_different_config_lists_the_keys(tmp_path):
    train(_cfg("digits_adm", tmp_path, "--train.ckpt_every", "2"))
    with pytest.raises(ValueError) as e:
        train(
            _cfg("digits_adm", tmp_path, "--train.ckpt_every", "2", "--train.lr", "0.5", steps=4),
            resume=True,
        )
    assert "train.lr: checkpoint 0.0002 -> now 0.5" in str(e.value)
    assert "--allow-config-change" in str(e.value)
    changed = ["--train.lr", "0.5", "--train.weight_decay", "0.25", "--train.betas", "[0.5, 0.6]",
               "--ant.method_kwargs", "{lr: 0.125}"]  # fmt: skip
    s = train(
        _cfg("digits_adm", tmp_path, "--train.ckpt_every", "2", *changed, steps=3),
        resume=True,
        allow_config_change=True,
    )
    assert s["step"] == 3
    # the changed hyperparameters are the ones the optimiser uses (it kept the checkpoint's)
    model_group, uw_group = s["run"].opt.param_groups
    assert (model_group["lr"], model_group["weight_decay"]) == (0.5, 0.25)
    assert tuple(model_group["betas"]) == (0.5, 0.6) and uw_group["lr"] == 0.125
    with open(tmp_path / "metrics.csv") as f:
        assert list(csv.DictReader(f))[-1]["lr"] == "0.5"


def test_a_run_from_before_a_new_config_key_resumes_and_reruns(tmp_path):
    """A checkpoint (and a config.yaml) written before a config key existed resumes, and a
    fresh rerun over its logs is the same config: the missing key takes its default."""
    import yaml

    train(_cfg("digits_adm", tmp_path / "ck", "--train.ckpt_every", "2"))
    path = ck.list_checkpoints(tmp_path / "ck")[-1]
    state = torch.load(path, weights_only=False)
    del state["crc32"]  # earlier versions wrote no checksum (and an edit must drop it)
    del state["config"]["data"]["latent_shift"]
    torch.save(state, path)
    s = train(_cfg("digits_adm", tmp_path / "ck", "--train.ckpt_every", "2", steps=3), resume=True)
    assert s["step"] == 3
    train(_cfg("digits_adm", tmp_path / "logs", steps=1))  # no checkpoint: logs only
    saved = yaml.safe_load((tmp_path / "logs" / "config.yaml").read_text())
    del saved["data"]["latent_shift"]
    (tmp_path / "logs" / "config.yaml").write_text(yaml.safe_dump(saved))
    train(_cfg("digits_adm", tmp_path / "logs", steps=1))  # the same run again
    with pytest.raises(ValueError, match="holds the logs of a run with another config"):
        train(_cfg("digits_adm", tmp_path / "logs", "--train.lr", "0.5", steps=1))


def test_a_folder_run_from_before_random_flip_resumes_without_flips(tmp_path):
    """A folder run written before data.random_flip never flipped: resumed from its own
    config.yaml (no such key) it keeps not flipping, without a refusal (the refusal advised
    that very command); asking for flips then is a change the resume names. A fresh folder run
    records the flips it takes."""
    import yaml

    from antdiff.train import build_run

    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    for i in range(12):
        img = rng.integers(0, 256, (8, 8), dtype=np.uint8)
        Image.fromarray(img).save(tmp_path / "img" / f"{i}.png")
    folder = ["--data.source", "folder", "--data.path", str(tmp_path / "img"),
              "--train.ckpt_every", "2"]  # fmt: skip
    run = tmp_path / "run"
    train(_cfg("digits_adm", run, *folder))
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["random_flip"] is True
    path = ck.list_checkpoints(run)[-1]
    state = torch.load(path, weights_only=False)
    del state["crc32"]  # earlier versions wrote no checksum (and an edit must drop it)
    del state["config"]["data"]["random_flip"]  # as an earlier antdiff wrote them
    torch.save(state, path)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    del saved["data"]["random_flip"]
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    again = load_config(str(run / "config.yaml"), ["--train.steps", "3"])
    assert train(again, resume=True)["step"] == 3
    assert again.data.random_flip is False
    assert build_run(again).batches.flip is False
    with pytest.raises(ValueError, match="data.random_flip: checkpoint False -> now True"):
        train(load_config(str(run / "config.yaml"), ["--train.steps", "4",
                                                     "--data.random_flip", "true"]), resume=True)


def test_checkpoint_from_another_model(tmp_path):
    """Named by the config check before the model is built, also with --allow-config-change."""
    train(_cfg("digits_adm", tmp_path, "--train.ckpt_every", "2"))
    with pytest.raises(ValueError, match="model.name: checkpoint 'adm-tiny' -> now 'adm-small'"
                       "(.|\n)*cannot change on resume"):  # fmt: skip
        train(
            _cfg(
                "digits_adm",
                tmp_path,
                "--train.ckpt_every",
                "2",
                "--model.name",
                "adm-small",
                steps=4,
            ),
            resume=True,
            allow_config_change=True,
        )


def test_a_changed_seed_on_resume_is_refused(tmp_path):
    """The data order and the random streams continue from the checkpoint: a new train.seed
    under --allow-config-change was ignored while config.yaml recorded it."""
    train(_cfg("digits_adm", tmp_path, "--train.ckpt_every", "2", "--ant.method", "uw"))
    with pytest.raises(ValueError, match="train.seed cannot change on resume.*drop --train.seed"):
        cfg = _cfg("digits_adm", tmp_path, "--train.ckpt_every", "2", "--ant.method", "uw",
                   "--train.seed", "7", steps=3)  # fmt: skip
        train(cfg, resume=True, allow_config_change=True)


def test_changed_method_on_resume_is_named(tmp_path):
    """Even with --allow-config-change the method cannot change; the config check names it
    before anything is built (the optimiser's "different number of parameter groups" came
    first when UW was involved)."""
    train(_cfg("digits_adm", tmp_path, "--train.ckpt_every", "2", "--ant.method", "uw"))
    own = tmp_path / "config.yaml"
    with pytest.raises(ValueError, match="ant.method: checkpoint 'uw' -> now 'pcgrad'\n"
                       "ant.method cannot change on resume, not even with "
                       "--allow-config-change.*To repeat every setting the run was started "
                       f"with: antdiff train --config {own} --resume"):  # fmt: skip
        train(
            _cfg("digits_adm", tmp_path, "--train.ckpt_every", "2", "--ant.method", "pcgrad",
                 steps=3),
            resume=True,
            allow_config_change=True,
        )  # fmt: skip
    # the command it names resumes (the preset's own method would be another change)
    out = train(load_config(str(own), ["--train.steps", "3"]), resume=True)
    assert out["step"] == 3


def test_a_resume_that_changes_what_the_state_fixes_says_so_first(tmp_path):
    """Another method or model: the message said "pass --allow-config-change", which then
    failed on the weights; it now names what no flag can change. Other keys keep the flag's
    advice (ant.method_kwargs is not ant.method)."""
    train(_cfg("digits_adm", tmp_path, "--train.ckpt_every", "2", "--ant.method", "uw"))
    for extra in (["--ant.method", "pcgrad"], ["--model.name", "dit-tiny"],
                  ["--diffusion.learn_sigma", "true"], ["--diffusion.T", "500"]):
        for allow in (False, True):  # named up front, with the flag too (it failed on the state)
            with pytest.raises(ValueError, match=r"cannot change on resume, not even with "
                               r"--allow-config-change.*fresh run"):  # fmt: skip
                train(_cfg("digits_adm", tmp_path, "--train.ckpt_every", "2", "--ant.method",
                           "uw", *extra, steps=3), resume=True, allow_config_change=allow)
    with pytest.raises(ValueError, match=r"ant.method_kwargs.*\n.*pass --allow-config-change"):
        train(_cfg("digits_adm", tmp_path, "--train.ckpt_every", "2", "--ant.method", "uw",
                   "--ant.method_kwargs", "{lr: 0.5}", steps=3), resume=True)  # fmt: skip


def test_resume_into_a_folder_of_another_run_is_refused(tmp_path):
    """--resume runs/a with an out_dir that holds run b (e.g. a preset's default folder) wrote
    a's continuation among b's checkpoints and logs; into an empty folder it branches a."""
    a, b = tmp_path / "a", tmp_path / "b"
    train(_cfg("digits_adm", a, "--train.ckpt_every", "2"))
    train(_cfg("digits_adm", b, "--train.ckpt_every", "2"))
    with pytest.raises(ValueError, match="holds another run .* --train.out_dir '.*a'"):
        train(_cfg("digits_adm", b, "--train.ckpt_every", "2", steps=4), resume=a)
    assert [p.name for p in ck.list_checkpoints(b)] == ["ckpt_00000002.pt"]
    # a mistyped path: said so, not "pass --train.out_dir <its parent>"
    with pytest.raises(FileNotFoundError, match=r"--resume '.*aa' does not exist"):
        train(_cfg("digits_adm", b, "--train.ckpt_every", "2", steps=4), resume=tmp_path / "aa")
    first = a / "checkpoints" / "ckpt_00000002.pt"
    branched = train(_cfg("digits_adm", tmp_path / "c", steps=3), resume=first)
    assert branched["step"] == 3
    assert train(_cfg("digits_adm", a, steps=3), resume=a)["step"] == 3  # in place: fine
    ckpt = ck.list_checkpoints(a)[-1]  # a file inside the run's checkpoints/: in place too
    assert train(_cfg("digits_adm", a, steps=4), resume=ckpt)["step"] == 4
    # fewer steps than the checkpoint's (step 2): it trained nothing and wrote the lower count
    with pytest.raises(ValueError, match="train.steps=1 is below the checkpoint's step 2"):
        train(_cfg("digits_adm", a, steps=1), resume=True)
    assert "steps: 4" in (a / "config.yaml").read_text()
    # a checkpoint copied out of its run: its folder is no run to continue in place (that
    # advice wrote logs and samples into, e.g., the working folder)
    loose = tmp_path / "loose"
    loose.mkdir()
    shutil.copy(first, loose / "c2.pt")
    with pytest.raises(ValueError, match=r"pass a new, empty --train.out_dir .*holds no run"):
        train(_cfg("digits_adm", b, steps=4), resume=loose / "c2.pt")


def test_cli_train_and_resume(tmp_path, capsys):
    args = [
        "train",
        "--config",
        "digits_adm",
        "--train.batch_size",
        "10",
        "--train.ckpt_every",
        "1",
        "--train.out_dir",
        str(tmp_path),
        "--sample.steps",
        "2",
        "--sample.n",
        "4",
        "--train.progress",
        "false",
    ]
    assert cli_main([*args, "--train.steps", "1"]) == 0
    assert cli_main([*args, "--train.steps", "2", "--resume"]) == 0
    assert '"step": 2' in capsys.readouterr().out
    ckpt = tmp_path / "checkpoints" / "ckpt_00000002.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    assert cli_main([*args, "--train.steps", "3", "--resume", str(ckpt)]) == 2
    assert "is corrupted" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="corrupted"):
        assert cli_main([*args, "--train.steps", "3", "--resume"]) == 0  # falls back to step 1


def test_missing_data_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        train(load_config("adm_light_ffhq256", ["--data.path", str(tmp_path / "no_such_dir")]))


# ---------------------------------------------------------------- the paper's presets
def _paper_data(tmp_path, preset):
    rng = np.random.default_rng(0)
    if preset == "adm_light_ffhq256":
        for i in range(4):  # mixed sizes on purpose: data.image_size resizes on load
            side = 40 + 8 * i
            Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(
                tmp_path / f"{i}.png"
            )
        return str(tmp_path)
    size = {"ldm_ffhq256": 32, "dit_s2_imagenet256": 32, "dit_l2_imagenet256": 4}[preset]
    c = 3 if preset == "ldm_ffhq256" else 4
    obj = {"latents": torch.randn(4, c, size, size), "labels": torch.tensor([0, 999, 5, 7])}
    torch.save(obj, tmp_path / "latents.pt")
    return str(tmp_path / "latents.pt")


@pytest.mark.slow
@pytest.mark.parametrize(
    "preset, extra",
    [  # 256 px / 64x64 / 32x32 inputs take minutes per CPU step; the model configs are real
        ("adm_light_ffhq256", ["--data.image_size", "32"]),
        ("ldm_ffhq256", []),  # latents 32x32x3: the smallest with attention at 32/16/8
        ("dit_s2_imagenet256", []),  # the real 32x32x4 latents
        ("dit_l2_imagenet256", []),  # latents 4x4x4
    ],
)
def test_paper_presets_run_two_steps(preset, extra, tmp_path):
    path = _paper_data(tmp_path, preset)
    cfg = load_config(
        preset,
        ["--data.path", path, "--train.batch_size", "2", "--ant.sampling", "uniform",
         "--train.steps", "2", "--train.ckpt_every", "0", "--train.progress", "false",
         "--train.out_dir", str(tmp_path / "run"), "--sample.steps", "1", "--sample.n", "1",
         *extra],
    )  # fmt: skip
    ref = load_config(preset)
    assert cfg.model == ref.model and cfg.diffusion == ref.diffusion
    s = train(cfg)
    assert s["step"] == 2 and np.isfinite(s["loss"])


def test_gradient_clustering_from_a_binned_affinity_file(tmp_path):
    """The .npz that `antdiff affinity` writes (affinity + bin edges) drives the clusters."""
    T, nb = 1000, 20
    blocks = np.arange(nb) // 4  # 5 blocks of 4 bins = 5 clusters of 200 timesteps
    A = np.where(blocks[:, None] == blocks[None, :], 1.0, 0.0)
    np.savez(tmp_path / "aff.npz", affinity=A, bin_edges=np.linspace(0, T, nb + 1).astype(int))
    cfg = _cfg("digits_adm", tmp_path, "--ant.clustering", "gradient",
               "--ant.affinity", str(tmp_path / "aff.npz"), "--ant.method", "pcgrad")
    run = build_run(cfg)
    assert run.ant.clusters.bounds == (0, 200, 400, 600, 800, 1000)
    assert run.ant.clusters.objective == "gradient"


def test_resumed_log_keeps_rows_written_before_the_objective_column(tmp_path):
    from antdiff.logging_utils import RunLogger, csv_columns

    old = csv_columns(2)[:-1]
    rows = [old, ["1", "0.5", "0.4", "0.6", "0.5", "0.5", "0.001", "0.1"],
            ["2", "0.4", "0.3", "0.5", "0.5", "0.5", "0.001", "0.1"]]  # fmt: skip
    with open(tmp_path / "metrics.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    RunLogger(tmp_path, 2, start=1, total=3, progress=False).close()
    kept = list(csv.reader(open(tmp_path / "metrics.csv")))
    assert kept == [csv_columns(2), [*rows[1], "nan"]]


def test_resumed_log_drops_a_row_cut_short_by_a_crash(tmp_path):
    """A crash while row 40 was written left "4": its step read as 4 <= 30 and stayed."""
    from antdiff.logging_utils import RunLogger, csv_columns

    full = [[str(s), *["0.5"] * 5, "0.001", "0.1", "0.5"] for s in (10, 20, 30)]
    with open(tmp_path / "metrics.csv", "w", newline="") as f:
        csv.writer(f).writerows([csv_columns(2), *full, ["4"]])
    RunLogger(tmp_path, 2, start=30, total=50, progress=False).close()
    assert list(csv.reader(open(tmp_path / "metrics.csv"))) == [csv_columns(2), *full]


def test_tensorboard_keeps_the_checkpoint_step_and_forgets_a_replaced_run(tmp_path):
    """purge_step: a resume from step s keeps s's events (it dropped them), and a fresh run
    in the same directory drops the old run's (the two were mixed)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from antdiff.logging_utils import RunLogger

    def run(start, steps, value):
        # a second apart: event files of one second sort by a per-process counter, as text
        # ("...10" before "...9": in a long test session the reader took them out of order)
        time.sleep(1.1)
        logger = RunLogger(tmp_path, 2, start=start, total=100, progress=False)
        for s in steps:
            logger.log(s, value, {}, 1e-3, 0.1)
        logger.close()

    def logged():
        acc = EventAccumulator(str(tmp_path / "tb"))
        acc.Reload()
        return [(e.step, e.value) for e in acc.Scalars("loss")]

    run(0, (10, 20, 30), 1.0)
    run(20, (30, 40), 2.0)  # resumed from the checkpoint at 20 (a crash had logged 30)
    assert logged() == [(10, 1.0), (20, 1.0), (30, 2.0), (40, 2.0)]
    run(0, (10,), 3.0)  # a fresh run into the same directory
    assert logged() == [(10, 3.0)]


def test_compile_with_an_explicit_onepass_is_refused(tmp_path):
    """One-pass registers hooks every step, so torch.compile would recompile every step."""
    from antdiff.train import build_run

    cfg = _cfg("digits_adm", tmp_path, "--train.compile", "true", "--ant.mode", "onepass",
               "--ant.method", "pcgrad")  # fmt: skip
    with pytest.raises(ValueError, match="recompile every step"):
        build_run(cfg)
    # a loss-space method never uses the one-pass hooks: nothing to refuse
    build_run(_cfg("digits_adm", tmp_path, "--train.compile", "true", "--ant.mode", "onepass",
                   "--ant.method", "uw"))  # fmt: skip


def test_a_diverged_run_stops_and_says_what_to_change(tmp_path, monkeypatch, capsys):
    """lr 1e6: after a step or two every step is non-finite and skipped; the run went on to
    its last step (exit 0, useless checkpoints, a warning per step). It now stops once the
    skipped steps run DIVERGED_STEPS in a row, naming train.lr; the CLI says so without a
    traceback, and its JSON summary has null, not NaN."""
    import json

    import antdiff.train as tr

    monkeypatch.setattr(tr, "DIVERGED_STEPS", 4)
    args = ["--ant.method", "uw", "--train.lr", "1e6", "--train.log_every", "2"]
    cli = ["train", "--config", "digits_adm", "--train.batch_size", "10", "--train.progress",
           "false", "--train.ckpt_every", "0", *args]  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(tr.TrainingDiverged, match=r"training diverged: the last \d+ steps "
                           r".*Lower train.lr \(now 1e\+06\).*; no checkpoint was written yet: "
                           r"start over$"):  # fmt: skip
            train(_cfg("digits_adm", tmp_path / "a", *args, steps=40))
        capsys.readouterr()
        rc = cli_main([*cli, "--train.steps", "40", "--train.out_dir", str(tmp_path / "b")])
        err = capsys.readouterr().err
        assert rc == 1 and "training diverged" in err and "Traceback" not in err
        rows = list(csv.DictReader(open(tmp_path / "b" / "metrics.csv")))
        assert int(rows[-1]["step"]) < 40  # stopped early
        # a diverged run too short to stop prints strict JSON: null for its NaN loss
        assert cli_main([*cli, "--train.steps", "4", "--train.out_dir", str(tmp_path / "c")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["loss"] is None


@pytest.mark.parametrize("micro", ["0", "5"])
def test_every_other_step_skipped_is_not_divergence(micro, tmp_path, monkeypatch):
    """A loss-space method records each ant.reduce micro-batch, and a skipped step counts each
    of them as non-finite: with two micro-batches a step, one skipped step in two looked like
    all of them skipped, and the run was stopped as diverged."""
    import antdiff.train as tr

    monkeypatch.setattr(tr, "DIVERGED_STEPS", 4)
    cfg = _cfg("digits_adm", tmp_path, "--ant.method", "uw", "--train.micro_batch", micro,
               "--train.log_every", "2", steps=8)  # fmt: skip
    real, calls = GaussianDiffusion.training_losses, []

    def every_other(self, model, x0, t, noise=None, model_kwargs=None):
        out = real(self, model, x0, t, noise, model_kwargs)
        calls.append(1)
        per_step = 1 if micro == "0" else 2
        if (len(calls) - 1) // per_step % 2 == 1:  # the odd optimiser steps: NaN gradients
            p0 = next(model.parameters())
            out = {**out, "loss": out["loss"] + 0.0 * torch.sqrt((p0 - p0.detach()).sum())}
        return out

    monkeypatch.setattr(GaussianDiffusion, "training_losses", every_other)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = train(cfg)
    assert s["step"] == 8 and s["stats"]["nonfinite_steps"] == (4 if micro == "0" else 8)


def test_the_divergence_guard_counts_the_first_interval(monkeypatch):
    """A run non-finite from its first step was stopped two log intervals late: the first
    interval only recorded the count."""
    from types import SimpleNamespace

    import antdiff.train as tr

    monkeypatch.setattr(tr, "DIVERGED_STEPS", 4)
    cfg = SimpleNamespace(train=SimpleNamespace(lr=1e6, grad_clip=None, batch_size=10,
                                                micro_batch=0))  # fmt: skip
    ant = SimpleNamespace(telemetry=SimpleNamespace(nonfinite=lambda: 0), needs_gradients=False)
    run = SimpleNamespace(ant=ant, cfg=cfg, step=0, dist=None)
    watch = tr._SkipWatch(run)
    run.step = 2
    watch.check({"nonfinite_steps": 2}, None)
    run.step = 4
    with pytest.raises(tr.TrainingDiverged, match="the last 4 steps"):
        watch.check({"nonfinite_steps": 4}, None)


def test_logged_rows_are_interval_means(tmp_path):
    """A row of metrics.csv was the logging step's single batch; it is the mean over the steps
    since the last row (loss, the clusters' losses, the objective), as ADM and DiT log, and a
    resume inside an interval continues its sums."""
    every = train(_cfg("digits_adm", tmp_path / "a", "--ant.method", "uw", steps=6))
    assert every["step"] == 6
    train(_cfg("digits_adm", tmp_path / "b", "--ant.method", "uw", "--train.log_every", "3",
               steps=6))  # fmt: skip
    one = list(csv.DictReader(open(tmp_path / "a" / "metrics.csv")))
    three = list(csv.DictReader(open(tmp_path / "b" / "metrics.csv")))
    assert [r["step"] for r in three] == ["3", "6"]
    cols = [c for c in three[0] if c == "loss" or c.startswith("loss_c") or c == "objective"]
    for row, block in ((three[0], one[0:3]), (three[1], one[3:6])):
        for c in cols:
            want = sum(float(r[c]) for r in block) / 3
            assert float(row[c]) == pytest.approx(want, rel=1e-5), c
    # resumed from step 4, inside the interval 4-6: the row at 6 still averages steps 4-6
    extra = ["--ant.method", "uw", "--train.log_every", "3", "--train.ckpt_every", "4",
             "--train.keep_ckpts", "2"]  # fmt: skip
    train(_cfg("digits_adm", tmp_path / "c", *extra, steps=6))
    at4 = tmp_path / "c" / "checkpoints" / "ckpt_00000004.pt"
    train(_cfg("digits_adm", tmp_path / "c", *extra, steps=6), resume=at4)
    resumed = list(csv.DictReader(open(tmp_path / "c" / "metrics.csv")))
    assert [r["step"] for r in resumed] == ["3", "6"]
    assert all(resumed[1][c] == three[1][c] for c in cols)


def test_a_resume_between_log_points_keeps_the_telemetry_bit_exact(tmp_path):
    """The divergence guard read the non-finite count through stats(), whose fold at the
    checkpoint's step grouped the running sums otherwise than an unbroken run (loss_mean an
    ulp off in telemetry.jsonl)."""
    extra = ["--ant.method", "dwa", "--train.log_every", "8", "--train.ckpt_every", "3",
             "--train.keep_ckpts", "3"]  # fmt: skip
    run = tmp_path / "run"
    train(_cfg("digits_adm", run, *extra, steps=8))
    unbroken = (run / "telemetry.jsonl").read_text()
    at3 = run / "checkpoints" / "ckpt_00000003.pt"  # inside the interval 1-8
    train(_cfg("digits_adm", run, *extra, steps=8), resume=at3)  # its row replaces 8
    assert (run / "telemetry.jsonl").read_text() == unbroken


def test_a_continuation_stopped_before_its_first_save_leaves_the_logs_of_the_newer_one(
    tmp_path, monkeypatch
):
    """Continuing in place from an earlier checkpoint trimmed metrics.csv / telemetry.jsonl
    at once: stopped before its first save, a later --resume of the newer checkpoints found
    their rows gone. Now its rows wait in a pending file until it saves (then replace them)."""
    import antdiff.train as tr

    def steps(name):
        return [int(r[0]) for r in list(csv.reader(open(tmp_path / name)))[1:]]

    def jsonl_steps():
        import json

        return [json.loads(ln)["step"] for ln in open(tmp_path / "telemetry.jsonl")]

    cfg = lambda n: _cfg("digits_adm", tmp_path, "--train.ckpt_every", "2",  # noqa: E731
                         "--train.keep_ckpts", "3", steps=n)  # fmt: skip
    train(cfg(6))
    assert steps("metrics.csv") == [1, 2, 3, 4, 5, 6]
    real, calls = tr.train_step, []

    def stopped(run, batch):
        calls.append(run.step)
        if len(calls) == 2:  # after one step of the continuation: before its save at 6
            raise KeyboardInterrupt
        real(run, batch)

    monkeypatch.setattr(tr, "train_step", stopped)
    ckpt4 = tmp_path / "checkpoints" / "ckpt_00000004.pt"
    with pytest.raises(KeyboardInterrupt):
        train(cfg(8), resume=str(ckpt4))
    assert steps("metrics.csv") == [1, 2, 3, 4, 5, 6] and jsonl_steps() == [1, 2, 3, 4, 5, 6]
    # and the config beside the newer checkpoints is theirs, not the continuation's
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["train"]["steps"] == 6
    monkeypatch.setattr(tr, "train_step", real)
    assert train(cfg(8), resume=True)["step"] == 8  # the newest checkpoint: 6
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["train"]["steps"] == 8
    assert steps("metrics.csv") == [1, 2, 3, 4, 5, 6, 7, 8]
    assert jsonl_steps() == [1, 2, 3, 4, 5, 6, 7, 8]
    # a continuation that saves supersedes the later rows, with its own
    before = list(csv.reader(open(tmp_path / "metrics.csv")))
    train(cfg(6), resume=str(ckpt4))
    after = list(csv.reader(open(tmp_path / "metrics.csv")))
    assert steps("metrics.csv") == [1, 2, 3, 4, 5, 6] and after[1:5] == before[1:5]
    assert not list(tmp_path.glob(".*.pending"))


def test_a_continuation_killed_between_its_first_save_and_its_log_commit_keeps_its_rows(
    tmp_path, monkeypatch
):
    """A continuation (from ckpt 4, with a new lr) that saved ckpt 6 and died before its rows
    replaced the logs: the resume from ckpt 6 kept the superseded run's rows 5-6 beside the
    continuation's weights (the pending rows were deleted). The checkpoint now carries them."""
    from antdiff.logging_utils import RunLogger

    def rows(d):
        return [r[:-2] + r[-1:] for r in csv.reader(open(d / "metrics.csv"))]  # no sec_per_step

    def cfg(d, *extra):
        return _cfg("digits_adm", d, "--train.ckpt_every", "2", "--train.keep_ckpts", "4",
                    "--ant.method", "uw", *extra, steps=8)  # fmt: skip

    for d in (tmp_path / "a", tmp_path / "b"):
        train(cfg(d))
    new_lr = ("--train.lr", "3e-3")
    train(cfg(tmp_path / "b", *new_lr), resume=str(tmp_path / "b/checkpoints/ckpt_00000004.pt"),
          allow_config_change=True)  # fmt: skip  # the reference: not killed
    real = RunLogger.commit

    def killed(self):
        if self._pending:
            raise KeyboardInterrupt  # after the save at step 6, before the rows are committed
        real(self)

    monkeypatch.setattr(RunLogger, "commit", killed)
    a = tmp_path / "a"
    with pytest.raises(KeyboardInterrupt):
        train(cfg(a, *new_lr), resume=str(a / "checkpoints/ckpt_00000004.pt"),
              allow_config_change=True)  # fmt: skip
    monkeypatch.setattr(RunLogger, "commit", real)
    train(cfg(a, *new_lr), resume=True)  # the newest checkpoint: the continuation's 6
    assert rows(a) == rows(tmp_path / "b")
    assert [ln.split(",")[0] for ln in open(a / "metrics.csv")][1:] == [str(i) for i in range(1, 9)]
    jl = [json.loads(ln)["step"] for ln in open(a / "telemetry.jsonl")]
    assert jl == list(range(1, 9))


def test_sec_per_step_leaves_out_sample_grids_and_checkpoints(tmp_path, monkeypatch):
    """The log's sec_per_step counted the sample grid and checkpoint written after the previous
    row (17 s a step in a row of 0.09 s steps); the summary's divided the whole run's time."""
    import time

    import antdiff.train as train_mod

    real = train_mod.write_samples

    def slow(*args, **kwargs):
        time.sleep(3.0)  # far above a step, also on a loaded machine (a step read 1.2 s)
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "write_samples", slow)
    out = train(_cfg("digits_adm", tmp_path, "--train.sample_every", "2", "--train.ckpt_every",
                     "2", "--ant.method", "uw", steps=6))  # fmt: skip
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert len(rows) == 6 and out["seconds"] > 6.0  # the 2 grids inside the loop count here
    assert max(float(r["sec_per_step"]) for r in rows) < 2.0  # >= 3 with a grid counted
    assert out["sec_per_step"] < 2.0


def test_nash_without_gradient_clipping_warns(tmp_path, caplog):
    """The paper's presets clip nothing; Nash-MTL's weights are unbounded as gradients come to
    oppose, and its authors clip at 1.0: a Nash-MTL run without clipping says so."""
    import logging

    for method, clip, warned in (("nash", "null", True), ("UW + Nash", "null", True),
                                 ("nash", "1.0", False), ("nash", "0", False),
                                 ("pcgrad", "null", False)):  # fmt: skip
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="antdiff"):
            build_run(_cfg("digits_adm", tmp_path, "--ant.method", method, "--train.grad_clip",
                           clip))  # fmt: skip
        said = "without gradient clipping" in caplog.text
        assert said == warned, (method, clip)


def test_a_second_run_into_a_busy_out_dir_is_refused(tmp_path):
    """Two processes resumed into one out_dir (a scheduler restarting a job whose old process
    still runs) deleted each other's checkpoints: the second is refused while the first holds
    the folder, and goes once it is released (the kernel drops the lock of a killed process)."""
    from antdiff.train import OutDirInUse, out_dir_lock

    run = tmp_path / "run"
    train(_cfg("digits_adm", run, "--train.ckpt_every", "2"))
    with out_dir_lock(run):  # another run's hold on the folder (a second fd: flock conflicts)
        busy = rf"'{run}' is in use by another antdiff train \(pid {os.getpid()}, holding "
        with pytest.raises(OutDirInUse, match=busy + r".train.lock\)"):
            train(_cfg("digits_adm", run, "--train.ckpt_every", "2", steps=4), resume=True)
        assert [p.name for p in ck.list_checkpoints(run)] == ["ckpt_00000002.pt"]
    (tmp_path / "new").mkdir()
    with out_dir_lock(tmp_path / "new"), pytest.raises(OutDirInUse):  # a fresh run as well
        train(_cfg("digits_adm", tmp_path / "new"))
    assert not (tmp_path / "new" / "config.yaml").exists()
    assert train(_cfg("digits_adm", run, "--train.ckpt_every", "2", steps=4),
                 resume=True)["step"] == 4  # fmt: skip


def test_a_busy_out_dir_is_named_before_its_checkpoints_are_read(tmp_path):
    """A run that has not written its first checkpoint holds its folder: a --resume there got
    "no checkpoints ... drop --resume", and a fresh run into a busy folder with checkpoints got
    "pass --resume"; the lock refused both pieces of advice. Both now hear that the folder is
    in use, and a folder whose lock nobody holds resumes as before."""
    from antdiff.train import OutDirInUse, out_dir_lock

    run = tmp_path / "run"
    run.mkdir()
    with out_dir_lock(run):
        with pytest.raises(OutDirInUse, match=rf"pid {os.getpid()}, holding .train.lock"):
            train(_cfg("digits_adm", run), resume=True)
    with pytest.raises(FileNotFoundError, match="no checkpoints"):  # released: the folder's
        train(_cfg("digits_adm", run), resume=True)  # own trouble
    train(_cfg("digits_adm", run, "--train.ckpt_every", "2"))
    with out_dir_lock(run), pytest.raises(OutDirInUse, match="in use by another antdiff train"):
        train(_cfg("digits_adm", run, "--train.ckpt_every", "2"))


def test_a_start_probing_the_lock_does_not_refuse_the_run_that_takes_it(tmp_path):
    """refuse_if_in_use holds a shared lock for an instant; a run taking the folder in that
    instant was refused as "in use" (by the pid of the folder's previous run). It tries again
    for a moment; a folder held for longer is still refused."""
    import fcntl
    import threading

    from antdiff.train import LOCK_NAME, OutDirInUse, out_dir_lock

    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_NAME).write_text("4242\n")
    fd = os.open(run / LOCK_NAME, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_SH)  # a probe in its instant
    threading.Timer(0.05, lambda: os.close(fd)).start()  # (closing releases it)
    with out_dir_lock(run):
        assert (run / LOCK_NAME).read_text() == f"{os.getpid()}\n"
    fd = os.open(run / LOCK_NAME, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_SH)
    try:
        with pytest.raises(OutDirInUse), out_dir_lock(run):
            pass
    finally:
        os.close(fd)


def test_a_mount_without_flock_trains_unlocked(tmp_path, monkeypatch):
    """Lustre without -o flock (ENOSYS), NFSv3 without lockd (ENOLCK): flock's error stopped
    every run there from starting. It trains, with a warning that it holds no lock."""
    import errno
    import fcntl

    def refuse(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", refuse)
    with pytest.warns(UserWarning, match="its file system refuses flock \\(No locks available"):
        assert train(_cfg("digits_adm", tmp_path / "run"))["step"] == 2
    from antdiff.train import out_dir_lock

    with pytest.warns(UserWarning), pytest.raises(ValueError) as e:
        with out_dir_lock(tmp_path / "run"):
            raise ValueError("the run's own error")
    assert e.value.__context__ is None  # not "during handling of" flock's ENOLCK


def test_another_users_lock_file_in_a_shared_out_dir_still_locks(tmp_path, monkeypatch):
    """`.train.lock` stays after a run, 0644 after the umask: another user resuming in a
    group-shared folder got PermissionError opening it read-write, and could not train there.
    flock needs no write access: the lock is taken on a read-only descriptor (no pid written,
    so a second run names none rather than the earlier run's); a new lock file takes its
    folder's group and other write bits."""
    from antdiff.train import LOCK_NAME, OutDirInUse, out_dir_lock

    run = tmp_path / "run"
    run.mkdir()
    lock = run / LOCK_NAME
    lock.write_text("4242\n")
    lock.chmod(0o444)
    if os.geteuid() == 0:  # root passes permission checks: refuse the write as they would
        real_open = os.open

        def open_(path, flags, *args):
            excl = flags & os.O_EXCL  # the file exists: FileExistsError from the real open
            if str(path) == str(lock) and flags & (os.O_RDWR | os.O_WRONLY) and not excl:
                raise PermissionError(13, "Permission denied", str(path))
            return real_open(path, flags, *args)

        monkeypatch.setattr(os, "open", open_)
    with out_dir_lock(run):
        with pytest.raises(OutDirInUse, match=r"pid unknown, holding"), out_dir_lock(run):
            pass
    assert lock.read_text() == "4242\n"
    monkeypatch.undo()
    for mode, want in ((0o755, 0o644), (0o775, 0o664), (0o777, 0o666)):
        shared = tmp_path / f"shared{mode:o}"
        shared.mkdir()
        shared.chmod(mode)
        with out_dir_lock(shared):
            assert (shared / LOCK_NAME).stat().st_mode & 0o777 == want, oct(mode)
            assert (shared / LOCK_NAME).read_text() == f"{os.getpid()}\n"


def test_ema_buffers_keep_their_value_when_the_step_was_not_taken():
    """EMA.update(taken=False) leaves the EMA as it was, buffers included; a taken step copies
    the buffers (running statistics are not averaged)."""
    from torch import nn

    from antdiff.train import EMA

    model = nn.BatchNorm1d(3)
    ema = EMA(model, 0.9)
    with torch.no_grad():
        model.running_mean.fill_(5.0)
        model.weight.fill_(2.0)
    ema.update(torch.tensor(False))
    assert torch.equal(ema.model.running_mean, torch.zeros(3))
    assert torch.equal(ema.model.weight, torch.ones(3))
    ema.update(torch.tensor(True))
    assert torch.equal(ema.model.running_mean, torch.full((3,), 5.0))


def test_grad_clip_and_lr_reach_the_optimiser(tmp_path, monkeypatch):
    """train.grad_clip bounds the norm of the gradient the optimiser steps with (only its
    warnings were tested), and a fresh run's AdamW has train.lr (only resumed runs' was)."""
    run = build_run(_cfg("digits_adm", tmp_path, "--ant.method", "uw", "--train.grad_clip",
                         "1e-4", "--train.lr", "0.0123"))  # fmt: skip
    assert run.opt.param_groups[0]["lr"] == 0.0123
    seen, orig = [], run.opt.step

    def step(*a, **kw):
        grads = [p.grad.norm() for p in run.model.parameters() if p.grad is not None]
        seen.append(float(torch.linalg.vector_norm(torch.stack(grads))))
        return orig(*a, **kw)

    monkeypatch.setattr(run.opt, "step", step)
    engine_step(run, get_batch(run.data, *run.batches.next_batch()))
    assert seen and 0 < seen[0] <= 1e-4 * (1 + 1e-3), seen


def test_the_last_step_is_logged_and_saved_off_the_cadence(tmp_path):
    """steps = 3 with log_every = ckpt_every = 2: rows at steps 2 and 3, and the final state
    saved at step 3 (there is no save after the loop: without it the run ended at step 2)."""
    out = train(_cfg("digits_adm", tmp_path, "--ant.method", "uw", "--train.log_every", "2",
                     "--train.ckpt_every", "2", steps=3))  # fmt: skip
    with open(tmp_path / "metrics.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [2, 3]
    assert [p.name for p in ck.list_checkpoints(tmp_path)][-1] == "ckpt_00000003.pt"
    assert out["step"] == 3


def test_resuming_a_finished_run_says_there_is_nothing_to_do(tmp_path, caplog, capsys):
    """A --resume of a run already at train.steps printed "checkpoint": null without a word;
    it now says so (and how to extend it), names the run's checkpoint and keeps its grid."""
    extra = ["--ant.method", "uw", "--train.ckpt_every", "2"]
    train(_cfg("digits_adm", tmp_path, *extra, steps=2))
    grid = tmp_path / "samples" / "step_00000002.png"
    grid.write_bytes(b"the run's own grid")
    with caplog.at_level("WARNING", logger="antdiff.train"):
        s = train(_cfg("digits_adm", tmp_path, *extra, steps=2), resume=True)
    assert "already at train.steps=2" in caplog.text
    assert "nothing to train; raise --train.steps to extend it" in caplog.text
    assert s["step"] == 2 and s["loss"] is None
    assert s["sec_per_step"] is None  # no step ran: not the call's elapsed seconds
    assert s["checkpoint"] == str(tmp_path / "checkpoints" / "ckpt_00000002.pt")
    assert s["samples"] == str(grid) and grid.read_bytes() == b"the run's own grid"
    capsys.readouterr()
    cmd = ["train", "--config", str(tmp_path / "config.yaml"), "--resume"]
    assert cli_main(cmd) == 0
    out = capsys.readouterr().out
    assert json.loads(out[out.index("{") :])["checkpoint"].endswith("ckpt_00000002.pt")


def test_data_errors_name_the_option_that_fixes_them(tmp_path):
    """Non-square images said only "the models need square inputs, the data are 20x24"; a
    class-conditional preset on unlabelled latents offered only to save labels."""
    (tmp_path / "imgs").mkdir()
    for i in range(2):  # 24 wide, 20 high
        Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(tmp_path / "imgs" / f"{i}.png")
    folder = ["--data.source", "folder", "--data.path", str(tmp_path / "imgs"),
              "--data.channels", "3"]  # fmt: skip
    with pytest.raises(ValueError, match=r"square inputs, the data are 20x24 \(height x width\): "
                       r"set --data.image_size S .*\(e\.g\. --data.image_size 20\)"):  # fmt: skip
        train(_cfg("digits_adm", tmp_path / "r1", *folder))
    torch.save(torch.randn(12, 4, 8, 8), tmp_path / "z.pt")
    latents = ["--data.source", "latents", "--data.path", str(tmp_path / "z.pt"),
               "--data.channels", "4"]  # fmt: skip
    with pytest.raises(ValueError, match=r"holds none: save a .pt dict .*, or train without "
                       r"labels: --data.class_conditional false --sample.cfg_scale 1 \(the config "
                       r"guides its preview grids at 2.0"):  # fmt: skip
        train(_cfg("digits_dit", tmp_path / "r2", *latents))
    assert not (tmp_path / "r1" / "config.yaml").exists()
    s = train(_cfg("digits_dit", tmp_path / "r3", *latents, "--data.class_conditional", "false",
                   "--sample.cfg_scale", "1", steps=1))  # fmt: skip
    assert s["step"] == 1


def test_cli_warns_that_ckpt_every_zero_keeps_no_weights(tmp_path, caplog, monkeypatch):
    """--train.ckpt_every 0 wrote no checkpoint at all, not even at the end, without a word
    (sample_every 0 means "only at the end", and users read ckpt_every 0 the same way); it
    still writes none (tests and the demo rely on it), and the command says so at the start."""
    import antdiff.train as tr

    base = ["train", "--config", "digits_adm", "--train.steps", "1", "--train.batch_size", "10",
            "--train.progress", "false", "--sample.n", "2", "--sample.steps", "2"]  # fmt: skip
    real, said = tr.train, []

    def spy(*a, **k):  # what had been said when the training started
        said.append(caplog.text)
        return real(*a, **k)

    monkeypatch.setattr(tr, "train", spy)
    with caplog.at_level("WARNING", logger="antdiff.train"):
        assert cli_main([*base, "--train.ckpt_every", "0", "--train.out_dir",
                         str(tmp_path / "a")]) == 0  # fmt: skip
    assert "train.ckpt_every=0: no checkpoint will be written, not even at the end, so the " \
           "trained weights are lost" in said[0]  # fmt: skip
    assert "set --train.ckpt_every N" in said[0]
    assert ck.list_checkpoints(tmp_path / "a") == []
    caplog.clear()
    with caplog.at_level("WARNING", logger="antdiff.train"):
        assert cli_main([*base, "--train.ckpt_every", "1", "--train.out_dir",
                         str(tmp_path / "b")]) == 0  # fmt: skip
    assert "ckpt_every=0" not in caplog.text

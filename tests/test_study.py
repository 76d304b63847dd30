"""Smoke test of the study driver: 2 configs x 1 seed x a few steps, resumable, reported."""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from antdiff import study

CLUSTER_NAMES = ("timestep", "snr", "gradient")


pytestmark = pytest.mark.usefixtures("one_thread")


def test_default_grid_is_vanilla_plus_methods_times_clusterings() -> None:
    configs = study.study_configs(study.METHODS, study.CLUSTERINGS)
    assert len(configs) == 13 and configs[0]["method"] == "vanilla"
    assert len({c["name"] for c in configs}) == 13
    assert {(c["method"], c["clustering"]) for c in configs[1:]} == {
        (m, c) for m in ("uw", "pcgrad", "nash", "uw+pcgrad") for c in CLUSTER_NAMES
    }


def test_smoke_gradient_clustering_resume_and_report(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out, report = tmp_path / "study", tmp_path / "rep" / "study_digits"
    argv = [
        *("--out", str(out), "--seeds", "1", "--steps", "3", "--batch", "8", "--num", "70"),
        *("--sample-steps", "3", "--methods", "uw", "--clusterings", "gradient"),
        *("--bins", "4", "--affinity-samples", "8", "--jobs", "1", "--report", str(report)),
    ]
    assert study.main(argv) == 0
    for name in ("vanilla", "uw-gradient"):
        res = json.loads((out / "results" / f"{name}_s0.json").read_text())
        assert res["train_steps"] == 3 and res["num"] == 70 and res["steps"] == 3
        assert 0.0 <= res["precision"] <= 1.0 and 0.0 <= res["recall"] <= 1.0
        assert res["fid"] >= 0.0 and "not comparable" in res["features"]
    # the gradient run used the affinity made from the vanilla run: [T, T] from 4 bins
    aff = np.load(out / "affinity_T.npy")
    assert aff.shape == (1000, 1000)
    np.testing.assert_allclose(np.diag(aff), 1.0, atol=1e-6)
    summary = json.loads(report.with_suffix(".json").read_text())
    rows = {r["name"]: r for r in summary["rows"]}
    assert set(rows) == {"vanilla", "uw-gradient"} and rows["vanilla"]["n_seeds"] == 1
    md = report.with_suffix(".md").read_text()
    assert "| uw-gradient | uw | gradient |" in md and "not comparable" in md
    assert (report / "affinity.npz").is_file() and (report / "affinity_timestep.png").is_file()
    # a rerun finds every result and trains nothing
    capsys.readouterr()
    assert study.main(argv) == 0
    assert "study: 0 runs to do" in capsys.readouterr().out
    # killed after the checkpoint, before the result: the rerun continues that run (a fresh
    # run would refuse its directory) and gives the same result
    first = json.loads((out / "results" / "vanilla_s0.json").read_text())
    (out / "results" / "vanilla_s0.json").unlink()
    assert study.main(argv) == 0
    again = json.loads((out / "results" / "vanilla_s0.json").read_text())
    assert (again["fid"], again["precision"]) == (first["fid"], first["precision"])
    # ... and reports the training the earlier process did (from its metrics.csv, which times
    # the steps between log rows), not the idle resume (0.0004 s per step, loss None); the log
    # rounds the loss to 6 digits
    assert again["final_loss"] == pytest.approx(first["final_loss"], rel=1e-5)
    assert first["sec_per_step"] / 3 < again["sec_per_step"] < 3 * first["sec_per_step"]


def test_summary_mean_std_and_paired_delta(tmp_path: Path) -> None:
    configs = [
        {"name": "vanilla", "method": "vanilla", "clustering": "snr"},
        {"name": "uw-snr", "method": "uw", "clustering": "snr"},
    ]
    fids = {"vanilla": [3.0, 5.0, 10.0], "uw-snr": [2.0, 6.0, 7.0]}
    for name, values in fids.items():
        for s, f in enumerate(values):
            res = {"seed": s, "fid": f, "precision": 0.5, "recall": 0.1 * s, "sec_per_step": 1.0,
                   "cluster_bounds": [0, 1000]}  # fmt: skip
            path = study.result_path(tmp_path, name, s)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(res))
    van, uw = study.summarize(tmp_path, configs, [0, 1, 2])["rows"]
    mean = sum(fids["vanilla"]) / 3
    std = (sum((f - mean) ** 2 for f in fids["vanilla"]) / 2) ** 0.5
    assert van["fid"]["mean"] == pytest.approx(mean) and van["fid"]["std"] == pytest.approx(std)
    assert van["recall"]["mean"] == pytest.approx(0.1) and van["n_seeds"] == 3
    # paired by seed: uw - vanilla = [-1, +1, -3]
    assert uw["dfid"]["values"] == pytest.approx([-1.0, 1.0, -3.0])
    assert uw["dfid"]["mean"] == pytest.approx(-1.0) and uw["dfid"]["std"] == pytest.approx(2.0)
    assert uw["dfid"]["better"] == 2 and van["dfid"]["mean"] == 0.0


def _write_results(root: Path, fids: dict[str, list[float]]) -> None:
    for name, values in fids.items():
        for s, f in enumerate(values):
            res = {"seed": s, "fid": f, "precision": 0.5, "recall": 0.1, "sec_per_step": 1.0,
                   "cluster_bounds": [0, 1000], "features": name}  # fmt: skip
            path = study.result_path(root, name, s)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(res))


def test_summary_without_vanilla_or_second_seed_reports_no_delta_or_std(tmp_path: Path) -> None:
    """One seed has no sample std, a study without vanilla results has no ΔFID, and a config
    with no results at all is left out (it used to give ± 0.00, a ΔFID against the first other
    config, and an IndexError)."""
    configs = study.study_configs(("uw", "pcgrad"), ("snr",))  # vanilla, uw-snr, pcgrad-snr
    _write_results(tmp_path, {"uw-snr": [4.0]})
    summary = study.summarize(tmp_path, configs, [0])
    (uw,) = summary["rows"]
    assert uw["fid"]["std"] is None and uw["dfid"]["mean"] is None and uw["dfid"]["values"] == []
    assert summary["settings"]["features"] == "uw-snr"
    summary["meta"] = {"command": "x", "steps": 1, "batch": 1, "lr": 1, "ema": 0, "seeds": 1,
                       "num": 1, "sampler": "ddim", "sample_steps": 1, "bins": 1,
                       "affinity_samples": 1, "machine": "m", "jobs": 1, "wall_seconds": 1,
                       "git_sha": "x"}  # fmt: skip
    study.write_report(summary, tmp_path / "rep", tmp_path)
    row = next(r for r in (tmp_path / "rep.md").read_text().splitlines() if "| uw-snr" in r)
    assert "4.00 ± n/a" in row and "| - | - |" in row
    json.loads((tmp_path / "rep.json").read_text(), parse_constant=pytest.fail)  # strict JSON


def test_rerun_with_other_settings_is_refused(tmp_path: Path) -> None:
    """A rerun reuses the results in --out, so its settings must be those they were made with."""
    out = tmp_path / "study"
    args = study._parse(["--out", str(out), "--steps", "2"])
    study._check_settings(out, args)
    study._check_settings(out, args)  # the same settings resume
    other = study._parse(["--out", str(out), "--steps", "6", "--lr", "5e-4"])
    study._check_settings(out, other)  # no results yet (a failed first try): nothing to keep
    study._check_settings(out, args)
    (out / "runs" / "vanilla_s0").mkdir(parents=True)  # a run begun (killed mid-training):
    (out / "runs" / "vanilla_s0" / "config.yaml").write_text("train: {}\n")  # made with them
    with pytest.raises(SystemExit, match=r"--steps 6 \(made with 2\)"):
        study._check_settings(out, other)  # (the run then failed on its folder's old logs)
    (out / "runs" / "vanilla_s0" / "config.yaml").unlink()
    (out / "results").mkdir()
    (out / "results" / "vanilla_s0.json").write_text("{}")
    with pytest.raises(SystemExit, match=r"--steps 6 \(made with 2\).*--lr 0.0005"):
        study._check_settings(out, other)


def test_a_study_made_before_per_image_noise_is_not_resumed(tmp_path: Path) -> None:
    """Results of an earlier antdiff drew each run's samples from one stream; a resume would
    pair their FIDs with per-image ones. settings.json records the noise, and its absence in
    an older study's is named."""
    out = tmp_path / "study"
    args = study._parse(["--out", str(out), "--steps", "2"])
    study._check_settings(out, args)
    assert json.loads((out / "settings.json").read_text())["noise"] == "per-image"
    old = json.loads((out / "settings.json").read_text())
    del old["noise"]
    (out / "settings.json").write_text(json.dumps(old))
    (out / "results").mkdir()
    (out / "results" / "vanilla_s0.json").write_text("{}")
    with pytest.raises(SystemExit, match=r"sampling noise per-image \(made with one stream per "
                       r"run: an earlier antdiff\)\. Repeat"):  # fmt: skip
        study._check_settings(out, args)


def test_a_second_study_on_the_same_out_is_refused(tmp_path: Path) -> None:
    """Two studies on one --out trained the same run folders side by side."""
    import fcntl

    out = tmp_path / "study"
    out.mkdir()
    with open(out / ".lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("4242\n")
        held.flush()
        with pytest.raises(SystemExit, match=r"another study is running on .*pid 4242"):
            study._lock(out)
    mine = study._lock(out)  # free again
    assert (out / ".lock").read_text().strip() == str(__import__("os").getpid())
    mine.close()


def _watched(parent: int) -> None:
    study._die_with_parent(parent, every=0.05)
    time.sleep(60)  # ended by the watch, not by this


def test_a_worker_ends_when_its_study_is_gone() -> None:
    """A study killed with -9 left its spawned workers training (and then idle) for good: a
    worker whose parent is no longer the study it started under exits."""
    from multiprocessing import get_context

    p = get_context("spawn").Process(target=_watched, args=(1,))  # a parent it does not have
    p.start()
    p.join(timeout=30)
    assert p.exitcode == 1


def test_too_few_samples_for_fid_fail_at_parse_time(tmp_path: Path, capsys) -> None:
    """--num 20 trained the first run, then failed at the FID (64-d digits features)."""
    with pytest.raises(SystemExit):
        study._parse(["--out", str(tmp_path), "--num", "20"])
    assert "Use at least 65 samples" in capsys.readouterr().err


def test_mistyped_methods_and_clusterings_fail_at_parse_time(tmp_path: Path, capsys) -> None:
    """A mistyped method failed when its run came up, after every other run had trained."""
    study._parse(["--out", str(tmp_path), "--bins", "0", "--clusterings", "snr"])  # unread
    for flag, value, msg in (("--methods", "foo,uw", "--methods foo"),
                             ("--clusterings", "snr,grad", "--clusterings: unknown ['grad']"),
                             ("--lr", "-1", "train.lr must be finite and > 0"),
                             # these failed after the vanilla run had trained
                             ("--bins", "0", "--bins must be in [1, T=1000], got 0"),
                             ("--affinity-samples", "0", "must be >= 1"),
                             # two runs of one config would train in one folder
                             ("--methods", "uw,pcgrad,uw", "--methods: ['uw'] given twice"),
                             ("--clusterings", "snr,snr",
                              "--clusterings: ['snr'] given twice")):  # fmt: skip
        with pytest.raises(SystemExit):
            study._parse(["--out", str(tmp_path), flag, value])
        assert msg in capsys.readouterr().err


def test_a_failed_run_is_reported_without_waiting_for_the_queue(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run that raises stops the study at once: the runs still queued are cancelled (the
    error used to come after every one of them had run)."""
    calls = []

    def run_one(job):
        calls.append(job["name"])
        time.sleep(0.05)  # the study sees the failure long before a queue of them would drain
        raise RuntimeError(f"run {job['name']} failed")

    monkeypatch.setattr(study, "run_one", run_one)
    argv = ["--out", str(tmp_path / "s"), "--seeds", "2", "--steps", "2", "--num", "70",
            "--methods", "uw,pcgrad", "--clusterings", "snr", "--jobs", "1"]  # fmt: skip
    with pytest.raises(RuntimeError, match="run vanilla failed"):
        study.main(argv)
    # 6 runs queued: the one that failed, and at most one the worker took before the cancel
    assert calls[0] == "vanilla" and len(calls) <= 2
    # several jobs (a process pool: here threads, so the stub reaches them): one shutdown that
    # cancels (a second, waiting one, as a `with` block's exit, let the queue run on)
    shutdowns = []

    class Pool(ThreadPoolExecutor):
        def __init__(self, n, mp_context=None, initializer=None, initargs=()):  # noqa: ARG002
            super().__init__(n)  # (the parent watch is for processes: not started in threads)

        def shutdown(self, wait=True, *, cancel_futures=False):
            shutdowns.append((wait, cancel_futures))
            super().shutdown(wait, cancel_futures=cancel_futures)

    monkeypatch.setattr(study, "ProcessPoolExecutor", Pool)
    calls.clear()
    with pytest.raises(RuntimeError, match="failed"):
        study.main([*argv[:-1], "2"])
    assert shutdowns == [(False, True)] and len(calls) < 6, calls


def test_report_mentions_the_affinity_only_for_a_gradient_study(tmp_path: Path) -> None:
    """A study without gradient clustering described its affinity files, which it never made
    (under a fixed folder name, not the report's)."""
    meta = {"command": "x", "steps": 2, "batch": 8, "lr": 1e-3, "ema": 0.99, "seeds": 1,
            "num": 70, "sampler": "ddim", "sample_steps": 3, "bins": 4, "affinity_samples": 8,
            "machine": "m", "jobs": 1, "wall_seconds": 60.0, "git_sha": "abc"}  # fmt: skip
    for clustering, expect in (("snr", False), ("gradient", True)):
        configs = study.study_configs(("uw",), (clustering,))
        root = tmp_path / clustering
        _write_results(root, {c["name"]: [4.0] for c in configs})
        summary = {**study.summarize(root, configs, [0]), "meta": meta}
        study.write_report(summary, root / "rep" / "R", root)
        md = (root / "rep" / "R.md").read_text()
        assert ("Gradient clustering" in md) is expect
        assert ("R/affinity_*.png" in md) is expect and "study_digits" not in md


def _stub_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, sampler: str, bounds: list[int],
              stats: dict) -> tuple[dict, dict]:
    """Training and evaluation stubbed: (seen, job). seen gets the trainer's cfg, resume and
    out_dir and the evaluation's arguments; the run reports ``bounds`` and ``stats``."""
    from types import SimpleNamespace

    import antdiff.evaluate
    import antdiff.train

    seen: dict = {}

    def fake_train(cfg, resume=None):
        seen["cfg"], seen["resume"], seen["out_dir"] = cfg, resume, cfg.train.out_dir
        clusters = SimpleNamespace(bounds=bounds)
        return {"run": SimpleNamespace(ant=SimpleNamespace(clusters=clusters)),
                "checkpoint": "ckpt.pt", "loss": 0.5, "seconds": 1.0, "sec_per_step": 0.1,
                "stats": stats}  # fmt: skip

    def fake_evaluate(ckpt, num, **kw):
        seen["eval"] = {"ckpt": ckpt, "num": num, **kw}
        return {"fid": 1.0, "precision": 0.5, "recall": 0.5}

    monkeypatch.setattr(antdiff.train, "train", fake_train)
    monkeypatch.setattr(antdiff.evaluate, "evaluate_checkpoint", fake_evaluate)
    job = {"out": str(tmp_path), "name": "uw-snr", "method": "uw", "clustering": "snr",
           "seed": 2, "steps": 7, "batch": 8, "lr": 5e-4, "ema": 0.9, "threads": 1, "num": 70,
           "sampler": sampler, "sample_steps": 9,
           "affinity": str(tmp_path / "affinity_T.npy")}  # fmt: skip
    return seen, job


def test_a_run_trains_and_samples_with_its_jobs_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every setting of a job reaches the trainer's config and the evaluation: the seed fixes
    both the training and the sampling noise, and the sampler / steps / EMA are the study's
    (not the digits_adm preset's: ema 0.999, seed 0, ddim-50)."""
    seen, job = _stub_run(monkeypatch, tmp_path, "ddpm", [0, 1000], {})
    study._run_one(job)
    t, ev = seen["cfg"].train, seen["eval"]
    assert (t.seed, t.ema_decay, t.batch_size, t.lr, t.steps) == (2, 0.9, 8, 5e-4, 7)
    assert (seen["cfg"].ant.method, seen["cfg"].ant.clustering) == ("uw", "snr")
    assert seen["resume"] is None  # nothing in the run folder yet: a fresh run
    assert (ev["ckpt"], ev["num"], ev["seed"]) == ("ckpt.pt", 70, 2)
    assert (ev["sampler"], ev["steps"]) == ("ddpm", 9)
    res = json.loads(study.result_path(tmp_path, "uw-snr", 2).read_text())
    assert res["config"] == "uw-snr" and res["train_steps"] == 7 and res["train_batch"] == 8


def test_logged_timing_weights_each_row_by_the_steps_it_covers(tmp_path: Path) -> None:
    """A run finished by an earlier process reports the loss of its last logged step and the
    time of all its steps: each metrics.csv row's s/step covers the steps since the row
    before it."""
    (tmp_path / "metrics.csv").write_text(
        "step,loss,sec_per_step\n2,0.9,0.5\n4,0.7,0.25\n5,0.6,1.0\n"
    )
    got = study._logged(tmp_path)
    # 2 steps at 0.5 s, 2 at 0.25 s, 1 at 1.0 s: 2.5 s over 5 steps
    assert got["loss"] == 0.6
    assert got["seconds"] == pytest.approx(2.5, abs=1e-12)
    assert got["sec_per_step"] == pytest.approx(0.5, abs=1e-12)


def test_make_affinity_asks_for_the_bins_and_expands_them_to_timesteps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``antdiff affinity`` gets the study's --bins and --affinity-samples, and the trainer's
    [T, T] table gives every timestep its bin's row and column (unequal bins, T = 10)."""
    import antdiff.cli
    from antdiff.analysis.affinity import AffinityResult

    A = np.array([[1.0, 0.5, 0.1], [0.5, 1.0, 0.3], [0.1, 0.3, 1.0]])  # noqa: N806
    edges = np.array([0, 1, 4, 10])  # bins {0}, {1, 2, 3}, {4, ..., 9}
    argvs = []

    def fake_cli(argv):
        argvs.append(list(argv))
        AffinityResult(A, edges, 8, 1, {}).save(argv[argv.index("--out") + 1])
        return 0

    monkeypatch.setattr(antdiff.cli, "main", fake_cli)
    path = study.make_affinity(tmp_path, tmp_path / "runs" / "vanilla_s0", 3, 8, 1)
    (argv,) = argvs
    assert argv[argv.index("--bins") + 1] == "3"
    assert argv[argv.index("--n-samples") + 1] == "8"
    full = np.load(path)
    bin_of = [0, 1, 1, 1, 2, 2, 2, 2, 2, 2]
    want = np.array([[A[bin_of[t], bin_of[s]] for s in range(10)] for t in range(10)])
    assert full.dtype == np.float32
    np.testing.assert_array_equal(full, want.astype(np.float32))


def test_report_table_signs_the_delta_counts_wins_and_copies_the_affinity(tmp_path: Path) -> None:
    """Each row of the report: ΔFID with its sign, 'better' = seeds that beat vanilla, no
    clusters for vanilla (it has none to speak of); the affinity files go beside it."""
    configs = [
        {"name": "vanilla", "method": "vanilla", "clustering": "snr"},
        {"name": "uw-snr", "method": "uw", "clustering": "snr"},
        {"name": "pcgrad-gradient", "method": "pcgrad", "clustering": "gradient"},
    ]
    fids = {"vanilla": [3.0, 5.0, 10.0], "uw-snr": [2.0, 6.0, 7.0],
            "pcgrad-gradient": [4.0, 6.0, 12.0]}  # fmt: skip
    for name, values in fids.items():
        for s, f in enumerate(values):
            res = {"seed": s, "fid": f, "precision": 0.5, "recall": 0.25, "sec_per_step": 1.0,
                   "cluster_bounds": [0, 153, 1000]}  # fmt: skip
            path = study.result_path(tmp_path, name, s)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(res))
    files = ("affinity.npz", "affinity_timestep.png", "affinity_logsnr.png")
    for name in files:
        (tmp_path / name).write_bytes(name.encode())
    meta = {"command": "x", "steps": 2, "batch": 8, "lr": 1e-3, "ema": 0.99, "seeds": 3,
            "num": 70, "sampler": "ddim", "sample_steps": 3, "bins": 4, "affinity_samples": 8,
            "machine": "m", "jobs": 1, "wall_seconds": 60.0, "git_sha": "abc"}  # fmt: skip
    summary = {**study.summarize(tmp_path, configs, [0, 1, 2]), "meta": meta}
    study.write_report(summary, tmp_path / "rep" / "R", tmp_path)
    cells = {}
    for line in (tmp_path / "rep" / "R.md").read_text().splitlines():
        if line.startswith("| ") and not line.startswith("| config"):
            row = [c.strip() for c in line.split("|")[1:-1]]
            cells[row[0]] = row
    # columns: config, method, clustering, FID, ΔFID, better, P, R, s/step, clusters
    # uw - vanilla = [-1, +1, -3]: -1.00 ± 2.00, 2 of 3 seeds better
    assert cells["uw-snr"][4:6] == ["-1.00 ± 2.00", "2/3"]
    # pcgrad - vanilla = [+1, +1, +2]: mean 4/3, std sqrt(1/3) = 0.577, no seed better
    assert cells["pcgrad-gradient"][4:6] == ["+1.33 ± 0.58", "0/3"]
    assert cells["vanilla"][2] == "-" and cells["vanilla"][4:6] == ["-", "-"]
    assert cells["vanilla"][9] == "-" and cells["uw-snr"][9] == "[0, 153, 1000]"
    for name in files:
        assert (tmp_path / "rep" / "R" / name).read_bytes() == name.encode()


def test_parse_refuses_no_seeds_and_checks_bins_and_sampling_up_front(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """No seed means nothing to train; --bins may be anything in [1, T] (T bins: the
    per-timestep affinity); a sampling setting the config rejects fails before any run."""

    def refused(*flags: str) -> bool:
        try:
            study._parse(["--out", str(tmp_path / "o"), *flags])
        except SystemExit:
            return True
        return False

    assert refused("--seeds", "0")
    assert "--seeds, --steps, --num and --jobs must be >= 1" in capsys.readouterr().err
    assert not refused("--bins", "1000", "--clusterings", "gradient")
    assert refused("--bins", "1001", "--clusterings", "gradient")
    assert "--bins must be in [1, T=1000], got 1001" in capsys.readouterr().err
    assert refused("--sample-steps", "0")
    assert "sample.steps must be finite and > 0, got 0" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flag, then, now",
    [("--bins", "4", "8"), ("--affinity-samples", "16", "32"), ("--batch", "32", "16"),
     ("--ema", "0.99", "0.9"), ("--num", "1000", "500"), ("--sampler", "ddim", "ddpm"),
     ("--sample-steps", "50", "20")],
)  # fmt: skip
def test_rerun_with_another_setting_is_refused(
    tmp_path: Path, flag: str, then: str, now: str
) -> None:
    """Every setting a result is made with must repeat on a rerun: the affinity's (they shape
    the gradient runs' clusters), training's and sampling's."""
    out = tmp_path / "s"
    study._check_settings(out, study._parse(["--out", str(out), flag, then]))
    (out / "results").mkdir()
    (out / "results" / "vanilla_s0.json").write_text("{}")
    with pytest.raises(SystemExit, match=re.escape(f"{flag} {now} (made with {then})")):
        study._check_settings(out, study._parse(["--out", str(out), flag, now]))


def test_a_study_stopped_before_the_affinity_makes_it_on_the_rerun(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stopped after the vanilla seed-0 result but before its affinity: the rerun makes the
    affinity from that run first, then trains only the gradient configs."""
    out, ran, made = tmp_path / "s", [], []

    def fake_run_one(job):
        ran.append(job["name"])
        res = {"seed": job["seed"], "fid": 1.0, "precision": 0.5, "recall": 0.5,
               "sec_per_step": 0.1, "cluster_bounds": [0, 1000]}  # fmt: skip
        path = study.result_path(Path(job["out"]), job["name"], job["seed"])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(res))
        return res

    def fake_make_affinity(where, vdir, bins, n_samples, threads):
        made.append((vdir, bins, n_samples))
        np.save(where / "affinity_T.npy", np.eye(3))
        return where / "affinity_T.npy"

    monkeypatch.setattr(study, "run_one", fake_run_one)
    monkeypatch.setattr(study, "make_affinity", fake_make_affinity)
    fake_run_one({"out": str(out), "name": "vanilla", "seed": 0})  # the earlier process's
    ran.clear()
    argv = ["--out", str(out), "--seeds", "1", "--steps", "2", "--num", "70", "--methods", "uw",
            "--clusterings", "gradient", "--bins", "4", "--affinity-samples", "8",
            "--jobs", "1"]  # fmt: skip
    assert study.main(argv) == 0
    assert ran == ["uw-gradient"] and made == [(out / "runs" / "vanilla_s0", 4, 8)]


# -- a run's threads, folder, evaluation batch and recorded clusters ---------------------------


def test_run_one_trains_with_the_jobs_threads_and_gives_the_process_its_own_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A job runs with its ``threads`` torch threads (1 per parallel run); the process's own
    count comes back afterwards (a one-job study runs its jobs in the study's process)."""
    import torch

    seen = []
    monkeypatch.setattr(study, "_run_one", lambda job: seen.append(torch.get_num_threads()) or {})
    torch.set_num_threads(2)
    study.run_one({"threads": 1})
    assert seen == [1] and torch.get_num_threads() == 2
    torch.set_num_threads(1)
    study.run_one({"threads": 2})
    assert seen == [1, 2] and torch.get_num_threads() == 1


def test_a_run_has_a_folder_per_seed_samples_in_one_batch_and_records_its_clusters(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """runs/<config>_s<seed> (two seeds of a config never share a folder), all --num samples
    drawn as one batch, and the result keeps the run's cluster bounds and weights."""
    seen, job = _stub_run(monkeypatch, tmp_path, "ddim", [0, 400, 1000], {"weight": [0.25, 0.75]})
    study._run_one(job)
    assert Path(seen["out_dir"]) == tmp_path / "runs" / "uw-snr_s2"
    assert seen["eval"]["batch_size"] == 70
    res = json.loads(study.result_path(tmp_path, "uw-snr", 2).read_text())
    assert res["cluster_bounds"] == [0, 400, 1000] and res["cluster_weights"] == [0.25, 0.75]


# -- the affinity: a failed pass and a crash while writing the table --------------------------


def test_make_affinity_raises_on_a_failed_pass_and_leaves_no_table_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """affinity_T.npy existing means "done" on a resume: a failed ``antdiff affinity`` raises,
    and a crash while the table is written leaves no (partial) table."""
    import antdiff.cli
    from antdiff.analysis.affinity import AffinityResult

    monkeypatch.setattr(antdiff.cli, "main", lambda argv: 1)
    with pytest.raises(RuntimeError, match="antdiff affinity failed"):
        study.make_affinity(tmp_path, tmp_path / "runs" / "vanilla_s0", 2, 8, 1)
    assert not (tmp_path / "affinity_T.npy").exists()

    def cut_short(file, arr):  # noqa: ARG001 (a full disk: part of the file, then an error)
        if isinstance(file, (str, Path)):
            Path(file).write_bytes(b"\x93NUMPY")
        else:
            file.write(b"\x93NUMPY")
        raise OSError("no space left on device")

    def fake_cli(argv):
        edges = np.array([0, 5, 10])
        AffinityResult(np.eye(2), edges, 8, 1, {}).save(argv[argv.index("--out") + 1])
        monkeypatch.setattr(np, "save", cut_short)
        return 0

    monkeypatch.setattr(antdiff.cli, "main", fake_cli)
    with pytest.raises(OSError, match="no space"):
        study.make_affinity(tmp_path, tmp_path / "runs" / "vanilla_s0", 2, 8, 1)
    assert not (tmp_path / "affinity_T.npy").exists()


# -- the summary with missing results: pairing by seed, ties ----------------------------------


def test_summary_pairs_with_vanilla_by_seed_when_some_results_are_missing(tmp_path: Path) -> None:
    """Vanilla lacks seed 0: uw-snr's ΔFID uses seeds 1 and 2 only (not the first two
    vanilla results), its seeds and counts are those found, and a tie with vanilla is not
    'better'."""
    configs = [
        {"name": "vanilla", "method": "vanilla", "clustering": "snr"},
        {"name": "uw-snr", "method": "uw", "clustering": "snr"},
    ]
    fids = {"vanilla": {1: 5.0, 2: 10.0}, "uw-snr": {0: 2.0, 1: 5.0, 2: 7.0}}
    for name, by_seed in fids.items():
        for s, f in by_seed.items():
            res = {"seed": s, "fid": f, "precision": 0.5, "recall": 0.5, "sec_per_step": 1.0,
                   "cluster_bounds": [0, 1000], "features": "digits"}  # fmt: skip
            path = study.result_path(tmp_path, name, s)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(res))
    summary = study.summarize(tmp_path, configs, [0, 1, 2])
    van, uw = summary["rows"]
    assert (van["seeds"], van["n_seeds"]) == ([1, 2], 2)
    assert (uw["seeds"], uw["n_seeds"]) == ([0, 1, 2], 3)
    assert van["fid"]["mean"] == pytest.approx(7.5)
    # seed 1: 5 - 5 = 0 (a tie), seed 2: 7 - 10 = -3; seed 0 has no vanilla to pair with
    d = [0.0, -3.0]
    mean = sum(d) / 2
    std = (sum((x - mean) ** 2 for x in d) / (2 - 1)) ** 0.5
    assert uw["dfid"]["values"] == pytest.approx(d)
    assert uw["dfid"]["mean"] == pytest.approx(mean) and uw["dfid"]["std"] == pytest.approx(std)
    assert uw["dfid"]["better"] == 1
    summary["meta"] = {"command": "x", "steps": 2, "batch": 8, "lr": 1e-3, "ema": 0.99,
                       "seeds": 3, "num": 70, "sampler": "ddim", "sample_steps": 3, "bins": 4,
                       "affinity_samples": 8, "machine": "m", "jobs": 1, "wall_seconds": 60.0,
                       "git_sha": "abc"}  # fmt: skip
    study.write_report(summary, tmp_path / "R", tmp_path)
    row = next(r for r in (tmp_path / "R.md").read_text().splitlines() if r.startswith("| uw-snr"))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert cells[4:6] == [f"{mean:+.2f} ± {std:.2f}", "1/2"]  # 1 of the 2 paired seeds


# -- main: wall time, the results' code, parallel runs, argument and settings checks ----------


class _ThreadPool(ThreadPoolExecutor):
    """The study's process pool, as threads (so that a monkeypatched run_one reaches them)."""

    def __init__(self, n, mp_context=None, initializer=None, initargs=()):  # noqa: ARG002
        super().__init__(n)


def test_report_counts_wall_time_from_the_first_start_and_names_the_results_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rerun that finds every result: the wall time runs from the study's first start (its
    started.txt), in minutes, and the report names the commits the results were made at."""
    out, report = tmp_path / "s", tmp_path / "R"
    for name, sha in (("vanilla", "bbb"), ("uw-snr", "aaa")):
        res = {"seed": 0, "fid": 4.0, "precision": 0.5, "recall": 0.5, "sec_per_step": 1.0,
               "cluster_bounds": [0, 1000], "features": "digits", "git_sha": sha}  # fmt: skip
        path = study.result_path(out, name, 0)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(res))
    (out / "started.txt").write_text(f"{time.time() - 120:.1f}\n")  # 2 minutes ago
    monkeypatch.setattr(study, "run_one", lambda job: pytest.fail(f"ran {job['name']}"))
    argv = ["--out", str(out), "--seeds", "1", "--steps", "2", "--num", "70", "--methods", "uw",
            "--clusterings", "snr", "--jobs", "1", "--report", str(report)]  # fmt: skip
    assert study.main(argv) == 0
    meta = json.loads((out / "summary.json").read_text())["meta"]
    assert 120 <= meta["wall_seconds"] < 150
    assert meta["results_made_at"] == ["aaa", "bbb"]
    md = report.with_suffix(".md").read_text()
    assert "Wall time: 2.0 min" in md and "(results made at aaa, bbb)" in md


def test_a_rerun_with_the_affinity_made_does_not_make_it_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Vanilla seed 0 and its affinity table both done: the gradient runs start at once, on
    that table (remaking it costs an affinity pass)."""
    out, ran, made = tmp_path / "s", [], []
    path = study.result_path(out, "vanilla", 0)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"seed": 0, "fid": 1.0, "precision": 0.5, "recall": 0.5,
                                "sec_per_step": 0.1, "cluster_bounds": [0, 1000]}))  # fmt: skip
    np.save(out / "affinity_T.npy", np.eye(3))

    def fake_run_one(job):
        ran.append(job["name"])
        res = {"seed": job["seed"], "fid": 1.0, "precision": 0.5, "recall": 0.5,
               "sec_per_step": 0.1, "cluster_bounds": [0, 1000]}  # fmt: skip
        study.result_path(out, job["name"], job["seed"]).write_text(json.dumps(res))
        return res

    monkeypatch.setattr(study, "run_one", fake_run_one)
    monkeypatch.setattr(study, "make_affinity", lambda *a: made.append(a))
    argv = ["--out", str(out), "--seeds", "1", "--steps", "2", "--num", "70", "--methods", "uw",
            "--clusterings", "gradient", "--bins", "4", "--affinity-samples", "8",
            "--jobs", "1"]  # fmt: skip
    assert study.main(argv) == 0
    assert ran == ["uw-gradient"] and made == []


def _job(out: Path, name: str, seed: int) -> dict:
    return {"out": str(out), "name": name, "seed": seed,
            "clustering": name.split("-")[-1] if "-" in name else "snr"}  # fmt: skip


def test_schedule_runs_vanilla_seed0_first_then_the_seed0_runs_whatever_the_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The vanilla seed-0 run goes first (the gradient runs wait for its affinity), then every
    seed-0 run before any later seed, whatever order the jobs come in."""
    out, ran, made = tmp_path / "s", [], []
    monkeypatch.setattr(
        study,
        "run_one",
        lambda job: (
            ran.append((job["name"], job["seed"]))
            or {"fid": 1.0, "precision": 0.5, "recall": 0.5, "sec_per_step": 0.1}
        ),
    )
    monkeypatch.setattr(study, "make_affinity", lambda *a: made.append(list(ran)))
    args = study._parse(["--out", str(out), "--jobs", "1", "--methods", "uw"])
    todo = [_job(out, n, s) for n in ("uw-gradient", "uw-snr", "vanilla") for s in (1, 0)]
    study._schedule(out, todo, args, time.perf_counter())
    assert ran[0] == ("vanilla", 0)
    assert len(made) == 1 and made[0][0] == ("vanilla", 0)  # once, after vanilla seed 0 ran
    ready = [r for r in ran if r[0] != "uw-gradient"]
    assert [s for _, s in ready] == [0, 0, 1, 1]
    assert sorted(ran[4:]) == [("uw-gradient", 0), ("uw-gradient", 1)]


def test_gradient_runs_without_a_vanilla_seed0_run_are_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No vanilla seed-0 run to make the affinity: the held gradient runs are an error, not
    silently left out of the study."""
    out = tmp_path / "s"
    monkeypatch.setattr(study, "run_one", lambda job: pytest.fail(f"ran {job['name']}"))
    args = study._parse(["--out", str(out), "--jobs", "1", "--methods", "uw"])
    with pytest.raises(RuntimeError, match="vanilla seed-0 run, which did not run"):
        study._schedule(out, [_job(out, "uw-gradient", 0)], args, time.perf_counter())


def test_parallel_runs_take_one_thread_each_and_the_affinity_waits_for_vanilla_seed0(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With 2 runs at a time, vanilla seed 1 may end before seed 0: the affinity is still made
    from the seed-0 run (its checkpoint), once that has ended; every run has 1 torch thread."""
    import threading

    out, jobs, made = tmp_path / "s", [], []
    seed1_ended = threading.Event()

    def fake_run_one(job):
        jobs.append(job)
        if (job["name"], job["seed"]) == ("vanilla", 0):
            seed1_ended.wait(10)
            time.sleep(0.3)  # the study has seen vanilla seed 1 end by now
        res = {"seed": job["seed"], "fid": 1.0, "precision": 0.5, "recall": 0.5,
               "sec_per_step": 0.1, "cluster_bounds": [0, 1000]}  # fmt: skip
        path = study.result_path(out, job["name"], job["seed"])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(res))
        if (job["name"], job["seed"]) == ("vanilla", 1):
            seed1_ended.set()
        return res

    def fake_make_affinity(where, vdir, bins, n_samples, threads):  # noqa: ARG001
        made.append(study.result_path(where, "vanilla", 0).is_file())
        np.save(where / "affinity_T.npy", np.eye(3))
        return where / "affinity_T.npy"

    monkeypatch.setattr(study, "run_one", fake_run_one)
    monkeypatch.setattr(study, "make_affinity", fake_make_affinity)
    monkeypatch.setattr(study, "ProcessPoolExecutor", _ThreadPool)
    argv = ["--out", str(out), "--seeds", "2", "--steps", "2", "--num", "70", "--methods", "uw",
            "--clusterings", "snr,gradient", "--bins", "4", "--affinity-samples", "8",
            "--jobs", "2"]  # fmt: skip
    assert study.main(argv) == 0
    assert made == [True]  # once, after vanilla seed 0 had its result
    assert len(jobs) == 6 and {j["threads"] for j in jobs} == {1}


def test_parse_refuses_no_parallel_jobs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """--jobs 0 would fail at the pool, after the lock and settings were taken."""
    with pytest.raises(SystemExit):
        study._parse(["--out", str(tmp_path / "o"), "--jobs", "0"])
    assert "--seeds, --steps, --num and --jobs must be >= 1" in capsys.readouterr().err


def test_a_result_is_there_only_once_written_in_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A result file means "done" on a resume: an I/O error while it is written (here its
    fsync) leaves no result file, so the rerun makes the run's result again."""
    import os
    from types import SimpleNamespace

    import antdiff.evaluate
    import antdiff.train

    def fake_train(cfg, resume=None):  # noqa: ARG001
        clusters = SimpleNamespace(bounds=[0, 1000])
        return {"run": SimpleNamespace(ant=SimpleNamespace(clusters=clusters)),
                "checkpoint": "ckpt.pt", "loss": 0.5, "seconds": 1.0, "sec_per_step": 0.1,
                "stats": {}}  # fmt: skip

    def failing_fsync(fd):  # noqa: ARG001
        raise OSError("input/output error")

    monkeypatch.setattr(antdiff.train, "train", fake_train)
    monkeypatch.setattr(
        antdiff.evaluate,
        "evaluate_checkpoint",
        lambda *a, **k: {"fid": 1.0, "precision": 0.5, "recall": 0.5},
    )
    job = {"out": str(tmp_path), "name": "uw-snr", "method": "uw", "clustering": "snr",
           "seed": 0, "steps": 7, "batch": 8, "lr": 5e-4, "ema": 0.9, "threads": 1, "num": 70,
           "sampler": "ddim", "sample_steps": 9,
           "affinity": str(tmp_path / "affinity_T.npy")}  # fmt: skip
    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="input/output"):
        study._run_one(job)
    assert not study.result_path(tmp_path, "uw-snr", 0).exists()


# -- the lock after a failed study: released for a retry in the same process ------------------


def test_a_failed_study_releases_its_lock_for_a_retry_in_the_same_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """main() that raised kept --out/.lock held for as long as its traceback lived (a REPL's
    sys.last_value, a test's excinfo): a retry in the same process was refused as "another
    study is running" under its own pid."""

    def run_one(job):
        raise RuntimeError(f"run {job['name']} failed")

    monkeypatch.setattr(study, "run_one", run_one)
    argv = ["--out", str(tmp_path / "s"), "--seeds", "1", "--steps", "2", "--num", "70",
            "--methods", "uw", "--clusterings", "snr", "--jobs", "1"]  # fmt: skip
    with pytest.raises(RuntimeError, match="run vanilla failed") as first:
        study.main(argv)
    # the first failure still kept: the retry runs (and fails the same way), not refused
    with pytest.raises(RuntimeError, match="run vanilla failed"):
        study.main(argv)
    assert "vanilla" in str(first.value)

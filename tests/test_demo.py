"""The demo (``make demo``): both runs, the report's files, and a rerun into the same folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from antdiff.demo import run_demo


def test_demo_writes_its_report_and_a_rerun_replaces_its_runs(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    first = run_demo(out, steps=3, batch_size=16, progress=False)
    for name in ("samples.png", "summary.json"):
        assert (out / name).stat().st_size > 0
    assert json.loads((out / "summary.json").read_text())["final_loss"] == first["final_loss"]
    grids = {p.name for p in (out / "runs" / "ant" / "samples").iterdir()}
    assert "step_00000003.png" in grids
    # fewer steps into the same folder: nothing of the first run's stays beside the second's
    run_demo(out, steps=2, batch_size=16, progress=False)
    grids = {p.name for p in (out / "runs" / "ant" / "samples").iterdir()}
    assert "step_00000003.png" not in grids and "step_00000002.png" in grids
    assert len(list((out / "runs" / "ant" / "tb").glob("events.*"))) == 1
    readme = (out / "README.md").read_text()
    assert f"antdiff demo --out {out} --steps 2 --batch-size 16" in readme  # the real command


def test_an_interrupted_rerun_leaves_no_old_report(tmp_path: Path, monkeypatch) -> None:
    """A rerun stopped while training left the earlier run's summary.json, README.md and
    figures beside the new runs' logs; the stop also left the other worker running."""
    import antdiff.demo as demo

    out = tmp_path / "demo"
    run_demo(out, steps=2, batch_size=16, progress=False)
    (out / "mine.txt").write_text("the user's own")
    stopped = []

    class Stopping:  # the pool of a run interrupted at its first wait
        def __init__(self, *args, **kwargs):
            self._processes = {1: type("P", (), {"terminate": lambda _: stopped.append(1)})()}

        def submit(self, *args):
            raise KeyboardInterrupt

        def shutdown(self, wait=True, cancel_futures=False):
            stopped.append("shutdown")

    monkeypatch.setattr(demo, "ProcessPoolExecutor", Stopping)
    with pytest.raises(KeyboardInterrupt):
        run_demo(out, steps=3, batch_size=16, progress=False)
    assert stopped == [1, "shutdown"]
    left = sorted(p.name for p in out.iterdir())
    assert left == ["mine.txt", "runs"], left


def test_demo_never_deletes_a_run_it_did_not_write(tmp_path: Path) -> None:
    """runs/ant under --out may be the user's own training run: refused, not replaced."""
    ckpt = tmp_path / "runs" / "ant" / "checkpoints" / "ckpt_00050000.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"weights")
    with pytest.raises(ValueError, match="holds files the demo did not write"):
        run_demo(tmp_path, steps=2, batch_size=16, progress=False)
    assert ckpt.read_bytes() == b"weights"


def test_a_refused_demo_touches_neither_run_and_says_no_training(tmp_path: Path, capsys) -> None:
    """A foreign runs/vanilla: the demo's own earlier runs/ant was already deleted, and
    "[demo] training ..." printed, before the refusal. Both are checked first now."""
    from antdiff.demo import MARK

    own = tmp_path / "runs" / "ant"
    own.mkdir(parents=True)
    (own / MARK).write_text("written by antdiff demo\n")
    (own / "samples.png").write_bytes(b"png")
    theirs = tmp_path / "runs" / "vanilla" / "notes.txt"
    theirs.parent.mkdir(parents=True)
    theirs.write_text("mine")
    with pytest.raises(ValueError, match="runs/vanilla' holds files the demo did not write"):
        run_demo(tmp_path, steps=2, batch_size=16, progress=False)
    assert (own / "samples.png").read_bytes() == b"png" and theirs.read_text() == "mine"
    assert "[demo] training" not in capsys.readouterr().err


def test_demo_errors_name_its_own_flags(tmp_path: Path, capsys) -> None:
    """A bad --batch-size said "train.batch_size ... or set ant.sampling=uniform", neither of
    them a demo flag; `python -m antdiff.demo` printed a traceback."""
    from antdiff.demo import main

    for argv, msg in ((["--batch-size", "2"], "--batch-size must be an integer >= 5"),
                      (["--steps", "0"], "--steps must be an integer >= 1")):  # fmt: skip
        with pytest.raises(SystemExit):
            main([*argv, "--out", str(tmp_path)])
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err and "train." not in err
    assert not (tmp_path / "runs").exists()

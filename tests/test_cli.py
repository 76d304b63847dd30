from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from antdiff import info
from antdiff.cli import main


def test_cluster_cli_json_and_plot(tmp_path, capsys):
    out_json, out_png = tmp_path / "c.json", tmp_path / "c.png"
    rc = main(["cluster", "--schedule", "linear", "--T", "1000", "--k", "5", "--objective", "snr",
               "--min-size", "none", "--max-size", "none", "--json", str(out_json),
               "--plot", str(out_png)])
    assert rc == 0
    d = json.loads(out_json.read_text())
    assert d["bounds"] == [0, 153, 394, 624, 823, 1000]
    assert abs(d["cost"] - 781.7405) < 1e-4
    assert out_png.read_bytes()[:4] == b"\x89PNG"
    text = capsys.readouterr().out
    assert "I1: t in [0, 153)" in text and "[823,1000)" in text


def test_cluster_cli_gradient_from_npz(tmp_path, capsys):
    T = 100
    blocks = np.arange(T) // 25
    A = np.where(blocks[:, None] == blocks[None, :], 1.0, 0.0)
    np.savez(tmp_path / "aff.npz", affinity=A[::5, ::5], bin_edges=np.arange(0, T + 1, 5))
    rc = main(["cluster", "--T", str(T), "--k", "4", "--objective", "gradient",
               "--affinity", str(tmp_path / "aff.npz")])
    assert rc == 0
    assert '"bounds": [0, 25, 50, 75, 100]' in capsys.readouterr().out


def test_cluster_cli_schedule_file(tmp_path, capsys):
    a = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    np.save(tmp_path / "ac.npy", a)
    assert main(["cluster", "--schedule", str(tmp_path / "ac.npy"), "--objective",
                 "timestep"]) == 0
    assert '"bounds": [0, 200, 400, 600, 800, 1000]' in capsys.readouterr().out
    # the file has its own length: a --T beside it was ignored, now refused
    assert main(["cluster", "--schedule", str(tmp_path / "ac.npy"), "--T", "500"]) == 2
    assert "holds 1000 timesteps" in capsys.readouterr().err
    assert main(["cluster", "--schedule", str(tmp_path / "ac.npy"), "--T", "1000"]) == 0


def test_train_cli_options_mistyped_or_idle_are_errors(tmp_path, capsys):
    """An option mistyped as an override, --allow-config-change without --resume (ignored
    before) and --resume where there is nothing to resume name their fix."""
    base = ["train", "--config", "digits_adm", "--train.out_dir", str(tmp_path / "run")]
    for typo, meant in (("--resum", "--resume"), ("--allow_config_change",
                                                  "--allow-config-change")):  # fmt: skip
        assert main([*base, typo, "x"]) == 2
        assert f"unknown option {typo} (did you mean {meant}?)" in capsys.readouterr().err
    assert main([*base, "--allow-config-change"]) == 2
    assert "applies when resuming: add --resume" in capsys.readouterr().err
    assert main([*base, "--resume"]) == 2
    assert "drop --resume to start a fresh run" in capsys.readouterr().err
    assert main([*base, "--name", "mine", "--print-config"]) == 0  # a top-level key of its own
    assert "name: mine" in capsys.readouterr().out
    # a key given twice on the command line (the last one won, silently)
    assert main([*base, "--train.batch_size", "48", "--train.batch_size=32"]) == 2
    assert "--train.batch_size is given twice ('48', then '32'); give it once" in (
        capsys.readouterr().err)
    # a mistyped key's suggestion names the whole key
    assert main([*base, "--ant.methd", "uw", "--print-config"]) == 2
    assert "Did you mean 'ant.method'?" in capsys.readouterr().err


def test_cluster_cli_errors_are_messages_not_tracebacks(tmp_path, capsys):
    assert main(["cluster", "--k", "0"]) == 2
    assert "k must be" in capsys.readouterr().err
    assert main(["cluster", "--objective", "gradient"]) == 2
    assert "--affinity" in capsys.readouterr().err
    assert main(["cluster", "--objective", "gradient", "--affinity",
                 str(tmp_path / "missing.npy")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["cluster", "--k", "5", "--min-size", "300"]) == 2
    assert "min_size" in capsys.readouterr().err
    # a [5, 7] affinity was read as T = 5 ("T=5 is too small for the linear schedule"); a text
    # file got numpy's advice to load it with allow_pickle
    np.save(tmp_path / "wide.npy", np.ones((5, 7)))
    (tmp_path / "text.npy").write_text("not numbers\n")
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    for name, want in (("wide.npy", "must be a square matrix [T, T] (or [nb, nb] with bin "
                                    "edges), got shape [5, 7]"),
                       ("text.npy", "text.npy' is not a numeric numpy file (an affinity"),
                       ("objects.npy", "holds pickled Python objects, not numbers")):
        assert main(["cluster", "--objective", "gradient", "--affinity",
                     str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert want in err and "allow_pickle" not in err, err
    assert main(["cluster", "--schedule", str(tmp_path / "text.npy")]) == 2
    assert "is not a numeric numpy file (alphas_cumprod [T]" in capsys.readouterr().err
    from antdiff.utils import load_npy

    for missing, error in ((tmp_path / "nope.npy", FileNotFoundError),
                           (tmp_path, IsADirectoryError)):  # the OS's own words, not "numeric"
        with pytest.raises(error):
            load_npy(missing, "bin edges")


def test_cluster_cli_affinity_rules_and_missing_extension(tmp_path, capsys, monkeypatch):
    """--affinity without --objective gradient was ignored (SNR clusters, rc 0); T comes from
    the affinity (it assumed 1000); a .pt dict and a missing C++ extension are messages."""
    import torch

    from antdiff import interval_dp

    T = 100
    blocks = np.arange(T) // 25
    A = np.where(blocks[:, None] == blocks[None, :], 1.0, 0.0)
    np.savez(tmp_path / "aff.npz", affinity=A[::5, ::5], bin_edges=np.arange(0, T + 1, 5))
    np.save(tmp_path / "full.npy", A)
    torch.save({"affinity": torch.from_numpy(A)}, tmp_path / "dict.pt")
    assert main(["cluster", "--k", "4", "--affinity", str(tmp_path / "aff.npz")]) == 2
    assert "add --objective gradient" in capsys.readouterr().err
    grad = ["cluster", "--k", "4", "--objective", "gradient", "--affinity"]
    for name in ("aff.npz", "full.npy"):  # no --T: the affinity's 100 timesteps
        assert main([*grad, str(tmp_path / name)]) == 0
        assert '"bounds": [0, 25, 50, 75, 100]' in capsys.readouterr().out
    assert main([*grad, str(tmp_path / "dict.pt")]) == 2
    assert "must hold the affinity matrix as one tensor, got dict" in capsys.readouterr().err
    # an affinity measured on a cosine run: its log-SNR ranges (and plot) were the linear
    # schedule's unless --schedule was repeated; the file's meta now names it
    np.savez(tmp_path / "cos.npz", affinity=A[::5, ::5], bin_edges=np.arange(0, T + 1, 5),
             meta=np.array(json.dumps({"schedule": f"cosine(T={T})"})))  # fmt: skip
    for extra, want in (([], "cosine"), (["--schedule", "linear"], "linear")):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            assert main([*grad, str(tmp_path / "cos.npz"), "--json", str(tmp_path / "c.json"),
                         *extra]) == 0  # fmt: skip
        said = [str(w.message) for w in seen if "was measured on the cosine" in str(w.message)]
        assert len(said) == (want == "linear")  # another schedule than the file's: warned
        assert json.loads((tmp_path / "c.json").read_text())["meta"]["schedule"] == f"{want}(T={T})"
    capsys.readouterr()
    monkeypatch.setattr(interval_dp, "_load_cpp", lambda: None)
    monkeypatch.setitem(interval_dp._cpp, "error", "not built")
    assert main(["cluster", "--backend", "cpp"]) == 2
    assert "antdiff._C is missing (not built)" in capsys.readouterr().err


def test_bad_output_paths_and_devices_fail_first_without_tracebacks(tmp_path, capsys,
                                                                   monkeypatch):
    """A file given as --out folder, a folder as --json file, or an unknown --device was a
    traceback, for sample and eval only after all the sampling; now each is a message before
    any work (a missing checkpoint would be the error otherwise). Ctrl-C exits 130 quietly."""
    import antdiff.cli.cluster as cluster_cli

    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    missing = str(tmp_path / "no_ckpt")
    cases = [
        (["sample", "--ckpt", missing, "--num", "2", "--out", str(a_file)], "is a file"),
        (["eval", "--ckpt", missing, "--num", "2", "--json", str(tmp_path)], "is a folder"),
        (["eval", "--ckpt", missing, "--num", "2", "--json", str(a_file / "r.json")],
         "is a file, not a folder"),
        (["sample", "--ckpt", missing, "--num", "2", "--out", str(tmp_path / "s"),
          "--device", "tpu"], "'tpu' is not a device"),
        (["cluster", "--json", str(tmp_path)], "is a folder"),
        (["eval", "--ckpt", missing, "--num", "2", "--json", str(tmp_path / "r.json"),
          "--cache-dir", str(a_file)], "--cache-dir"),  # was [Errno 17] File exists, at the end
        (["demo", "--out", str(a_file)], "is a file"),
        (["affinity", str(a_file), "--out", str(tmp_path / "a.npz")], "is not a torch checkpoint"),
        (["sample", "--ckpt", missing, "--num", "2", "--out", str(tmp_path / "s"),
          "--device", "meta"], "'meta' is not a device antdiff runs on"),
    ]  # fmt: skip
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err, argv

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cluster_cli, "run", interrupted)
    assert main(["cluster"]) == 130
    assert capsys.readouterr().err.strip() == "antdiff cluster: interrupted"


def test_info_reports_extension_and_env(capsys):
    d = info.collect()
    assert d["antdiff._C"].startswith("built")
    assert "ANT_REQUIRE_CPP" in d and "torch" in d and "triton" in d
    info.main()
    assert "antdiff._C" in capsys.readouterr().out
    assert main(["info"]) == 0  # the sub-command, as the README writes it
    assert "antdiff._C" in capsys.readouterr().out


def test_info_lists_every_setting_the_project_reads():
    """Every ANT_* variable that the package, kernels, benchmarks or scripts read is listed by
    `antdiff info` and in the README's table of settings."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    files = [f for d in ("python", "ant_kernels", "benchmarks", "scripts")
             for f in (root / d).rglob("*") if f.suffix in (".py", ".sh", ".cpp")]  # fmt: skip
    read = {m for f in files for m in re.findall(r"\bANT_[A-Z0-9_]+\b", f.read_text())}
    assert {"ANT_REQUIRE_CPP", "ANT_GPU_STEP_PARTS"} <= read  # the scan sees the code
    assert read - set(info.ENV_VARS) == set(), "add them to antdiff.info.ENV_VARS"
    table = {m for line in (root / "README.md").read_text().splitlines()
             if line.startswith("| `") for m in re.findall(r"`(ANT_[A-Z0-9_]+|TRITON_INTERPRET)`",
                                                             line)}  # fmt: skip
    assert set(info.ENV_VARS) == table


def test_sample_takes_the_runs_own_guidance_unless_told(tmp_path, capsys):
    """`antdiff sample` of a digits_dit run (its preview grids guided at 2.0) sampled at 1.0
    unless --cfg-scale was given; it now takes the run's sample.cfg_scale."""
    run = tmp_path / "dit"
    assert main(["train", "--config", "digits_dit", "--train.steps", "2", "--train.batch_size",
                 "10", "--train.progress", "false", "--sample.n", "4", "--sample.steps", "2",
                 "--train.out_dir", str(run)]) == 0  # fmt: skip
    for extra, want in (([], 2.0), (["--cfg-scale", "1.0"], 1.0)):
        out = tmp_path / f"s{want}"
        assert main(["sample", "--ckpt", str(run), "--num", "2", "--steps", "2", "--out",
                     str(out), "--no-progress", *extra]) == 0  # fmt: skip
        assert json.loads((out / "sample.json").read_text())["cfg_scale"] == want
    capsys.readouterr()


def test_sigterm_stops_train_with_a_message_and_the_handler_is_restored(monkeypatch, capsys):
    """A scheduler's SIGTERM ended a run with exit 143 and no word; it now stops like Ctrl-C
    (the last complete checkpoint kept), says how to continue, and leaves SIGTERM as it was."""
    import os
    import signal

    import antdiff.train

    def stopped(*a, **kw):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not stop the run")

    monkeypatch.setattr(antdiff.train, "train", stopped)
    before = signal.getsignal(signal.SIGTERM)
    assert main(["train", "--config", "digits_adm"]) == 130
    assert "interrupted: its last complete checkpoint is kept; continue with the same command " \
           "and --resume" in capsys.readouterr().err  # fmt: skip
    assert signal.getsignal(signal.SIGTERM) is before


def _help(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse's line wrapping undone


def test_every_command_help_shows_its_defaults(capsys):
    """--help showed no default for most options (cluster --k 5, affinity --n-samples 512,
    sample --batch-size 500, ...); now every option with a default shows it, and none shows
    "default: None" (no default) or a flag's False."""
    from antdiff.cli import COMMANDS

    want = {
        "cluster": ["number of clusters (default: 5)", "(default: snr)", "(default: auto)"],
        "affinity": ["data points per bin (default: 512)", "forward/backward (default: 128)",
                     "(default: affinity.npz", "(default: 0)"],
        "sample": ["samples per sampling batch (default: 500)", "(default: linspace)",
                   "(default: 0.0)", "(default: npy)", "(default: 100)"],
        "eval": ["neighbours for precision / recall (default: 3)", "(default: digits)"],
        "ntg": ["samples per FID (default: 1000)", "(default: runs/ntg)", "(default: 5)"],
        "demo": ["(default: 0)"],
    }  # fmt: skip
    for name in COMMANDS:
        text = _help(capsys, name)
        for phrase in want.get(name, []):
            assert phrase in text, (name, phrase)
        for bad in ("default: None", "default: False", "default: True"):
            assert bad not in text, (name, bad)


def test_version_flag(capsys):
    import antdiff

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"antdiff {antdiff.__version__}"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A one-step digits_adm run with its checkpoint (and checkpoints/latest pointer)."""
    run = tmp_path_factory.mktemp("tiny") / "run"
    assert main(["train", "--config", "digits_adm", "--train.steps", "1", "--train.batch_size",
                 "10", "--train.progress", "false", "--sample.n", "2", "--sample.steps", "2",
                 "--train.threads", "1", "--train.out_dir", str(run)]) == 0  # fmt: skip
    return run


def test_sample_settings_are_refused_before_any_work(tiny_run, tmp_path, capsys, monkeypatch):
    """--steps above T and --eta outside [0, 1] were refused only once the progress bar had
    started (inside the sampling); now before it, and --eta before the checkpoint loads."""
    import antdiff.evaluate as ev

    loads = []
    real_load = ev.load_for_sampling

    def load(*a, **k):
        loads.append(1)
        return real_load(*a, **k)

    monkeypatch.setattr(ev, "load_for_sampling", load)
    def draw(*a, **k):
        raise AssertionError("the sampling (and its progress bar) started before the check")

    monkeypatch.setattr(ev, "generate", draw)
    base = ["sample", "--ckpt", str(tiny_run), "--num", "2", "--out", str(tmp_path / "s")]
    capsys.readouterr()
    for extra, message, loaded in (
        (["--steps", "2000"], "steps must be an integer in [1, T=1000], got 2000", 1),
        (["--eta", "2"], "eta must be in [0, 1] (0: DDIM, 1: DDPM-like), got 2.0", 0),
        (["--sampler", "ddpm", "--eta", "0.5"], "eta=0.5 applies to sampler='ddim' only", 0),
        (["--steps", "0"], "steps must be an integer >= 1, got 0", 0),
        (["--batch-size", "0"], "--batch-size must be >= 1, got 0", 0),
    ):  # fmt: skip
        loads.clear()
        assert main([*base, *extra]) == 2, extra
        assert message in capsys.readouterr().err, extra
        assert len(loads) == loaded, extra
    assert not (tmp_path / "s").exists()
    err_eval = ["eval", "--ckpt", str(tiny_run), "--num", "2", "--eta", "-1", "--json",
                str(tmp_path / "e.json")]  # fmt: skip
    assert main(err_eval) == 2 and "eta must be in [0, 1]" in capsys.readouterr().err
    assert not loads


def test_sample_follows_the_latest_pointer(tiny_run, tmp_path, capsys):
    """--ckpt <run>/checkpoints/latest (the pointer file) said "not a torch checkpoint"; it now
    stands for the checkpoint it names, which sample.json records."""
    latest = tiny_run / "checkpoints" / "latest"
    named = tiny_run / "checkpoints" / latest.read_text().strip()
    out = tmp_path / "s"
    assert main(["sample", "--ckpt", str(latest), "--num", "2", "--steps", "2", "--no-progress",
                 "--out", str(out)]) == 0  # fmt: skip
    assert json.loads((out / "sample.json").read_text())["ckpt"] == str(named)
    capsys.readouterr()


def test_the_spacing_warning_names_the_callers_line():
    """The "leading" spacing warning was attributed to torch/utils/_contextlib.py (sample's
    no_grad decorator took the frame stacklevel=2 pointed at); it names the caller's line."""
    import torch

    from antdiff.diffusion import GaussianDiffusion
    from antdiff.sampling import sample
    from antdiff.schedules import make_schedule

    diffusion = GaussianDiffusion(make_schedule("linear", 1000))
    with pytest.warns(UserWarning, match="spacing='leading' with steps=334") as rec:
        sample(lambda x, t: torch.zeros_like(x), diffusion, (1, 1, 2, 2), steps=334,
               spacing="leading")  # fmt: skip
    assert [w.filename for w in rec] == [__file__]

"""Checkpoints: atomic writes, pruning, weights-only loading, corruption and crash recovery."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch

import antdiff.checkpoint as ck
from antdiff.checkpoint import (
    FORMAT,
    capture_rng,
    list_checkpoints,
    load_checkpoint,
    load_model_state,
    restore_rng,
    save_checkpoint,
)


def _state(step: int) -> dict:
    return {
        "format": FORMAT,
        "step": step,
        "w": torch.full((3,), float(step)),
        "config": {"model": {"name": "adm-tiny", "overrides": {}}},
        "rng": capture_rng(),
    }


def test_save_prune_latest_and_weights_only(tmp_path):
    for s in (10, 20, 30):
        save_checkpoint(tmp_path, s, _state(s), keep=2)
    files = list_checkpoints(tmp_path)
    assert [f.name for f in files] == ["ckpt_00000020.pt", "ckpt_00000030.pt"]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "ckpt_00000030.pt"
    state, path = load_checkpoint(tmp_path)
    assert (
        path == files[-1]
        and state["step"] == 30
        and torch.equal(state["w"], torch.full((3,), 30.0))
    )
    torch.load(files[0], weights_only=True)  # loadable without trusting pickled code
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))


def test_rng_round_trip():
    state = capture_rng()
    want = (random.random(), np.random.rand(), torch.rand(2))
    random.random(), np.random.rand(), torch.rand(5)
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    restore_rng(torch.load(buf, weights_only=True))
    got = (random.random(), np.random.rand(), torch.rand(2))
    assert got[0] == want[0] and got[1] == want[1] and torch.equal(got[2], want[2])


def test_truncated_checkpoint_falls_back_when_loading_a_directory(tmp_path):
    save_checkpoint(tmp_path, 1, _state(1))
    last = save_checkpoint(tmp_path, 2, _state(2))
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])  # e.g. a copy cut short
    with pytest.warns(UserWarning, match="ckpt_00000002.pt.*corrupted"):
        state, path = load_checkpoint(tmp_path)
    assert state["step"] == 1 and path.name == "ckpt_00000001.pt"
    with pytest.raises(ValueError, match=r"ckpt_00000002.pt.*is corrupted.*use .*ckpt_00000001"):
        load_checkpoint(last)


def test_crash_while_writing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 5, _state(5))
    real_save = torch.save

    def half_then_crash(obj, f):
        buf = io.BytesIO()
        real_save(obj, buf)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(ck.torch, "save", half_then_crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 6, _state(6))
    monkeypatch.undo()
    d = tmp_path / "checkpoints"
    assert sorted(p.name for p in d.iterdir()) == ["ckpt_00000005.pt", "latest"]  # no partial
    state, path = load_checkpoint(tmp_path)
    assert state["step"] == 5 and path.name == "ckpt_00000005.pt"


def test_a_kill_just_after_the_file_lands_resumes_from_it(tmp_path, monkeypatch):
    """The "latest" pointer was written after the checkpoint: a kill in between resumed from
    the step before, a whole ckpt_every earlier. The pointer now goes first."""
    save_checkpoint(tmp_path, 2, _state(2))
    real = ck.atomic_write

    def land_then_die(path, write, mode="wb"):
        out = real(path, write, mode)
        if path.name.startswith("ckpt_"):
            raise KeyboardInterrupt("killed")
        return out

    monkeypatch.setattr(ck, "atomic_write", land_then_die)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 3, _state(3), keep=5)
    monkeypatch.undo()
    assert load_checkpoint(tmp_path)[0]["step"] == 3


def test_latest_outranks_a_higher_step_of_an_abandoned_branch(tmp_path, monkeypatch):
    """Resumed in place from ckpt 2 while ckpt 4 exists (a branch abandoned): the new step 3 is
    the run's newest; and a kill while step 3 is written leaves the run at 2, not at 4."""
    (tmp_path / "checkpoints").mkdir()
    for s in (2, 4):
        torch.save(_state(s), tmp_path / "checkpoints" / f"ckpt_{s:08d}.pt")
    (tmp_path / "checkpoints" / "latest").write_text("ckpt_00000002.pt\n")  # resumed from 2

    def killed(obj, f):
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(ck.torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 3, _state(3), keep=5)
    monkeypatch.undo()
    assert load_checkpoint(tmp_path)[0]["step"] == 2
    with pytest.warns(UserWarning, match="supersedes the later ckpt_00000004.pt"):
        save_checkpoint(tmp_path, 3, _state(3), keep=5)
    assert load_checkpoint(tmp_path)[0]["step"] == 3


def test_pruning_never_removes_the_checkpoint_just_written(tmp_path):
    """Resumed in place from ckpt 2 while 4 and 6 exist (an abandoned branch), with a smaller
    keep: pruning by step number removed the new ckpt 3 (and 2) and kept the abandoned ones,
    so "latest" named a missing file and the next resume took step 6. The new checkpoint
    supersedes the later ones; the older ones are pruned around it."""
    for step in (2, 4, 6):
        save_checkpoint(tmp_path, step, _state(step), keep=3)
    with pytest.warns(UserWarning, match="ckpt_00000003.pt supersedes the later ckpt_00000004.pt, "
                      "ckpt_00000006.pt"):  # fmt: skip
        save_checkpoint(tmp_path, 3, _state(3), keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt_00000002.pt", "ckpt_00000003.pt"]
    assert load_checkpoint(tmp_path)[0]["step"] == 3
    save_checkpoint(tmp_path, 5, _state(5), keep=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt_00000005.pt"]


def test_the_next_save_removes_what_a_killed_save_left(tmp_path):
    """A process killed inside torch.save cannot clean up (no exception runs): its full-size
    temp file would stay for good; the next save deletes it."""
    save_checkpoint(tmp_path, 5, _state(5))
    d = tmp_path / "checkpoints"
    (d / ".ckpt_00000006.pt.abc123.tmp").write_bytes(b"x" * 1000)
    (d / ".latest.x1.tmp").write_text("ckpt")  # and the pointer's, the run's logs' and config's
    for name in (".metrics.csv.x2.tmp", ".config.yaml.x3.tmp"):
        (tmp_path / name).write_text("partial")
    (tmp_path / ".eval.json.x4.tmp").write_text("another tool's, being written")
    save_checkpoint(tmp_path, 7, _state(7))
    assert sorted(p.name for p in d.iterdir()) == ["ckpt_00000005.pt", "ckpt_00000007.pt", "latest"]
    assert [p.name for p in tmp_path.glob(".*.tmp")] == [".eval.json.x4.tmp"]


def test_not_a_checkpoint_and_missing(tmp_path):
    torch.save({"hello": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an antdiff training checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    # a YAML / text file: was "holds Python objects" or an IndexError / KeyError traceback
    for name, text in (("config.yaml", "model:\n  name: x\n"), ("a.yaml", "a: 1\n"),
                       ("notes.txt", "hello world\n")):  # fmt: skip
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match="is not a torch checkpoint"):
            load_checkpoint(tmp_path / name)
    # a text file named like a checkpoint inside a run folder is skipped like a corrupted one
    save_checkpoint(tmp_path / "run", 1, _state(1), keep=5)
    (tmp_path / "run" / "checkpoints" / "ckpt_00000002.pt").write_text("a: 1\n")
    (tmp_path / "run" / "checkpoints" / "latest").write_text("ckpt_00000002.pt\n")
    with pytest.warns(UserWarning, match="ckpt_00000002.pt.*corrupted"):
        assert load_checkpoint(tmp_path / "run")[0]["step"] == 1
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoints"):
        load_checkpoint(tmp_path / "empty")


def test_model_mismatch_says_which_model_the_checkpoint_holds():
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(4, 2)
    ckpt = {"config": {"model": {"name": "adm-tiny", "overrides": {"dropout": 0.1}}}}
    with pytest.raises(ValueError, match=r"model 'adm-tiny'.*shape mismatches.*weight"):
        load_model_state(b, a.state_dict(), ckpt)
    with pytest.raises(ValueError, match="missing keys"):
        load_model_state(torch.nn.Sequential(a), a.state_dict(), ckpt)
    c = torch.nn.Linear(3, 2)
    load_model_state(c, a.state_dict(), ckpt)
    assert torch.equal(c.weight, a.weight)


def test_written_files_honour_the_umask(tmp_path):
    """Files come out as a plain open() would make them (0666 minus the umask), not as the
    private temp file (0600): runs on a shared machine stay readable by the group."""
    import os
    import stat

    from antdiff import utils

    for umask in (0o022, 0o077):
        old = os.umask(umask)
        try:
            saved, utils._UMASK = utils._UMASK, utils._read_umask()
            try:
                path = utils.atomic_write_text(tmp_path / f"f{umask:o}.txt", "x")
            finally:
                utils._UMASK = saved
        finally:
            os.umask(old)
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def test_a_mount_that_refuses_chmod_still_gets_its_files(tmp_path, monkeypatch):
    import os

    from antdiff import utils

    def refuse(fd, mode):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "fchmod", refuse)
    path = utils.atomic_write_text(tmp_path / "a.txt", "kept")
    assert path.read_text() == "kept" and not list(tmp_path.glob(".*.tmp"))


def test_checkpoints_that_set_image_size_for_latents_still_load(tmp_path):
    """Before image_size was refused for latents (it resized nothing), configs could carry it,
    and other settings the run did not read: such checkpoints sample and resume with a warning
    instead of failing validation."""
    import warnings

    from antdiff.config import load_config
    from antdiff.evaluate import load_for_sampling
    from antdiff.train import train

    torch.save(torch.randn(24, 4, 4, 4), tmp_path / "z.pt")
    args = ["--data.source", "latents", "--data.path", str(tmp_path / "z.pt"),
            "--data.channels", "4", "--data.class_conditional", "false",
            "--sample.cfg_scale", "1.0", "--train.steps", "2", "--train.batch_size", "10",
            "--train.ckpt_every", "2", "--train.progress", "false", "--sample.n", "2",
            "--sample.steps", "2", "--train.out_dir", str(tmp_path / "run")]  # fmt: skip
    train(load_config("digits_dit", args))
    (path,) = [p for p in (tmp_path / "run").rglob("*.pt")]
    state = torch.load(path, weights_only=False)
    del state["crc32"]  # older versions wrote no checksum (and an edit must drop it)
    state["config"]["data"]["image_size"] = 8  # as an older version saved it
    state["config"]["data"]["num_classes"] = 3  # also ignored then (not class-conditional)
    state["config"]["ant"]["affinity"] = "a.npy"  # also ignored then (SNR clusters)
    torch.save(state, path)
    with pytest.warns(UserWarning, match=r"data.image_size=8, data.num_classes=3, ant.affinity="
                      r"'a.npy', which the run did not read: ignored"):  # fmt: skip
        loaded = load_for_sampling(tmp_path / "run")
    assert loaded.data.shape == (4, 4, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = train(load_config("digits_dit", [*args[:-4], "--train.steps", "3",
                                             "--train.out_dir", str(tmp_path / "run")]),
                  resume=True)  # fmt: skip
    assert s["step"] == 3


def test_bytes_damaged_inside_a_checkpoint_are_detected(tmp_path):
    """4 KiB zeroed in the middle of the newest file (inside a tensor's bytes, which torch's zip
    reader does not check): it loaded silently with the damaged values."""
    for s in (10, 20):
        save_checkpoint(tmp_path, s, {**_state(s), "big": torch.randn(2**18)}, keep=2)
    newest = list_checkpoints(tmp_path)[-1]
    size = newest.stat().st_size
    with open(newest, "r+b") as f:
        f.seek(size // 2)
        f.write(bytes(4096))
    with pytest.warns(UserWarning, match=r"ckpt_00000020.pt' is corrupted \(its contents do not "
                      r"match the checksum saved with them: damaged, or edited after saving "
                      r"\(an edit must delete the 'crc32' entry\)\); falling back"):  # fmt: skip
        state, path = load_checkpoint(tmp_path)
    assert state["step"] == 10 and path.name == "ckpt_00000010.pt"
    assert "crc32" not in state  # the loader's own key stays out of the state it returns
    with pytest.raises(ValueError, match=r"ckpt_00000020.pt' is corrupted .*damaged.*use "
                       r".*ckpt_00000010.pt' instead"):  # fmt: skip
        load_checkpoint(newest)
    # a checkpoint saved without the checksum (an earlier antdiff) still loads
    old = dict(state, step=30)
    torch.save(old, tmp_path / "checkpoints" / "ckpt_00000030.pt")
    assert load_checkpoint(tmp_path / "checkpoints" / "ckpt_00000030.pt")[0]["step"] == 30


def test_the_checksum_holds_for_every_kind_of_content(tmp_path):
    """A set's repr follows its iteration order, which a reload may change (the state was then
    taken for damaged), and a conjugate view could not be hashed (its save raised)."""
    z = torch.randn(3, dtype=torch.complex64)
    odd = {"names": {f"cluster_{i}" for i in range(40)}, "conj": z.conj(), "neg": z.conj().imag,
           "bf16": torch.randn(4, dtype=torch.bfloat16), "view": torch.randn(4, 6)[:, 1::2],
           "none": None, "np": np.float64(0.5), "empty": torch.zeros(0)}  # fmt: skip
    crc = ck.content_crc(odd)
    shuffled = {**odd, "names": set(sorted(odd["names"], reverse=True))}
    assert ck.content_crc(shuffled) == crc
    resolved = {**odd, "conj": z.conj().resolve_conj(), "neg": odd["neg"].resolve_neg()}
    assert ck.content_crc(resolved) == crc
    assert ck.content_crc({**odd, "np": np.float64(0.25)}) != crc


def test_a_real_write_error_inside_torch_save_names_itself(tmp_path):
    """The file system's error raised inside torch.save's zip writer, which then fails again
    while closing: the OSError is the RuntimeError's __context__ (not its __cause__), and the
    user got torch's 'enforce fail ... unexpected pos' traceback. A file-size limit
    (RLIMIT_FSIZE, EFBIG) makes the write fail for real, in a child process."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(f"""
        import resource, signal, torch
        from antdiff.checkpoint import FORMAT, save_checkpoint
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        state = {{"format": FORMAT, "step": 10, "w": torch.zeros(8)}}
        save_checkpoint({str(tmp_path)!r}, 10, state)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20))
        try:
            save_checkpoint({str(tmp_path)!r}, 20, {{**state, "step": 20,
                                                    "w": torch.zeros(2**19)}})
        except OSError as e:
            print("OSError", e.errno, e)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    said = out.stdout + out.stderr[-2000:]
    assert "OSError 27 [Errno 27] could not write checkpoint" in out.stdout, said
    assert "(File too large); the last complete checkpoint is ckpt_00000010.pt" in out.stdout
    assert load_checkpoint(tmp_path)[0]["step"] == 10


def _disk_full(obj, f):
    """torch.save on a full disk: torch's own error, with ENOSPC only in the chained cause."""
    import errno

    try:
        raise OSError(errno.ENOSPC, "No space left on device")
    except OSError as e:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos") from e


def test_a_full_disk_names_itself_and_the_last_complete_checkpoint(tmp_path, monkeypatch):
    """A write that ran out of space surfaced as torch's 'enforce fail at
    inline_container.cc ... unexpected pos' with ENOSPC only in the chained exception."""
    import errno

    save_checkpoint(tmp_path, 10, _state(10), keep=3)
    real = torch.save

    monkeypatch.setattr(ck.torch, "save", _disk_full)
    with pytest.raises(OSError, match=r"could not write checkpoint .*ckpt_00000020.pt \(No space "
                       r"left on device\); the last complete checkpoint is ckpt_00000010.pt") as e:
        save_checkpoint(tmp_path, 20, _state(20), keep=3)
    assert e.value.errno == errno.ENOSPC
    monkeypatch.setattr(ck.torch, "save", real)
    state, path = load_checkpoint(tmp_path)  # the pointer names the missing 20: 10 loads
    assert state["step"] == 10
    # an error that is not the file system's is not renamed
    monkeypatch.setattr(ck.torch, "save", lambda obj, f: (_ for _ in ()).throw(RuntimeError("x")))
    with pytest.raises(RuntimeError, match="^x$"):
        save_checkpoint(tmp_path, 30, _state(30), keep=3)


def test_the_latest_pointer_stands_for_the_newest_complete_checkpoint(tmp_path):
    """<run>/checkpoints/latest, the text file naming the newest checkpoint, was "not a torch
    checkpoint"; given as a checkpoint it loads what it names (the run folder's newest complete
    one: the previous one when the file it names is missing)."""
    for s in (1, 2):
        save_checkpoint(tmp_path, s, _state(s), keep=5)
    latest = tmp_path / "checkpoints" / "latest"
    state, path = load_checkpoint(latest)
    assert state["step"] == 2 and path == tmp_path / "checkpoints" / "ckpt_00000002.pt"
    path.unlink()  # a save killed before its file landed: the pointer names a missing file
    state, path = load_checkpoint(latest)
    assert state["step"] == 1 and path.name == "ckpt_00000001.pt"
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "latest").write_text("hello\n")  # a "latest" outside a run
    with pytest.raises(FileNotFoundError, match="pointer to its newest one .* no checkpoints"):
        load_checkpoint(tmp_path / "notes" / "latest")


def test_a_full_disk_names_the_newest_complete_checkpoint_and_the_fix(tmp_path, monkeypatch):
    """With several complete checkpoints the message names the newest (the one a --resume
    takes), says what to do, and keeps torch's error as its cause."""

    for s in (10, 20):
        save_checkpoint(tmp_path, s, _state(s), keep=3)

    monkeypatch.setattr(ck.torch, "save", _disk_full)
    with pytest.raises(OSError, match=r"ckpt_00000030.pt \(No space left on device\); the last "
                       r"complete checkpoint is ckpt_00000020.pt: free the space \(or fix the "
                       r"folder\) and continue with --resume$") as e:  # fmt: skip
        save_checkpoint(tmp_path, 30, _state(30), keep=3)
    assert isinstance(e.value.__cause__, RuntimeError)
    assert "unexpected pos" in str(e.value.__cause__)


def test_a_write_error_raised_from_an_os_error_outside_a_handler_names_itself(
    tmp_path, monkeypatch
):
    """``raise RuntimeError(...) from oserror`` outside an ``except`` block sets __cause__ only
    (no __context__): the OSError is still found."""
    import errno

    save_checkpoint(tmp_path, 1, _state(1))
    cause = OSError(errno.EDQUOT, "Disk quota exceeded")

    def quota(obj, f):
        raise RuntimeError("writer failed") from cause

    monkeypatch.setattr(ck.torch, "save", quota)
    said = (r"could not write checkpoint .*ckpt_00000002.pt \(Disk quota exceeded\); the last "
            r"complete checkpoint is ckpt_00000001.pt")  # fmt: skip
    with pytest.raises(OSError, match=said) as e:
        save_checkpoint(tmp_path, 2, _state(2))
    assert e.value.errno == errno.EDQUOT


def test_an_exception_chain_with_a_cycle_is_reraised_not_looped_on(tmp_path, monkeypatch):
    """Exceptions raised from each other (a retried write) form a cycle of __cause__ links:
    the search for an OSError behind the error must stop, and the error is re-raised as is."""
    import signal

    a, b = RuntimeError("first"), RuntimeError("second")
    a.__cause__, b.__cause__ = b, a

    def fails(obj, f):
        raise a

    def too_slow(signum, frame):
        raise TimeoutError("the exception chain was walked forever")

    monkeypatch.setattr(ck.torch, "save", fails)
    old = signal.signal(signal.SIGALRM, too_slow)
    signal.setitimer(signal.ITIMER_REAL, 2.0)
    try:
        with pytest.raises(RuntimeError, match="^first$"):
            save_checkpoint(tmp_path, 1, _state(1))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def test_pruning_keeps_every_checkpoint_while_fewer_than_keep(tmp_path):
    """Fewer older checkpoints than keep - 1: nothing is pruned (a negative count of files to
    remove must not slice from the end of the list)."""
    for s in (1, 2, 3, 4):
        save_checkpoint(tmp_path, s, _state(s), keep=5)
        assert [p.name for p in list_checkpoints(tmp_path)] == [
            f"ckpt_{i:08d}.pt" for i in range(1, s + 1)
        ]


def test_save_checkpoint_keeps_two_by_default(tmp_path):
    for s in (1, 2, 3):
        save_checkpoint(tmp_path, s, _state(s))
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt_00000002.pt", "ckpt_00000003.pt"]


def test_checkpoints_are_ordered_by_step_number_past_eight_digits(tmp_path):
    d = tmp_path / "checkpoints"
    d.mkdir()
    for name in ("ckpt_100000000.pt", "ckpt_99999999.pt", "ckpt_00000005.pt"):
        (d / name).write_bytes(b"")
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "ckpt_00000005.pt", "ckpt_99999999.pt", "ckpt_100000000.pt"]  # fmt: skip


def test_the_checksum_tells_apart_what_a_damaged_checkpoint_could_change():
    """Same bytes under another shape or dtype, a renamed key, an entry moved into a nested
    dict or list, and a change in the middle of a big tensor inside a tuple (whose repr elides
    it) all change the checksum."""
    x = torch.arange(12, dtype=torch.float32)
    base = ck.content_crc({"w": x})
    assert ck.content_crc({"w": x.reshape(3, 4)}) != base
    assert ck.content_crc({"w": x.view(torch.int32)}) != base
    assert ck.content_crc({"v": x}) != base
    assert ck.content_crc({"a": {}, "b": 1}) != ck.content_crc({"a": {"b": 1}})
    assert ck.content_crc([[], 1]) != ck.content_crc([[1]])
    big = torch.zeros(4000)
    changed = big.clone()
    changed[2000] = 7.0
    assert ck.content_crc({"t": (big,)}) != ck.content_crc({"t": (changed,)})


def test_the_checksum_of_a_negative_view_scalar(tmp_path):
    """A 0-d negative view (the imaginary part of a conjugated complex scalar) is contiguous
    already: its values must still be resolved before its bytes are read."""
    z = torch.tensor(1.5 - 2.0j, dtype=torch.complex64)
    neg = z.conj().imag
    assert ck.content_crc(neg) == ck.content_crc(neg.resolve_neg())
    save_checkpoint(tmp_path, 1, {**_state(1), "neg": neg})
    assert load_checkpoint(tmp_path)[0]["neg"].item() == 2.0


def test_a_checkpoint_in_the_legacy_pickle_format_loads(tmp_path):
    """torch.save's format before its zip container (a pickle) is still a torch file."""
    state = _state(7)
    path = tmp_path / "legacy.pt"
    torch.save({**state, "crc32": ck.content_crc(state)}, path,
               _use_new_zipfile_serialization=False)  # fmt: skip
    loaded, got = load_checkpoint(path)
    assert got == path and loaded["step"] == 7 and torch.equal(loaded["w"], state["w"])


@pytest.mark.parametrize("cut", [18, 120, 201, -40])
def test_a_legacy_checkpoint_cut_short_falls_back_to_the_previous_one(tmp_path, cut):
    """A file in torch's older pickle format cut short raised struct.error (not caught) or read
    as Python objects ("not written by antdiff train", which stopped the fallback): it is
    damage, and the previous checkpoint loads, as for the zip format."""
    run = tmp_path / "run"
    save_checkpoint(run, 1, _state(1), keep=5)
    state = _state(2)
    path = run / "checkpoints" / "ckpt_00000002.pt"
    torch.save({**state, "crc32": ck.content_crc(state)}, path,
               _use_new_zipfile_serialization=False)  # fmt: skip
    (run / "checkpoints" / "latest").write_text(path.name + "\n")
    path.write_bytes(path.read_bytes()[:cut])
    with pytest.warns(UserWarning, match="ckpt_00000002.pt.*corrupted"):
        loaded, got = load_checkpoint(run)
    assert got.name == "ckpt_00000001.pt" and loaded["step"] == 1


def test_a_checkpoint_file_named_latest_is_loaded_not_taken_for_the_pointer(tmp_path):
    src = save_checkpoint(tmp_path / "run", 3, _state(3))
    (tmp_path / "copy").mkdir()
    copy = tmp_path / "copy" / "latest"
    copy.write_bytes(src.read_bytes())
    state, path = load_checkpoint(copy)
    assert state["step"] == 3 and path == copy


def test_a_text_file_named_like_a_checkpoint_is_named_as_not_a_torch_file(tmp_path):
    save_checkpoint(tmp_path, 1, _state(1), keep=5)
    (tmp_path / "checkpoints" / "ckpt_00000002.pt").write_text("a: 1\n")
    (tmp_path / "checkpoints" / "latest").write_text("ckpt_00000002.pt\n")
    with pytest.warns(UserWarning, match=r"ckpt_00000002.pt' is corrupted \(not a torch.save "
                      r"file\); falling back"):  # fmt: skip
        assert load_checkpoint(tmp_path)[0]["step"] == 1


def test_a_checkpoint_holding_python_objects_says_it_is_not_antdiff_s(tmp_path):
    from fractions import Fraction

    torch.save({**_state(1), "lr": Fraction(1, 3)}, tmp_path / "pickled.pt")
    with pytest.raises(ValueError, match="holds Python objects that weights-only loading "
                       "refuses; it was not written by antdiff train"):  # fmt: skip
        load_checkpoint(tmp_path / "pickled.pt")


def test_a_reader_that_runs_out_of_input_counts_as_corruption(tmp_path, monkeypatch):
    """EOFError from torch.load (a cut-short pickle) is damage: the previous one loads."""
    save_checkpoint(tmp_path, 1, _state(1))
    save_checkpoint(tmp_path, 2, _state(2))
    real = torch.load

    def cut_short(f, *args, **kwargs):
        if str(f).endswith("ckpt_00000002.pt"):
            raise EOFError("Ran out of input")
        return real(f, *args, **kwargs)

    monkeypatch.setattr(ck.torch, "load", cut_short)
    with pytest.warns(UserWarning, match=r"ckpt_00000002.pt' is corrupted \(Ran out of input\)"):
        state, path = load_checkpoint(tmp_path)
    assert state["step"] == 1 and path.name == "ckpt_00000001.pt"


def test_a_torch_file_that_is_not_a_dict_is_not_an_antdiff_checkpoint(tmp_path):
    for name, obj in (("tensor.pt", torch.zeros(2)), ("list.pt", [1, 2])):
        torch.save(obj, tmp_path / name)
        with pytest.raises(ValueError, match="is not an antdiff training checkpoint"):
            load_checkpoint(tmp_path / name)


def test_the_fallback_takes_the_newest_complete_checkpoint(tmp_path):
    """Newest first: without the pointer the highest step loads, and when the newest is damaged
    the one just before it (not the oldest)."""
    for s in (1, 2, 3):
        save_checkpoint(tmp_path, s, _state(s), keep=5)
    (tmp_path / "checkpoints" / "latest").unlink()
    assert load_checkpoint(tmp_path)[0]["step"] == 3
    last = list_checkpoints(tmp_path)[-1]
    last.write_bytes(last.read_bytes()[:100])
    with pytest.warns(UserWarning, match="ckpt_00000003.pt.*corrupted"):
        assert load_checkpoint(tmp_path)[0]["step"] == 2


def test_a_higher_step_than_the_missing_pointed_one_is_the_last_resort(tmp_path):
    """The pointer names a file that never landed: the lower steps go first, the higher ones
    (an abandoned branch's) stay candidates after them."""
    d = tmp_path / "checkpoints"
    d.mkdir()
    for s in (2, 4):
        torch.save(_state(s), d / f"ckpt_{s:08d}.pt")
    (d / "ckpt_00000002.pt").write_bytes(b"PK\x03\x04 cut short")
    (d / "latest").write_text("ckpt_00000003.pt\n")
    with pytest.warns(UserWarning, match="ckpt_00000002.pt.*corrupted"):
        state, path = load_checkpoint(tmp_path)
    assert state["step"] == 4 and path.name == "ckpt_00000004.pt"


def test_a_run_whose_every_checkpoint_is_corrupted_lists_them(tmp_path):
    for s in (1, 2):
        save_checkpoint(tmp_path, s, _state(s), keep=5)
    for p in list_checkpoints(tmp_path):
        p.write_bytes(p.read_bytes()[:100])
    every = r"every checkpoint in .* is corrupted: \[.*ckpt_00000002.pt.*ckpt_00000001.pt.*\]"
    with pytest.warns(UserWarning, match="corrupted"), pytest.raises(ValueError, match=every):
        load_checkpoint(tmp_path)


def test_an_empty_checkpoint_file_is_corrupted_and_names_the_previous_one(tmp_path):
    """A file left empty (a copy onto a full disk) is a damaged checkpoint, not some other file."""
    save_checkpoint(tmp_path, 1, _state(1))
    last = save_checkpoint(tmp_path, 2, _state(2))
    last.write_bytes(b"")
    with pytest.raises(ValueError, match=r"ckpt_00000002.pt' is corrupted .*use "
                       r".*ckpt_00000001.pt' instead"):  # fmt: skip
        load_checkpoint(last)


def test_the_hint_names_a_checkpoint_that_loads(tmp_path):
    """Loading a damaged file directly: the checkpoint suggested instead is one that loads,
    past a damaged one and a torch file that is no antdiff checkpoint."""
    for s in (1, 2, 3, 4):
        save_checkpoint(tmp_path, s, _state(s), keep=5)
    files = list_checkpoints(tmp_path)
    for p in (files[3], files[2]):
        p.write_bytes(p.read_bytes()[:100])
    torch.save({"hello": torch.zeros(1)}, files[1])  # ckpt 2: some other program's file
    with pytest.raises(ValueError, match=r"ckpt_00000004.pt' is corrupted .*use "
                       r".*ckpt_00000001.pt' instead"):  # fmt: skip
        load_checkpoint(files[3])


def test_rng_round_trip_keeps_the_cached_gaussians():
    """Python's random.gauss and numpy's legacy standard_normal hold the second value of a pair
    for the next call: the restored state gives that same value."""
    random.gauss(0.0, 1.0), np.random.standard_normal()  # each now holds a cached value
    state = capture_rng()
    want = (random.gauss(0.0, 1.0), np.random.standard_normal())
    random.gauss(0.0, 1.0), np.random.standard_normal(5)
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    restore_rng(torch.load(buf, weights_only=True))
    assert (random.gauss(0.0, 1.0), np.random.standard_normal()) == want


def test_model_mismatch_names_unexpected_keys_of_the_checkpoint():
    a = torch.nn.Linear(3, 2)
    ckpt = {"config": {"model": {"name": "adm-tiny", "overrides": {}}}}
    sd = {**a.state_dict(), "extra.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"unexpected keys \['extra.weight'\]"):
        load_model_state(torch.nn.Linear(3, 2), sd, ckpt)


def _resume_cfg(out_dir, *extra):
    from antdiff.config import load_config

    return load_config("digits_adm", ["--train.out_dir", str(out_dir), *extra])


def test_resume_with_nothing_in_out_dir_says_how_to_go_on(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"--resume: .*\(train.out_dir\): nothing to "
                       r"resume there; drop --resume to start a fresh run, or pass --resume "
                       r"PATH of a checkpoint"):  # fmt: skip
        ck.resume_checkpoint(_resume_cfg(tmp_path / "run"), True, allow_change=False)


def test_resume_with_an_allowed_config_change_logs_it(tmp_path, caplog):
    cfg = _resume_cfg(tmp_path, "--data.random_flip", "false")  # as a run saves it: resolved
    saved = save_checkpoint(tmp_path, 2, {"format": FORMAT, "step": 2, "config": cfg.to_dict()})
    with caplog.at_level("WARNING", logger="antdiff.train"):
        state, path = ck.resume_checkpoint(_resume_cfg(tmp_path, "--train.lr", "0.5"), True,
                                           allow_change=True)  # fmt: skip
    assert state["step"] == 2 and path == saved
    said = "resuming with a changed config (--allow-config-change): train.lr: 0.0002 -> 0.5"
    assert said in caplog.text

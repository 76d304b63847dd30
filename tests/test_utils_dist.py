"""Direct tests of antdiff.utils (atomic writes, path / device checks, seeding, npy loading,
eval_mode) and of train_dist's helpers that need no second process."""

from __future__ import annotations

import datetime
import os
import random
import stat
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from antdiff import train_dist, utils
from antdiff.train_dist import DistContext, QuietLogger, init_distributed, rank_device


# ---------------------------------------------------------------- atomic_write
def _spy_fsync(monkeypatch):
    """Record (kind, size) for every os.fsync: "file" with its size on disk, or "dir"."""
    seen = []
    real = os.fsync

    def spy(fd):
        st = os.fstat(fd)
        seen.append(("dir", 0) if stat.S_ISDIR(st.st_mode) else ("file", st.st_size))
        return real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    return seen


def test_atomic_write_fsyncs_the_whole_file_then_its_folder(tmp_path, monkeypatch):
    seen = _spy_fsync(monkeypatch)
    out = utils.atomic_write(tmp_path / "a.bin", lambda f: f.write(b"0123456789"))
    assert out == tmp_path / "a.bin" and isinstance(out, Path)
    assert out.read_bytes() == b"0123456789"
    # the data is flushed before its fsync (else the fsync saves an empty file), and the
    # folder is fsynced after the rename
    assert seen == [("file", 10), ("dir", 0)]


def test_atomic_write_closes_the_folder_handle(tmp_path):
    fds = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
    if fds is None:
        pytest.skip("no /proc/self/fd")
    for i in range(5):
        utils.atomic_write_text(tmp_path / f"f{i}.txt", "x")
    assert len(os.listdir("/proc/self/fd")) == fds


def test_atomic_write_tolerates_a_folder_that_cannot_be_opened_or_fsynced(tmp_path, monkeypatch):
    real_fsync, real_open = os.fsync, os.open

    def fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(22, "Invalid argument")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    assert utils.atomic_write_text(tmp_path / "a.txt", "one").read_text() == "one"

    def no_dir_open(path, flags, *a, **k):
        if os.path.isdir(path):
            raise OSError(13, "Permission denied")
        return real_open(path, flags, *a, **k)

    monkeypatch.setattr(os, "open", no_dir_open)
    assert utils.atomic_write_text(tmp_path / "b.txt", "two").read_text() == "two"


def test_atomic_write_default_mode_is_binary_and_it_makes_the_folders(tmp_path):
    path = tmp_path / "new" / "deeper" / "x.bin"
    assert utils.atomic_write(path, lambda f: f.write(b"\x00\x01")) == path
    assert path.read_bytes() == b"\x00\x01"


def test_the_temp_file_is_hidden_beside_the_target_while_writing(tmp_path):
    seen = []

    def write(f):
        f.write("x")
        seen.extend(p.name for p in tmp_path.iterdir())

    utils.atomic_write(tmp_path / "a.json", write, mode="w")
    assert len(seen) == 1 and seen[0].startswith(".a.json.") and seen[0].endswith(".tmp"), seen
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_a_failing_writer_keeps_the_old_file_and_leaves_no_temp(tmp_path, error):
    path = utils.atomic_write_text(tmp_path / "a.txt", "old")

    def write(f):
        f.write("half")
        raise error

    with pytest.raises(type(error)):
        utils.atomic_write(path, write, mode="w")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_a_long_but_valid_file_name_can_be_written(tmp_path):
    name = "a" * 250 + ".json"  # 255 characters: the usual NAME_MAX
    (tmp_path / name).write_text("old")  # the file system takes the name itself
    assert utils.atomic_write_text(tmp_path / name, "new").read_text() == "new"


def test_read_umask_leaves_the_process_umask_alone():
    old = os.umask(0o077)
    try:
        assert utils._read_umask() == 0o077
        assert os.umask(0o077) == 0o077  # still what it was
    finally:
        os.umask(old)


# ---------------------------------------------------------------- user_stacklevel
def test_user_stacklevel_skips_library_frames_but_stops_at_a_cli_command():
    lib = compile("def lib(f):\n    return f()\n", os.path.join(utils._PACKAGE, "_lib.py"), "exec")
    cmd = compile("def cmd(g, f):\n    return g(f)\n", os.path.join(utils._CLI, "_cmd.py"), "exec")
    ns: dict = {}
    exec(lib, ns)
    exec(cmd, ns)
    # user_stacklevel itself is called from inside the library function
    assert ns["lib"](utils.user_stacklevel) == 2  # lib, then this test's line
    assert ns["cmd"](ns["lib"], utils.user_stacklevel) == 2  # lib, then the command's line
    # a sibling folder whose name merely starts with the package's is the user's code
    plug = compile("def cmd(g, f):\n    return g(f)\n", utils._PACKAGE + "_plugin/x.py", "exec")
    exec(plug, ns)
    assert ns["cmd"](ns["lib"], utils.user_stacklevel) == 2


# ---------------------------------------------------------------- check_output
def test_check_output_rules(tmp_path, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("")
    with pytest.raises(ValueError, match=r"--out '.*afile' is a file; give a folder"):
        utils.check_output(afile, "--out", folder=True)
    with pytest.raises(ValueError, match=r"--json '.*' is a folder; give a file name"):
        utils.check_output(tmp_path, "--json", folder=False)
    with pytest.raises(ValueError, match=r"'.*afile' is a file, not a folder"):
        utils.check_output(afile / "x" / "y", "--out", folder=True)
    # an existing file may be overwritten; a folder may already exist; nothing is created
    assert utils.check_output(afile, "--json", folder=False) == afile
    assert utils.check_output(str(tmp_path), "--out", folder=True) == tmp_path
    assert utils.check_output(tmp_path / "a" / "b", "--out", folder=True) == tmp_path / "a" / "b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]
    # the permission is asked of the nearest existing folder: write and enter
    asked = []
    monkeypatch.setattr(os, "access", lambda p, mode: asked.append((Path(p), mode)) or False)
    with pytest.raises(ValueError, match=r"--out '.*sub': no permission to write in '.*'"):
        utils.check_output(tmp_path / "sub", "--out", folder=True)
    with pytest.raises(ValueError, match="no permission to write in"):
        utils.check_output(tmp_path, "--out", folder=True)
    assert asked == [(tmp_path, os.W_OK | os.X_OK)] * 2


# ---------------------------------------------------------------- check_device
def test_check_device_refuses_names_torch_does_not_know():
    with pytest.raises(ValueError, match="--device 'gpu0' is not a device antdiff runs on"):
        utils.check_device("gpu0", "--device")
    assert utils.check_device("cpu", "--device") == torch.device("cpu")


def test_check_device_counts_the_cuda_devices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert utils.check_device("cuda:1", "--device") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match=r"--device cuda:2: this machine has 2 CUDA device\(s\), "
                                         r"cuda:0 \.\. cuda:1$"):
        utils.check_device("cuda:2", "--device")


# ---------------------------------------------------------------- git_describe
def test_git_describe_asks_git_and_falls_back(monkeypatch):
    calls = []

    def fake_run(args, **kw):
        calls.append((args, kw))
        return subprocess.CompletedProcess(args, 0, stdout="abc1234-dirty\n", stderr="")

    monkeypatch.setattr(subprocess, "run", fake_run)
    assert utils.git_describe() == "abc1234-dirty"
    args, kw = calls[0]
    assert args[:2] == ["git", "describe"] and "--dirty" in args and "--always" in args
    assert Path(kw["cwd"]) == Path(utils.__file__).resolve().parent

    def not_a_repo(args, **kw):  # git's answer outside a checkout: exit 128
        if kw.get("check"):
            raise subprocess.CalledProcessError(128, args)
        return subprocess.CompletedProcess(args, 128, stdout="", stderr="fatal")

    monkeypatch.setattr(subprocess, "run", not_a_repo)
    monkeypatch.delenv("ANT_GIT_SHA", raising=False)
    assert utils.git_describe() == "unknown"
    monkeypatch.setenv("ANT_GIT_SHA", "f00dfee")
    assert utils.git_describe() == "f00dfee"


# ---------------------------------------------------------------- seed_everything
@pytest.mark.parametrize("seed", [5, 2**40 + 5])
def test_seed_everything_seeds_all_three_generators(seed):
    def draw():
        utils.seed_everything(seed)
        return random.random(), np.random.rand(), torch.rand(1).item()

    a = draw()
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    assert draw() == a
    random.seed(seed), np.random.seed(seed % 2**32), torch.manual_seed(seed)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


# ---------------------------------------------------------------- available_host_bytes
def test_available_host_bytes_falls_back_to_free_pages(monkeypatch):
    def unreadable(self, *a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_text", unreadable)
    monkeypatch.setattr(os, "sysconf", {"SC_AVPHYS_PAGES": 7, "SC_PHYS_PAGES": 100,
                                        "SC_PAGE_SIZE": 4096}.__getitem__)  # fmt: skip
    assert utils.available_host_bytes() == 7 * 4096


# ---------------------------------------------------------------- load_npy
def test_load_npy_messages_and_kwargs(tmp_path):
    np.save(tmp_path / "ok.npy", np.arange(4.0))
    got = utils.load_npy(tmp_path / "ok.npy", "numbers", mmap_mode="r")
    assert isinstance(got, np.memmap) and got.tolist() == [0, 1, 2, 3]
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="holds pickled Python objects, not numbers") as info:
        utils.load_npy(tmp_path / "obj.npy", "an affinity")
    assert "allow_pickle" not in str(info.value) and "an affinity" in str(info.value)
    assert isinstance(info.value.__cause__, ValueError)  # numpy's own error stays attached
    (tmp_path / "empty.npy").write_bytes(b"")  # a truncated file: numpy raises EOFError
    with pytest.raises(ValueError, match=r"'.*empty.npy' is not a numeric numpy file \(edges"):
        utils.load_npy(tmp_path / "empty.npy", "edges")
    if os.geteuid() != 0:  # root reads any file
        (tmp_path / "secret.npy").write_bytes((tmp_path / "ok.npy").read_bytes())
        (tmp_path / "secret.npy").chmod(0)
        with pytest.raises(PermissionError):  # the OS's own words, not "numeric"
            utils.load_npy(tmp_path / "secret.npy", "edges")


def test_load_npy_quotes_the_first_line_of_numpys_message_cut_to_160(tmp_path, monkeypatch):
    (tmp_path / "bad.npy").write_bytes(b"\x93NUMPY\x01\x00" + b"\x00" * 4)
    with pytest.raises(ValueError) as info:  # a real header numpy cannot read
        utils.load_npy(tmp_path / "bad.npy", "edges")
    cause = str(info.value.__cause__).strip().splitlines()[0]
    assert str(info.value).endswith(": " + cause[:160])
    for said, quoted in (("  bad header\nsecond line\n", "bad header"), ("y" * 300, "y" * 160)):

        def load(*a, said=said, **k):
            raise ValueError(said)

        monkeypatch.setattr(utils.np, "load", load)
        with pytest.raises(ValueError) as info:
            utils.load_npy(tmp_path / "bad.npy", "edges")
        assert str(info.value).endswith("np.savez): " + quoted), str(info.value)


# ---------------------------------------------------------------- eval_mode
def test_eval_mode_restores_every_submodule_and_ignores_functions():
    outer = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    outer.train()
    outer[1].eval()  # a frozen part kept in eval
    other = torch.nn.Dropout()
    other.eval()

    def fn(x):
        return x

    with utils.eval_mode(outer, fn, other):
        assert not any(m.training for m in outer.modules()) and not other.training
    assert [m.training for m in outer.modules()] == [True, True, False]
    assert not other.training
    with pytest.raises(RuntimeError), utils.eval_mode(outer):
        raise RuntimeError("boom")
    assert [m.training for m in outer.modules()] == [True, True, False]


# ---------------------------------------------------------------- train_dist, no process group
def _ctx(rank: int, world: int, owns: bool = False) -> DistContext:
    return DistContext(rank, world, rank, torch.device("cpu"), owns_group=owns)


def test_only_rank_0_is_main():
    assert [_ctx(r, 3).is_main for r in range(3)] == [True, False, False]


def test_batch_suggestions():
    with pytest.raises(ValueError, match=r"batch_size=3 .*\(4\); use e.g. 4 or 8$"):
        _ctx(0, 4).check_batch(3)
    with pytest.raises(ValueError, match=r"micro_batch=6 .*\(4\); use e.g. 4 or 8$"):
        _ctx(0, 4).check_batch(48, 6)
    with pytest.raises(ValueError, match=r"micro_batch=22 .*\(4\); use e.g. 16 or 24$"):
        _ctx(0, 4).check_batch(48, 22)
    with pytest.raises(ValueError, match=r"micro_batch=2 .*\(4\); use e.g. 4 or 8$"):
        _ctx(0, 4).check_batch(48, 2)
    _ctx(0, 4).check_batch(48, 0)  # no micro-batching


def test_bounds_tile_the_batch():
    assert [_ctx(r, 4).bounds(12) for r in range(4)] == [(0, 3), (3, 6), (6, 9), (9, 12)]


def test_model_rng_seed_is_fixed_and_fits_any_seed():
    with torch.random.fork_rng(devices=[]):
        _ctx(1, 2).seed_model_rng(3, 5)
        a = torch.rand(4)
        torch.manual_seed(((3 * 1_000_003 + 5) * 1_009 + 2) % 2**63)
        assert torch.equal(torch.rand(4), a)
        _ctx(1, 2).seed_model_rng(2**62, 10**9)  # a large train.seed does not overflow


def test_env_int(monkeypatch):
    monkeypatch.delenv("ANT_TEST_INT", raising=False)
    assert train_dist._env_int("ANT_TEST_INT", 7) == 7
    monkeypatch.setenv("ANT_TEST_INT", "3")
    assert train_dist._env_int("ANT_TEST_INT", 7) == 3
    monkeypatch.setenv("ANT_TEST_INT", "two")
    with pytest.raises(ValueError, match="ANT_TEST_INT must be an integer, got 'two'"):
        train_dist._env_int("ANT_TEST_INT", 7)


def test_rank_device_auto_and_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert rank_device("auto", 3) == torch.device("cpu")
    with pytest.raises(ValueError, match="cuda:LOCAL_RANK"):
        rank_device("cuda:0", 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert rank_device("auto", 1) == rank_device("cuda", 1) == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="LOCAL_RANK=2 but only 2 GPUs are visible"):
        rank_device("cuda", 2)


def _fake_group(monkeypatch, initialized: bool, world: int = 2, rank: int = 1):
    calls = []
    monkeypatch.setattr(dist, "is_initialized", lambda: initialized)
    monkeypatch.setattr(dist, "get_world_size", lambda: world)
    monkeypatch.setattr(dist, "get_rank", lambda: rank)
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: calls.append((a, k)))
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))
    return calls


def test_init_distributed_joins_a_group_the_caller_made(monkeypatch):
    calls = _fake_group(monkeypatch, initialized=True, world=3, rank=2)
    monkeypatch.setenv("WORLD_SIZE", "5")  # torchrun's variables do not override the group
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    ctx = init_distributed("cpu")
    assert ctx is not None and (ctx.rank, ctx.world, ctx.local_rank) == (2, 3, 2)
    assert ctx.owns_group is False and calls == []


def test_init_distributed_without_rank_is_rank_0_and_owns_its_group(monkeypatch):
    calls = _fake_group(monkeypatch, initialized=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("ANT_DIST_TIMEOUT", raising=False)
    ctx = init_distributed("cpu")
    assert ctx is not None and (ctx.rank, ctx.local_rank, ctx.owns_group) == (0, 0, True)
    assert calls == [(("gloo",), {"timeout": datetime.timedelta(minutes=30)})]


def test_init_distributed_on_cuda_picks_the_gpu_and_nccl(monkeypatch):
    calls = _fake_group(monkeypatch, initialized=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    ctx = init_distributed("auto")
    assert ctx is not None and ctx.device == torch.device("cuda", 1)
    assert calls[0] == ("set_device", torch.device("cuda", 1)) and calls[1][0] == ("nccl",)


def test_timeout_refuses_nan_with_its_own_message(monkeypatch):
    monkeypatch.setenv("ANT_DIST_TIMEOUT", "nan")
    with pytest.raises(ValueError, match="ANT_DIST_TIMEOUT must be a positive number"):
        train_dist._timeout()
    monkeypatch.setenv("ANT_DIST_TIMEOUT", "0.5")
    assert train_dist._timeout() == datetime.timedelta(seconds=30)


def test_quiet_logger_accepts_anything_and_returns_nothing():
    log = QuietLogger()
    assert log.log(1, loss=2.0) is None and log.close() is None


# ---------------------------------------------------------------- train_dist, a one-process group
@pytest.fixture
def group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0,
                            world_size=1)  # fmt: skip
    try:
        yield
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_wrap_on_cpu_syncs_no_buffers(group):
    ddp = _ctx(0, 2).wrap(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2)))
    assert ddp.device_ids is None
    assert getattr(ddp, "forward_sync_buffers", getattr(ddp, "broadcast_buffers", None)) is False


def test_barrier_and_close_respect_who_owns_the_group(group):
    _ctx(0, 2).barrier()
    _ctx(0, 2, owns=False).close()
    assert dist.is_initialized()  # the caller's group is left to the caller
    _ctx(0, 2, owns=True).close()
    assert not dist.is_initialized()


def test_barrier_waits_on_cpu(group, monkeypatch):
    seen = []
    monkeypatch.setattr(dist, "barrier", lambda *a, **k: seen.append((a, k)))
    _ctx(0, 2).barrier()
    assert seen == [((), {})]
    DistContext(1, 2, 1, torch.device("cuda", 1), owns_group=False).barrier()
    assert seen[1] == ((), {"device_ids": [1]})  # NCCL's barrier on this rank's own GPU


@pytest.mark.parametrize("raw", ["1e20", "inf", "1e-9"])
def test_timeout_too_large_or_too_small_is_a_clear_error(monkeypatch, raw):
    """1e20 escaped as timedelta's OverflowError; 1e-9 rounded to a zero wait (every
    collective timed out at once)."""
    monkeypatch.setenv("ANT_DIST_TIMEOUT", raw)
    with pytest.raises(ValueError, match=r"ANT_DIST_TIMEOUT must be a positive number of minutes "
                       rf"\(from 1 second to about 1e12 minutes\), got '{raw}'"):  # fmt: skip
        train_dist._timeout()

"""Small shared helpers: atomic file writes, seeding, evaluation mode."""

from __future__ import annotations

import contextlib
import os
import random
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

_PACKAGE = os.path.dirname(os.path.abspath(__file__))
_CLI = os.path.join(_PACKAGE, "cli")


def user_stacklevel() -> int:
    """``stacklevel`` for a ``warnings.warn`` in the calling function that names the first frame
    outside antdiff's library code (the user's line; a CLI command's own line)."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None:
        name = os.path.abspath(frame.f_code.co_filename)
        if not name.startswith(_PACKAGE + os.sep) or name.startswith(_CLI + os.sep):
            break
        frame, level = frame.f_back, level + 1
    return level


def _read_umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it: once, at import
    os.umask(mask)
    return mask


_UMASK = _read_umask()


class TrainingDiverged(RuntimeError):
    """A training run whose steps were all non-finite (and skipped) for many steps in a row."""


def atomic_write(path: str | Path, write: Callable[[Any], None], mode: str = "wb") -> Path:
    """Write through ``write(fileobj)`` into a temp file beside ``path``, fsync, then rename.

    A crash at any moment leaves either the old file or the new one, never a partial file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the name cut: mkstemp adds 14 characters, and a 255-character name is valid (NAME_MAX)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:100]}.", suffix=".tmp", dir=path.parent)
    try:  # mkstemp makes 0600; a plain open() would honour the umask
        os.fchmod(fd, 0o666 & ~_UMASK)
    except (AttributeError, OSError):  # no fchmod (Windows) or a mount that refuses chmod
        pass
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)  # the rename itself survives a power loss
    return path


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text), mode="w")


def check_output(path: str | Path, flag: str, *, folder: bool) -> Path:
    """Raise a ValueError now, before hours of work, if ``path`` cannot be written later.

    ``folder``: the path is a folder the command fills (else a file it writes). Checked: a
    folder is not a file, a file is not a folder, and the nearest existing ancestor is a
    writable folder. Nothing is created.
    """
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {str(path)!r} is a file; give a folder for the outputs")
    if not folder and path.is_dir():
        raise ValueError(f"{flag} {str(path)!r} is a folder; give a file name")
    parent = path if folder else path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{flag} {str(path)!r}: {str(parent)!r} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {str(path)!r}: no permission to write in {str(parent)!r}")
    return path


def check_device(name: str, flag: str) -> Any:
    """``torch.device(name)`` for a device antdiff runs on (cpu, cuda, cuda:N that exists here),
    else a ValueError that names ``flag`` (e.g. "--device", "train.device") and the fix."""
    import torch

    try:
        dev = torch.device(name)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ValueError(f"{flag} {name!r} is not a device antdiff runs on: use cpu, cuda or "
                         "cuda:N")  # fmt: skip
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{flag} {name}: CUDA is not available here; use cpu")
    n = torch.cuda.device_count() if dev.type == "cuda" else 0
    if dev.type == "cuda" and dev.index is not None and dev.index >= n:
        raise ValueError(f"{flag} {name}: this machine has {n} CUDA device(s), cuda:0 .. "
                         f"cuda:{n - 1}")  # fmt: skip
    return dev


def git_describe() -> str:
    """The commit of the package's own checkout, with "-dirty" for uncommitted changes to it
    (``git describe --always --dirty``), else ANT_GIT_SHA (a copy without .git), else
    "unknown": what a result file records as the code that made it."""
    import subprocess

    try:
        return subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=7"], capture_output=True,
            text=True, check=True, cwd=Path(__file__).resolve().parent, timeout=30,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("ANT_GIT_SHA", "unknown")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    try:
        import torch

        torch.manual_seed(seed)
    except ImportError:
        pass


CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")
_NO_LIMIT = 1 << 60  # cgroup v1 writes "no limit" as a page-rounded 2**63 - 1


def available_host_bytes() -> int:
    """Memory the host can give without swapping: MemAvailable (Linux), else free pages, and no
    more than the process's memory cgroup still allows (a container's limit; /proc/meminfo
    shows the whole host's memory)."""
    have = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                have = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        pass
    if have is None:
        have = int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    limit = cgroup_free_bytes()
    return have if limit is None else min(have, limit)


def cgroup_free_bytes(root: Path | None = None, proc: Path | None = None) -> int | None:
    """What the process's memory cgroup can still give: its limit less what it uses apart from
    file cache the kernel can reclaim (page cache, not shared memory: what MemAvailable also
    counts as available), the least over the cgroup and its parents, cgroup v2 or v1. None
    where no limit is set or nothing can be read. ``root`` is the cgroup mount and ``proc`` the
    process's cgroup file (tests point them at a made tree)."""
    root = CGROUP_ROOT if root is None else root
    proc = PROC_CGROUP if proc is None else proc
    try:
        lines = proc.read_text().splitlines()
    except OSError:
        return None
    least = None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[1] == "":  # v2: one unified hierarchy
            base, names = root, ("memory.max", "memory.current", "file", "shmem")
        elif "memory" in parts[1].split(","):  # v1: the memory controller's own mount
            base = root / "memory"
            names = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_cache",
                     "total_shmem")  # fmt: skip
        else:
            continue
        d = base / parts[2].strip().lstrip("/")
        if not d.is_dir():  # a path of the host's namespace, the container's cgroup mounted
            d = base
        while True:
            free = _cgroup_level_free(d, *names)
            if free is not None:
                least = free if least is None else min(least, free)
            if d == base or base not in d.parents:
                break
            d = d.parent
    return least


def _cgroup_level_free(
    d: Path, limit_file: str, usage_file: str, cache_key: str, shmem_key: str
) -> int | None:
    try:
        text = (d / limit_file).read_text().strip()
        if text == "max" or int(text) >= _NO_LIMIT:
            return None
        limit, usage = int(text), int((d / usage_file).read_text().strip())
    except (OSError, ValueError):
        return None
    stat = {}
    try:
        for row in (d / "memory.stat").read_text().splitlines():
            key, _, value = row.partition(" ")
            if key in (cache_key, shmem_key):
                stat[key] = int(value)
    except (OSError, ValueError):
        pass
    cache = max(0, stat.get(cache_key, 0) - stat.get(shmem_key, 0))
    return max(0, limit - max(0, usage - cache))


def load_npy(path: str | Path, what: str, **kwargs: Any) -> Any:
    """``np.load(path, allow_pickle=False, **kwargs)`` with one clear error for a file numpy
    cannot read as numbers (text, pickled objects, a truncated file): numpy's own messages name
    no file, or advise loading it unsafely. ``what`` says what the file should hold."""
    try:
        return np.load(path, allow_pickle=False, **kwargs)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise  # the file's own trouble, in the OS's words
    except (ValueError, OSError, EOFError) as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        if "pickled" in first or "Object arrays" in first:  # not advice to follow here
            first = "it holds pickled Python objects, not numbers"
        raise ValueError(
            f"{str(path)!r} is not a numeric numpy file ({what}, written by np.save / "
            f"np.savez): {first}"
        ) from exc


@contextlib.contextmanager
def eval_mode(*models: Any) -> Iterator[None]:
    """The models in eval mode for the block; afterwards every submodule is back in its own mode.
    (``model.train(was)`` would put them all in the top module's: a frozen part kept in eval, a
    BatchNorm or a teacher, would come back training.) Arguments that are not modules (a plain
    function) are left alone."""
    import torch

    modes = [(m, m.training) for model in models if isinstance(model, torch.nn.Module)
             for m in model.modules()]  # fmt: skip
    for model in models:
        if isinstance(model, torch.nn.Module):
            model.eval()
    try:
        yield
    finally:
        for m, was in modes:
            m.training = was

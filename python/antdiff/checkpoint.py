"""Training checkpoints: atomic writes, a "latest" pointer, weights-only loading, RNG states.

Layout under ``<out_dir>/checkpoints/``: ``ckpt_00001000.pt`` ... (the last ``keep`` of them)
and ``latest`` (a text file naming the newest complete one). Each file is written to a temp file,
fsynced and renamed (:func:`antdiff.utils.atomic_write`), so a run killed at any moment leaves
complete checkpoints only; a file damaged afterwards (truncated copy, full disk, bytes changed
inside it: each file carries a CRC-32 of everything it holds, checked on load) is detected on
load and, when loading from a directory, skipped in favour of the previous complete one.

Everything stored is loadable with ``torch.load(weights_only=True)``: tensors, dicts, lists,
numbers and strings (the Python and numpy RNG states are stored as JSON strings).
"""

from __future__ import annotations

import json
import logging
import pickle
import random
import re
import struct
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .config import config_diff, resume_conflicts
from .utils import atomic_write, atomic_write_text

FORMAT = "antdiff-train-v1"
_NAME = re.compile(r"^ckpt_(\d+)\.pt$")


def checkpoint_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Checkpoint files in ``directory`` (a run dir or its checkpoints/ dir), oldest first."""
    d = Path(directory)
    if (d / "checkpoints").is_dir():
        d = d / "checkpoints"
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def save_checkpoint(out_dir: str | Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Write checkpoint ``step`` atomically, point "latest" at it, keep the last ``keep``.

    Checkpoints of later steps are those of a run continued from an earlier checkpoint in
    place: this one supersedes them, so they go first (kept, they would outrank it in the
    pruning and, should "latest" be lost, in the choice of the newest)."""
    d = checkpoint_dir(out_dir)
    path = d / f"ckpt_{step:08d}.pt"
    # temp files of the trainer's own writes that a kill left mid-way (a checkpoint's is full
    # size); other tools' (antdiff eval --json in the run folder) are theirs to finish
    for stale in [*d.glob(".ckpt_*.tmp"), *d.glob(".latest.*.tmp"),
                  *(f for name in ("config.yaml", "metrics.csv", "telemetry.jsonl")
                    for f in Path(out_dir).glob(f".{name}.*.tmp"))]:  # fmt: skip
        stale.unlink(missing_ok=True)
    # The pointer first: a kill between the two then leaves it naming a file that is not there
    # (skipped: the newest complete one loads), not a complete newer file passed over for the
    # older one it still named.
    atomic_write_text(d / "latest", path.name + "\n")
    state = {**state, _CRC: content_crc(state)}
    try:
        atomic_write(path, lambda f: torch.save(state, f))
    except (OSError, RuntimeError) as exc:  # torch.save wraps a failed write in a RuntimeError
        cause = _os_error(exc)
        if cause is None:
            raise
        done = list_checkpoints(d)
        msg = (
            f"could not write checkpoint {path} ({cause.strerror or cause}); the last complete "
            f"checkpoint is {done[-1].name if done else 'none'}: free the space (or fix the "
            "folder) and continue with --resume"
        )
        raise (OSError(cause.errno, msg) if cause.errno is not None else OSError(msg)) from exc
    older, later = [], []
    for p in list_checkpoints(d):
        n = int(_NAME.match(p.name).group(1))
        if n > step:
            later.append(p)
        elif n < step:
            older.append(p)
    if later:
        warnings.warn(
            f"checkpoint {path.name} supersedes the later {', '.join(p.name for p in later)} "
            "(a run continued in place from an earlier checkpoint): removed",
            stacklevel=2,
        )
    for p in later:
        p.unlink(missing_ok=True)
    for old in older[: max(len(older) - (keep - 1), 0)]:
        old.unlink(missing_ok=True)
    return path


def _os_error(exc: BaseException) -> OSError | None:
    """The OSError behind ``exc``: itself, what it was raised from, or what was being handled
    when it was raised (torch's zip writer fails again while closing after a write's ENOSPC:
    the OSError is then its __context__, not its __cause__)."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        todo += [e.__cause__, e.__context__]
    return None


_CRC = "crc32"  # the key of a checkpoint's checksum


def content_crc(obj: Any, crc: int = 0) -> int:
    """CRC-32 of a checkpoint's contents: every tensor's dtype, shape and bytes, every other
    value's repr and every key, in order (what torch.load gives back hashes the same)."""
    if isinstance(obj, torch.Tensor):  # conjugate / negative views: their values' bytes
        t = obj.detach().resolve_conj().resolve_neg().cpu().contiguous().reshape(-1)
        crc = zlib.crc32(f"T{t.dtype}{tuple(obj.shape)}".encode(), crc)
        return zlib.crc32(t.view(torch.uint8).numpy(), crc) if t.numel() else crc
    if isinstance(obj, dict):
        crc = zlib.crc32(b"D%d" % len(obj), crc)
        for key, value in obj.items():
            crc = content_crc(value, zlib.crc32(repr(key).encode(), crc))
        return crc
    if isinstance(obj, (list, tuple)):
        crc = zlib.crc32(b"L%d" % len(obj), crc)
        for value in obj:
            crc = content_crc(value, crc)
        return crc
    if isinstance(obj, (set, frozenset)):  # their order is not kept: sorted by repr
        crc = zlib.crc32(b"S%d" % len(obj), crc)
        for text in sorted(repr(value) for value in obj):
            crc = zlib.crc32(text.encode(), crc)
        return crc
    return zlib.crc32(repr(obj).encode(), crc)


def is_torch_file(path: str | Path) -> bool:
    """Whether ``path`` starts like a torch.save file: its zip container, or a pickle (the
    legacy format); a YAML, a text file or an empty file do not. Truncated files still do."""
    with open(path, "rb") as f:
        head = f.read(4)
    return head == b"PK\x03\x04" or head[:1] == b"\x80"


def is_latest_pointer(path: str | Path) -> bool:
    """Whether ``path`` is a run's "latest" pointer (``<run>/checkpoints/latest``, a text file
    naming its newest checkpoint), which stands for the newest complete checkpoint there."""
    p = Path(path)
    return p.name == "latest" and p.is_file() and not is_torch_file(p)


def _load_file(path: Path, map_location: Any) -> dict[str, Any]:
    if not is_torch_file(path):
        raise _Corrupted("not a torch.save file")
    # torch's older pickle format (antdiff writes the zip one): a file of it cut short can read
    # as any opcode, an "unsupported global" too, so there every load error means damage
    legacy = not zipfile.is_zipfile(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Unsupported global" in str(exc) and not legacy:
            raise ValueError(
                f"{str(path)!r} holds Python objects that weights-only loading refuses; it was "
                "not written by antdiff train"
            ) from exc
        raise _Corrupted(str(exc).splitlines()[0]) from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, IndexError,
            KeyError, struct.error) as exc:  # fmt: skip
        raise _Corrupted(str(exc)) from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} is not an antdiff training checkpoint ({FORMAT})")
    saved = state.pop(_CRC, None)  # absent in checkpoints of earlier antdiff versions
    if saved is not None and saved != content_crc(state):
        raise _Corrupted(
            "its contents do not match the checksum saved with them: damaged, or edited after "
            "saving (an edit must delete the 'crc32' entry)"
        )
    return state


class _Corrupted(Exception):
    pass


def _candidates(directory: Path) -> list[Path]:
    """Newest first: the "latest" pointer's target (it outranks a higher step left by a branch
    resumed from an earlier checkpoint), then every other checkpoint by step."""
    files = list_checkpoints(directory)[::-1]
    d = files[0].parent if files else directory
    pointer = d / "latest"
    if pointer.is_file():
        named = d / pointer.read_text().strip()
        if named in files:
            files.remove(named)
            files.insert(0, named)
        elif m := _NAME.match(named.name):  # a save killed before its file landed: the run
            # was at a step below it (a higher one is an abandoned branch's), newest first
            below = [f for f in files if int(_NAME.match(f.name).group(1)) < int(m.group(1))]
            files = below + [f for f in files if f not in below]
    return files


log = logging.getLogger("antdiff.train")


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> tuple[dict[str, Any], Path]:
    """Load a checkpoint file, or the newest complete one in a run / checkpoints directory.

    Returns:
        (state, the file it came from).
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint path {str(p)!r} does not exist")
    if is_latest_pointer(p):  # the file it names, or the previous complete one if that one is
        # missing or damaged: what its folder gives (the path returned names the file)
        if not list_checkpoints(p.parent):
            raise FileNotFoundError(
                f"{str(p)!r} is not a checkpoint but a run's pointer to its newest one (a text "
                "file), and no checkpoints (ckpt_*.pt) lie beside it: give a checkpoint file or "
                "a run folder"
            )
        p = p.parent
    if p.is_dir():
        files = _candidates(p)
        if not files:
            raise FileNotFoundError(f"no checkpoints (ckpt_*.pt) in {str(p)!r}")
        for f in files:
            try:
                state = _load_file(f, map_location)
            except _Corrupted as exc:
                warnings.warn(
                    f"checkpoint {str(f)!r} is corrupted ({exc}); falling back to the previous one",
                    stacklevel=2,
                )
                continue
            return state, f
        raise ValueError(f"every checkpoint in {str(p)!r} is corrupted: {[str(f) for f in files]}")
    if p.stat().st_size and not is_torch_file(p):
        raise ValueError(
            f"{str(p)!r} is not a torch checkpoint (antdiff train writes "
            "<run>/checkpoints/ckpt_N.pt; give that file or the run folder)"
        )
    try:
        return _load_file(p, map_location), p
    except _Corrupted as exc:
        others = [f for f in _candidates(p.parent) if f != p]
        good = next((f for f in others if _loads(f)), None)
        hint = f"; use {str(good)!r} instead" if good else "; no other complete checkpoint found"
        raise ValueError(
            f"checkpoint {str(p)!r} is corrupted (truncated, damaged or not a torch file: "
            f"{exc}){hint}"
        ) from None


def _loads(path: Path) -> bool:
    try:
        _load_file(path, "cpu")
        return True
    except (_Corrupted, ValueError):
        return False


# ---------------------------------------------------------------------------- RNG states
def capture_rng() -> dict[str, Any]:
    """Python, numpy and torch (CPU + CUDA) global RNG states, weights-only loadable."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": json.dumps([version, list(internal), gauss]),
        "numpy": json.dumps([name, keys.tolist(), int(pos), int(has_gauss), float(cached)]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = json.loads(state["python"])
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = json.loads(state["numpy"])
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():  # as many GPUs as are here (a resume
        # with fewer visible GPUs than the saving process had keeps the first ones)
        for i, s in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)


# ---------------------------------------------------------------------------- model weights
def load_model_state(
    model: nn.Module, sd: dict[str, torch.Tensor], ckpt: dict[str, Any], what: str = "model"
) -> None:
    """``model.load_state_dict(sd)`` with an error that says which model the checkpoint holds."""
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = [
        f"{k}: checkpoint {list(sd[k].shape)} vs model {list(own[k].shape)}"
        for k in own
        if k in sd and sd[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        mcfg = ckpt.get("config", {}).get("model", {})
        held = f"{mcfg.get('name', '?')!r} (overrides {mcfg.get('overrides', {})})"
        details = "; ".join(
            part
            for part in (
                f"missing keys {missing[:3]}" if missing else "",
                f"unexpected keys {unexpected[:3]}" if unexpected else "",
                f"shape mismatches {shapes[:3]}" if shapes else "",
            )
            if part
        )
        raise ValueError(
            f"the checkpoint's {what} weights are for model {held}, which does not match the "
            f"model built here ({details}). Use the checkpoint's model config "
            "(--model.name / --model.overrides.*) or another checkpoint"
        )
    model.load_state_dict(sd)


def model_from_state(
    state: dict[str, Any], data: Any = None, weights: str = "model"
) -> tuple[nn.Module, Any, Any]:
    """Rebuild the model a trainer checkpoint ``state`` holds (on the CPU, train mode).

    Args:
        state: a loaded ``antdiff train`` checkpoint (:func:`load_checkpoint`).
        data: the run's :class:`~antdiff.data.Dataset`; None: a stand-in with no samples
            built from the checkpoint's record of the data (input shape, classes, and a latent
            run's codec from ``state["codec"]``), so sampling needs no data set; checkpoints
            written before that record load the data set from the config.
        weights: "model" (raw weights) or "ema".

    Returns:
        (model, the validated Config, the Dataset).
    """
    from .config import config_from_saved
    from .data import load_dataset, stand_in_dataset
    from .models import create_model
    from .train import model_kwargs

    if weights not in ("model", "ema"):
        raise ValueError(f"weights must be 'model' or 'ema', got {weights!r}")
    cfg = config_from_saved(state["config"])
    if data is None and state.get("data_meta") is not None:
        data = stand_in_dataset(cfg.data, state["data_meta"], state.get("codec"))
    elif data is None:
        data = load_dataset(cfg.data, cfg.train.seed, 0, state.get("codec"))
    with torch.random.fork_rng(devices=[]):  # its initial weights, overwritten below, would
        model = create_model(cfg.model.name, **model_kwargs(cfg, data))  # draw from the caller's
    load_model_state(model, state[weights], state, "EMA" if weights == "ema" else "model")
    return model, cfg, data


# ---------------------------------------------------------------------------- resuming
def resume_state(cfg: Any, resume: str | Path | bool, allow_change: bool) -> dict[str, Any]:
    """The checkpoint to resume ``cfg`` (a Config) from, after checking the configs agree.

    ``resume``: True or "" for the newest complete checkpoint in cfg.train.out_dir, else a
    checkpoint file or directory.
    """
    return resume_checkpoint(cfg, resume, allow_change)[0]


def resume_checkpoint(
    cfg: Any, resume: str | Path | bool, allow_change: bool
) -> tuple[dict[str, Any], Path]:
    """:func:`resume_state`'s state and the file it came from."""
    where = cfg.train.out_dir if resume in (True, "", None) else resume
    try:
        state, path = load_checkpoint(where)
    except FileNotFoundError as exc:
        if resume not in (True, "", None):
            raise
        raise FileNotFoundError(
            f"--resume: {exc} (train.out_dir): nothing to resume there; drop --resume to start "
            "a fresh run, or pass --resume PATH of a checkpoint"
        ) from exc
    from .config import config_from_saved, upgrade_saved_config

    saved = upgrade_saved_config(state["config"])
    try:  # keys added since the checkpoint was written take their defaults, not "changed"
        saved = config_from_saved(saved).to_dict()
    except (TypeError, ValueError):  # a config this version refuses: compared as saved
        pass
    if cfg.data.random_flip is None:  # not given: the run's own (runs from before it: false)
        got = _get(saved, "data.random_flip")
        cfg.data.random_flip = got if isinstance(got, bool) else cfg.data.flips
    bad = resume_conflicts(saved, cfg.to_dict())
    if "train.seed" in bad:  # config.yaml would name a seed that nothing in the run uses
        raise ValueError(
            f"train.seed cannot change on resume (checkpoint {str(path)!r}: "
            f"{_get(saved, 'train.seed')!r}, now {cfg.train.seed!r}): the data order and the "
            "random streams continue from the checkpoint's state (and ranks reseed from the "
            "run's seed), so a new seed would mix two runs; drop --train.seed, or start a fresh "
            "run (a new train.out_dir) for another seed"
        )
    fixed = [k for k in bad if _fixed_on_resume(k)]
    if fixed or (bad and not allow_change):  # fixed keys: not even --allow-config-change
        old, new = _flat(saved), _flat(cfg.to_dict())
        lines = "\n".join(f"  {k}: checkpoint {old.get(k)!r} -> now {new.get(k)!r}" for k in bad)
        advice = (
            f"{', '.join(fixed)} cannot change on resume, not even with --allow-config-change "
            "(the saved weights and method state are theirs): keep the checkpoint's values, or "
            "start a fresh run in a new train.out_dir"
            if fixed
            else "Only train.steps and logging settings may change on resume; pass "
            "--allow-config-change to resume anyway"
        )
        own = Path(str(_get(saved, "train.out_dir"))) / "config.yaml"  # written at its start
        if own.is_file():
            advice += (
                f". To repeat every setting the run was started with: antdiff train --config "
                f"{own} --resume"
            )
        raise ValueError(
            f"the config differs from the one checkpoint {str(path)!r} was trained with:\n{lines}\n"
            f"{advice}"
        )
    if bad:  # what --allow-config-change let through: said, not silent
        old, new = _flat(saved), _flat(cfg.to_dict())
        log.warning("resuming with a changed config (--allow-config-change): %s", "; ".join(
            f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in bad))  # fmt: skip
    log.info("resuming from %s (step %d)", path, state["step"])
    return state, path


# what the saved state fixes: the model's weights (its size, its inputs and labels) and the
# engine's method state
_FIXED_ON_RESUME = ("ant.method", "ant.k", "ant.clustering", "ant.sampling", "model.",
                    "data.class_conditional", "data.num_classes", "data.channels",
                    "data.autoencoder", "diffusion.T", "diffusion.learn_sigma")  # fmt: skip


def _fixed_on_resume(key: str) -> bool:
    return any(key == f or (f.endswith(".") and key.startswith(f)) for f in _FIXED_ON_RESUME)


def _flat(d: dict[str, Any]) -> dict[str, Any]:
    return {k: _get(d, k) for k in config_diff(d, {})}


def _get(d: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d

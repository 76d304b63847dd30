"""Training logs: a CSV file, TensorBoard (when installed), a tqdm bar, and PNG sample grids.

``telemetry.jsonl`` beside ``metrics.csv`` holds one ``{"step": s, **ant.stats()}`` object per
logged step (cosine and PCGrad conflict-rate matrices included) for ``antdiff plot``, whose
"loss" (as metrics.csv's loss columns) the trainer replaces by the means over the steps since
the previous row; "weight" and "cosine" are the logged step's, "loss_mean" runs from the start.

The logger only sees host numbers that the trainer read from ``ant.stats()`` every ``log_every``
steps, so it never adds a device sync to a training step.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .utils import atomic_write

log = logging.getLogger("antdiff.train")


def csv_columns(k: int) -> list[str]:
    return [
        "step",
        "loss",
        *[f"loss_c{i + 1}" for i in range(k)],
        *[f"weight_c{i + 1}" for i in range(k)],
        "lr",
        "sec_per_step",
        "objective",
    ]


class RunLogger:
    """metrics.csv (+ TensorBoard events) in ``out_dir`` and an optional progress bar.

    Args:
        out_dir: the run directory.
        k: number of clusters (CSV columns).
        start: the first step of this process (a resumed run drops CSV rows after it).
        total: the final step, for the progress bar.
        progress: show a tqdm bar.
        branch: ``branch_state()`` of the process that wrote the resumed checkpoint, which it
            saved before its rows replaced the logs (a kill between its save and ``commit``):
            the logs are rebuilt from the rows up to its start and its own rows.
    """

    def __init__(
        self, out_dir: Path, k: int, start: int, total: int, progress: bool,
        branch: dict[str, Any] | None = None,
    ) -> None:  # fmt: skip
        self.k, self.columns = k, csv_columns(k)
        self.path = Path(out_dir) / "metrics.csv"
        self.jsonl = Path(out_dir) / "telemetry.jsonl"
        # rows of a continuation that stopped before its first checkpoint: dropped with it
        self._pending_paths = (Path(out_dir) / ".metrics.csv.pending",
                               Path(out_dir) / ".telemetry.jsonl.pending")  # fmt: skip
        for p in self._pending_paths:
            p.unlink(missing_ok=True)
        self._start = start
        self._branch: tuple[list[list[str]], list[str]] = ([], [])  # this run's rows, pending
        rows, later = self._kept_rows(start)
        lines, later_lines = self._kept_lines(start)
        if branch is not None:  # its rows, not what the logs hold between its start and ``start``
            rows = [*self._kept_rows(branch["start"])[0],
                    *([str(v) for v in r] for r in branch["rows"])]  # fmt: skip
            lines = [*self._kept_lines(branch["start"])[0], *branch["lines"]]
            # the branch stays this run's until it commits: a kill before then carries its
            # rows on with this run's (a third process rebuilds from both)
            self._start = branch["start"]
            self._branch = ([[str(v) for v in r] for r in branch["rows"]], list(branch["lines"]))
        self._kept = (rows, lines)
        # Rows past ``start`` belong to a run continued further from an earlier checkpoint (or
        # logged past its checkpoint before a crash): its newer checkpoints outrank this one
        # until this one saves, so its rows stay until then, and this run's go to the pending
        # files (``commit``).
        self._pending = bool(later or later_lines)
        if not self._pending:
            self._write_logs(with_pending=False)
        self._open()
        self._tb = _tensorboard(Path(out_dir) / "tb", start)
        self._bar = None
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=start, desc="train", dynamic_ncols=True)

    def _open(self) -> None:
        csv_path, jsonl_path = self._pending_paths if self._pending else (self.path, self.jsonl)
        self._file = open(csv_path, "a", newline="")  # noqa: SIM115 - closed in close()
        self._csv = csv.writer(self._file)
        self._jsonl = open(jsonl_path, "a")  # noqa: SIM115 - closed in close()

    def _write_logs(self, with_pending: bool) -> None:
        """metrics.csv and telemetry.jsonl := the kept rows (+ those of the pending files)."""
        rows, lines = self._kept
        if with_pending:
            with open(self._pending_paths[0], newline="") as f:
                rows = [*rows, *(r for r in csv.reader(f) if len(r) == len(self.columns))]
            with open(self._pending_paths[1]) as f:
                lines = [*lines, *(ln for ln in f if ln.endswith("\n"))]
        atomic_write(self.path, lambda f: csv.writer(f).writerows([self.columns, *rows]),
                     mode="w")  # fmt: skip
        atomic_write(self.jsonl, lambda f: f.writelines(lines), mode="w")

    @property
    def pending(self) -> bool:
        """Whether this run's rows wait for its first save (a continuation from an earlier
        checkpoint of a run that logged past it)."""
        return self._pending

    def commit(self) -> None:
        """This run has saved a checkpoint (or finished): its rows replace those past its start
        step. Called by the trainer after each save (a no-op once done)."""
        if not self._pending:
            return
        self._file.close()
        self._jsonl.close()
        self._write_logs(with_pending=True)
        for p in self._pending_paths:
            p.unlink(missing_ok=True)
        self._pending = False
        self._branch = ([], [])
        self._open()

    def branch_state(self) -> dict[str, Any] | None:
        """For the checkpoint being saved while this run's rows are pending (a continuation
        from an earlier checkpoint, before its first save): its start and rows, so that a kill
        before ``commit`` cannot leave the superseded run's rows beside this checkpoint."""
        if not self._pending:
            return None
        rows, lines = self._branch
        return {"start": self._start, "rows": [list(r) for r in rows], "lines": list(lines)}

    def _kept_rows(self, start: int) -> tuple[list[list[str]], list[list[str]]]:
        """Whole rows of an earlier process up to ``start``, and those after it (a run continued
        further from an earlier checkpoint, or a crash that logged past its checkpoint)."""
        if start == 0 or not self.path.is_file():
            return [], []
        with open(self.path, newline="") as f:
            rows = list(csv.reader(f))
        if rows and rows[0] == self.columns[:-1]:  # written before the objective column
            rows = [rows[0], *(r + ["nan"] for r in rows[1:] if r)]
        elif not rows or rows[0] != self.columns:
            return [], []
        # a crash may have cut the last row short: only whole rows are kept
        whole = [r for r in rows[1:] if len(r) == len(self.columns)]
        return [r for r in whole if int(r[0]) <= start], [r for r in whole if int(r[0]) > start]

    def _kept_lines(self, start: int) -> tuple[list[str], list[str]]:
        if start == 0 or not self.jsonl.is_file():
            return [], []
        kept, later = [], []
        with open(self.jsonl) as f:
            for ln in f:
                try:  # a crash may have cut the last line short
                    step = json.loads(ln).get("step")
                except ValueError:
                    continue
                if isinstance(step, int):
                    (kept if step <= start else later).append(ln if ln.endswith("\n")
                                                              else ln + "\n")  # fmt: skip
        return kept, later

    def log(
        self, step: int, loss: float, stats: dict[str, Any], lr: float, sec: float,
        objective: float = math.nan,
    ) -> None:  # fmt: skip
        """``loss``: the mean of the present clusters' losses, comparable across methods;
        ``objective``: what the method minimises (UW's can be negative)."""
        losses = stats.get("loss", [math.nan] * self.k)
        weights = stats.get("weight", [math.nan] * self.k)
        row = [step, f"{loss:.6g}", *(f"{v:.6g}" for v in losses)]
        row += [*(f"{v:.6g}" for v in weights), f"{lr:.6g}", f"{sec:.4g}", f"{objective:.6g}"]
        self._csv.writerow(row)
        self._file.flush()
        # strict JSON: a non-finite value (a skipped step's loss, an unmeasured pair) is null
        record = _finite_or_none({"step": step, **stats})
        line = json.dumps(record, default=_plain, allow_nan=False) + "\n"
        self._jsonl.write(line)
        self._jsonl.flush()
        if self._pending:
            self._branch[0].append([str(v) for v in row])
            self._branch[1].append(line)
        if self._tb is not None:
            self._tb.add_scalar("loss", loss, step)
            self._tb.add_scalar("objective", objective, step)
            self._tb.add_scalar("lr", lr, step)
            self._tb.add_scalar("sec_per_step", sec, step)
            for i, (lo, w) in enumerate(zip(losses, weights)):
                self._tb.add_scalar(f"cluster_loss/c{i + 1}", lo, step)
                self._tb.add_scalar(f"cluster_weight/c{i + 1}", w, step)
        if self._bar is not None:
            self._bar.set_postfix_str(f"loss {loss:.4f} w " + " ".join(f"{w:.2f}" for w in weights))

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self, commit: bool = True) -> None:
        """``commit``: this run's rows replace later ones still pending (False for a run stopped
        before it saved: its rows are dropped, as its steps are)."""
        if commit:
            self.commit()
        self._file.close()
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._bar is not None:
            self._bar.close()


def _finite_or_none(value: Any) -> Any:
    """``value`` with every non-finite float (also inside lists and dicts, numpy / torch values
    as their lists) replaced by None."""
    if hasattr(value, "tolist") and not isinstance(value, (list, tuple, dict, str)):
        value = value.tolist()  # numpy / torch: plain numbers first (json refuses their NaN)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def _plain(x: Any) -> Any:
    """JSON fallback for numpy / torch scalars and arrays in a stats snapshot."""
    return x.tolist() if hasattr(x, "tolist") else str(x)


def _tensorboard(path: Path, start: int) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.info("tensorboard is not installed: logging to metrics.csv only")
        return None
    # events at steps >= purge_step that earlier writers left in ``path`` are dropped: after a
    # resume from step ``start`` those past it (a crash may have logged ahead of its checkpoint),
    # in a fresh run (start 0) all of them, so a rerun into the same directory is not mixed in
    return SummaryWriter(str(path), purge_step=start + 1 if start > 0 else 0)


def image_grid(x: torch.Tensor, nrow: int | None = None, latent: bool = False) -> np.ndarray:
    """[N, C, H, W] in [-1, 1] -> [rows*(H+1)+1, cols*(W+1)+1, 3] uint8 with 1px borders.

    Latents without a decoder (``latent``, or more than 3 channels) are not in [-1, 1]: their
    first three channels are shown, each rescaled to its own range.
    """
    x = x.detach().float().cpu()
    n, c, h, w = x.shape
    if c > 3 or latent:
        x = x[:, :3]
        lo = x.amin(dim=(0, 2, 3), keepdim=True)
        hi = x.amax(dim=(0, 2, 3), keepdim=True)
        x = (x - lo) / (hi - lo).clamp(min=1e-8) * 2 - 1
    x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
    if x.shape[1] == 2:
        x = torch.cat([x, x[:, :1]], dim=1)
    cols = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / cols)
    grid = torch.ones(3, rows * (h + 1) + 1, cols * (w + 1) + 1)
    for i in range(n):
        r, q = divmod(i, cols)
        grid[:, 1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + q * (w + 1) : 1 + q * (w + 1) + w] = x[i]
    img = ((grid.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return img.permute(1, 2, 0).numpy()


def save_png(img: np.ndarray, path: str | Path, scale: int = 1) -> Path:
    """Write an [H, W, 3] uint8 image as PNG (nearest-neighbour upscaled by ``scale``)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import image as mpimg

    if scale > 1:
        img = img.repeat(scale, axis=0).repeat(scale, axis=1)
    return atomic_write(path, lambda f: mpimg.imsave(f, img, format="png"))


def write_samples(run: Any, path: Path) -> Path:
    """Grid of cfg.sample.n samples of the EMA model (``run``: antdiff.train.Run); its own
    generator leaves the training RNG untouched."""
    from .sampling import sample

    sc, data = run.cfg.sample, run.data
    gen = torch.Generator(run.device).manual_seed(run.cfg.train.seed)
    y = None
    if data.num_classes and run.cfg.data.class_conditional:
        y = torch.arange(sc.n, device=run.device) % data.num_classes
    latents = run.cfg.data.source == "latents" or data.codec is not None
    x = sample(
        run.ema.model,
        run.diffusion,
        (sc.n, *data.shape),
        sampler=sc.sampler,
        steps=sc.steps,
        y=y,
        cfg_scale=sc.cfg_scale,
        cfg_channels=sc.cfg_channels,
        variance=sc.ddpm_variance(),
        generator=gen,
        clip_denoised=not latents,
    )
    if data.codec is not None:
        with torch.no_grad():
            x = data.codec.decode(x)
    raw = latents and data.codec is None  # latents without a decoder: not in [-1, 1]
    return save_png(image_grid(x, latent=raw), path, scale=max(1, 64 // x.shape[-1]))

"""Task affinity between timestep bins (the paper's observation O1): cosines of per-bin gradients.

Bins are half-open timestep ranges ``[e_b, e_{b+1})`` with ``e_0 = 0`` and ``e_nb = T``. For one
model, the task gradient of bin b over all P trainable parameters is

    g_b = grad (1/n) sum_s loss(x0_s, t_sb, eps_sb),   t_sb ~ U[e_b, e_{b+1}),  eps_sb ~ N(0, I),

with the n data points, t_sb and eps_sb fixed by the seed per (sample, bin), so every checkpoint
sees the same tasks. The affinity is A[a, b] = G[a, b] / sqrt(G[a, a] G[b, b]) with G = J J^T,
J [nb, P] the stacked g_b; the result is the mean of A over the checkpoints.

Cost. Row r of a :class:`~antdiff.engine.buffer.GradBuffer` J [m, P] is written in place by
autograd (the parameters' ``.grad`` are views of it), one forward + backward per batch of a
bin's n samples. When all nb rows fit the memory budget (m >= nb), every bin gradient is
computed once (nb * n sample passes, the floor) and G is one ``gram(J)``. Otherwise m - 1 rows
hold a resident block of bins, computed once (its Gram by ``gram``), and every later bin is
recomputed into the last row and dotted with the block. With q = ceil(nb / (m - 1)) blocks that
is about nb * (1 + (q - 1) / 2) bin gradients (q = 2: 1.5x), reported as ``meta["bin_passes"]``.
Spilling J to host memory or disk would avoid the recomputation at the price of moving nb * P
numbers through slower memory; it is not implemented.

The model runs in ``eval()`` mode during the pass (each submodule's own mode restored
afterwards), so dropout and label dropout are off and the gradients are deterministic;
GroupNorm/LayerNorm models compute the same in either mode. The parameters' ``.grad`` are
restored afterwards too.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data import as_float
from ..engine.buffer import GradBuffer
from ..utils import atomic_write, available_host_bytes, eval_mode

__all__ = [
    "AffinityResult",
    "AffinityTasks",
    "load_affinity_checkpoint",
    "make_bin_edges",
    "task_affinity",
]

Loader = Callable[[Any, Any], tuple[nn.Module, dict[str, Any]]]


@dataclass
class AffinityResult:
    """Task affinity between timestep bins, averaged over checkpoints.

    Attributes:
        affinity: [nb, nb] float64 cosine similarities, symmetric, unit diagonal.
        bin_edges: [nb + 1] int64, 0 = e_0 < ... < e_nb = T.
        n_samples: data points per bin.
        n_checkpoints: how many checkpoints the affinity averages.
        meta: provenance (schedule, seed, checkpoints, per-bin gradient norms, costs), JSON-able.
    """

    affinity: np.ndarray
    bin_edges: np.ndarray
    n_samples: int
    n_checkpoints: int
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def nb(self) -> int:
        return int(self.affinity.shape[0])

    def save(self, path: str | Path) -> Path:
        """Write ``.npz`` (affinity, bin_edges, n_samples, n_checkpoints, checkpoints, meta) or
        ``.npy`` (+ ``<stem>_edges.npy``), atomically; both load in ``antdiff cluster``."""
        path = Path(path)
        if path.suffix == ".npy":
            edges = path.with_name(path.stem + "_edges.npy")
            atomic_write(edges, lambda f: np.save(f, self.bin_edges))
            return atomic_write(path, lambda f: np.save(f, self.affinity))
        if path.suffix != ".npz":
            raise ValueError(f"affinity output must end in .npz or .npy, got {str(path)!r}")
        arrays = {
            "affinity": self.affinity,
            "bin_edges": self.bin_edges,
            "n_samples": np.int64(self.n_samples),
            "n_checkpoints": np.int64(self.n_checkpoints),
            "checkpoints": np.array([str(c) for c in self.meta.get("checkpoints", [])]),
            "meta": np.array(json.dumps(self.meta)),
        }
        return atomic_write(path, lambda f: np.savez(f, **arrays))

    @classmethod
    def load(cls, path: str | Path) -> AffinityResult:
        """Read a file written by :meth:`save` (``.npz``)."""
        with np.load(Path(path)) as z:
            return cls(
                z["affinity"],
                z["bin_edges"],
                int(z["n_samples"]),
                int(z["n_checkpoints"]),
                json.loads(str(z["meta"])) if "meta" in z else {},
            )


def make_bin_edges(T: int, bins: int | None = None, bin_edges: Any = None) -> np.ndarray:  # noqa: N803
    """[nb + 1] int64 bin edges: ``bin_edges`` checked, or ``bins`` near-equal bins of [0, T)
    (default min(50, T))."""
    if bin_edges is not None:
        edges = np.asarray(bin_edges)
        # whole-number floats (np.linspace's edges) are timestep indices too, as clustering takes
        whole = np.issubdtype(edges.dtype, np.integer) or (
            np.issubdtype(edges.dtype, np.floating) and bool(np.all(np.isfinite(edges)))
            and bool(np.all(edges == np.round(edges)))
        )  # fmt: skip
        if edges.ndim != 1 or edges.size < 2 or not whole:
            raise ValueError(
                f"bin_edges must be a 1-D integer array of at least 2 edges, got {edges!r}"
            )
        if edges[0] != 0 or edges[-1] != T or np.any(np.diff(edges) <= 0):
            raise ValueError(
                f"bin_edges must increase strictly from 0 to T={T} so the bins cover [0, T), "
                f"got {edges.tolist()[:10]}{'...' if edges.size > 10 else ''}"
            )
        if bins is not None and bins != edges.size - 1:
            raise ValueError(f"bins={bins} disagrees with bin_edges ({edges.size - 1} bins)")
        return edges.astype(np.int64)
    nb = min(50, T) if bins is None else bins
    if isinstance(nb, bool) or not isinstance(nb, (int, np.integer)) or not 1 <= nb <= T:
        raise ValueError(f"bins must be an integer in [1, T={T}], got {bins!r}")
    return (np.arange(nb + 1, dtype=np.int64) * T) // nb


class AffinityTasks:
    """The fixed tasks: which data points, and (t, eps) per (sample, bin), all from the seed.

    Args:
        bin_edges: [nb + 1] int64 edges.
        n_data: number of data points available (N).
        n_samples: data points per bin (n); reused cyclically in a seeded order when n > N.
        sample_shape: the shape of one x0 (e.g. (C, H, W)).
        seed: one integer for everything; bin b's draws depend on (seed, b) only.
    """

    def __init__(
        self,
        bin_edges: np.ndarray,
        n_data: int,
        n_samples: int,
        sample_shape: Sequence[int],
        seed: int,
    ) -> None:
        self.bin_edges = np.asarray(bin_edges, dtype=np.int64)
        self.n_samples = n_samples
        self.sample_shape = tuple(sample_shape)
        self.seed = int(seed)
        g = torch.Generator().manual_seed(_derive_seed(self.seed, -1))
        reps = -(-n_samples // n_data)
        self.index = torch.cat([torch.randperm(n_data, generator=g) for _ in range(reps)])[
            :n_samples
        ]

    def draw(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """t [n] int64 in bin b and eps [n, *sample_shape] float32, on the CPU."""
        g = torch.Generator().manual_seed(_derive_seed(self.seed, b))
        lo, hi = int(self.bin_edges[b]), int(self.bin_edges[b + 1])
        t = torch.randint(lo, hi, (self.n_samples,), generator=g)
        eps = torch.randn((self.n_samples, *self.sample_shape), generator=g)
        return t, eps


def _derive_seed(seed: int, b: int) -> int:
    return int(np.random.SeedSequence([seed % 2**63, b + 1]).generate_state(1, np.uint64)[0] >> 1)


def task_affinity(
    models_or_checkpoints: nn.Module | str | Path | Sequence[nn.Module | str | Path],
    diffusion: Any,
    data: torch.Tensor,
    *,
    bins: int | None = None,
    bin_edges: Any = None,
    n_samples: int = 512,
    batch_size: int = 128,
    block_rows: int | None = None,
    max_bytes: int | None = None,
    seed: int = 0,
    device: Any = None,
    model_kwargs: dict[str, torch.Tensor] | None = None,
    loader: Loader | None = None,
) -> AffinityResult:
    """Task-affinity matrix of per-bin gradients, averaged over checkpoints.

    Args:
        models_or_checkpoints: one model or checkpoint path, or a sequence of them (all the same
            architecture, parameter shapes and config).
        diffusion: a :class:`~antdiff.diffusion.GaussianDiffusion`; its per-sample unweighted
            ``"mse"`` (in its prediction's parameterisation) defines the tasks: a training
            weighting (P2, Min-SNR) and a learned variance's VB term are left out.
        data: x0 [N, C, ...] training samples (floats in [-1, 1], or uint8 pixels).
        bins: number of near-equal timestep bins (default min(50, T)); or give ``bin_edges``.
        bin_edges: [nb + 1] increasing ints from 0 to T.
        n_samples: data points per bin (>= 1).
        batch_size: samples per forward/backward.
        block_rows: rows of J held at once (>= 2); None: as many as ``max_bytes`` allows.
        max_bytes: memory budget for J; None: half the free device memory (host: available RAM).
        seed: fixes the data points, t and eps per (sample, bin).
        device: where checkpoints loaded from paths go; nn.Module inputs must already be there.
        model_kwargs: extra per-sample model inputs [N, ...] (e.g. {"y": labels}).
        loader: ``loader(path, device) -> (model, config)``; default
            :func:`load_affinity_checkpoint`.

    Returns:
        An :class:`AffinityResult` with affinity [nb, nb] float64.
    """
    items = _as_list(models_or_checkpoints)
    edges = make_bin_edges(diffusion.T, bins, bin_edges)
    kwargs = _check_inputs(data, model_kwargs, n_samples, batch_size)
    load = loader or load_affinity_checkpoint
    labels = [_label(x, i) for i, x in enumerate(items)]
    _check_same_models(items, labels, load)
    tasks = AffinityTasks(edges, data.shape[0], n_samples, data.shape[1:], seed)
    mats, norms, passes, rows_used = [], [], [], None
    for item, label in zip(items, labels):
        model = load(item, device)[0] if isinstance(item, (str, Path)) else item
        dev = _model_device(model, label, device)
        # the rows used, as float32 (uint8 pixels are converted here, not the whole set)
        x0 = as_float(data.index_select(0, tasks.index.to(data.device))).to(dev)
        kw = {k: v.index_select(0, tasks.index.to(v.device)).to(dev) for k, v in kwargs.items()}
        with eval_mode(model):  # each submodule's own mode back afterwards
            G, rows_used, n_pass = _model_gram(  # noqa: N806
                model, diffusion, x0, kw, tasks, batch_size, block_rows, max_bytes
            )
        A, d = _cosine(G, label)  # noqa: N806
        mats.append(A)
        norms.append(d.tolist())
        passes.append(n_pass)
    meta = {
        "T": diffusion.T,
        "schedule": getattr(diffusion.schedule, "name", "custom"),
        "prediction": getattr(diffusion, "prediction", None),
        "checkpoints": labels,
        "seed": seed,
        "batch_size": batch_size,
        "block_rows": rows_used,
        "bin_passes": passes,
        "grad_norms": norms,
        "model_mode": "eval (dropout off)",
    }
    return AffinityResult(np.mean(mats, axis=0), edges, n_samples, len(items), meta)


def _check_inputs(data, model_kwargs, n_samples, batch_size) -> dict[str, torch.Tensor]:
    _check_int("n_samples", n_samples, 1)
    _check_int("batch_size", batch_size, 1)
    if not isinstance(data, torch.Tensor) or data.dim() < 2 or data.shape[0] < 1:
        raise ValueError(f"data must be a tensor x0 [N, C, ...] with N >= 1, got {_describe(data)}")
    kwargs = dict(model_kwargs or {})
    for k, v in kwargs.items():
        if not isinstance(v, torch.Tensor) or v.shape[:1] != data.shape[:1]:
            raise ValueError(f"model_kwargs[{k!r}] must be a tensor with N={len(data)} rows")
    return kwargs


def _cosine(G: np.ndarray, label: str) -> tuple[np.ndarray, np.ndarray]:  # noqa: N803
    """A [nb, nb] = G / sqrt(diag G diag G^T) (exactly symmetric, unit diagonal), and |g_b|."""
    diag = np.diag(G)
    if not np.all(np.isfinite(G)) or np.any(diag <= 0):
        bad = np.flatnonzero(~np.isfinite(diag) | (diag <= 0))[:5].tolist()
        raise ValueError(
            f"checkpoint {label}: the gradient of bin(s) {bad} is zero or non-finite, so its "
            "cosine is undefined; check the model and the data"
        )
    d = np.sqrt(diag)
    A = G / d[:, None] / d[None, :]  # noqa: N806
    np.fill_diagonal(A, 1.0)
    return 0.5 * (A + A.T), d


def _model_gram(model, diffusion, x0, kw, tasks, batch_size, block_rows, max_bytes):
    """G [nb, nb] float64 for one model, the rows of J used, and the bin gradients computed."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(
            "the model has no trainable parameters (requires_grad=False everywhere): task "
            "affinity compares gradients; call model.requires_grad_(True)"
        )
    saved = [p.grad for p in params]
    nb = tasks.bin_edges.size - 1
    try:
        buf = GradBuffer(params, _rows(nb, params, block_rows, max_bytes))
        m = buf.k
        G = np.zeros((nb, nb))  # noqa: N806
        start, n_pass = 0, 0
        while start < nb:
            stop = nb if nb - start <= m else start + m - 1
            for r, b in enumerate(range(start, stop)):
                _fill_row(buf, r, b, model, diffusion, x0, kw, tasks, batch_size)
            G[start:stop, start:stop] = _gram64(buf.J[: stop - start])
            for b in range(stop, nb):  # stream the later bins through the spare row
                _fill_row(buf, m - 1, b, model, diffusion, x0, kw, tasks, batch_size)
                # the block's rows are 0 .. m - 2 and the spare row m - 1: gram over all m
                # rows is one pass over J like a product with the spare row, and it sums in
                # float32 whatever J's dtype, as the block's own entries were (a bf16 product
                # would give these entries half precision)
                cross = _gram64(buf.J)[: stop - start, m - 1]
                G[start:stop, b] = G[b, start:stop] = cross
            n_pass += nb - start
            start = stop
        return G, m, n_pass
    finally:
        for p, g in zip(params, saved):
            p.grad = g


def _fill_row(buf, r, b, model, diffusion, x0, kw, tasks, batch_size) -> None:
    """Row r of J := gradient of bin b's mean loss over the n samples (autograd, in place)."""
    buf.point_grads_at(r)
    t, eps = tasks.draw(b)
    dev = x0.device
    t, eps = t.to(dev), eps.to(device=dev, dtype=x0.dtype)
    n = t.shape[0]
    for s in range(0, n, batch_size):
        e = min(n, s + batch_size)
        sub_kw = {k: v[s:e] for k, v in kw.items()}
        out = diffusion.training_losses(model, x0[s:e], t[s:e], noise=eps[s:e], model_kwargs=sub_kw)
        # the task's own loss L_t (the paper's Eq. 2): the unweighted MSE, without the training
        # weight (P2, Min-SNR: it would reweight the timesteps inside a bin) or the VB term
        (out["mse"].float().sum() / n).backward()


def _gram64(J: torch.Tensor) -> np.ndarray:  # noqa: N802
    from ant_kernels import gram

    G, _ = gram(J)  # noqa: N806
    return G.double().cpu().numpy()


def _rows(
    nb: int, params: list[nn.Parameter], block_rows: int | None, max_bytes: int | None
) -> int:
    """Rows of J to allocate: all nb when they fit, else the budget's worth (at least 2)."""
    if nb == 1:
        return 1
    if block_rows is not None:
        _check_int("block_rows", block_rows, 2)
        return min(block_rows, nb)
    row_bytes = sum(p.numel() for p in params) * params[0].element_size()
    if max_bytes is None:
        max_bytes = _free_bytes(params[0].device) // 2
    _check_int("max_bytes", max_bytes, 1)
    return int(min(nb, max(2, max_bytes // row_bytes)))


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return available_host_bytes()


def _as_list(x: Any) -> list[Any]:
    if isinstance(x, (nn.Module, str, Path)):
        return [x]
    if isinstance(x, Sequence) and len(x) > 0:
        for i, item in enumerate(x):
            if not isinstance(item, (nn.Module, str, Path)):
                raise TypeError(
                    f"models_or_checkpoints[{i}] must be an nn.Module or a checkpoint path, got "
                    f"{type(item).__name__}"
                )
        return list(x)
    raise TypeError(
        "models_or_checkpoints must be an nn.Module, a checkpoint path or a non-empty sequence "
        f"of them, got {type(x).__name__}"
    )


def _label(item: Any, i: int) -> str:
    return str(item) if isinstance(item, (str, Path)) else f"models[{i}] ({type(item).__name__})"


def _signature(model: nn.Module, config: dict[str, Any] | None) -> tuple:
    shapes = tuple(
        (n, tuple(p.shape), str(p.dtype)) for n, p in model.named_parameters() if p.requires_grad
    )
    return type(model).__name__, shapes, json.dumps(config, sort_keys=True, default=str)


def _check_same_models(items, labels, load) -> None:
    """Every checkpoint must be the same architecture, shapes and config as the first."""
    first, first_label = None, None
    for item, label in zip(items, labels):
        if isinstance(item, (str, Path)):
            # loaded on the host only to compare; the pass loads each again, one at a time
            model, cfg = load(item, "cpu")
            sig = _signature(model, {k: cfg.get(k) for k in ("model", "diffusion")})
            del model
        else:
            sig = _signature(item, None)
        if first is None:
            first, first_label = sig, label
            continue
        diff = [
            what
            for what, a, b in zip(("class", "parameter shapes", "config"), first, sig)
            if a != b and not (what == "config" and "null" in (a, b))
        ]
        if diff:
            raise ValueError(
                f"checkpoints {first_label} and {label} are different models (their "
                f"{' and '.join(diff)} differ); task affinity averages checkpoints of ONE model"
            )


def _model_device(model: nn.Module, label: str, device: Any) -> torch.device:
    dev = next(model.parameters()).device
    want = None if device is None else torch.device(device)
    if want is not None and (want.type, want.index or dev.index) != (dev.type, dev.index):
        raise ValueError(f"{label} is on {dev}, not on device={device!r}; move it first")
    return dev


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {list(x.shape)}"
    return type(x).__name__


def load_affinity_checkpoint(path: str | Path, device: Any = None) -> tuple[nn.Module, dict]:
    """Model and config from a checkpoint ``{"model": state_dict, "config": {...}}``.

    ``config["model"]`` is ``{"name": <registered size>, "overrides": {...constructor args}}``
    (or the constructor args inline beside "name"). Loaded with ``weights_only=True``.
    """
    from ..models import create_model

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    ckpt = torch.load(path, map_location=device or "cpu", weights_only=True)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        keys = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path}: expected a dict with 'model' and 'config', got {keys}")
    cfg = ckpt["config"]
    mcfg = dict(cfg.get("model") or {})
    if "name" not in mcfg:
        raise ValueError(f"{path}: config['model'] needs a 'name' (a registered model size)")
    name = mcfg.pop("name")
    overrides = {**mcfg.pop("overrides", {}), **mcfg}
    model = create_model(name, **overrides)
    from ..checkpoint import load_model_state

    load_model_state(model, ckpt["model"], ckpt)
    return model.to(device or "cpu"), cfg

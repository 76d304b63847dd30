"""Method registry: ``make_method("uw+pcgrad", k)`` -> ``Composite``.

Names: "vanilla" (no method: the engine uses the plain mean of per-sample losses), one loss
method ("ls"/"mean", "uw", "rlw", "dwa", "famo"), one gradient method ("pcgrad", "nash", "imtl",
"mgda", "cagrad", "graddrop"), or "<loss>+<grad>". In a composition the gradient method runs on
the gradients of the loss method's transformed terms, which already carry the 1/k, so its
``reduction`` defaults to "sum" (ANT's UW + PCGrad: update = sum_i g_i'; Nash-MTL keeps "mean",
see below); alone it runs on
the raw cluster losses with ``reduction="mean"``. Hyperparameters are routed by name to
whichever of the two methods accepts them (to both when both do).

A loss method's weights are per-cluster scales of the gradients. Before IMTL-G they change the
step's length, not its direction. Before Nash-MTL they change neither: its weights solve
alpha_i (G alpha)_i = 1 on the gradients it is given, so a cluster scaled by c_i gets
alpha_i / c_i and the update is the same; the terms' 1/k is absorbed with them, so a
composition keeps Nash-MTL's "mean" reduction, and "uw+nash" updates the model as "nash" does
at each recomputation (between them the kept weights meet UW's current scales; UW still trains
its s_i).
"""

from __future__ import annotations

import copy
import difflib
import inspect
from typing import Any

import torch
from torch import Tensor

from .base import GramMethod, LossMethod, check_k, check_losses
from .graddrop import GradDrop
from .gram_methods import IMTLG, MGDA, CAGrad, NashMTL, PCGrad
from .loss_methods import DWA, FAMO, LS, RLW, UW

LOSS_METHODS: dict[str, type[LossMethod]] = {
    "ls": LS,
    "mean": LS,
    "uw": UW,
    "rlw": RLW,
    "dwa": DWA,
    "famo": FAMO,
}
GRAD_METHODS: dict[str, type[GramMethod]] = {
    "pcgrad": PCGrad,
    "nash": NashMTL,
    "imtl": IMTLG,
    "mgda": MGDA,
    "cagrad": CAGrad,
    "graddrop": GradDrop,
}


class Composite:
    """One optional loss method followed by one optional gradient method.

    Attributes:
        name: the canonical name ("uw+pcgrad").
        loss: the loss-space method, or None.
        grad: the gradient-space method, or None.
    """

    def __init__(self, name: str, loss: LossMethod | None, grad: GramMethod | None) -> None:
        self.name, self.loss, self.grad = name, loss, grad

    @property
    def is_vanilla(self) -> bool:
        return self.loss is None and self.grad is None

    @property
    def needs(self) -> str:
        """ "none" (loss space only), "gram" (weights from G) or "grads" (J elementwise)."""
        return "none" if self.grad is None else self.grad.needs

    @property
    def update_every(self) -> int:
        return 1 if self.grad is None else self.grad.update_every

    def terms(self, L: Tensor, present: Tensor) -> Tensor:
        """[k] per-cluster terms: their sum is the loss; their gradients are the rows of J.

        The loss method's transform, or the raw cluster losses (0 where absent) when there is
        none (the gradient method then uses ``reduction="mean"``).
        """
        if self.is_vanilla:
            raise ValueError("vanilla has no cluster terms: use the mean of per-sample losses")
        if self.loss is not None:
            return self.loss.transform(L, present)
        check_losses(L, present, self.grad.k)
        return torch.where(present, L, 0.0)

    def weights(self, G: Tensor, present: Tensor, valid: Tensor | None = None) -> Tensor:
        """The gradient method's weights; ``valid`` (0-d bool) False leaves its state as it was
        (a non-finite step), as the gradient method's own ``weights`` does."""
        if self.grad is None:
            raise ValueError(f"{self.name} has no gradient method")
        if valid is None:
            return self.grad.weights(G, present)
        return self.grad.weights(G, present, valid)

    def combine_grads(
        self, J: Tensor, present: Tensor, valid: Tensor | None = None, out: Tensor | None = None
    ) -> Tensor:
        if not isinstance(self.grad, GradDrop):
            raise ValueError(f"{self.name} does not combine gradients elementwise")
        return self.grad.combine_grads(J, present, valid, out)

    def observe(self, L: Tensor, present: Tensor) -> None:
        if self.loss is not None:
            self.loss.observe(L, present)

    def param_groups(self) -> list[dict[str, Any]]:
        return [] if self.loss is None else self.loss.param_groups()

    def to(self, device: torch.device | str) -> Composite:
        if self.loss is not None:
            self.loss.to(device)
        return self

    def state_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "loss": None if self.loss is None else self.loss.state_dict(),
            "grad": None if self.grad is None else self.grad.state_dict(),
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """All or nothing: the state is loaded into a copy first, so a state that fails
        (another k, missing keys) leaves this method as it was."""
        if d.get("name") != self.name:
            raise ValueError(f"state is for method {d.get('name')!r}, this is {self.name!r}")
        copy.deepcopy(self)._load(d)
        self._load(d)

    def _load(self, d: dict[str, Any]) -> None:
        if self.grad is not None:  # first: its check names a state saved at another k
            self.grad.load_state_dict(d["grad"])
        if self.loss is not None:
            try:
                self.loss.load_state_dict(d["loss"])
            except RuntimeError as e:  # torch's own check of the parameter shapes
                if "size mismatch" not in str(e):
                    raise
                raise ValueError(
                    f"{self.loss.name} state does not fit: this method has k={self.loss.k} "
                    f"clusters: the state was saved with another k ({str(e).strip()})"
                ) from e

    def __repr__(self) -> str:
        return f"Composite({self.name!r}, loss={self.loss!r}, grad={self.grad!r})"


def available_methods(compositions: bool = True) -> list[str]:
    """Valid names for ``make_method``: "vanilla", single methods, then "<loss>+<grad>".

    "ls+<grad>" and "mean+<grad>" are accepted too but not listed: equal weights followed by the
    gradient method's sum are the gradient method alone (its mean over the present clusters)."""
    names = ["vanilla", *LOSS_METHODS, *GRAD_METHODS]
    if compositions:
        names += [f"{a}+{b}" for a in LOSS_METHODS if a not in ("ls", "mean") for b in GRAD_METHODS]
    return names


def _hparam_names(cls: type) -> set[str]:
    params = inspect.signature(cls.__init__).parameters
    return {p for p, v in params.items() if v.kind is inspect.Parameter.KEYWORD_ONLY}


def _unknown_name(name: str) -> ValueError:
    names = ["vanilla", *LOSS_METHODS, *GRAD_METHODS,
             *(f"{a}+{b}" for a in LOSS_METHODS for b in GRAD_METHODS)]  # fmt: skip
    close = difflib.get_close_matches(name.lower().replace(" ", ""), names, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ValueError(
        f"unknown MTL method {name!r}{hint}; valid names: vanilla, {', '.join(LOSS_METHODS)}, "
        f"{', '.join(GRAD_METHODS)}, or '<loss>+<grad>' with <loss> in "
        f"{{{', '.join(LOSS_METHODS)}}} and <grad> in {{{', '.join(GRAD_METHODS)}}}"
    )


def make_method(name: str, k: int, **hparams: Any) -> Composite:
    """Build a method by name.

    Args:
        name: see ``available_methods()``; case and spaces around "+" are ignored.
        k: number of clusters.
        **hparams: hyperparameters of the loss and/or gradient method, e.g. ``c=0.5`` for
            CAGrad, ``lr=0.01`` for UW, ``update_every=10`` for Nash.

    Returns:
        The Composite.
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    k = check_k(k)
    parts = [p.strip() for p in name.strip().lower().split("+")]
    if parts == ["vanilla"]:
        if hparams:
            raise ValueError(f"vanilla takes no hyperparameters, got {sorted(hparams)}")
        return Composite("vanilla", None, None)
    if len(parts) == 1 and parts[0] in LOSS_METHODS:
        loss_cls, grad_cls = LOSS_METHODS[parts[0]], None
    elif len(parts) == 1 and parts[0] in GRAD_METHODS:
        loss_cls, grad_cls = None, GRAD_METHODS[parts[0]]
    elif len(parts) == 2 and parts[0] in LOSS_METHODS and parts[1] in GRAD_METHODS:
        loss_cls, grad_cls = LOSS_METHODS[parts[0]], GRAD_METHODS[parts[1]]
    else:
        raise _unknown_name(name)
    loss_keys = _hparam_names(loss_cls) if loss_cls else set()
    grad_keys = _hparam_names(grad_cls) if grad_cls else set()
    unknown = set(hparams) - loss_keys - grad_keys
    if unknown:
        hint = ("; update_every is set for every method by ANT(update_every=N) (config: "
                "ant.update_every)" if "update_every" in unknown else "")  # fmt: skip
        raise ValueError(
            f"unknown hyperparameters {sorted(unknown)} for {name!r}; "
            f"valid: {sorted(loss_keys | grad_keys)}{hint}"
        )
    loss = loss_cls(k, **{a: hparams[a] for a in loss_keys & set(hparams)}) if loss_cls else None
    grad = None
    if grad_cls is not None:
        grad_kw = {a: hparams[a] for a in grad_keys & set(hparams)}
        if loss is not None:  # Nash-MTL absorbs the terms' 1/k (see the module docstring)
            grad_kw.setdefault("reduction", "mean" if grad_cls is NashMTL else "sum")
        grad = grad_cls(k, **grad_kw)
    return Composite("+".join(parts), loss, grad)

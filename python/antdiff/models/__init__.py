"""Model registry: every family's named sizes behind one `create_model(name, **overrides)`.

Families (one file each): ADM UNet ("adm-light", "adm-tiny", "adm-small"), LDM UNet on latents
("ldm-ffhq", "ldm-tiny"; the ADM UNet class in another configuration) and DiT ("DiT-S/2" ...
"DiT-XL/8", "dit-tiny"). Build big sizes on the meta device to count parameters for free:
``with torch.device("meta"): create_model("DiT-XL/2")``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from antdiff.models.adm import ADM_SIZES, UNetModel
from antdiff.models.autoencoder import (
    DiffusersVAE,
    LatentCodec,
    PrecomputedLatents,
    StoredLatentDecoder,
    TinyAutoencoder,
    train_autoencoder,
)
from antdiff.models.dit import DIT_SIZES, DiT
from antdiff.models.ldm import LDM_SIZES

__all__ = [
    "DiT",
    "DiffusersVAE",
    "LatentCodec",
    "PrecomputedLatents",
    "StoredLatentDecoder",
    "TinyAutoencoder",
    "UNetModel",
    "available_models",
    "create_model",
    "model_config",
    "train_autoencoder",
]

_REGISTRY: dict[str, tuple[Callable[..., nn.Module], dict[str, Any]]] = {
    **{name: (UNetModel, cfg) for name, cfg in ADM_SIZES.items()},
    **{name: (UNetModel, cfg) for name, cfg in LDM_SIZES.items()},
    **{name: (DiT, cfg) for name, cfg in DIT_SIZES.items()},
}


def available_models() -> list[str]:
    """Every registered size name."""
    return sorted(_REGISTRY)


def model_config(name: str, **overrides: Any) -> dict[str, Any]:
    """The constructor arguments of size `name` with `overrides` applied."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; available: {available_models()}")
    cls, cfg = _REGISTRY[name]
    valid = set(inspect.signature(cls.__init__).parameters) - {"self"}
    bad = sorted(set(overrides) - valid)
    if bad:
        raise ValueError(
            f"unknown override(s) {bad} for {name!r} ({cls.__name__}); valid: {sorted(valid)}"
        )
    defaults = {k: v.default for k, v in inspect.signature(cls.__init__).parameters.items()}
    overrides = dict(overrides)
    for key, value in overrides.items():
        like = cfg.get(key, defaults.get(key))
        if isinstance(like, float) and isinstance(value, str):  # YAML 1.1 leaves 1e-1 as text
            try:
                value = overrides[key] = float(value)
            except ValueError:
                pass
        if not _same_kind(value, like):
            raise ValueError(
                f"model override {key}={value!r} for {name!r} must be of the kind of its "
                f"default {like!r} ({_kind(like)})"
            )
    return {**cfg, **overrides}


def _kind(x: Any) -> str:
    if isinstance(x, bool):
        return "true or false"
    if isinstance(x, int):
        return "an integer"
    if isinstance(x, float):
        return "a number"
    if isinstance(x, (tuple, list)):
        item = _kind(x[0]).removeprefix("an ").removeprefix("a ") if x else ""
        return f"a list of {item}s" if item else "a list"
    return type(x).__name__


def _same_kind(value: Any, like: Any) -> bool:
    """Whether an override fits its default's kind: an integer, a number, true / false, or a
    list (its items, or one item given alone as a CLI value gives it, are the constructor's to
    check). None (an option switched off) and other defaults are not judged."""
    if value is None or like is None or like is inspect.Parameter.empty:
        return True
    if isinstance(like, bool):
        return isinstance(value, bool)
    if isinstance(like, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(like, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(like, (tuple, list)):
        return isinstance(value, (tuple, list)) or (bool(like) and _same_kind(value, like[0]))
    return True


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build the named size, e.g. create_model("DiT-S/2", num_classes=10, input_size=8)."""
    cfg = model_config(name, **overrides)
    cls = _REGISTRY[name][0]
    try:
        return cls(**cfg)
    except TypeError as exc:  # e.g. a list override given one value the constructor cannot take
        if not overrides:
            raise
        raise ValueError(
            f"model overrides {overrides} do not fit {name!r} ({cls.__name__}): {exc}"
        ) from exc

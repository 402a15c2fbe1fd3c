"""Model registry: a table of name -> builder, default configuration, published weights and preprocessing.

Each family file ends with its table of `Variant`s, collected in `hybridvit.models.VARIANTS`.
`build_model` builds an entry with random weights; `hybridvit.loading.create_model` adds the weights.
"""
from __future__ import annotations

import difflib
import fnmatch
from typing import Any

import torch
from torch import nn

from .models import VARIANTS
from .models._variant import IMAGENET_MEAN, IMAGENET_STD, Variant, with_input_size

ModelEntry = Variant  # the registry's entry type (name, family, builder, config, weights, top-1, pretrained_cfg)

_REGISTRY: dict[str, Variant] = dict(VARIANTS)

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "ModelEntry", "Variant", "list_models", "get_entry", "build_model",
           "count_params", "meta_model"]


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching an fnmatch pattern, e.g. `list_models('fastervit_*')`."""
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


# characters a typo swaps for look-alikes: O/o for 0, l/I/i for 1, - for _, S for 5, B for 8...
_LOOKALIKE = str.maketrans({"o": "0", "l": "1", "i": "1", "-": "_", " ": "_", ".": "_", "s": "5", "z": "2",
                            "b": "8", "g": "9"})


def _canonical(name: str) -> str:
    return name.strip().lower().translate(_LOOKALIKE)


def close_names(name: str, names: list[str], n: int = 5) -> list[str]:
    """Up to `n` of `names` close to `name`, the closest first: those equal to it up to case and look-alike
    characters (`fastervit_O` -> `fastervit_0`), then difflib's close matches of the lower-cased name."""
    key = _canonical(name)
    exact = [m for m in names if _canonical(m) == key]
    lowered = {m.lower(): m for m in names}
    fuzzy = [lowered[m] for m in difflib.get_close_matches(name.strip().lower(), list(lowered), n=n, cutoff=0.5)]
    return list(dict.fromkeys(exact + fuzzy))[:n]


def get_entry(name: str) -> Variant:
    """The registry entry of `name` (config, weights source, top-1, `license`, pretrained_cfg)."""
    if name not in _REGISTRY:
        close = close_names(name, list(_REGISTRY))
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown model {name!r}.{hint} `hybridvit models` lists all {len(_REGISTRY)} models.")
    return _REGISTRY[name]


def build_model(name: str, *, num_classes: int = 1000, in_chans: int = 3, **overrides: Any) -> nn.Module:
    """The registered model `name` with random weights, `overrides` replacing configuration fields of the
    variant (`drop_path_rate`, `img_size`, `depths`, ...), and `pretrained_cfg`, `model_name` and
    `model_kwargs` (the overrides) attached. Weights and sources: `hybridvit.loading.create_model`."""
    entry = get_entry(name)
    model = entry.builder(num_classes=num_classes, in_chans=in_chans, **{**entry.config, **overrides})
    model.pretrained_cfg = with_input_size(entry.pretrained_cfg, in_chans, overrides.get("img_size"))
    model.model_name = name
    model.model_kwargs = dict(overrides)
    return model


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def meta_model(name: str, **kwargs: Any) -> nn.Module:
    """The model built on the `meta` device (no memory, instant): for parameter counts and key lists."""
    with torch.device("meta"):
        return build_model(name, **kwargs)

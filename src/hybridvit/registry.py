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


def get_entry(name: str) -> Variant:
    """The registry entry of `name` (config, weights source, top-1, `license`, pretrained_cfg)."""
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=5, cutoff=0.5)
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

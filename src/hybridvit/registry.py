"""Model registry: name -> builder, default configuration, published weights and preprocessing.

Each family file registers its variants with `register_model`. `create_model` builds a model,
applies configuration overrides, switches it to feature extraction, and loads weights.
"""
from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelEntry:
    """What the registry knows of one variant."""

    name: str
    family: str
    builder: Callable[..., nn.Module]
    config: dict[str, Any]
    url: str | None = None            # published checkpoint (direct download)
    weights_hint: str | None = None   # where to get weights when there is no direct URL
    top1: float | None = None         # published ImageNet top-1
    published: bool = True            # False: no weights exist anywhere (weights_hint says so)
    pretrained_cfg: dict[str, Any] = field(default_factory=dict)


_REGISTRY: dict[str, ModelEntry] = {}


def default_pretrained_cfg(img_size: int = 224, crop_pct: float = 0.875, interpolation: str = "bicubic",
                           mean=IMAGENET_MEAN, std=IMAGENET_STD, **extra: Any) -> dict[str, Any]:
    return dict(input_size=(3, img_size, img_size), crop_pct=crop_pct, interpolation=interpolation,
                mean=tuple(mean), std=tuple(std), **extra)


def register_model(name: str, family: str, builder: Callable[..., nn.Module], config: dict[str, Any], *,
                   url: str | None = None, weights_hint: str | None = None, top1: float | None = None,
                   published: bool = True, pretrained_cfg: dict[str, Any] | None = None) -> None:
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is registered twice")
    _REGISTRY[name] = ModelEntry(name, family, builder, dict(config), url, weights_hint, top1,
                                 published and bool(url or weights_hint),
                                 pretrained_cfg or default_pretrained_cfg())


def _ensure_families_loaded() -> None:
    from . import models  # noqa: F401  (registers every family)


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching an fnmatch pattern, e.g. `list_models('fastervit_*')`."""
    _ensure_families_loaded()
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def get_entry(name: str) -> ModelEntry:
    _ensure_families_loaded()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=5, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown model {name!r}.{hint} `hybridvit models` lists all {len(_REGISTRY)} models.")
    return _REGISTRY[name]


def create_model(name: str | None, *, pretrained: bool | str = False, num_classes: int | None = None,
                 in_chans: int = 3, features_only: bool = False, out_indices: tuple[int, ...] | None = None,
                 **overrides: Any) -> nn.Module:
    """Builds a registered model.

    pretrained: False, True (the variant's published weights, downloaded once into the torch hub
    cache), or a path to an official or hybridvit checkpoint. With `features_only=True` the model
    returns the NCHW maps of `out_indices` (default: every stage, (0, 1, 2, 3) for the hierarchical
    models at strides 4/8/16/32; CabViT-P has one stride-16 map). Overrides replace any configuration
    field of the variant (`drop_path_rate`, `img_size`, `depths`, ...). A save_pretrained folder or
    "hf-hub:ORG/REPO" (as `name` or `pretrained`) builds the architecture of its config.json (hybridvit.hub);
    num_classes then defaults to the folder's, otherwise to 1000.
    """
    from .hub import create_from_hub, hub_source
    if (source := hub_source(name, pretrained)) is not None:
        return create_from_hub(source, name, num_classes=num_classes, in_chans=in_chans,
                               features_only=features_only, out_indices=out_indices, **overrides)
    num_classes = 1000 if num_classes is None else num_classes
    entry = get_entry(name)
    cfg = dict(entry.config)
    cfg.update(overrides)
    model = entry.builder(num_classes=num_classes, in_chans=in_chans, **cfg)
    model.pretrained_cfg = dict(entry.pretrained_cfg)
    if "img_size" in overrides and isinstance(overrides["img_size"], int):
        s = overrides["img_size"]
        model.pretrained_cfg["input_size"] = (in_chans, s, s)
    model.model_name = name
    model.model_kwargs = dict(overrides)
    if pretrained:
        from .checkpoint import load_checkpoint, resolve_pretrained
        path = resolve_pretrained(entry, pretrained)
        load_checkpoint(model, path)
    if features_only:
        if out_indices is None:
            out_indices = tuple(range(len(model.stage_info)))
        model.set_features_only(tuple(out_indices))
    return model


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def meta_model(name: str, **kwargs: Any) -> nn.Module:
    """The model built on the `meta` device (no memory, instant): for parameter counts and key lists."""
    with torch.device("meta"):
        return create_model(name, **kwargs)

"""Model registry: name -> builder, default configuration, published weights and preprocessing.

Each family file ends with its table of `Variant`s, collected in `hybridvit.models.VARIANTS`.
`create_model` builds a model, applies configuration overrides, loads weights, and switches it to
feature extraction.
"""
from __future__ import annotations

import difflib
import fnmatch
from typing import Any

import torch
from torch import nn

from .models import VARIANTS
from .models._variant import IMAGENET_MEAN, IMAGENET_STD, Variant

ModelEntry = Variant  # the registry's entry type (name, family, builder, config, weights, top-1, pretrained_cfg)

_REGISTRY: dict[str, Variant] = dict(VARIANTS)

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "ModelEntry", "Variant", "list_models", "get_entry", "create_model",
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


def create_model(name: str | None, *, pretrained: bool | str = False, num_classes: int | None = None,
                 in_chans: int = 3, features_only: bool = False, out_indices: tuple[int, ...] | None = None,
                 **overrides: Any) -> nn.Module:
    """Builds a registered model.

    pretrained: False, True (the variant's published weights, downloaded once into the torch hub
    cache), or a path to an official or hybridvit checkpoint. With `features_only=True` the model
    returns the NCHW maps of `out_indices` (default: every stage, (0, 1, 2, 3) for the hierarchical
    models at strides 4/8/16/32; CabViT-P: its 3 stride-16 stages); the stages after the last of them,
    the final norm and the head are removed. Overrides replace any configuration field of the variant
    (`drop_path_rate`, `img_size`, `depths`, ...). A save_pretrained folder or "hf-hub:ORG/REPO" (as
    `name` or `pretrained`) builds the architecture of its config.json (hybridvit.hub); num_classes
    then defaults to the folder's, otherwise to 1000.
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
        if model.pretrained_cfg.get("pool_size"):
            model.pretrained_cfg["pool_size"] = (-(-s // 32),) * 2
    for key in ("input_size", "min_input_size"):  # (channels, H, W)
        model.pretrained_cfg[key] = (in_chans, *model.pretrained_cfg[key][1:])
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

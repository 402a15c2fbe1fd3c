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
           "count_params", "meta_model", "OFFICIAL_NAMES", "resolve_name"]

_CROSSFORMER_SIZES = {"t": "tiny", "s": "small", "b": "base", "l": "large"}
_CROSSFORMERPP_SIZES = {"s": "small", "b": "base", "l": "large", "h": "huge"}
# the official code's names of the variants (builder functions, config NAMEs, the READMEs' spellings) ->
# hybridvit's: accepted wherever a model name is (create_model, timm.create_model, every command), never
# listed (`list_models` gives each model once)
OFFICIAL_NAMES: dict[str, str] = {
    **{f"faster_vit_{i}_224": f"fastervit_{i}" for i in range(7)},
    **{f"faster_vit_4_21k_{s}": f"fastervit_4_21k_{s}" for s in (224, 384, 512, 768)},
    **{f"crossformer-{k}": f"crossformer_{k}" for k in _CROSSFORMER_SIZES},
    **{f"cros_{v}_patch4_group7_224": f"crossformer_{k}" for k, v in _CROSSFORMER_SIZES.items()},
    **{f"crossformer++-{k}": f"crossformerpp_{k}" for k in _CROSSFORMERPP_SIZES},
    **{f"cros_pp_{v}_patch4_group_const_224": f"crossformerpp_{k}" for k, v in _CROSSFORMERPP_SIZES.items()},
    "cabvit_p_l0": "cabvit_p_tiny",
}


def resolve_name(name: str) -> str:
    """hybridvit's name of `name`: itself, or the model an official name (`OFFICIAL_NAMES`, any case) means."""
    if name in _REGISTRY:
        return name
    return OFFICIAL_NAMES.get(name, OFFICIAL_NAMES.get(name.strip().lower(), name))


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
    """The registry entry of `name` (config, weights source, top-1, `license`, pretrained_cfg); official names
    resolve to hybridvit's (`resolve_name`)."""
    resolved = resolve_name(name)
    if resolved not in _REGISTRY:
        # an official name close to it counts as its hybridvit model (faster_vit_0 -> fastervit_0 first)
        candidates = close_names(name, list(_REGISTRY) + list(OFFICIAL_NAMES), n=8)
        close = list(dict.fromkeys(OFFICIAL_NAMES.get(c, c) for c in candidates))[:5]
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown model {name!r}.{hint} `hybridvit models` lists all {len(_REGISTRY)} models.")
    return _REGISTRY[resolved]


def build_model(name: str, *, num_classes: int = 1000, in_chans: int = 3, **overrides: Any) -> nn.Module:
    """The registered model `name` with random weights, `overrides` replacing configuration fields of the
    variant (`drop_path_rate`, `img_size`, `depths`, ...), and `pretrained_cfg`, `model_name` and
    `model_kwargs` (the overrides) attached. Weights and sources: `hybridvit.loading.create_model`."""
    entry = get_entry(name)
    model = entry.builder(num_classes=num_classes, in_chans=in_chans, **{**entry.config, **overrides})
    model.pretrained_cfg = with_input_size(entry.pretrained_cfg, in_chans, overrides.get("img_size"))
    model.model_name = entry.name
    model.model_kwargs = dict(overrides)
    return model


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def meta_model(name: str, **kwargs: Any) -> nn.Module:
    """The model built on the `meta` device (no memory, instant): for parameter counts and key lists."""
    with torch.device("meta"):
        return build_model(name, **kwargs)

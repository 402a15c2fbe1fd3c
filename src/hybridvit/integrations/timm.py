"""hybridvit's models in timm's registry, so `timm.create_model`, timm's data config and its
train/validate/benchmark scripts take them.

`import hybridvit` registers every hybridvit model under its own name (`fastervit_0`, `crossformer_t`,
...) once timm is imported; a name timm already uses keeps timm's model and hybridvit's is registered as
`hybridvit_<name>` instead (`timm_names()` maps one to the other). A folder written by
`hybridvit.save_pretrained` (local or on the Hub) loads with
`timm.create_model("hf-hub:ORG/REPO", pretrained=True)` or `timm.create_model("local-dir:/path", pretrained=True)`.

The models are hybridvit's own classes: timm's generic knobs that they do not have (`global_pool` other
than average, `drop_block_rate`, `bn_*`) are refused with an error, not ignored.
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Callable
from typing import Any

from torch import nn

from ..hub import HF_HUB_PREFIX
from ..loading import create_model
from ..registry import get_entry, list_models

# timm's register_model reads the pretrained configs of the entrypoint's module from `default_cfgs`
default_cfgs: dict[str, dict[str, Any]] = {}
_TIMM_NAMES: dict[str, str] = {}  # hybridvit name -> name in timm's registry


def timm_names() -> dict[str, str]:
    """hybridvit name -> timm name, for the models registered so far (empty before timm is imported)."""
    return dict(_TIMM_NAMES)


def _pretrained_cfg_fields() -> set[str]:
    from timm.models import PretrainedCfg
    return {f.name for f in dataclasses.fields(PretrainedCfg)}


def _as_dict(cfg: Any) -> dict[str, Any]:
    if cfg is None or isinstance(cfg, str):
        return {}
    if isinstance(cfg, dict):
        return dict(cfg)
    return cfg.to_dict()  # timm's PretrainedCfg


def _timm_cfg(name: str, timm_name: str, fields: set[str]) -> dict[str, Any]:
    """The variant's pretrained_cfg in timm's terms (fields timm's PretrainedCfg knows)."""
    entry = get_entry(name)
    cfg = {k: v for k, v in entry.pretrained_cfg.items() if k in fields}
    cfg.setdefault("crop_mode", "center")
    cfg.setdefault("classifier", "head")
    cfg.update(architecture=timm_name, num_classes=1000, url=entry.url or "")
    return cfg


def _create(name: str, timm_name: str, pretrained: bool, pretrained_cfg: Any, overlay: dict[str, Any] | None,
            cache_dir: str | os.PathLike | None, kwargs: dict[str, Any]) -> nn.Module:
    if isinstance(pretrained_cfg, str) and pretrained_cfg:
        raise ValueError(f"{timm_name} has no pretrained tag {pretrained_cfg!r}: hybridvit models have one "
                         f"set of weights each (timm.create_model({timm_name!r}, pretrained=True))")
    cfg = {**_as_dict(pretrained_cfg), **(overlay or {})}
    pool = kwargs.pop("global_pool", "avg")
    if pool not in ("avg", ""):
        raise ValueError(f"{timm_name} pools by average only, got global_pool={pool!r}")
    for knob in ("drop_block_rate", "bn_momentum", "bn_eps"):
        if knob in kwargs:
            raise ValueError(f"{timm_name} (a hybridvit model) has no {knob}")
    if not kwargs.get("drop_rate"):
        kwargs.pop("drop_rate", None)  # timm's scripts pass drop_rate=0.0; CabViT has no such argument
    kwargs.setdefault("num_classes", cfg.get("num_classes", 1000))
    source = cfg.get("source")
    hub_id = cfg.get("hf_hub_id") if source == "hf-hub" else None
    folder = cfg.get("file") if source == "local-dir" else None
    if pretrained and (hub_id or folder):
        model = create_model(name, pretrained=HF_HUB_PREFIX + hub_id if hub_id else folder, cache_dir=cache_dir,
                             **kwargs)
    else:
        model = create_model(name, pretrained=bool(pretrained), **kwargs)
        if cfg.get("label_names") and model.num_classes == len(cfg["label_names"]):
            model.class_names = list(cfg["label_names"])
    # the model's own fields (its input size) win; timm's add where the weights came from
    model.pretrained_cfg = {**cfg, **getattr(model, "pretrained_cfg", {}), "architecture": timm_name,
                            "num_classes": model.num_classes}
    return model


def _entrypoint(name: str, timm_name: str) -> Callable[..., nn.Module]:
    def entrypoint(pretrained: bool = False, pretrained_cfg: Any = None, pretrained_cfg_overlay: Any = None,
                   cache_dir: str | os.PathLike | None = None, pretrained_model_args: Any = None,
                   **kwargs: Any) -> nn.Module:
        # pretrained_model_args: timm's copy of a hub config's model_args, already merged into kwargs
        return _create(name, timm_name, pretrained, pretrained_cfg, pretrained_cfg_overlay, cache_dir, kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = timm_name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"hybridvit's {name} (hybridvit.create_model({name!r}, ...))."
    return entrypoint


def register_timm_models() -> dict[str, str]:
    """Adds every hybridvit model missing from timm's registry; idempotent. Returns hybridvit -> timm names."""
    from timm.models import is_model, register_model

    fields = _pretrained_cfg_fields()
    for name in list_models():
        if name in _TIMM_NAMES:
            continue
        timm_name = name if not is_model(name) else f"hybridvit_{name}"
        if is_model(timm_name):
            warnings.warn(f"timm already has {name} and {timm_name}: hybridvit's {name} is not registered in timm",
                          stacklevel=2)
            continue
        default_cfgs[timm_name] = _timm_cfg(name, timm_name, fields)
        register_model(_entrypoint(name, timm_name))
        _TIMM_NAMES[name] = timm_name
    return dict(_TIMM_NAMES)

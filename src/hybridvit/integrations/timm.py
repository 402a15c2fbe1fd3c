"""hybridvit's models in timm's registry, so `timm.create_model`, timm's data config and its
train/validate/benchmark scripts take them.

`import hybridvit` registers every hybridvit model under its own name (`fastervit_0`, `crossformer_t`,
...) once timm is imported; a name timm already uses keeps timm's model and hybridvit's is registered as
`hybridvit_<name>` instead (`timm_names()` maps one to the other). A folder written by
`hybridvit.save_pretrained` (local or on the Hub) loads with
`timm.create_model("hf-hub:ORG/REPO", pretrained=True)` or `timm.create_model("local-dir:/path", pretrained=True)`.

The models are hybridvit's own classes with timm's model interface (`default_cfg`, `feature_info`,
`get_classifier`, `reset_classifier(n, global_pool)`, `no_weight_decay`, `group_matcher`, FX tracing).
`timm.create_model(name, features_only=True, out_indices=..., feature_cls='getter')` gives hybridvit's
backbone (timm's default feature_cls too); `device` and `dtype` are honoured. timm's generic knobs that
they do not have (a `global_pool` other than average / class token or none, `drop_block_rate`, `bn_*`,
a dilated `output_stride`, `feature_cls` 'hook' or 'fx') are refused with an error, not ignored.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..hub import HF_HUB_PREFIX
from ..loading import create_model
from ..models._schema import check_file_config, schema_for
from ..registry import OFFICIAL_NAMES, get_entry, list_models

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


def _feature_kwargs(timm_name: str, kwargs: dict[str, Any]) -> None:
    """timm's features_only arguments, checked: hybridvit's backbone is timm's 'getter' kind (the maps of
    `forward_intermediates`), the default too; strides are fixed (no dilated `output_stride`)."""
    feature_cls = kwargs.pop("feature_cls", None)
    output_stride = kwargs.pop("output_stride", None)
    if feature_cls is not None and not (isinstance(feature_cls, str) and feature_cls.lower() == "getter"):
        raise ValueError(f"{timm_name} (a hybridvit model) builds its features_only backbone from "
                         f"forward_intermediates (timm's feature_cls='getter'); feature_cls={feature_cls!r} is "
                         "not supported")
    if output_stride not in (None, 32):
        raise ValueError(f"{timm_name} (a hybridvit model) has fixed strides 4, 8, 16, 32 (window and group "
                         f"attention have no dilated form): output_stride={output_stride} is not supported")
    kwargs.pop("flatten_sequential", None)  # timm's FX/hook wrappers' argument; the getter needs none
    feature_cfg = kwargs.pop("feature_cfg", None) or {}
    if feature_cfg:
        raise ValueError(f"{timm_name} (a hybridvit model) takes no feature_cfg, got {feature_cfg!r}")


def _create(name: str, timm_name: str, pretrained: bool, pretrained_cfg: Any, overlay: dict[str, Any] | None,
            cache_dir: str | os.PathLike | None, kwargs: dict[str, Any]) -> nn.Module:
    if isinstance(pretrained_cfg, str) and pretrained_cfg:
        raise ValueError(f"{timm_name} has no pretrained tag {pretrained_cfg!r}: hybridvit models have one "
                         f"set of weights each (timm.create_model({timm_name!r}, pretrained=True))")
    cfg = {**_as_dict(pretrained_cfg), **(overlay or {})}
    global_pool = kwargs.pop("global_pool", None)
    for knob in ("drop_block_rate", "bn_momentum", "bn_eps"):
        if knob in kwargs:
            raise ValueError(f"{timm_name} (a hybridvit model) has no {knob}")
    _feature_kwargs(timm_name, kwargs)
    if not kwargs.get("drop_rate"):
        kwargs.pop("drop_rate", None)  # timm's scripts pass drop_rate=0.0; CabViT has no such argument
    device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
    kwargs.setdefault("num_classes", cfg.get("num_classes", 1000))
    source = cfg.get("source")
    hub_id = cfg.get("hf_hub_id") if source == "hf-hub" else None
    folder = cfg.get("file") if source == "local-dir" else None
    with torch.device(device) if device is not None else contextlib.nullcontext():
        if pretrained and (hub_id or folder):
            model = create_model(name, pretrained=HF_HUB_PREFIX + hub_id if hub_id else folder,
                                 cache_dir=cache_dir, **kwargs)
        else:
            model = create_model(name, pretrained=bool(pretrained), **kwargs)
            if cfg.get("label_names") and model.num_classes == len(cfg["label_names"]):
                model.class_names = list(cfg["label_names"])
    if dtype is not None:
        model.to(dtype=dtype)
    if global_pool is not None and not model.features_only:
        model._set_global_pool(global_pool, model.num_classes)
    # the model's own fields (its input size) win; timm's add where the weights came from
    model.pretrained_cfg = {**cfg, **getattr(model, "pretrained_cfg", {}), "architecture": timm_name,
                            "num_classes": model.num_classes}
    return model


def _entrypoint(name: str, timm_name: str) -> Callable[..., nn.Module]:
    def entrypoint(pretrained: bool = False, pretrained_cfg: Any = None, pretrained_cfg_overlay: Any = None,
                   cache_dir: str | os.PathLike | None = None, pretrained_model_args: Any = None,
                   **kwargs: Any) -> nn.Module:
        # pretrained_model_args: timm's copy of a hub config's model_args, already merged into kwargs. They
        # come from a file: checked as data (construction keys of the family only), as hybridvit's own loader does
        if pretrained_model_args:
            entry = get_entry(name)
            check_file_config(pretrained_model_args, schema_for(entry.family, entry.builder),
                              f"the Hub config of {timm_name}")
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
    # the official code's names too (timm.create_model("faster_vit_0_224") builds fastervit_0), where timm
    # has no model of that name; they are not in timm_names() (each model is tested once, under its own name)
    for alias, name in OFFICIAL_NAMES.items():
        if name in _TIMM_NAMES and not is_model(alias):
            default_cfgs[alias] = _timm_cfg(name, alias, fields)
            register_model(_entrypoint(name, alias))
    return dict(_TIMM_NAMES)

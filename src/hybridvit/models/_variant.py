"""One registry shape for every family: a `Variant` (configuration, weights source, top-1, preprocessing).

Each family file ends with a table of `Variant`s; `hybridvit.models` collects them and
`hybridvit.registry` serves them (the registry imports the models, never the other way round).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD  # noqa: F401 (re-exported for the variant tables)

# licences of the published weights / official code
LICENSE_NVIDIA_NC = "nvidia-source-code-license-nc"   # FasterViT: NVIDIA Source Code License-NC (non-commercial)
LICENSE_MIT = "mit"                                    # CrossFormer / CrossFormer++
LICENSE_NONE = "unspecified"                           # CabViT: the official repository states none


@dataclass(frozen=True)
class Variant:
    """What the registry knows of one model name."""

    name: str
    family: str
    builder: Callable[..., nn.Module]
    config: dict[str, Any]
    url: str | None = None            # published checkpoint (direct download)
    weights_hint: str | None = None   # where to get weights when there is no direct URL
    top1: float | None = None         # published ImageNet top-1
    published: bool = True            # False: no weights exist anywhere (weights_hint says so)
    pretrained_cfg: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "published", self.published and bool(self.url or self.weights_hint))

    @property
    def license(self) -> str:
        """Licence of the published weights (or of the official code where none are published)."""
        return self.pretrained_cfg.get("license", LICENSE_NONE)


def pretrained_cfg(*, img_size: int = 224, crop_pct: float = 0.875, crop_mode: str = "center",
                   interpolation: str = "bicubic", mean: tuple[float, ...] = IMAGENET_MEAN,
                   std: tuple[float, ...] = IMAGENET_STD, first_conv: str | tuple[str, ...], classifier: str = "head",
                   reduction: int | None = 32, min_input_size: int, license: str, origin_url: str,
                   paper_ids: str, num_classes: int = 1000) -> dict[str, Any]:
    """timm's pretrained_cfg fields. `first_conv`: the layer(s) that read the image; `reduction`: stride of
    the last map (pool_size = img_size / it; None for a class-token model); `min_input_size`: the smallest
    image side the model accepts (the model class's `min_input_size`, its one owner)."""
    return dict(input_size=(3, img_size, img_size), min_input_size=(3, min_input_size, min_input_size),
                crop_pct=crop_pct, crop_mode=crop_mode, interpolation=interpolation, mean=tuple(mean),
                std=tuple(std), first_conv=first_conv, classifier=classifier,
                pool_size=(img_size // reduction,) * 2 if reduction else None, license=license,
                origin_url=origin_url, paper_ids=paper_ids, num_classes=num_classes)


def with_input_size(cfg: dict[str, Any], in_chans: int | None = None,
                    img_size: int | tuple[int, int] | list[int] | None = None) -> dict[str, Any]:
    """`cfg` (a pretrained_cfg) for `in_chans` input channels at `img_size` (a side or (H, W); None keeps
    the configured size): input_size, min_input_size and pool_size follow. The one place that writes them."""
    cfg = dict(cfg)
    chans = int(in_chans or cfg["input_size"][0])
    h, w = cfg["input_size"][1:]
    if isinstance(img_size, int):
        h = w = img_size
    elif isinstance(img_size, (tuple, list)) and len(img_size) == 2:
        h, w = (int(s) for s in img_size)
    if img_size is not None and cfg.get("pool_size"):
        cfg["pool_size"] = (-(-h // 32), -(-w // 32))
    cfg["input_size"] = (chans, h, w)
    if cfg.get("min_input_size"):
        cfg["min_input_size"] = (chans, *tuple(cfg["min_input_size"])[1:])
    return cfg

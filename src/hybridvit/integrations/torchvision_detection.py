"""hybridvit models as backbones of torchvision's detection models (FPN, Faster R-CNN, Mask R-CNN).

`DetectionBackbone` needs only torch: a `features_only` model whose forward returns an `OrderedDict`
{"0": stride-4 map, "1": stride-8, ...} (torchvision's naming) with `out_channels` (channels per map),
plus mmdet/detectron2's `frozen_stages` and `norm_eval`. `FPNBackbone`, `fasterrcnn` and `maskrcnn` import
torchvision when called::

    from hybridvit.integrations.torchvision_detection import maskrcnn
    model = maskrcnn("fastervit_0", num_classes=91, pretrained_backbone=True, frozen_stages=1, norm_eval=True)
    losses = model(images, targets)          # torchvision's Mask R-CNN, any image size

The backbones take any input size (windows and groups are padded inside the models), so torchvision's
resize to 800x1333 and padding to multiples of 32 need no window-size alignment.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..data.transforms import Preprocess
from ..loading import create_model

_HEAD_PARTS = ("stages", "norm", "head")


class DetectionBackbone(nn.Module):
    """(B, C, H, W) -> OrderedDict {"0": (B, out_channels[0], H/strides[0], W/strides[0]), ...}.

    model: a registered name (built with `features_only=True`, `pretrained` and `create_kwargs`) or a
    hybridvit model (switched to features_only). frozen_stages: -1 trains everything; 0 freezes the stem
    (patch embedding); k >= 1 freezes the stem and stages 0..k-1 (and the final norm once every stage is
    frozen): their parameters stop requiring gradients and they stay in eval mode. norm_eval: every
    BatchNorm stays in eval mode while training (running statistics and affine use fixed, as for small
    detection batches); LayerNorms have no running statistics and are unaffected.
    """

    def __init__(self, model: nn.Module | str, *, out_indices: tuple[int, ...] | None = None,
                 frozen_stages: int = -1, norm_eval: bool = False, pretrained: bool | str = False,
                 **create_kwargs: Any) -> None:
        super().__init__()
        if isinstance(model, str):
            model = create_model(model, pretrained=pretrained, features_only=True, out_indices=out_indices,
                                 **create_kwargs)
        elif create_kwargs or pretrained:
            raise ValueError("pretrained and create_model arguments go with a model name, not a built model")
        elif not getattr(model, "features_only", False) or out_indices is not None:
            n = len(model.stage_info)
            model.set_features_only(tuple(range(n)) if out_indices is None else tuple(out_indices))
        self.body = model
        info = model.feature_info
        self.out_channels: list[int] = [int(c) for c in info.channels()]
        self.strides: list[int] = [int(r) for r in info.reduction()]
        self.names: list[str] = [str(i) for i in range(len(self.out_channels))]
        n_stages = len(getattr(model, "stages", model.stage_info))
        if not -1 <= frozen_stages <= n_stages:
            raise ValueError(f"frozen_stages must be -1 (none), 0 (stem) .. {n_stages} (every stage), "
                             f"got {frozen_stages}")
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        for p in self._frozen_parameters():
            p.requires_grad_(False)
        self.train(self.training)

    def _frozen_modules(self) -> list[nn.Module]:
        if self.frozen_stages < 0:
            return []
        body = self.body
        mods = [m for name, m in body.named_children() if name not in _HEAD_PARTS]  # stem, patch_embed, ...
        stages = getattr(body, "stages", [])
        mods += list(stages[:self.frozen_stages])
        if self.frozen_stages >= len(stages) and hasattr(body, "norm"):
            mods.append(body.norm)
        return mods

    def _frozen_parameters(self) -> list[nn.Parameter]:
        params = [p for m in self._frozen_modules() for p in m.parameters()]
        if self.frozen_stages >= 0:  # parameters held by the model itself: cls_token, pos_embed
            params += list(self.body.parameters(recurse=False))
        return params

    def train(self, mode: bool = True) -> DetectionBackbone:
        super().train(mode)
        for m in self._frozen_modules():
            m.eval()
        if mode and self.norm_eval:
            for m in self.body.modules():
                if isinstance(m, _BatchNorm):
                    m.eval()
        return self

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return OrderedDict(zip(self.names, self.body(x)))


class FPNBackbone(nn.Module):
    """DetectionBackbone + torchvision's FeaturePyramidNetwork (with a max-pooled extra level):
    (B, C, H, W) -> OrderedDict {"0".."n-1", "pool"} of `out_channels`-channel maps; what torchvision's
    FasterRCNN / MaskRCNN take as `backbone`."""

    def __init__(self, backbone: DetectionBackbone, out_channels: int = 256) -> None:
        super().__init__()
        from torchvision.ops import FeaturePyramidNetwork
        from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

        self.body = backbone
        self.fpn = FeaturePyramidNetwork(backbone.out_channels, out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels
        self.featmap_names = list(backbone.names)
        self.strides = list(backbone.strides) + [2 * backbone.strides[-1]]

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return self.fpn(self.body(x))


def fpn_backbone(name: str, *, pretrained: bool | str = False, out_indices: tuple[int, ...] | None = None,
                 frozen_stages: int = -1, norm_eval: bool = False, fpn_channels: int = 256,
                 **create_kwargs: Any) -> FPNBackbone:
    """A registered model as an FPN backbone for torchvision's detectors."""
    body = DetectionBackbone(name, out_indices=out_indices, frozen_stages=frozen_stages, norm_eval=norm_eval,
                             pretrained=pretrained, **create_kwargs)
    return FPNBackbone(body, fpn_channels)


def _rcnn_parts(backbone: FPNBackbone) -> dict[str, Any]:
    """Anchors of 8x each level's stride (torchvision's 32..512 for strides 4..64) and RoI pooling over the
    backbone's own maps; the image normalisation of the backbone's pretrained_cfg."""
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.ops import MultiScaleRoIAlign

    sizes = tuple((8 * s,) for s in backbone.strides)
    pre = Preprocess.from_cfg(getattr(backbone.body.body, "pretrained_cfg", None) or {"input_size": (3, 224, 224)})
    return dict(rpn_anchor_generator=AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes)),
                box_roi_pool=MultiScaleRoIAlign(backbone.featmap_names, output_size=7, sampling_ratio=2),
                image_mean=list(pre.mean), image_std=list(pre.std))


def fasterrcnn(name: str, num_classes: int, *, pretrained_backbone: bool | str = False,
               frozen_stages: int = -1, norm_eval: bool = False, fpn_channels: int = 256,
               backbone_kwargs: dict[str, Any] | None = None, **rcnn_kwargs: Any) -> nn.Module:
    """torchvision's FasterRCNN on a hybridvit FPN backbone. `rcnn_kwargs` go to FasterRCNN (min_size,
    max_size, box_detections_per_img, ...); `backbone_kwargs` to create_model."""
    from torchvision.models.detection import FasterRCNN

    backbone = fpn_backbone(name, pretrained=pretrained_backbone, frozen_stages=frozen_stages,
                            norm_eval=norm_eval, fpn_channels=fpn_channels, **(backbone_kwargs or {}))
    return FasterRCNN(backbone, num_classes=num_classes, **{**_rcnn_parts(backbone), **rcnn_kwargs})


def maskrcnn(name: str, num_classes: int, *, pretrained_backbone: bool | str = False,
             frozen_stages: int = -1, norm_eval: bool = False, fpn_channels: int = 256,
             backbone_kwargs: dict[str, Any] | None = None, **rcnn_kwargs: Any) -> nn.Module:
    """torchvision's MaskRCNN on a hybridvit FPN backbone (arguments as `fasterrcnn`)."""
    from torchvision.models.detection import MaskRCNN
    from torchvision.ops import MultiScaleRoIAlign

    backbone = fpn_backbone(name, pretrained=pretrained_backbone, frozen_stages=frozen_stages,
                            norm_eval=norm_eval, fpn_channels=fpn_channels, **(backbone_kwargs or {}))
    parts = _rcnn_parts(backbone)
    parts["mask_roi_pool"] = MultiScaleRoIAlign(backbone.featmap_names, output_size=14, sampling_ratio=2)
    return MaskRCNN(backbone, num_classes=num_classes, **{**parts, **rcnn_kwargs})

"""What every hybridvit classifier shares: the timm-style interface of the design's contract."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..layers.cpu_bf16 import bf16_kernel_policy

_POLICY_METHODS = ("forward", "forward_features", "forward_intermediates")


class HybridModel(nn.Module):
    """Base class of the family models.

    A family implements `forward_features(x) -> (B, C, H, W)`, `forward_intermediates(x) -> list of
    four NCHW maps at strides 4, 8, 16, 32`, `forward_head(x, pre_logits)` and
    `convert_official(state_dict)`, and sets `num_features`, `head` and `stage_info` (channels and
    stride per stage).

    `cpu_bf16_kernels` ("auto", "native" or "fp32") chooses how bf16 matrix products and convolutions
    run on CPU (autocast or a bf16 model): "auto" uses fp32 kernels on the bf16 operands where the CPU
    has no bf16 instructions, same numerics and much faster there (see `hybridvit.layers.cpu_bf16`).
    """

    in_chans: int = 3
    num_classes: int = 1000
    features_only: bool = False
    out_indices: tuple[int, ...] = (0, 1, 2, 3)
    classifier_prefixes: tuple[str, ...] = ("head.",)
    stage_info: list[dict[str, Any]]
    pretrained_cfg: dict[str, Any]
    # bf16 products on CPUs without bf16 instructions: "auto" | "native" | "fp32" (see layers/cpu_bf16.py)
    cpu_bf16_kernels: str = "auto"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name in _POLICY_METHODS:
            method = cls.__dict__.get(name)
            if method is not None and not getattr(method, "_bf16_kernel_policy", False):
                setattr(cls, name, bf16_kernel_policy(method))

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        """Initialisation of the official code: truncated-normal linears (std 0.02), unit norms."""
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4:
            raise ValueError(f"{self._name()} expects a batch of images (B, C, H, W), got shape {tuple(x.shape)}; "
                             "add a batch dimension with x.unsqueeze(0)")
        if x.shape[1] != self.in_chans:
            raise ValueError(
                f"{self._name()} was built for {self.in_chans}-channel input but got {x.shape[1]} channels "
                f"(shape {tuple(x.shape)}). Convert the images (e.g. grayscale -> RGB with "
                f"x.expand(-1, 3, -1, -1)) or create the model with in_chans={x.shape[1]}.")

    def _name(self) -> str:
        return getattr(self, "model_name", type(self).__name__)

    @property
    def feature_info(self) -> list[dict[str, Any]]:
        return [dict(self.stage_info[i], index=i) for i in self.out_indices]

    def set_features_only(self, out_indices: tuple[int, ...] = (0, 1, 2, 3)) -> None:
        """Turns the classifier into a backbone returning the maps of `out_indices` (strides 4..32)."""
        n = len(self.stage_info)
        bad = [i for i in out_indices if not -n <= i < n]
        if bad:
            raise ValueError(f"out_indices {out_indices} out of range for {n} stages")
        self.out_indices = tuple(i % n for i in out_indices)
        self.features_only = True
        self.reset_classifier(0)

    @bf16_kernel_policy
    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        if self.features_only:
            feats = self.forward_intermediates(x)
            return [feats[i] for i in self.out_indices]
        return self.forward_head(self.forward_features(x))

    # interface implemented by the families
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def forward_intermediates(self, x: torch.Tensor) -> list[torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def reset_classifier(self, num_classes: int) -> None:
        """A fresh linear classifier `head` on the pooled `num_features` (none for num_classes=0), on the
        device and in the dtype of the model."""
        self.num_classes = num_classes
        ref = next(self.parameters())
        self.head = (nn.Linear(self.num_features, num_classes, device=ref.device, dtype=ref.dtype)
                     if num_classes > 0 else nn.Identity())

    def convert_official(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    def no_weight_decay_keywords(self) -> set[str]:
        """Name fragments of parameters trained without weight decay (position-bias tables etc.)."""
        return set()

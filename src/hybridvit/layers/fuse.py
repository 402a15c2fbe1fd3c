"""Layer scale, and folding BatchNorm and layer scales into the layers before them for inference."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LayerScale(nn.Module):
    """Per-channel learned scale gamma * x over the last dimension (the official `gamma` parameters)."""

    def __init__(self, dim: int, init_value: float):
        super().__init__()
        self.gamma = nn.Parameter(init_value * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return scale_channels(x, self.gamma)


def make_layer_scale(dim: int, init_value: float | None) -> nn.Module:
    """LayerScale, or Identity where the variant has none (init_value None)."""
    return LayerScale(dim, init_value) if init_value is not None else nn.Identity()


@torch.no_grad()
def fold_layer_scale(layer: nn.Linear | nn.Conv2d, gamma: torch.Tensor | nn.Module | None) -> None:
    """Folds gamma * layer(x) into `layer`'s weight and bias (output channels first in both).
    `gamma`: a tensor, a LayerScale, or None / Identity (nothing to fold)."""
    if isinstance(gamma, LayerScale):
        gamma = gamma.gamma
    if not isinstance(gamma, torch.Tensor):
        return
    layer.weight.mul_(gamma.view(-1, *([1] * (layer.weight.ndim - 1))))
    if layer.bias is not None:
        layer.bias.mul_(gamma)


def bn_folded_weights(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of one conv computing bn(conv(x)) with BN in eval mode (running statistics)."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.affine:
        scale = bn.weight * scale
    shift = -bn.running_mean * scale
    if bn.affine:
        shift = shift + bn.bias
    if conv.bias is not None:
        shift = shift + conv.bias * scale
    return conv.weight * scale.view(-1, 1, 1, 1), shift


@torch.no_grad()
def fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A new conv computing bn(conv(x)) with BN in eval mode (running statistics)."""
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode)
    fused = fused.to(device=conv.weight.device, dtype=conv.weight.dtype)
    weight, bias = bn_folded_weights(conv, bn)
    fused.weight.copy_(weight)
    fused.bias.copy_(bias)
    return fused


def conv_bn(x: torch.Tensor, conv: nn.Conv2d, norm: nn.Module | None = None,
            act: str | nn.Module | None = None) -> torch.Tensor:
    """act(norm(conv(x))): `norm` an nn.BatchNorm2d, Identity (after `fold_bn`) or None; `act` None,
    "relu", "gelu" (exact) or an activation module. The inference form (`fuse()`) folds the BatchNorm
    into the conv once, in place of both."""
    y = conv(x)
    if norm is not None:
        y = norm(y)
    if act is None:
        return y
    if act == "gelu":
        return F.gelu(y)
    if act == "relu":
        return F.relu(y)
    return act(y)


def scale_channels(x: torch.Tensor, gamma: torch.Tensor | None) -> torch.Tensor:
    """gamma * x over the last dimension; x itself once `fold_layer_scale` folded gamma (gamma None).

    gamma is cast to x's dtype: under autocast an fp32 gamma would promote the bf16 branch, and with it
    the whole residual stream, to fp32 (every later block then converts it back for its products)."""
    return x if gamma is None else x * gamma.to(x.dtype)

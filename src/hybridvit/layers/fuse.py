"""Layer scale, and folding BatchNorm and layer scales into the layers before them for inference."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .accel import autocast_dtype, cached_for, eager_fast


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


def conv_bn(x: torch.Tensor, conv: nn.Conv2d, norm: nn.Module) -> torch.Tensor:
    """norm(conv(x)); with the fast paths on, an eval-mode BatchNorm is folded into the conv weights on the
    fly (the weights are tiny next to the map: one pass over the map instead of two). In eager no-grad
    inference the folded weights, in the autocast dtype where autocast is on, are cached under the
    version counters of the conv's and the norm's tensors (`accel.cache.cached_for`): an edited weight or
    running statistic takes effect at the next call, and a batch-1 forward pass no longer spends its time
    refolding (CabViT-H-L2: 3 ms of 45). After `fold_bn` norm is Identity."""
    if (not eager_fast() or not isinstance(norm, nn.BatchNorm2d) or norm.training or norm.running_var is None
            or conv.padding_mode != "zeros"):
        return norm(conv(x))
    tensors = [t for t in (conv.weight, conv.bias, norm.weight, norm.bias, norm.running_mean, norm.running_var)
               if t is not None]

    def fold() -> tuple[torch.Tensor, torch.Tensor]:
        weight, bias = bn_folded_weights(conv, norm)
        amp = autocast_dtype(x.device.type) if x.device.type in ("cpu", "cuda") else None
        return (weight, bias) if amp is None else (weight.to(amp), bias.to(amp))

    weight, bias = cached_for(norm, ("conv", norm.eps), tensors, fold)
    return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def scale_channels(x: torch.Tensor, gamma: torch.Tensor | None) -> torch.Tensor:
    """gamma * x over the last dimension; x itself once `fold_layer_scale` folded gamma (gamma None).

    gamma is cast to x's dtype: under autocast an fp32 gamma would promote the bf16 branch, and with it
    the whole residual stream, to fp32 (every later block then converts it back for its products)."""
    return x if gamma is None else x * gamma.to(x.dtype)

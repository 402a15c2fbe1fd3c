"""Layer scale, and folding BatchNorm and layer scales into the layers before them for inference."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .accel import autocast_dtype, cached_for, eager_fast, eager_inference, gelu_
from .accel.fused_linear import onednn_dtype


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


_ONEDNN_CONV = (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
                and hasattr(torch.ops.mkldnn, "_reorder_convolution_weight"))


def _act_name(act: str | nn.Module | None) -> str | None:
    """"relu" / "gelu" (exact) for the activations oneDNN applies in a convolution's epilogue; "none" for
    no activation; None for anything else (run as a module after the convolution)."""
    if act is None:
        return "none"
    if isinstance(act, str):
        return act
    if isinstance(act, nn.ReLU):
        return "relu"
    if isinstance(act, nn.GELU) and act.approximate == "none":
        return "gelu"
    return None


def _activate(y: torch.Tensor, act: str | nn.Module | None) -> torch.Tensor:
    """act(y) for `conv_bn`'s plain path, in place on the temporary in eager inference."""
    name = _act_name(act)
    if name == "none":
        return y
    if name == "gelu":
        return gelu_(y)
    if name == "relu":
        return y.relu_() if eager_inference() and not y.requires_grad else F.relu(y)
    return act(y)


def _onednn_conv_dtype(x: torch.Tensor, conv: nn.Conv2d, foldable: bool, norm: nn.Module | None,
                       act: str | nn.Module | None) -> torch.dtype | None:
    """The dtype of oneDNN's fused convolution for this call (`accel.fused_linear.onednn_dtype`: CPU eager
    inference, fp32 or native bf16), None where the plain ops run. `onednn_dtype` comes first: it checks
    for eager inference before reading `x` (a torch.fx proxy under symbolic tracing)."""
    dtype = onednn_dtype(x) if _ONEDNN_CONV else None
    if dtype is None or not (x.dim() == 4 and not isinstance(conv.padding, str) and conv.padding_mode == "zeros"
                             and _act_name(act) is not None
                             and (foldable or norm is None or isinstance(norm, nn.Identity))):
        return None
    return dtype


def conv_bn(x: torch.Tensor, conv: nn.Conv2d, norm: nn.Module | None = None,
            act: str | nn.Module | None = None) -> torch.Tensor:
    """act(norm(conv(x))): `norm` an nn.BatchNorm2d, Identity (after `fold_bn`) or None; `act` None,
    "relu", "gelu" (exact) or an activation module.

    With the fast paths on, an eval-mode BatchNorm is folded into the conv weights on the fly (the weights
    are tiny next to the map: one pass over the map instead of two). In eager no-grad inference:
    - the folded weights are cached under the version counters of the conv's and the norm's tensors
      (`accel.cache.cached_for`): an edited weight or running statistic takes effect at the next call,
      and a batch-1 forward pass no longer spends its time refolding (CabViT-H-L2: 3 ms of 45);
    - on the CPU, where the fused linears run (fp32, or bf16 with native instructions), the convolution
      is oneDNN's (`mkldnn._convolution_pointwise`) with its weight kept reordered into oneDNN's blocked
      layout and the ReLU or exact GELU in its epilogue, instead of a weight reorder inside every call and
      a second pass over the map.
    Elsewhere (training, tracing, FLOP counters, other devices), the plain ops."""
    foldable = (isinstance(norm, nn.BatchNorm2d) and eager_fast() and not norm.training
                and norm.running_var is not None and conv.padding_mode == "zeros")
    dtype = _onednn_conv_dtype(x, conv, foldable, norm, act)
    if not foldable and dtype is None:
        y = conv(x)
        return _activate(y if norm is None else norm(y), act)
    tensors = [t for t in (conv.weight, conv.bias) if t is not None]
    if foldable:
        tensors += [t for t in (norm.weight, norm.bias, norm.running_mean, norm.running_var) if t is not None]

    def weights() -> tuple[torch.Tensor, torch.Tensor | None]:
        weight, bias = bn_folded_weights(conv, norm) if foldable else (conv.weight, conv.bias)
        cast = dtype or (autocast_dtype(x.device.type) if x.device.type in ("cpu", "cuda") else None)
        if cast is not None:
            weight, bias = weight.to(cast), None if bias is None else bias.to(cast)
        if dtype is not None:
            weight = torch.ops.mkldnn._reorder_convolution_weight(
                weight.detach(), list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups,
                list(x.shape))
        return weight, bias

    owner = norm if foldable else conv
    weight, bias = cached_for(owner, ("conv", norm.eps if foldable else None, dtype), tensors, weights)
    if dtype is None:
        y = F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
        return _activate(y, act)
    name = _act_name(act)
    return torch.ops.mkldnn._convolution_pointwise(
        x.to(dtype), weight, bias, list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups,
        name, [], "none" if name == "gelu" else "")


def scale_channels(x: torch.Tensor, gamma: torch.Tensor | None) -> torch.Tensor:
    """gamma * x over the last dimension; x itself once `fold_layer_scale` folded gamma (gamma None).

    gamma is cast to x's dtype: under autocast an fp32 gamma would promote the bf16 branch, and with it
    the whole residual stream, to fp32 (every later block then converts it back for its products)."""
    return x if gamma is None else x * gamma.to(x.dtype)

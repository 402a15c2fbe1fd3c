"""Linear layers with the bias, exact GELU or a residual add in oneDNN's GEMM epilogue (CPU inference).

`linear(x, layer, gelu, residual)` is layer(x) [-> GELU] [+ residual]. For fp32 CPU tensors without
autograd or autocast, eagerly and with the fast paths on (`layers.fast`), it runs oneDNN's fused inner
product (~25% faster than addmm, which first broadcasts the bias into the output, plus a separate GELU
or add pass); values equal the plain ops up to float rounding (~1e-6). Anything else (training,
autocast, other devices and dtypes, tracing, dispatch modes such as FLOP counters) runs the plain ops.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .fast import eager_inference

_ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _autocast_cpu() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4
        return torch.is_autocast_cpu_enabled()


def onednn_applies(x: torch.Tensor) -> bool:
    """Where the fused oneDNN linear runs: fp32 CPU tensors, eager inference, no autocast, no dispatch
    mode (FLOP counters and memory tracers must see the plain, countable ops)."""
    return (_ONEDNN_LINEAR and x.device.type == "cpu" and x.dtype == torch.float32 and eager_inference()
            and not _autocast_cpu() and _get_current_dispatch_mode() is None)


def linear(x: torch.Tensor, layer: nn.Linear, gelu: bool = False,
           residual: torch.Tensor | None = None) -> torch.Tensor:
    """layer(x), then exact GELU if `gelu`, plus `residual` (the output's shape) if given;
    (..., in) -> (..., out)."""
    if onednn_applies(x):
        x2 = x.reshape(-1, x.shape[-1])
        if residual is not None and not gelu:
            y = torch.ops.mkldnn._linear_pointwise.binary(x2, residual.reshape(x2.shape[0], -1), layer.weight,
                                                          layer.bias, "add")
            return y.reshape(*x.shape[:-1], y.shape[-1])
        y = torch.ops.mkldnn._linear_pointwise(x2, layer.weight, layer.bias, "gelu" if gelu else "none", [],
                                               "none" if gelu else "")
        y = y.reshape(*x.shape[:-1], y.shape[-1])
        return y if residual is None else add_residual(residual.reshape(y.shape), y)
    y = layer(x)
    y = gelu_(y) if gelu else y
    return y if residual is None else add_residual(residual.reshape(y.shape), y)


def gelu_(x: torch.Tensor) -> torch.Tensor:
    """Exact GELU of a temporary, in place in eager inference (saves a large fresh buffer)."""
    if eager_inference() and not x.requires_grad:
        return torch.ops.aten.gelu_(x)
    return F.gelu(x)


def add_residual(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x + y; in eager inference written into the branch output y (a temporary): fresh large CPU
    allocations cost page faults comparable to the add itself."""
    if eager_inference() and y.dtype == x.dtype and y.shape == x.shape and not y.requires_grad:
        return y.add_(x)
    return x + y

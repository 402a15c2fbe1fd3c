"""Linear layers with the bias, exact GELU or a residual add in oneDNN's GEMM epilogue (CPU inference).

`linear(x, layer, gelu, residual)` is layer(x) [-> GELU] [+ residual]. For CPU tensors without autograd,
eagerly and with the fast paths on (`layers.accel.switch`), it runs oneDNN's fused inner product (~25% faster
than addmm in fp32, which first broadcasts the bias into the output, plus a separate GELU or add pass):
- fp32 without autocast: values equal the plain ops up to float rounding (~1e-6);
- bf16 (bf16 input, or bf16 autocast) on a CPU with native bf16 instructions: the bf16 product of the
  plain autocast linear, with the layer's weight and bias cast to bf16 once and cached per parameter
  version (an in-place edit recomputes them), instead of autocast casting them on every call; the GELU
  and residual add act on the fp32 accumulator before the one rounding to bf16 (the plain path rounds
  the product first: the values differ by bf16 rounding only).
In both, the weight is kept reordered into oneDNN's blocked layout (`cache.cast_param(..., pack=True)`),
which the inner product otherwise redoes on every call.
Anything else (training, other devices and dtypes, fp16, tracing, dispatch modes such as FLOP counters
and the CPU bf16 policy of `cpu_bf16`) runs the plain ops.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .cache import cast_param
from .cpu_bf16 import cpu_has_native_bf16
from .switch import autocast_dtype, eager_inference

_ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def onednn_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype the fused oneDNN linear computes `x` in, None where the plain ops run: CPU, eager
    inference, no dispatch mode (FLOP counters and memory tracers must see the plain, countable ops);
    fp32 without autocast, or bf16 (input or autocast) where the CPU has native bf16."""
    if not (_ONEDNN_LINEAR and eager_inference() and x.device.type == "cpu"
            and _get_current_dispatch_mode() is None):
        return None
    amp = autocast_dtype("cpu")
    if amp is None and x.dtype == torch.float32:
        return torch.float32
    if ((amp == torch.bfloat16 and x.dtype in (torch.float32, torch.bfloat16))
            or (amp is None and x.dtype == torch.bfloat16)) and cpu_has_native_bf16():
        return torch.bfloat16
    return None


def onednn_applies(x: torch.Tensor) -> bool:
    """Whether `linear` runs `x` through the fused oneDNN linear (see `onednn_dtype`)."""
    return onednn_dtype(x) is not None


def linear(x: torch.Tensor, layer: nn.Linear, gelu: bool = False,
           residual: torch.Tensor | None = None) -> torch.Tensor:
    """layer(x), then exact GELU if `gelu`, plus `residual` (the output's shape) if given;
    (..., in) -> (..., out)."""
    dtype = onednn_dtype(x)
    if dtype is not None:
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        weight = cast_param(layer.weight, dtype, pack=True)
        bias = cast_param(layer.bias, dtype)
        if residual is not None and not gelu and residual.dtype == dtype:
            y = torch.ops.mkldnn._linear_pointwise.binary(x2, residual.reshape(x2.shape[0], -1), weight,
                                                          bias, "add")
            return y.reshape(*x.shape[:-1], y.shape[-1])
        y = torch.ops.mkldnn._linear_pointwise(x2, weight, bias, "gelu" if gelu else "none", [],
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

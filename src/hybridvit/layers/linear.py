"""Linear layers with the bias, exact GELU or a residual add in oneDNN's GEMM epilogue (CPU inference).

`linear(x, layer, gelu, residual)` is layer(x) [-> GELU] [+ residual]. In eager no-grad CPU inference in
fp32, or in bf16 where the CPU has bf16 instructions, it runs oneDNN's fused inner product
(`mkldnn._linear_pointwise`) on the layer's own weight, read at every call (cast to bf16 at every call
under autocast, as `F.linear` does): the bias, GELU and add act on the accumulator instead of a second
and third pass over the output. Everything else (training, tracing, other devices, fp16, FLOP counters,
`plain_paths()`) runs the plain ops. Its whole-model gain is in `benchmarks/results/cpu_levers.json`.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .context import autocast_dtype, eager_inference

_ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True where oneDNN has bf16 instructions on this CPU (AVX512-BF16, AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # builds without oneDNN
        return False


def onednn_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype the fused oneDNN linear computes `x` in, None where the plain ops run."""
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


def linear(x: torch.Tensor, layer: nn.Linear, gelu: bool = False,
           residual: torch.Tensor | None = None) -> torch.Tensor:
    """layer(x), then exact GELU if `gelu`, plus `residual` (the output's shape) if given;
    (..., in) -> (..., out)."""
    dtype = onednn_dtype(x)
    if dtype is not None:
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        weight = layer.weight.to(dtype)
        bias = None if layer.bias is None else layer.bias.to(dtype)
        if residual is not None and not gelu and residual.dtype == dtype:
            y = torch.ops.mkldnn._linear_pointwise.binary(x2, residual.reshape(x2.shape[0], -1), weight,
                                                          bias, "add")
            return y.reshape(*x.shape[:-1], y.shape[-1])
        y = torch.ops.mkldnn._linear_pointwise(x2, weight, bias, "gelu" if gelu else "none", [],
                                               "none" if gelu else "")
        y = y.reshape(*x.shape[:-1], y.shape[-1])
        return y if residual is None else residual.reshape(y.shape) + y
    y = layer(x)
    y = F.gelu(y) if gelu else y
    return y if residual is None else residual.reshape(y.shape) + y

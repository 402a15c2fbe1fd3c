"""bfloat16 on CPUs without bfloat16 instructions.

On a CPU without native bf16 support (no AVX512-BF16 / AMX, e.g. AVX2-only machines) PyTorch runs
bf16 matrix products and convolutions in slow fallback kernels: on the 2-core AVX2 machine of our
benchmarks a bf16 768x768 linear is 7x slower than in fp32, and a bf16 depthwise 3x3 convolution
about 100x slower (it loops over channels). Under `torch.autocast("cpu", dtype=torch.bfloat16)` (or
with a bf16 model) hybridvit models then compute those products with the fp32 kernels on the same
bf16 operands and round the results to bf16.

The numerics are those of a bf16 kernel: operands are bf16 values (widening bf16 to fp32 is exact),
products are accumulated in fp32 as oneDNN and PyTorch's bf16 kernels do, and the output is rounded
to bf16. Only the summation order may differ, as it does between any two kernels.

The policy is an explicit context, entered by the runtime (training, evaluation, benchmarks) around a
forward and backward, and available to library users:

    with bf16_kernels("auto", "cpu", torch.bfloat16), torch.autocast("cpu", torch.bfloat16):
        logits = model(x)

"auto" (fp32 kernels only where bf16 is emulated), "native" (always PyTorch's own bf16 kernels), "fp32"
(always the fp32 kernels, e.g. to test the path on any machine). Where the CPU has native bf16, "auto"
does nothing.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any

import torch
from torch.utils import _python_dispatch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# matrix products and convolutions as they reach a dispatch mode after autocast cast their operands:
# as linear / conv2d without autograd (inference mode), decomposed into addmm / mm / convolution with it;
# convolution_backward for training steps run inside the mode
_WIDENED_OPS = {aten.linear.default, aten.matmul.default, aten.addmm.default, aten.mm.default,
                aten.bmm.default, aten.baddbmm.default, aten.conv1d.default, aten.conv2d.default,
                aten.convolution.default, aten.convolution_backward.default}
_POLICIES = ("auto", "native", "fp32")


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True where oneDNN has bf16 instructions on this CPU (AVX512-BF16, AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # builds without oneDNN
        return False


def _widen(t: Any) -> Any:
    return t.float() if isinstance(t, torch.Tensor) and t.dtype == torch.bfloat16 else t


def _round(t: Any) -> Any:
    return t.to(torch.bfloat16) if isinstance(t, torch.Tensor) and t.dtype == torch.float32 else t


class Bf16ByFp32Kernels(TorchDispatchMode):
    """Runs bf16 CPU matrix products and convolutions as fp32 kernels on the (exactly widened) bf16
    operands, with the result rounded to bf16; every other op runs unchanged."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _WIDENED_OPS:
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            if tensors and tensors[0].device.type == "cpu" and all(t.dtype == torch.bfloat16 for t in tensors):
                out = func(*[_widen(a) for a in args], **kwargs)
                return tuple(_round(o) for o in out) if isinstance(out, (tuple, list)) else _round(out)
        return func(*args, **kwargs)


def _active() -> bool:
    return any(isinstance(m, Bf16ByFp32Kernels) for m in _python_dispatch._get_current_dispatch_mode_stack())


def use_fp32_kernels(policy: str, device_type: str, bf16: bool) -> bool:
    """Whether bf16 work (`bf16`: autocast to bf16 or bf16 tensors) on `device_type` should run its
    products through fp32 kernels under `policy` ("auto" | "native" | "fp32")."""
    if policy not in _POLICIES:
        raise ValueError(f"cpu_bf16_kernels must be one of {_POLICIES}, got {policy!r}")
    if policy == "native" or device_type != "cpu" or not bf16 or torch.compiler.is_compiling() or _active():
        return False
    return policy == "fp32" or not cpu_has_native_bf16()


def model_policy(model: torch.nn.Module) -> str:
    """The policy for a context around `model`'s forward and backward: "native" for a compiled model (the
    compiler makes its own kernels), otherwise the model's `cpu_bf16_kernels` preference (hybridvit models:
    "auto" unless set), else "auto"."""
    if hasattr(model, "_orig_mod"):
        return "native"
    return getattr(model, "cpu_bf16_kernels", "auto")


def bf16_kernels(policy: str, device: torch.device | str, dtype: torch.dtype | None):
    """Context for a whole training step (forward and backward) in `dtype` on `device`: the
    `Bf16ByFp32Kernels` mode where the policy says so, otherwise nothing."""
    if use_fp32_kernels(policy, torch.device(device).type, dtype == torch.bfloat16):
        return Bf16ByFp32Kernels()
    return contextlib.nullcontext()

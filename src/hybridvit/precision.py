"""Numerical precision of a run: the one place where an `--amp` value becomes a dtype, an autocast
context (with the CPU bf16 kernel policy of layers/accel/cpu_bf16.py) and a gradient scaler."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from .layers.accel.cpu_bf16 import bf16_kernels, model_policy, use_fp32_kernels

AMP_CHOICES = ("auto", "none", "bf16", "fp16")
_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    """fp32 (`dtype` None) or mixed precision in bf16/fp16 on `device`.

    Build it once with `Precision.from_amp(amp, device)`; `autocast(model)` wraps forward (and, in
    training, backward), `grad_scaler()` gives the loss scaler (active for fp16 only).
    """

    device: torch.device
    dtype: torch.dtype | None

    @classmethod
    def from_amp(cls, amp: str | None, device: torch.device | str) -> Precision:
        """amp: "auto" (bf16 on CUDA GPUs that have it, else fp32) | "none" (fp32) | "bf16" | "fp16"."""
        device = torch.device(device)
        mode = "none" if amp in (None, "", "fp32") else str(amp).lower()
        if mode not in AMP_CHOICES:
            raise ValueError(f"unknown precision --amp {amp!r}: choose one of {', '.join(AMP_CHOICES)}")
        if mode == "auto":
            mode = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "none"
        return cls(device, _DTYPES[mode])

    @property
    def name(self) -> str:
        """"fp32", "bf16" or "fp16"."""
        return next(k for k, v in _DTYPES.items() if v == self.dtype).replace("none", "fp32")

    def autocast(self, model: nn.Module | None = None):
        """torch.autocast in `dtype` (nothing for fp32); given `model`, also inside its CPU bf16 kernel
        context (inference: forward only)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        if model is not None:
            stack.enter_context(self.kernels(model))
        stack.enter_context(torch.autocast(self.device.type, dtype=self.dtype))
        return stack

    def kernels(self, model: nn.Module):
        """The CPU bf16 kernel context of `model`'s policy (layers/accel/cpu_bf16.py), for a training step's
        forward and backward together; nothing off CPU bf16."""
        return bf16_kernels(model_policy(model), self.device, self.dtype)

    def policy_kernels(self, policy: str):
        """The CPU bf16 kernel context of an explicit `policy` ("auto" | "native" | "fp32"), e.g. to measure
        the matmul peak of the kernels a model under that policy uses; nothing off CPU bf16."""
        return bf16_kernels(policy, self.device, self.dtype)

    def products_on_fp32_kernels(self, model: nn.Module) -> bool:
        """Whether `model`'s bf16 products run on fp32 kernels here (CPU bf16 without bf16 instructions,
        under the model's policy)."""
        return use_fp32_kernels(model_policy(model), self.device.type, self.dtype == torch.bfloat16)

    def grad_scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)

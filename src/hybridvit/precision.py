"""Numerical precision of a run: the one place where an `--amp` value becomes a dtype, an autocast
context and a gradient scaler."""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import torch

from .layers.linear import cpu_has_native_bf16

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
        if mode == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
            warnings.warn("--amp bf16: this CPU has no bf16 instructions (AVX512-BF16 or AMX), so PyTorch emulates "
                          "bf16 and it runs slower than fp32 here; --amp none (or auto) is faster", stacklevel=2)
        return cls(device, _DTYPES[mode])

    @property
    def name(self) -> str:
        """"fp32", "bf16" or "fp16"."""
        return next(k for k, v in _DTYPES.items() if v == self.dtype).replace("none", "fp32")

    def autocast(self):
        """torch.autocast in `dtype` (nothing for fp32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)

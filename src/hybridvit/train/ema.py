"""Exponential moving average of the model weights (timm's ModelEma), kept in fp32 on the device."""
from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEma(nn.Module):
    """ema = d * ema + (1 - d) * model after every optimizer step, with d = min(decay, (1 + n) / (10 + n))
    so that short runs are not dominated by the initial weights. Buffers (BatchNorm statistics) are copied."""

    def __init__(self, model: nn.Module, decay: float = 0.9998) -> None:
        super().__init__()
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        n = float(self.updates)
        d = min(self.decay, (1 + n) / (10 + n))
        for e, p in zip(self.module.parameters(), model.parameters()):
            e.lerp_(p.detach().to(e.dtype), 1 - d)
        for e, b in zip(self.module.buffers(), model.buffers()):
            e.copy_(b)

"""Stochastic depth and its schedule."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def drop_path_rates(rate: float, depths: Sequence[int]) -> list[list[float]]:
    """Per-stage drop-path rates of every block, rising linearly from 0 to `rate` over all blocks (as the
    official codes' linspace; plain floats, so it also works while building on the `meta` device)."""
    n = sum(depths)
    flat = [rate * i / (n - 1) if n > 1 else 0.0 for i in range(n)]
    starts = [sum(depths[:i]) for i in range(len(depths))]
    return [flat[s:s + d] for s, d in zip(starts, depths)]


class DropPath(nn.Module):
    """Drops the whole residual branch per sample with probability `drop_prob` (training only)."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = x.new_empty(shape).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"

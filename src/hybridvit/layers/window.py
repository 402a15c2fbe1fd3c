"""Window partitioning of channels-last maps, with padding when the map does not divide."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def pad_hw(x: torch.Tensor, multiple_h: int, multiple_w: int | None = None) -> torch.Tensor:
    """Zero-pads (B, H, W, C) at the bottom/right so that H and W are multiples of the given sizes."""
    multiple_w = multiple_h if multiple_w is None else multiple_w
    H, W = x.shape[1], x.shape[2]
    ph = (-H) % multiple_h
    pw = (-W) % multiple_w
    if ph or pw:
        x = F.pad(x, (0, 0, 0, pw, 0, ph))
    return x


def window_partition(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """(B, H, W, C) with H, W multiples of `window_size` -> (B * nW, window_size**2, C)."""
    B, H, W, C = x.shape
    ws = window_size
    x = x.view(B, H // ws, ws, W // ws, ws, C).transpose(2, 3)
    return x.reshape(-1, ws * ws, C)


def window_reverse(windows: torch.Tensor, window_size: int, H: int, W: int) -> torch.Tensor:
    """(B * nW, window_size**2, C) -> (B, H, W, C); inverse of `window_partition`."""
    ws = window_size
    C = windows.shape[-1]
    x = windows.view(-1, H // ws, W // ws, ws, ws, C).transpose(2, 3)
    return x.reshape(-1, H, W, C)

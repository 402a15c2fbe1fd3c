"""Window partitioning of channels-last maps, padding to whole windows, and the key-padding mask."""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Additive attention bias of padded keys: exp() of it is exactly 0 in fp32, and it stays finite in
# fp16/bf16 so that a group made only of padding gives no NaN, not even in the backward pass.
MASK_VALUE = -1e4


def pad_hw(x: torch.Tensor, multiple_h: int, multiple_w: int | None = None) -> torch.Tensor:
    """Zero-pads (B, H, W, C) at the bottom/right so that H and W are multiples of the given sizes."""
    multiple_w = multiple_h if multiple_w is None else multiple_w
    H, W = x.shape[1], x.shape[2]
    ph = (-H) % multiple_h
    pw = (-W) % multiple_w
    if ph or pw:
        x = F.pad(x, (0, 0, 0, pw, 0, ph))
    return x


def padding_bias_map(H: int, W: int, Hp: int, Wp: int, device: torch.device,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(1, Hp, Wp, 1) additive key bias of a map padded from H x W to Hp x Wp: 0 for real tokens,
    MASK_VALUE for padding. Partition it like the tokens to get per-window/group key masks."""
    rows = torch.arange(Hp, device=device) < H
    cols = torch.arange(Wp, device=device) < W
    real = (rows[:, None] & cols[None, :]).reshape(1, Hp, Wp, 1)
    return torch.zeros(real.shape, device=device, dtype=dtype).masked_fill(~real, MASK_VALUE)


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

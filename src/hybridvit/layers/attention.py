"""Attention over a token set with an additive float bias, through fused SDPA."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None,
           scale: float | None = None, dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(q k^T * scale + bias) v for q (B, h, N, d), k/v (B, h, M, d), bias broadcastable to
    (B, h, N, M).

    The bias (relative position bias, padding mask with -inf-like entries) is cast to the query dtype
    so that autocast and half-precision models never meet a dtype mismatch inside SDPA.
    """
    if bias is not None and bias.dtype != q.dtype:
        bias = bias.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale)

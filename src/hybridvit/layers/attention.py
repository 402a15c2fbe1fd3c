"""Attention over a token set with an additive float bias, through fused SDPA."""
from __future__ import annotations

import torch
import torch.nn.functional as F

# torch.compiler.is_exporting appeared after torch 2.4, the oldest torch hybridvit supports
_is_exporting = getattr(torch.compiler, "is_exporting", lambda: False)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None,
           scale: float | None = None, dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(q k^T * scale + bias) v for q (B, h, N, d), k/v (B, h, M, d), bias broadcastable to
    (B, h, N, M).

    The bias (relative position bias, padding mask with -inf-like entries) is cast to the query dtype
    so that autocast and half-precision models never meet a dtype mismatch inside SDPA.
    """
    if bias is not None and bias.dtype != q.dtype:
        bias = bias.to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale)
    if _is_exporting():
        # the fused CPU kernel returns (B, N, heads, d) memory, its export decomposition (B, heads, N, d):
        # a real copy keeps the views traced after it valid for both (eager and compile read the kernel's
        # layout for free)
        out = out.clone(memory_format=torch.contiguous_format)
    return out

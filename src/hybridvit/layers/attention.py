"""Attention over a token set with an additive float bias: SDPA, or on the CPU its explicit form where
that is faster (`_sdpa_applies`).

Analysis records what attention computes from outside (`hybridvit.analysis.capture`: a hook on the SDPA
call of the plain path); nothing here checks for it.

GPU rules `attend` keeps (checked on CPU by tests/test_gpu_script.py, on CUDA by tests/test_cuda.py):
- the bias reaches SDPA in the query's dtype: on SM90, cuDNN attention has been reported to misread an
  fp32 mask with a bf16/fp16 query, and the memory-efficient kernel rejects it;
- on CUDA the bias's rows start at multiples of 8 elements (`align_bias`): the memory-efficient kernel
  needs that and otherwise pads a copy of the bias on every call (FasterViT windows have 49 + 4 tokens);
  the cast and the alignment are one copy, the values are unchanged;
- nothing here reads a tensor on the host (no `.item()`, `.cpu()`, data-dependent branches).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .context import is_exporting, is_tracing, plain

BIAS_ALIGNMENT = 8  # elements: what SDPA's memory-efficient CUDA kernel asks of the bias's strides


def bias_is_aligned(bias: torch.Tensor, alignment: int = BIAS_ALIGNMENT) -> bool:
    """Whether every stride but the last is a multiple of `alignment` and the last is 1 (SDPA's test)."""
    return bias.stride(-1) == 1 and all(s % alignment == 0 for s in bias.stride()[:-1])


def align_bias(bias: torch.Tensor, dtype: torch.dtype | None = None,
               alignment: int = BIAS_ALIGNMENT) -> torch.Tensor:
    """`bias` (..., N, M) in `dtype` (default: its own) as a view of a (..., N, M') buffer, M' the next
    multiple of `alignment`: same shape and values, strides the memory-efficient kernel takes without
    padding a copy itself. Broadcast (stride-0) dimensions stay broadcast; one copy in all."""
    dtype = bias.dtype if dtype is None else dtype
    if bias_is_aligned(bias, alignment):
        return bias.to(dtype)
    # collapse broadcast dimensions, so that the copy holds each distinct value once
    base = bias[tuple(slice(0, 1) if st == 0 and n > 1 else slice(None)
                      for n, st in zip(bias.shape, bias.stride()))]
    M = bias.shape[-1]
    # a fresh buffer: canonical strides also for size-1 dimensions, which SDPA's test reads too
    out = base.new_zeros((*base.shape[:-1], M + (-M) % alignment), dtype=dtype)
    out[..., :M] = base
    return out.narrow(-1, 0, M).expand(bias.shape)


def _aligns_bias(q: torch.Tensor) -> bool:
    """Whether SDPA may pick the memory-efficient kernel for this query (CUDA); a function so that the CPU
    tests can take the aligned path."""
    return q.device.type == "cuda"


def prepare_bias(q: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """The bias as `attend` hands it to SDPA: in the query's dtype, aligned on CUDA (see module doc)."""
    if bias is None:
        return None
    if _aligns_bias(q) and not bias_is_aligned(bias):
        return align_bias(bias, q.dtype)
    return bias if bias.dtype == q.dtype else bias.to(q.dtype)


def _sdpa_applies(q: torch.Tensor) -> bool:
    """Whether `attend` calls SDPA for this query rather than the explicit form (two batched products around
    one softmax). The explicit form on the CPU, each measured on whole models:

    - in what torch.compile / export traces: inductor fuses the scale, the bias add and the softmax;
    - for bf16 / fp16 with autograd on (training): SDPA's fused CPU kernel takes no bias gradient, so SDPA
      falls back to its math path, which upcasts to fp32 (the explicit form: 1.32-1.36x on a crossformerpp_s
      bf16 training step, `benchmarks/HISTORY.md`).

    SDPA everywhere else: off the CPU, under `plain_paths()`, eager fp32, and eager bf16 inference, where it
    measured 1.03-1.15x faster than the explicit form (Xeon with AMX, `benchmarks/results/cpu_levers.json`,
    variant `sdpa`)."""
    if q.device.type != "cpu" or _aligns_bias(q) or plain():
        return True
    if is_tracing():
        return False
    return q.dtype == torch.float32 or not torch.is_grad_enabled()


def _attend_explicit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                     scale: float | None, dropout_p: float) -> torch.Tensor:
    """softmax(q k^T * scale + bias) v in the query dtype, (B, h, N, d)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    weights = (scores if bias is None else scores + bias).softmax(-1)
    if dropout_p > 0:
        weights = F.dropout(weights, dropout_p)
    return torch.matmul(weights, v)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None,
           scale: float | None = None, dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(q k^T * scale + bias) v for q (B, h, N, d), k/v (B, h, M, d), bias broadcastable to
    (B, h, N, M).

    The bias (relative position bias, padding mask with -inf-like entries) is cast to the query dtype
    so that autocast and half-precision models never meet a dtype mismatch inside SDPA.
    """
    return _attend(q, k, v, prepare_bias(q, bias), scale, dropout_p)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
            scale: float | None, dropout_p: float) -> torch.Tensor:
    """`attend` with the bias already prepared (`prepare_bias`)."""
    if not _sdpa_applies(q):
        return _attend_explicit(q, k, v, bias, scale, dropout_p)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale)
    if is_exporting():
        # the fused CPU kernel returns (B, N, heads, d) memory, its export decomposition (B, heads, N, d):
        # a real copy keeps the views traced after it valid for both (eager and compile read the kernel's
        # layout for free)
        out = out.clone(memory_format=torch.contiguous_format)
    return out

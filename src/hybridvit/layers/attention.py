"""Attention over a token set with an additive float bias, through fused SDPA.

`capture_attention()` switches `attend` to an explicit softmax(q k^T * scale + bias) that records the
attention weights (same output up to float rounding), for analysis; the fused path stays the default.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .fast import eager_fast

# torch.compiler.is_exporting appeared after torch 2.4, the oldest torch hybridvit supports
_is_exporting = getattr(torch.compiler, "is_exporting", lambda: False)


class AttentionCapture:
    """The attention weights of every `attend` call made under `capture_attention()`, in call order.

    `records[i]` is a dict: `weights` (B', heads', N, M) float32 on CPU, each row summing to 1 (B' and
    heads' as `attend` received them: a caller may fold windows into the head axis); with a `model`,
    also `module` (qualified name of the innermost submodule running when attend was called, e.g.
    "stages.2.blocks.0.attn") and `calls` (the chain of running submodules, outermost first, as
    (name, args) with every tensor argument replaced by its shape), which give the token geometry.
    """

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self._stack: list[tuple[str, tuple]] = []

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
               scale: float | None, dropout_p: float) -> torch.Tensor:
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        with torch.autocast(q.device.type, enabled=False):  # fp32 weights under autocast too
            logits = (q.float() @ k.float().transpose(-2, -1)) * scale
            if bias is not None:
                logits = logits + bias.float()
            weights = logits.softmax(-1)
        record: dict[str, Any] = {"weights": weights.detach().cpu()}
        if self._stack:
            record["module"] = self._stack[-1][0]
            record["calls"] = list(self._stack)
        self.records.append(record)
        if dropout_p > 0:
            weights = F.dropout(weights, dropout_p)
        with torch.autocast(q.device.type, enabled=False):
            return (weights @ v.float()).to(v.dtype)

    def _track(self, model: nn.Module) -> list[Any]:
        def shape_of(a: Any) -> Any:
            if isinstance(a, torch.Tensor):
                return tuple(a.shape)
            return type(a)(shape_of(b) for b in a) if isinstance(a, (list, tuple)) else a

        def enter(name: str):
            def hook(_m, args, kwargs):
                self._stack.append((name, tuple(shape_of(a) for a in args) +
                                    tuple((k, shape_of(v)) for k, v in kwargs.items())))
            return hook

        def leave(_m, _args, _kwargs, _out):
            if self._stack:
                self._stack.pop()

        handles = []
        for name, m in model.named_modules():
            handles.append(m.register_forward_pre_hook(enter(name), with_kwargs=True))
            handles.append(m.register_forward_hook(leave, with_kwargs=True, always_call=True))
        return handles


_CAPTURE: AttentionCapture | None = None


@contextmanager
def capture_attention(model: nn.Module | None = None) -> Iterator[AttentionCapture]:
    """Within this context every `attend` call computes its weights explicitly and records them.

    >>> with torch.no_grad(), capture_attention(model) as cap:
    ...     model(x)
    >>> cap.records[0]["module"], cap.records[0]["weights"].shape

    With `model`, each record names the submodule of `model` that called attend (forward hooks that are
    removed on exit). Not for torch.compile'd or exported graphs: for analysis in eager mode.
    """
    global _CAPTURE
    previous, cap = _CAPTURE, AttentionCapture()
    handles = cap._track(model) if model is not None else []
    _CAPTURE = cap
    try:
        yield cap
    finally:
        _CAPTURE = previous
        for h in handles:
            h.remove()


def _low_precision_trainable_bias(q: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """A bf16/fp16 CPU attention whose bias needs a gradient (training with a learned position bias),
    eagerly with the fast paths on. SDPA's fused CPU kernel takes no bias gradient, so SDPA falls back
    to its math path, which upcasts half-precision q, k, v and bias to fp32 (about half the speed)."""
    return (bias is not None and bias.requires_grad and q.device.type == "cpu"
            and q.dtype in (torch.bfloat16, torch.float16) and torch.is_grad_enabled() and eager_fast())


def _attend_explicit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                     scale: float | None, dropout_p: float) -> torch.Tensor:
    """SDPA's math path in the query dtype: softmax(q k^T * scale + bias) v, (B, h, N, d)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    kt = k.flatten(0, 1).transpose(-2, -1)
    if bias is None:
        logits = torch.bmm(q.flatten(0, 1), kt).mul_(scale)
    else:
        logits = torch.baddbmm(bias.expand(*q.shape[:-1], k.shape[-2]).flatten(0, 1), q.flatten(0, 1), kt,
                               alpha=scale)
    # softmax in the query dtype still accumulates in fp32 inside the CPU kernel
    weights = logits.softmax(-1)
    if dropout_p > 0:
        weights = F.dropout(weights, dropout_p)
    return (weights @ v.flatten(0, 1)).unflatten(0, q.shape[:2])


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None,
           scale: float | None = None, dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(q k^T * scale + bias) v for q (B, h, N, d), k/v (B, h, M, d), bias broadcastable to
    (B, h, N, M).

    The bias (relative position bias, padding mask with -inf-like entries) is cast to the query dtype
    so that autocast and half-precision models never meet a dtype mismatch inside SDPA.
    """
    if _CAPTURE is not None:  # analysis: explicit weights, recorded (see capture_attention)
        return _CAPTURE.attend(q, k, v, bias, scale, dropout_p)
    if bias is not None and bias.dtype != q.dtype:
        bias = bias.to(q.dtype)
    if _low_precision_trainable_bias(q, bias):
        return _attend_explicit(q, k, v, bias, scale, dropout_p)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale)
    if _is_exporting():
        # the fused CPU kernel returns (B, N, heads, d) memory, its export decomposition (B, heads, N, d):
        # a real copy keeps the views traced after it valid for both (eager and compile read the kernel's
        # layout for free)
        out = out.clone(memory_format=torch.contiguous_format)
    return out

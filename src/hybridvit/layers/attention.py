"""Attention over a token set with an additive float bias, through fused SDPA.

`capture_attention()` switches `attend` to an explicit softmax(q k^T * scale + bias) that records the
attention weights (same output up to float rounding), for analysis; the fused path stays the default.
`trace_attention()` records what every call hands to SDPA (shapes, dtypes, strides, optionally the
tensors) without changing the computation, for benchmarks of the attention path.

GPU rules `attend` keeps (checked on CPU by tests/test_gpu_script.py, on CUDA by tests/test_cuda.py):
- the bias reaches SDPA in the query's dtype: on SM90, cuDNN attention has been reported to misread an
  fp32 mask with a bf16/fp16 query, and the memory-efficient kernel rejects it;
- on CUDA the bias's rows start at multiples of 8 elements (`align_bias`): the memory-efficient kernel
  needs that and otherwise pads a copy of the bias on every call (FasterViT windows have 49 + 4 tokens);
  the cast and the alignment are one copy, the values are unchanged;
- nothing here reads a tensor on the host (no `.item()`, `.cpu()`, data-dependent branches).
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


class AttentionTrace:
    """What each `attend` call under `trace_attention()` handed to SDPA, in call order.

    `records[i]`: `q`, `k`, `v` shapes, `dtype` (the query's), `bias` shape, `bias_dtype`, `bias_stride`
    (None without a bias), `scale`, `dropout_p`; with `keep_tensors`, also `tensors`: detached (q, k, v,
    bias) of that call. The computation is the normal one (the bias as SDPA received it).
    """

    def __init__(self, keep_tensors: bool = False) -> None:
        self.records: list[dict[str, Any]] = []
        self.keep_tensors = keep_tensors

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
               scale: float | None, dropout_p: float) -> torch.Tensor:
        bias = prepare_bias(q, bias)
        record: dict[str, Any] = {
            "q": tuple(q.shape), "k": tuple(k.shape), "v": tuple(v.shape), "dtype": str(q.dtype),
            "device": q.device.type, "bias": None if bias is None else tuple(bias.shape),
            "bias_dtype": None if bias is None else str(bias.dtype),
            "bias_stride": None if bias is None else tuple(bias.stride()), "scale": scale, "dropout_p": dropout_p}
        if self.keep_tensors:
            record["tensors"] = tuple(None if t is None else t.detach() for t in (q, k, v, bias))
        self.records.append(record)
        return _attend(q, k, v, bias, scale, dropout_p)


_CAPTURE: AttentionCapture | AttentionTrace | None = None


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


@contextmanager
def trace_attention(keep_tensors: bool = False) -> Iterator[AttentionTrace]:
    """Within this context every `attend` call is recorded (see AttentionTrace) and computed as usual.
    Eager mode only (a compiled graph does not call back into Python)."""
    global _CAPTURE
    previous, trace = _CAPTURE, AttentionTrace(keep_tensors)
    _CAPTURE = trace
    try:
        yield trace
    finally:
        _CAPTURE = previous


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
    if _CAPTURE is not None:  # analysis: explicit weights or a trace (capture_attention, trace_attention)
        return _CAPTURE.attend(q, k, v, bias, scale, dropout_p)
    return _attend(q, k, v, prepare_bias(q, bias), scale, dropout_p)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
            scale: float | None, dropout_p: float) -> torch.Tensor:
    """`attend` with the bias already prepared (`prepare_bias`)."""
    if _low_precision_trainable_bias(q, bias):
        return _attend_explicit(q, k, v, bias, scale, dropout_p)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale)
    if _is_exporting():
        # the fused CPU kernel returns (B, N, heads, d) memory, its export decomposition (B, heads, N, d):
        # a real copy keeps the views traced after it valid for both (eager and compile read the kernel's
        # layout for free)
        out = out.clone(memory_format=torch.contiguous_format)
    return out

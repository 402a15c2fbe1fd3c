"""What the attention of a model computes, recorded from outside the model.

Every family's attention goes through `layers.attention.attend`, which on the plain path (`layers.plain_paths()`)
calls `torch.nn.functional.scaled_dot_product_attention` with the prepared bias. These
recorders hook that call with a `TorchFunctionMode`: nothing in the models or in `attend` checks for
them, so the hot path carries no analysis code.

- `capture_attention(model)` computes the attention weights of every call explicitly (softmax(q k^T *
  scale + bias), fp32) and records them with the submodule that made the call; the output is the fused
  computation's up to float rounding.
- `trace_attention()` records what every call hands to SDPA (shapes, dtypes, strides, optionally the
  tensors) and computes it unchanged: for benchmarks of the attention path. On the CPU in bf16 (and
  under compile) `attend` uses its explicit form and makes no SDPA call; trace there in fp32 (same
  shapes) or on CUDA.

Eager mode only: a compiled or exported graph does not call back into Python.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..layers.context import plain_paths


def _sdpa_arguments(args: tuple, kwargs: dict) -> tuple:
    """(q, k, v, bias, dropout_p, scale) of one F.scaled_dot_product_attention call."""
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")
    bound = dict(zip(names, args), **kwargs)
    if bound.get("is_causal"):
        raise NotImplementedError("hybridvit's attention never asks SDPA for a causal mask")
    return (bound["query"], bound["key"], bound["value"], bound.get("attn_mask"),
            float(bound.get("dropout_p", 0.0)), bound.get("scale"))


class AttentionCapture(TorchFunctionMode):
    """The attention weights of every attention call made under `capture_attention()`, in call order.

    `records[i]` is a dict: `weights` (B', heads', N, M) float32 on CPU, each row summing to 1 (B' and
    heads' as `attend` received them: a caller may fold windows into the head axis); with a `model`,
    also `module` (qualified name of the innermost submodule running when attend was called, e.g.
    "stages.2.blocks.0.attn") and `calls` (the chain of running submodules, outermost first, as
    (name, args) with every tensor argument replaced by its shape), which give the token geometry.
    """

    def __init__(self) -> None:
        super().__init__()
        self.records: list[dict[str, Any]] = []
        self._stack: list[tuple[str, tuple]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        q, k, v, bias, dropout_p, scale = _sdpa_arguments(args, kwargs)
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


class AttentionTrace(TorchFunctionMode):
    """What each attention call under `trace_attention()` handed to SDPA, in call order.

    `records[i]`: `q`, `k`, `v` shapes, `dtype` (the query's), `bias` shape, `bias_dtype`, `bias_stride`
    (None without a bias), `scale`, `dropout_p`; with `keep_tensors`, also `tensors`: detached (q, k, v,
    bias) of that call. The computation is the normal one (the bias as SDPA received it).
    """

    def __init__(self, keep_tensors: bool = False) -> None:
        super().__init__()
        self.records: list[dict[str, Any]] = []
        self.keep_tensors = keep_tensors

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            q, k, v, bias, dropout_p, scale = _sdpa_arguments(args, kwargs)
            record: dict[str, Any] = {
                "q": tuple(q.shape), "k": tuple(k.shape), "v": tuple(v.shape), "dtype": str(q.dtype),
                "device": q.device.type, "bias": None if bias is None else tuple(bias.shape),
                "bias_dtype": None if bias is None else str(bias.dtype),
                "bias_stride": None if bias is None else tuple(bias.stride()), "scale": scale,
                "dropout_p": dropout_p}
            if self.keep_tensors:
                record["tensors"] = tuple(None if t is None else t.detach() for t in (q, k, v, bias))
            self.records.append(record)
        return func(*args, **kwargs)


@contextmanager
def capture_attention(model: nn.Module | None = None) -> Iterator[AttentionCapture]:
    """Within this context every attention call computes its weights explicitly and records them.

    >>> with torch.no_grad(), capture_attention(model) as cap:
    ...     model(x)
    >>> cap.records[0]["module"], cap.records[0]["weights"].shape

    The model runs its plain path (`plain_paths()`, so that every attention reaches SDPA, where the
    recorder sits). With `model`, each record names the submodule of `model` that called attend (forward
    hooks that are removed on exit). For analysis in eager mode.
    """
    cap = AttentionCapture()
    handles = cap._track(model) if model is not None else []
    try:
        with plain_paths(), cap:
            yield cap
    finally:
        for h in handles:
            h.remove()


@contextmanager
def trace_attention(keep_tensors: bool = False, plain: bool = False) -> Iterator[AttentionTrace]:
    """Within this context every SDPA call is recorded (see AttentionTrace) and computed as usual.
    `plain=True` runs the plain path (`plain_paths()`), where every attention call is an SDPA call, also
    on the CPU in bf16. Eager mode only (a compiled graph does not call back into Python)."""
    trace = AttentionTrace(keep_tensors)
    with plain_paths() if plain else nullcontext(), trace:
        yield trace

"""What a forward pass asks of its context: tracing or exporting, the autocast dtype, and the per-thread
switch to the plain computation.

`plain_paths()` makes every hybridvit forward in the current thread (and asyncio task) take the plain
ops: SDPA for attention and `nn.Linear` for the linears. It is a `contextvars` context, never a process
flag, so one thread's choice cannot change another's or outlive its block. Tracing (`torch.jit.trace`,
`torch.fx`, export) and compilation always see the plain ops; the compiler fuses them itself.
"""
from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch
from torch.fx import _symbolic_trace

# torch >= 2.5 spells it is_fx_symbolic_tracing (is_fx_tracing also answers under torch.export)
_fx_symbolic_tracing = getattr(_symbolic_trace, "is_fx_symbolic_tracing", _symbolic_trace.is_fx_tracing)
# torch.compiler.is_exporting appeared after torch 2.4, the oldest torch hybridvit supports
_is_exporting = getattr(torch.compiler, "is_exporting", lambda: False)

_PLAIN: contextvars.ContextVar[bool] = contextvars.ContextVar("hybridvit_plain_paths", default=False)


@contextlib.contextmanager
def plain_paths(enable: bool = True) -> Iterator[None]:
    """Within the block, this thread's forwards take the plain ops (`enable`), or the measured faster
    forms (`enable=False`); restored on exit. Other threads are not affected."""
    token = _PLAIN.set(bool(enable))
    try:
        yield
    finally:
        _PLAIN.reset(token)


def plain() -> bool:
    """Whether this thread asked for the plain ops (`plain_paths`). False in a graph torch.compile traces:
    compilation takes its own forms whatever the switch says, and dynamo cannot trace `ContextVar.get`
    (a graph break, which fullgraph=True refuses)."""
    return not torch.compiler.is_compiling() and _PLAIN.get()


def is_fx_tracing() -> bool:
    """True while torch.fx.symbolic_trace (or a tracer built on it: torchvision's feature extractor, FX
    quantization) runs the model with Proxy tensors."""
    return _fx_symbolic_tracing()


def is_exporting() -> bool:
    """True while torch.export (or the dynamo-based ONNX export) traces the model."""
    return bool(_is_exporting())


def is_tracing() -> bool:
    """True under torch.jit.trace, torch.fx symbolic tracing, torch.compile / torch.export (dynamo) or
    ONNX export."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling() or is_fx_tracing() or is_exporting()


def eager_inference() -> bool:
    """Eager (not traced), autograd off and the plain ops not asked for."""
    return not torch.is_grad_enabled() and not plain() and not is_tracing()


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast computes in on `device_type`, None where autocast is off."""
    try:
        return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    except (TypeError, AttributeError):  # torch < 2.4 spells it per device
        if device_type == "cpu":
            return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
        return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None

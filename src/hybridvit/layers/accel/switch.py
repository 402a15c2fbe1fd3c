"""The one switch for every fast path (like timm's `use_fused_attn`), and the one shim over torch's
versions for what the fast paths ask of it (tracing, exporting, the autocast state).

hybridvit computes some things faster than the plain formulas in eager inference: eval-cached
position-bias tables, BatchNorm folded into the preceding conv on the fly, oneDNN linears with the bias,
GELU or residual add in the GEMM epilogue, in-place activations and residual adds on temporaries. Each
gives the plain computation's values (up to float rounding, checked by the tests). Turn all of them off
to read, test or debug the plain path: `HYBRIDVIT_FAST_PATHS=0` in the environment, or
`set_fast_paths(False)` / `with fast_paths(False): ...` in code.

Tracing (`torch.jit.trace`, `torch.fx`, export) and compilation always take the plain path: the compiler fuses the
plain ops itself, and a tracer must not bake a cache or a private op into its graph.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
from torch.fx import _symbolic_trace

# torch >= 2.5 spells it is_fx_symbolic_tracing (is_fx_tracing also answers under torch.export)
_fx_symbolic_tracing = getattr(_symbolic_trace, "is_fx_symbolic_tracing", _symbolic_trace.is_fx_tracing)

_enabled = os.environ.get("HYBRIDVIT_FAST_PATHS", "1").strip().lower() not in ("0", "false", "no", "off")


def fast_paths_enabled() -> bool:
    """Whether the fast paths are switched on (the default; `HYBRIDVIT_FAST_PATHS=0` turns them off)."""
    return _enabled


def set_fast_paths(enable: bool) -> bool:
    """Switches every fast path on or off; returns the previous setting."""
    global _enabled
    previous, _enabled = _enabled, bool(enable)
    return previous


@contextlib.contextmanager
def fast_paths(enable: bool) -> Iterator[None]:
    """Context with the fast paths switched on or off, restored on exit."""
    previous = set_fast_paths(enable)
    try:
        yield
    finally:
        set_fast_paths(previous)


def is_fx_tracing() -> bool:
    """True while torch.fx.symbolic_trace (or a tracer built on it: torchvision's feature extractor, FX
    quantization) runs the model with Proxy tensors."""
    return _fx_symbolic_tracing()


# torch.compiler.is_exporting appeared after torch 2.4, the oldest torch hybridvit supports
_is_exporting = getattr(torch.compiler, "is_exporting", lambda: False)


def is_exporting() -> bool:
    """True while torch.export (or the dynamo-based ONNX export) traces the model."""
    return bool(_is_exporting())


def is_tracing() -> bool:
    """True under torch.jit.trace, torch.fx symbolic tracing, torch.compile / torch.export (dynamo) or
    ONNX export."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling() or is_fx_tracing() or is_exporting()


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast computes in on `device_type`, None where autocast is off."""
    try:
        return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    except (TypeError, AttributeError):  # torch < 2.4 spells it per device
        if device_type == "cpu":
            return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
        return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None


def eager_fast() -> bool:
    """Fast paths on and running eagerly (not traced or compiled)."""
    return _enabled and not is_tracing()


def eager_inference() -> bool:
    """Fast paths on, eager, and autograd off: where results may be cached or computed in place."""
    return eager_fast() and not torch.is_grad_enabled()

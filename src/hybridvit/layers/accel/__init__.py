"""The speed machinery of the blocks, apart from the blocks themselves (`layers/`).

- `switch`: the one switch for every fast path (`fast_paths(False)` gives the plain computation) and the
  one shim over torch versions (tracing, exporting, the autocast state);
- `cache`: the one version-keyed cache (position-bias tables per geometry, cast copies of parameters,
  BatchNorm-folded conv weights, CabViT's gathered attention bias);
- `fused_linear`: linears with oneDNN's GEMM epilogues, in-place GELU and residual adds;
- `cpu_bf16`: bf16 products on fp32 kernels on CPUs without bf16 instructions.

Every fast path gives the plain computation's values up to float rounding (the tests check each).
"""
from .cache import CachedTable, cached_for, cast_param, version_key
from .cpu_bf16 import Bf16ByFp32Kernels, bf16_kernels, cpu_has_native_bf16, model_policy, use_fp32_kernels
from .fused_linear import add_residual, gelu_, linear, onednn_applies
from .switch import (
    autocast_dtype,
    eager_fast,
    eager_inference,
    fast_paths,
    fast_paths_enabled,
    is_exporting,
    is_fx_tracing,
    is_tracing,
    set_fast_paths,
)

__all__ = ["CachedTable", "cached_for", "cast_param", "version_key", "Bf16ByFp32Kernels", "bf16_kernels",
           "cpu_has_native_bf16", "model_policy", "use_fp32_kernels", "add_residual", "gelu_", "linear",
           "onednn_applies",
           "autocast_dtype", "eager_fast", "eager_inference", "fast_paths", "fast_paths_enabled", "is_exporting",
           "is_fx_tracing", "is_tracing", "set_fast_paths"]

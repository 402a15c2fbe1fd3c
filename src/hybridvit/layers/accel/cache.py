"""The one version-keyed cache of the fast paths: values computed from parameters, reused while the
parameters are unchanged (`version_key`).

- `CachedTable`: tables that depend only on a module's own parameters and a geometry;
- `cast_param`: a parameter's copy in another dtype (bf16 weights of the fused linears);
- `cached_for`: any other value computed from a module's tensors (BatchNorm-folded and oneDNN-reordered
  convolution weights, CabViT's gathered attention bias).

FasterViT's continuous position bias and absolute position MLP and CrossFormer's dynamic position bias
(DPB) are MLPs evaluated on fixed coordinates: in inference their output is the same for every batch.
`CachedTable` computes it once per geometry and reuses it, keyed on the identity and the version
counter of every parameter of the module (`Tensor._version` grows with each in-place write), so an
in-place weight edit in eval mode (an external EMA such as `torch.optim.swa_utils.AveragedModel` or
timm's `ModelEma`, `load_state_dict`, `.to()`) can never be served a stale table: no `eval()` or
refresh call is needed. Training, autograd, tracing/compilation, dispatch modes such as FLOP counters
and `set_fast_paths(False)` always compute. (Writes through `.data` bypass version counters, as they
bypass autograd's checks.)
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.utils._python_dispatch import _disable_current_modes, _get_current_dispatch_mode
from torch.utils.weak import WeakIdKeyDictionary

from .cpu_bf16 import Bf16ByFp32Kernels
from .switch import autocast_dtype, eager_inference

_MAX_GEOMETRIES = 8  # a few input sizes in one process (multi-scale eval); beyond that, oldest first out
_OUTSIDE_MODES = False


@contextlib.contextmanager
def tables_outside_dispatch_modes() -> Iterator[None]:
    """While active, tables are computed with the dispatch modes (a FLOP counter) switched off: counts are
    per-image work, without the once-per-resolution tables that inference reads from the cache (on real
    and meta tensors alike, at any batch size). Used by `hybridvit.flops`."""
    global _OUTSIDE_MODES
    before, _OUTSIDE_MODES = _OUTSIDE_MODES, True
    try:
        yield
    finally:
        _OUTSIDE_MODES = before


def version_key(tensors: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> tuple:
    """What a cached value computed from `tensors` depends on: each tensor's storage, version counter
    (`Tensor._version` grows with every in-place write), dtype and device. A new key after any in-place
    edit, `load_state_dict` or `.to()`: the cache can never serve a stale value."""
    return tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)


# parameter -> (version key, target dtype, packed) and its cast (or packed) copy; entries go with their parameter
_CAST_PARAMS: WeakIdKeyDictionary = WeakIdKeyDictionary()
_REORDER_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def cast_param(t: torch.Tensor | None, dtype: torch.dtype, pack: bool = False) -> torch.Tensor | None:
    """`t` in `dtype`; the copy is cached per parameter under its `version_key`.

    `pack`: a linear weight (out, in) is also reordered once into oneDNN's blocked layout for its
    inner product (an opaque mkldnn tensor that only `torch.ops.mkldnn._linear_pointwise` reads), where
    the plain layout is reordered inside every call: 1.04-1.05x whole-model eager bf16 at batch 16 and
    1.04-1.13x at batch 1 on Zen 5 (fastervit_0, crossformerpp_s, cabvit_h_l2), the same values. Also in
    fp32, where it costs one more copy of the linear weights. Plain copies where this PyTorch has no
    reorder op."""
    if t is not None and t.is_inference():  # made under torch.inference_mode: no version counter to key on
        return t.to(dtype)
    pack = pack and _REORDER_LINEAR and t is not None and t.dim() == 2 and t.device.type == "cpu"
    if t is None or (t.dtype == dtype and not pack):
        return t
    key = (version_key((t,)), dtype, pack)
    hit = _CAST_PARAMS.get(t)
    if hit is not None and hit[0] == key:
        return hit[1]
    value = t.detach().to(dtype)
    if pack:
        value = torch.ops.mkldnn._reorder_linear_weight(value)
    _CAST_PARAMS[t] = (key, value)
    return value


def _remember(store: dict, geometry: tuple, key: tuple, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    """store[geometry]'s value if its key is `key`, else compute() stored under it (at most
    `_MAX_GEOMETRIES` geometries, oldest first out)."""
    hit = store.get(geometry)
    if hit is not None and hit[0] == key:
        return hit[1]
    value = compute()
    store.pop(geometry, None)
    if len(store) >= _MAX_GEOMETRIES:
        store.pop(next(iter(store)))
    store[geometry] = (key, value)
    return value


def _cached(store: Callable[[], dict], geometry: tuple, tensors: list[torch.Tensor], training: bool,
            compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    """compute(), or its value kept in store() under `geometry` and the `version_key` of `tensors` (what it
    reads) with the autocast dtype. The rules of every cached value: only in eager no-grad eval
    (`training` False), with no dispatch mode but the CPU bf16 policy (FLOP counters and memory tracers
    see every op; `tables_outside_dispatch_modes` computes with them off), on real tensors with version
    counters (none made under inference mode)."""
    if _OUTSIDE_MODES and _get_current_dispatch_mode() is not None:
        with _disable_current_modes():
            return compute()
    if training or not eager_inference():
        return compute()
    mode = _get_current_dispatch_mode()
    if not (mode is None or isinstance(mode, Bf16ByFp32Kernels)):
        return compute()
    if tensors[0].device.type == "meta" or any(t.is_inference() for t in tensors):
        return compute()
    return _remember(store(), geometry, (autocast_dtype(tensors[0].device.type), version_key(tensors)), compute)


# module -> {geometry: (version key, value)}; entries go with their module (and never into pickles)
_MODULE_VALUES: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _module_store(module: nn.Module) -> dict:
    store = _MODULE_VALUES.get(module)
    if store is None:
        store = _MODULE_VALUES[module] = {}
    return store


def cached_for(module: nn.Module, geometry: tuple, tensors: list[torch.Tensor],
               compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    """compute(), a value that depends only on `tensors` (the module's parameters and buffers it reads)
    and `geometry` (hashable), cached per module under the rules of `CachedTable.table` (`_cached`). For
    modules whose parameters are not a `CachedTable` of their own (their state_dict names are the
    official ones)."""
    return _cached(lambda: _module_store(module), geometry, tensors, module.training, compute)


class CachedTable(nn.Module):
    """A module whose `compute(*geometry)` depends only on its parameters and `geometry` (ints).

    `table(*geometry)` returns compute(*geometry), from the cache in eager no-grad eval when the
    parameters are unchanged since it was computed.
    """

    # names of the buffers `keep_geometry` registers, one per tensor `geometry` returns
    GEOMETRY_BUFFERS: tuple[str, ...] = ()

    def __init__(self) -> None:
        super().__init__()
        self._tables: dict[tuple, tuple[tuple, torch.Tensor]] = {}
        self._kept_geometry: tuple[int, ...] | None = None

    def compute(self, *geometry: int) -> torch.Tensor:  # pragma: no cover - implemented by subclasses
        raise NotImplementedError

    def geometry(self, *size: int, device: torch.device | None) -> tuple[torch.Tensor, ...]:
        """The constant tensors `compute` reads for a size (coordinates, pair indices): no parameters."""
        raise NotImplementedError  # pragma: no cover - implemented by the subclasses that keep one

    def keep_geometry(self, *size: int) -> None:
        """Keeps `geometry(*size)` (the configured size) in the non-persistent buffers `GEOMETRY_BUFFERS`,
        created on the construction device. Under torch.compile with freezing, buffers are constants and
        the whole table folds into one; tensors made in the graph from `arange` would not (inductor folds no
        constructors), and a gather left in the graph is fused into every consumer (each softmax)."""
        self._kept_geometry = size
        for name, t in zip(self.GEOMETRY_BUFFERS, self.geometry(*size, device=None), strict=True):
            self.register_buffer(name, t, persistent=False)

    @torch.no_grad()
    def init_non_persistent_buffers(self) -> None:
        """Fills the kept geometry again (timm's hook; after `to_empty` the buffers hold garbage)."""
        if self._kept_geometry is None:
            return
        device = getattr(self, self.GEOMETRY_BUFFERS[0]).device
        for name, t in zip(self.GEOMETRY_BUFFERS, self.geometry(*self._kept_geometry, device=device), strict=True):
            getattr(self, name).copy_(t)

    def geometry_for(self, *size: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        """`geometry(*size)` on `device`: the kept buffers where they match, else computed."""
        if size == self._kept_geometry and getattr(self, self.GEOMETRY_BUFFERS[0]).device == device:
            return tuple(getattr(self, name) for name in self.GEOMETRY_BUFFERS)
        return self.geometry(*size, device=device)

    def table(self, *geometry: int) -> torch.Tensor:
        return _cached(lambda: self._tables, geometry, list(self.parameters()), self.training,
                       lambda: self.compute(*geometry))

    def __getstate__(self) -> dict:
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state["_tables"] = {}  # pickles and deep copies start empty (their parameters are new tensors)
        return state

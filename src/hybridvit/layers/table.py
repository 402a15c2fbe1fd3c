"""Values derived from parameters for a geometry: position-bias tables and gathered biases.

FasterViT's continuous position bias and absolute position MLP, CrossFormer's dynamic position bias
(DPB) and CabViT's gathered attention biases depend only on parameters and sizes. An ordinary model
computes them at every forward from its parameters, so no edit of a weight (in place, through
`p.data`, `load_state_dict(assign=True)`, an EMA) can ever be answered from an older value.

The inference form computes them once: `model.fuse()` runs one forward at the configured input size
inside `record_tables()`, and every value met there is stored as a non-persistent buffer of its module
(`derived` returns it for that geometry from then on; other sizes are still computed per call). A fused
model is frozen: it refuses `train()`, `load_state_dict` and `save_pretrained`.

Only pure geometry (coordinates, pair indices) is ever kept by an ordinary model: `PositionTable`
keeps that of its configured size in non-persistent buffers.
"""
from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Hashable, Iterator

import torch
from torch import nn
from torch.utils._python_dispatch import _disable_current_modes, _get_current_dispatch_mode

_RECORD: contextvars.ContextVar[bool] = contextvars.ContextVar("hybridvit_record_tables", default=False)
_OUTSIDE_MODES: contextvars.ContextVar[bool] = contextvars.ContextVar("hybridvit_tables_outside", default=False)


@contextlib.contextmanager
def record_tables() -> Iterator[None]:
    """While active (in `HybridModel.fuse`), each value `derived` computes is stored in its module."""
    token = _RECORD.set(True)
    try:
        yield
    finally:
        _RECORD.reset(token)


@contextlib.contextmanager
def tables_outside_dispatch_modes() -> Iterator[None]:
    """While active, derived tables are computed with the dispatch modes (a FLOP counter) switched off:
    counts are then the per-image work, without the once-per-resolution tables of the inference form.
    Used by `hybridvit.flops`."""
    token = _OUTSIDE_MODES.set(True)
    try:
        yield
    finally:
        _OUTSIDE_MODES.reset(token)


def derived(module: nn.Module, key: Hashable, compute: Callable[[], torch.Tensor | None]) -> torch.Tensor | None:
    """compute(), a value that depends only on `module`'s parameters and the geometry `key`; in a fused
    model, the value `fuse()` stored for `key` (see the module docstring)."""
    names = module.__dict__.get("_fused_tables")
    if names is not None and key in names:
        return getattr(module, names[key])
    if torch.compiler.is_compiling():  # nothing to record or step around in a compiled graph, and dynamo
        return compute()  # cannot trace ContextVar.get (a graph break)
    if _OUTSIDE_MODES.get() and _get_current_dispatch_mode() is not None:
        with _disable_current_modes():
            value = compute()
    else:
        value = compute()
    if _RECORD.get() and value is not None:
        names = module.__dict__.setdefault("_fused_tables", {})
        name = f"fused_table_{len(names)}"
        module.register_buffer(name, value.detach(), persistent=False)
        names[key] = name
    return value


class PositionTable(nn.Module):
    """A module whose `compute(*geometry)` depends only on its parameters and `geometry` (ints);
    `table(*geometry)` is compute(*geometry) (`derived`)."""

    # names of the buffers `keep_geometry` registers, one per tensor `geometry` returns
    GEOMETRY_BUFFERS: tuple[str, ...] = ()

    def __init__(self) -> None:
        super().__init__()
        self._kept_geometry: tuple[int, ...] | None = None

    def compute(self, *geometry: int) -> torch.Tensor:  # pragma: no cover - implemented by subclasses
        raise NotImplementedError

    def geometry(self, *size: int, device: torch.device | None) -> tuple[torch.Tensor, ...]:
        """The constant tensors `compute` reads for a size (coordinates, pair indices): no parameters."""
        raise NotImplementedError  # pragma: no cover - implemented by the subclasses that keep one

    def keep_geometry(self, *size: int) -> None:
        """Keeps `geometry(*size)` (the configured size) in the non-persistent buffers `GEOMETRY_BUFFERS`.
        Under torch.compile with freezing, buffers are constants and the whole table folds into one;
        tensors made in the graph from `arange` would not (inductor folds no constructors)."""
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
        return derived(self, geometry, lambda: self.compute(*geometry))

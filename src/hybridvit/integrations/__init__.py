"""Adapters to other libraries, each imported only when its library is present.

- `hybridvit.integrations.timm`: hybridvit's models in timm's registry (`timm.create_model`).
- `hybridvit.integrations.torchvision_detection`: backbones for torchvision's FPN / Faster / Mask R-CNN.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings
from typing import Any


class _TimmImportHook(importlib.abc.MetaPathFinder):
    """Registers hybridvit's models into timm's registry right after `import timm` finishes, so that
    `import hybridvit` does not pay for importing timm (and torchvision) when it is not used.

    Each spec found for "timm" registers when its module is executed, so that a look-up that only asks
    whether timm is installed (`importlib.util.find_spec("timm")`, as transformers does before importing
    it) does not use the hook up; the hook leaves sys.meta_path once timm is imported."""

    _busy = False

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != "timm" or self._busy:
            return None
        self._busy = True  # the look-up below asks every finder again, this one included
        try:
            spec = importlib.util.find_spec("timm")
        finally:
            self._busy = False
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module: Any) -> None:
            exec_module(module)
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            _register()

        spec.loader.exec_module = exec_then_register  # type: ignore[method-assign]
        return spec


def _register() -> None:
    try:
        from .timm import register_timm_models
        register_timm_models()
    except Exception as e:  # a timm too old or too new must not break `import timm` or `import hybridvit`
        warnings.warn(f"hybridvit's models could not be registered in timm: {type(e).__name__}: {e}", stacklevel=2)


def install_timm_hook() -> None:
    """Registers now if timm is already imported, otherwise as soon as it is (idempotent)."""
    if "timm" in sys.modules:
        if getattr(sys.modules["timm"], "__path__", None):  # the real package, not a blocked/stubbed name
            _register()
    elif not any(isinstance(f, _TimmImportHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _TimmImportHook())

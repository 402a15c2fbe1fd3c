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
    `import hybridvit` does not pay for importing timm (and torchvision) when it is not used."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != "timm":
            return None
        sys.meta_path.remove(self)  # once; and lets find_spec below find the real timm
        spec = importlib.util.find_spec("timm")
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module: Any) -> None:
            exec_module(module)
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

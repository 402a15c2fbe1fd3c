"""pytest plugin: runs timm's own tests/test_models.py on hybridvit's models (scripts/test_ecosystem.sh).

`import hybridvit` before timm's test module is collected puts every hybridvit model in timm's registry,
so the test module's `list_models(...)` parametrisations include them. Collection then keeps only the
tests parametrised with a selected hybridvit model (HYBRIDVIT_TIMM_MODELS, comma-separated, default:
every registered model but HYBRIDVIT_TIMM_EXCLUDE); timm's own models and the tests written for one named
timm model are deselected. Which test functions are left out (TorchScript, weight downloads) is decided
by the `-k` expression of the calling script, where the reasons are written.
"""
from __future__ import annotations

import fnmatch
import os

import timm  # noqa: F401  (hybridvit registers its models in timm's registry on this import)

import hybridvit


def _selected() -> set[str]:
    from hybridvit.integrations.timm import timm_names

    names = timm_names()
    wanted = [n for n in os.environ.get("HYBRIDVIT_TIMM_MODELS", "").split(",") if n] or list(names)
    exclude = [p for p in os.environ.get("HYBRIDVIT_TIMM_EXCLUDE", "").split(",") if p]
    return {names[n] for n in wanted if n in names and not any(fnmatch.fnmatch(n, p) for p in exclude)}


def pytest_report_header(config):
    return f"hybridvit {hybridvit.__version__}: timm's test_models.py on {len(_selected())} hybridvit models"


def pytest_collection_modifyitems(config, items):
    selected = _selected()
    keep, drop = [], []
    for item in items:
        spec = getattr(item, "callspec", None)
        name = spec.params.get("model_name") if spec is not None else None
        (keep if name in selected else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = keep

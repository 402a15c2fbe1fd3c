"""Shared test helpers. The official fixtures live in tests/fixtures (see tests/fixtures/README.md): a clone
of the project tests itself with nothing beside it."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
OFFICIAL = FIXTURES / "official"

torch.set_num_threads(min(2, torch.get_num_threads()))


def _as_float32(obj):
    if isinstance(obj, torch.Tensor):
        return obj.float() if obj.is_floating_point() else obj
    if isinstance(obj, dict):
        return {k: _as_float32(v) for k, v in obj.items()}
    return obj


def load_fixture(name: str) -> dict:
    """An official fixture with its floating tensors (stored as exact float16) cast to float32."""
    path = OFFICIAL / f"{name}.pt"
    if not path.is_file():
        pytest.fail(f"official fixture {path} is missing from the repository")
    return _as_float32(torch.load(path, weights_only=True))


def official_state_dicts() -> dict:
    with open(FIXTURES / "official_state_dicts.json") as f:
        return json.load(f)


def assert_matches_official_layout(name: str) -> None:
    """`name` built on the meta device has the official parameter count, and its converter maps the
    official key list (official_state_dicts.json) onto exactly the model's keys and shapes."""
    from hybridvit.registry import count_params, meta_model

    official = official_state_dicts()[name]
    model = meta_model(name)
    assert count_params(model) == official["params"]
    converted = model.convert_official({k: torch.empty(s, device="meta") for k, s in official["state_dict"]})
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sorted(converted) == sorted(own)
    assert {k: tuple(v.shape) for k, v in converted.items()} == own


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch: shapes seen by an earlier test's compilation would otherwise mark
    dimensions dynamic (automatic dynamic shapes), and symbolic tracing of the window geometry is very slow."""
    yield
    if "torch._dynamo" in sys.modules:
        torch._dynamo.reset()


def pytest_runtest_makereport(item, call):
    """HYBRIDVIT_REQUIRE_INTEGRATIONS=1 (the ecosystem lane, scripts/test_ecosystem.sh): an integration test
    that skips (its library missing or broken) fails instead, so the lane cannot pass without running it."""
    if os.environ.get("HYBRIDVIT_REQUIRE_INTEGRATIONS") != "1" or item.get_closest_marker("integration") is None:
        return None
    if call.excinfo is not None and call.excinfo.errisinstance(pytest.skip.Exception):
        from _pytest.reports import TestReport
        report = TestReport.from_item_and_call(item, call)
        report.outcome = "failed"
        report.longrepr = (f"integration test skipped where it must run (HYBRIDVIT_REQUIRE_INTEGRATIONS=1): "
                           f"{call.excinfo.value}")
        return report
    return None


# -------------------------------------------------------- shared image folders
@pytest.fixture
def colours(tmp_path):
    from _imagedata import make_folder
    return make_folder(tmp_path / "data", n_train=1, n_val=2, size=24)  # {train,val}/{blue,red}


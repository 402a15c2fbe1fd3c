"""Shared test helpers: the official fixtures live in ../shared/reference (relative to the project root)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT.parent / "shared" / "reference"
OFFICIAL = REFERENCE / "official"

torch.set_num_threads(min(2, torch.get_num_threads()))


def load_fixture(name: str) -> dict:
    path = OFFICIAL / f"{name}.pt"
    if not path.is_file():
        pytest.fail(f"official fixture {path} is missing: the tests expect ../shared/reference next to the project")
    return torch.load(path, weights_only=True)


def official_state_dicts() -> dict:
    with open(REFERENCE / "official_state_dicts.json") as f:
        return json.load(f)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch: shapes seen by an earlier test's compilation would otherwise mark
    dimensions dynamic (automatic dynamic shapes), and symbolic tracing of the window geometry is very slow."""
    yield
    if "torch._dynamo" in sys.modules:
        torch._dynamo.reset()

"""The code is ruff clean (pyproject.toml's rules), so that a lint failure shows in CI, not in review."""
from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from conftest import ROOT


def test_ruff_is_clean():
    pytest.importorskip("ruff", reason="ruff comes with the dev extra")
    ruff = shutil.which("ruff") or shutil.which("ruff", path=str(ROOT / ".venv" / "bin"))
    cmd = [ruff] if ruff else [sys.executable, "-m", "ruff"]
    done = subprocess.run([*cmd, "check", "--no-cache", "src", "tests", "benchmarks", "scripts", "examples"],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]

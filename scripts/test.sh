#!/usr/bin/env bash
# Set-up (idempotent) and the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
. .venv/bin/activate
python -m pytest -q -x --durations=15 "$@"

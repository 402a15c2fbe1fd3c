#!/usr/bin/env bash
# Set-up (idempotent), then the main job: `hybridvit train` on the embedded default dataset.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
. .venv/bin/activate
hybridvit train "$@"

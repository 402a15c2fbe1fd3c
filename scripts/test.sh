#!/usr/bin/env bash
# Set-up (idempotent) and the whole test suite, in two lanes:
# lane 1: the core install (.venv: CPU torch 2.13 with its extras, scripts/setup.sh), every test (integration
#         tests that need timm/torchvision/transformers skip there with the reason), then the docs site built
#         in strict mode (scripts/docs.sh);
# lane 2: scripts/test_ecosystem.sh (.venv-eco: torch 2.14.1 + torchvision 0.29.1, timm, transformers):
#         every integration test, none may skip, and timm's own tests/test_models.py on hybridvit's models.
# HYBRIDVIT_LANES="1" (or "2") runs one lane; arguments go to lane 1's pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
LANES=${HYBRIDVIT_LANES:-1 2}
if [[ " $LANES " == *" 1 "* ]]; then
  ./scripts/setup.sh
  (. .venv/bin/activate && python -m pytest -q -x --durations=15 "$@")
  # the documentation site, strict: a broken link or an API reference that does not resolve fails CI
  (. .venv/bin/activate && ./scripts/docs.sh "$(mktemp -d)")
fi
if [[ " $LANES " == *" 2 "* ]]; then
  ./scripts/test_ecosystem.sh
fi

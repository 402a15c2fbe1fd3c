#!/usr/bin/env bash
# The GPU check in one command (see gpu_check.py): on one H100/H200 it finishes in under 8 minutes and
# writes JSON under $OUT (or --out DIR, default benchmarks/gpu/out); benchmarks/gpu/render.py turns it
# into the README's GPU tables.
#
#   benchmarks/gpu/run.sh                 # on the GPU machine
#   benchmarks/gpu/run.sh --dry-run       # the same code paths on the CPU, tiny, one repeat (< 2 min)
#
# The official implementations come from the ignored folder official/ (repository root), made by
# benchmarks/gpu/prepare_official.sh from the three public repositories; on the device machine carry it
# along (it is ignored by git). timm must be installed there (the device image has it).
# Exit status: 0 all sections ran, 1 a section failed (its traceback is in the JSON), 3 some work did not
# fit its time budget (listed as not_run).
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
py="${PYTHON:-}"
if [ -z "$py" ]; then
    if [ -x "$root/.venv/bin/python" ]; then py="$root/.venv/bin/python"; else py="$(command -v python3 || command -v python)"; fi
fi
export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}"
if [ -d "$root/official/refs" ] && [ -z "${HV_OFFICIAL_REFS:-}" ]; then
    export HV_OFFICIAL_REFS="$root/official/refs"
fi
if [ -n "${HV_OFFICIAL_REFS:-}" ]; then
    tools="${HV_OFFICIAL_TOOLS:-$root/official/tools}"
    export PYTHONPATH="$PYTHONPATH:$tools"
fi
# the GPU machine has no network and no kornia (`hybridvit train` needs it): the wheels prepare_official.sh
# put in official/wheels are installed into a temporary folder
if ! "$py" -c "import kornia" 2>/dev/null && ls "$root"/official/wheels/kornia-*.whl >/dev/null 2>&1; then
    site="${TMPDIR:-/tmp}/hybridvit_gpu_site"
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
        "$root"/official/wheels/kornia*.whl
    export PYTHONPATH="$PYTHONPATH:$site"
fi
export PYTHONUNBUFFERED=1
# sixteen cores on the GPU machine: compile workers and loader workers use them; no oversubscription in tests
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-${TMPDIR:-/tmp}/hybridvit_inductor_cache}"
exec "$py" "$root/benchmarks/gpu/gpu_check.py" "$@"

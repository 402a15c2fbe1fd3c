#!/usr/bin/env bash
# Lane 2 of the tests (called by scripts/test.sh after lane 1): hybridvit in the ecosystem.
#
# Its own virtual environment, .venv-eco (set up here, idempotent, on a fresh clone too): torch 2.14.1 and
# torchvision 0.29.1 (a matching pair: torchvision's wheels import only next to their torch; lane 1's CPU
# torch 2.13 has no torchvision), timm, transformers, and hybridvit (editable) with its extras. Then:
#
# 1. every integration test (`-m integration`: timm registration and hf-hub loading through timm,
#    torchvision FPN / Mask R-CNN / FX feature extraction, timm's training pieces, transformers' UperNet),
#    with HYBRIDVIT_REQUIRE_INTEGRATIONS=1: an integration test that skips here fails the lane;
# 2. timm's own tests/test_models.py, from timm's published source distribution fetched now (never copied
#    into this repository), on every registered hybridvit model but the few largest (below).
#
# Environment: HYBRIDVIT_ECO_VENV (default .venv-eco), TIMM_VERSION (default 1.0.31), HYBRIDVIT_TIMM_EXCLUDE.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${HYBRIDVIT_ECO_VENV:-.venv-eco}
TIMM_VERSION=${TIMM_VERSION:-1.0.31}
start=$SECONDS

# ------------------------------------------------------------------------------------------------ set-up
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
PY=$ROOT/$VENV/bin/python
"$PY" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! "$PY" -c "import torch, torchvision, sys; sys.exit(not (torch.__version__.startswith('2.14.1') and torchvision.__version__.startswith('0.29.1')))" 2>/dev/null; then
  "$PY" -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
fi
if ! "$PY" -c "import timm, transformers, pytest_timeout, sys; sys.exit(timm.__version__ != '$TIMM_VERSION')" 2>/dev/null; then
  "$PY" -m pip install -q "timm==$TIMM_VERSION" "transformers>=5" pytest-timeout
fi
if ! "$PY" -c "import hybridvit, onnxscript, onnxruntime, sys; sys.exit(not hybridvit.__file__.startswith('$ROOT/src/'))" 2>/dev/null; then
  # the onnx extra too: modules that need it skip at import otherwise, which -m integration would count
  "$PY" -m pip install -q -e ".[train,safetensors,hub,dev,onnx]"
fi
"$PY" -c "import torch, torchvision, timm, transformers; print(f'lane 2: torch {torch.__version__}, torchvision {torchvision.__version__}, timm {timm.__version__}, transformers {transformers.__version__}')"

# ------------------------------------------------------------------------------- 1. integration tests
log=$(mktemp)
HYBRIDVIT_REQUIRE_INTEGRATIONS=1 "$PY" -m pytest -q -m integration --durations=10 -p no:cacheprovider -rs tests \
  2>&1 | tee "$log"
if grep -Eq "[0-9]+ skipped" "$log"; then  # also a module that skips at import: nothing here may skip
  echo "lane 2: tests were skipped (above); every test this lane runs must run" >&2
  exit 1
fi

# ------------------------------------------------------------------------------ 2. timm's test_models.py
SDIST_DIR=build/timm-sdist
SRC=$SDIST_DIR/timm-$TIMM_VERSION
if [ ! -f "$SRC/tests/test_models.py.orig" ]; then
  rm -rf "$SDIST_DIR" && mkdir -p "$SDIST_DIR"
  "$PY" -m pip download -q --no-binary :all: --no-deps "timm==$TIMM_VERSION" -d "$SDIST_DIR"
  tar -xzf "$SDIST_DIR/timm-$TIMM_VERSION.tar.gz" -C "$SDIST_DIR"
  cp "$SRC/tests/test_models.py" "$SRC/tests/test_models.py.orig"
fi
# timm keeps the models whose forward_features returns tokens (B, N, C) rather than an NCHW map, its ViTs,
# in the NON_STD_FILTERS list of test_models.py, which sends them to test_model_default_cfgs_non_std; timm
# adds every such family there. CabViT-P is one (a class-token model), so it is added to that list; the
# tests themselves are timm's, unchanged.
sed "s/^NON_STD_FILTERS = \[\$/NON_STD_FILTERS = ['cabvit_p_*',/" "$SRC/tests/test_models.py.orig" > "$SRC/tests/test_models.py"
grep -q "^NON_STD_FILTERS = \['cabvit_p_\*'," "$SRC/tests/test_models.py" || { echo "NON_STD_FILTERS not found in timm's test_models.py"; exit 1; }

# The few largest, left out as timm's own CI leaves out its largest models (memory and time on 2 cores):
# FasterViT-4/5/6 and the four FasterViT-4-21K models (424 M to 1.36 G parameters). Every other
# registered model runs (FasterViT-0..3 and nano, every CrossFormer and CrossFormer++, every CabViT).
export HYBRIDVIT_TIMM_EXCLUDE=${HYBRIDVIT_TIMM_EXCLUDE:-fastervit_4,fastervit_5,fastervit_6,fastervit_4_21k_*}
# Left out of timm's tests (-k):
# - TorchScript (test_model_forward_torchscript, test_model_forward_fx_torchscript): hybridvit models are
#   not scriptable (window geometry, caches and optional modules are plain Python), and do not claim to be;
#   torch.jit.trace, torch.export, torch.compile and ONNX export are what they support (lane 1 tests them);
# - weight downloads (test_model_inference, test_model_load_pretrained, test_model_features_pretrained):
#   they fetch published weights or timm's reference tensors from the network, which CI does not have
#   (hybridvit's published-weight numerics are checked against the official fixtures in lane 1).
(cd "$SRC/tests" && PYTHONPATH=$ROOT/scripts "$PY" -m pytest -q -p timm_suite_plugin -p no:cacheprovider \
  test_models.py -k "not torchscript and not pretrained and not test_model_inference" -rfE --durations=15)
echo "lane 2 (ecosystem) passed in $((SECONDS - start)) s"

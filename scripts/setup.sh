#!/usr/bin/env bash
# Creates .venv with the CPU build of torch and hybridvit (editable) with its training, onnx, openvino, int8, hub, dev and docs extras.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
# The CPU build first, so that the `torch>=2.4` requirement below is already satisfied.
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[train,safetensors,onnx,openvino,int8,dev,hub,docs]"

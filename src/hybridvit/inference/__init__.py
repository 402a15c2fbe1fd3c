"""Inference with a trained or published model: `hybridvit eval` (evaluate.py), `hybridvit predict`
(predict.py). Every command loads its model with `hybridvit.loading.load_for_command`. Needs torch, and pillow
for image files; nothing of the training extra."""
from __future__ import annotations

from ..loading import load_for_command

__all__ = ["load_for_command"]

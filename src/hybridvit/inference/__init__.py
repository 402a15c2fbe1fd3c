"""Inference with a trained or published model: `hybridvit eval` (evaluate.py), `hybridvit predict`
(predict.py), and the model loading every command shares (`load_for_command`). Needs torch, and pillow
for image files; nothing of the training extra."""
from __future__ import annotations

from torch import nn


def load_for_command(pretrained: str | None, model_name: str | None = None, *, num_classes: int | None = None,
                     img_size: int | None = None, ema: bool = False) -> nn.Module:
    """The model a command (eval, predict, export, bench, analyze) works on, in eval mode.

    pretrained: a hybridvit run checkpoint (or run folder; it knows its model, classes, size and
    preprocessing, so `model_name` may be left out), a Hub folder written by `save_pretrained` or
    `hf-hub:ORG/REPO` (the same), an official checkpoint file (then `model_name` is
    needed), 'true' for the published weights of `model_name`, or None for random weights.
    img_size: below the model's minimum input size, a ValueError naming it (before anything is built).
    The model carries `model_name`, `pretrained_cfg`, `model_kwargs` and `class_names` (None unless the
    checkpoint has them).
    """
    from .. import hub
    from ..checkpoint import (
        CheckpointError,
        is_run_checkpoint,
        model_from_run,
        read_checkpoint_file,
        read_run,
        run_checkpoint_path,
    )
    from ..registry import create_model
    from ..runtime import check_img_size

    overrides = {"img_size": img_size} if img_size else {}
    if pretrained and hub.is_hub_source(pretrained):
        if ema:
            raise CheckpointError(f"--ema needs a hybridvit run checkpoint; {pretrained} is a Hub folder")
        model = hub.load_folder(pretrained)
        for what, given, have in (("model", model_name, model.model_name),
                                  ("--num-classes", num_classes, model.num_classes)):
            if given and given != have:
                raise CheckpointError(f"{pretrained} holds {model.model_name} with {model.num_classes} classes, "
                                      f"not {what} {given}: leave {what.lstrip('-')} out")
        check_img_size(model.model_name, img_size)
        if img_size:
            model.pretrained_cfg = dict(model.pretrained_cfg, input_size=(model.in_chans, img_size, img_size))
        return model
    if pretrained and str(pretrained).lower() != "true":
        path = run_checkpoint_path(pretrained)
        obj = read_checkpoint_file(path)
        if is_run_checkpoint(obj):
            run = read_run(obj, str(path))
            if model_name and model_name != run["model_name"]:
                raise CheckpointError(f"{path} is a run of {run['model_name']}, not {model_name}: leave --model "
                                      "out (a run checkpoint knows its model)")
            if num_classes and num_classes != run["num_classes"]:
                raise CheckpointError(f"{path} predicts {run['num_classes']} classes, not {num_classes}: leave "
                                      "--num-classes out, or fine-tune with hybridvit train --pretrained")
            check_img_size(run["model_name"], img_size)  # before any weights are built
            return model_from_run(run, ema=ema, source=str(path), **overrides)
        if ema:
            raise CheckpointError(f"--ema needs a hybridvit run checkpoint; {path} is not one")
        if not model_name:
            raise CheckpointError(f"{path} is not a hybridvit run checkpoint, so it does not name its model: "
                                  "pass --model NAME (see `hybridvit models`)")
        weights: bool | str = str(path)
    else:
        if not model_name:
            raise ValueError("pass --model NAME (see `hybridvit models`) or --pretrained RUN_CHECKPOINT")
        weights = bool(pretrained)
    check_img_size(model_name, img_size)
    model = create_model(model_name, pretrained=weights, num_classes=num_classes or 1000, **overrides)
    model.class_names = None
    if not hasattr(model, "model_kwargs"):
        model.model_kwargs = overrides
    return model.eval()

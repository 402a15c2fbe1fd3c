"""`hybridvit eval`: top-1/top-5 of a model on an image folder (or the embedded digits), with the
model's own resize/crop/interpolation."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="model name (default: the one stored in a hybridvit checkpoint)")
    p.add_argument("--pretrained", required=True,
                   help="checkpoint path (official or hybridvit), or 'true' for the published weights")
    p.add_argument("--data", default="digits",
                   help="ImageNet-layout ROOT (evaluates ROOT/<split>), a class-folder tree, or 'digits'")
    p.add_argument("--split", default="val", help="sub-folder of ROOT to evaluate (default val)")
    p.add_argument("--num-classes", type=int, help="default: the checkpoint's, else the number of classes")
    p.add_argument("--img-size", type=int, help="input size (default: the checkpoint's or the model's)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=None,
                   help="DataLoader workers (default 0 for digits, else min(4, CPUs))")
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", default="none", help="none | bf16 | fp16")
    p.add_argument("--ema", action="store_true", help="evaluate the EMA weights of a hybridvit checkpoint")
    p.add_argument("--json", metavar="OUT", help="also write the result to this JSON file")
    p.add_argument("--no-progress", action="store_true")


def load_for_inference(pretrained: str, model: str | None = None, num_classes: int | None = None,
                       img_size: int | None = None, ema: bool = False):
    """(model, checkpoint dict or None): a hybridvit training checkpoint knows its model, size and
    classes; an official checkpoint needs --model."""
    import hybridvit
    from hybridvit.checkpoint import read_checkpoint_file

    ckpt: dict[str, Any] | None = None
    if pretrained.lower() != "true":
        obj = read_checkpoint_file(pretrained)
        if "model_name" in obj and "state_dict" in obj:
            ckpt = obj
    name = model or (ckpt or {}).get("model_name")
    if not name:
        raise ValueError("--model is needed: the checkpoint does not name its model")
    kwargs = dict((ckpt or {}).get("model_kwargs", {}))
    if img_size:
        kwargs["img_size"] = img_size
    n = num_classes or (ckpt or {}).get("num_classes") or 1000
    if ckpt is not None:
        m = hybridvit.create_model(name, num_classes=n, **kwargs)
        weights = ckpt["state_dict_ema"] if ema and ckpt.get("state_dict_ema") else ckpt["state_dict"]
        hybridvit.load_checkpoint(m, {"state_dict": weights})
    else:
        m = hybridvit.create_model(name, num_classes=n, pretrained=True if pretrained.lower() == "true"
                                   else pretrained, **kwargs)
    return m.eval(), ckpt


def run(args: argparse.Namespace) -> int:
    import torch

    from ..checkpoint import CheckpointError
    from ..data.folder import DataError
    from ..data.loader import EpochSampler, build_dataset, is_digits, make_loader
    from ..data.transforms import EvalTransform
    from .distributed import pick_device
    from .engine import evaluate

    try:
        model, ckpt = load_for_inference(args.pretrained, args.model, args.num_classes, args.img_size, args.ema)
        classes = (ckpt or {}).get("class_names")
        ds = build_dataset(args.data, args.split, EvalTransform.from_cfg(model.pretrained_cfg),
                           classes=classes if classes and not is_digits(args.data) and
                           all((Path(args.data) / args.split / c).is_dir() for c in classes) else None)
    except (DataError, CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n_out = model.num_classes if hasattr(model, "num_classes") else None
    if n_out is not None and len(ds.classes) > n_out:
        print(f"error: the data has {len(ds.classes)} classes but the model predicts {n_out}", file=sys.stderr)
        return 2
    device = pick_device(args.device)
    model.to(device)
    workers = args.workers
    if workers is None:
        workers = 0 if is_digits(args.data) else min(4, os.cpu_count() or 1)
    loader = make_loader(ds, EpochSampler(len(ds), False, pad=False), args.batch_size, workers, drop_last=False)
    dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    res = evaluate(model, loader, device, dtype=dtype, progress=not args.no_progress)
    cfg = model.pretrained_cfg
    result = {"model": getattr(model, "model_name", args.model), "checkpoint": args.pretrained,
              "data": args.data, "split": args.split, "images": res["images"], "top1": res["top1"],
              "top5": res["top5"], "loss": res["loss"], "input_size": list(cfg["input_size"]),
              "crop_pct": cfg["crop_pct"], "interpolation": cfg["interpolation"]}
    print(f"{result['model']} on {args.data} ({res['images']} images): top-1 {res['top1']:.2f}%  "
          f"top-5 {res['top5']:.2f}%  loss {res['loss']:.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0

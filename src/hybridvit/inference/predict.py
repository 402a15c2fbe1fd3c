"""`hybridvit predict`: top-k classes of image files, named from the class list of the checkpoint."""
from __future__ import annotations

import argparse
import json

import torch

from ..precision import AMP_CHOICES, Precision


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--pretrained", required=True, help="a hybridvit run checkpoint (knows its model and classes), "
                   "or an official one with --model")
    p.add_argument("--model", help="model name (not needed for a hybridvit run checkpoint)")
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", default="none", choices=AMP_CHOICES, help="precision (default none: fp32)")
    p.add_argument("--ema", action="store_true", help="use the EMA weights of a hybridvit checkpoint")
    p.add_argument("--json", metavar="OUT", help="also write the predictions to this JSON file")


def read_image(path: str, transform) -> torch.Tensor:
    """(3, H, W) in [0, 1] after the model's eval transform; a clear error for an unreadable file."""
    from PIL import Image

    from ..data.folder import DataError

    try:
        with Image.open(path) as im:
            return transform(im.convert("RGB"))
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read image {path}: {e}") from e


def run(args: argparse.Namespace) -> int:
    from ..data.transforms import EvalTransform, Normalize
    from ..train.distributed import pick_device
    from . import load_for_command

    model = load_for_command(args.pretrained, args.model, ema=args.ema)
    classes = model.class_names
    device = pick_device(args.device)
    precision = Precision.from_amp(args.amp, device)
    model.to(device)
    cfg = model.pretrained_cfg
    tf, norm = EvalTransform.from_cfg(cfg), Normalize(cfg["mean"], cfg["std"]).to(device)
    results = []
    for path in args.images:
        x = read_image(path, tf)
        with torch.no_grad(), precision.autocast(model):
            probs = model(norm(x[None].to(device))).float().softmax(-1)[0]
        p, idx = probs.topk(min(args.topk, probs.numel()))
        top = [{"class": classes[i] if classes and i < len(classes) else str(i), "index": i, "prob": float(q)}
               for q, i in zip(p.tolist(), idx.tolist())]
        results.append({"image": path, "top": top})
        print(f"{path}: " + ", ".join(f"{t['class']} ({100 * t['prob']:.1f}%)" for t in top))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0

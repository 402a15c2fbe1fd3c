"""`hybridvit predict`: top-k classes of image files, named from the class list in the checkpoint."""
from __future__ import annotations

import argparse
import json
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--pretrained", required=True, help="a hybridvit checkpoint (knows its model and classes), "
                   "or an official one with --model")
    p.add_argument("--model", help="model name (default: the one stored in the checkpoint)")
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", metavar="OUT", help="also write the predictions to this JSON file")


def run(args: argparse.Namespace) -> int:
    import torch
    from PIL import Image

    from ..checkpoint import CheckpointError
    from ..data.transforms import EvalTransform, Normalize
    from .cli_eval import load_for_inference
    from .distributed import pick_device

    try:
        model, ckpt = load_for_inference(args.pretrained, args.model)
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    classes = (ckpt or {}).get("class_names")
    device = pick_device(args.device)
    model.to(device)
    cfg = model.pretrained_cfg
    tf, norm = EvalTransform.from_cfg(cfg), Normalize(cfg["mean"], cfg["std"]).to(device)
    results = []
    for path in args.images:
        try:
            with Image.open(path) as im:
                x = tf(im.convert("RGB"))
        except (OSError, ValueError) as e:
            print(f"error: cannot read image {path}: {e}", file=sys.stderr)
            return 2
        with torch.no_grad():
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

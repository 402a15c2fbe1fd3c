"""`hybridvit predict`: top-k classes of image files and folders, named from the class list of the checkpoint."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ..precision import AMP_CHOICES, Precision


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", help="image files and/or folders (searched recursively for "
                   "images by extension)")
    p.add_argument("--pretrained", required=True, help="a hybridvit run checkpoint (knows its model and classes), "
                   "or an official one with --model")
    p.add_argument("--model", help="model name (not needed for a hybridvit run checkpoint)")
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: every CPU this process may use, see runtime.plan_threads)")
    p.add_argument("--amp", default="none", choices=AMP_CHOICES, help="precision (default none: fp32)")
    p.add_argument("--ema", action="store_true", help="use the EMA weights of a hybridvit checkpoint")
    p.add_argument("--json", metavar="OUT", help="also write the predictions to this JSON file")


def find_images(sources: list[str]) -> list[str]:
    """The image files named by `sources`: files as given (whatever their extension), folders searched
    recursively for image extensions (sorted). A source that does not exist, or a folder without images,
    is a FileNotFoundError naming it."""
    from ..data.folder import IMAGE_EXTENSIONS

    files: list[str] = []
    for src in sources:
        p = Path(src)
        if p.is_dir():
            found = sorted(str(f) for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file())
            if not found:
                raise FileNotFoundError(f"folder {src} holds no image ({', '.join(IMAGE_EXTENSIONS)})")
            files += found
        elif p.is_file():
            files.append(src)
        else:
            raise FileNotFoundError(f"{src} does not exist: pass image files or folders")
    return files


def read_image(path: str, transform) -> torch.Tensor:
    """(3, H, W) in [0, 1] after the model's eval transform; a clear error for an unreadable file."""
    from PIL import Image

    from ..data.folder import DataError

    try:
        with Image.open(path) as im:
            im.load()  # decode fully now: a truncated file fails here
            return transform(im.convert("RGB"))
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for broken files
        raise DataError(f"cannot read image {path}: {e}") from e


def run(args: argparse.Namespace) -> int:
    """Predicts every readable image; an unreadable one is reported on stderr and skipped. Exit 0 when
    at least one image was predicted, else a DataError (exit 2)."""
    from ..data.folder import DataError
    from ..data.transforms import EvalTransform, Normalize
    from ..runtime import plan_threads, resolve_device
    from . import load_for_command

    if args.topk < 1:
        raise ValueError(f"--topk must be at least 1, got {args.topk}")
    device = resolve_device(args.device)
    plan_threads("predict", device=device, threads=args.threads, workers=0).apply()
    model = load_for_command(args.pretrained, args.model, ema=args.ema)
    files = find_images(args.images)
    classes = model.class_names
    precision = Precision.from_amp(args.amp, device)
    model.to(device)
    cfg = model.pretrained_cfg
    tf, norm = EvalTransform.from_cfg(cfg), Normalize(cfg["mean"], cfg["std"]).to(device)
    results, failed = [], []
    for path in files:
        try:
            x = read_image(path, tf)
        except DataError as e:
            failed.append(path)
            print(f"warning: {e} (skipped)", file=sys.stderr)
            continue
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
    if not results:
        raise DataError(f"none of the {len(files)} image(s) could be read ({', '.join(failed[:3])}"
                        f"{' ...' if len(failed) > 3 else ''}): check the files, e.g. open them with PIL")
    if failed:
        print(f"predicted {len(results)} image(s); {len(failed)} unreadable, skipped", file=sys.stderr)
    return 0

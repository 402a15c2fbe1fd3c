"""`hybridvit predict`: top-k classes of image files and folders, named from the class list of the checkpoint."""
from __future__ import annotations

import argparse
import sys

import torch

from ..precision import Precision


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .. import options

    p.add_argument("images", nargs="+", help="image files and/or folders (searched recursively for "
                   "images by extension)")
    p.add_argument("--pretrained", required=True, help="a hybridvit run checkpoint (knows its model and classes), "
                   "or an official one with --model")
    p.add_argument("--model", help="model name (not needed for a hybridvit run checkpoint)")
    p.add_argument("--topk", type=int, default=5, help="classes shown per image, at most the model's number "
                   "of classes (default: 5)")
    options.add_img_size(p)
    options.add_batch_size(p, 32)
    options.add_threads(p)
    options.add_device(p)
    options.add_amp(p, "none")
    p.add_argument("--ema", action="store_true", help="use the EMA weights of a hybridvit checkpoint")
    options.add_json(p, "the predictions")
    options.add_progress(p)


def _batches(files: list[str], tf, batch_size: int, failed: list[str]):
    """(paths, (B, 3, H, W) uint8) of the readable images, `batch_size` at a time; unreadable ones go to
    `failed`, with a warning on stderr."""
    from ..data.folder import DataError, read_image

    paths, xs = [], []
    for path in files:
        try:
            xs.append(read_image(path, tf))
            paths.append(path)
        except DataError as e:
            failed.append(path)
            print(f"warning: {e} (skipped)", file=sys.stderr)
        if len(xs) == batch_size:
            yield paths, torch.stack(xs)
            paths, xs = [], []
    if xs:
        yield paths, torch.stack(xs)


def run(args: argparse.Namespace) -> int:
    """Predicts every readable image; an unreadable one is reported on stderr and skipped. Exit 0 when
    at least one image was predicted, else a DataError (exit 2)."""
    from .._io import check_output_file, write_json
    from ..data.folder import DataError, find_images
    from ..data.transforms import Preprocess
    from ..options import check_positive
    from ..runtime import plan_threads, resolve_device
    from . import load_for_command
    from .evaluate import _progress

    check_positive(args, "topk", "batch_size", "img_size", "threads")
    if args.json:
        check_output_file(args.json, "--json")
    device = resolve_device(args.device)
    precision = Precision.from_amp(args.amp, device)
    plan_threads("predict", device=device, threads=args.threads, workers=0).apply()
    model = load_for_command(args.pretrained, args.model, img_size=args.img_size, ema=args.ema)
    files = find_images(args.images)
    classes = model.class_names
    model.to(device)
    if hasattr(model, "fuse"):  # the inference form (an exported file is already one)
        model.fuse()
    cfg = model.pretrained_cfg
    pre = Preprocess.from_cfg(cfg)
    tf, norm = pre.geometry, pre.normalize.to(device)
    results: list[dict] = []
    failed: list[str] = []
    n_batches = -(-len(files) // args.batch_size)
    for paths, x in _progress(_batches(files, tf, args.batch_size, failed), not args.no_progress and n_batches > 1,
                              "predict"):
        with torch.no_grad(), precision.autocast():
            probs = model(norm(x.to(device))).float().softmax(-1)
        p, idx = probs.topk(min(args.topk, probs.shape[-1]), dim=-1)
        for path, pi, ii in zip(paths, p.tolist(), idx.tolist()):
            top = [{"class": classes[i] if classes and i < len(classes) else str(i), "index": i, "prob": float(q)}
                   for q, i in zip(pi, ii)]
            results.append({"image": path, "top": top})
            print(f"{path}: " + ", ".join(f"{t['class']} ({100 * t['prob']:.1f}%)" for t in top))
    if args.json:
        write_json(args.json, results)
    if not results:
        raise DataError(f"none of the {len(files)} image(s) could be read ({', '.join(failed[:3])}"
                        f"{' ...' if len(failed) > 3 else ''}): check the files, e.g. open them with PIL")
    if failed:
        print(f"predicted {len(results)} image(s); {len(failed)} unreadable, skipped", file=sys.stderr)
    return 0

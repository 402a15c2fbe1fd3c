"""`hybridvit eval`: top-1/top-5 of a model on an image folder (or the embedded digits), with the
model's own resize/crop/interpolation; and `evaluate()`, which training uses for validation."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import printable
from ..precision import Precision


def _progress(iterable, enabled: bool, desc: str):
    if not enabled:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:  # the train extra is not needed for inference
        return iterable
    return tqdm(iterable, desc=desc, leave=False, file=sys.stdout)


class EvaluationStopped(Exception):
    """`evaluate` stopped early because its `stop` callable asked it to (a signal during validation)."""


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, precision: Precision | None = None, *,
             channels_last: bool = False, progress: bool = False, desc: str = "eval",
             reduce: Callable[[list[float]], list[float]] | None = None,
             stop: Callable[[], bool] | None = None) -> dict[str, Any]:
    """top-1/top-5 (percent) and mean loss over `loader` (batches of `images` (B, 3, H, W) uint8, `targets`
    (B,) and `bad`, the paths of unreadable images); `reduce` sums the counts over processes (every image
    counted once). Returns `images` (0 when none could be read: the metrics are then 0), `skipped` (the
    unreadable paths this process met) and `top5` None when the model has 5 classes or fewer (every
    image would be a top-5 hit). `stop` is asked before each batch: True raises EvaluationStopped."""
    from ..data.transforms import Preprocess

    precision = precision or Precision(device, None)
    model.eval()
    norm = Preprocess.from_cfg(getattr(model, "pretrained_cfg", None) or {}).normalize.to(device)
    sums = [0.0, 0.0, 0.0, 0.0]  # loss, top-1 hits, top-5 hits, images
    skipped: list[str] = []
    n_classes = getattr(model, "num_classes", None)
    for batch in _progress(loader, progress, desc):
        if stop is not None and stop():
            raise EvaluationStopped(desc)
        skipped += batch.get("bad", [])
        if batch["targets"].numel() == 0:
            continue
        x = norm(batch["images"].to(device, non_blocking=True))
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = batch["targets"].to(device)
        with precision.autocast():
            logits = model(x)
        logits = logits.float()
        n_classes = logits.shape[1]
        hit = logits.topk(min(5, logits.shape[1]), dim=1).indices == y[:, None]
        sums[0] += float(F.cross_entropy(logits, y, reduction="sum"))
        sums[1] += float(hit[:, 0].sum())
        sums[2] += float(hit.any(dim=1).sum())
        sums[3] += y.numel()
    loss, top1, top5, total = reduce(sums) if reduce else sums
    n = max(total, 1)
    return {"loss": loss / n, "top1": 100 * top1 / n,
            "top5": 100 * top5 / n if n_classes is None or n_classes > 5 else None,
            "images": int(total), "skipped": sorted(set(skipped))}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .. import options

    options.add_pretrained(p, options.PRETRAINED_SOURCES + options.EXPORTED_SOURCES, required=True)
    options.add_model(p)
    p.add_argument("--data", default=None,
                   help="ImageNet-layout ROOT (evaluates ROOT/<split>), a class-folder tree, or 'digits' "
                        "(default: the validation folder a hybridvit run records). Class folders are matched to a "
                        "hybridvit run's classes by name (a subset is fine, an unknown folder is refused); a "
                        "checkpoint without class names (official weights) takes the sorted folders as its class "
                        "indices 0, 1, ...")
    p.add_argument("--split", default=None,
                   help="sub-folder of ROOT to evaluate (default: the run's validation split, else val)")
    p.add_argument("--num-classes", type=int, help="classes of an official checkpoint (default: 1000)")
    options.add_img_size(p)
    options.add_batch_size(p, 64)
    options.add_threads(p, workers=True)
    options.add_device(p)
    options.add_amp(p, "none")
    p.add_argument("--ema", action="store_true", help="evaluate the EMA weights of a hybridvit checkpoint")
    options.add_json(p)
    options.add_overwrite(p, "the --json file")
    options.add_progress(p)


def _eval_folder(data: str, split: str) -> Path:
    """The class-folder tree `build_dataset` evaluates: DATA/SPLIT, or DATA itself when it has no splits."""
    from ..data.loader import split_folder

    return split_folder(data, split)


def _dataset(args: argparse.Namespace, model: nn.Module):
    """The evaluation images, labelled BY NAME with the model's class indices when the model knows its
    class names (a hybridvit run): a folder may hold a subset of the run's classes, but a folder that is
    not one of them is refused, naming it. A model without class names (an official checkpoint) is
    matched by position: the sorted folder names must follow its class index order (ImageNet's synset
    folders n01440764, ... do)."""
    from ..data.folder import DataError
    from ..data.loader import build_dataset, is_digits
    from ..data.transforms import Preprocess

    ds = build_dataset(args.data, args.split, Preprocess.from_cfg(model.pretrained_cfg).geometry)
    names = getattr(model, "class_names", None)
    if names and not is_digits(args.data):
        folder = printable(_eval_folder(args.data, args.split), None)
        index = {c: i for i, c in enumerate(names)}
        extra = [c for c in ds.classes if c not in index]
        shown = ", ".join(map(printable, names[:20])) + (", ..." if len(names) > 20 else "")
        if extra:
            what = "none of its class folders is" if len(extra) == len(ds.classes) else \
                f"{len(extra)} of its {len(ds.classes)} class folders are not"
            raise DataError(f"{folder}: {what} a class of the model ({', '.join(map(printable, extra[:10]))}"
                            f"{' ...' if len(extra) > 10 else ''}). The model knows {len(names)} classes: {shown}. "
                            "Rename each folder to the class it holds, or move the others out; eval matches "
                            "classes by folder name")
        ds.samples = [(f, index[ds.classes[t]]) for f, t in ds.samples]
        ds.targets = [t for _, t in ds.samples]
        missing = [c for c in names if c not in set(ds.classes)]
        if missing:
            print(f"note: {folder} holds {len(ds.classes)} of the model's {len(names)} classes (no folder for "
                  f"{', '.join(map(printable, missing[:10]))}{' ...' if len(missing) > 10 else ''}); its images "
                  "are scored "
                  "against all the model's classes")
        ds.classes = list(names)
    n_out = getattr(model, "num_classes", None)
    if n_out is not None and len(ds.classes) > n_out:
        raise DataError(f"the data has {len(ds.classes)} classes but the model predicts {n_out}")
    return ds


def run_data(args: argparse.Namespace, model: nn.Module) -> None:
    """Without --data: the validation folder the run recorded (said in one line), else an error asking for
    --data; --split defaults to the run's validation split."""
    from ..data.folder import DataError

    trained = getattr(model, "trained_on", None)
    if args.split is None:
        args.split = trained["val_split"] if trained and args.data in (None, trained["data"]) else "val"
    if args.data is not None:
        return
    if not trained:
        raise DataError(f"pass --data ROOT (the images to evaluate): {args.pretrained} is not a hybridvit run, so it "
                        "records no validation folder")
    args.data = trained["data"]
    where = "the embedded digits" if args.data == "digits" else \
        f"{printable(args.data, None)} (split {printable(args.split, None)})"
    print(f"data: {where}, the validation data recorded in the run (pass --data to evaluate other images)")


def run(args: argparse.Namespace) -> int:
    from .._io import check_output_file, write_json
    from ..data.folder import DataError
    from ..data.loader import EpochSampler, is_digits, make_loader
    from ..options import check_positive
    from ..runtime import plan_threads, resolve_device
    from . import load_for_command

    check_positive(args, "batch_size", "img_size", "threads")
    if args.json:
        check_output_file(args.json, "--json", overwrite=args.overwrite)
    device = resolve_device(args.device)
    precision = Precision.from_amp(args.amp, device)
    plan = plan_threads("eval", device=device, threads=args.threads, workers=args.workers,
                        in_memory=is_digits(args.data))
    plan.apply()
    model = load_for_command(args.pretrained, args.model, num_classes=args.num_classes, img_size=args.img_size,
                             ema=args.ema)
    run_data(args, model)
    ds = _dataset(args, model)
    model.to(device)
    if hasattr(model, "fuse"):  # the inference form (an exported file is already one)
        model.fuse()
    loader = make_loader(ds, EpochSampler(len(ds), False, pad=False), args.batch_size, plan.workers,
                         drop_last=False)
    res = evaluate(model, loader, device, precision, progress=not args.no_progress)
    where = ("the embedded digits" if is_digits(args.data)
             else printable(_eval_folder(args.data, args.split), None))
    for path in res["skipped"]:
        print(f"warning: skipped unreadable image {printable(path, None)}", file=sys.stderr)
    if res["images"] == 0:
        raise DataError(f"no image of {where} could be read ({len(res['skipped'])} unreadable, e.g. "
                        f"{', '.join(printable(p, None) for p in res['skipped'][:3])}): check the files, e.g. "
                        "open them with PIL")
    cfg = model.pretrained_cfg
    result = {"model": model.model_name, "checkpoint": args.pretrained, "data": args.data, "split": args.split,
              "images": res["images"], "top1": res["top1"], "top5": res["top5"], "loss": res["loss"],
              "skipped_images": res["skipped"],
              "input_size": list(cfg["input_size"]), "crop_pct": cfg["crop_pct"],
              "interpolation": cfg["interpolation"], "classes": model.class_names or len(ds.classes),
              "threads": plan.threads, "workers": plan.workers}
    top5 = f"  top-5 {res['top5']:.2f}%" if res["top5"] is not None else ""
    skipped = f", {len(res['skipped'])} unreadable skipped" if res["skipped"] else ""
    print(f"{result['model']} on {printable(args.data, None)} ({res['images']} images{skipped}): "
          f"top-1 {res['top1']:.2f}%{top5}  "
          f"loss {res['loss']:.4f}  ({plan.describe()})")
    if args.json:
        write_json(args.json, result)
    return 0

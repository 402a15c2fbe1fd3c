"""`hybridvit predict`: top-k classes of image files and folders, named from the class list of the checkpoint."""
from __future__ import annotations

import argparse
import sys

import torch
from torch.utils.data import Dataset

from ..errors import printable
from ..precision import Precision


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .. import options

    p.add_argument("images", nargs="+", help="image files and/or folders (searched recursively for "
                   "images by extension)")
    options.add_pretrained(p, options.PRETRAINED_SOURCES + options.EXPORTED_SOURCES, required=True)
    options.add_model(p)
    p.add_argument("--topk", type=int, default=5, help="classes shown per image, at most the model's number "
                   "of classes (default: 5)")
    options.add_img_size(p)
    options.add_batch_size(p, 32)
    options.add_threads(p, workers=True, workers_default="about one CPU in four when there is more than one batch, "
                        "else 0")
    options.add_device(p)
    options.add_amp(p, "none")
    p.add_argument("--ema", action="store_true", help="use the EMA weights of a hybridvit checkpoint")
    options.add_json(p, "the predictions")
    options.add_overwrite(p, "the --json file")
    options.add_progress(p)


class _Files(Dataset):
    """The image files to predict, decoded in the loader's workers: (path, (3, H, W) uint8 or the error)."""

    def __init__(self, files: list[str], tf) -> None:
        self.files, self.tf = files, tf

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[str, torch.Tensor | str]:
        from ..data.folder import DataError, read_image

        try:
            return self.files[i], read_image(self.files[i], self.tf)
        except DataError as e:
            return self.files[i], str(e)


def _collate(items: list) -> tuple[list[str], torch.Tensor | None, list[tuple[str, str]]]:
    good = [(p, x) for p, x in items if isinstance(x, torch.Tensor)]
    return ([p for p, _ in good], torch.stack([x for _, x in good]) if good else None,
            [(p, x) for p, x in items if not isinstance(x, torch.Tensor)])


def _batches(files: list[str], tf, batch_size: int, workers: int, failed: list[str]):
    """(paths, (B, 3, H, W) uint8) of the readable images in order, `batch_size` files at a time, decoded by
    `workers` processes (0: here); unreadable ones go to `failed`, with a warning on stderr."""
    from ..data.loader import EpochSampler, make_loader

    loader = make_loader(_Files(files, tf), EpochSampler(len(files), False, pad=False), batch_size, workers,
                         drop_last=False, collate=_collate)
    for paths, x, bad in loader:
        for path, message in bad:
            failed.append(path)
            print(f"warning: {printable(message, None)} (skipped)", file=sys.stderr)
        if x is not None:
            yield paths, x


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
        check_output_file(args.json, "--json", overwrite=args.overwrite)
    device = resolve_device(args.device)
    precision = Precision.from_amp(args.amp, device)
    model = load_for_command(args.pretrained, args.model, img_size=args.img_size, ema=args.ema)
    files = find_images(args.images)
    n_batches = -(-len(files) // args.batch_size)
    # workers decode the next batches while the model runs: nothing to overlap with a single batch
    workers = args.workers if args.workers is not None or n_batches > 1 else 0
    plan = plan_threads("predict", device=device, threads=args.threads, workers=workers)
    plan.apply()
    classes = model.class_names
    model.to(device)
    if hasattr(model, "fuse"):  # the inference form (an exported file is already one)
        model.fuse()
    cfg = model.pretrained_cfg
    pre = Preprocess.from_cfg(cfg)
    tf, norm = pre.geometry, pre.normalize.to(device)
    results: list[dict] = []
    failed: list[str] = []
    for paths, x in _progress(_batches(files, tf, args.batch_size, plan.workers, failed),
                              not args.no_progress and n_batches > 1, "predict"):
        with torch.no_grad(), precision.autocast():
            probs = model(norm(x.to(device))).float().softmax(-1)
        p, idx = probs.topk(min(args.topk, probs.shape[-1]), dim=-1)
        for path, pi, ii in zip(paths, p.tolist(), idx.tolist()):
            top = [{"class": classes[i] if classes and i < len(classes) else str(i), "index": i, "prob": float(q)}
                   for q, i in zip(pi, ii)]
            results.append({"image": path, "top": top})
            print(f"{printable(path, None)}: " + ", ".join(f"{printable(t['class'])} ({100 * t['prob']:.1f}%)"
                                                           for t in top))
    if args.json:
        write_json(args.json, results)
    if not results:
        raise DataError(f"none of the {len(files)} image(s) could be read "
                        f"({', '.join(printable(f, None) for f in failed[:3])}"
                        f"{' ...' if len(failed) > 3 else ''}): check the files, e.g. open them with PIL")
    if failed:
        print(f"predicted {len(results)} image(s); {len(failed)} unreadable, skipped", file=sys.stderr)
    return 0

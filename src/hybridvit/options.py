"""Command-line options that several commands share, defined once so they mean the same everywhere:
model, weights, output, overwrite, precision, threads, loader workers, device, batch size, image size,
progress and JSON output. The short forms are the same on every command: `-m/--model`, `-o/--output`,
`-b/--batch-size`.

Each `add_*` adds one option to an argparse parser; `default=argparse.SUPPRESS` keeps a value given to
a parent parser (`analyze --img-size 64 attention`)."""
from __future__ import annotations

import argparse
from typing import Any

from .precision import AMP_CHOICES

AMP_MEANING = ("auto: bf16 on a GPU that supports it, else fp32; none: fp32; bf16 or fp16: mixed "
                "precision in that type")


PRETRAINED_SOURCES = ("'true' for the published weights of --model, an official checkpoint file with --model, a "
                      "hybridvit run checkpoint or run folder (knows its model and classes), or a Hub folder")
EXPORTED_SOURCES = ("; also an exported .onnx file or OpenVINO .xml (run by onnxruntime / OpenVINO, with the "
                    "classes and preprocessing the file records)")


def add_model(p: argparse.ArgumentParser, help: str = "model name (not needed for a hybridvit run checkpoint)",
              **kw: Any) -> None:
    p.add_argument("-m", "--model", help=help, **kw)


def add_pretrained(p: argparse.ArgumentParser, help: str = PRETRAINED_SOURCES, **kw: Any) -> None:
    p.add_argument("--pretrained", help=help, **kw)


def add_output(p: argparse.ArgumentParser, help: str, **kw: Any) -> None:
    p.add_argument("-o", "--output", help=help, **kw)


def add_overwrite(p: argparse.ArgumentParser, what: str = "the files this command writes", **kw: Any) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help=f"write over {what} if present (without --overwrite, an existing file is refused)",
                   **kw)


def add_amp(p: argparse.ArgumentParser, default: Any = "none", meaning: str = AMP_MEANING) -> None:
    shown = f" (default: {default})" if default is not argparse.SUPPRESS and default is not None else ""
    # checked by Precision.from_amp (one `error:` line naming the choices), not by argparse's usage dump
    p.add_argument("--amp", default=default, metavar="{" + ",".join(AMP_CHOICES) + "}",
                   help=f"precision. {meaning}{shown}")


def add_device(p: argparse.ArgumentParser, default: Any = "auto") -> None:
    p.add_argument("--device", default=default,
                   help="auto (a CUDA GPU when there is one, else the CPU), cpu, cuda or cuda:N (default: auto)")


def add_threads(p: argparse.ArgumentParser, default: Any = None, workers: bool = False,
                workers_default: str | None = None) -> None:
    """--threads, and with `workers` --workers (`workers_default`: what its default is, in words)."""
    share = ("the CPUs this process may use, less those the image-loading workers get" if workers
             else "every CPU this process may use")
    p.add_argument("--threads", type=int, default=default, help=f"CPU threads for the model (default: {share})")
    if workers:
        add_workers(p, *([workers_default] if workers_default else []))


def add_workers(p: argparse.ArgumentParser, default_meaning: str = "about one CPU in four; 0 for the embedded "
                "digits") -> None:
    p.add_argument("--workers", type=int, default=None,
                   help=f"processes that decode images in parallel (default: {default_meaning})")


def add_batch_size(p: argparse.ArgumentParser, default: Any) -> None:
    flags = ("-b", "--batch-size")
    shown = f" (default: {default})" if isinstance(default, int) else ""
    p.add_argument(*flags, type=int, default=default, help=f"images per batch{shown}")


def add_img_size(p: argparse.ArgumentParser, default: Any = None, rect: bool = False,
                 whose: str = "the checkpoint's, else the model's") -> None:
    if rect:
        p.add_argument("--img-size", type=int, nargs="+", default=default, metavar="SIZE",
                       help=f"input size in pixels, H [W] (default: {whose})")
    else:
        p.add_argument("--img-size", type=int, default=default, metavar="SIZE",
                       help=f"input side in pixels (default: {whose})")


def add_progress(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_json(p: argparse.ArgumentParser, what: str = "the result") -> None:
    p.add_argument("--json", metavar="OUT", help=f"also write {what} to this JSON file")


def check_positive(args: argparse.Namespace, *names: str) -> None:
    """ValueError naming the option when one of `names` (attribute names) is given and below 1."""
    for name in names:
        v = getattr(args, name, None)
        for x in v if isinstance(v, (list, tuple)) else [v]:
            if x is not None and x < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {x}")

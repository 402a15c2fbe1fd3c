"""`hybridvit export`: ONNX (checked with onnxruntime), OpenVINO IR or a `torch.export` program for deployment."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ._io import atomic_save
from .deploy import check_onnx, export_onnx, export_openvino, quiet_exporter  # noqa: F401 (the export functions live in deploy)
from .errors import printable


def add_arguments(p: argparse.ArgumentParser) -> None:
    from . import options

    options.add_model(p)
    options.add_pretrained(p, options.PRETRAINED_SOURCES + "; default random weights")
    p.add_argument("--ema", action="store_true", help="export the EMA weights of a hybridvit checkpoint")
    p.add_argument("--num-classes", type=int, default=None, help="classes, for --model without a run checkpoint "
                   "(default: 1000)")
    options.add_img_size(p, rect=True, whose="the checkpoint's, else the model's; W defaults to H")
    p.add_argument("--format", choices=["onnx", "openvino", "pt2"], default="onnx",
                   help="onnx: an ONNX model (opset 18) for ONNX Runtime, OpenVINO, TensorRT..., checked against "
                        "PyTorch with onnxruntime when it is installed; openvino: OpenVINO IR (-o NAME.xml, weights "
                        "in NAME.bin; needs the openvino extra), checked against PyTorch; pt2: a torch.export "
                        "program (ExportedProgram, load it with torch.export.load) for PyTorch runtimes. ONNX and "
                        "OpenVINO files carry the model name, class names and preprocessing, so `hybridvit eval` "
                        "and `predict` run them with no PyTorch model (default: onnx)")
    options.add_amp(p, "none", meaning="the type of the exported weights and input: none (or auto): float32; "
                    "fp16: float16 (for GPU runtimes); bf16: bfloat16")
    p.add_argument("--int8", action="store_true", help="with --format openvino: quantise to INT8 by NNCF's "
                   "post-training quantisation (needs the int8 extra and --calibration); int8 weights and "
                   "activations, ranges from the calibration images (benchmarks/README.md gives the speed and "
                   "top-1 per family)")
    p.add_argument("--calibration", default=None, help="with --int8: a folder of images like those the model "
                   "will see (searched recursively; class sub-folders are fine, labels are not used), or "
                   "'digits' for the embedded training images")
    p.add_argument("--calibration-size", type=int, default=300, help="with --int8: at most this many calibration "
                   "images, spread over the folder (default: 300, NNCF's)")
    p.add_argument("--int8-scheme", choices=["performance", "transformer"], default=None,
                   help="with --int8: NNCF's scheme; transformer adds SmoothQuant and keeps softmax, norms and "
                        "residual adds in floating point (default: performance, faster and as accurate for every "
                        "family in benchmarks/README.md)")
    p.add_argument("--static-batch", action="store_true", help="fix the batch size to 1")
    options.add_output(p, "the file to write (its folder is created)", required=True)
    options.add_overwrite(p, "--output (and, for OpenVINO, its .bin)")
    options.add_threads(p)


def run(args: argparse.Namespace) -> int:
    from ._io import check_output_file
    from .inference import load_for_command
    from .precision import Precision
    from .runtime import check_img_size, plan_threads

    if args.img_size is not None and (len(args.img_size) > 2 or min(args.img_size) < 1):
        raise ValueError(f"--img-size takes H [W], each at least 1, got {' '.join(map(str, args.img_size))}")
    dtype = Precision.from_amp("none" if args.amp == "auto" else args.amp, "cpu").dtype or torch.float32
    check_output_file(args.output, "--output", overwrite=args.overwrite)  # before the model is built and traced
    if args.format == "openvino":
        if Path(args.output).suffix != ".xml":
            raise ValueError(f"--format openvino writes NAME.xml (+ NAME.bin): pass -o {Path(args.output).stem}.xml")
        from ._io import check_new_files
        from .deploy import _require
        check_new_files([Path(args.output).with_suffix(".bin")], "--output", args.overwrite)
        _require("openvino")
    _check_int8(args)
    plan_threads("export", threads=args.threads).apply()
    model = load_for_command(args.pretrained, args.model, num_classes=args.num_classes, ema=args.ema)
    check_img_size(model.model_name, args.img_size)
    size = args.img_size or list(model.pretrained_cfg["input_size"][1:])
    size = (size[0], size[-1])
    model = model.to(dtype).fuse()  # the inference form: folded BatchNorms and layer scales, tables as constants
    classes = model.class_names
    batch = 1 if args.static_batch else "B"  # the file's input shape: a fixed batch of 1, or any batch
    what = f"{model.model_name}, input ({batch}, {model.in_chans}, {size[0]}, {size[1]}), {model.num_classes} classes"
    if classes:
        what += " (" + ", ".join(map(printable, classes[:5])) + (", ..." if len(classes) > 5 else "") + ")"
    shown = printable(args.output, None)
    if args.format == "pt2":
        x = torch.randn(1 if args.static_batch else 2, model.in_chans, *size, dtype=dtype)
        dyn = None if args.static_batch else ({0: torch.export.Dim("batch", min=1, max=4096)},)
        with quiet_exporter():
            program = torch.export.export(model, (x,), dynamic_shapes=dyn)
        atomic_save(args.output, lambda tmp: torch.export.save(program, str(tmp)))
        print(f"wrote {shown} ({what}; torch.export program, load with torch.export.load)")
        return 0
    if args.format == "openvino":
        if dtype != torch.float32:
            raise ValueError("--format openvino writes float32 weights (OpenVINO runs them in bf16 where the CPU "
                             "has it): leave --amp out")
        calibration = None
        if args.int8:
            from .deploy import calibration_batches
            calibration, failed = calibration_batches(args.calibration, _with_size(model, size),
                                                      limit=args.calibration_size)
            if failed:
                print(f"warning: {len(failed)} calibration image(s) could not be read and were skipped "
                      f"({', '.join(failed[:3])}{' ...' if len(failed) > 3 else ''})", file=sys.stderr)
            what += f"; INT8, calibrated on {len(calibration)} image(s)"
        path = export_openvino(model, args.output, size, dynamic_batch=not args.static_batch,
                               calibration=calibration, scheme=args.int8_scheme)
        from .deploy import ExportedModel
        x = calibration[0] if calibration else torch.randn(1 if args.static_batch else 2, model.in_chans, *size)
        with torch.no_grad():
            ref = model(x)
            got = ExportedModel(path)(x)
        diff = float((got - ref).abs().max())
        agree = float((got.argmax(-1) == ref.argmax(-1)).float().mean())
        print(f"wrote {shown} and {printable(path.with_suffix('.bin'), None)} ({what}); OpenVINO vs PyTorch max "
              "abs difference "
              f"{diff:.2e}" + (f" on a calibration image (top-1 {'agrees' if agree == 1 else 'differs'})"
                               if calibration else ""))
        return 0
    path = export_onnx(model, args.output, size, dynamic_batch=not args.static_batch, dtype=dtype)
    if dtype == torch.bfloat16:
        print(f"wrote {shown} ({what}; bfloat16: not checked, onnxruntime's CPU provider has no bfloat16 input)")
        return 0
    try:
        diff = check_onnx(model, path, size, batch=1 if args.static_batch else 2, dtype=dtype)
        print(f"wrote {shown} ({what}); onnxruntime vs PyTorch max abs difference {diff:.2e}")
    except ImportError:
        print(f"wrote {shown} ({what}; install onnxruntime to check it)")
    return 0


def _check_int8(args: argparse.Namespace) -> None:
    """--int8 and its options fit together, and the extra is there, before any model is built."""
    if not args.int8:
        for opt, value in (("--calibration", args.calibration), ("--int8-scheme", args.int8_scheme)):
            if value is not None:
                raise ValueError(f"{opt} is for --int8: add --int8 (with --format openvino) or leave {opt} out")
        return
    if args.format != "openvino":
        raise ValueError("--int8 quantises an OpenVINO model with NNCF: add --format openvino -o NAME.xml")
    if args.calibration is None:
        raise ValueError("--int8 needs --calibration: a folder of images like those the model will see "
                         "(or 'digits' for the embedded ones)")
    if args.calibration_size < 1:
        raise ValueError(f"--calibration-size must be at least 1, got {args.calibration_size}")
    if args.amp not in ("none", "auto"):
        raise ValueError("--int8 quantises the float32 model: leave --amp out")
    from .data.digits import DIGITS_NAME
    if args.calibration != DIGITS_NAME and not Path(args.calibration).is_dir():
        raise FileNotFoundError(f"--calibration {args.calibration} is not a folder: pass a folder of images "
                                "(or 'digits')")
    from .deploy import _require
    _require("nncf", load=False)


def _with_size(model: torch.nn.Module, size: tuple[int, int]) -> dict:
    """The model's preprocessing at the exported size (what the file records and calibration uses)."""
    from .models._variant import with_input_size
    return with_input_size(model.pretrained_cfg, model.in_chans, tuple(size))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))

"""INT8 post-training quantisation with ONNX Runtime, on a trained run and on a published-size model.

    python benchmarks/int8_onnxruntime.py --run RUN_DIR --out benchmarks/results/cpu_int8_onnxruntime.json

1. Accuracy: the run (a `hybridvit train` folder on the embedded digits, the README's main job) is
   exported to ONNX (fp32) with `hybridvit.deploy.export_onnx`, quantised statically by
   `onnxruntime.quantization.quantize_static` (QDQ, per-channel int8 weights, int8 activations; MinMax
   calibration on --calibration training images through the run's own preprocessing), and both files
   are evaluated on the digits validation split by `ExportedModel` (the runtime alone, as `hybridvit eval`
   runs an .onnx file): top-1 of each.
2. Speed: --models (published sizes, random weights, calibrated on noise: speed only) exported and
   quantised the same way; fp32 and int8 ONNX Runtime sessions timed side by side (interleaved rounds,
   median) at --batch-size, --threads intra-op threads.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from int8_common import cpu_info, digits_val, top1
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

import hybridvit
from hybridvit.data.digits import DigitsDataset
from hybridvit.data.transforms import Preprocess
from hybridvit.deploy import ExportedModel, export_onnx


class Batches(CalibrationDataReader):
    def __init__(self, name: str, arrays: list[np.ndarray]) -> None:
        self.name, self.items = name, iter(arrays)

    def get_next(self):
        a = next(self.items, None)
        return None if a is None else {self.name: a}


def quantize(fp32: Path, int8: Path, calibration: list[np.ndarray]) -> None:
    name = onnx.load(str(fp32)).graph.input[0].name
    quantize_static(str(fp32), str(int8), Batches(name, calibration), quant_format=QuantFormat.QDQ,
                    per_channel=True, weight_type=QuantType.QInt8, activation_type=QuantType.QInt8)
    # the run's classes and preprocessing travel with the file (ExportedModel reads them)
    src, dst = onnx.load(str(fp32)), onnx.load(str(int8))
    have = {p.key for p in dst.metadata_props}
    for p in src.metadata_props:
        if p.key not in have:
            dst.metadata_props.add(key=p.key, value=p.value)
    onnx.save(dst, str(int8))


def session(path: Path, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True, help="a hybridvit train folder (trained on the embedded digits)")
    ap.add_argument("--calibration", type=int, default=256, help="training images for calibration")
    ap.add_argument("--models", nargs="*", default=["fastervit_0", "crossformerpp_s", "cabvit_h_l2"])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="hybridvit-int8-"))
    out: dict = {"command": " ".join(["python"] + sys.argv), "python": platform.python_version(),
                 "torch": torch.__version__, "onnxruntime": ort.__version__, "threads": args.threads}
    out["cpu"], out["cpu_flags"] = cpu_info()

    # 1. accuracy on the trained run
    model = hybridvit.load_model(args.run).eval()
    pre = Preprocess.from_cfg(model.pretrained_cfg)
    size = tuple(model.pretrained_cfg["input_size"][1:])
    train = DigitsDataset("train")
    calib = torch.stack([pre(train.load(i)) for i in range(min(args.calibration, len(train)))])
    xs, ys = digits_val(model.pretrained_cfg)
    fp32, int8 = tmp / "run_fp32.onnx", tmp / "run_int8.onnx"
    export_onnx(model, fp32, size)
    quantize(fp32, int8, [calib[i:i + 16].numpy() for i in range(0, len(calib), 16)])
    with torch.no_grad():
        acc = {"pytorch": top1(model, xs, ys), "onnx_fp32": top1(ExportedModel(fp32), xs, ys),
               "onnx_int8": top1(ExportedModel(int8), xs, ys)}
    out["run"] = {"model": model.model_name, "img_size": list(size), "val_images": len(ys),
                  "calibration_images": len(calib), "top1": acc,
                  "int8_drop_points": acc["onnx_fp32"] - acc["onnx_int8"]}
    print(json.dumps(out["run"]), flush=True)

    # 2. speed at the published sizes
    out["speed"] = []
    for name in args.models:
        m = hybridvit.create_model(name).eval()
        s = m.pretrained_cfg["input_size"][1:]
        f32, i8 = tmp / f"{name}_fp32.onnx", tmp / f"{name}_int8.onnx"
        export_onnx(m, f32, tuple(s))
        g = torch.Generator().manual_seed(0)
        quantize(f32, i8, [torch.randn(4, 3, *s, generator=g).numpy() for _ in range(4)])
        x = torch.randn(args.batch_size, 3, *s, generator=g).numpy()
        sessions = {"fp32": session(f32, args.threads), "int8": session(i8, args.threads)}
        feed = {k: {v.get_inputs()[0].name: x} for k, v in sessions.items()}
        for k, v in sessions.items():
            v.run(None, feed[k])
        times: dict[str, list[float]] = {k: [] for k in sessions}
        for _ in range(args.repeats):
            for k, v in sessions.items():
                t = time.perf_counter()
                v.run(None, feed[k])
                times[k].append(time.perf_counter() - t)
        med = {k: statistics.median(v) for k, v in times.items()}
        row = {"model": name, "img_size": list(s), "batch_size": args.batch_size,
               **{f"{k}_img_per_s": args.batch_size / t for k, t in med.items()},
               "int8_speedup": med["fp32"] / med["int8"], "times_ms": {k: [round(t * 1e3, 1) for t in v]
                                                                       for k, v in times.items()}}
        out["speed"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "times_ms"}), flush=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

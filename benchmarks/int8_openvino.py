"""INT8 post-training quantisation with OpenVINO and NNCF (`hybridvit export --format openvino --int8`),
on trained runs and on the published sizes.

    python benchmarks/int8_openvino.py --runs RUN [RUN ...] --out benchmarks/results/cpu_int8_openvino.json

1. Accuracy: each run (a `hybridvit train` folder on the embedded digits) is exported to OpenVINO IR by
   `hybridvit.deploy.export_openvino`, once as it is (run with the bf16 precision hint, the bf16 path) and
   once quantised with each NNCF scheme (`performance`, `transformer`), calibrated on --calibration digits
   training images through the run's preprocessing (`calibration_batches`). Each file is evaluated on the
   digits validation split by `ExportedModel` (OpenVINO alone, as `hybridvit eval` runs an .xml): top-1.
2. Speed: --models (published sizes, random weights, calibrated on noise: speed only) exported and
   quantised the same way; the bf16 file and the int8 files (bf16 hint for what stays in floating point)
   timed side by side by their compiled OpenVINO models (interleaved rounds, median) at --batch-size and
   at batch 1, --threads inference threads.
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
import openvino as ov
import torch
from int8_common import cpu_info, digits_val, top1

import hybridvit
from hybridvit.deploy import INT8_SCHEMES, ExportedModel, calibration_batches, export_openvino


def accuracy(run: str, calibration: int, tmp: Path) -> dict:
    model = hybridvit.load_model(run).eval()
    size = tuple(model.pretrained_cfg["input_size"][1:])
    xs, ys = digits_val(model.pretrained_cfg)
    calib, _ = calibration_batches("digits", model.pretrained_cfg, limit=calibration)
    files = {"bf16": export_openvino(model, tmp / f"{model.model_name}_run.xml", size)}
    for scheme in INT8_SCHEMES:
        files[f"int8_{scheme}"] = export_openvino(model, tmp / f"{model.model_name}_run_{scheme}.xml", size,
                                                  calibration=calib, scheme=scheme)
    with torch.no_grad():
        acc = {"pytorch_fp32": top1(model, xs, ys)}
        for key, path in files.items():
            acc[key] = top1(ExportedModel(path, precision="bf16"), xs, ys)
    return {"run": run, "model": model.model_name, "img_size": list(size), "val_images": len(ys),
            "calibration_images": sum(len(b) for b in calib), "top1": acc,
            "drop_points": {s: acc["bf16"] - acc[f"int8_{s}"] for s in INT8_SCHEMES}}


def speed(name: str, batch_size: int, threads: int, repeats: int, tmp: Path) -> dict:
    m = hybridvit.create_model(name).eval()
    s = tuple(m.pretrained_cfg["input_size"][1:])
    g = torch.Generator().manual_seed(0)
    calib = [torch.randn(1, 3, *s, generator=g) for _ in range(16)]
    files = {"bf16": export_openvino(m, tmp / f"{name}.xml", s)}
    for scheme in INT8_SCHEMES:
        files[f"int8_{scheme}"] = export_openvino(m, tmp / f"{name}_{scheme}.xml", s, calibration=calib,
                                                  scheme=scheme)
    core = ov.Core()
    config = {"INFERENCE_PRECISION_HINT": "bf16", "INFERENCE_NUM_THREADS": str(threads)}
    compiled = {k: core.compile_model(core.read_model(str(p)), "CPU", config) for k, p in files.items()}
    x = torch.randn(batch_size, 3, *s, generator=g).numpy()
    x1 = np.ascontiguousarray(x[:1])
    for c in compiled.values():
        c(x), c(x1)
    times: dict[str, list[float]] = {k: [] for k in compiled}
    b1: dict[str, list[float]] = {k: [] for k in compiled}
    for _ in range(repeats):
        for k, c in compiled.items():
            t = time.perf_counter()
            c(x)
            times[k].append(time.perf_counter() - t)
            one = []
            for _ in range(5):
                t = time.perf_counter()
                c(x1)
                one.append(time.perf_counter() - t)
            b1[k].append(min(one))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"model": name, "img_size": list(s), "batch_size": batch_size,
            "img_per_s": {k: batch_size / t for k, t in med.items()},
            "speedup_over_bf16": {k: med["bf16"] / t for k, t in med.items() if k != "bf16"},
            "batch1_ms": {k: 1e3 * statistics.median(v) for k, v in b1.items()},
            "times_ms": {k: [round(t * 1e3, 1) for t in v] for k, v in times.items()}}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", nargs="*", default=[], help="hybridvit train folders (trained on the embedded digits)")
    ap.add_argument("--calibration", type=int, default=300, help="training images for calibration")
    ap.add_argument("--models", nargs="*", default=["fastervit_0", "crossformerpp_s", "cabvit_h_l2"])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import nncf

    tmp = Path(tempfile.mkdtemp(prefix="hybridvit-int8-"))
    cpu, flags = cpu_info()
    out: dict = {"command": " ".join(["python"] + sys.argv), "python": platform.python_version(),
                 "torch": torch.__version__, "openvino": ov.__version__, "nncf": nncf.__version__,
                 "threads": args.threads, "cpu": cpu, "cpu_flags": flags, "runs": [], "speed": []}
    for run in args.runs:
        out["runs"].append(accuracy(run, args.calibration, tmp))
        print(json.dumps(out["runs"][-1]), flush=True)
    for name in args.models:
        out["speed"].append(speed(name, args.batch_size, args.threads, args.repeats, tmp))
        print(json.dumps({k: v for k, v in out["speed"][-1].items() if k != "times_ms"}), flush=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

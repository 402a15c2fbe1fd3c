"""ATen's bf16 CPU softmax against its fp32 kernel reading the same bf16 logits, per row length.

Both compute in fp32 and round the weights to bf16 once. About 5 M logits per call, interleaved rounds,
median of 9 (each the mean of two calls, `hybridvit.bench.time_runs`), under `keep_freed_memory` as the
hybridvit commands run. What `layers.attention._softmax` decides from:

    python benchmarks/softmax_rows.py --out benchmarks/results/cpu_softmax_rows.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from hybridvit.bench import environment, time_runs
from hybridvit.runtime import keep_freed_memory

LENGTHS = [8, 12, 16, 24, 32, 40, 48, 49, 53, 56, 64, 72, 80, 96, 112, 127, 128, 160, 196, 292]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", nargs="+", type=int, default=LENGTHS)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    dev = torch.device("cpu")
    out = {"environment": environment("cpu"), "command": " ".join(["python"] + sys.argv), "results": []}
    for n in args.lengths:
        x = (torch.randn(max(1, 5_000_000 // (64 * n)), 64, n) * 3).to(torch.bfloat16)
        forms = {"bf16_kernel": lambda x=x: x.softmax(-1),
                 "fp32_kernel": lambda x=x: x.softmax(-1, dtype=torch.float32).to(torch.bfloat16)}
        times: dict[str, list[float]] = {k: [] for k in forms}
        for f in forms.values():
            f()
        for _ in range(args.rounds):
            for k, f in forms.items():
                times[k].append(statistics.fmean(time_runs(f, dev, 2)) * 1e3)
        med = {k: statistics.median(v) for k, v in times.items()}
        r = {"keys": n, "logits": x.numel(), "ms_bf16_kernel": round(med["bf16_kernel"], 3),
             "ms_fp32_kernel": round(med["fp32_kernel"], 3),
             "fp32_kernel_speedup": round(med["bf16_kernel"] / med["fp32_kernel"], 3)}
        out["results"].append(r)
        print(f"{n:4d} keys  bf16 kernel {r['ms_bf16_kernel']:7.2f} ms  fp32 kernel {r['ms_fp32_kernel']:7.2f} ms  "
              f"x{r['fp32_kernel_speedup']:.2f}", flush=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Before/after of the native-bf16 CPU levers of issue 15, in one process, interleaved.

Each lever is switched off by restoring the computation it replaced (the plain ops), on again by the
library's default; the same model is timed both ways in alternating rounds:
- fused_linear: bf16 eval linears through oneDNN with cached bf16 weights (layers/accel/fused_linear.py)
  vs autocast's linear + separate GELU / add;
- bf16_attention: explicit bf16 attention for a trainable bias in training (layers/attention.py) vs
  SDPA, which takes its fp32 math path there;
(small_attention, an explicit bf16 attention over few keys in eval, was measured in
results/cpu_nativebf16_levers*.json at 0.95-1.05x on whole models and not kept: inference stays on SDPA)
- gamma_cast: layer scales in the branch dtype (layers/fuse.py) vs an fp32 gamma that promotes the
  residual stream to fp32.

    PYTHONPATH=src python benchmarks/levers_native_bf16.py --threads 2 --out benchmarks/results/X.json
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

import hybridvit
from hybridvit.bench import environment, make_step, time_runs
from hybridvit.layers import attention
from hybridvit.layers.accel import fused_linear
from hybridvit.models import cabvit

# lever -> (model, train, batch size)
LEVERS = {"fused_linear": [("fastervit_0", False, 16), ("crossformerpp_s", False, 16), ("cabvit_h_l2", False, 16)],
          "bf16_attention": [("crossformerpp_s", True, 8)],
          "gamma_cast": [("cabvit_h_l2", False, 16), ("cabvit_h_l2", True, 8)]}


@contextlib.contextmanager
def lever_off(lever: str) -> Iterator[None]:
    """The computation before the lever (module attributes restored on exit)."""
    if lever == "fused_linear":
        saved, fused_linear.cpu_has_native_bf16 = fused_linear.cpu_has_native_bf16, lambda: False
        try:
            yield
        finally:
            fused_linear.cpu_has_native_bf16 = saved
    elif lever == "bf16_attention":
        saved = attention._low_precision_trainable_bias
        attention._low_precision_trainable_bias = lambda *a: False
        try:
            yield
        finally:
            attention._low_precision_trainable_bias = saved
    else:
        saved = cabvit.scale_channels
        cabvit.scale_channels = lambda x, g: x if g is None else x * g  # fp32 gamma promotes x
        try:
            yield
        finally:
            cabvit.scale_channels = saved


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--levers", nargs="*", default=list(LEVERS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device("cpu")
    out = {"environment": environment("cpu"), "command": " ".join(["python"] + sys.argv), "results": []}
    for lever in args.levers:
        for name, train, bs in LEVERS[lever]:
            torch.manual_seed(0)
            model = hybridvit.create_model(name).train(train).to(memory_format=torch.channels_last)
            x = torch.randn(bs, 3, 224, 224)
            step = make_step(model, x, dev, "bf16", train, "adamw")
            times: dict[str, list[float]] = {"off": [], "on": []}
            for state in ("off", "on"):  # warm-up of both
                with lever_off(lever) if state == "off" else contextlib.nullcontext():
                    step()
            for _ in range(args.repeats):
                for state in ("off", "on"):
                    with lever_off(lever) if state == "off" else contextlib.nullcontext():
                        times[state] += time_runs(step, dev, 1)
            med = {k: statistics.median(v) for k, v in times.items()}
            r = {"lever": lever, "model": name, "train": train, "batch_size": bs, "amp": "bf16",
                 "img_per_s_off": bs / med["off"], "img_per_s_on": bs / med["on"],
                 "speedup": med["off"] / med["on"],
                 "times_ms": {k: [round(t * 1e3, 1) for t in v] for k, v in times.items()}}
            print(f"{lever:<15} {name:<16} train={train!s:<5} off {r['img_per_s_off']:6.2f} img/s  "
                  f"on {r['img_per_s_on']:6.2f} img/s  x{r['speedup']:.2f}", flush=True)
            out["results"].append(r)
            Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

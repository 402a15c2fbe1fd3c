"""Whole-model gain of each remaining eager lever and of the inference form, in one process (issue 30).

Each variant is the same model (same weights, same input), timed in interleaved rounds (median):

- `as built`: `model.eval()`, every lever on;
- `no linear epilogue`: the linears as `nn.Linear` then GELU / add (`layers.linear.onednn_dtype` -> None),
  against oneDNN's fused inner product with the bias, GELU or residual add in its epilogue;
- `explicit attention` (bf16 only): attention as two batched products around a softmax instead of SDPA
  (`layers.attention._sdpa_applies` -> False; `results/cpu_levers_round1.json` has the opposite variant,
  `sdpa`, from when eager bf16 took the explicit form);
- `fused`: the inference form, `model.fuse()` (BatchNorms and layer scales folded, tables once).

    python benchmarks/levers.py --models fastervit_0 crossformerpp_s cabvit_h_l2 --amp none bf16 \
        --batch-size 16 --rounds 7 --out benchmarks/results/cpu_levers.json

A lever stays where it gains >= 5 % on at least one family.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import json
import statistics
import sys
from pathlib import Path
from unittest import mock

import torch

import hybridvit
import hybridvit.layers.attention as attention
from hybridvit.bench import environment, time_runs

sys.path.insert(0, str(Path(__file__).parent))
from compare_official import cpu_info, perturb  # noqa: E402

linear = importlib.import_module("hybridvit.layers.linear")  # the module: `hybridvit.layers.linear` is the function

PATCHES = {
    "no linear epilogue": [(linear, "onednn_dtype", lambda x: None)],
    "explicit attention": [(attention, "_sdpa_applies", lambda q: False)],
}


class Patched(torch.nn.Module):
    """`model` run with module attributes replaced during its forward (a lever switched off)."""

    def __init__(self, model: torch.nn.Module, patches: list) -> None:
        super().__init__()
        self.model, self.patches = model, patches

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with contextlib.ExitStack() as stack:
            for obj, name, value in self.patches:
                stack.enter_context(mock.patch.object(obj, name, value))
            return self.model(x)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["fastervit_0", "crossformerpp_s", "cabvit_h_l2"])
    ap.add_argument("--amp", nargs="+", default=["none", "bf16"], choices=["none", "bf16"])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device("cpu")
    out = {"environment": {**environment("cpu"), **cpu_info()}, "command": " ".join(["python"] + sys.argv),
           "results": []}
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    for name in args.models:
        torch.manual_seed(0)
        model = perturb(hybridvit.create_model(name).eval()).to(memory_format=torch.channels_last)
        fused = copy.deepcopy(model).fuse()
        for amp in args.amp:
            variants = {"as built": model, "no linear epilogue": Patched(model, PATCHES["no linear epilogue"]),
                        "fused": fused}
            if amp == "bf16":
                variants["explicit attention"] = Patched(model, PATCHES["explicit attention"])

            def step(m, bf16=amp == "bf16"):
                def run():
                    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                        return m(x)
                return run
            steps = {k: step(m) for k, m in variants.items()}
            outs = {k: s().float() for k, s in steps.items()}
            ref = outs["as built"]
            for s in steps.values():
                for _ in range(args.warmup):
                    s()
            times: dict[str, list[float]] = {k: [] for k in steps}
            for _ in range(args.rounds):  # interleaved: a drift of the machine hits every variant alike
                for k, s in steps.items():
                    times[k] += time_runs(s, dev, 1)
            base = statistics.median(times["as built"])
            for k, t in times.items():
                med = statistics.median(t)
                r = {"model": name, "amp": amp, "batch_size": args.batch_size, "variant": k,
                     "ms": round(med * 1e3, 2), "img_per_s": round(args.batch_size / med, 2),
                     # > 1: the variant is faster than the model as built
                     "speed_vs_as_built": round(base / med, 3),
                     "max_abs_diff_vs_as_built": (outs[k] - ref).abs().max().item(),
                     "times_ms": [round(v * 1e3, 2) for v in t]}
                out["results"].append(r)
                print(f"{name:<16} {amp:<5} {k:<20} {r['ms']:9.1f} ms  x{r['speed_vs_as_built']:.3f} "
                      f"(diff {r['max_abs_diff_vs_as_built']:.1e})", flush=True)
            Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

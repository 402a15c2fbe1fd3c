"""SDPA against the explicit baddbmm + softmax + bmm, at every attention shape the three families run, side by
side in one process (interleaved repeats), fp32 and bf16, eager and torch.compile'd.

    python benchmarks/attention_forms.py --out benchmarks/results/cpu_attention_forms.json

The shapes are recorded from real forward passes (analysis.capture.trace_attention, fp32: the SDPA path) of fastervit_0,
crossformerpp_s and cabvit_h_l2 at --batch (16) and 224 px. Each row: the shape, the median time of each
form and explicit/SDPA (below 1: explicit faster). The summary gives, per model and dtype, the time all
its attention calls take in each form (the sum over its calls). `whole_model` times each model's eager
forward (batch --batch, 224 px, channels_last, inference mode) with `attend` on SDPA and on the explicit
form, interleaved: the figure the policy of `layers.attention._sdpa_applies` is chosen by.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from collections import Counter

import torch
import torch.nn.functional as F

import hybridvit
from hybridvit.analysis.capture import trace_attention
from hybridvit.layers.attention import _attend_explicit, prepare_bias

MODELS = ("fastervit_0", "crossformerpp_s", "cabvit_h_l2")


def shapes_of(name: str, batch: int) -> Counter:
    model = hybridvit.create_model(name).eval()
    with torch.no_grad(), trace_attention() as tr:
        model(torch.randn(batch, 3, 224, 224))
    return Counter((r["q"], r["k"], r["bias"]) for r in tr.records)


def sdpa(q, k, v, bias):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def explicit(q, k, v, bias):
    return _attend_explicit(q, k, v, bias, None, 0.0)


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def whole_model(name: str, batch: int, repeats: int) -> dict:
    """Median eager forward ms of `name` with attend forced to SDPA and to the explicit form, fp32 and bf16."""
    from hybridvit.layers import attention as A

    model = hybridvit.create_model(name).eval().to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, 224, 224)
    policy = A._sdpa_applies
    forms = {"sdpa": lambda q: True, "explicit": lambda q: False}
    res = {}
    try:
        for bf16 in (False, True):
            times = {f: [] for f in forms}
            for r in range(repeats + 1):
                for f, rule in forms.items():
                    A._sdpa_applies = rule
                    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                        t = time.perf_counter()
                        model(x)
                        if r:  # the first round warms up
                            times[f].append(time.perf_counter() - t)
            med = {f: statistics.median(t) * 1e3 for f, t in times.items()}
            res["bfloat16" if bf16 else "float32"] = {**{f"{f}_ms": round(m, 1) for f, m in med.items()},
                                                      "sdpa_over_explicit": round(med["sdpa"] / med["explicit"], 3)}
    finally:
        A._sdpa_applies = policy
    return res


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows, summary = [], {}
    for name in MODELS:
        counts = shapes_of(name, args.batch)
        for dtype in (torch.float32, torch.bfloat16):
            totals = {"sdpa": 0.0, "explicit": 0.0, "sdpa_compiled": 0.0, "explicit_compiled": 0.0}
            for (qs, ks, bs), calls in counts.items():
                g = torch.Generator().manual_seed(0)
                q, k = torch.randn(qs, generator=g, dtype=dtype), torch.randn(ks, generator=g, dtype=dtype)
                v = torch.randn(ks, generator=g, dtype=dtype)
                bias = None if bs is None else prepare_bias(q, torch.randn(bs, generator=g))
                forms = {"sdpa": sdpa, "explicit": explicit}
                if not args.no_compile:
                    torch._dynamo.reset()
                    forms.update(sdpa_compiled=torch.compile(sdpa), explicit_compiled=torch.compile(explicit))
                with torch.no_grad():
                    ref = sdpa(q, k, v, bias).float()
                    diff = {f: float((fn(q, k, v, bias).float() - ref).abs().max()) for f, fn in forms.items()}
                    times = {f: [] for f in forms}
                    for _ in range(args.repeats):  # interleaved
                        for f, fn in forms.items():
                            times[f] += timed(lambda fn=fn, q=q, k=k, v=v, b=bias: fn(q, k, v, b), 1)
                med = {f: statistics.median(t) for f, t in times.items()}
                for f in forms:
                    totals[f] += med[f] * calls
                row = {"model": name, "dtype": str(dtype).split(".")[-1], "q": qs, "k": ks, "bias": bs,
                       "calls": calls, **{f"{f}_ms": round(m * 1e3, 3) for f, m in med.items()},
                       "explicit_over_sdpa": round(med["explicit"] / med["sdpa"], 3), "max_abs_diff": diff}
                if not args.no_compile:
                    row["compiled_explicit_over_sdpa"] = round(med["explicit_compiled"] / med["sdpa_compiled"], 3)
                rows.append(row)
                print(json.dumps(row))
            summary[f"{name}/{str(dtype).split('.')[-1]}"] = {f"{f}_ms": round(t * 1e3, 2) for f, t in totals.items()
                                                              if t}
    whole = {name: whole_model(name, args.batch, args.repeats) for name in MODELS}
    print(json.dumps(whole, indent=1))
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model_name = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if "Model name" in line), "?")
    flags = [f for f in ("avx512_bf16", "amx_bf16") if f in cpu]
    out = {"command": " ".join(["python"] + sys.argv),
           "cpu": model_name, "bf16_flags": flags, "torch": torch.__version__, "python": platform.python_version(),
           "threads": args.threads, "batch": args.batch, "summary": summary, "whole_model": whole, "rows": rows}
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()

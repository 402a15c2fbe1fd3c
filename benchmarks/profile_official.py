"""Where the time goes, hybridvit and the official implementation side by side (torch.profiler).

Self CPU time of every op, grouped: matrix products and convolutions (GEMM-like), fused attention,
the rest (memory-bound: copies, norms, activations, adds, softmax). Eval, same weights, one model.

    HV_OFFICIAL_REFS=$REFS PYTHONPATH=../shared/tools/official:src python benchmarks/profile_official.py \
        --model fastervit_0 --amp bf16 --batch-size 16 --threads 2 --out benchmarks/results/X.json
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import hybridvit
from hybridvit.bench import environment, make_step, prepare

PRODUCTS = ("mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "_linear_pointwise", "convolution",
            "mkldnn_convolution", "_convolution", "conv2d", "_mkl_linear", "mkldnn_linear")
ATTENTION = ("scaled_dot_product", "_scaled_dot_product_flash_attention_for_cpu")


def category(op: str) -> str:
    base = op.split("::")[-1]
    if any(a in base for a in ATTENTION):
        return "attention"
    if base in PRODUCTS or "conv" in base and "convert" not in base:
        return "products"
    return "rest"


def profile_step(step, repeats: int) -> dict:
    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            step()
    ops = {}
    for e in prof.key_averages():
        ops[e.key] = ops.get(e.key, 0.0) + e.self_cpu_time_total / 1e3 / repeats
    groups = {"products": 0.0, "attention": 0.0, "rest": 0.0}
    for k, ms in ops.items():
        groups[category(k)] += ms
    total = sum(groups.values())
    top = sorted(ops.items(), key=lambda kv: -kv[1])[:15]
    return {"ms_per_batch": round(total, 1), "ms": {k: round(v, 1) for k, v in groups.items()},
            "share": {k: round(v / total, 3) for k, v in groups.items()},
            "top_ops_ms": {k: round(v, 1) for k, v in top}}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="fastervit_0")
    ap.add_argument("--amp", default="bf16")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--compile", action="store_true",
                    help="profile both sides compiled as `hybridvit bench --compile` does (inductor's freezing), "
                         "with inductor's generated kernels named in the profile")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from compare_official import perturb
    from official import OFFICIAL  # the official code, from HV_OFFICIAL_REFS (see compare_official.py)
    dev = torch.device("cpu")
    torch.manual_seed(0)
    official = perturb(OFFICIAL[args.model]().eval())
    ours = hybridvit.create_model(args.model).eval()
    hybridvit.load_checkpoint(ours, {"state_dict": official.state_dict()})
    x = torch.randn(args.batch_size, 3, 224, 224)
    amp = None if args.amp == "none" else args.amp
    out = {"environment": environment("cpu"), "command": " ".join(["python"] + sys.argv), "model": args.model,
           "amp": args.amp, "batch_size": args.batch_size, "results": {}}
    if args.compile:
        import torch._inductor.config as inductor_config
        inductor_config.cpp.enable_kernel_profile = True
        out["compile"] = "freezing"
    for label, m in [("official", official), ("hybridvit", ours)]:
        mm, _ = prepare(copy.deepcopy(m), dev, channels_last=(label != "official"), compile=args.compile)
        r = profile_step(make_step(mm, x, dev, amp, False), args.repeats)
        out["results"][label] = r
        print(label, json.dumps({k: r[k] for k in ("ms_per_batch", "share")}), flush=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

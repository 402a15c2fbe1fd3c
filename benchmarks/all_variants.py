"""Throughput of every registered variant with a published top-1, and a plot of throughput vs top-1.

    python benchmarks/all_variants.py --threads 2 --amp bf16 --batch-size 4 --out benchmarks/cpu_all_variants.json
    python benchmarks/all_variants.py --plot benchmarks/cpu_all_variants.json   # -> .png next to it

Each model is built with random weights (speed does not depend on them) at its published input
size, in eval(), and timed with hybridvit.bench (warm-up, median of repeats).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import hybridvit
from hybridvit.bench import bench_models, environment, prepare
from hybridvit.registry import get_entry


def plot(path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(path.read_text())
    fig, ax = plt.subplots(figsize=(8, 5.5))
    colors = {"fastervit": "tab:green", "crossformer": "tab:blue", "cabvit": "tab:red"}
    for fam, color in colors.items():
        rows = sorted((r for r in data["results"] if r["family"] == fam), key=lambda r: r["img_per_s"])
        if not rows:
            continue
        ax.plot([r["img_per_s"] for r in rows], [r["top1"] for r in rows], "o", color=color, label=fam)
        for r in rows:
            ax.annotate(r["model"], (r["img_per_s"], r["top1"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    env = data["environment"]
    ax.set_xscale("log")
    amp = "fp32" if data["amp"] == "none" else data["amp"]
    ax.set_xlabel(f"throughput (img/s), {amp}, batch {data['batch_size']}, "
                  f"{env['threads']} CPU threads, torch {env['torch']}")
    ax.set_ylabel("published ImageNet top-1 (%)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    out = path.with_suffix(".png")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--amp", default="bf16", choices=["none", "bf16"])
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--models", nargs="*", default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--plot", default=None, help="only plot this result file")
    args = ap.parse_args()
    if args.plot:
        print(plot(Path(args.plot)))
        return 0
    torch.set_num_threads(args.threads)
    names = args.models or [n for n in hybridvit.list_models() if get_entry(n).top1 is not None]
    out = {"environment": environment("cpu"), "command": " ".join(["python"] + sys.argv), "amp": args.amp,
           "batch_size": args.batch_size, "results": []}
    for name in names:
        entry = get_entry(name)
        model, _ = prepare(name, torch.device("cpu"))
        size = entry.pretrained_cfg["input_size"][-1]
        (r,) = bench_models([(name, model)], batch_size=args.batch_size, img_size=size, warmup=1,
                            repeats=args.repeats, amp=None if args.amp == "none" else args.amp, memory=False,
                            latency=args.batch_size > 1)
        r.update(family=entry.family, top1=entry.top1)
        out["results"].append(r)
        print(f"{name:<24}{r['img_per_s']:8.2f} img/s  top-1 {entry.top1}",
              flush=True)
        del model
        Path(args.out).write_text(json.dumps(out, indent=1))
    print(plot(Path(args.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

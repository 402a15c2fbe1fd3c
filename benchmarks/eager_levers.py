"""Each eager-inference lever of hybridvit against the code without it, in one process (issue 22).

Every lever is switched off by putting back what the code did before it, then the whole model is timed
with and without it in interleaved rounds (median), same weights, same input:

- `scores`: attention scores as one `baddbmm_` onto a copy of the bias with the scale as its factor
  (`layers.attention._scores`), against the product followed by an in-place scale and bias add;
- `caches`: BatchNorm-folded conv weights and CabViT's gathered attention bias cached under version
  counters (`accel.cache.cached_for`), against computing them at every call;
- `packed`: fused-linear weights kept in oneDNN's blocked layout (`cast_param(..., pack=True)`), against
  the plain layout that oneDNN reorders inside every call;
- `projections`: FasterViT's and CabViT's attention projections through the fused linear, against
  `nn.Linear` (autocast casting the weight at every call);
- `convs`: convolutions through oneDNN's fused convolution with the weight kept reordered into its blocked
  layout and the ReLU / exact GELU in its epilogue (`layers.fuse.conv_bn`), against `F.conv2d` on the
  cached BN-folded weight followed by the activation in place;
- `softmax`: eager bf16 attention weights from ATen's fp32 softmax kernel on the row lengths where it is
  faster (16-63 keys, not a multiple of 32: `layers.attention._softmax`), against the bf16 kernel.

    python benchmarks/eager_levers.py --models fastervit_0 crossformerpp_s cabvit_h_l2 --batch-sizes 16 1 \
        --amp bf16 --rounds 7 --out benchmarks/results/cpu_issue22_eager_levers.json
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
import hybridvit.layers.attention as attention
import hybridvit.layers.fuse as fuse
import hybridvit.models.cabvit as cabvit
import hybridvit.models.fastervit as fastervit
from hybridvit.bench import environment, make_step, prepare, time_runs
from hybridvit.layers.accel import cache, fused_linear
from hybridvit.runtime import keep_freed_memory


def _scores_before(q, k, bias, scale):
    logits = torch.matmul(q, k.transpose(-2, -1))
    return logits.mul_(scale) if bias is None else logits.mul_(scale).add_(bias)


def _uncached(module, geometry, tensors, compute):
    return compute()


def _unpacked(t, dtype, pack=False):
    return cache.cast_param(t, dtype)


def _no_onednn_conv(*args):
    return None


def _bf16_softmax(scores):
    return scores.softmax(-1)


def _plain_linear(x, layer, gelu=False, residual=None):
    assert not gelu and residual is None
    return layer(x)


# lever -> [(module, attribute, value without the lever)]
WITHOUT = {
    "scores": [(attention, "_scores", _scores_before)],
    "caches": [(fuse, "cached_for", _uncached), (cabvit, "cached_for", _uncached)],
    "packed": [(fused_linear, "cast_param", _unpacked)],
    "projections": [(fastervit, "linear", _plain_linear), (cabvit, "linear", _plain_linear)],
    "convs": [(fuse, "_onednn_conv_dtype", _no_onednn_conv)],
    "softmax": [(attention, "_softmax", _bf16_softmax)],
}


@contextlib.contextmanager
def without(lever: str) -> Iterator[None]:
    saved = [(mod, name, getattr(mod, name)) for mod, name, _ in WITHOUT[lever]]
    for mod, name, value in WITHOUT[lever]:
        setattr(mod, name, value)
    try:
        yield
    finally:
        for mod, name, value in saved:
            setattr(mod, name, value)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["fastervit_0", "crossformerpp_s", "cabvit_h_l2"])
    ap.add_argument("--levers", nargs="+", default=list(WITHOUT), choices=list(WITHOUT))
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[16, 1])
    ap.add_argument("--amp", default="bf16", choices=["bf16", "none"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as the hybridvit commands run
    dev = torch.device("cpu")
    amp = None if args.amp == "none" else args.amp
    out = {"environment": environment("cpu"), "command": " ".join(["python"] + sys.argv), "amp": args.amp,
           "rounds": args.rounds, "results": []}
    for name in args.models:
        torch.manual_seed(0)
        model, _ = prepare(hybridvit.create_model(name).eval(), dev, channels_last=True)
        for bs in args.batch_sizes:
            x = torch.randn(bs, 3, 224, 224)
            step = make_step(model, x, dev, amp, False)
            n = 10 if bs == 1 else 2
            for lever in args.levers:
                times: dict[str, list[float]] = {"without": [], "with": []}
                for _ in range(args.rounds):
                    for label in times:
                        ctx = without(lever) if label == "without" else contextlib.nullcontext()
                        with ctx:
                            step()  # the first call after a switch fills or drops the caches
                            times[label].append(statistics.fmean(time_runs(step, dev, n)) * 1e3)
                med = {k: statistics.median(v) for k, v in times.items()}
                r = {"model": name, "batch_size": bs, "lever": lever, "ms_without": round(med["without"], 2),
                     "ms_with": round(med["with"], 2), "speedup": round(med["without"] / med["with"], 3),
                     "times_ms": {k: [round(t, 2) for t in v] for k, v in times.items()}}
                out["results"].append(r)
                print(f"{name:<16} b{bs:<3} {lever:<12} {r['ms_without']:8.1f} -> {r['ms_with']:8.1f} ms  "
                      f"x{r['speedup']:.3f}", flush=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

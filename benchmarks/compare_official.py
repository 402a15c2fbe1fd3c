"""Side-by-side throughput of hybridvit and the official implementations, same weights, one process.

Procedure (not run by CI: it needs the official code, which the project never ships):
    fetch NVlabs/FasterViT, cheerss/CrossFormer, hkzhang91/CabViT; `git archive HEAD | tar -x` each into
    $REFS/<owner>+<name>/; then
    HV_OFFICIAL_REFS=$REFS PYTHONPATH=../shared/tools/official \
        python benchmarks/compare_official.py --device cpu --threads 2 --batch-size 16 \
        --out benchmarks/cpu_official.json

For each model the official network is built with random weights, its state dict is converted by
hybridvit's own converter, outputs are compared (fp32 max abs difference), then both are timed in
interleaved rounds (fp32 and bf16 autocast; eval; optionally a training step and torch.compile) and the
ratios written with the measured matmul peak of the device.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

import hybridvit
from hybridvit.bench import bench_models, environment, matmul_peak_gflops, prepare
from hybridvit.layers.linear import cpu_has_native_bf16
from hybridvit.precision import Precision

MODELS = ["fastervit_0", "crossformerpp_s", "cabvit_h_l2"]


@torch.no_grad()
def perturb(model: torch.nn.Module) -> torch.nn.Module:
    """Moves every weight and BN statistic away from its initial value (as the fixtures do), so that
    the output comparison is meaningful (tiny initial layer scales would hide any difference)."""
    g = torch.Generator().manual_seed(0)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if not t.is_floating_point():
            continue
        if name.endswith("running_var"):
            t.copy_(torch.rand(t.shape, generator=g) + 0.5)
        elif "gamma" in name or name.endswith("layer_scale") or t.abs().max() < 1e-3:
            t.copy_(torch.rand(t.shape, generator=g) * 0.5 + 0.5)
        else:
            t.add_(torch.randn(t.shape, generator=g) * 0.02)
    return model


def cpu_info() -> dict:
    """The CPU's model name and its bf16/AMX flags (lscpu's view, from /proc/cpuinfo), {} off Linux."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = fields.get("flags", "").split()
    return {"cpu_model": fields.get("model name", ""),
            "cpu_bf16_flags": [f for f in flags if "bf16" in f or f.startswith("amx") or f == "avx512f"],
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="*", default=MODELS)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--amp", nargs="*", default=["none", "bf16"])
    ap.add_argument("--train", action="store_true", help="also time a training step")
    ap.add_argument("--train-only", action="store_true", help="time only the training step")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile'd models")
    ap.add_argument("--compile-mode", nargs="+", default=["freezing"], choices=["freezing", "default"],
                    help="how to compile (hybridvit.bench.compile_model), each side the same way; several: "
                         "each timed")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--timm", nargs="*", default=[],
                    help="timm models to add (e.g. convnext_tiny swin_tiny_patch4_window7_224)")
    ap.add_argument("--fuse", action="store_true", help="also time hybridvit's inference form (model.fuse())")
    ap.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd", help="optimizer of the training step")
    ap.add_argument("--no-latency", action="store_true", help="skip the batch-1 latency runs (shorter runs)")
    ap.add_argument("--keep-memory", action="store_true",
                    help="glibc keeps freed memory (hybridvit.runtime.keep_freed_memory, as the hybridvit commands "
                         "run), for both sides: the allocator is process-wide")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.keep_memory:
        from hybridvit.runtime import keep_freed_memory

        if not keep_freed_memory():
            raise SystemExit("--keep-memory: not applied (needs Linux with glibc, and HYBRIDVIT_KEEP_MEMORY unset)")
    # each side compiles once per (amp, batch size) and the official code once per module instance: dynamo's
    # default limit of 8 recompilations would leave the last ones running eagerly
    torch._dynamo.config.recompile_limit = 64
    from official import OFFICIAL  # the official code, from HV_OFFICIAL_REFS (see module docstring)

    dev = torch.device(args.device)
    out = {"environment": {**environment(args.device), **cpu_info()}, "command": " ".join(["python"] + sys.argv),
           "keep_memory": args.keep_memory, "matmul_peak_gflops": {}, "results": []}
    def measure_peaks() -> None:
        # the best of repeated measurements (before and after every model): a noisy machine only lowers it
        for amp in args.amp:
            dtype = Precision.from_amp(amp, dev).dtype or torch.float32
            # bf16 on CPUs without native bf16 (AVX2 only) runs ~0.3 GFLOP/s: a small matrix keeps this short
            # (with native bf16 a 512 product is too small to reach the peak)
            n = 8192 if dev.type == "cuda" else (2048 if amp == "none" or cpu_has_native_bf16() else 512)
            peak = matmul_peak_gflops(dev, dtype, n=n)
            out["matmul_peak_gflops"][amp] = max(peak, out["matmul_peak_gflops"].get(amp, 0.0))

    measure_peaks()
    for name in args.models:
        torch.manual_seed(0)
        official = perturb(OFFICIAL[name]().eval())
        ours = hybridvit.create_model(name).eval()
        hybridvit.load_checkpoint(ours, {"state_dict": official.state_dict()})
        x = torch.randn(2, 3, 224, 224)
        with torch.no_grad():
            ref = official(x)
            diff = (ref - ours(x)).abs().max().item()
        print(f"{name}: max abs diff official vs hybridvit (fp32) = {diff:.2e} (max |logit| "
              f"{ref.abs().max().item():.2f})", flush=True)
        if "bf16" in args.amp:
            # bf16 error of each side against the fp32 official logits: the kernels differ, not the numerics
            errs = {}
            with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16):
                for label, m in [("official", official), ("hybridvit", ours)]:
                    errs[label] = (m(x).float() - ref).abs().max().item()
            out.setdefault("bf16_max_abs_err_vs_fp32_official", {})[name] = errs
            print(f"{name}: bf16 max abs error vs fp32 official logits: {errs}", flush=True)
        modes = [True] if args.train_only else [False, True] if args.train else [False]
        for train in modes:
            for compiled in ([False, *args.compile_mode] if args.compile else [False]):
                pairs = []
                variants = [("official", official, False), ("hybridvit", ours, False)]
                if args.fuse and not train:
                    variants.append(("hybridvit+fuse", ours, True))
                for label, m, fuse in variants:
                    mm, _ = prepare(copy.deepcopy(m), dev, channels_last=(label != "official"),
                                    compile=compiled, train=train, fuse=fuse)
                    pairs.append((f"{name}/{label}", mm))
                for t in args.timm:
                    mm, _ = prepare(f"timm:{t}", dev, compile=compiled, train=train)
                    pairs.append((f"timm/{t}", mm))
                for amp in args.amp:
                    measure_peaks()
                    res = bench_models(pairs, batch_size=args.batch_size, device=args.device,
                                       amp=None if amp == "none" else amp, train=train, repeats=args.repeats,
                                       warmup=args.warmup, optimizer=args.optimizer,
                                       latency=not args.no_latency)
                    ref = res[0]["img_per_s"]
                    for r in res:
                        peak = out["matmul_peak_gflops"][amp]
                        r.update( name=name, compiled=compiled, fp32_max_abs_diff=diff,
                                 ratio_vs_official=r["img_per_s"] / ref,
                                 pct_of_matmul_peak=100 * r["achieved_gflops"] / peak)
                        print(f"  {r['model']:<28} {amp:<5} train={train} compile={compiled} "
                              f"{r['img_per_s']:8.1f} img/s "
                              f"x{r['ratio_vs_official']:.2f}  {r['pct_of_matmul_peak']:.0f}% of peak  "
                              f"b1 {r.get('latency_b1_ms', float('nan')):.1f} ms  "
                              f"{r['peak_mem_per_img_mb']:.1f} MB/img", flush=True)
                    out["results"] += res
        Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""glibc malloc left at its defaults against `hybridvit.runtime.keep_freed_memory` (freed buffers stay in the
process), for eager and torch.compile'd inference, bf16 and fp32.

    python benchmarks/malloc_settings.py --out benchmarks/results/cpu_malloc_settings.json

The allocator is process-wide and glibc cannot be put back to its dynamic defaults once set, so each
measurement is a child process (`--child`), and the script runs the settings alternately (A B A B ...,
--rounds rounds) for each model and mode. A child builds the model (random weights, batch --batch, 224 px,
channels_last), compiles it when asked (`bench.compile_model`, freezing), runs --warmup untimed passes
and reports the median of --repeats timed passes. The ratio is keep / default per round; the summary
gives the median ratio over the rounds.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

MODELS = ("fastervit_0", "crossformerpp_s", "cabvit_h_l2")
MODES = ("eager-bf16", "compile-bf16", "eager-fp32", "compile-fp32")
SETTINGS = ("default", "keep")


def child(model: str, mode: str, setting: str, batch: int, warmup: int, repeats: int, threads: int) -> dict:
    import torch

    from hybridvit.bench import make_step, prepare, time_runs
    from hybridvit.runtime import keep_freed_memory

    applied = keep_freed_memory() if setting == "keep" else False
    torch.set_num_threads(threads)
    how, dtype = mode.split("-")
    dev = torch.device("cpu")
    m = prepare(model, dev, True, "freezing" if how == "compile" else False)[0]
    step = make_step(m, torch.randn(batch, 3, 224, 224), dev, "bf16" if dtype == "bf16" else "none", False)
    for _ in range(warmup):
        step()
    times = time_runs(step, dev, repeats)
    return {"median_ms": statistics.median(times) * 1e3, "applied": applied}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out")
    ap.add_argument("--child", nargs=3, metavar=("MODEL", "MODE", "SETTING"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(*a.child, a.batch, a.warmup, a.repeats, a.threads)))
        return
    rows, summary = [], {}
    for model in a.models:
        for mode in a.modes:
            ratios = []
            for r in range(a.rounds):
                got = {}
                for setting in SETTINGS if r % 2 == 0 else SETTINGS[::-1]:
                    cmd = [sys.executable, __file__, "--child", model, mode, setting, "--batch", str(a.batch),
                           "--warmup", str(a.warmup), "--repeats", str(a.repeats), "--threads", str(a.threads)]
                    env = {k: v for k, v in os.environ.items() if k != "HYBRIDVIT_KEEP_MEMORY"}
                    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
                    got[setting] = json.loads(done.stdout.strip().splitlines()[-1])
                ratio = got["default"]["median_ms"] / got["keep"]["median_ms"]  # > 1: keep is faster
                ratios.append(ratio)
                rows.append({"model": model, "mode": mode, "round": r, **{f"{k}_ms": v["median_ms"]
                                                                          for k, v in got.items()},
                             "keep_applied": got["keep"]["applied"], "speedup": ratio})
                print(f"{model:16s} {mode:13s} round {r}: default {got['default']['median_ms']:7.1f} ms, "
                      f"keep {got['keep']['median_ms']:7.1f} ms, speed-up {ratio:.2f}x", flush=True)
            summary[f"{model} {mode}"] = statistics.median(ratios)
    out = {"command": "python " + " ".join(sys.argv), "cpu": cpu_name(), "threads": a.threads, "batch": a.batch,
           "rows": rows, "median_speedup_keep_over_default": summary}
    print(json.dumps(summary, indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()

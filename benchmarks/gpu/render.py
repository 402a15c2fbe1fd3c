"""Renders the JSON of benchmarks/gpu/run.sh as the Markdown tables of benchmarks/README.md's GPU section.

    python benchmarks/gpu/render.py OUT_DIR_OR_gpu_check.json [--summary]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _f(v, fmt: str = ".1f", none: str = "–") -> str:
    return none if v is None or isinstance(v, str) else format(v, fmt)


def _x(v) -> str:
    return "–" if v is None else f"**{v:.2f}×**"


def render(data: dict) -> str:
    s = data["sections"]
    env = s.get("env", {})
    gpu = env.get("gpu", {}).get("name", "DRY RUN on CPU (no GPU)" if data["dry_run"] else data["device"])
    peaks = env.get("matmul_peak_tflops", {})
    out = [f"Machine: {gpu}; torch {env.get('environment', {}).get('torch', '?')}, "
           f"{', '.join(f'{k} {v}' for k, v in env.get('versions', {}).items())}; measured matmul peak "
           f"{', '.join(f'{k} {v:.1f}' for k, v in peaks.items())} TFLOP/s; project commit "
           f"{env.get('project_commit', '?')[:10]}; wall {data.get('wall_s', 0):.0f} s"
           + (" — **DRY RUN**: CPU, tiny sizes, one repeat; figures are not measurements" if data["dry_run"]
              else ""), ""]
    out.append("| section | status | wall s | note |")
    out.append("|---|---|---|---|")
    for name, rec in s.items():
        note = rec.get("error") or rec.get("note") or ""
        if rec.get("not_run"):
            note += f" not run (time budget): {', '.join(rec['not_run'])}"
        out.append(f"| {name} | {rec['status']} | {rec['wall_s']:.0f} | {note[:200]} |")
    out.append("")
    t = s.get("tests", {})
    if "tests" in t:
        out.append(f"CUDA tests: {t['passed']} passed, {t['failures']} failed, {t['errors']} errors, "
                   f"{t['skipped']} skipped of {t['tests']}.")
    d = s.get("digits", {})
    if "val_top1" in d:
        out.append(f"`hybridvit train` on the digits, {d['epochs']} epochs: val top-1 {d['val_top1']:.2f}% "
                   f"(CPU: {d['cpu_reference_top1']:.2f}%).")
    out.append("")

    inf = s.get("inference", {})
    if inf.get("eager"):
        comp = {r["model"]: r for r in inf.get("compiled", [])}
        out.append(f"Inference, {inf.get('amp', 'bf16')} autocast, batch {inf['eager'][0]['batch_size']}, "
                   f"{inf['eager'][0]['img_size']} px (eager; compiled: torch.compile, {inf.get('compile_backend')}):")
        out.append("")
        out.append("| model | eager img/s | compiled img/s | vs official (eager / compiled) | vs convnext_tiny | "
                   "vs swin_tiny | TFLOP/s (% of bf16 peak) | batch-1 ms | peak MB/img |")
        out.append("|---|---|---|---|---|---|---|---|---|")
        for r in inf["eager"]:
            c = comp.get(r["model"], {})
            dyn = c.get("group_dynamo")
            breaks = f" ({dyn['graph_breaks']} graph breaks in its group)" if dyn else ""
            out.append(f"| {r['model']} | {_f(r['img_per_s'])} | {_f(c.get('img_per_s'))}{breaks} | "
                       f"{_x(r.get('ratio_vs_official'))} / {_x(c.get('ratio_vs_official'))} | "
                       f"{_x(r.get('ratio_vs_convnext_tiny'))} | "
                       f"{_x(r.get('ratio_vs_swin_tiny_patch4_window7_224'))} | "
                       f"{_f(r['tflops'], '.2f')} ({_f(r['pct_of_bf16_peak'], '.0f')}%) | "
                       f"{_f(r.get('latency_b1_ms'))} | {_f(r.get('peak_mem_per_img_mb'))} |")
        for k, v in (inf.get("absent") or {}).items():
            out.append(f"\n{k}: {v}")
        out.append("")
    ts = s.get("train_step", {})
    if ts.get("results"):
        r0 = ts["results"][0]
        out.append(f"Training step ({ts.get('amp')}, AdamW, batch {r0['batch_size']}, {r0['img_size']} px):")
        out.append("")
        out.append("| model | img/s | vs official | TFLOP/s | peak MB/img |")
        out.append("|---|---|---|---|---|")
        for r in ts["results"]:
            out.append(f"| {r['model']} | {_f(r['img_per_s'])} | {_x(r.get('ratio_vs_official'))} | "
                       f"{_f(r['tflops'], '.2f')} | {_f(r.get('peak_mem_per_img_mb'))} |")
        out.append("")
    tl = s.get("train_loop", {})
    if "loop_img_per_s" in tl:
        ratio = tl["loop_vs_step"]
        out.append(f"`hybridvit train` on {tl['train_images']} JPEGs at {tl['img_size']} px, batch {tl['batch_size']}: "
                   f"{tl['loop_img_per_s']:.1f} img/s"
                   + (f", {ratio:.2f}× the training step's {tl['step_img_per_s']:.1f} img/s" if isinstance(ratio, float)
                      else f" ({ratio})") + f" (epoch times {tl['epoch_times_s']} s).")
        out.append("")
    att = s.get("attention", {})
    if att.get("families"):
        out.append(f"Attention, bf16, each family's costliest call shapes ({att.get('flex')}):")
        out.append("")
        out.append("| family | q (B, h, N, d) | keys | calls | SDPA picks | efficient / cuDNN / flash take the bias | "
                   "SDPA ms | unaligned bias ms | flex ms | flex vs SDPA | flex max diff |")
        out.append("|---|---|---|---|---|---|---|---|---|---|---|")
        for fam, f in att["families"].items():
            for g in f["signatures"]:
                acc = " / ".join("yes" if g["accepts"].get(b) == "ok" else "no"
                                 for b in ("EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "FLASH_ATTENTION"))
                out.append(f"| {fam} | {tuple(g['q'])} | {g['k'][2]} | {g['calls']} | {g['sdpa_choice']} | {acc} | "
                           f"{_f(g['sdpa_ms'], '.3f')} | {_f(g.get('sdpa_unaligned_bias_ms'), '.3f')} | "
                           f"{_f(g['flex_ms'], '.3f')} | {_x(g['flex_vs_sdpa'])} | "
                           f"{_f(g['flex_max_abs_diff_vs_sdpa'], '.1e')} |")
        ops = {fam: f["profiled_attention_ops"] for fam, f in att["families"].items()}
        out.append("")
        out.append("Attention kernels in a profiled forward: " + "; ".join(
            f"{fam}: {', '.join(f'{k} ×{v}' for k, v in o.items()) or 'none'}" for fam, o in ops.items()))
    return "\n".join(out) + "\n"


def summary_lines(data: dict) -> list[str]:
    """The short summary printed at the end (also by render.py --summary)."""
    s = data["sections"]
    where = "DRY RUN on CPU" if data["dry_run"] else data["device"]
    lines = [f"GPU check ({where}), wall {data.get('wall_s', 0):.0f} s"]
    for name, rec in s.items():
        lines.append(f"  {name:<11} {rec['status']:<8} {rec['wall_s']:>6.1f} s"
                     + (f"  {rec['error'][:100]}" if rec.get("error") else "")
                     + (f"  not run: {len(rec['not_run'])}" if rec.get("not_run") else ""))
    env = s.get("env", {})
    if "matmul_peak_tflops" in env:
        lines.append(f"  bf16 matmul peak {env['matmul_peak_tflops']['bf16']:.2f} TFLOP/s")
    if "tests" in s and "tests" in s["tests"]:
        t = s["tests"]
        lines.append(f"  CUDA tests: {t['passed']} passed, {t['failures']} failed, {t['errors']} errors, "
                     f"{t['skipped']} skipped")
    if "val_top1" in s.get("digits", {}):
        cpu = s["digits"].get("cpu_reference_top1", "?")
        lines.append(f"  digits val top-1 {s['digits']['val_top1']:.2f}% (CPU {cpu}%)")
    for key in ("eager", "compiled"):
        for r in s.get("inference", {}).get(key, []):
            extra = "".join(f" x{r[k]:.2f} {lbl}" for k, lbl in (("ratio_vs_official", "official"),
                                                                ("ratio_vs_convnext_tiny", "convnext_t"),
                                                                ("ratio_vs_swin_tiny_patch4_window7_224", "swin_t"))
                            if k in r)
            lines.append(f"  {key:<8} {r['model']:<38} {r['img_per_s']:9.1f} img/s {r['pct_of_bf16_peak']:5.1f}% "
                         f"peak{extra}")
    for r in s.get("train_step", {}).get("results", []):
        extra = f" x{r['ratio_vs_official']:.2f} official" if "ratio_vs_official" in r else ""
        lines.append(f"  train    {r['model']:<38} {r['img_per_s']:9.1f} img/s{extra}")
    tl = s.get("train_loop", {})
    if "loop_img_per_s" in tl:
        ratio = tl["loop_vs_step"]
        lines.append(f"  train loop {tl['loop_img_per_s']:.1f} img/s"
                     + (f" = x{ratio:.2f} of the step" if isinstance(ratio, float) else f" ({ratio})"))
    for fam, f in s.get("attention", {}).get("families", {}).items():
        for g in f["signatures"]:
            lines.append(f"  attn {fam:<16} q{g['q']} k{g['k'][2]} x{g['calls']}: {g['sdpa_choice']}, "
                         f"flex x{g['flex_vs_sdpa']:.2f} (diff {g['flex_max_abs_diff_vs_sdpa']:.1e})")
    for name, rec in s.items():
        for k, v in (rec.get("absent") or {}).items():
            lines.append(f"  ABSENT in {name}: {k}: {v}")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("path", help="the --out folder of run.sh, or its gpu_check.json")
    ap.add_argument("--summary", action="store_true", help="the short summary run.sh prints instead")
    args = ap.parse_args()
    p = Path(args.path)
    data = json.loads((p / "gpu_check.json" if p.is_dir() else p).read_text())
    if args.summary:
        print("\n".join(summary_lines(data)))
    else:
        print(render(data), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())

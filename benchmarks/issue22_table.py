"""The CPU inference targets (issue 22) as one table, read from `compare_official.py` result files.

Each cell is ours/official from one file (both sides measured in one process, interleaved), with the
target, whether it is met, and the share of the matmul peak ours would need to meet it where it is not:
the official's share times the target ratio (each side's share uses its own MAC count). A needed share
above 100% means the target cannot be met on this CPU by faster kernels alone.

    python benchmarks/issue22_table.py benchmarks/results/cpu_issue22_final_*.json \
        --out benchmarks/results/cpu_issue22_final_table.md
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# (row label, amp, compiled?, metric, target, higher is better)
ROWS = [
    ("eager bf16, img/s at batch 16", "bf16", False, "img_per_s", 1.3, True),
    ("eager fp32, img/s at batch 16", "fp32", False, "img_per_s", 1.3, True),
    ("compiled bf16 vs official compiled", "bf16", True, "img_per_s", 1.2, True),
    ("compiled fp32 vs official compiled", "fp32", True, "img_per_s", 1.2, True),
    ("batch-1 latency eager bf16", "bf16", False, "latency_b1_ms", 0.8, False),
    ("batch-1 latency eager fp32", "fp32", False, "latency_b1_ms", 0.8, False),
]


def load(paths: list[str]) -> dict:
    """(model, amp, compiled) -> {"official": entry, "hybridvit": entry, "file": name}."""
    cells: dict = {}
    for p in paths:
        data = json.loads(Path(p).read_text())
        for r in data["results"]:
            if r.get("train") or "/" not in r.get("model", ""):
                continue  # training steps, timm models
            name, side = r["model"].split("/")
            amp = "fp32" if r["amp"] in ("fp32", "none", None) else r["amp"]
            cell = cells.setdefault((name, amp, bool(r.get("compiled"))), {})
            cell[side] = r
            cell["file"] = Path(p).name
            cell["compile_mode"] = r.get("compiled")
    return cells


def table(cells: dict) -> str:
    models = sorted({k[0] for k in cells}, key=lambda m: ["fastervit", "crossformer", "cabvit"].index(
        next(f for f in ("fastervit", "crossformer", "cabvit") if m.startswith(f))))
    head = "| target | " + " | ".join(models) + " |"
    lines = [head, "|" + "---|" * (len(models) + 1)]
    for label, amp, compiled, metric, target, higher in ROWS:
        row = [f"{label}, ours/official {'≥' if higher else '≤'} {target}×"]
        for m in models:
            cell = cells.get((m, amp, compiled))
            if not cell or "official" not in cell or "hybridvit" not in cell or cell["official"].get(metric) is None:
                row.append("not measured")
                continue
            off, ours = cell["official"][metric], cell["hybridvit"][metric]
            ratio = ours / off
            met = ratio >= target if higher else ratio <= target
            text = f"{ratio:.2f}× ({off:.1f} → {ours:.1f}) {'**met**' if met else 'not met'}"
            if metric == "img_per_s":
                po, pu = cell["official"]["pct_of_matmul_peak"], cell["hybridvit"]["pct_of_matmul_peak"]
                text += f"; peak {pu:.0f}% (official {po:.0f}%)"
                if not met:
                    text += f", needs {po * target:.0f}%"
            if compiled and cell["compile_mode"] != "freezing":
                text += f" [compile: {cell['compile_mode']}]"
            row.append(text)
        lines.append("| " + " | ".join(row) + " |")
    for amp in ("bf16", "fp32"):
        row = [f"compiled ours / eager ours, {amp}, ≥ 1×"]
        for m in models:
            eager, comp = cells.get((m, amp, False), {}), cells.get((m, amp, True), {})
            if "hybridvit" not in eager or "hybridvit" not in comp:
                row.append("not measured")
                continue
            r = comp["hybridvit"]["img_per_s"] / eager["hybridvit"]["img_per_s"]
            row.append(f"{r:.2f}× {'**met**' if r >= 1 else 'not met'}"
                       + (" (two files)" if eager["file"] != comp["file"] else ""))
        lines.append("| " + " | ".join(row) + " |")
    files = sorted({c["file"] for c in cells.values()})
    lines.append("")
    lines.append("Files: " + ", ".join(f"`{f}`" for f in files))
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--out")
    args = ap.parse_args()
    text = table(load(args.files))
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

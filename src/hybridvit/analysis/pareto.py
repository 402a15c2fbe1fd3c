"""`hybridvit analyze pareto`: measured throughput against published ImageNet top-1, one colour per family,
from `hybridvit bench --json` files (or benchmarks/all_variants.py results, same layout)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .plotting import AnalysisError


def read_results(paths: list[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(points, skipped): one point per measured hybridvit variant with a published top-1: model, family,
    top1, img_per_s, setting (device, amp, batch, threads) and file; the others with the reason."""
    from ..registry import get_entry

    points, skipped = [], []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise FileNotFoundError(f"results file {p!r} does not exist: write one with `hybridvit bench --json FILE`")
        try:
            data = json.loads(path.read_text())
            results = data["results"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise AnalysisError(f"{p} is not a `hybridvit bench --json` file (no 'results' list): {e}") from e
        threads = (data.get("environment") or {}).get("threads")
        for r in results:
            name = r.get("model", "?")
            try:
                entry = get_entry(name)
            except ValueError:
                skipped.append({"model": name, "file": p, "reason": "not a hybridvit model"})
                continue
            top1 = r.get("top1", entry.top1)
            if top1 is None:
                skipped.append({"model": name, "file": p, "reason": "no published top-1"})
                continue
            setting = f"{r.get('device', '?')} {r.get('amp', '?')} b{r.get('batch_size', '?')}" + \
                (f" {threads} thr" if threads else "")
            points.append({"model": name, "family": r.get("family", entry.family), "top1": float(top1),
                           "img_per_s": float(r["img_per_s"]), "img_size": r.get("img_size"),
                           "train": bool(r.get("train", False)), "setting": setting, "file": p})
    if not points:
        raise AnalysisError("no measured variant with a published top-1 in " + ", ".join(paths) +
                            " (e.g. hybridvit bench -m fastervit_0 --compare crossformer_t --json FILE)")
    return points, skipped


def pareto_front(points: list[dict[str, Any]]) -> list[str]:
    """Models no other point beats on both throughput and top-1 (within one setting)."""
    front = []
    for p in points:
        if not any(q is not p and q["setting"] == p["setting"] and q["img_per_s"] >= p["img_per_s"]
                   and q["top1"] >= p["top1"] and (q["img_per_s"], q["top1"]) != (p["img_per_s"], p["top1"])
                   for q in points):
            front.append(p["model"])
    return front


def run_pareto(paths: list[str], out_dir: Path) -> dict[str, Any]:
    """Writes pareto.{png,svg,json} into out_dir; returns the JSON data."""
    from .plotting import FAMILY_COLORS, pyplot, save_figure, save_json

    plt = pyplot()
    points, skipped = read_results(paths)
    front = set(pareto_front(points))
    settings = sorted({p["setting"] for p in points})
    markers = "osD^v<>"
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for fam in sorted({p["family"] for p in points}):
        for k, setting in enumerate(settings):
            rows = sorted((p for p in points if p["family"] == fam and p["setting"] == setting),
                          key=lambda p: p["img_per_s"])
            if not rows:
                continue
            label = fam if len(settings) == 1 else f"{fam}, {setting}"
            color = FAMILY_COLORS.get(fam, "gray")
            ax.plot([p["img_per_s"] for p in rows], [p["top1"] for p in rows], markers[k % len(markers)],
                    color=color, label=label)
            # the family's own trade-off curve: its variants no other variant of the family beats
            own = set(pareto_front(rows))
            best = [p for p in rows if p["model"] in own]
            ax.plot([p["img_per_s"] for p in best], [p["top1"] for p in best], "-", color=color, alpha=0.5)
            for p in rows:
                ax.annotate(p["model"] + (" *" if p["model"] in front else ""), (p["img_per_s"], p["top1"]),
                            fontsize=6.5, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("measured throughput (img/s)" + (f", {settings[0]}" if len(settings) == 1 else ""))
    ax.set_ylabel("published ImageNet top-1 (%)")
    ax.set_title("throughput vs accuracy (lines: each family's trade-off curve; * overall Pareto front)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    data = {"results": paths, "points": points, "pareto_front": sorted(front), "skipped": skipped}
    data["files"] = save_figure(fig, out_dir, "pareto") + [str(out_dir / "pareto.json")]
    save_json(data, out_dir, "pareto")
    return data

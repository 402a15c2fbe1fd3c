"""`hybridvit analyze distance`: average attended distance per block, in input pixels.

For every attention call (FasterViT window and carrier attention, CrossFormer SDA/LDA, CabViT CaB
attention) the attention-weighted distance from each query token to its keys, averaged over queries,
heads and images (see `attention.attended_distance`); the curve over depth shows how far each stage
looks (CrossFormer++ Fig. 1; the motivation for its progressive group size).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .attention import attended_distance, capture


def block_distances(model: nn.Module, x: torch.Tensor) -> list[dict[str, Any]]:
    """One entry per attention call of a forward of x: module, block, stage, kind, distance_px."""
    return [{"module": lay.module, "block": lay.block, "stage": lay.stage, "kind": lay.kind,
             "distance_px": attended_distance(lay, w)} for lay, w in capture(model, x)]


def run_distance(runs: list[tuple[nn.Module, torch.Tensor]], out_dir: Path) -> dict[str, Any]:
    """Distances of each (model, input) pair; writes distance.{png,svg,json}; returns the JSON data."""
    from .plotting import pyplot, save_figure, save_json

    plt = pyplot()
    models = []
    for model, x in runs:
        rows = block_distances(model, x)
        models.append({"model": model.model_name, "img_size": list(x.shape[-2:]), "images": x.shape[0],
                       "blocks": rows})
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for i, m in enumerate(models):
        color = f"C{i}"
        main = [r for r in m["blocks"] if r["kind"] != "carriers"]
        label = f"{m['model']} ({m['img_size'][0]}px)"
        ax.plot(range(len(main)), [r["distance_px"] for r in main], "o-", color=color, ms=4, label=label)
        for j, r in enumerate(main):
            if r["kind"] == "lda":  # long-distance blocks: hollow markers
                ax.plot(j, r["distance_px"], "o", mfc="white", color=color, ms=6)
        # carrier attention runs before the window attention of the same block
        ct = [(j, r) for j, r in enumerate(main) if any(c["block"] == r["block"] and c["kind"] == "carriers"
                                                         for c in m["blocks"])]
        if ct:
            vals = {c["block"]: c["distance_px"] for c in m["blocks"] if c["kind"] == "carriers"}
            ax.plot([j for j, _ in ct], [vals[r["block"]] for _, r in ct], "s--", color=color, ms=5,
                    label=f"{m['model']}: carrier tokens")
    ax.set_xlabel("attention block (depth order)")
    ax.set_ylabel("mean attended distance (input pixels)")
    ax.set_title("average attended distance per block (hollow: long-distance/LDA)", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    data = {"models": models}
    data["files"] = save_figure(fig, out_dir, "distance") + [str(out_dir / "distance.json")]
    save_json(data, out_dir, "distance")
    return data

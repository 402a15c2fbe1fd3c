"""matplotlib (the optional `train` extra) for the analysis figures: import, overlays, PNG+SVG output."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

INSTALL_HINT = "pip install 'hybridvit[train]'"
FAMILY_COLORS = {"fastervit": "tab:green", "crossformer": "tab:blue", "cabvit": "tab:red"}


class AnalysisError(ValueError):
    """A user error of `hybridvit analyze` (bad option, missing optional extra), with what to do."""


def pyplot() -> Any:
    """matplotlib.pyplot on the non-interactive Agg backend; a clear error when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError as e:
        raise AnalysisError(f"`hybridvit analyze` draws its figures with matplotlib, which is not "
                                  f"installed: {INSTALL_HINT} (or pip install matplotlib)") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig: Any, out_dir: Path, stem: str) -> list[str]:
    """Writes `stem`.png and `stem`.svg into out_dir; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext in ("png", "svg"):
        path = out_dir / f"{stem}.{ext}"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        paths.append(str(path))
    fig.clf()
    pyplot().close(fig)
    return paths


def save_json(data: dict[str, Any], out_dir: Path, stem: str) -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{stem}.json"
    path.write_text(json.dumps(data, indent=1) + "\n")
    return str(path)


def show_image(ax: Any, image: torch.Tensor) -> None:
    """uint8 (3, H, W) image on an axis without ticks."""
    ax.imshow(image.permute(1, 2, 0).numpy())
    ax.set_xticks([])
    ax.set_yticks([])


def overlay(ax: Any, image: torch.Tensor, heat: torch.Tensor, alpha: float = 0.55, cmap: str = "inferno") -> Any:
    """The (h, w) map `heat`, stretched over the (3, H, W) uint8 image (nearest: one cell per token)."""
    show_image(ax, image)
    H, W = image.shape[-2:]
    return ax.imshow(heat.numpy(), cmap=cmap, alpha=alpha, extent=(-0.5, W - 0.5, H - 0.5, -0.5),
                     interpolation="nearest")

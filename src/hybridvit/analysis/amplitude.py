"""`hybridvit analyze amplitude`: max and mean |x| of every block's output (CrossFormer++ Fig. 3), with
`--no-acl` comparing CrossFormer++ with its amplitude cooling layers bypassed."""
from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .plotting import AnalysisError

_BLOCK = re.compile(r"stages\.(\d+)\.(?:.*\.)?blocks\.(\d+)")


def blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The blocks of every stage in depth order: (qualified name, module)."""
    return [(n, m) for n, m in model.named_modules() if _BLOCK.fullmatch(n)]


def cooling_layers(model: nn.Module) -> dict[str, nn.Module]:
    """CrossFormer++ amplitude cooling layers by owner block name."""
    from ..models.crossformer import AmplitudeCooling

    return {n.rsplit(".", 1)[0]: m for n, m in model.named_modules() if isinstance(m, AmplitudeCooling)}


@contextmanager
def without_cooling(model: nn.Module) -> Iterator[nn.Module]:
    """The model with every amplitude cooling layer replaced by identity (restored on exit)."""
    layers = cooling_layers(model)
    if not layers:
        raise AnalysisError(f"--no-acl: {model.model_name} has no amplitude cooling layers (they are "
                            "CrossFormer++'s: crossformerpp_*)")
    owners = {n: model.get_submodule(n) for n in layers}
    attr = {n: next(a for a, c in o.named_children() if c is layers[n]) for n, o in owners.items()}
    try:
        for n, o in owners.items():
            setattr(o, attr[n], nn.Identity())
        yield model
    finally:
        for n, o in owners.items():
            setattr(o, attr[n], layers[n])


@torch.no_grad()
def block_amplitudes(model: nn.Module, x: torch.Tensor) -> list[dict[str, Any]]:
    """max and mean |output| of every block (output: the block's tensor, the first of a tuple), over x."""
    stats: dict[str, tuple[float, float]] = {}

    def hook(name: str):
        def fn(_m, _inp, out):
            t = (out[0] if isinstance(out, (tuple, list)) else out).detach().float().abs()
            stats[name] = (float(t.max()), float(t.mean()))
        return fn

    named = blocks(model)
    cooled = cooling_layers(model)
    handles = [m.register_forward_hook(hook(n)) for n, m in named]
    try:
        model.eval()(x)
    finally:
        for h in handles:
            h.remove()
    return [{"block": n, "stage": int(_BLOCK.fullmatch(n).group(1)), "max_abs": stats[n][0],
             "mean_abs": stats[n][1], "cooling": n in cooled} for n, _ in named if n in stats]


def run_amplitude(runs: list[tuple[nn.Module, torch.Tensor]], out_dir: Path, no_acl: bool = False) -> dict[str, Any]:
    """Block amplitudes of each (model, input); with no_acl also with the cooling layers bypassed.
    Writes amplitude.{png,svg,json}; returns the JSON data."""
    from .plotting import pyplot, save_figure, save_json

    plt = pyplot()
    models = []
    for model, x in runs:
        entry = {"model": model.model_name, "img_size": list(x.shape[-2:]), "images": x.shape[0],
                 "blocks": block_amplitudes(model, x)}
        if no_acl:
            with without_cooling(model):
                entry["blocks_no_acl"] = block_amplitudes(model, x)
        models.append(entry)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, m in enumerate(models):
        for ax, key in zip(axes, ("max_abs", "mean_abs")):
            ax.plot([b[key] for b in m["blocks"]], "o-", color=f"C{i}", ms=3, label=m["model"])
            if "blocks_no_acl" in m:
                ax.plot([b[key] for b in m["blocks_no_acl"]], "x--", color=f"C{i}", ms=4,
                        label=f"{m['model']} without ACL")
            for j, b in enumerate(m["blocks"]):
                if b["cooling"]:
                    ax.axvline(j, color=f"C{i}", alpha=0.15, lw=3)
    for ax, title in zip(axes, ("max |x| of each block output", "mean |x| of each block output")):
        ax.set_yscale("log")
        ax.set_xlabel("block (depth order)")
        ax.set_title(title + ("  (shaded: ACL)" if any(b["cooling"] for m in models for b in m["blocks"]) else ""),
                     fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    data = {"models": models}
    data["files"] = save_figure(fig, out_dir, "amplitude") + [str(out_dir / "amplitude.json")]
    save_json(data, out_dir, "amplitude")
    return data

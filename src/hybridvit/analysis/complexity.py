"""`hybridvit analyze --model M` (no subcommand): where a model spends parameters and compute, and how
activations grow.

Per stage: parameters, GMACs and output shape; per block: the RMS amplitude of its output, the
quantity CrossFormer++'s amplitude cooling layers keep from growing with depth.
"""
from __future__ import annotations

import argparse
import json
from typing import Any

import torch
from torch import nn

from .amplitude import blocks as _blocks


@torch.no_grad()
def analyze(model: nn.Module, img_size: tuple[int, int] = (224, 224), batch_size: int = 2,
            seed: int = 0) -> dict[str, Any]:
    """Stage and block statistics of `model` (eval) on a random batch at `img_size`: MACs and (C, H, W)
    shapes from `hybridvit.flops` (the counter of `hybridvit models` and `bench`), block RMS by hooks."""
    from ..flops import count_macs, stage_profile

    model = model.eval()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, model.in_chans, *img_size, generator=g)
    amps: dict[str, float] = {}

    def hook(name):
        def fn(_m, _inp, out):
            t = out[0] if isinstance(out, (tuple, list)) else out
            amps[name] = float(t.float().pow(2).mean().sqrt())
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in _blocks(model)]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    stages = [{"stage": s["stage"], "params_m": sum(p.numel() for p in model.stages[s["stage"]].parameters()) / 1e6,
               "gmacs_per_img": s["macs"] / batch_size / 1e9, "out_shape": s["out_shape"]}
              for s in stage_profile(model, x)]
    blocks = [{"block": n, "rms": amps[n]} for n, _ in _blocks(model) if n in amps]
    return {"model": getattr(model, "model_name", type(model).__name__), "img_size": list(img_size),
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
            "gmacs_per_img": count_macs(model, (model.in_chans, *img_size)) / 1e9, "stages": stages,
            "blocks": blocks}


def run_table(args: argparse.Namespace) -> int:
    """The complexity table of `hybridvit analyze --model M [--pretrained P] [--img-size H [W]] [--json OUT]`."""
    from .load import load_model

    model = load_model(args.model, args.pretrained)
    size = args.img_size or list(model.pretrained_cfg["input_size"][1:])
    res = analyze(model, (size[0], size[-1]))
    print(f"{res['model']}: {res['params_m']:.2f} M parameters, {res['gmacs_per_img']:.2f} GMACs at "
          f"{size[0]}x{size[-1]}")
    print(f"{'stage':<7}{'params (M)':>11}{'GMACs':>8}  output shape")
    for s in res["stages"]:
        print(f"{s['stage']:<7}{s['params_m']:>11.2f}{s['gmacs_per_img']:>8.2f}  {s['out_shape']}")
    print("block output RMS (activation amplitude):")
    for b in res["blocks"]:
        print(f"  {b['block']:<28}{b['rms']:>10.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0

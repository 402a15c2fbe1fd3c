"""The one multiply-accumulate (MAC) counter and the one shape convention of `models`, `bench`,
`analyze` and the README.

MACs are torch.utils.flop_counter FLOPs / 2 for one forward pass in eval mode. PyTorch's counter
knows the CUDA attention kernels but not the CPU one (`_scaled_dot_product_flash_attention_for_cpu`),
so on CPU tensors every attention product went uncounted while on the `meta` device (where SDPA
decomposes into `bmm`) it was counted: crossformerpp_s read 4.04 GMACs in `bench` and 4.42 in
`models`. The mapping below counts the CPU kernel like the others, so both agree. Position-bias tables
(an MLP run once per resolution by the inference form, `model.fuse()`, not per image) are left out.

Shapes are reported as (C, H, W) (channels first, no batch), whatever layout a stage keeps
internally (CrossFormer's stages work in (B, H, W, C)).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

aten = torch.ops.aten


def _sdpa_cpu(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_cpu_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                       **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# attention kernels PyTorch's flop registry leaves out (only those that exist in this torch build)
_EXTRA = {getattr(aten, name): fn for name, fn in (
    ("_scaled_dot_product_flash_attention_for_cpu", _sdpa_cpu),
    ("_scaled_dot_product_flash_attention_for_cpu_backward", _sdpa_cpu_backward),
    ("_scaled_dot_product_fused_attention_overrideable", _sdpa_cpu),
    ("_scaled_dot_product_fused_attention_overrideable_backward", _sdpa_cpu_backward),
) if hasattr(aten, name)}


def flop_counter() -> FlopCounterMode:
    """A FlopCounterMode that also counts the CPU attention kernels (use as a context manager)."""
    return FlopCounterMode(display=False, custom_mapping=_EXTRA)


def _input(model: nn.Module, x: torch.Tensor | Sequence[int] | None) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    if x is None:
        x = model.pretrained_cfg["input_size"]
    if len(x) != 3:
        raise ValueError(f"input size must be (C, H, W), got {tuple(x)}")
    ref = next(model.parameters(), None)
    device = ref.device if ref is not None else torch.device("cpu")
    return torch.zeros(1, *x, device=device)


def count_macs(model: nn.Module, x: torch.Tensor | Sequence[int] | None = None) -> float:
    """Multiply-accumulates of one eval forward of `x`: a (B, C, H, W) batch (all B images counted), a
    (C, H, W) size (one image), or None for the model's `pretrained_cfg['input_size']`. Works on
    `meta` models (no memory, instant); the model's train/eval mode is restored afterwards."""
    return profile_macs(model, x)["total"]


def profile_macs(model: nn.Module, x: torch.Tensor | Sequence[int] | None = None) -> dict[str, Any]:
    """MACs of one eval forward: {'total': float, 'modules': {qualified module name: MACs}} (module names
    as FlopCounterMode writes them, e.g. 'FasterViT.stages.0'), for per-stage breakdowns."""
    x = _input(model, x)
    was_training = model.training
    # position-bias tables (an MLP run once per resolution by the inference form, not per-image work) are
    # left out of the count: counted, they made crossformerpp_s read 4.43 instead of 4.42
    from .layers.table import tables_outside_dispatch_modes

    model.eval()
    counter = flop_counter()
    try:
        with counter, torch.no_grad(), tables_outside_dispatch_modes():
            model(x)
    finally:
        model.train(was_training)
    counts = counter.get_flop_counts()
    return {"total": counter.get_total_flops() / 2,
            "modules": {k: sum(v.values()) / 2 for k, v in counts.items() if k != "Global"}}


def chw(shape: Sequence[int], channels: int) -> tuple[int, ...]:
    """(C, H, W) of a batched map given as (B, C, H, W) or channels-last (B, H, W, C); tokens (B, N, C)
    become (C, N). `channels` says which dimension holds the channels."""
    s = tuple(int(v) for v in shape[1:])
    if len(s) >= 2 and s[0] != channels and s[-1] == channels:
        s = (s[-1], *s[:-1])
    if s[0] != channels:
        raise ValueError(f"no dimension of {tuple(shape)} has {channels} channels")
    return s


def stage_profile(model: nn.Module, x: torch.Tensor | Sequence[int] | None = None) -> list[dict[str, Any]]:
    """Per stage of a hybridvit model (`model.stages`, `model.stage_info`), for one eval forward of `x`:
    {'stage': i, 'macs': MACs of the stage (all images of x), 'out_shape': (C, H, W) of its output}."""
    shapes: dict[int, tuple[int, ...]] = {}

    def hook(i: int):
        def fn(_m, _inp, out):
            t = out[0] if isinstance(out, (tuple, list)) else out
            shapes[i] = chw(t.shape, model.stage_info[i]["num_chs"])
        return fn

    handles = [s.register_forward_hook(hook(i)) for i, s in enumerate(model.stages)]
    try:
        prof = profile_macs(model, x)
    finally:
        for h in handles:
            h.remove()
    top = type(model).__name__
    return [{"stage": i, "macs": prof["modules"].get(f"{top}.stages.{i}", 0.0), "out_shape": shapes.get(i)}
            for i in range(len(model.stages))]

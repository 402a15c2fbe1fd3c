"""RandAugment with timm's per-image semantics, batched on the device (kornia's functional ops).

timm's `rand-m9-mstd0.5-inc1` draws, for every image and each of its `n` operation slots, an operation
(uniformly from the increasing-severity set), applies it with probability 0.5, at a magnitude drawn per
image from N(m, mstd) clipped to [0, 10]. kornia's `RandAugment` draws one magnitude per batch; this module
draws everything per image and applies each operation to the images that drew it, in one batched call.

Magnitudes map to arguments as timm's `auto_augment.py` documents them (level / 10 of each range, random sign
for the symmetric ones): rotate 30 degrees, shear 0.3, translate 0.45 of the side, solarize-add
110 / 255 * m / 10 below 0.5; with `inc1`, enhance factors 1 +- 0.9 (at least 0.1), posterize keeping
4 - int(0.4 m) bits, solarize at 1 - m / 10 (see `apply_op` for the original set). Geometric operations fill
with grey (128), as timm does.
"""
from __future__ import annotations

import math

import torch
from torch import nn

OPS = ("auto_contrast", "equalize", "invert", "rotate", "posterize", "solarize", "solarize_add", "color",
       "contrast", "brightness", "sharpness", "shear_x", "shear_y", "translate_x", "translate_y")
FILL = 128 / 255


def parse(spec: str) -> tuple[int, float, float, bool]:
    """timm-style 'rand-m9-mstd0.5-inc1' -> (num_ops n, magnitude m, magnitude std, increasing)."""
    parts = spec.split("-")
    if parts[0] != "rand":
        raise ValueError(f"randaugment must look like 'rand-m9-n2-mstd0.5', got {spec!r}")
    n, m, mstd, inc = 2, 9.0, 0.0, False
    for p in parts[1:]:
        if p.startswith("mstd"):
            mstd = float(p[4:])
        elif p.startswith("mmax") or p.startswith("w"):
            raise ValueError(f"randaugment part {p!r} of {spec!r} is not supported (mmax, weighted choice)")
        elif p.startswith("inc"):
            inc = bool(int(p[3:]))
        elif p.startswith("m"):
            m = float(p[1:])
        elif p.startswith("n"):
            n = int(p[1:])
        else:
            raise ValueError(f"unknown part {p!r} in randaugment {spec!r}")
    return n, m, mstd, inc


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def _blend(a: torch.Tensor, b: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """a + f * (b - a) per image (PIL's ImageEnhance), clipped to [0, 1]."""
    return torch.lerp(a, b, f.view(-1, 1, 1, 1).to(b.dtype)).clamp_(0, 1)


def _affine(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """x moved by the pixel-space affine maps m (B, 3, 3) (input pixel -> output pixel), bilinear, grey
    outside the image."""
    B, C, H, W = x.shape
    # pixel coordinates (align_corners=True) -> normalised [-1, 1]; grid_sample reads output -> input
    to_norm = torch.tensor([[2 / max(W - 1, 1), 0, -1], [0, 2 / max(H - 1, 1), -1], [0, 0, 1]], dtype=x.dtype,
                           device=x.device)
    theta = (to_norm @ torch.linalg.inv(m) @ torch.linalg.inv(to_norm))[:, :2]
    grid = torch.nn.functional.affine_grid(theta, [B, C + 1, H, W], align_corners=True)
    inside = torch.cat([x, torch.ones_like(x[:, :1])], 1)
    out = torch.nn.functional.grid_sample(inside, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return out[:, :C] + (1 - out[:, C:]) * FILL


def _geometric(op: str, x: torch.Tensor, level: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    B, _, H, W = x.shape
    m = torch.eye(3, dtype=x.dtype, device=x.device).repeat(B, 1, 1)
    if op == "rotate":  # about the centre
        a = torch.deg2rad(level * 30 * sign)
        cx, cy = (W - 1) / 2, (H - 1) / 2
        c, s = torch.cos(a), torch.sin(a)
        m[:, 0, 0], m[:, 0, 1], m[:, 1, 0], m[:, 1, 1] = c, -s, s, c
        m[:, 0, 2] = cx - c * cx + s * cy
        m[:, 1, 2] = cy - s * cx - c * cy
    elif op == "shear_x":
        m[:, 0, 1] = level * 0.3 * sign
    elif op == "shear_y":
        m[:, 1, 0] = level * 0.3 * sign
    elif op == "translate_x":
        m[:, 0, 2] = level * 0.45 * sign * W
    else:
        m[:, 1, 2] = level * 0.45 * sign * H
    return _affine(x, m)


def _sharpness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL's ImageEnhance.Sharpness: blend with the image smoothed by [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13,
    border pixels unchanged."""
    k = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]], dtype=x.dtype, device=x.device) / 13
    smooth = torch.nn.functional.conv2d(x, k.expand(x.shape[1], 1, 3, 3), groups=x.shape[1]).clamp_(0, 1)
    degenerate = x.clone()
    degenerate[..., 1:-1, 1:-1] = smooth
    return _blend(degenerate, x, factor)


def apply_op(op: str, x: torch.Tensor, magnitude: torch.Tensor, sign: torch.Tensor,
             increasing: bool = True) -> torch.Tensor:
    """`op` on float images x (B, 3, H, W) in [0, 1], at per-image magnitudes (B,) on timm's 0..10 scale and
    per-image signs (B,) of +-1 for the symmetric operations. `increasing` (timm's `inc1`): posterize,
    solarize and the enhance factors grow more severe with the magnitude; otherwise timm's original
    mappings (posterize keeps int(0.4 m) bits, solarize at m / 10, enhance factors 0.1 + 0.18 m)."""
    import kornia.enhance as KE

    level = magnitude / 10
    if op == "auto_contrast":
        lo = x.amin(dim=(2, 3), keepdim=True)
        hi = x.amax(dim=(2, 3), keepdim=True)
        return torch.where(hi > lo, (x - lo) / (hi - lo).clamp_min(1e-8), x)
    if op == "equalize":
        return KE.equalize(x)
    if op == "invert":
        return 1 - x
    if op in ("rotate", "shear_x", "shear_y", "translate_x", "translate_y"):
        return _geometric(op, x, level, sign)
    if op == "posterize":  # keep the top `bits` bits of each 8-bit value
        bits = ((4 - (level * 4).long()) if increasing else (level * 4).long()).clamp(0, 8)
        step = (2 ** (8 - bits)).to(x.dtype).view(-1, 1, 1, 1)
        return torch.floor(torch.floor(x * 255 + 0.5) / step) * step / 255
    if op == "solarize":
        return KE.solarize(x, ((1 - level) if increasing else level).clamp(0, 1))
    if op == "solarize_add":
        return torch.where(x < 0.5, (x + (110 / 255) * level.view(-1, 1, 1, 1)).clamp(0, 1), x)
    factor = (1 + level * 0.9 * sign).clamp_min(0.1) if increasing else level * 1.8 + 0.1
    if op == "color":
        return _blend(_gray(x).expand_as(x), x, factor)
    if op == "contrast":
        return _blend(_gray(x).mean(dim=(1, 2, 3), keepdim=True).expand_as(x), x, factor)
    if op == "brightness":
        return (x * factor.view(-1, 1, 1, 1).to(x.dtype)).clamp_(0, 1)
    if op == "sharpness":
        return _sharpness(x, factor)
    raise ValueError(f"unknown RandAugment operation {op!r}")


class RandAugment(nn.Module):
    """timm's RandAugment (`rand-mM-nN-mstdS[-inc1]`) with per-image operations and magnitudes, batched.
    Input and output: float (B, 3, H, W) in [0, 1]. `prob`: the chance each drawn operation applies (0.5)."""

    def __init__(self, spec: str, prob: float = 0.5) -> None:
        super().__init__()
        self.spec = spec
        self.n, self.m, self.mstd, self.increasing = parse(spec)
        self.prob = prob

    def magnitudes(self, batch: int, device: torch.device) -> torch.Tensor:
        """Per-image magnitudes: N(m, mstd) clipped to [0, 10] (m itself when mstd is 0)."""
        m = torch.full((batch,), self.m, device=device)
        if self.mstd > 0 and math.isfinite(self.mstd):
            m = m + torch.randn(batch, device=device) * self.mstd
        elif math.isinf(self.mstd):  # timm: mstd=inf draws uniformly from [0, m]
            m = torch.rand(batch, device=device) * self.m
        return m.clamp(0, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        for _ in range(self.n):
            choice = torch.randint(len(OPS), (B,), device=x.device)
            applies = torch.rand(B, device=x.device) < self.prob
            magnitude = self.magnitudes(B, x.device)
            sign = torch.where(torch.rand(B, device=x.device) < 0.5, -1.0, 1.0).to(x.dtype)
            out = x.clone()
            for k, op in enumerate(OPS):
                idx = torch.nonzero(applies & (choice == k)).flatten()
                if idx.numel():
                    out[idx] = apply_op(op, x[idx], magnitude[idx].to(x.dtype), sign[idx], self.increasing)
            x = out
        return x

    def extra_repr(self) -> str:
        return f"{self.spec!r}: n={self.n}, m={self.m}, mstd={self.mstd}, per-image, p={self.prob}"

"""Preprocessing from a model's `pretrained_cfg`.

Split in two: per-image geometry runs on PIL images in the DataLoader workers and yields uint8
tensors of one size (resize + center crop for evaluation, random resized crop for training); the
rest (RandAugment, flip, normalisation, random erasing) runs batched on the device with kornia.
Random choices in the workers come from a generator seeded by (seed, epoch, index), so an epoch's
batches do not depend on the number of workers or on where a resumed run restarted.
"""
from __future__ import annotations

import math
import random
from typing import Any

import torch
from torch import nn

_INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")


def _pil_interpolation(name: str, rng: random.Random | None = None):
    from PIL import Image
    if name == "random":  # timm's train_interpolation='random'
        name = (rng or random).choice(["bilinear", "bicubic"])
    if name not in _INTERPOLATIONS:
        raise ValueError(f"unknown interpolation {name!r}; one of {', '.join(_INTERPOLATIONS)} or 'random'")
    return getattr(Image.Resampling, name.upper())


def pil_to_uint8(img) -> torch.Tensor:
    """PIL RGB image -> (3, H, W) uint8 tensor."""
    w, h = img.size
    return torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(h, w, 3).permute(2, 0, 1).contiguous()


def input_size(cfg: dict[str, Any]) -> int:
    size = cfg["input_size"][-1]
    return int(size)


class EvalTransform:
    """Resize the shorter side to size / crop_pct, center-crop size x size (timm's eval transform)."""

    def __init__(self, size: int, crop_pct: float = 0.875, interpolation: str = "bicubic") -> None:
        self.size, self.crop_pct, self.interpolation = size, crop_pct, interpolation

    @classmethod
    def from_cfg(cls, cfg: dict[str, Any]) -> EvalTransform:
        return cls(input_size(cfg), cfg.get("crop_pct", 0.875), cfg.get("interpolation", "bicubic"))

    def __call__(self, img, index: int = 0, epoch: int = 0) -> torch.Tensor:
        scale = math.floor(self.size / self.crop_pct)
        w, h = img.size
        if w < h:
            nw, nh = scale, max(1, round(h * scale / w))
        else:
            nw, nh = max(1, round(w * scale / h)), scale
        img = img.resize((nw, nh), _pil_interpolation(self.interpolation))
        left, top = (nw - self.size) // 2, (nh - self.size) // 2
        img = img.crop((left, top, left + self.size, top + self.size))
        return pil_to_uint8(img)


class TrainTransform:
    """Random resized crop (area fraction in `scale`, aspect ratio in `ratio`) to size x size."""

    def __init__(self, size: int, scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), interpolation: str = "bicubic", seed: int = 0) -> None:
        self.size, self.scale, self.ratio = size, tuple(scale), tuple(ratio)
        self.interpolation, self.seed = interpolation, seed

    def crop_box(self, w: int, h: int, rng: random.Random) -> tuple[int, int, int, int]:
        area = w * h
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < cw <= w and 0 < ch <= h:
                left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
                return left, top, left + cw, top + ch
        # fallback: central crop with the ratio clamped into range
        r = w / h
        if r < self.ratio[0]:
            cw, ch = w, round(w / self.ratio[0])
        elif r > self.ratio[1]:
            cw, ch = round(h * self.ratio[1]), h
        else:
            cw, ch = w, h
        left, top = (w - cw) // 2, (h - ch) // 2
        return left, top, left + cw, top + ch

    def __call__(self, img, index: int = 0, epoch: int = 0) -> torch.Tensor:
        rng = random.Random(f"{self.seed}-{epoch}-{index}")
        box = self.crop_box(*img.size, rng)
        img = img.resize((self.size, self.size), _pil_interpolation(self.interpolation, rng), box=box)
        return pil_to_uint8(img)


def parse_randaugment(spec: str) -> tuple[int, int]:
    """timm-style 'rand-m9-mstd0.5-inc1' -> (num_ops, magnitude on timm's 0..10 scale).

    kornia's RandAugment has a fixed magnitude per call: the `mstd`/`inc` parts are not applied.
    """
    parts = spec.split("-")
    if parts[0] != "rand":
        raise ValueError(f"randaugment must look like 'rand-m9-n2', got {spec!r}")
    n, m = 2, 9
    for p in parts[1:]:
        if p.startswith("mstd") or p.startswith("inc") or p.startswith("mmax") or p.startswith("w"):
            continue
        if p.startswith("m"):
            m = int(p[1:])
        elif p.startswith("n"):
            n = int(p[1:])
        else:
            raise ValueError(f"unknown part {p!r} in randaugment {spec!r}")
    return n, m


class Normalize(nn.Module):
    """uint8 (B, 3, H, W) -> float, (x / 255 - mean) / std."""

    def __init__(self, mean, std) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1) * 255, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) / self.std


class DeviceAugment(nn.Module):
    """Batched training augmentation on the device: RandAugment, horizontal flip, normalisation and
    random erasing (kornia). Input uint8 (B, 3, H, W), output normalised float (B, 3, H, W)."""

    def __init__(self, mean, std, randaugment: str | None = None, hflip: float = 0.5,
                 reprob: float = 0.0) -> None:
        super().__init__()
        import kornia.augmentation as K

        self.randaugment = None
        if randaugment:
            from kornia.augmentation.auto import RandAugment
            n, m = parse_randaugment(randaugment)
            # timm's magnitude scale is 0..10, kornia's 0..30 (exclusive)
            self.randaugment = RandAugment(n=n, m=min(29, max(1, round(m * 3))))
        self.flip = K.RandomHorizontalFlip(p=hflip) if hflip > 0 else None
        self.norm = Normalize(mean, std)
        self.erase = K.RandomErasing(p=reprob, scale=(0.02, 1 / 3), ratio=(0.3, 3.3)) if reprob > 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.randaugment is not None:
            x = (self.randaugment(x.float() / 255) * 255).clamp(0, 255)
        if self.flip is not None:
            x = self.flip(x.float())
        x = self.norm(x)
        if self.erase is not None:
            x = self.erase(x)
        return x

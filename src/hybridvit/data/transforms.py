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

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the default normalisation of every published variant
IMAGENET_STD = (0.229, 0.224, 0.225)
# the values a pretrained_cfg may hold (the one list: models/_schema.py checks files against it)
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")
CROP_MODES = ("center", "squash", "border")


def _pil_interpolation(name: str, rng: random.Random | None = None):
    from PIL import Image
    if name == "random":  # timm's train_interpolation='random'
        name = (rng or random).choice(["bilinear", "bicubic"])
    if name not in INTERPOLATIONS:
        raise ValueError(f"unknown interpolation {name!r}; one of {', '.join(INTERPOLATIONS)} or 'random'")
    return getattr(Image.Resampling, name.upper())


def pil_to_uint8(img) -> torch.Tensor:
    """PIL RGB image -> (3, H, W) uint8 tensor."""
    w, h = img.size
    return torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(h, w, 3).permute(2, 0, 1).contiguous()


def input_size(cfg: dict[str, Any]) -> int:
    """The square side of `cfg`'s input_size (training and the digits take square crops)."""
    size = cfg["input_size"][-1]
    return int(size)


class EvalTransform:
    """timm's evaluation geometry: `crop_mode` 'center' resizes the shorter side to size / crop_pct and
    center-crops; 'squash' resizes both sides to size / crop_pct (aspect not kept), then center-crops;
    'border' fits the longer side into size / crop_pct and center-crops or pads with the mean colour.
    `size` is one side or (H, W). PIL image in, (3, H, W) uint8 tensor out."""

    def __init__(self, size: int | tuple[int, int], crop_pct: float = 0.875, interpolation: str = "bicubic",
                 crop_mode: str = "center", fill: tuple[int, int, int] = (0, 0, 0)) -> None:
        self.hw = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        self.size = self.hw[1]
        self.crop_pct, self.interpolation, self.crop_mode, self.fill = crop_pct, interpolation, crop_mode, fill
        if crop_mode not in CROP_MODES:
            raise ValueError(f"unknown crop_mode {crop_mode!r}; one of {', '.join(CROP_MODES)}")

    @classmethod
    def from_cfg(cls, cfg: dict[str, Any]) -> EvalTransform:
        return Preprocess.from_cfg(cfg).geometry

    def __call__(self, img, index: int = 0, epoch: int = 0) -> torch.Tensor:
        from PIL import Image

        th, tw = self.hw
        sh, sw = (math.floor(v / self.crop_pct) for v in self.hw)
        w, h = img.size
        if self.crop_mode == "squash":
            nw, nh = sw, sh
        elif self.crop_mode == "border":
            k = min(sw / w, sh / h)
            nw, nh = max(1, round(w * k)), max(1, round(h * k))
        elif w / h < sw / sh:  # center: the shorter side (relative to the target) fills the scale size
            nw, nh = sw, max(1, round(h * sw / w))
        else:
            nw, nh = max(1, round(w * sh / h)), sh
        img = img.resize((nw, nh), _pil_interpolation(self.interpolation))
        left, top = (nw - tw) // 2, (nh - th) // 2
        if left < 0 or top < 0:  # border mode: pad to the target with the fill colour
            canvas = Image.new("RGB", (max(nw, tw), max(nh, th)), self.fill)
            canvas.paste(img, (max(0, -left), max(0, -top)))
            img, left, top = canvas, max(0, left), max(0, top)
        img = img.crop((left, top, left + tw, top + th))
        return pil_to_uint8(img)


class Preprocess:
    """The one preprocessing of a model, built from its `pretrained_cfg` (like timm's `resolve_data_config`
    + `create_transform`, or an HF image processor): `geometry` (PIL -> uint8 (3, H, W), in the loader
    workers), `normalize` (uint8 or float (B, 3, H, W) on any device -> normalised float), and `__call__`
    for one image. evaluate, predict, analyze, the detection adapter and exported files all use it."""

    def __init__(self, size: tuple[int, int], crop_pct: float, crop_mode: str, interpolation: str,
                 mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.size, self.crop_pct, self.crop_mode = (int(size[0]), int(size[1])), float(crop_pct), crop_mode
        self.interpolation, self.mean, self.std = interpolation, tuple(mean), tuple(std)
        fill = tuple(round(255 * v) for v in (self.mean * 3)[:3])
        self.geometry = EvalTransform(self.size, self.crop_pct, interpolation, crop_mode, fill)
        self.normalize = Normalize(self.mean, self.std)

    @classmethod
    def from_cfg(cls, cfg: dict[str, Any]) -> Preprocess:
        return cls(tuple(cfg.get("input_size", (3, 224, 224))[-2:]), cfg.get("crop_pct", 0.875),
                   cfg.get("crop_mode") or "center", cfg.get("interpolation", "bicubic"),
                   cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD))

    def __call__(self, img) -> torch.Tensor:
        """One PIL image -> normalised float (3, H, W)."""
        return self.normalize(self.geometry(img)[None])[0]

    def to_dict(self) -> dict[str, Any]:
        """The preprocessing as data (stored in exported files): input size, crop, interpolation, mean, std."""
        return {"input_size": [3, *self.size], "crop_pct": self.crop_pct, "crop_mode": self.crop_mode,
                "interpolation": self.interpolation, "mean": list(self.mean), "std": list(self.std)}


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


class Normalize(nn.Module):
    """uint8 (B, 3, H, W) -> float, (x / 255 - mean) / std."""

    def __init__(self, mean, std) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1) * 255, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) / self.std


class DeviceAugment(nn.Module):
    """Batched training augmentation on the device: RandAugment (timm's, per image: `data.randaugment`),
    horizontal flip, normalisation and random erasing (kornia). Input uint8 (B, 3, H, W), output normalised
    float (B, 3, H, W)."""

    def __init__(self, mean, std, randaugment: str | None = None, hflip: float = 0.5,
                 reprob: float = 0.0) -> None:
        super().__init__()
        import kornia.augmentation as K

        self.randaugment = None
        if randaugment:
            from .randaugment import RandAugment
            self.randaugment = RandAugment(randaugment)  # timm's per-image operations and magnitudes
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

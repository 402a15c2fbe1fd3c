"""The embedded default dataset: scikit-learn's handwritten digits (1797 real 8x8 scans, 10 classes),
upscaled to RGB images, with a fixed train/val split (every 5th image of the set is validation)."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.data import Dataset

DIGITS_NAME = "digits"
DIGITS_SIZE = 32  # side of the upscaled images


class DigitsDataset(Dataset):
    """split 'train' (1437 images) or 'val' (360 images); items are PIL RGB images through `transform`."""

    def __init__(self, split: str = "train", transform: Callable | None = None, size: int = DIGITS_SIZE) -> None:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        from sklearn.datasets import load_digits

        d = load_digits()
        keep = [i for i in range(len(d.target)) if (i % 5 == 0) == (split == "val")]
        images = torch.from_numpy(d.images[keep]).float()[:, None] * (255.0 / 16.0)
        # bilinear upscaling of the 8x8 scans gives smooth strokes, like a photographed digit
        up = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
        self.pixels = up.clamp(0, 255).round().to(torch.uint8)[:, 0].numpy()
        self.targets = [int(t) for t in d.target[keep]]
        self.classes = [str(c) for c in range(10)]
        self.transform = transform
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.targets)

    def load(self, index: int):
        from PIL import Image
        return Image.fromarray(self.pixels[index], mode="L").convert("RGB")

    def __getitem__(self, index: int):
        img = self.load(index)
        if self.transform is not None:
            img = self.transform(img, index=index, epoch=self.epoch)
        return img, self.targets[index]

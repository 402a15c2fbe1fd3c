"""Tiny image folders for the data/train tests (real PNG/JPEG files written with PIL)."""
from __future__ import annotations

import random
from pathlib import Path

COLORS = {"blue": (30, 60, 220), "red": (220, 40, 30)}


def make_folder(root: Path, n_train: int = 16, n_val: int = 8, size: int = 24, ext: str = "png") -> Path:
    """ROOT/{train,val}/{blue,red}/*.<ext>: noisy images of a dominant color, easy to learn."""
    from PIL import Image

    rng = random.Random(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for name, (r, g, b) in COLORS.items():
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = Image.new("RGB", (size + rng.randint(0, 8), size))
                px = img.load()
                for y in range(img.size[1]):
                    for x in range(img.size[0]):
                        j = rng.randint(-40, 40)
                        px[x, y] = (max(0, min(255, r + j)), max(0, min(255, g + j)), max(0, min(255, b + j)))
                img.save(d / f"{i:03d}.{ext}")
    return root


def corrupt_jpeg(path: Path) -> Path:
    """A truncated JPEG: the header survives, the scan data does not."""
    from PIL import Image

    img = Image.new("RGB", (32, 32), (200, 10, 10))
    img.save(path, quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    return path

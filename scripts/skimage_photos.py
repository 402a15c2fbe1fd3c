"""A small folder of real photographs for the README's "Your data" walk-through.

Cuts four of scikit-image's sample photographs (astronaut, coffee, chelsea the cat, rocket) into
64x64 crops, one class per photograph, in the ImageNet layout ROOT/{train,val}/<class>/*.png.
Validation crops come from the right 30% of each photograph and training crops from the left 70%,
so no validation pixel is ever seen in training.

    pip install scikit-image pillow
    python scripts/skimage_photos.py ROOT [--train 80 --val 25]
"""
from __future__ import annotations

import argparse
import random
from pathlib import Path

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


def main() -> None:
    import skimage.data
    from PIL import Image

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root")
    p.add_argument("--train", type=int, default=80, help="training crops per class")
    p.add_argument("--val", type=int, default=25, help="validation crops per class")
    p.add_argument("--size", type=int, default=64, help="side of the saved crops")
    a = p.parse_args()
    rng = random.Random(0)
    for name in PHOTOS:
        img = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        w, h = img.size
        split_x = int(0.7 * w)
        for split, n, (x0, x1) in (("train", a.train, (0, split_x)), ("val", a.val, (split_x, w))):
            out = Path(a.root) / split / name
            out.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                side = rng.randint(64, min(128, x1 - x0, h))  # crops of 64-128 px, resized to --size
                x, y = rng.randint(x0, x1 - side), rng.randint(0, h - side)
                img.crop((x, y, x + side, y + side)).resize((a.size, a.size), Image.BICUBIC).save(
                    out / f"{i:03d}.png")
    print(f"wrote {len(PHOTOS)} classes x ({a.train} train + {a.val} val) crops to {a.root}")


if __name__ == "__main__":
    main()

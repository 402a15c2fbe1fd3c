"""The one image decoder: a file (or PIL image) of any PIL mode -> 8-bit RGB, mapped by value.

Training, `eval`, `predict` and `analyze` all read images through `decode_image`, so a picture gets
the same pixels whatever command reads it and however it is stored:

- EXIF orientation is applied first (a phone's portrait photo stands upright);
- 1, L, P (palette), RGB, YCbCr, LAB, HSV and CMYK convert with PIL's colour conversions;
- 16- and 32-bit grayscale (I;16*, I) and float (F) are scaled by the range their values can take:
  0..65535 for 16-bit files (I;16 and I holding 16-bit PNG data alike), 0..255 for I data that
  fits in 8 bits, 0..1 for float data that does (else the image's own min..max): a mid-gray 16-bit
  image stays mid-gray instead of clipping to white, as `convert('RGB')` does;
- transparency (LA, RGBA, PA, palette or RGB images with a transparent colour) is composited over
  white (`BACKGROUND`): what a viewer shows. Images with no transparent pixel are unchanged.
"""
from __future__ import annotations

import os
from typing import Any

BACKGROUND = (255, 255, 255)


def _scale_to_8bit(img: Any) -> Any:
    """A single-channel image of 16/32-bit integers or floats -> mode L, by value."""
    import numpy as np
    from PIL import Image

    a = np.asarray(img)
    if a.dtype.kind == "f":
        a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = (0.0, 1.0) if a.size == 0 or (a.min() >= 0 and a.max() <= 1) else (float(a.min()), float(a.max()))
    else:
        a = a.astype(np.int64)
        lo_v, hi_v = (int(a.min()), int(a.max())) if a.size else (0, 0)
        if img.mode.startswith("I;16"):
            lo, hi = 0.0, 65535.0
        elif 0 <= lo_v and hi_v <= 255:
            lo, hi = 0.0, 255.0
        elif 0 <= lo_v and hi_v <= 65535:  # 16-bit data PIL opened as I (16-bit PNG, TIFF)
            lo, hi = 0.0, 65535.0
        else:
            lo, hi = float(lo_v), float(hi_v)
    scaled = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a, dtype=np.float64)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")


def to_rgb(img: Any) -> Any:
    """A PIL image of any mode -> mode RGB (8 bits per channel) by value; see the module docstring."""
    from PIL import Image, ImageOps

    img = ImageOps.exif_transpose(img) or img
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I", "F") or mode.startswith("I;16"):
        return _scale_to_8bit(img).convert("RGB")
    if mode == "P" or (mode in ("L", "RGB", "1") and "transparency" in img.info):
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("LA", "PA", "La", "RGBa", "RGBA"):
        rgba = img.convert("RGBA")
        if rgba.getextrema()[3][0] == 255:  # fully opaque: nothing to composite
            return rgba.convert("RGB")
        background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # 1, L, CMYK, YCbCr, LAB, HSV, RGBX


def decode_image(path: str | os.PathLike) -> Any:
    """The image file at `path` as an 8-bit RGB PIL image, fully decoded now (a truncated file fails
    here, not later). PIL's errors for broken files (OSError, SyntaxError, ValueError...) propagate."""
    from PIL import Image

    with Image.open(path) as img:
        img.load()
        return to_rgb(img)

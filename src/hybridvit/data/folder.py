"""Image folders in the ImageNet layout: ROOT/<split>/<class>/<image>."""
from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import Dataset

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif")
log = logging.getLogger("hybridvit.data")


class DataError(ValueError):
    """A dataset that cannot be used (missing or empty folder, corrupt image with --strict-data)."""


def image_files(folder: str | os.PathLike) -> list[str]:
    """The image files under `folder`, searched recursively by extension (IMAGE_EXTENSIONS), sorted: the one
    rule every command uses to find images in a folder."""
    return sorted(str(p) for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def find_images(sources: list[str]) -> list[str]:
    """The image files named by `sources`: files as given (whatever their extension), folders searched
    recursively for image extensions (sorted). A source that does not exist, or a folder without images,
    is a FileNotFoundError naming it."""
    files: list[str] = []
    for src in sources:
        p = Path(src)
        if p.is_dir():
            found = image_files(p)
            if not found:
                raise FileNotFoundError(f"folder {src} holds no image ({', '.join(IMAGE_EXTENSIONS)})")
            files += found
        elif p.is_file():
            files.append(src)
        else:
            raise FileNotFoundError(f"{src} does not exist: pass image files or folders")
    return files


def read_image(path: str, transform) -> torch.Tensor:
    """The image at `path` through `transform` (e.g. the eval geometry: uint8 (3, H, W)); a DataError naming
    the file when it cannot be decoded."""
    from PIL import Image  # noqa: F401  (a missing pillow is an install error, not an unreadable file)

    from .decode import decode_image

    try:
        return transform(decode_image(path))
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for broken files
        raise DataError(f"cannot read image {path}: {e}") from e


def find_classes(folder: str | os.PathLike) -> list[str]:
    """Sorted class sub-folder names of `folder`; a clear error when it is missing or holds none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"image folder {str(folder)!r} does not exist (expected the ImageNet layout "
                        "ROOT/train/<class>/*.jpg and ROOT/val/<class>/*.jpg)")
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DataError(f"image folder {str(folder)!r} has no class sub-folders (expected <class>/*.jpg)")
    return classes


class ImageFolder(Dataset):
    """Images of `root/<class>/*` with integer labels (classes in sorted order, or `classes` given).

    Decoding happens in `__getitem__`, i.e. in the DataLoader workers. A file that cannot be decoded
    is skipped: the dataset returns None for it (dropped by `collate_skip`) and the path is recorded
    in `self.bad` of the worker; with `strict=True` it raises a DataError naming the file.
    """

    def __init__(self, root: str | os.PathLike, transform: Callable | None = None,
                 classes: list[str] | None = None, strict: bool = False) -> None:
        self.root = Path(root)
        self.classes = classes if classes is not None else find_classes(self.root)
        self.transform = transform
        self.strict = strict
        self.samples: list[tuple[str, int]] = []
        empty = []
        for label, name in enumerate(self.classes):
            d = self.root / name
            if not d.is_dir():
                raise DataError(f"class folder {str(d)!r} is missing (classes must match those of the "
                                "training split)")
            files = image_files(d)
            if not files:
                empty.append(str(d))
            self.samples += [(f, label) for f in files]
        if empty:
            raise DataError(f"{len(empty)} class folder(s) hold no images ({', '.join(IMAGE_EXTENSIONS)}): "
                            + ", ".join(empty[:10]))
        self.targets = [t for _, t in self.samples]
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int):
        from .decode import decode_image
        return decode_image(self.samples[index][0])

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        try:
            img = self.load(index)
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for broken files
            if self.strict:
                raise DataError(f"cannot decode image {path}: {e} (drop --strict-data to skip such files)") from e
            log.warning("skipping unreadable image %s: %s", path, e)
            return None, path
        if self.transform is not None:
            img = self.transform(img, index=index, epoch=self.epoch)
        return img, target


def collate_skip(batch: list) -> dict:
    """Stacks (image, label) pairs, dropping the unreadable ones (their paths go to `bad`)."""
    good = [b for b in batch if b[0] is not None]
    bad = [b[1] for b in batch if b[0] is None]
    if good:
        images = torch.stack([b[0] for b in good])
        targets = torch.tensor([b[1] for b in good], dtype=torch.long)
    else:
        images, targets = torch.empty(0), torch.empty(0, dtype=torch.long)
    return {"images": images, "targets": targets, "bad": bad}

"""Datasets by name or folder, and the sampler/loader used by training and evaluation."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Sampler

from .digits import DIGITS_NAME, DigitsDataset
from .folder import DataError, ImageFolder, collate_skip, find_classes


def is_digits(data: str | None) -> bool:
    return data in (None, "", DIGITS_NAME)


def build_dataset(data: str, split: str, transform: Callable | None, classes: list[str] | None = None,
                  strict: bool = False):
    """`data` is 'digits' (the embedded set) or an ImageNet-layout ROOT; `split` a sub-folder of ROOT.

    A missing or empty folder raises DataError naming it, before any training starts.
    """
    if is_digits(data):
        return DigitsDataset("val" if split in ("val", "validation", "test") else "train", transform)
    root = Path(data)
    if not root.is_dir():
        raise DataError(f"dataset folder {str(root)!r} does not exist")
    folder = root / split
    if not folder.is_dir():
        # a ROOT that is itself the class folder tree (eval on a single split)
        subdirs = find_classes(root)
        if split in ("val", "validation") and not any((root / s).is_dir() for s in ("train", "val")) and subdirs:
            folder = root
        else:
            raise DataError(f"split folder {str(folder)!r} does not exist (expected ROOT/{split}/<class>/*)")
    return ImageFolder(folder, transform, classes=classes or find_classes(folder), strict=strict)


class EpochSampler(Sampler[int]):
    """The indices one rank reads in one epoch: a permutation seeded by (seed, epoch), padded to a
    multiple of the world size (training) or not (evaluation, so that metrics count every image
    once), every `world_size`-th from `rank`, and the first `start` skipped (exact resume)."""

    def __init__(self, n: int, shuffle: bool, seed: int = 0, rank: int = 0, world_size: int = 1,
                 pad: bool = True) -> None:
        self.n, self.shuffle, self.seed = n, shuffle, seed
        self.rank, self.world_size, self.pad = rank, world_size, pad
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        if self.pad and self.n % self.world_size:
            extra = self.world_size - self.n % self.world_size
            order += order[:extra]
        return order[self.rank::self.world_size][self.start:]

    def __iter__(self):
        return iter(self.indices())

    def __len__(self) -> int:
        return len(self.indices())


def make_loader(dataset, sampler: EpochSampler, batch_size: int, workers: int, drop_last: bool,
                pin_memory: bool = False) -> DataLoader:
    # an own generator: creating the iterator must not consume torch's global random state,
    # which the training loop saves in checkpoints and restores on resume
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      collate_fn=collate_skip, drop_last=drop_last, pin_memory=pin_memory,
                      generator=torch.Generator().manual_seed(0), persistent_workers=False)

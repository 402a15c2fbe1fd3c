"""Datasets by name or folder, and the sampler/loader used by training and evaluation."""
from __future__ import annotations

import atexit
import signal
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

from .digits import DIGITS_NAME, DigitsDataset
from .folder import DataError, ImageFolder, collate_skip, find_classes


def is_digits(data: str | None) -> bool:
    return data in (None, "", DIGITS_NAME)


def split_folder(data: str, split: str) -> Path:
    """The class-folder tree of `split`: DATA/SPLIT, or DATA itself when it is a single class-folder
    tree (no train/ or val/ inside) and `split` is a validation split. It may not exist."""
    root = Path(data)
    folder = root / split
    if (not folder.is_dir() and split in ("val", "validation") and root.is_dir()
            and not any((root / s).is_dir() for s in ("train", "val"))):
        return root
    return folder


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
    folder = split_folder(data, split)
    if folder == root:
        find_classes(root)  # a clear error when it holds no class folders
    elif not folder.is_dir():
        raise DataError(f"split folder {str(folder)!r} does not exist (expected ROOT/{split}/<class>/*)")
    return ImageFolder(folder, transform, classes=classes or find_classes(folder), strict=strict)


def first_readable(ds) -> tuple[int | None, list[str], str]:
    """Index of the first image of `ds` (an ImageFolder) that decodes, the unreadable ones before it,
    and the first one's decoding error ('' when the first image decodes)."""
    bad, reason = [], ""
    for i, (path, _) in enumerate(ds.samples):
        try:
            ds.load(i)
            return i, bad, reason
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for broken files
            bad.append(path)
            reason = reason or f"{type(e).__name__}: {e}"
    return None, bad, reason


def check_training_data(data: str, train_split: str, val_split: str, strict: bool = False) -> list[str]:
    """The class names of a training run, after the checks that would otherwise give a wrong answer
    that exits 0; each failure is a DataError with what to do:
    - fewer than 2 class folders in the training split (a classifier of one class learns nothing);
    - validation class folders that training does not have (their images could never be right);
    - no readable image in the validation split (it would score 0 %) or the training split.
    A missing or empty folder fails here too (`build_dataset`)."""
    train = build_dataset(data, train_split, None, strict=strict)
    if is_digits(data):
        return list(train.classes)
    train_dir, val_dir = split_folder(data, train_split), split_folder(data, val_split)
    if len(train.classes) < 2:
        found = f"only {train.classes[0]!r}" if train.classes else "none"
        raise DataError(f"{train_dir} has {len(train.classes)} class folder ({found}): a classifier needs at "
                        "least 2 classes; put the images of each class in its own folder, "
                        f"{train_dir}/<class>/*.jpg")
    unknown = [c for c in find_classes(val_dir)] if val_dir.is_dir() else []
    unknown = [c for c in unknown if c not in set(train.classes)]
    if unknown:
        raise DataError(f"{val_dir} has class folder(s) that {train_dir} does not have: "
                        f"{', '.join(unknown[:10])}{' ...' if len(unknown) > 10 else ''}; the model could never "
                        f"predict them. Training classes: {', '.join(train.classes[:20])}"
                        f"{' ...' if len(train.classes) > 20 else ''}. Rename or remove those folders")
    val = build_dataset(data, val_split, None, classes=list(train.classes), strict=strict)
    for ds, folder, what in ((val, val_dir, "validation would score 0 %"), (train, train_dir, "nothing to learn")):
        index, bad, reason = first_readable(ds)
        if index is None:
            raise DataError(f"no image of {folder} can be read ({what}): all {len(bad)} files fail to decode, "
                            f"e.g. {bad[0]} ({reason}). Replace them with readable images (open them with PIL)")
    return list(train.classes)


def data_folders(data: str, train_split: str, val_split: str) -> dict[str, str | None]:
    """`train_folder` and `val_folder` of a run as absolute paths (None for the embedded digits): what a run
    checkpoint records so that later commands find the run's data from any working directory."""
    if is_digits(data):
        return {"train_folder": None, "val_folder": None}
    return {"train_folder": str(split_folder(data, train_split).resolve()),
            "val_folder": str(split_folder(data, val_split).resolve())}


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


_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def ignore_stop_signals(worker_id: int = 0) -> None:
    """A loader worker ignores SIGINT and SIGTERM: a terminal's Ctrl-C, `timeout`, SLURM and Kubernetes
    signal the whole process group, and workers that died of it would break the main process's save.
    The main process alone decides to stop; its workers end with it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # blocked since the fork (see _Loader): ignored now, a signal pending from before is discarded
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)


# the iterators whose worker processes may still run
_LIVE_ITERATORS: weakref.WeakSet = weakref.WeakSet()


class _Loader(DataLoader):
    def __iter__(self):
        if self.num_workers == 0:
            return super().__iter__()
        # workers are forked with SIGINT/SIGTERM blocked: torch's worker installs its own SIGTERM handler
        # (which dies of a signal that is not its parent's) before our worker_init_fn ignores the signals,
        # and a group signal landing in that window would kill a worker at the start of an epoch or a
        # validation. Blocked, it waits; the main process gets its own copy as soon as this returns.
        old = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            it = super().__iter__()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        _LIVE_ITERATORS.add(it)
        return it


def end_workers(it) -> None:
    """Asks the workers of loader iterator `it` to finish, the way a finished epoch does (nothing without
    workers, or when they have finished)."""
    shutdown = getattr(it, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


def stop_workers() -> None:
    """Ends the workers of every loader iterator still alive (an epoch that a signal interrupted, whose
    iterator the traceback kept). Workers ignore SIGTERM, so multiprocessing's exit handler, which ends
    them with SIGTERM and then waits, would wait forever; this runs before it (atexit is last-in first-out)
    and asks them to finish the way a finished epoch does."""
    for it in list(_LIVE_ITERATORS):
        end_workers(it)


atexit.register(stop_workers)


def make_loader(dataset, sampler: EpochSampler, batch_size: int, workers: int, drop_last: bool,
                pin_memory: bool = False, collate: Callable[[list], Any] = collate_skip) -> DataLoader:
    # an own generator: creating the iterator must not consume torch's global random state,
    # which the training loop saves in checkpoints and restores on resume
    return _Loader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      collate_fn=collate, drop_last=drop_last, pin_memory=pin_memory,
                      generator=torch.Generator().manual_seed(0), persistent_workers=False,
                      worker_init_fn=ignore_stop_signals if workers > 0 else None)

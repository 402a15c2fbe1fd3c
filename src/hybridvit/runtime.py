"""Where a command runs: the device it asked for, and how many CPU threads it may use.

`resolve_device` is the one place that turns `--device` into a torch.device (with advice when CUDA
is asked for but absent); `plan_threads` is the one place that splits the CPUs between torch's
intra-op threads and data-loader workers, so that the two never oversubscribe the machine (on a
shared 2-core machine, 2 intra-op threads + 2 decoding workers ran 6x slower than 1 + 1).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch

# commands that read image files through a DataLoader; the others only compute
LOADING_COMMANDS = ("train", "eval", "predict")
COMPUTE_COMMANDS = ("bench", "export", "analyze")


def resolve_device(pref: str | None = "auto", local_rank: int = 0) -> torch.device:
    """`auto` (CUDA when available, else CPU), `cpu`, `cuda` or `cuda:N` as a torch.device.

    Raises ValueError saying what to do when CUDA is asked for and absent, or the index is out of range.
    """
    pref = (pref or "auto").strip().lower()
    if pref == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(pref)
    except RuntimeError as e:
        raise ValueError(f"unknown device {pref!r}: use auto, cpu, cuda or cuda:N") from e
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ValueError(f"device {pref!r} is not supported: use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise ValueError(f"--device {pref} asked for CUDA, but no CUDA device is available (PyTorch "
                         f"{torch.__version__}, {build}); use --device cpu, or install a CUDA build of PyTorch "
                         "on a machine with an NVIDIA GPU")
    index = local_rank if device.index is None else device.index
    if index >= torch.cuda.device_count():
        raise ValueError(f"--device {pref}: only {torch.cuda.device_count()} CUDA device(s) visible "
                         "(CUDA_VISIBLE_DEVICES); pick an index below that")
    return torch.device("cuda", index)


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask: taskset, cgroups/containers), not the machine's."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
MALLOC_SETTINGS = {  # what keep_freed_memory sets, in bytes
    "mmap_threshold": 32 << 20,  # glibc's largest: buffers up to 32 MiB come from the heap, not a fresh mmap
    "trim_threshold": 1 << 30,  # freed heap memory up to 1 GiB stays in the process for the next call
    "top_pad": 64 << 20,  # the heap grows in steps of 64 MiB
}


def keep_freed_memory() -> bool:
    """Makes glibc's malloc keep the memory of freed buffers in the process for the next forward pass;
    returns whether it applied (Linux with glibc; elsewhere nothing changes).

    A forward pass allocates and frees the same large buffers on every call. By default glibc serves each
    buffer above a moving threshold with a fresh mmap and trims the heap once the freed memory at its top
    passes twice that threshold, so a call pays the page faults of touching new memory again (four 24 MB
    buffers: about 24 000 faults per call, none with these settings; tests/test_runtime.py). With
    `MALLOC_SETTINGS` buffers up to 32 MiB come from the heap and the heap keeps up to 1 GiB of freed
    memory; larger buffers are still mapped per call (32 MiB is glibc's limit). The cost: the process's
    memory stays near its peak between calls instead of shrinking.

    The inference commands (eval, predict, bench, export, analyze; not train, not measured there) call it
    through `ThreadPlan.apply`; `HYBRIDVIT_KEEP_MEMORY=0` turns it off. Like glibc's `MALLOC_*_`
    environment variables it is process-wide. Measured on whole models (benchmarks/malloc_settings.py):
    1.07-1.15x for FasterViT and CabViT, eager and compiled, bf16 and fp32, and CrossFormer++ fp32; 0.97x
    / 0.93x for CrossFormer++ bf16 eager / compiled."""
    if os.environ.get("HYBRIDVIT_KEEP_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 (glibc only: musl's mallopt ignores these)
    except (OSError, AttributeError):
        return False
    return all(libc.mallopt(k, MALLOC_SETTINGS[name]) == 1 for k, name in
               ((_M_MMAP_THRESHOLD, "mmap_threshold"), (_M_TRIM_THRESHOLD, "trim_threshold"),
                (_M_TOP_PAD, "top_pad")))


@dataclass(frozen=True)
class ThreadPlan:
    """torch intra-op threads and DataLoader workers of one process; threads + workers <= cpus."""

    threads: int
    workers: int
    cpus: int
    keep_memory: bool = False  # inference commands: `keep_freed_memory`

    def apply(self) -> None:
        """Sets torch's threads, and for the inference commands `keep_freed_memory`."""
        torch.set_num_threads(self.threads)
        if self.keep_memory:
            keep_freed_memory()

    def describe(self) -> str:
        w = f"{self.workers} loader worker{'s' if self.workers != 1 else ''}"
        return f"{self.threads} thread{'s' if self.threads != 1 else ''} + {w} on {self.cpus} CPUs"


def plan_threads(command: str, *, device: torch.device | str = "cpu", threads: int | None = None,
                 workers: int | None = None, in_memory: bool = False, processes: int = 1,
                 cpus: int | None = None) -> ThreadPlan:
    """torch threads and loader workers for `command` (train, eval, predict, bench, export, analyze).

    Explicit `threads`/`workers` (the command line) are kept; what is left is planned from the CPUs of
    this process divided among `processes` (ranks on one node). Compute-only commands and in-memory
    data (the embedded digits) get no workers. On CPU, loading commands give decoding roughly one CPU in
    four (at least one worker when there are two CPUs, at most four) and the rest to torch; on CUDA the
    CPU mostly decodes, so workers get all but one CPU (at most 8) and torch one thread.
    """
    if command not in LOADING_COMMANDS + COMPUTE_COMMANDS:
        raise ValueError(f"unknown command {command!r}: one of {', '.join(LOADING_COMMANDS + COMPUTE_COMMANDS)}")
    for name, v in (("threads", threads), ("workers", workers)):
        if v is not None and v < (1 if name == "threads" else 0):
            raise ValueError(f"--{name} must be {'at least 1' if name == 'threads' else '0 or more'}, got {v}")
    total = cpus if cpus is not None else available_cpus()
    cpus = max(1, total // max(1, processes))
    dev = torch.device(device) if isinstance(device, str) else device
    loads = command in LOADING_COMMANDS and not in_memory
    if workers is None:
        if not loads:
            workers = 0
        elif threads is not None:
            workers = max(0, min(4 if dev.type == "cpu" else 8, cpus - threads))
        elif dev.type == "cuda":
            workers = max(0, min(8, cpus - 1))
        else:  # one CPU: decoding in the main process, between steps
            workers = 0 if cpus < 2 else max(1, min(4, cpus // 4))
    if threads is None:
        threads = 1 if dev.type == "cuda" and loads else max(1, cpus - workers)
    return ThreadPlan(threads, workers, cpus, keep_memory=command != "train")


def min_img_size(model_name: str) -> int:
    """The smallest input side `model_name` accepts: its pretrained_cfg's `min_input_size` (timm's field,
    (C, H, W)), which every registry entry has from its model class's `min_input_size`."""
    from .registry import get_entry

    return int(min(get_entry(model_name).pretrained_cfg["min_input_size"][-2:]))


def check_img_size(model_name: str, size: int | list[int] | tuple[int, ...] | None,
                   flag: str = "--img-size") -> None:
    """ValueError naming the minimum when `size` (a side, or H [W]) is below what `model_name` accepts;
    called by every command before it builds data, folders or models. None: the model's own size."""
    if size is None:
        return
    sides = [int(s) for s in (size if isinstance(size, (list, tuple)) else [size])]
    if any(s < 1 for s in sides):
        raise ValueError(f"{flag} must be at least 1, got {' '.join(map(str, sides))}")
    low = min_img_size(model_name)
    if min(sides) < low:
        raise ValueError(f"{flag} {' '.join(map(str, sides))} is too small for {model_name}: it needs images of "
                         f"at least {low}x{low} pixels; pass {flag} {low} or more")

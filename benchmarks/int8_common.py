"""What the two INT8 benchmarks (`int8_onnxruntime.py`, `int8_openvino.py`) share: the CPU they ran on, the
digits validation split through a run's preprocessing, and top-1 on it."""
from __future__ import annotations

from pathlib import Path

import torch

from hybridvit.data.digits import DigitsDataset
from hybridvit.data.transforms import Preprocess

INT8_FLAGS = ("avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16")


def cpu_info() -> tuple[str, list[str]]:
    """The CPU's model name and its int8/bf16 instruction flags (from /proc/cpuinfo, where there is one)."""
    cpu = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("model name")), "?")
    return name, sorted({f for f in cpu.split() if f in INT8_FLAGS})


def digits_val(pretrained_cfg: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The 360 validation digits through the run's eval preprocessing, and their labels."""
    pre = Preprocess.from_cfg(pretrained_cfg)
    val = DigitsDataset("val")
    return torch.stack([pre(val.load(i)) for i in range(len(val))]), torch.tensor(val.targets)


def top1(model: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor, batch: int = 64) -> float:
    hits = 0
    for i in range(0, len(images), batch):
        hits += int((model(images[i:i + batch]).argmax(1) == targets[i:i + batch]).sum())
    return 100.0 * hits / len(images)

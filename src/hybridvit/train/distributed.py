"""Process-group set-up from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and reductions."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(pref: str, local_rank: int = 0) -> torch.device:
    """`--device` as a torch.device; ValueError with advice when CUDA is asked for and absent."""
    from ..runtime import resolve_device
    return resolve_device(pref, local_rank)


def setup(device_pref: str = "auto") -> DistInfo:
    """One process per device; under torchrun the group uses NCCL on GPUs and gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_pref, local)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    return DistInfo(rank, world, local, device)


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def all_sum(values: list[float], info: DistInfo) -> list[float]:
    """Sums of `values` over all ranks (float64, so that counts stay exact)."""
    if not info.enabled:
        return list(values)
    backend_device = info.device if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.float64, device=backend_device)
    dist.all_reduce(t)
    return t.tolist()


def all_gather(obj: Any, info: DistInfo) -> list[Any]:
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


@torch.no_grad()
def reduce_bn_stats(model: torch.nn.Module, info: DistInfo) -> None:
    """Averages BatchNorm running statistics over ranks (timm's dist_bn='reduce'): each rank updated
    them on its own batches; afterwards every rank holds the same model."""
    if not info.enabled:
        return
    for name, buf in model.named_buffers():
        if ("running_mean" in name or "running_var" in name) and buf.is_floating_point():
            dist.all_reduce(buf)
            buf /= info.world_size

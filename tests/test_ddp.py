"""Two processes with DDP (gloo on CPU): identical weights on both ranks, metrics reduced over ranks."""
from __future__ import annotations

import json
import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp
from _imagedata import make_folder

WORLD = 2


def _needs_train_extra() -> None:
    pytest.importorskip("kornia", reason="needs the train extra (kornia)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, opts: dict, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    from hybridvit.train.config import make_config
    from hybridvit.train.engine import train

    s = train(make_config(None, **opts))
    torch.save({"state_dict": s["final_state_dict"], "val_top1": s["val_top1"], "world_size": s["world_size"]},
               os.path.join(out, f"rank{rank}.pt"))


@pytest.mark.slow
def test_two_process_ddp_gloo(tmp_path):
    _needs_train_extra()
    import hybridvit
    from hybridvit.data.loader import EpochSampler, build_dataset, make_loader
    from hybridvit.data.transforms import EvalTransform
    from hybridvit.train.engine import evaluate

    root = make_folder(tmp_path / "data", n_train=12, n_val=5)  # 10 val images: 5 per rank, none padded
    opts = dict(data=str(root), output=str(tmp_path / "run"), model="fastervit_nano", img_size=32, batch_size=4,
                epochs=2, threads=1, workers=0, progress=False, plot=False, mixup=0.8, cutmix=1.0,
                randaugment="rand-m9-mstd0.5-inc1", drop_path_rate=0.1, lr=2e-3, warmup_epochs=0.5, seed=3)
    mp.spawn(_worker, args=(_free_port(), opts, str(tmp_path)), nprocs=WORLD, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD))
    assert r0["world_size"] == r1["world_size"] == WORLD
    for k, v in r0["state_dict"].items():
        assert torch.equal(v, r1["state_dict"][k]), k
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert r0["val_top1"] == r1["val_top1"] == summary["val_top1"]
    assert summary["world_size"] == WORLD and summary["config"]["batch_size"] == 4
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1] and rows[0]["step"] == 3  # 24 images / (2 ranks x 4) per step

    # the reported accuracy is that of the final weights on the whole validation set
    model = hybridvit.create_model("fastervit_nano", num_classes=2, img_size=32)
    model.load_state_dict(r0["state_dict"])
    ds = build_dataset(str(root), "val", EvalTransform.from_cfg(model.pretrained_cfg))
    res = evaluate(model, make_loader(ds, EpochSampler(len(ds), False, pad=False), 4, 0, False),
                   torch.device("cpu"))
    assert res["images"] == 10 and res["top1"] == pytest.approx(rows[-1]["val_top1"])


@pytest.mark.slow
def test_ddp_survives_a_micro_batch_unreadable_on_one_rank_only(tmp_path):
    """Batch 1 per rank and an odd number of unreadable images: every epoch pairs some unreadable image
    with a readable one on the other rank. The ranks must skip that step together (DDP's gradient
    all-reduce would otherwise wait forever) and still end with identical weights."""
    _needs_train_extra()
    from _imagedata import corrupt_jpeg

    root = make_folder(tmp_path / "data", n_train=4, n_val=2)
    bad = [root / "train" / "blue" / f"{i:03d}.png" for i in range(3)]
    for p in bad:
        corrupt_jpeg(p)
    # 64 px: the last (BatchNorm) stage keeps 2x2 positions, so batch 1 trains
    opts = dict(data=str(root), output=str(tmp_path / "run"), model="fastervit_nano", img_size=64, batch_size=1,
                epochs=2, threads=1, workers=0, progress=False, plot=False, mixup=0.0, cutmix=0.0, lr=1e-3,
                warmup_epochs=0, seed=5)
    ctx = mp.spawn(_worker, args=(_free_port(), opts, str(tmp_path)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + 240
    finished = False
    while not finished and time.monotonic() < deadline:  # join returns as each process ends
        finished = ctx.join(timeout=max(0.1, deadline - time.monotonic()))
    if not finished:
        for p in ctx.processes:
            p.kill()
        pytest.fail("DDP training did not finish: the ranks disagreed on skipping an unreadable micro-batch")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD))
    for k, v in r0["state_dict"].items():
        assert torch.equal(v, r1["state_dict"][k]), k
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert sorted(summary["skipped_images"]) == sorted(str(p) for p in bad)


def _backbone_worker(rank: int, port: int, out: str) -> None:
    """Trains a features_only backbone (stages 1-2 of 4) under plain DDP: any parameter without a gradient
    would make the second step fail ("Expected to have finished reduction in the prior iteration")."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    import hybridvit

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)  # same initial weights on both ranks
        backbone = hybridvit.create_model("fastervit_nano", features_only=True, out_indices=(1, 2))
        ddp = DistributedDataParallel(backbone)  # find_unused_parameters=False (the default)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        torch.manual_seed(1 + rank)  # different data per rank
        for _ in range(3):
            opt.zero_grad()
            sum(f.square().mean() for f in ddp(torch.randn(2, 3, 64, 64))).backward()
            opt.step()
        torch.save(dict(backbone.named_parameters()), os.path.join(out, f"backbone{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_features_only_backbone_without_find_unused_parameters(tmp_path):
    mp.spawn(_backbone_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    r0, r1 = (torch.load(tmp_path / f"backbone{r}.pt", weights_only=True) for r in range(WORLD))
    assert not any(k.startswith(("stages.3.", "norm.", "head.")) for k in r0)  # removed, not left unused
    for k, v in r0.items():
        assert torch.equal(v, r1[k]), k

"""The training loop: one process per device (torchrun for several), exact step-level resume."""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..layers.cpu_bf16 import bf16_kernels, model_policy
from . import distributed as D
from .config import TrainConfig
from .ema import ModelEma
from .optim import build_optimizer, lr_at

CHECKPOINT_VERSION = 1


# ----------------------------------------------------------------------------------------- files
def save_atomic(obj: dict[str, Any], path: Path) -> None:
    """torch.save to a temporary file in the same folder, then os.replace: never a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_json_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    """The random states of torch, Python and numpy as plain lists (they travel through all_gather_object)."""
    import numpy as np
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state().tolist(), "python": random.getstate(),
             "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def seed_all(seed: int) -> None:
    import numpy as np
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def find_resume_file(resume: str) -> Path:
    p = Path(resume)
    if p.is_dir():
        p = p / "last.pt"
    if not p.is_file():
        raise FileNotFoundError(f"nothing to resume: {p} does not exist (pass the run folder of an earlier "
                                "`hybridvit train --output DIR`)")
    return p


# ------------------------------------------------------------------------------------- pieces
def model_kwargs(cfg: TrainConfig) -> dict[str, Any]:
    """create_model overrides that shape the model (stored in checkpoints for eval/predict)."""
    kw: dict[str, Any] = {}
    if cfg.img_size is not None:
        kw["img_size"] = cfg.img_size
    return kw


def build_model(cfg: TrainConfig, num_classes: int) -> nn.Module:
    import hybridvit
    kw = model_kwargs(cfg)
    if cfg.drop_path_rate is not None:
        kw["drop_path_rate"] = cfg.drop_path_rate
    pretrained: bool | str = False
    if cfg.pretrained:
        pretrained = True if cfg.pretrained.lower() == "true" else cfg.pretrained
    return hybridvit.create_model(cfg.model, pretrained=pretrained, num_classes=num_classes, **kw)


def amp_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    mode = cfg.amp
    if mode == "auto":
        mode = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "none"
    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[mode]


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Mixed precision in `dtype` (bf16/fp16), or nothing for fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _forward_train(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """model(x) in training, with advice when BatchNorm meets a single value per channel (one image
    whose last maps are 1x1: small inputs with batch size 1, or a batch shrunk by unreadable images)."""
    try:
        return model(x)
    except ValueError as e:
        if "Expected more than 1 value per channel" not in str(e):
            raise
        raise ValueError(
            f"a training micro-batch of {x.shape[0]} image(s) of {tuple(x.shape[-2:])} pixels leaves a BatchNorm "
            "layer a single value per channel; use --batch-size 2 or more or a "
            f"larger --img-size. ({e})") from e


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, info: D.DistInfo | None = None,
             dtype: torch.dtype | None = None, channels_last: bool = False, progress: bool = False,
             desc: str = "eval") -> dict[str, float]:
    """top-1/top-5 (percent) and loss over the loader, summed over ranks (every image counted once)."""
    from tqdm import tqdm

    from ..data.transforms import Normalize

    info = info or D.DistInfo(device=device)
    model.eval()
    cfg = getattr(model, "pretrained_cfg", {})
    norm = Normalize(cfg.get("mean", (0.485, 0.456, 0.406)), cfg.get("std", (0.229, 0.224, 0.225))).to(device)
    loss_sum = correct1 = correct5 = total = 0.0
    for batch in tqdm(loader, desc=desc, leave=False, disable=not (progress and info.is_main), file=sys.stdout):
        if batch["targets"].numel() == 0:
            continue
        x = norm(batch["images"].to(device, non_blocking=True))
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = batch["targets"].to(device)
        with autocast(device, dtype):
            logits = model(x)
        logits = logits.float()
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hit = top == y[:, None]
        correct1 += float(hit[:, 0].sum())
        correct5 += float(hit.any(dim=1).sum())
        total += y.numel()
    loss_sum, correct1, correct5, total = D.all_sum([loss_sum, correct1, correct5, total], info)
    total = max(total, 1)
    return {"loss": loss_sum / total, "top1": 100 * correct1 / total, "top5": 100 * correct5 / total,
            "images": int(total)}


class RunLog:
    """Messages to stdout (through tqdm) and DIR/train.log; only rank 0 writes."""

    def __init__(self, out: Path | None, enabled: bool) -> None:
        self.path = out / "train.log" if out else None
        self.enabled = enabled

    def __call__(self, msg: str) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm
        tqdm.write(msg, file=sys.stdout)
        if self.path:
            with open(self.path, "a") as f:
                f.write(msg + "\n")


def plot_metrics(rows: list[dict[str, Any]], path: Path) -> None:
    """Loss and accuracy curves per epoch (matplotlib, Agg backend; skipped when not installed)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    ep = [r["epoch"] + 1 for r in rows]
    # one colour per series in both panels (matplotlib's cycle would restart per panel and swap them)
    color = {"train": "C0", "val": "C1", "ema": "C2"}
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.plot(ep, [r["train_loss"] for r in rows], "o-", color=color["train"], label="train")
    a.plot(ep, [r["val_loss"] for r in rows], "o-", color=color["val"], label="val")
    a.set_xlabel("epoch")
    a.set_ylabel("loss")
    a.legend()
    if all(r.get("train_top1") is not None for r in rows):
        b.plot(ep, [r["train_top1"] for r in rows], "o-", color=color["train"], label="train top-1")
    b.plot(ep, [r["val_top1"] for r in rows], "o-", color=color["val"], label="val top-1")
    if all("val_top1_ema" in r for r in rows):
        b.plot(ep, [r["val_top1_ema"] for r in rows], "o-", color=color["ema"], label="val top-1 (EMA)")
    b.set_xlabel("epoch")
    b.set_ylabel("accuracy (%)")
    b.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------- training
def train(cfg: TrainConfig) -> dict[str, Any]:
    """Trains `cfg.model` on `cfg.data`; returns the summary (also written to OUTPUT/summary.json)."""
    from tqdm import tqdm

    from ..data.loader import EpochSampler, build_dataset, is_digits, make_loader
    from ..data.mixup import MixupCutmix
    from ..data.transforms import DeviceAugment, EvalTransform, TrainTransform

    t_start = time.time()
    resume_ckpt = None
    if cfg.resume:
        path = find_resume_file(cfg.resume)
        resume_ckpt = torch.load(path, map_location="cpu", weights_only=True)
        keep = {k: getattr(cfg, k) for k in ("progress", "plot", "workers", "device")}
        from .config import make_config
        stored = dict(resume_ckpt["config"])
        stored.update(keep, resume=str(path), output=str(path.parent))
        cfg = make_config(**stored)

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    info = D.setup(cfg.device)
    device = info.device
    out = Path(cfg.output) if cfg.output else Path("runs") / f"{cfg.model}-{time.strftime('%Y%m%d-%H%M%S')}"
    if info.enabled and not cfg.output:  # one folder for all ranks: rank 0's name
        out = Path(D.all_gather(str(out), info)[0])
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
    log = RunLog(out, info.is_main)
    seed_all(cfg.seed)

    # data first: a missing or empty folder fails here, before the model is even built
    probe_train = build_dataset(cfg.data, cfg.train_split, None, strict=cfg.strict_data)
    classes = list(probe_train.classes)
    num_classes = cfg.num_classes or len(classes)
    model = build_model(cfg, num_classes)  # same seed on every rank: same initial weights
    pcfg = model.pretrained_cfg
    size = pcfg["input_size"][-1]
    train_tf = TrainTransform(size, cfg.scale, cfg.ratio, cfg.train_interpolation or pcfg["interpolation"],
                              seed=cfg.seed)
    train_ds = build_dataset(cfg.data, cfg.train_split, train_tf, classes=classes, strict=cfg.strict_data)
    val_ds = build_dataset(cfg.data, cfg.val_split, EvalTransform.from_cfg(pcfg), classes=classes,
                           strict=cfg.strict_data)
    workers = cfg.workers
    if workers is None:
        workers = 0 if is_digits(cfg.data) else min(4, os.cpu_count() or 1)

    dtype = amp_dtype(cfg, device)
    channels_last = cfg.channels_last if cfg.channels_last is not None else device.type == "cuda"
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    ema = ModelEma(model, cfg.model_ema_decay) if cfg.model_ema else None

    world_batch = cfg.batch_size * cfg.accum_steps * info.world_size
    lr = cfg.lr * world_batch / cfg.lr_base_size if cfg.lr_base_size else cfg.lr
    min_lr = cfg.min_lr * world_batch / cfg.lr_base_size if cfg.lr_base_size else cfg.min_lr
    warmup_lr = cfg.warmup_lr * world_batch / cfg.lr_base_size if cfg.lr_base_size else cfg.warmup_lr
    optimizer = build_optimizer(model, cfg.opt, lr, cfg.weight_decay, cfg.opt_betas, cfg.opt_eps, cfg.momentum)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    train_sampler = EpochSampler(len(train_ds), True, cfg.seed, info.rank, info.world_size, pad=True)
    val_sampler = EpochSampler(len(val_ds), False, 0, info.rank, info.world_size, pad=False)
    micro_per_epoch = len(train_sampler) // cfg.batch_size
    steps_per_epoch = micro_per_epoch // cfg.accum_steps
    if cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    if steps_per_epoch < 1:
        raise ValueError(f"{len(train_ds)} training images are fewer than one optimizer step "
                         f"(batch {cfg.batch_size} x accum {cfg.accum_steps} x {info.world_size} processes)")
    total_steps = steps_per_epoch * cfg.epochs
    warmup_steps = round(cfg.warmup_epochs * steps_per_epoch)
    cooldown_steps = round(cfg.cooldown_epochs * steps_per_epoch)

    start_epoch, step_in_epoch, global_step, best_top1 = 0, 0, 0, -1.0
    running = [0.0, 0.0, 0.0]  # loss sum, hard-target hits, images of the current epoch on this rank
    skipped: list[str] = []
    if resume_ckpt is not None:
        model.load_state_dict(resume_ckpt["state_dict"])
        if ema is not None:
            ema.module.load_state_dict(resume_ckpt["state_dict_ema"])
            ema.updates.fill_(resume_ckpt["ema_updates"])
        optimizer.load_state_dict(resume_ckpt["optimizer"])
        scaler.load_state_dict(resume_ckpt["scaler"])
        start_epoch, step_in_epoch = resume_ckpt["epoch"], resume_ckpt["step_in_epoch"]
        global_step, best_top1 = resume_ckpt["scheduler"]["step"], resume_ckpt["best_top1"]
        skipped = list(resume_ckpt.get("skipped_images", []))
        states = resume_ckpt["rng"]
        if len(states) == info.world_size:
            running = list(resume_ckpt["running"][info.rank])
            set_rng_state(states[info.rank])
        else:
            log(f"resuming with {info.world_size} processes instead of {len(states)}: random streams restart")
            seed_all(cfg.seed + 1000 * global_step + info.rank)
        log(f"resumed {cfg.resume} at epoch {start_epoch + 1}, step {step_in_epoch}/{steps_per_epoch}")
    else:
        # augmentation and drop path differ per rank; the model weights were made before this
        seed_all(cfg.seed + info.rank)

    train_model: nn.Module = model
    if cfg.compile:
        train_model = torch.compile(train_model)
    bf16_policy = model_policy(train_model)  # bf16 kernels for forward and backward (layers/cpu_bf16.py)
    if info.enabled:
        # depthwise kernels (C, 1, k, k) get gradients whose stride on the size-1 dim differs from
        # DDP's bucket view: harmless (a size-1 dim has no layout), but warned about at every step
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        train_model = nn.parallel.DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == "cuda" else None)

    augment = DeviceAugment(pcfg["mean"], pcfg["std"], cfg.randaugment, cfg.hflip, cfg.reprob).to(device)
    mixup = MixupCutmix(num_classes, cfg.mixup, cfg.cutmix, cfg.mixup_prob, cfg.mixup_switch_prob, cfg.smoothing)

    if info.is_main:
        n_params = sum(p.numel() for p in model.parameters())
        log(f"model {cfg.model} ({n_params / 1e6:.2f}M params, input {size}x{size}), {num_classes} classes, "
            f"{len(train_ds)} train / {len(val_ds)} val images "
            f"({'embedded digits' if is_digits(cfg.data) else cfg.data})"
            f", {info.world_size} process(es) on {device.type}, global batch {world_batch}, lr {lr:.3g}, "
            f"{cfg.epochs} epochs x {steps_per_epoch} steps, output {out}")

    metrics_path = out / "metrics.jsonl"
    rows: list[dict[str, Any]] = []
    if info.is_main and metrics_path.is_file():
        rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
        rows = [r for r in rows if r["epoch"] < start_epoch] if resume_ckpt is not None else []
        metrics_path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def checkpoint(epoch: int, step: int) -> dict[str, Any]:
        rngs = D.all_gather(rng_state(), info)
        runs = D.all_gather(list(running), info)
        return {
            "version": CHECKPOINT_VERSION, "model_name": cfg.model, "model_kwargs": model_kwargs(cfg),
            "num_classes": num_classes, "class_names": classes, "pretrained_cfg": dict(pcfg),
            "state_dict": model.state_dict(),
            "state_dict_ema": ema.module.state_dict() if ema is not None else None,
            "ema_updates": int(ema.updates) if ema is not None else 0,
            "optimizer": optimizer.state_dict(), "scheduler": {"step": global_step, "total": total_steps},
            "scaler": scaler.state_dict(), "epoch": epoch, "step_in_epoch": step, "best_top1": best_top1,
            "rng": rngs, "running": runs, "skipped_images": skipped,
            "config": cfg.to_dict(), "world_size": info.world_size,
        }

    last_path, best_path = out / "last.pt", out / "best.pt"
    val_loader = make_loader(val_ds, val_sampler, cfg.batch_size, workers, drop_last=False,
                             pin_memory=device.type == "cuda")
    last_metrics: dict[str, Any] = {}
    for epoch in range(start_epoch, cfg.epochs):
        t_epoch = time.time()
        train_ds.epoch = epoch
        train_sampler.set_epoch(epoch, start=step_in_epoch * cfg.accum_steps * cfg.batch_size)
        loader = make_loader(train_ds, train_sampler, cfg.batch_size, workers, drop_last=True,
                             pin_memory=device.type == "cuda")
        if step_in_epoch == 0:
            running = [0.0, 0.0, 0.0]
        train_model.train()
        bar = tqdm(total=steps_per_epoch, initial=step_in_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   disable=not (cfg.progress and info.is_main), leave=False, file=sys.stdout, dynamic_ncols=True,
                   mininterval=1.0)
        it = iter(loader)
        while step_in_epoch < steps_per_epoch:
            cur_lr = lr_at(global_step, total_steps, warmup_steps, cooldown_steps, lr, min_lr, warmup_lr)
            for g in optimizer.param_groups:
                g["lr"] = cur_lr
            for micro in range(cfg.accum_steps):
                batch = next(it)
                skipped += batch["bad"]
                empty = batch["targets"].numel() == 0  # every image of the micro-batch unreadable
                if info.enabled:
                    # DDP all-reduces gradients in backward: ranks skip a micro-batch together or not at all
                    empty = D.all_sum([float(empty)], info)[0] > 0
                if empty:
                    continue
                x = batch["images"].to(device, non_blocking=True)
                y = batch["targets"].to(device, non_blocking=True)
                with torch.no_grad():
                    x = augment(x)
                    if mixup.active:
                        x, y_soft = mixup(x, y)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                sync = micro == cfg.accum_steps - 1 or not info.enabled
                ctx = contextlib.nullcontext() if sync else train_model.no_sync()
                # forward and backward share the bf16 kernel policy of the model (layers/cpu_bf16.py)
                with ctx, bf16_kernels(bf16_policy, device, dtype):
                    with autocast(device, dtype):
                        logits = _forward_train(train_model, x)
                    if mixup.active:
                        loss = soft_cross_entropy(logits, y_soft)
                    else:
                        loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.smoothing)
                    loss_value = float(loss.detach())
                    if not math.isfinite(loss_value):
                        raise FloatingPointError(f"loss is {loss_value} at epoch {epoch + 1} step {step_in_epoch}; "
                                                 "lower --lr or use --amp bf16/none")
                    scaler.scale(loss / cfg.accum_steps).backward()
                running[0] += loss_value * y.numel()
                running[1] += float((logits.argmax(1) == y).sum())
                running[2] += y.numel()
            if cfg.clip_grad:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update(model)
            global_step += 1
            step_in_epoch += 1
            bar.update(1)
            bar.set_postfix(loss=f"{running[0] / max(running[2], 1):.3f}", lr=f"{cur_lr:.2e}")
            if cfg.checkpoint_every and global_step % cfg.checkpoint_every == 0 and step_in_epoch < steps_per_epoch:
                ck = checkpoint(epoch, step_in_epoch)
                if info.is_main:
                    save_atomic(ck, last_path)
        bar.close()
        del it, loader

        # end of epoch: reduce the training metrics, validate, write checkpoints and metrics
        loss_sum, hits, seen = D.all_sum(running, info)
        D.reduce_bn_stats(model, info)
        val = evaluate(model, val_loader, device, info, dtype, channels_last, cfg.progress, "validate")
        row: dict[str, Any] = {"epoch": epoch, "step": global_step, "lr": cur_lr,
                               "train_loss": loss_sum / max(seen, 1),
                               "train_top1": None if mixup.active else 100 * hits / max(seen, 1),
                               "val_loss": val["loss"], "val_top1": val["top1"], "val_top5": val["top5"]}
        if ema is not None:
            val_ema = evaluate(ema.module, val_loader, device, info, dtype, channels_last, False)
            row["val_top1_ema"] = val_ema["top1"]
        row["epoch_time_s"] = round(time.time() - t_epoch, 2)
        bad_all = sorted({p for ps in D.all_gather(skipped, info) for p in ps})
        skipped = bad_all
        is_best = val["top1"] > best_top1
        best_top1 = max(best_top1, val["top1"])
        step_in_epoch = 0
        ck = checkpoint(epoch + 1, 0)
        if info.is_main:
            save_atomic(ck, last_path)
            if is_best:
                save_atomic(ck, best_path)
            rows.append(row)
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            if cfg.plot:
                plot_metrics(rows, out / "metrics.png")
        ema_txt = f", EMA {row['val_top1_ema']:.2f}%" if ema is not None else ""
        log(f"epoch {epoch + 1}/{cfg.epochs}: train loss {row['train_loss']:.4f}, val loss {val['loss']:.4f}, "
            f"val top-1 {val['top1']:.2f}%{ema_txt}, top-5 {val['top5']:.2f}% ({row['epoch_time_s']:.1f}s)")
        last_metrics = row

    if skipped:
        log(f"skipped {len(skipped)} unreadable image(s): " + ", ".join(skipped[:20])
            + (" ..." if len(skipped) > 20 else ""))
    summary = {
        "model": cfg.model, "epochs": cfg.epochs, "val_top1": best_top1,
        "val_top1_last": last_metrics.get("val_top1"), "val_top5_last": last_metrics.get("val_top5"),
        "checkpoint": str(best_path.resolve()), "last_checkpoint": str(last_path.resolve()),
        "output": str(out.resolve()), "data": cfg.data, "num_classes": num_classes,
        "train_images": len(train_ds), "val_images": len(val_ds), "skipped_images": skipped,
        "world_size": info.world_size, "device": str(device), "recipe": cfg.recipe,
        "wall_time_s": round(time.time() - t_start, 1), "config": cfg.to_dict(),
    }
    if info.is_main:
        if not last_metrics and resume_ckpt is not None and best_path.is_file():
            summary["note"] = "the resumed run had already finished"
        write_json_atomic(summary, out / "summary.json")
    D.barrier(info)
    D.cleanup(info)
    summary["final_state_dict"] = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return summary

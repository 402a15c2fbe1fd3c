"""The training loop: one process per device (torchrun for several), exact step-level resume.

`train(cfg)` reads top to bottom: `setup_run` (distributed, device, seeds, output folder; train/prepare.py), the
data and the model, a `TrainState` (everything a resume restores; train/resume.py), then per epoch
`train_one_epoch` and `end_epoch` (validation with `inference.evaluate`, checkpoints, metrics). Stop
signals are train/stop.py's, the log, metrics and summary train/report.py's, the run folder's files
train/run_dir.py's."""
from __future__ import annotations

import contextlib
import math
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._io import clean_stale_temp_files
from ..checkpoint import make_run_checkpoint
from ..data.folder import DataError
from ..inference.evaluate import EvaluationStopped, evaluate
from ..runtime import check_img_size
from . import distributed as D
from . import run_dir as R
from .config import TrainConfig, run_header
from .prepare import (
    RunContext,
    RunData,
    Schedule,
    build_data,
    build_model,
    build_schedule,
    build_train_state,
    find_run_classes,
    model_kwargs,
    pretrained_run_config,
    run_config,
    setup_run,
)
from .report import no_image_error, plot_metrics
from .resume import TrainState, resolve_config, seed_all, train_state_from_run
from .run_dir import created_run_dir
from .stop import StopRequest, TrainingInterrupted, saving

__all__ = ["TrainState", "TrainingInterrupted", "build_model", "evaluate", "plot_metrics", "train", "train_one_epoch"]


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


def stop_if_asked(ctx: RunContext, state: TrainState, loop: Loop, *, saved: bool = False) -> None:
    """Raises TrainingInterrupted when a stop was requested, after writing last.pt at the current step
    (unless `saved`: the end of an epoch has just written it)."""
    signum = loop.stop.requested(ctx.info)
    if not signum:
        return
    if not saved:
        save_run(ctx, state, loop.model_info, [ctx.out / R.LAST])
    err = TrainingInterrupted(signum, ctx.out, state.epoch, state.step_in_epoch, loop.schedule.steps_per_epoch)
    # train.log's record; the terminal gets the command's own line (TrainingInterrupted), not a second one
    ctx.log(f"stopped by {signal.Signals(signum).name} at epoch {state.epoch + 1}, step "
            f"{state.step_in_epoch}/{loop.schedule.steps_per_epoch}; continue with: {err.resume_command}",
            terminal=False)
    D.barrier(ctx.info)
    D.cleanup(ctx.info)
    raise err


def save_run(ctx: RunContext, state: TrainState, model_info: dict[str, Any], paths: list[Path]) -> None:
    """Writes the run checkpoint to every path in `paths` (rank 0; every rank takes part in the gather)."""
    ts = state.state_dict()
    if not ctx.info.is_main:
        return
    weights, ema = ts.pop("model"), ts.pop("ema")
    ck = make_run_checkpoint(**model_info, state_dict=weights, state_dict_ema=ema, train_state=ts,
                             config=run_config(ctx.cfg))
    with saving():
        for path in paths:
            R.write_checkpoint(ck, path)


@dataclass
class Loop:
    """What the epochs share: the model as trained (compiled, DDP-wrapped), on-device augmentation, mixup,
    data, schedule, and what the checkpoints record."""

    train_model: nn.Module
    augment: nn.Module
    mixup: Any
    data: RunData
    schedule: Schedule
    model_info: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)
    stop: StopRequest = field(default_factory=StopRequest)
    logged_skipped: list[str] = field(default_factory=list)  # the unreadable images train.log names
    notes: list[str] = field(default_factory=list)  # the last epoch's warnings, for summary.json


def build_loop(ctx: RunContext, state: TrainState, data: RunData, sched: Schedule,
               model_info: dict[str, Any]) -> Loop:
    from ..data.mixup import MixupCutmix
    from ..data.transforms import DeviceAugment

    cfg, info, pcfg = ctx.cfg, ctx.info, model_info["pretrained_cfg"]
    train_model: nn.Module = torch.compile(state.model) if cfg.compile else state.model
    if info.enabled:
        # depthwise kernels (C, 1, k, k) get gradients whose stride on the size-1 dim differs from
        # DDP's bucket view: harmless (a size-1 dim has no layout), but warned about at every step
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        train_model = nn.parallel.DistributedDataParallel(
            train_model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    augment = DeviceAugment(pcfg["mean"], pcfg["std"], cfg.randaugment, cfg.hflip, cfg.reprob).to(ctx.device)
    mixup = MixupCutmix(model_info["num_classes"], cfg.mixup, cfg.cutmix, cfg.mixup_prob, cfg.mixup_switch_prob,
                        cfg.smoothing)
    return Loop(train_model, augment, mixup, data, sched, model_info)


def mesa_active(cfg: Any, epoch: int) -> bool:
    """Whether MESA applies in `epoch` (0-based): once epoch / epochs exceeds `mesa_start_ratio`, as the
    official FasterViT loop decides it per epoch."""
    return cfg.mesa > 0 and epoch / cfg.epochs > cfg.mesa_start_ratio


def mesa_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 3.0) -> torch.Tensor:
    """MESA's distillation term (FasterViT's `kdloss`): 50 x KL(softmax(teacher / T) || softmax(student / T)),
    batch mean, T = 3; the teacher is the EMA model's output (no gradient)."""
    p = F.log_softmax(student.float() / temperature, dim=1)
    q = F.softmax(teacher.detach().float() / temperature, dim=1)
    return 50.0 * F.kl_div(p, q, reduction="batchmean")


def train_micro_batch(ctx: RunContext, state: TrainState, loop: Loop, batch: dict[str, Any], sync: bool,
                      epoch: int) -> None:
    """Forward and backward of one micro-batch (gradients accumulate; DDP all-reduces when `sync`)."""
    info, cfg = ctx.info, ctx.cfg
    state.skipped += batch["bad"]
    empty = batch["targets"].numel() == 0  # every image of the micro-batch unreadable
    if info.enabled:
        # DDP all-reduces gradients in backward: ranks skip a micro-batch together or not at all
        empty = D.all_sum([float(empty)], info)[0] > 0
    if empty:
        return
    x = batch["images"].to(ctx.device, non_blocking=True)
    y = batch["targets"].to(ctx.device, non_blocking=True)
    with torch.no_grad():
        x = loop.augment(x)
        if loop.mixup.active:
            x, y_soft = loop.mixup(x, y)
    if ctx.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    no_sync = contextlib.nullcontext() if sync or not info.enabled else loop.train_model.no_sync()
    with no_sync:
        with ctx.precision.autocast():
            logits = _forward_train(loop.train_model, x)
        if loop.mixup.active:
            loss = soft_cross_entropy(logits, y_soft)
        else:
            loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.smoothing)
        if mesa_active(cfg, epoch) and state.ema is not None:
            with torch.no_grad(), ctx.precision.autocast():
                teacher = state.ema.module(x)
            loss = loss + cfg.mesa * mesa_loss(logits, teacher)
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"loss is {loss_value} at epoch {epoch + 1} step {state.step_in_epoch}; "
                                     "lower --lr or use --amp bf16/none")
        state.scaler.scale(loss / cfg.accum_steps).backward()
    state.running[0] += loss_value * y.numel()
    state.running[1] += float((logits.argmax(1) == y).sum())
    state.running[2] += y.numel()


def optimizer_step(ctx: RunContext, state: TrainState) -> None:
    if ctx.cfg.clip_grad:
        state.scaler.unscale_(state.optimizer)
        nn.utils.clip_grad_norm_(state.model.parameters(), ctx.cfg.clip_grad)
    state.scaler.step(state.optimizer)
    state.scaler.update()
    state.optimizer.zero_grad(set_to_none=True)
    if state.ema is not None:
        state.ema.update(state.model)
    state.global_step += 1
    state.step_in_epoch += 1


def train_one_epoch(ctx: RunContext, state: TrainState, loop: Loop, epoch: int) -> float:
    """The optimizer steps of `epoch` from `state.step_in_epoch` on (exact resume mid-epoch), with a
    checkpoint every `checkpoint_every` steps; returns the last learning rate."""
    from tqdm import tqdm

    from ..data.loader import end_workers, make_loader

    cfg, data, sched = ctx.cfg, loop.data, loop.schedule
    state.epoch = epoch
    data.train_ds.epoch = epoch
    data.train_sampler.set_epoch(epoch, start=state.step_in_epoch * cfg.accum_steps * cfg.batch_size)
    loader = make_loader(data.train_ds, data.train_sampler, cfg.batch_size, ctx.workers, drop_last=True,
                         pin_memory=ctx.device.type == "cuda")
    if state.step_in_epoch == 0:
        state.running = [0.0, 0.0, 0.0]
    loop.train_model.train()
    bar = tqdm(total=sched.steps_per_epoch, initial=state.step_in_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}",
               disable=not (cfg.progress and ctx.info.is_main), leave=False, file=sys.stdout, dynamic_ncols=True,
               mininterval=1.0)
    it = iter(loader)
    try:
        cur_lr = sched.lr_at(state.global_step)
        while state.step_in_epoch < sched.steps_per_epoch:
            cur_lr = sched.lr_at(state.global_step)
            for g in state.optimizer.param_groups:
                g["lr"] = cur_lr
            for micro in range(cfg.accum_steps):
                try:
                    batch = next(it)
                except RuntimeError:
                    if not loop.stop.signum or ctx.info.enabled:
                        raise
                    # a terminal's Ctrl-C also reaches the loader workers, which exit: stop as asked (the
                    # checkpoint is at the last optimizer step; micro-batches of this one are read again)
                    bar.close()
                    stop_if_asked(ctx, state, loop)
                train_micro_batch(ctx, state, loop, batch, micro == cfg.accum_steps - 1, epoch)
            optimizer_step(ctx, state)
            bar.update(1)
            bar.set_postfix(loss=f"{state.running[0] / max(state.running[2], 1):.3f}", lr=f"{cur_lr:.2e}")
            saved = bool(cfg.checkpoint_every and state.global_step % cfg.checkpoint_every == 0
                         and state.step_in_epoch < sched.steps_per_epoch)
            if saved:
                save_run(ctx, state, loop.model_info, [ctx.out / R.LAST])
            if state.step_in_epoch < sched.steps_per_epoch:  # the last step's stop waits for end_epoch's save
                stop_if_asked(ctx, state, loop, saved=saved)  # a signal during that save: it is the checkpoint
    finally:
        # left by a stop, `it` sits in the traceback's reference cycle: collected by gc, its queues close
        # before its __del__ asks the workers to finish, and a worker (which ignores SIGTERM) outlived the
        # run, multiprocessing's exit handler waiting for it forever. Ended here, as a finished epoch ends them.
        end_workers(it)
    bar.close()
    return cur_lr


def end_epoch(ctx: RunContext, state: TrainState, loop: Loop, epoch: int, cur_lr: float,
              t_epoch: float) -> dict[str, Any]:
    """Reduces the training metrics, validates (and the EMA), writes last.pt/best.pt and the metrics row."""
    cfg, info = ctx.cfg, ctx.info
    loss_sum, hits, seen = D.all_sum(state.running, info)
    if seen == 0:
        raise no_image_error(ctx.cfg, ctx.info, state.skipped, epoch)
    D.reduce_bn_stats(state.model, info)
    reduce = (lambda v: D.all_sum(v, info)) if info.enabled else None
    # a signal stops validation at the next batch (one process: under torchrun the ranks' batch counts
    # differ, so they agree at the next step instead); last.pt then resumes with this validation
    stop = None if info.enabled else (lambda: bool(loop.stop.signum))
    try:
        val = evaluate(state.model, loop.data.val_loader, ctx.device, ctx.precision, channels_last=ctx.channels_last,
                       progress=cfg.progress and info.is_main, desc="validate", reduce=reduce, stop=stop)
    except EvaluationStopped:
        stop_if_asked(ctx, state, loop)
        raise
    new_bad = sorted(set(val["skipped"]) - set(state.skipped))
    state.skipped += new_bad
    if val["images"] == 0:
        from ..data.loader import split_folder
        raise DataError(f"epoch {epoch + 1} could read no validation image of "
                        f"{split_folder(cfg.data, cfg.val_split)} ({len(val['skipped'])} unreadable, e.g. "
                        f"{', '.join(val['skipped'][:3])}): replace them with readable images")
    row: dict[str, Any] = {"epoch": epoch, "step": state.global_step, "lr": cur_lr, "train_loss": loss_sum / seen,
                           "train_top1": None if loop.mixup.active else 100 * hits / seen,
                           "val_loss": val["loss"], "val_top1": val["top1"], "val_top5": val["top5"]}
    if state.ema is not None:
        row["val_top1_ema"] = evaluate(state.ema.module, loop.data.val_loader, ctx.device, ctx.precision,
                                       channels_last=ctx.channels_last, reduce=reduce, stop=stop)["top1"]
    row["epoch_time_s"] = round(time.time() - t_epoch, 2)
    before = set(loop.logged_skipped)
    state.skipped = sorted({p for ps in D.all_gather(state.skipped, info) for p in ps})
    for p in state.skipped:
        if p not in before:
            ctx.log(f"skipped unreadable image {p}")
    loop.logged_skipped = list(state.skipped)
    is_best = val["top1"] > state.best_top1
    state.best_top1 = max(state.best_top1, val["top1"])
    if is_best:
        state.best_epoch = epoch + 1
    state.epoch, state.step_in_epoch = epoch + 1, 0
    save_run(ctx, state, loop.model_info, [ctx.out / R.LAST] + ([ctx.out / R.BEST] if is_best else []))
    if info.is_main:
        loop.rows.append(row)
        R.append_metrics(ctx.out, row)
        if cfg.plot:
            plot_metrics(loop.rows, ctx.out / R.PLOT)
    ema_txt = f", EMA {row['val_top1_ema']:.2f}%" if state.ema is not None else ""
    top5 = f", top-5 {val['top5']:.2f}%" if val["top5"] is not None else ""
    ctx.log(f"epoch {epoch + 1}/{cfg.epochs}: train loss {row['train_loss']:.4f}, val loss {val['loss']:.4f}, "
            f"val top-1 {val['top1']:.2f}%{ema_txt}{top5} ({row['epoch_time_s']:.1f}s)")
    why = eval_mode_gap(row, loop.model_info["num_classes"], state.model)
    if why:
        ctx.log(f"warning: epoch {epoch + 1}: {why}")
        loop.notes = [why]
    else:
        loop.notes = []
    return row


def eval_mode_gap(row: dict[str, Any], num_classes: int, model: nn.Module) -> str | None:
    """Why validation (eval mode) sits at chance while training accuracy is far above it, when that is so:
    the model's BatchNorm running statistics have not settled (few optimizer steps at momentum 0.1 leave
    them near their initial values, so eval mode normalises with the wrong statistics); None otherwise."""
    chance = 100.0 / max(num_classes, 1)
    train, val = row.get("train_top1"), row["val_top1"]
    if train is None or val > 1.5 * chance or train < val + 30 or train < 2 * chance:
        return None
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    cause = ("its BatchNorm running statistics have not settled yet (after few steps they stay near their "
             "initial values, and eval mode normalises with them)") if has_bn else "the model overfits"
    return (f"val top-1 {val:.2f}% is at chance ({chance:.1f}% for {num_classes} classes) while train top-1 is "
            f"{train:.2f}%: {cause}. Train for more steps (more epochs, a smaller --batch-size), or compare "
            "with a model without BatchNorm; this epoch's val top-1 does not measure the weights")


def _log_start(ctx: RunContext, state: TrainState, loop: Loop) -> None:
    from ..data.loader import is_digits

    cfg, info, d, s = ctx.cfg, ctx.info, loop.data, loop.schedule
    n_params = sum(p.numel() for p in state.model.parameters())
    size = loop.model_info["pretrained_cfg"]["input_size"][-1]
    ctx.log(f"model {cfg.model} ({n_params / 1e6:.2f}M params, input {size}x{size}), "
            f"{loop.model_info['num_classes']} classes, {len(d.train_ds)} train / {len(d.val_ds)} val images "
            f"({'embedded digits' if is_digits(cfg.data) else cfg.data}), {info.world_size} process(es) on "
            f"{ctx.device.type}, {ctx.precision.name}, global batch {s.world_batch}, "
            f"{cfg.epochs} epochs x {s.steps_per_epoch} steps, output {ctx.out}")
    ctx.log(run_header(cfg, ctx.threads, s.world_batch, len(d.train_ds)))


def _summary(ctx: RunContext, state: TrainState, loop: Loop, last: dict[str, Any], t_start: float
             ) -> dict[str, Any]:
    cfg, out = ctx.cfg, ctx.out
    return {
        "model": cfg.model, "epochs": cfg.epochs, "val_top1": state.best_top1,
        "best_epoch": state.best_epoch or None,
        "val_top1_last": last.get("val_top1"), "val_top5_last": last.get("val_top5"),
        "checkpoint": str((out / R.BEST).resolve()), "last_checkpoint": str((out / R.LAST).resolve()),
        "output": str(out.resolve()), "data": cfg.data, "num_classes": loop.model_info["num_classes"],
        "train_images": len(loop.data.train_ds), "val_images": len(loop.data.val_ds),
        "skipped_images": state.skipped, "world_size": ctx.info.world_size, "device": str(ctx.device),
        "precision": ctx.precision.name, "recipe": cfg.recipe, "wall_time_s": round(time.time() - t_start, 1),
        "warnings": list(loop.notes),
        "config": run_config(cfg),
    }


def train(cfg: TrainConfig, given: set[str] | None = None) -> dict[str, Any]:
    """Trains `cfg.model` on `cfg.data`; returns the summary (also written to OUTPUT/summary.json) with
    the final weights under `final_state_dict`. A run that fails before its first checkpoint leaves no
    folder behind. SIGINT/SIGTERM write last.pt at the current step and raise TrainingInterrupted.

    given: the options named on the command line, for the `--resume` policy (`resolve_config`)."""
    t_start = time.time()
    cfg, resumed, changes = resolve_config(cfg, given)
    cfg = pretrained_run_config(cfg, given)
    check_img_size(cfg.model, cfg.img_size)  # before any folder or data
    ctx = setup_run(cfg, resumed is not None)
    with created_run_dir(ctx.out, create=ctx.info.is_main):
        if ctx.info.is_main:
            for p in clean_stale_temp_files(ctx.out):
                ctx.log(f"removed {p}, left by an interrupted save")
        D.barrier(ctx.info)
        for line in changes:
            ctx.log(f"resume: {line}")
        return _train(ctx, resumed, t_start)


def _train(ctx: RunContext, resumed: dict[str, Any] | None, t_start: float) -> dict[str, Any]:
    cfg = ctx.cfg
    classes = find_run_classes(cfg)  # data first: a missing or empty folder fails before the model is built
    num_classes = cfg.num_classes or len(classes)
    model = build_model(cfg, num_classes, classes)  # same seed on every rank: same initial weights
    if cfg.pretrained and ctx.info.is_main:
        ctx.log(f"weights: {model.load_note}")
    model_info = dict(model_name=cfg.model, model_kwargs=model_kwargs(cfg), num_classes=num_classes,
                      class_names=classes, pretrained_cfg=dict(model.pretrained_cfg))
    data = build_data(ctx, model.pretrained_cfg, classes)
    sched = build_schedule(cfg, ctx.info, data.train_sampler, len(data.train_ds))
    state = build_train_state(ctx, model, sched)
    if resumed is not None:
        state.load_state_dict(train_state_from_run(resumed), ctx.log)
        ctx.log(f"resumed {cfg.resume} at epoch {state.epoch + 1}, step {state.step_in_epoch}/{sched.steps_per_epoch}")
    else:
        seed_all(cfg.seed + ctx.info.rank)  # augmentation and drop path differ per rank; weights are made
    loop = build_loop(ctx, state, data, sched, model_info)
    with loop.stop:  # from here on SIGINT/SIGTERM stop at a step boundary, after writing last.pt
        return _train_epochs(ctx, state, loop, resumed is not None, t_start)


def _train_epochs(ctx: RunContext, state: TrainState, loop: Loop, resumed: bool, t_start: float
                  ) -> dict[str, Any]:
    cfg, model = ctx.cfg, state.model
    if ctx.info.is_main:
        _log_start(ctx, state, loop)
    loop.rows = R.metrics_so_far(ctx.out, state.epoch if resumed else 0) if ctx.info.is_main else []
    last: dict[str, Any] = {}
    for epoch in range(state.epoch, cfg.epochs):
        t_epoch = time.time()
        cur_lr = train_one_epoch(ctx, state, loop, epoch)
        last = end_epoch(ctx, state, loop, epoch, cur_lr, t_epoch)
        if epoch + 1 < cfg.epochs:
            stop_if_asked(ctx, state, loop, saved=True)
    if state.skipped:
        ctx.log(f"skipped {len(state.skipped)} unreadable image(s): " + ", ".join(state.skipped[:20])
                + (" ..." if len(state.skipped) > 20 else ""))
    summary = _summary(ctx, state, loop, last, t_start)
    if ctx.info.is_main:
        if not last and resumed and (ctx.out / R.BEST).is_file():
            summary["note"] = "the resumed run had already finished"
        R.write_summary(ctx.out, summary)
    D.barrier(ctx.info)
    D.cleanup(ctx.info)
    summary["final_state_dict"] = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return summary

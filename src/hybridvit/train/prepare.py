"""Set-up of a training run: processes, device, threads, output folder, precision (`RunContext`), the
data after its checks (`RunData`), the model, the learning-rate schedule and the training state."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..precision import Precision
from ..runtime import plan_threads
from . import distributed as D
from .config import TrainConfig, scaled_lr
from .ema import ModelEma
from .optim import build_optimizer, lr_at
from .report import RunLog
from .resume import TrainState, seed_all
from .run_dir import default_run_dir, prepare_output_dir


def model_kwargs(cfg: TrainConfig) -> dict[str, Any]:
    """create_model overrides that shape the model (stored in checkpoints for eval/predict)."""
    kw: dict[str, Any] = {}
    if cfg.img_size is not None:
        kw["img_size"] = cfg.img_size
    return kw


def build_model(cfg: TrainConfig, num_classes: int, class_names: list[str] | None = None) -> nn.Module:
    """The model to train, through the one loader: random weights, or `--pretrained` (published weights, a
    file, a run or Hub folder) fine-tuned to `num_classes` (a fresh head, logged, where they differ)."""
    from ..loading import FINETUNE, load_for_command
    kw = model_kwargs(cfg)
    if cfg.drop_path_rate is not None:
        kw["drop_path_rate"] = cfg.drop_path_rate
    # the loader's "... start fresh" log line is also in the model's load_note, which training prints as
    # its `weights:` line: said once
    with _without_start_fresh_notes():
        return load_for_command(cfg.pretrained, cfg.model, num_classes=num_classes, purpose=FINETUNE,
                                class_names=class_names, **kw)


@contextlib.contextmanager
def _without_start_fresh_notes():
    import logging

    def keep(record: logging.LogRecord) -> bool:
        return "start fresh" not in record.getMessage()

    logger = logging.getLogger("hybridvit")
    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def pretrained_run_config(cfg: TrainConfig, given: set[str] | None) -> TrainConfig:
    """`--pretrained RUN` (a run checkpoint or folder) starts from the run: its model and input size unless
    the command line names them."""
    if not cfg.pretrained or cfg.resume:
        return cfg
    import dataclasses

    from ..loading import run_defaults
    from .config import FIELDS
    if given is None:
        given = {k for k in ("model", "img_size") if getattr(cfg, k) != FIELDS[k].default}
    take = {k: v for k, v in run_defaults(cfg.pretrained).items() if k not in given}
    return dataclasses.replace(cfg, **take) if take else cfg


@dataclass
class RunContext:
    """Where and how a run computes: configuration, processes, device, precision and output folder."""

    cfg: TrainConfig
    info: D.DistInfo
    out: Path
    log: RunLog
    precision: Precision
    channels_last: bool
    workers: int
    threads: str  # the thread plan, as the header states it

    @property
    def device(self) -> torch.device:
        return self.info.device


def setup_run(cfg: TrainConfig, resuming: bool) -> RunContext:
    """Threads and loader workers (one plan, so they never oversubscribe the CPUs), process group and
    device, the output folder (checked against the run-folder policy, not yet created), the log,
    precision, and the seed every rank shares for building the model."""
    from ..data.loader import is_digits

    info = D.setup(cfg.device)
    precision = Precision.from_amp(cfg.amp, info.device)  # an unknown --amp fails before any folder is made
    plan = plan_threads("train", device=info.device, threads=cfg.threads, workers=cfg.workers,
                        in_memory=is_digits(cfg.data), processes=int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    plan.apply()
    default = default_run_dir(cfg.model)
    out = prepare_output_dir(cfg.output, overwrite=cfg.overwrite, resume=resuming, default=default) \
        if info.is_main else None
    if info.enabled:  # one folder for all ranks: rank 0's
        out = Path(D.all_gather(str(out), info)[0])
    seed_all(cfg.seed)
    channels_last = cfg.channels_last if cfg.channels_last is not None else info.device.type == "cuda"
    return RunContext(cfg, info, out, RunLog(out, info.is_main), precision, channels_last, plan.workers,
                      plan.describe())


@dataclass
class RunData:
    classes: list[str]
    train_ds: Any
    val_ds: Any
    train_sampler: Any
    val_loader: Any


def find_run_classes(cfg: TrainConfig) -> list[str]:
    """The class names of the training split, after the data checks (`data.loader.check_training_data`:
    a missing or empty folder, fewer than 2 classes, unknown validation classes, no readable image):
    they fail here, before any model is built."""
    from ..data.loader import check_training_data

    return check_training_data(cfg.data, cfg.train_split, cfg.val_split, strict=cfg.strict_data)


def run_config(cfg: TrainConfig) -> dict[str, Any]:
    """The configuration a run checkpoint stores: every option, plus `train_folder` and `val_folder`
    (absolute paths of the data, None for the embedded digits) for the commands that use the run later."""
    from ..data.loader import data_folders

    return {**cfg.to_dict(), **data_folders(cfg.data, cfg.train_split, cfg.val_split)}


def build_data(ctx: RunContext, pcfg: dict[str, Any], classes: list[str]) -> RunData:
    """Training and validation sets with the model's preprocessing, and their per-rank samplers."""
    from ..data.loader import EpochSampler, build_dataset, make_loader
    from ..data.transforms import EvalTransform, TrainTransform

    cfg, info = ctx.cfg, ctx.info
    train_tf = TrainTransform(pcfg["input_size"][-1], cfg.scale, cfg.ratio,
                              cfg.train_interpolation or pcfg["interpolation"], seed=cfg.seed)
    train_ds = build_dataset(cfg.data, cfg.train_split, train_tf, classes=classes, strict=cfg.strict_data)
    val_ds = build_dataset(cfg.data, cfg.val_split, EvalTransform.from_cfg(pcfg), classes=classes,
                           strict=cfg.strict_data)
    train_sampler = EpochSampler(len(train_ds), True, cfg.seed, info.rank, info.world_size, pad=True)
    val_sampler = EpochSampler(len(val_ds), False, 0, info.rank, info.world_size, pad=False)
    val_loader = make_loader(val_ds, val_sampler, cfg.batch_size, ctx.workers, drop_last=False,
                             pin_memory=ctx.device.type == "cuda")
    return RunData(classes, train_ds, val_ds, train_sampler, val_loader)


@dataclass
class Schedule:
    """Learning rates (scaled to the global batch) and step counts of the run."""

    lr: float
    min_lr: float
    warmup_lr: float
    world_batch: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    cooldown_steps: int

    def lr_at(self, step: int) -> float:
        return lr_at(step, self.total_steps, self.warmup_steps, self.cooldown_steps, self.lr, self.min_lr,
                     self.warmup_lr)


def build_schedule(cfg: TrainConfig, info: D.DistInfo, train_sampler, n_train: int) -> Schedule:
    world_batch = cfg.batch_size * cfg.accum_steps * info.world_size
    steps = len(train_sampler) // cfg.batch_size // cfg.accum_steps
    if cfg.max_steps_per_epoch:
        steps = min(steps, cfg.max_steps_per_epoch)
    if steps < 1:
        raise ValueError(f"{n_train} training images are fewer than one optimizer step "
                         f"(batch {cfg.batch_size} x accum {cfg.accum_steps} x {info.world_size} processes)")
    lr, min_lr, warmup_lr, _ = scaled_lr(cfg, world_batch)
    return Schedule(lr, min_lr, warmup_lr, world_batch, steps,
                    steps * cfg.epochs, round(cfg.warmup_epochs * steps), round(cfg.cooldown_epochs * steps))


def build_train_state(ctx: RunContext, model: nn.Module, sched: Schedule) -> TrainState:
    """The model on the device (channels_last where asked), its EMA, the optimizer and the grad scaler."""
    cfg = ctx.cfg
    model.to(ctx.device)
    if ctx.channels_last:
        model.to(memory_format=torch.channels_last)
    ema = ModelEma(model, cfg.model_ema_decay) if cfg.model_ema else None
    optimizer = build_optimizer(model, cfg.opt, sched.lr, cfg.weight_decay, cfg.opt_betas, cfg.opt_eps, cfg.momentum)
    return TrainState(model, ema, optimizer, ctx.precision.grad_scaler(), ctx.info, sched.total_steps)

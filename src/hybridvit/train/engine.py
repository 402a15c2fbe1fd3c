"""The training loop: one process per device (torchrun for several), exact step-level resume.

`train(cfg)` reads top to bottom: `setup_run` (distributed, device, seeds, output folder), the data and the
model, a `TrainState` (everything a resume restores), then per epoch `train_one_epoch` and `end_epoch`
(validation with `inference.evaluate`, checkpoints, metrics)."""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._io import clean_stale_temp_files, write_json
from ..checkpoint import make_run_checkpoint, read_checkpoint_file, read_run, save_checkpoint
from ..data.folder import DataError
from ..inference.evaluate import EvaluationStopped, evaluate
from ..precision import Precision
from ..runtime import check_img_size, plan_threads
from . import distributed as D
from .config import TrainConfig, run_header, scaled_lr
from .ema import ModelEma
from .optim import build_optimizer, lr_at
from .run_dir import created_run_dir, prepare_output_dir

__all__ = ["TrainState", "TrainingInterrupted", "build_model", "evaluate", "train", "train_one_epoch"]


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


def build_model(cfg: TrainConfig, num_classes: int, class_names: list[str] | None = None) -> nn.Module:
    from ..loading import FINETUNE, load_for_command
    kw = model_kwargs(cfg)
    if cfg.drop_path_rate is not None:
        kw["drop_path_rate"] = cfg.drop_path_rate
    return load_for_command(cfg.pretrained, cfg.model, num_classes=num_classes, purpose=FINETUNE,
                            class_names=class_names, **kw)


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


# ------------------------------------------------------------------------------------- run context
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


# on --resume: options that change the rest of the run (applied and logged; a new --epochs re-spreads the
# cosine schedule over the new total number of steps), and those that only say how this process computes
# (taken from the command line as they are). Every other option given with a value different from the
# run's is refused: the model, data, batch and augmentation of a run cannot change halfway.
RESUME_MAY_CHANGE = ("epochs", "lr", "checkpoint_every")
RESUME_RUNTIME = ("progress", "plot", "workers", "device", "threads")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def resolve_config(cfg: TrainConfig, given: set[str] | None = None
                   ) -> tuple[TrainConfig, dict[str, Any] | None, list[str]]:
    """For `--resume`: the stored configuration of the run with the changes this invocation may make, its
    checkpoint in the current schema, and the changes as log lines ("--epochs 6 (was 4)"); otherwise `cfg`
    unchanged, None and [].

    given: the options named on the command line (None: those whose value differs from the default).
    Raises ValueError naming every given option that differs from the run and may not change on resume.
    """
    if not cfg.resume:
        return cfg, None, []
    from .config import FIELDS, make_config

    path = find_resume_file(cfg.resume)
    run = read_run(read_checkpoint_file(path), str(path))
    if not run.get("train_state") or not run.get("config"):
        raise ValueError(f"{path} holds no training state to resume (a checkpoint saved for inference only)")
    stored = {k: v for k, v in run["config"].items() if k not in RUN_FACTS}
    new = cfg.to_dict()
    if given is None:  # called from Python: the options that differ from the defaults
        given = {k for k, f in FIELDS.items()
                 if (tuple(new[k]) if isinstance(f.default, tuple) else new[k]) != f.default}
    changes, refused = [], []
    for k in sorted(given):
        if k in ("resume", "source", *RESUME_RUNTIME) or k not in stored:
            continue
        if k == "output":
            if Path(new[k]).resolve() != path.parent.resolve():
                refused.append(f"--output {new[k]} (the run is in {path.parent})")
            continue
        if new[k] == stored[k]:
            continue
        if k in RESUME_MAY_CHANGE:
            changes.append(f"{_flag(k)} {new[k]} (was {stored[k]})")
            stored[k] = new[k]
        else:
            refused.append(f"{_flag(k)} {new[k]} (the run has {stored[k]})")
    if refused:
        raise ValueError(f"--resume {path.parent} continues the run as it was set up, but "
                         + ", ".join(refused) + " differ from it: leave them out, or start a new run with another "
                         "--output. On resume only " + ", ".join(map(_flag, RESUME_MAY_CHANGE)) + " (and "
                         + ", ".join(map(_flag, RESUME_RUNTIME)) + ") may change")
    done = int(run["train_state"].get("epoch", 0))
    if stored["epochs"] < done:
        raise ValueError(f"--epochs {stored['epochs']}: the run in {path.parent} has already completed {done} "
                         f"epochs; pass --epochs {done} or more")
    if "lr" in given and new["lr"] != run["config"]["lr"] and "lr_base_size" not in given:
        stored["lr_base_size"] = None  # an explicit --lr is used as given (timm's behaviour), also on resume
    stored.update({k: new[k] for k in RESUME_RUNTIME}, resume=str(path), output=str(path.parent))
    # the resumed weights replace any starting point: a file's configuration never chooses what else loads
    stored["pretrained"] = None
    return make_config(**stored), run, changes


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
    default = Path("runs") / f"{cfg.model}-{time.strftime('%Y%m%d-%H%M%S')}"
    out = prepare_output_dir(cfg.output, overwrite=cfg.overwrite, resume=resuming, default=default) \
        if info.is_main else None
    if info.enabled:  # one folder for all ranks: rank 0's
        out = Path(D.all_gather(str(out), info)[0])
    seed_all(cfg.seed)
    channels_last = cfg.channels_last if cfg.channels_last is not None else info.device.type == "cuda"
    return RunContext(cfg, info, out, RunLog(out, info.is_main), precision, channels_last, plan.workers,
                      plan.describe())


# ------------------------------------------------------------------------------------- stopping
class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM stopped training after a resumable last.pt was written; `exit_code` is
    128 + the signal number (130, 143), as a shell reports a process the signal ended."""

    def __init__(self, signum: int, out: Path, epoch: int, step: int, steps: int) -> None:
        self.signum, self.out, self.exit_code = signum, out, 128 + signum
        self.resume_command = f"hybridvit train --resume {out}"
        super().__init__(f"{signal.Signals(signum).name}: training stopped at epoch {epoch + 1}, step {step}/{steps}; "
                         f"saved {out / 'last.pt'}. Continue with: {self.resume_command}")


_SAVES_IN_PROGRESS = [0]  # a second signal waits for these: a save killed halfway leaves a temporary file


@contextlib.contextmanager
def _saving():
    _SAVES_IN_PROGRESS[0] += 1
    try:
        yield
    finally:
        _SAVES_IN_PROGRESS[0] -= 1


class StopRequest:
    """SIGINT (Ctrl-C) and SIGTERM during training: the first one is recorded and training stops at the
    next optimizer-step boundary, after writing last.pt (a checkpoint a resume continues exactly); a
    second one stops at once without saving (KeyboardInterrupt), except while a checkpoint is being
    written (it is ignored then: a save killed halfway would leave a half-written temporary file).
    Handlers are installed only in the main thread (Python allows no other), and restored afterwards."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum = signum
            print(f"\n{signal.Signals(signum).name} received: stopping after the current step and writing last.pt "
                  "(send it again to stop at once without saving)", file=sys.stderr, flush=True)
        elif not _SAVES_IN_PROGRESS[0]:
            raise KeyboardInterrupt

    def requested(self, info: D.DistInfo) -> int:
        """The signal to stop for (0: none). Under torchrun every rank asks at the same step and they
        agree (a signal that reached any rank stops all of them together), so that the collective
        checkpoint never leaves a rank waiting."""
        if info.enabled:  # one small all-reduce per step: how many ranks got SIGINT, how many SIGTERM
            n_int, n_term = D.all_sum([float(self.signum == signal.SIGINT), float(self.signum == signal.SIGTERM)],
                                      info)
            return int(signal.SIGTERM) if n_term else int(signal.SIGINT) if n_int else 0
        return self.signum or 0


def stop_if_asked(ctx: RunContext, state: TrainState, loop: Loop, *, saved: bool = False) -> None:
    """Raises TrainingInterrupted when a stop was requested, after writing last.pt at the current step
    (unless `saved`: the end of an epoch has just written it)."""
    signum = loop.stop.requested(ctx.info)
    if not signum:
        return
    if not saved:
        save_run(ctx, state, loop.model_info, [ctx.out / "last.pt"])
    err = TrainingInterrupted(signum, ctx.out, state.epoch, state.step_in_epoch, loop.schedule.steps_per_epoch)
    ctx.log(f"stopped by {signal.Signals(signum).name} at epoch {state.epoch + 1}, step "
            f"{state.step_in_epoch}/{loop.schedule.steps_per_epoch}; continue with: {err.resume_command}")
    D.barrier(ctx.info)
    D.cleanup(ctx.info)
    raise err


# ------------------------------------------------------------------------------------- data
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


# keys of a stored configuration that are facts about the run, not options
RUN_FACTS = ("train_folder", "val_folder")


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


# ------------------------------------------------------------------------------------- train state
@dataclass
class TrainState:
    """Everything a resume restores: model, EMA, optimizer, grad scaler, scheduler position, counters,
    the running metrics of the current epoch and the random states of every rank."""

    model: nn.Module
    ema: ModelEma | None
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    info: D.DistInfo
    total_steps: int
    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    best_top1: float = -1.0
    running: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])  # loss sum, hits, images (rank)
    skipped: list[str] = field(default_factory=list)

    def state_dict(self) -> dict[str, Any]:
        """The state of all ranks (a collective: every rank calls it). Weights under `model` and `ema`."""
        rngs = D.all_gather(rng_state(), self.info)
        runs = D.all_gather(list(self.running), self.info)
        return {
            "model": self.model.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema is not None else None,
            "ema_updates": int(self.ema.updates) if self.ema is not None else 0,
            "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
            "scheduler": {"step": self.global_step, "total": self.total_steps},
            "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "best_top1": self.best_top1,
            "rng": rngs, "running": runs, "skipped_images": list(self.skipped), "world_size": self.info.world_size,
        }

    def load_state_dict(self, state: dict[str, Any], log: RunLog | None = None) -> None:
        """Restores `state_dict()`; the random streams continue exactly when the number of ranks is the same."""
        self.model.load_state_dict(state["model"])
        if self.ema is not None:
            self.ema.module.load_state_dict(state["ema"])
            self.ema.updates.fill_(state["ema_updates"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]
        self.global_step, self.best_top1 = state["scheduler"]["step"], state["best_top1"]
        self.skipped = list(state.get("skipped_images", []))
        rank, world = self.info.rank, self.info.world_size
        if len(state["rng"]) == world:
            self.running = list(state["running"][rank])
            set_rng_state(state["rng"][rank])
        else:
            if log:
                log(f"resuming with {world} processes instead of {len(state['rng'])}: random streams restart")
            seed_all(int(state.get("seed", 0)) + 1000 * self.global_step + rank)


def _train_state_from_run(run: dict[str, Any]) -> dict[str, Any]:
    """A run checkpoint's stored training state in TrainState.state_dict() form."""
    return {**run["train_state"], "model": run["state_dict"], "ema": run["state_dict_ema"],
            "seed": run["config"].get("seed", 0)}


def save_run(ctx: RunContext, state: TrainState, model_info: dict[str, Any], paths: list[Path]) -> None:
    """Writes the run checkpoint to every path in `paths` (rank 0; every rank takes part in the gather)."""
    ts = state.state_dict()
    if not ctx.info.is_main:
        return
    weights, ema = ts.pop("model"), ts.pop("ema")
    ck = make_run_checkpoint(**model_info, state_dict=weights, state_dict_ema=ema, train_state=ts,
                             config=run_config(ctx.cfg))
    with _saving():
        for path in paths:
            save_checkpoint(ck, path)


def build_train_state(ctx: RunContext, model: nn.Module, sched: Schedule) -> TrainState:
    """The model on the device (channels_last where asked), its EMA, the optimizer and the grad scaler."""
    cfg = ctx.cfg
    model.to(ctx.device)
    if ctx.channels_last:
        model.to(memory_format=torch.channels_last)
    ema = ModelEma(model, cfg.model_ema_decay) if cfg.model_ema else None
    optimizer = build_optimizer(model, cfg.opt, sched.lr, cfg.weight_decay, cfg.opt_betas, cfg.opt_eps, cfg.momentum)
    return TrainState(model, ema, optimizer, ctx.precision.grad_scaler(), ctx.info, sched.total_steps)


# ------------------------------------------------------------------------------------- epochs
@dataclass
class Loop:
    """What the epochs share: the model as trained (compiled, DDP-wrapped), the model whose CPU bf16 policy
    applies, on-device augmentation, mixup, data, schedule, and what the checkpoints record."""

    train_model: nn.Module
    kernel_model: nn.Module
    augment: nn.Module
    mixup: Any
    data: RunData
    schedule: Schedule
    model_info: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)
    stop: StopRequest = field(default_factory=StopRequest)
    logged_skipped: list[str] = field(default_factory=list)  # the unreadable images train.log names


def build_loop(ctx: RunContext, state: TrainState, data: RunData, sched: Schedule,
               model_info: dict[str, Any]) -> Loop:
    from ..data.mixup import MixupCutmix
    from ..data.transforms import DeviceAugment

    cfg, info, pcfg = ctx.cfg, ctx.info, model_info["pretrained_cfg"]
    train_model: nn.Module = torch.compile(state.model) if cfg.compile else state.model
    kernel_model = train_model  # bf16 kernels for forward and backward (layers/cpu_bf16.py)
    if info.enabled:
        # depthwise kernels (C, 1, k, k) get gradients whose stride on the size-1 dim differs from
        # DDP's bucket view: harmless (a size-1 dim has no layout), but warned about at every step
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        train_model = nn.parallel.DistributedDataParallel(
            train_model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    augment = DeviceAugment(pcfg["mean"], pcfg["std"], cfg.randaugment, cfg.hflip, cfg.reprob).to(ctx.device)
    mixup = MixupCutmix(model_info["num_classes"], cfg.mixup, cfg.cutmix, cfg.mixup_prob, cfg.mixup_switch_prob,
                        cfg.smoothing)
    return Loop(train_model, kernel_model, augment, mixup, data, sched, model_info)


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
    # forward and backward share the bf16 kernel policy of the model (layers/cpu_bf16.py)
    with no_sync, ctx.precision.kernels(loop.kernel_model):
        with ctx.precision.autocast():
            logits = _forward_train(loop.train_model, x)
        if loop.mixup.active:
            loss = soft_cross_entropy(logits, y_soft)
        else:
            loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.smoothing)
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

    from ..data.loader import make_loader

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
        if (cfg.checkpoint_every and state.global_step % cfg.checkpoint_every == 0
                and state.step_in_epoch < sched.steps_per_epoch):
            save_run(ctx, state, loop.model_info, [ctx.out / "last.pt"])
        if state.step_in_epoch < sched.steps_per_epoch:  # the last step's stop waits for end_epoch's save
            stop_if_asked(ctx, state, loop)
    bar.close()
    return cur_lr


def _no_image_error(ctx: RunContext, state: TrainState, epoch: int) -> DataError:
    from ..data.loader import is_digits

    cfg = ctx.cfg
    where = "the embedded digits" if is_digits(cfg.data) else str(Path(cfg.data) / cfg.train_split)
    bad = sorted({p for ps in D.all_gather(state.skipped, ctx.info) for p in ps})
    example = f" (unreadable: {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''})" if bad else ""
    return DataError(f"epoch {epoch + 1} read no image of {where}{example}: every image it drew was unreadable. "
                     "Check the files (e.g. open them with PIL) or run with --strict-data to stop at the first one")


def end_epoch(ctx: RunContext, state: TrainState, loop: Loop, epoch: int, cur_lr: float,
              t_epoch: float) -> dict[str, Any]:
    """Reduces the training metrics, validates (and the EMA), writes last.pt/best.pt and the metrics row."""
    cfg, info = ctx.cfg, ctx.info
    loss_sum, hits, seen = D.all_sum(state.running, info)
    if seen == 0:
        raise _no_image_error(ctx, state, epoch)
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
    state.epoch, state.step_in_epoch = epoch + 1, 0
    save_run(ctx, state, loop.model_info, [ctx.out / "last.pt"] + ([ctx.out / "best.pt"] if is_best else []))
    if info.is_main:
        loop.rows.append(row)
        with open(ctx.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        if cfg.plot:
            plot_metrics(loop.rows, ctx.out / "metrics.png")
    ema_txt = f", EMA {row['val_top1_ema']:.2f}%" if state.ema is not None else ""
    top5 = f", top-5 {val['top5']:.2f}%" if val["top5"] is not None else ""
    ctx.log(f"epoch {epoch + 1}/{cfg.epochs}: train loss {row['train_loss']:.4f}, val loss {val['loss']:.4f}, "
            f"val top-1 {val['top1']:.2f}%{ema_txt}{top5} ({row['epoch_time_s']:.1f}s)")
    return row


# ------------------------------------------------------------------------------------- training
def _metrics_so_far(ctx: RunContext, resumed: bool, start_epoch: int) -> list[dict[str, Any]]:
    """The metric rows of the epochs before `start_epoch` (a resumed run), the file rewritten to hold only
    those; a fresh run starts an empty file."""
    path = ctx.out / "metrics.jsonl"
    if not (ctx.info.is_main and path.is_file()):
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r["epoch"] < start_epoch] if resumed else []
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


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
        "val_top1_last": last.get("val_top1"), "val_top5_last": last.get("val_top5"),
        "checkpoint": str((out / "best.pt").resolve()), "last_checkpoint": str((out / "last.pt").resolve()),
        "output": str(out.resolve()), "data": cfg.data, "num_classes": loop.model_info["num_classes"],
        "train_images": len(loop.data.train_ds), "val_images": len(loop.data.val_ds),
        "skipped_images": state.skipped, "world_size": ctx.info.world_size, "device": str(ctx.device),
        "precision": ctx.precision.name, "recipe": cfg.recipe, "wall_time_s": round(time.time() - t_start, 1),
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
        state.load_state_dict(_train_state_from_run(resumed), ctx.log)
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
    loop.rows = _metrics_so_far(ctx, resumed, state.epoch)
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
        if not last and resumed and (ctx.out / "best.pt").is_file():
            summary["note"] = "the resumed run had already finished"
        write_json(ctx.out / "summary.json", summary)
    D.barrier(ctx.info)
    D.cleanup(ctx.info)
    summary["final_state_dict"] = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return summary

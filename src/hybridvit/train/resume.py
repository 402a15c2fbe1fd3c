"""On `--resume`: which options may change, the stored configuration as it continues, and the
training state (`TrainState`) with the random states of every rank, so that a resumed run continues exactly."""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import read_checkpoint_file, read_run
from . import distributed as D
from .config import TrainConfig
from .ema import ModelEma
from .report import RunLog
from .run_dir import LAST


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
        p = p / LAST
    if not p.is_file():
        raise FileNotFoundError(f"nothing to resume: {p} does not exist (pass the run folder of an earlier "
                                "`hybridvit train --output DIR`)")
    return p


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


# keys of a stored configuration that are facts about the run, not options
RUN_FACTS = ("train_folder", "val_folder")


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
    best_epoch: int = 0  # the epoch (1-based) of best_top1; 0 before the first validation
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
            "best_epoch": self.best_epoch, "rng": rngs, "running": runs, "skipped_images": list(self.skipped),
            "world_size": self.info.world_size,
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
        self.best_epoch = int(state.get("best_epoch", 0))  # 0: a last.pt from before it was recorded
        self.skipped = list(state.get("skipped_images", []))
        rank, world = self.info.rank, self.info.world_size
        if len(state["rng"]) == world:
            self.running = list(state["running"][rank])
            set_rng_state(state["rng"][rank])
        else:
            if log:
                log(f"resuming with {world} processes instead of {len(state['rng'])}: random streams restart")
            seed_all(int(state.get("seed", 0)) + 1000 * self.global_step + rank)


def train_state_from_run(run: dict[str, Any]) -> dict[str, Any]:
    """A run checkpoint's stored training state in TrainState.state_dict() form."""
    return {**run["train_state"], "model": run["state_dict"], "ema": run["state_dict_ema"],
            "seed": run["config"].get("seed", 0)}

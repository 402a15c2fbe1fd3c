"""What a run reports besides its checkpoints: the log (stdout and train.log), the plot of the metrics,
and the error of an epoch that read no image."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from .._io import atomic_save
from ..data.folder import DataError
from . import distributed as D
from .config import TrainConfig
from .run_dir import LOG


class RunLog:
    """Messages to stdout (through tqdm) and DIR/train.log; only rank 0 writes."""

    def __init__(self, out: Path | None, enabled: bool) -> None:
        self.path = out / LOG if out else None
        self.enabled = enabled

    def __call__(self, msg: str, terminal: bool = True) -> None:
        """Writes `msg` to train.log, and to stdout unless `terminal` is False."""
        if not self.enabled:
            return
        if terminal:
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
    try:
        atomic_save(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    finally:
        plt.close(fig)


def no_image_error(cfg: TrainConfig, info: D.DistInfo, skipped: list[str], epoch: int) -> DataError:
    """The error of an epoch that read no image: every one it drew was unreadable (collective: the ranks'
    unreadable images are gathered)."""
    from ..data.loader import is_digits

    where = "the embedded digits" if is_digits(cfg.data) else str(Path(cfg.data) / cfg.train_split)
    bad = sorted({p for ps in D.all_gather(skipped, info) for p in ps})
    example = f" (unreadable: {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''})" if bad else ""
    return DataError(f"epoch {epoch + 1} read no image of {where}{example}: every image it drew was unreadable. "
                     "Check the files (e.g. open them with PIL) or run with --strict-data to stop at the first one")

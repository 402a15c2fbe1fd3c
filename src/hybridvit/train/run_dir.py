"""The output folder of a training run: runs never overwrite each other unless asked.

Policy (one place, used by `hybridvit train`):
- `--output DIR` naming a folder that already holds a run (a checkpoint, summary, log or metrics)
  is refused, saying how to go on: `--overwrite` (the old run's files are deleted first, so that
  train.log and metrics.jsonl never mix two runs), `--resume DIR`, or another folder. An empty or
  missing folder is used as is; files that are not a run's (notes, data) are never deleted.
- With no `--output`, the default `runs/<model>-<timestamp>` gets a numbered suffix (`-2`, `-3`, ...)
  when that name is taken (two runs started in the same second).
- `--resume DIR` continues the run in DIR, which must exist.
- The folder is created only by `created_run_dir` (or `output_dir`), and removed again when the run
  fails before it wrote a checkpoint (e.g. the data check fails): failed starts leave no empty folders.
"""
from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .._io import OutputError, save_torch, write_json

# what a run writes into its folder, and nothing else: every name is here
LAST, BEST = "last.pt", "best.pt"  # the run checkpoints: the latest state (resume) and the best validation
SUMMARY, LOG = "summary.json", "train.log"
METRICS, PLOT = "metrics.jsonl", "metrics.png"  # one JSON row per epoch, and their curves
RUN_FILES = (LAST, BEST, SUMMARY, LOG, METRICS, PLOT)


class RunExistsError(ValueError):
    """The output folder holds another run and neither --overwrite nor --resume was given."""


def run_files(path: Path) -> list[Path]:
    """The files of a run in `path`. Half-written temporaries of a killed save (`.NAME.tmpPID.SUFFIX`) are not a
    run: the run that starts in the folder removes them (`_io.clean_stale_temp_files`)."""
    if not path.is_dir():
        return []
    return sorted(path / n for n in RUN_FILES if (path / n).exists())


def default_run_dir(model: str) -> Path:
    """runs/<model>-<timestamp>, the folder of a run without --output (`prepare_output_dir` numbers it
    when taken)."""
    import time

    return Path("runs") / f"{model}-{time.strftime('%Y%m%d-%H%M%S')}"


def prepare_output_dir(path: str | Path | None, *, overwrite: bool = False, resume: bool = False,
                       default: str | Path | None = None) -> Path:
    """The folder a run writes to, checked against the policy above (nothing is created here).

    path: `--output` (None: `default`, e.g. runs/<model>-<timestamp>, made unique with a suffix).
    overwrite: delete the run files already in `path` first. resume: `path` is the run to continue.
    Raises RunExistsError (a ValueError) when `path` holds a run and neither flag is given,
    FileNotFoundError when resuming a folder that does not exist, ValueError when `path` is a file.
    """
    if path is None:
        if default is None:
            raise ValueError("prepare_output_dir needs a path or a default")
        base = Path(default)
        out, n = base, 1
        while out.exists():
            n += 1
            out = base.with_name(f"{base.name}-{n}")
        return out
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output {out} is a file; pass a folder")
    if resume:
        if not out.is_dir():
            raise FileNotFoundError(f"nothing to resume: run folder {out} does not exist")
        return out
    existing = run_files(out)
    if existing and not overwrite:
        names = ", ".join(p.name for p in existing[:4]) + (" ..." if len(existing) > 4 else "")
        raise RunExistsError(f"--output {out} already holds a run ({names}); pass --overwrite to replace it, "
                             f"--resume {out} to continue it, or another --output folder")
    for p in existing:
        p.unlink()
    return out


@contextlib.contextmanager
def created_run_dir(out: str | Path, *, create: bool = True) -> Iterator[Path]:
    """Creates `out` (`create`: False on ranks other than 0) for the body of the `with`; when the body
    raises before a checkpoint exists, a folder this call created is removed again (the error still
    propagates). `out` comes from `prepare_output_dir`."""
    from .._io import check_output_dir

    out = Path(out)
    # the folders this call creates, `out` first, then the missing parents (`runs/` of a first run)
    created = [p for p in (out, *out.parents) if not p.exists()] if create else []
    if create:
        check_output_dir(out, "--output")
    try:
        yield out
    except BaseException:
        if created and not any(out.glob("*.pt")):
            shutil.rmtree(out, ignore_errors=True)
            for parent in created[1:]:
                with contextlib.suppress(OSError):
                    parent.rmdir()  # only when empty: never another run's files
        raise


@contextlib.contextmanager
def output_dir(path: str | Path | None, *, overwrite: bool = False, resume: bool = False,
               default: str | Path | None = None) -> Iterator[Path]:
    """`prepare_output_dir`, then `created_run_dir` (single process)."""
    with created_run_dir(prepare_output_dir(path, overwrite=overwrite, resume=resume, default=default)) as out:
        yield out


# ----------------------------------------------------------------------------------- the files
def write_checkpoint(ck: dict[str, Any], path: Path) -> None:
    """A run checkpoint through the one atomic write: a full disk keeps the previous file and says so."""
    try:
        save_torch(ck, path)
    except OutputError as e:
        raise OutputError(f"{e}, then continue with `hybridvit train --resume {path.parent}`") from e.__cause__


def write_summary(out: Path, summary: dict[str, Any]) -> None:
    write_json(out / SUMMARY, summary)


def append_metrics(out: Path, row: dict[str, Any]) -> None:
    with open(out / METRICS, "a") as f:
        f.write(json.dumps(row) + "\n")


def metrics_so_far(out: Path, start_epoch: int) -> list[dict[str, Any]]:
    """The metric rows of the epochs before `start_epoch` (0 for a fresh run), the file rewritten to hold
    only those."""
    path = out / METRICS
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r["epoch"] < start_epoch]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows

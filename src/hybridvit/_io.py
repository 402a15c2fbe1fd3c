"""Writing files: output paths checked before the work, the one atomic write, and plain words for a
full disk.

Every command that writes a file or a folder calls `check_output_file` / `check_output_dir` before it
loads a model or reads data: a missing parent folder is created, a read-only folder or a parent that
is a file is refused with one line (an OutputError, a ValueError the command line prints as
`error: ...`). Every file is then written by `atomic_write`: a hidden temporary sibling, synced and
renamed over the target, so that a crash or a full disk never leaves a half-written file and keeps
the previous one.
"""
from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from ._stop import remove_on_stop

__all__ = ["OutputError", "atomic_save", "atomic_write", "check_output_dir", "check_output_file", "check_new_files",
           "clean_stale_temp_files", "save_torch", "temp_path", "write_json", "write_text"]


class OutputError(ValueError):
    """An output path that cannot be written (read-only, a file where a folder is needed, a full disk)."""


def _problem(folder: Path) -> str | None:
    """Why files cannot be created in `folder` (None: they can); `folder` may not exist yet."""
    for parent in (folder, *folder.parents):
        if parent.exists():
            if not parent.is_dir():
                return f"{parent} is a file, not a folder"
            if not os.access(parent, os.W_OK | os.X_OK):
                return f"{parent} is not writable" + ("" if parent == folder else f" (cannot create {folder})")
            return None
    return None


def _prepare(folder: Path, label: str, create: bool) -> None:
    problem = _problem(folder)
    if problem:
        raise OutputError(f"{label}: {problem}; choose another place")
    if create:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"{label}: cannot create {folder} ({_reason(e)}); choose another place") from e


def check_output_dir(folder: str | os.PathLike, what: str = "--output", create: bool = True) -> Path:
    """`folder` ready for writing: created with its parents (`create`), or OutputError with one line
    saying why not (a read-only folder, a path through a file)."""
    from .errors import printable

    folder = Path(folder)
    _prepare(folder, f"{what} {printable(folder, None)}", create)
    return folder


def check_output_file(path: str | os.PathLike, what: str = "--output", overwrite: bool | None = None) -> Path:
    """`path` ready to be written: its parent folders created, or OutputError with one line (a folder
    where the file should be, a read-only file or folder, a parent that is a file). `overwrite` False
    (a command run without --overwrite): an existing file is refused too."""
    from .errors import printable

    path = Path(path)
    label = f"{what} {printable(path, None)}"
    if path.is_dir():
        raise OutputError(f"{label} is a folder; pass a file name")
    if overwrite is False and path.exists():
        raise OutputError(refuse_existing(label))
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputError(f"{label}: the file is read-only; choose another place")
    _prepare(path.parent, label, create=True)
    return path


def refuse_existing(label: str) -> str:
    """The one line that refuses to write over an existing file without --overwrite."""
    return f"{label} exists: pass --overwrite to replace it, or choose another name"


def check_new_files(paths: list[Path], what: str, overwrite: bool) -> None:
    """OutputError naming the first of `paths` that exists, unless `overwrite`."""
    from .errors import printable

    if not overwrite:
        for path in paths:
            if path.exists():
                raise OutputError(refuse_existing(f"{what}: {printable(path, None)}"))


def temp_path(path: Path) -> Path:
    """The temporary file a write goes to before it is renamed: a hidden sibling marked with the process id,
    with the same suffix (writers that check it, like torch.export.save, accept it)."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}{path.suffix}")


def clean_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Removes the temporary files that killed writes left in `folder` (`.NAME.tmpPID.SUFFIX`); returns them."""
    stale = [p for p in Path(folder).glob(".*.tmp*") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def _reason(e: BaseException) -> str:
    if isinstance(e, OSError) and e.errno:
        return os.strerror(e.errno)
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _open(path: Path) -> IO[bytes]:
    return open(path, "wb")


class _Recording:
    """A binary file that remembers the OSError its last write raised: torch.save reports a failed write
    as an unrelated RuntimeError ("unexpected pos"); the recorded error says what happened."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self.f, name)


def _failed(path: Path, tmp: Path, error: BaseException, what: str | None) -> OutputError:
    tmp.unlink(missing_ok=True)
    kept = f"the previous {path.name} is kept" if path.exists() else f"no {path.name} was written"
    advice = ("free disk space or choose another output place" if getattr(error, "errno", None) in
              (errno.ENOSPC, errno.EDQUOT) else "check the output path")
    return OutputError(f"could not write {what or path}: {_reason(error)} ({kept}); {advice}")


@contextmanager
def _temporary(path: Path, what: str | None, recorded: Callable[[], BaseException | None] = lambda: None
               ) -> Iterator[Path]:
    """The temporary sibling a write goes to (`temp_path`), removed when the write fails or is stopped
    (also by `_stop.hard_stop`); an OSError or RuntimeError becomes an OutputError that says why (the
    error `recorded()` returns, where the writer kept a truer one)."""
    tmp = temp_path(path)
    try:
        with remove_on_stop(tmp):
            yield tmp
    except (OSError, RuntimeError) as e:
        raise _failed(path, tmp, recorded() or e, what) from e
    except BaseException:  # Ctrl-C, SIGTERM: no temporary file stays behind
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any], what: str | None = None) -> Path:
    """Calls `write(f)` with a binary file that becomes `path` only when it completed and reached the
    disk (temporary sibling, fsync, rename). On failure the temporary file is removed, the previous
    `path` (if any) stays, and an OutputError says why: a full disk is "No space left on device"."""
    path = Path(path)
    rec = None
    with _temporary(path, what, lambda: rec.error if rec is not None else None) as tmp:
        with _open(tmp) as raw:
            rec = _Recording(raw)
            write(rec)
            rec.flush()
            os.fsync(rec.fileno())
        os.replace(tmp, path)
    return path


def atomic_save(path: str | os.PathLike, save: Callable[[Path], Any], what: str | None = None) -> Path:
    """`atomic_write` for a writer that takes a file name (`save(tmp_path)`), e.g. an ONNX program's."""
    path = Path(path)
    with _temporary(path, what) as tmp:
        save(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return path


def save_torch(obj: Any, path: str | os.PathLike, what: str | None = None) -> Path:
    """torch.save(obj) to `path` through `atomic_write`."""
    import torch

    return atomic_write(path, lambda f: torch.save(obj, f), what)


def write_text(path: str | os.PathLike, text: str, what: str | None = None) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode()), what)


def write_json(path: str | os.PathLike, obj: Any, what: str | None = None) -> Path:
    return write_text(path, json.dumps(obj, indent=1) + "\n", what)

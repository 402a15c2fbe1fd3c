"""Stopping a command on Ctrl-C (SIGINT) or SIGTERM with one line, also where Python cannot unwind.

A signal normally becomes an exception (KeyboardInterrupt, `cli.Terminated`) that the command line turns
into one line and exit 130 / 143. While PyTorch traces a model (`torch.export`, the ONNX exporter,
`torch.compile`), Python code runs inside C++ callbacks; an exception raised there by a signal handler
cannot cross them, and the process aborts (SIGABRT, a core dump and a page of C++ stack). `hard_stop`
is for those commands: the signal ends the process at once, after removing the temporary files and
folders registered with `remove_on_stop` (so an interrupted export leaves neither a half-written file
nor its temporary), with the same line and exit code.
"""
from __future__ import annotations

import os
import shutil
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["hard_stop", "remove_on_stop", "stop_line"]

_PENDING: set[Path] = set()  # temporary files and folders of the writes under way
_ACTIVE: list[str] = []  # the commands under hard_stop (innermost last)


def stop_line(signum: int, command: str) -> str:
    """The one line a command prints when a signal stops it."""
    if signum == signal.SIGINT:
        return f"interrupted (Ctrl-C): `hybridvit {command}` stopped"
    return f"stopped by {signal.Signals(signum).name}: `hybridvit {command}` did not finish"


@contextmanager
def remove_on_stop(path: str | os.PathLike) -> Iterator[Path]:
    """Registers `path` (a temporary file or folder) for removal if `hard_stop` ends the process while
    the block runs; the block itself removes or renames it as usual."""
    p = Path(path)
    _PENDING.add(p)
    try:
        yield p
    finally:
        _PENDING.discard(p)


def _remove_pending() -> None:
    for p in list(_PENDING):
        try:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        except OSError:
            pass


def _stop_now(signum: int, frame: object) -> None:
    _remove_pending()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # a flush interrupted by this very signal: the line below still goes out
            pass
    os.write(2, f"\n{stop_line(signum, _ACTIVE[-1])}\n".encode())
    os._exit(128 + signum)


@contextmanager
def hard_stop(command: str) -> Iterator[None]:
    """While the block runs, SIGINT and SIGTERM end the process at once with `stop_line` and exit
    128 + the signal number, after removing the paths registered with `remove_on_stop`. Outside the
    main thread (where signal handlers cannot be set) the block runs unchanged."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _ACTIVE.append(command)
    old = {sig: signal.signal(sig, _stop_now) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        _ACTIVE.pop()

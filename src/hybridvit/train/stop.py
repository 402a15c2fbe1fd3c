"""Stop signals during training: SIGINT/SIGTERM are recorded and training stops at the next step
boundary after writing last.pt (`StopRequest`); `TrainingInterrupted` carries the exit code (130, 143)."""
from __future__ import annotations

import contextlib
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from ..errors import printable
from . import distributed as D
from .run_dir import LAST


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM stopped training after a resumable last.pt was written; `exit_code` is
    128 + the signal number (130, 143), as a shell reports a process the signal ended."""

    def __init__(self, signum: int, out: Path, epoch: int, step: int, steps: int) -> None:
        self.signum, self.out, self.exit_code = signum, out, 128 + signum
        self.resume_command = f"hybridvit train --resume {printable(out, None)}"
        super().__init__(f"{signal.Signals(signum).name}: training stopped at epoch {epoch + 1}, step {step}/{steps}; "
                         f"saved {printable(out / LAST, None)}. Continue with: {self.resume_command}")


_SAVES_IN_PROGRESS = [0]  # a second signal waits for these: a save killed halfway leaves a temporary file


@contextlib.contextmanager
def saving():
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

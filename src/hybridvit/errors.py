"""The exceptions users see, in a leaf module every layer may import (nothing here imports hybridvit)."""
from __future__ import annotations

from typing import Any


class CheckpointError(ValueError):
    """A checkpoint file, Hub folder or configuration that cannot be read, is refused, or does not fit
    the model. The message names the file and says what to do."""


class ConfigError(CheckpointError):
    """Configuration stored in a file (config.json's `model_args`, a run's `model_kwargs`) that sets a key
    or value hybridvit does not accept from a file."""


def printable(text: Any, limit: int | None = 200) -> str:
    """`text` from a file or the file system (a name, a path), safe to print: control characters (ANSI
    escapes, newlines) escaped; at most `limit` characters of it (None: all, as for paths)."""
    s = str(text)[:limit]
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in s)

"""The exceptions users see, in a leaf module every layer may import (nothing here imports hybridvit)."""
from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint file, Hub folder or configuration that cannot be read, is refused, or does not fit
    the model. The message names the file and says what to do."""


class ConfigError(CheckpointError):
    """Configuration stored in a file (config.json's `model_args`, a run's `model_kwargs`) that sets a key
    or value hybridvit does not accept from a file."""

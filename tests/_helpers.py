"""Helpers shared by the command-line tests: the one error line a bad command prints, a run checkpoint whose
answers are known without training, and the options of a tiny one-process training run."""
from __future__ import annotations

from pathlib import Path

import torch

import hybridvit
from hybridvit.checkpoint import make_run_checkpoint
from hybridvit.cli import main

FAST = ["--threads", "1", "--workers", "0", "--no-progress"]
TINY_TRAIN = ["--model", "fastervit_nano", "--img-size", "32", "--batch-size", "4", *FAST, "--no-plot",
              "--no-model-ema", "--no-channels-last"]


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a child Python process that imports this checkout's hybridvit (plus `extra`)."""
    import os

    src = str(Path(hybridvit.__file__).resolve().parents[1])
    return {**os.environ, **extra, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}


def user_error(argv: list[str], capsys, exc=(ValueError, FileNotFoundError)) -> str:
    """The message a user sees for a bad command: the exception a command raises (which `hybridvit`'s
    main prints as one `error:` line) or, where main already does that, its stderr (exit status 2)."""
    try:
        rc = main(argv)
    except exc as e:
        return str(e)
    assert rc == 2, f"{argv} succeeded (exit {rc}) instead of failing"
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "Traceback" not in err
    return err


def error_line(argv: list[str], capsys) -> str:
    """The `error:` line of a command that must fail (exit 2) with no traceback; it ends stderr (warnings
    about single images may come before it)."""
    assert main(argv) == 2, f"{argv} did not fail"
    err = capsys.readouterr().err.strip()
    assert err.splitlines()[-1].startswith("error:") and "Traceback" not in err and err.count("error:") == 1, err
    return err.splitlines()[-1]


def constant_model(num_classes: int, winner: int) -> torch.nn.Module:
    """fastervit_nano at 32 px whose head always picks class `winner` (zero weights, one large bias):
    its top-1 on an image is known without training."""
    torch.manual_seed(0)
    model = hybridvit.create_model("fastervit_nano", num_classes=num_classes, img_size=32)
    head = model.get_submodule(model.pretrained_cfg.get("classifier", "head"))
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[winner] = 10.0
    return model


def run_checkpoint(path: Path, classes: list[str], winner: str) -> Path:
    model = constant_model(len(classes), classes.index(winner))
    torch.save(make_run_checkpoint(model_name="fastervit_nano", model_kwargs={"img_size": 32},
                                   num_classes=len(classes), class_names=classes,
                                   pretrained_cfg=model.pretrained_cfg, state_dict=model.state_dict()), path)
    return path


def cli_subprocess(*argv) -> str:
    """`python -m hybridvit ARGV` in a child process: its stdout (a failure shows its stderr).

    The tests run OpenVINO's int8 kernels this way, never in the test process: after they had run in it, a
    later subprocess call of the suite died of a SIGSEGV (si_code SI_KERNEL, inside poll) that no single
    test reproduces. A user's command runs in its own process, as here."""
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-m", "hybridvit", *map(str, argv)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout

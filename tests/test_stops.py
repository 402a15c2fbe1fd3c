"""Stops (issue 19): a signal to the whole process group, as `timeout`, SLURM and Kubernetes send it. Loader
workers ignore SIGINT/SIGTERM; training ends with 143 (130 for SIGINT), a resumable last.pt and no
traceback, also when the signal lands in validation; eval, predict, export and bench stop with one line and
130/143. Those processes run in their own session (`setsid`) and the test signals the group. A signal to the
training process alone (Ctrl-C, SIGTERM) or to one DDP rank also leaves one resumable checkpoint."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _helpers import FAST, TINY_TRAIN, child_env

import hybridvit
from hybridvit.checkpoint import make_run_checkpoint
from hybridvit.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")]

TRAIN = ["--model", "fastervit_nano", "--img-size", "32", "--batch-size", "4", "--threads", "1", "--no-plot",
         "--no-model-ema", "--no-channels-last", "--no-progress"]


def _start(args: list[str], **kw) -> subprocess.Popen:
    env = child_env()
    code = "import sys; from hybridvit.cli import main; sys.exit(main())"
    # the child starts with SIGINT at its default action, as in a terminal: a test run launched in the
    # background of a non-interactive shell inherits SIGINT ignored, and Python then keeps ignoring it
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **kw)


def _signal_group(proc: subprocess.Popen, sig: int) -> tuple[str, str]:
    os.killpg(proc.pid, sig)  # the process and its loader workers alike
    out, err = proc.communicate(timeout=180)
    return out.decode(errors="replace"), err.decode(errors="replace")


def _wait_for(pred, proc: subprocess.Popen, what: str, timeout: float = 180.0) -> None:
    t0 = time.time()
    while not pred():
        assert proc.poll() is None, (what, proc.communicate())
        assert time.time() - t0 < timeout, f"{what}: timed out"
        time.sleep(0.1)


def _folder(root: Path, n_train: int, n_val: int) -> Path:
    from _imagedata import make_folder

    return make_folder(root, n_train=n_train, n_val=n_val, size=24)


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_group_signal_during_training_leaves_a_resumable_run(tmp_path, sig, code):
    pytest.importorskip("kornia", reason="needs the train extra (kornia)")
    data = _folder(tmp_path / "data", n_train=24, n_val=4)  # 48 images / batch 4: 12 steps per epoch
    out = tmp_path / "run"
    proc = _start(["train", "--data", str(data), "--epochs", "50", "--output", str(out), "--workers", "1", *TRAIN])
    try:
        log = out / "train.log"
        _wait_for(lambda: log.is_file() and "augmentation:" in log.read_text(), proc, "training start")
        time.sleep(1.5)
        _, err = _signal_group(proc, sig)
    finally:
        proc.kill()
    assert proc.returncode == code, err
    assert "Traceback" not in err and "DataLoader worker" not in err and "could not write" not in err, err
    assert f"{sig.name}: training stopped at epoch" in err and f"hybridvit train --resume {out}" in err
    state = torch.load(out / "last.pt", weights_only=True)["train_state"]
    assert state["scheduler"]["step"] == state["epoch"] * 12 + state["step_in_epoch"] >= 1
    assert not list(out.glob(".*tmp*"))


def test_a_group_sigterm_during_validation_stops_it_and_resume_finishes_it(tmp_path):
    pytest.importorskip("kornia", reason="needs the train extra (kornia)")
    # one training step per epoch, then a long validation (600 large images, seconds to decode even on a fast
    # machine): the signal lands in validation
    data = _folder(tmp_path / "data", n_train=4, n_val=300)
    _large_validation_images(data / "val")
    out = tmp_path / "run"
    proc = _start(["train", "--data", str(data), "--epochs", "1", "--max-steps-per-epoch", "1", "--output", str(out),
                   "--workers", "1", *TRAIN])
    try:
        log = out / "train.log"
        _wait_for(lambda: log.is_file() and "augmentation:" in log.read_text(), proc, "training start")
        time.sleep(2.0)
        _, err = _signal_group(proc, signal.SIGTERM)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    assert "Traceback" not in err and "SIGTERM: training stopped at epoch 1, step 1/1" in err, err
    metrics = out / "metrics.jsonl"
    assert not (metrics.is_file() and metrics.read_text().strip())  # validation did not finish: no epoch row
    ck = torch.load(out / "last.pt", weights_only=True)
    assert ck["train_state"]["step_in_epoch"] == 1 and ck["train_state"]["epoch"] == 0
    assert ck["config"]["val_folder"] == str((data / "val").resolve())
    resumed = _start(["train", "--resume", str(out), "--workers", "0", "--threads", "1", "--no-progress"])
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["val_images"] == 600 and summary["epochs"] == 1


def _large_validation_images(val: Path) -> None:
    """Every validation image replaced by a hard link to one 900x900 PNG (decoding dominates validation)."""
    import numpy as np
    from PIL import Image

    big = val.parent / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (900, 900, 3), dtype=np.uint8)).save(big)
    for f in val.rglob("*.png"):
        f.unlink()
        os.link(big, f)


def _checkpoint(path: Path) -> Path:
    model = hybridvit.create_model("fastervit_nano", num_classes=2, img_size=32)
    torch.save(make_run_checkpoint(model_name="fastervit_nano", model_kwargs={"img_size": 32}, num_classes=2,
                                   class_names=["blue", "red"], pretrained_cfg=model.pretrained_cfg,
                                   state_dict=model.state_dict()), path)
    return path


def _many_images(folder: Path, n: int) -> Path:
    """`n` hard links to one large PNG in two class folders: a long eval or predict, made in no time."""
    import numpy as np
    from PIL import Image

    src = folder / "src.png"
    folder.mkdir(parents=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (900, 900, 3), dtype=np.uint8)).save(src)
    for c in ("blue", "red"):
        (folder / "val" / c).mkdir(parents=True)
        for i in range(n // 2):
            os.link(src, folder / "val" / c / f"{i:04d}.png")
    src.unlink()
    return folder


@pytest.mark.parametrize("command", ["eval", "predict", "bench", "export"])
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_commands_stop_with_one_line(command, sig, code, tmp_path):
    pytest.importorskip("tqdm", reason="the progress bar tells when the work started")
    ckpt = _checkpoint(tmp_path / "run.pt")
    data = _many_images(tmp_path / "data", 400) if command in ("eval", "predict") else None
    args = {
        "eval": ["eval", "--pretrained", str(ckpt), "--data", str(data), "--workers", "1", "--threads", "1",
                 "--batch-size", "4"],
        "predict": ["predict", "--pretrained", str(ckpt), str(data), "--threads", "1", "--batch-size", "2"],
        "bench": ["bench", "--pretrained", str(ckpt), "-b", "1", "--repeats", "100000", "--threads", "1"],
        # a large model at 224 px: tracing it takes far longer than the wait before the signal
        "export": ["export", "--model", "crossformer_b", "--format", "pt2", "-o", str(tmp_path / "m.pt2"),
                   "--threads", "1"],
    }[command]
    proc = _start(args)
    try:
        if command in ("eval", "predict"):  # the progress bar is on stdout once the images are read
            os.set_blocking(proc.stdout.fileno(), False)
            seen = bytearray()

            def started() -> bool:
                seen.extend(proc.stdout.read() or b"")
                return len(seen) > 0
            _wait_for(started, proc, f"{command} start")
        else:
            time.sleep(6.0)  # past start-up: bench repeats forever, export traces for seconds
        if proc.poll() is not None and command == "export":
            pytest.fail(f"export finished before the signal: {proc.communicate()}")
        _, err = _signal_group(proc, sig)
    finally:
        proc.kill()
    assert proc.returncode == code, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert "Traceback" not in err and len(lines) == 1, err
    word = "interrupted (Ctrl-C)" if sig == signal.SIGINT else "stopped by SIGTERM"
    assert lines[0].startswith(word) and f"hybridvit {command}" in lines[0]
    if command == "export":
        assert not (tmp_path / "m.pt2").exists() and not list(tmp_path.glob(".*tmp*"))


# In the child: the signal arrives while Python code runs inside PyTorch's C++ dispatcher (the rule lookup it
# calls for each operator torch.export traces), at the Nth lookup. An exception raised there by the default
# handlers could not cross the C++ frames: at some N (2000 and 5000 for fastervit_0 under torch 2.13, found
# by a scan) the process aborted with SIGABRT and a page of C++ stack, which CI once met by chance. Since
# export traces the fused model (issue 30: its tables are constants, not traced) fastervit_0 makes about
# 3,900 lookups, so the later point is 3500 (a scan of every 100th lookup: each one stops with one line).
_SIGNAL_IN_DISPATCH = """
import os, signal, sys
import torch._library.simple_registry as registry
real, calls = registry.find_torch_dispatch_rule, [0]
def lookup(*a, **k):
    calls[0] += 1
    if calls[0] in {int(n) for n in sys.argv[1].split(",")}:
        os.kill(os.getpid(), int(sys.argv[2]))
    return real(*a, **k)
registry.find_torch_dispatch_rule = lookup
from hybridvit.cli import main
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
@pytest.mark.parametrize("nth", [2000, 3500])
def test_a_signal_inside_pytorch_tracing_stops_export_with_one_line(tmp_path, nth, sig, code):
    env = child_env()
    out = tmp_path / "m.pt2"
    done = subprocess.run([sys.executable, "-c", _SIGNAL_IN_DISPATCH, str(nth), str(int(sig)), "export", "--model",
                           "fastervit_0", "--format", "pt2", "-o", str(out), "--threads", "1"],
                          env=env, capture_output=True, text=True, timeout=600,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode != 0, f"export finished before the {nth}th dispatch-rule lookup: lower nth"
    assert done.returncode == code and len(lines) == 1, done.stderr[-3000:]
    word = "interrupted (Ctrl-C)" if sig == signal.SIGINT else "stopped by SIGTERM"
    assert lines[0].startswith(word) and "hybridvit export" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # neither the file nor its temporary


def test_a_sigterm_during_a_checkpoint_save_lets_the_save_finish_then_stops(tmp_path, monkeypatch):
    pytest.importorskip("kornia", reason="needs the train extra (kornia)")
    from hybridvit.train import run_dir
    from hybridvit.train.config import make_config
    from hybridvit.train.engine import TrainingInterrupted, train

    data = _folder(tmp_path / "data", n_train=8, n_val=2)  # 16 images / batch 4: 4 steps per epoch
    real = run_dir.save_torch
    calls = []

    def save_and_get_signalled(obj, path, *a, **k):
        calls.append(path)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives while the checkpoint is being written
        return real(obj, path, *a, **k)

    monkeypatch.setattr(run_dir, "save_torch", save_and_get_signalled)
    out = tmp_path / "run"
    cfg = make_config(None, data=str(data), output=str(out), epochs=5, checkpoint_every=1, model="fastervit_nano",
                      img_size=32, batch_size=4, threads=1, workers=0, progress=False, plot=False, model_ema=False)
    with pytest.raises(TrainingInterrupted) as e:
        train(cfg)
    assert e.value.exit_code == 143 and len(calls) == 1  # the save finished; no second save was needed
    state = torch.load(out / "last.pt", weights_only=True)["train_state"]
    assert state["scheduler"]["step"] == 1 and not list(out.glob(".*tmp*"))


# --------------------------------------- a signal to one process, one DDP rank
def _start_training(out: Path, data: Path, env: dict[str, str] | None = None, *extra: str) -> subprocess.Popen:
    """`hybridvit train` of 50 epochs in a new process (stopped by the tests long before it ends)."""
    env = child_env(**(env or {}))
    code = "import sys; from hybridvit.cli import main; sys.exit(main())"
    return subprocess.Popen([sys.executable, "-c", code, "train", "--data", str(data), "--epochs", "50",
                             "--output", str(out), *TINY_TRAIN, *extra], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for_steps(proc: subprocess.Popen, log: Path, timeout: float = 120.0) -> None:
    """Until training has started (the run header is in train.log), then a moment for a few steps."""
    t0 = time.time()
    while not (log.is_file() and "augmentation:" in log.read_text()):
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout, "training did not start"
        time.sleep(0.2)
    time.sleep(1.0)


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_saves_a_resumable_checkpoint_and_says_how_to_resume(tmp_path, colours, capsys, sig, code):
    pytest.importorskip("kornia", reason="needs the train extra (kornia)")
    from _imagedata import make_folder

    data = make_folder(tmp_path / "more", n_train=16, n_val=2, size=24)  # 8 steps per epoch
    out = tmp_path / "run"
    proc = _start_training(out, data)
    try:
        _wait_for_steps(proc, out / "train.log")
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    assert f"Continue with: hybridvit train --resume {out}" in stderr
    assert f"{sig.name}: training stopped at epoch" in stderr
    assert not list(out.glob(".*tmp*"))  # no half-written temporary file
    ck = torch.load(out / "last.pt", weights_only=True)
    state = ck["train_state"]
    assert state["scheduler"]["step"] == state["epoch"] * 8 + state["step_in_epoch"] >= 1
    assert "stopped by" in (out / "train.log").read_text()
    if sig == signal.SIGINT:  # resume it: finishing the interrupted epoch is enough
        epochs = state["epoch"] + 1
        assert main(["train", "--resume", str(out), "--epochs", str(epochs), *FAST]) == 0
        summary = json.loads((out / "summary.json").read_text())
        assert summary["epochs"] == epochs
        assert f"resumed {out / 'last.pt'} at epoch {epochs}, step {state['step_in_epoch']}/8" in \
            (out / "train.log").read_text()


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_a_signal_to_one_ddp_rank_stops_every_rank_with_one_checkpoint(tmp_path):
    # torchrun's ranks, started by hand (gloo on CPU); SIGTERM reaches rank 1 only (a scheduler killing
    # one task): the ranks agree at the next step, write last.pt together and all exit 143, none hangs
    pytest.importorskip("kornia", reason="needs the train extra (kornia)")
    import socket

    from _imagedata import make_folder

    data = make_folder(tmp_path / "more", n_train=16, n_val=2, size=24)  # 32 images / (2 x 4): 4 steps
    out = tmp_path / "run"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in (0, 1):
        env = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                   WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
        procs.append(_start_training(out, data, env, "--device", "cpu"))
    try:
        _wait_for_steps(procs[0], out / "train.log")
        procs[1].send_signal(signal.SIGTERM)
        results = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [143, 143], results
    assert f"Continue with: hybridvit train --resume {out}" in results[0][1]
    assert not list(out.glob(".*tmp*"))
    state = torch.load(out / "last.pt", weights_only=True)["train_state"]
    assert state["world_size"] == 2 and state["scheduler"]["step"] == state["epoch"] * 4 + state["step_in_epoch"]


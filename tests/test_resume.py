"""Resume: kill a training process mid-epoch, resume it, and get bit-identical final weights; a resume applies
what may change (epochs, lr, checkpoint interval) and refuses the rest."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("kornia", reason="needs the train extra (kornia)")

from _helpers import FAST, TINY_TRAIN, error_line  # noqa: E402
from _imagedata import make_folder  # noqa: E402

from hybridvit.cli import main  # noqa: E402
from hybridvit.train.config import make_config  # noqa: E402
from hybridvit.train.engine import train  # noqa: E402

# RandAugment, mixup/cutmix, erasing and drop path all draw random numbers: resuming must restore them;
# MESA (from the second epoch on: 1 / 2 > 0.25) reads the EMA teacher, which resuming must restore too
OPTS = dict(model="fastervit_nano", img_size=32, batch_size=6, epochs=2, threads=1, workers=1, seed=7,
            randaugment="rand-m9-mstd0.5-inc1", reprob=0.25, mixup=0.8, cutmix=1.0, drop_path_rate=0.1,
            model_ema=True, model_ema_decay=0.9, mesa=1.0, mesa_start_ratio=0.25,
            lr=2e-3, warmup_epochs=1, scale=(0.5, 1.0), progress=False,
            plot=False, checkpoint_every=1)


def _args(opts: dict) -> list[str]:
    out = []
    for k, v in opts.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            out.append(flag if v else "--no-" + flag[2:])
        elif isinstance(v, tuple):
            out += [flag, *map(str, v)]
        else:
            out += [flag, str(v)]
    return out


@pytest.mark.slow
def test_kill_mid_epoch_then_resume_is_exact(tmp_path):
    root = make_folder(tmp_path / "data", n_train=24, n_val=4)  # 48 images: 8 steps per epoch
    ref = train(make_config(None, data=str(root), output=str(tmp_path / "ref"), **OPTS))

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "hybridvit.cli", "train", "--data", str(root), "--output", str(out), *_args(OPTS)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    last, metrics = out / "last.pt", out / "metrics.jsonl"
    deadline = time.time() + 120
    seen: set[float] = set()
    # wait for the first epoch to end, then for two checkpoints inside the second epoch, then kill
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and metrics.read_text().strip():
            if last.is_file():
                seen.add(last.stat().st_mtime_ns)
            if len(seen) >= 3:
                break
        time.sleep(0.005)
    assert proc.poll() is None, "the run ended before it could be killed: " + proc.stderr.read().decode()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (out / "summary.json").exists()
    ck = torch.load(last, weights_only=True)["train_state"]
    assert ck["epoch"] == 1 and 0 < ck["step_in_epoch"] < 8, (ck["epoch"], ck["step_in_epoch"])

    resumed = train(make_config(None, resume=str(out), progress=False))
    for k, v in ref["final_state_dict"].items():
        assert torch.equal(v, resumed["final_state_dict"][k]), k
    a = [json.loads(x) for x in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in metrics.read_text().splitlines()]
    drop = ("epoch_time_s",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in a] == \
        [{k: v for k, v in r.items() if k not in drop} for r in b]
    assert json.loads((out / "summary.json").read_text())["val_top1"] == ref["val_top1"]
    ema_a = torch.load(tmp_path / "ref" / "last.pt", weights_only=True)["state_dict_ema"]
    ema_b = torch.load(last, weights_only=True)["state_dict_ema"]
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)


# --------------------------------------------------------------- resume policy
@pytest.mark.slow
def test_resume_applies_epochs_lr_and_checkpoint_interval_and_refuses_the_rest(tmp_path, capsys):
    pytest.importorskip("kornia", reason="needs the train extra (kornia)")
    from _imagedata import make_folder

    from hybridvit.train.optim import lr_at

    data = make_folder(tmp_path / "data", n_train=4, n_val=1, size=24)  # 2 steps per epoch
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--epochs", "2", "--output", str(out), *TINY_TRAIN]) == 0
    capsys.readouterr()
    err = error_line(["train", "--resume", str(out), "--model", "cabvit_h_l1", "--batch-size", "2", "--epochs", "3",
                  *FAST], capsys)
    assert "--model cabvit_h_l1 (the run has fastervit_nano)" in err and "--batch-size 2 (the run has 4)" in err
    assert "--epochs" not in err.split("differ")[0] and "leave them out" in err
    assert "already completed 2 epochs" in error_line(["train", "--resume", str(out), "--epochs", "1", *FAST], capsys)
    # same values as the run's are no change: accepted
    assert main(["train", "--resume", str(out), "--epochs", "3", "--lr", "5e-4", "--checkpoint-every", "1",
                 "--model", "fastervit_nano", "--batch-size", "4", *FAST]) == 0
    log = (out / "train.log").read_text()
    assert "resume: --epochs 3 (was 2)" in log and "resume: --lr 0.0005 (was 0.001)" in log
    assert "resume: --checkpoint-every 1 (was 0)" in log
    summary = json.loads((out / "summary.json").read_text())
    cfg = summary["config"]
    assert (summary["epochs"], cfg["lr"], cfg["checkpoint_every"]) == (3, 5e-4, 1)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    # the schedule of the extended run: cosine over 3 epochs at the new peak lr
    steps = rows[0]["step"]
    total, warm = 3 * steps, round(cfg["warmup_epochs"] * steps)
    assert rows[2]["lr"] == pytest.approx(lr_at(rows[2]["step"] - 1, total, warm, 0, 5e-4, cfg["min_lr"],
                                                 cfg["warmup_lr"]))
    state = torch.load(out / "last.pt", weights_only=True)["train_state"]
    assert state["scheduler"]["total"] == total


"""A command line a user can trust (issue 14, second part): eval matches classes by name, predict takes
folders and survives unreadable images, Ctrl-C/SIGTERM leave a resumable run, resume applies what may
change and refuses the rest, minimum input sizes are checked up front, --threads everywhere. Commands
are invoked as a user would: `hybridvit.cli.main`, or a separate process where signals are involved."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import hybridvit
from hybridvit.checkpoint import make_run_checkpoint
from hybridvit.cli import main
from hybridvit.runtime import check_img_size, min_img_size

SRC = Path(hybridvit.__file__).resolve().parents[1]  # the hybridvit this test imports, for the child
FAST = ["--threads", "1", "--workers", "0", "--no-progress"]
TRAIN = ["--model", "fastervit_nano", "--img-size", "32", "--batch-size", "4", *FAST, "--no-plot",
         "--no-model-ema", "--no-channels-last"]


def _error(argv: list[str], capsys) -> str:
    """The `error:` line of a command that must fail (exit 2) with no traceback; it ends stderr (warnings
    about single images may come before it)."""
    assert main(argv) == 2, f"{argv} did not fail"
    err = capsys.readouterr().err.strip()
    assert err.splitlines()[-1].startswith("error:") and "Traceback" not in err and err.count("error:") == 1, err
    return err.splitlines()[-1]


def _constant_model(num_classes: int, winner: int) -> torch.nn.Module:
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


def _run_checkpoint(path: Path, classes: list[str], winner: str) -> Path:
    model = _constant_model(len(classes), classes.index(winner))
    torch.save(make_run_checkpoint(model_name="fastervit_nano", model_kwargs={"img_size": 32},
                                   num_classes=len(classes), class_names=classes,
                                   pretrained_cfg=model.pretrained_cfg, state_dict=model.state_dict()), path)
    return path


@pytest.fixture
def colours(tmp_path):
    from _imagedata import make_folder
    return make_folder(tmp_path / "data", n_train=1, n_val=2, size=24)  # {train,val}/{blue,red}


# ---------------------------------------------------------------------------- eval: classes by name
def test_eval_matches_a_subset_of_classes_by_name(tmp_path, colours, capsys):
    # the run knows 4 classes and always answers "red"; a folder holding only red/ (or blue/ and red/)
    # scored 0.00% before: its sorted folders were labelled 0, 1 by position
    ckpt = _run_checkpoint(tmp_path / "run.pt", ["blue", "green", "red", "yellow"], "red")
    shutil.rmtree(colours / "val" / "blue")
    out = tmp_path / "r.json"
    assert main(["eval", "--pretrained", str(ckpt), "--data", str(colours), *FAST, "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "top-1 100.00%" in text and "(2 images)" in text
    assert "holds 1 of the model's 4 classes" in text and "blue, green, yellow" in text
    assert json.loads(out.read_text())["top1"] == 100.0
    shutil.copytree(colours / "val" / "red", colours / "val" / "blue")  # blue/ now holds 2 images too
    assert main(["eval", "--pretrained", str(ckpt), "--data", str(colours), *FAST]) == 0
    assert "top-1 50.00%" in capsys.readouterr().out  # red right, blue wrong: by name


def test_eval_refuses_folders_that_are_not_the_runs_classes(tmp_path, colours, capsys):
    ckpt = _run_checkpoint(tmp_path / "run.pt", ["blue", "red"], "red")
    (colours / "val" / "purple").mkdir()
    shutil.copy(colours / "val" / "red" / "000.png", colours / "val" / "purple")
    err = _error(["eval", "--pretrained", str(ckpt), "--data", str(colours), *FAST], capsys)
    assert "1 of its 3 class folders are not a class of the model (purple)" in err
    assert "blue, red" in err and "Rename" in err
    for c in ("blue", "red"):  # renamed folders: no overlap at all
        (colours / "val" / c).rename(colours / "val" / c.upper())
    shutil.rmtree(colours / "val" / "purple")
    err = _error(["eval", "--pretrained", str(ckpt), "--data", str(colours), *FAST], capsys)
    assert "none of its class folders is a class of the model (BLUE, RED)" in err


def test_eval_of_a_checkpoint_without_class_names_is_by_position(tmp_path, colours, capsys):
    # an official checkpoint names no classes: the sorted folders are its class indices 0, 1, ...
    # (ImageNet's synset folders sort into the official order); kept as documented behaviour
    path = tmp_path / "official.pth"
    torch.save({"state_dict": _constant_model(2, 1).state_dict()}, path)
    assert main(["eval", "--pretrained", str(path), "--model", "fastervit_nano", "--num-classes", "2",
                 "--img-size", "32", "--data", str(colours), *FAST]) == 0
    assert "top-1 50.00%" in capsys.readouterr().out  # index 1 = "red", the second sorted folder


# ---------------------------------------------------------------------------- predict
def test_predict_takes_files_and_folders_and_skips_unreadable_images(tmp_path, colours, capsys):
    from _imagedata import corrupt_jpeg

    ckpt = _run_checkpoint(tmp_path / "run.pt", ["blue", "red"], "red")
    nested = tmp_path / "imgs" / "deeper"
    nested.mkdir(parents=True)
    shutil.copy(colours / "val" / "blue" / "000.png", nested / "a.png")
    corrupt_jpeg(tmp_path / "imgs" / "broken.jpg")
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")  # not an image extension: not read
    single = colours / "val" / "red" / "001.png"
    out = tmp_path / "p.json"
    assert main(["predict", "--pretrained", str(ckpt), "--topk", "1", "--threads", "1", str(tmp_path / "imgs"),
                 str(single), "--json", str(out)]) == 0
    cap = capsys.readouterr()
    lines = cap.out.strip().splitlines()
    assert lines == [f"{nested / 'a.png'}: red (100.0%)", f"{single}: red (100.0%)"]
    assert "broken.jpg" in cap.err and "skipped" in cap.err and "Traceback" not in cap.err
    assert [r["image"] for r in json.loads(out.read_text())] == [str(nested / "a.png"), str(single)]
    # nothing readable: an error, not a silent success
    err = _error(["predict", "--pretrained", str(ckpt), str(tmp_path / "imgs" / "broken.jpg")], capsys)
    assert "none of the 1 image(s) could be read" in err
    assert "does not exist" in _error(["predict", "--pretrained", str(ckpt), str(tmp_path / "nope")], capsys)


# ---------------------------------------------------------------------------- minimum input sizes
def test_minimum_input_sizes_per_family(monkeypatch):
    from hybridvit.registry import get_entry

    assert min_img_size("crossformer_t") == min_img_size("crossformerpp_s") == 32
    assert min_img_size(hybridvit.list_models("cabvit_p*")[0]) == 16
    assert min_img_size("fastervit_nano") == min_img_size("cabvit_h_l1") == 1  # padded everywhere
    check_img_size("crossformer_t", 32)
    check_img_size("crossformer_t", None)
    # timm's min_input_size field, where the registry has it, wins over the table
    monkeypatch.setitem(get_entry("fastervit_nano").pretrained_cfg, "min_input_size", (3, 48, 48))
    assert min_img_size("fastervit_nano") == 48


def test_too_small_images_are_refused_before_anything_is_built(tmp_path, colours, capsys):
    want = "too small for crossformer_t: it needs images of at least 32x32 pixels; pass --img-size 32"
    out = tmp_path / "run"
    for argv in (["train", "--model", "crossformer_t", "--img-size", "16", "--data", str(colours), "--output",
                  str(out)],
                 ["eval", "--model", "crossformer_t", "--pretrained", "true", "--img-size", "16"],
                 ["bench", "-m", "crossformer_t", "--img-size", "16", "--warmup", "0", "--threads", "1"],
                 ["export", "-m", "crossformer_t", "--img-size", "16", "-o", str(tmp_path / "m.onnx")],
                 ["analyze", "-m", "crossformer_t", "--img-size", "16", "--threads", "1"],
                 ["analyze", "distance", "-m", "crossformer_t", "--img-size", "16", "random", "-o",
                  str(tmp_path / "a")]):
        assert want in _error(argv, capsys), argv
    assert not out.exists() and not (tmp_path / "m.onnx").exists() and not (tmp_path / "a").exists()
    cabvit_p = hybridvit.list_models("cabvit_p*")[0]
    assert "at least 16x16 pixels" in _error(["train", "--model", cabvit_p, "--img-size", "8", "--data",
                                              str(colours), "--output", str(out)], capsys)


# ---------------------------------------------------------------------------- --threads
def test_eval_predict_and_analyze_take_threads(tmp_path, colours, capsys):
    ckpt = _run_checkpoint(tmp_path / "run.pt", ["blue", "red"], "red")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert main(["eval", "--pretrained", str(ckpt), "--data", str(colours), "--threads", "1", "--workers", "0",
                     "--no-progress"]) == 0
        assert "(1 thread + 0 loader workers on " in capsys.readouterr().out
        assert torch.get_num_threads() == 1
        torch.set_num_threads(2)
        assert main(["predict", "--pretrained", str(ckpt), "--threads", "1",
                     str(colours / "val" / "red" / "000.png")]) == 0
        assert torch.get_num_threads() == 1
        torch.set_num_threads(2)
        assert main(["analyze", "-m", "fastervit_nano", "--img-size", "32", "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1
        assert "--threads must be at least 1" in _error(["eval", "--pretrained", str(ckpt), "--data", str(colours),
                                                         "--threads", "0"], capsys)
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------------- resume policy
@pytest.mark.slow
def test_resume_applies_epochs_lr_and_checkpoint_interval_and_refuses_the_rest(tmp_path, capsys):
    pytest.importorskip("kornia", reason="needs the train extra (kornia)")
    from _imagedata import make_folder

    from hybridvit.train.optim import lr_at

    data = make_folder(tmp_path / "data", n_train=4, n_val=1, size=24)  # 2 steps per epoch
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--epochs", "2", "--output", str(out), *TRAIN]) == 0
    capsys.readouterr()
    err = _error(["train", "--resume", str(out), "--model", "cabvit_h_l1", "--batch-size", "2", "--epochs", "3",
                  *FAST], capsys)
    assert "--model cabvit_h_l1 (the run has fastervit_nano)" in err and "--batch-size 2 (the run has 4)" in err
    assert "--epochs" not in err.split("differ")[0] and "leave them out" in err
    assert "already completed 2 epochs" in _error(["train", "--resume", str(out), "--epochs", "1", *FAST], capsys)
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


# ---------------------------------------------------------------------------- Ctrl-C and SIGTERM
def _start_training(out: Path, data: Path, env: dict[str, str] | None = None, *extra: str) -> subprocess.Popen:
    """`hybridvit train` of 50 epochs in a new process (stopped by the tests long before it ends)."""
    env = dict(os.environ, **(env or {}), PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]))
    code = "import sys; from hybridvit.cli import main; sys.exit(main())"
    return subprocess.Popen([sys.executable, "-c", code, "train", "--data", str(data), "--epochs", "50",
                             "--output", str(out), *TRAIN, *extra], env=env, stdout=subprocess.PIPE,
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

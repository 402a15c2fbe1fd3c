"""A run is a weight source like any other, and knows its data: `train --pretrained RUN` starts from the run's
model, input size and head (fresh when the data's classes differ); `eval` and `analyze` without data take the
run's validation folder and say so; without a run they ask for data."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("kornia", reason="needs the train extra (kornia)")

from _imagedata import make_folder  # noqa: E402

from hybridvit.cli import main  # noqa: E402

TINY = ["--batch-size", "8", "--threads", "1", "--workers", "0", "--no-progress", "--no-plot", "--randaugment",
        "none", "--reprob", "0", "--mixup", "0", "--cutmix", "0", "--epochs", "1"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    data = make_folder(tmp / "data", n_train=8, n_val=4)
    out = tmp / "run"
    assert main(["train", "--data", str(data), "--output", str(out), "--model", "fastervit_nano", "--img-size",
                 "32", *TINY]) == 0
    return tmp, data, out


@pytest.mark.slow
def test_eval_and_analyze_take_the_runs_validation_folder(run, capsys):
    tmp, data, out = run
    capsys.readouterr()
    assert main(["eval", "--pretrained", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert f"data: {data} (split val), the validation data recorded in the run" in printed
    assert "(8 images" in printed  # make_folder: 4 validation images in each of 2 classes
    assert main(["analyze", "amplitude", "--pretrained", str(out), "--output", str(tmp / "an")]) == 0
    assert f"images: {data / 'val'}, the validation folder recorded in the run" in capsys.readouterr().out


@pytest.mark.slow
def test_eval_without_a_run_asks_for_data(run, capsys):
    tmp, _, out = run
    import torch
    sd = torch.load(out / "best.pt", weights_only=False)["state_dict"]
    torch.save(sd, tmp / "weights.pth")
    assert main(["eval", "--pretrained", str(tmp / "weights.pth"), "--model", "fastervit_nano", "--num-classes",
                 "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: pass --data ROOT") and err.count("\n") == 1
    assert main(["analyze", "amplitude", "--pretrained", str(tmp / "weights.pth"), "--model", "fastervit_nano",
                 "--output", str(tmp / "an2")]) == 2
    assert "pass the images to analyse" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("which", ["folder", "file"])
def test_train_pretrained_takes_the_run_as_a_run(run, capsys, which):
    tmp, data, out = run
    source = out if which == "folder" else out / "best.pt"
    new = tmp / f"tuned_{which}"
    capsys.readouterr()
    assert main(["train", "--pretrained", str(source), "--data", str(data), "--output", str(new), *TINY]) == 0
    summary = json.loads((new / "summary.json").read_text())
    assert summary["model"] == "fastervit_nano" and summary["config"]["img_size"] == 32
    log = (new / "train.log").read_text()
    assert f"weights: fastervit_nano from {out / 'best.pt'}" in log and "start fresh" not in log


@pytest.mark.slow
def test_other_classes_start_a_fresh_head_and_say_so(run, tmp_path, capsys):
    _, _, out = run
    other = make_folder(tmp_path / "other", n_train=8, n_val=4)
    (other / "train" / "blue").rename(other / "train" / "green")
    (other / "val" / "blue").rename(other / "val" / "green")
    new = tmp_path / "tuned"
    assert main(["train", "--pretrained", str(out), "--data", str(other), "--output", str(new), *TINY]) == 0
    log = (new / "train.log").read_text()
    assert "head.weight, head.bias start fresh" in log and "not the data's" in log

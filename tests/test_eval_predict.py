"""`hybridvit eval` and `predict` on a run checkpoint: eval matches classes by name (a subset of the run's
classes, folders that are not its classes refused, by position without class names), predict takes files and
folders and skips unreadable images."""
from __future__ import annotations

import json
import shutil

import torch
from _helpers import FAST, constant_model, error_line, run_checkpoint

from hybridvit.cli import main


def test_eval_matches_a_subset_of_classes_by_name(tmp_path, colours, capsys):
    # the run knows 4 classes and always answers "red"; a folder holding only red/ (or blue/ and red/)
    # scored 0.00% before: its sorted folders were labelled 0, 1 by position
    ckpt = run_checkpoint(tmp_path / "run.pt", ["blue", "green", "red", "yellow"], "red")
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
    ckpt = run_checkpoint(tmp_path / "run.pt", ["blue", "red"], "red")
    (colours / "val" / "purple").mkdir()
    shutil.copy(colours / "val" / "red" / "000.png", colours / "val" / "purple")
    err = error_line(["eval", "--pretrained", str(ckpt), "--data", str(colours), *FAST], capsys)
    assert "1 of its 3 class folders are not a class of the model (purple)" in err
    assert "blue, red" in err and "Rename" in err
    for c in ("blue", "red"):  # renamed folders: no overlap at all
        (colours / "val" / c).rename(colours / "val" / c.upper())
    shutil.rmtree(colours / "val" / "purple")
    err = error_line(["eval", "--pretrained", str(ckpt), "--data", str(colours), *FAST], capsys)
    assert "none of its class folders is a class of the model (BLUE, RED)" in err


def test_eval_of_a_checkpoint_without_class_names_is_by_position(tmp_path, colours, capsys):
    # an official checkpoint names no classes: the sorted folders are its class indices 0, 1, ...
    # (ImageNet's synset folders sort into the official order); kept as documented behaviour
    path = tmp_path / "official.pth"
    torch.save({"state_dict": constant_model(2, 1).state_dict()}, path)
    assert main(["eval", "--pretrained", str(path), "--model", "fastervit_nano", "--num-classes", "2",
                 "--img-size", "32", "--data", str(colours), *FAST]) == 0
    assert "top-1 50.00%" in capsys.readouterr().out  # index 1 = "red", the second sorted folder


def test_predict_takes_files_and_folders_and_skips_unreadable_images(tmp_path, colours, capsys):
    from _imagedata import corrupt_jpeg

    ckpt = run_checkpoint(tmp_path / "run.pt", ["blue", "red"], "red")
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
    err = error_line(["predict", "--pretrained", str(ckpt), str(tmp_path / "imgs" / "broken.jpg")], capsys)
    assert "none of the 1 image(s) could be read" in err
    assert "does not exist" in error_line(["predict", "--pretrained", str(ckpt), str(tmp_path / "nope")], capsys)

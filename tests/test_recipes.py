"""Recipes (hybridvit.train.config): the small-data recipe chosen by the data, the run header that says the
recipe, augmentation, lr and threads, help texts that state the defaults, recipe files and options checked
before anything runs, and an explicit --lr used as given."""
from __future__ import annotations

import json

import pytest
from _helpers import user_error

from hybridvit.cli import main
from hybridvit.runtime import plan_threads
from hybridvit.train import config as C


def test_default_recipe_follows_the_data(tmp_path, monkeypatch):
    from _imagedata import make_folder

    root = make_folder(tmp_path / "d", n_train=4, n_val=2, size=8)
    assert C.default_recipe("digits") == "digits"
    assert C.default_recipe(str(root)) == "small-data"
    monkeypatch.setattr(C, "SMALL_DATA_IMAGES", 8)  # 2 classes x 4 images: no longer small
    assert C.default_recipe(str(root)) is None
    small = C.make_config("small-data")
    assert (small.mixup, small.cutmix, small.reprob, small.randaugment) == (0.0, 0.0, 0.0, "")
    assert small.lr_base_size is None


@pytest.mark.slow
def test_train_on_a_small_folder_uses_the_small_data_recipe(tmp_path):
    pytest.importorskip("kornia", reason="needs the train extra (kornia)")
    from _imagedata import make_folder

    root = make_folder(tmp_path / "d", n_train=4, n_val=2, size=24)
    out = tmp_path / "run"
    assert main(["train", "--data", str(root), "--epochs", "1", "--img-size", "32", "--batch-size", "4",
                 "--workers", "0", "--threads", "1", "--no-progress", "--no-plot", "--output", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    cfg = summary["config"]
    assert summary["recipe"] == "small-data" and cfg["lr"] == 1e-3 and cfg["lr_base_size"] is None
    assert (cfg["mixup"], cfg["cutmix"], cfg["reprob"], cfg["randaugment"]) == (0.0, 0.0, 0.0, None)


def test_run_header_says_recipe_augmentation_lr_and_threads():
    plan = plan_threads("train", cpus=2)
    head = C.run_header(C.make_config("small-data"), plan.describe(), 32, n_train=320)
    assert "recipe small-data (320 training images < 5000)" in head
    assert "random crops and flips only" in head and "1 thread + 1 loader worker on 2 CPUs" in head
    big = C.run_header(C.make_config("cabvit_h_l1"), plan.describe(), 16)
    assert "mixup 0.8" in big and "lr 0.001 at batch 1024 -> 1.56e-05 at batch 16" in big


def test_help_defaults_are_those_of_the_default_run():
    assert C.help_default("epochs") == ("default 5 for the embedded digits, 30 for folders under 5000 images "
                                        "(recipe small-data), 10 for larger ones")
    assert C.help_default("mixup") == ("default 0.0 for the embedded digits and folders under 5000 images, "
                                       "0.8 for larger folders")
    assert C.help_default("opt") == "default adamw"


def test_train_checks_its_options_and_recipe_files(capsys, tmp_path):
    pytest.importorskip("kornia", reason="needs the train extra (kornia)")
    msg = user_error(["train", "--img-size", "0", "--output", str(tmp_path / "r")], capsys)
    assert "--img-size must be at least 1, got 0" in msg
    assert not (tmp_path / "r").exists()
    msg = user_error(["train", "--recipe", "nope.toml"], capsys)
    assert "recipe file nope.toml not found" in msg and "unknown recipe" not in msg
    with pytest.raises(ValueError, match="unknown recipe 'fastervit_O'. Did you mean"):
        C.load_recipe("fastervit_O")


@pytest.mark.slow
def test_explicit_lr_is_used_as_given(tmp_path, capsys):
    # timm's behaviour: --lr is absolute; only the recipe's own lr scales with the global batch
    pytest.importorskip("kornia", reason="needs the train extra (kornia)")
    from _imagedata import make_folder

    assert C.make_config("crossformer_t", lr=1e-3).lr_base_size is None
    assert C.make_config("crossformer_t", lr=1e-3, lr_base_size=256).lr_base_size == 256
    assert C.make_config("crossformer_t").lr_base_size == 512
    root = make_folder(tmp_path / "d", n_train=4, n_val=2, size=24)
    out = tmp_path / "run"
    assert main(["train", "--recipe", "crossformer_t", "--model", "fastervit_nano", "--img-size", "32",
                 "--data", str(root), "--lr", "1e-3", "--epochs", "1", "--batch-size", "4", "--workers", "0",
                 "--threads", "1", "--no-progress", "--no-plot", "--no-model-ema", "--no-channels-last",
                 "--output", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["lr"] == 1e-3 and summary["config"]["lr_base_size"] is None
    assert "lr 0.001" in (out / "train.log").read_text()

"""Training loop, recipes, checkpoints, eval and predict on tiny runs (fastervit_nano at 32x32)."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("kornia", reason="needs the train extra (kornia)")
pytest.importorskip("tqdm", reason="needs the train extra (tqdm)")

from _imagedata import corrupt_jpeg, make_folder  # noqa: E402

import hybridvit  # noqa: E402
from hybridvit.cli import main as cli_main  # noqa: E402
from hybridvit.train.config import list_recipes, load_recipe, make_config  # noqa: E402
from hybridvit.train.engine import build_model, train  # noqa: E402
from hybridvit.train.optim import lr_at, param_groups  # noqa: E402

TINY = dict(model="fastervit_nano", img_size=32, batch_size=8, threads=1, progress=False, plot=False,
            randaugment="", reprob=0.0, mixup=0.0, cutmix=0.0, hflip=0.5, scale=(0.5, 1.0), warmup_epochs=0.5,
            lr=2e-3, drop_path_rate=0.0, workers=0)


def test_recipes_hold_the_official_values():
    names = list_recipes()
    expected = {f"fastervit_{i}" for i in range(7)} | {f"fastervit_4_21k_{r}" for r in (224, 384, 512, 768)} \
        | {f"crossformer_{s}" for s in "tsbl"} | {f"crossformerpp_{s}" for s in "sblh"} \
        | {f"cabvit_h_l{i}" for i in (1, 2, 3)} | {"digits"}
    assert expected <= set(names)
    for n in names:
        cfg = make_config(n)
        assert cfg.model and cfg.epochs > 0
    f0 = load_recipe("fastervit_0")
    assert (f0["lr"], f0["lr_base_size"], f0["weight_decay"], f0["drop_path_rate"]) == (0.005, 4096, 0.005, 0.2)
    assert f0["model_ema"] and f0["model_ema_decay"] == 0.9998 and f0["mixup"] == 0.8 and f0["reprob"] == 0.25
    assert load_recipe("fastervit_3")["warmup_epochs"] == 35
    assert load_recipe("fastervit_6")["opt"] == "lamb" and load_recipe("fastervit_6")["drop_path_rate"] == 0.5
    cf = load_recipe("crossformer_t")
    assert (cf["lr"], cf["lr_base_size"], cf["drop_path_rate"], cf["weight_decay"]) == (5e-4, 512, 0.1, 0.05)
    assert load_recipe("crossformerpp_h")["drop_path_rate"] == 0.5


def test_command_line_overrides_recipe():
    from hybridvit.cli import build_parser
    from hybridvit.train.cli import config_from_args

    args = build_parser().parse_args(["train", "--recipe", "fastervit_0", "--lr", "0.01", "--no-model-ema",
                                      "--mesa", "0", "--scale", "0.3", "1.0", "--data", "/x"])
    cfg = config_from_args(args)
    assert cfg.lr == 0.01 and cfg.model_ema is False and cfg.scale == (0.3, 1.0) and cfg.mesa == 0
    with pytest.raises(ValueError, match="--mesa 0.1 distils from the EMA model.*or pass --mesa 0"):
        config_from_args(build_parser().parse_args(["train", "--recipe", "fastervit_0", "--no-model-ema"]))
    assert cfg.weight_decay == 0.005 and cfg.model == "fastervit_0"
    cfg = config_from_args(build_parser().parse_args(["train"]))
    assert cfg.recipe == "digits" and cfg.model == "fastervit_nano" and cfg.data == "digits"
    with pytest.raises(ValueError, match="fastervit_0"):
        load_recipe("fastervit_O")


def test_no_weight_decay_groups_and_schedule():
    model = hybridvit.create_model("fastervit_nano", num_classes=4, img_size=32)
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"])
    kws = model.no_weight_decay_keywords()
    assert not any(any(k in names[id(p)] for k in kws) for p in decay["params"])
    assert any(p.ndim == 1 for p in no_decay["params"])
    assert lr_at(0, 100, 10, 0, 1.0, 0.0, 0.0) == 0.0
    assert lr_at(10, 100, 10, 0, 1.0, 0.1, 0.0) == pytest.approx(1.0)
    assert lr_at(55, 100, 10, 0, 1.0, 0.0, 0.0) == pytest.approx(0.5)
    assert lr_at(95, 100, 10, 10, 1.0, 0.1, 0.0) == pytest.approx(0.1)


@pytest.mark.slow
def test_train_eval_predict_on_folder_with_corrupt_image(tmp_path, capsys):
    root = make_folder(tmp_path / "data", n_train=16, n_val=8, ext="jpg")
    bad = corrupt_jpeg(root / "train" / "blue" / "broken.jpg")
    out = tmp_path / "run"
    summary = train(make_config(None, data=str(root), output=str(out), epochs=3, **TINY))
    on_disk = json.loads((out / "summary.json").read_text())
    for k in ("model", "epochs", "val_top1", "checkpoint"):
        assert on_disk[k] == summary[k]
    assert on_disk["skipped_images"] == [str(bad)]
    assert str(bad) in (out / "train.log").read_text()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert summary["val_top1"] == max(r["val_top1"] for r in rows) and summary["val_top1"] >= 90
    best = max(rows, key=lambda r: r["val_top1"])
    assert on_disk["best_epoch"] == best["epoch"] + 1 and on_disk["warnings"] == []  # a healthy run: no warning

    # the best checkpoint loads with the public API, and eval reproduces the recorded accuracy
    ck = torch.load(summary["checkpoint"], weights_only=True)
    assert ck["class_names"] == ["blue", "red"] and ck["model_name"] == "fastervit_nano"
    assert {"optimizer", "scheduler", "scaler", "rng", "epoch"} <= set(ck["train_state"]) and ck["config"]
    assert ck["format"] == "hybridvit-run" and ck["version"] == 2 and ck["num_classes"] == 2
    model = hybridvit.create_model("fastervit_nano", num_classes=2, img_size=32)
    hybridvit.load_checkpoint(model, summary["checkpoint"])
    assert torch.equal(model.state_dict()["head.weight"], ck["state_dict"]["head.weight"])
    res = tmp_path / "eval.json"
    assert cli_main(["eval", "--pretrained", summary["checkpoint"], "--data", str(root), "--json", str(res),
                     "--no-progress"]) == 0
    ev = json.loads(res.read_text())
    assert ev["images"] == 16 and ev["top1"] == pytest.approx(summary["val_top1"])

    capsys.readouterr()
    imgs = [str(root / "val" / c / "000.jpg") for c in ("blue", "red")]
    assert cli_main(["predict", "--pretrained", summary["checkpoint"], "--topk", "2", *imgs]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split(": ")[1].startswith("blue") and lines[1].split(": ")[1].startswith("red")

    # fine-tuning: weights from the checkpoint, a fresh head for another number of classes
    ft = build_model(make_config(None, model="fastervit_nano", img_size=32, pretrained=summary["checkpoint"]), 3)
    sd = ft.state_dict()
    assert sd["head.weight"].shape[0] == 3
    body = [k for k in sd if not k.startswith("head.")]
    assert all(torch.equal(sd[k], ck["state_dict"][k]) for k in body)


def test_empty_folder_fails_before_training(tmp_path, capsys):
    root = make_folder(tmp_path / "data", n_train=2, n_val=1)
    for f in (root / "val" / "red").iterdir():
        f.unlink()
    out = tmp_path / "run"
    assert cli_main(["train", "--data", str(root), "--output", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert str(root / "val" / "red") in err
    assert not (out / "last.pt").exists()


@pytest.mark.slow
def test_full_recipe_path_ema_accumulation_mixup(tmp_path):
    """RandAugment, erasing, mixup/cutmix, EMA, LAMB, gradient accumulation and the plot, for a few steps."""
    pytest.importorskip("matplotlib", reason="needs the train extra (matplotlib)")
    root = make_folder(tmp_path / "data", n_train=16, n_val=4)
    cfg = make_config(None, data=str(root), output=str(tmp_path / "run"), epochs=1,
                      **dict(TINY, randaugment="rand-m9-mstd0.5-inc1", reprob=0.25, mixup=0.8, cutmix=1.0,
                             plot=True, drop_path_rate=0.1),
                      model_ema=True, model_ema_decay=0.99, accum_steps=2, opt="lamb", max_steps_per_epoch=2)
    s = train(cfg)
    ck = torch.load(s["checkpoint"], weights_only=True)
    assert ck["train_state"]["ema_updates"] == 2 and ck["train_state"]["scheduler"]["step"] == 2
    assert not torch.equal(ck["state_dict_ema"]["head.weight"], ck["state_dict"]["head.weight"])
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert "val_top1_ema" in row and row["train_top1"] is None
    assert (tmp_path / "run" / "metrics.png").stat().st_size > 1000


@pytest.mark.slow
def test_default_embedded_run_and_eval_agree(tmp_path, capsys):
    """`hybridvit train` on the embedded digits (cut to 3 steps), then `hybridvit eval` on its checkpoint."""
    pytest.importorskip("sklearn", reason="needs the train extra (scikit-learn)")
    out = tmp_path / "run"
    assert cli_main(["train", "--epochs", "1", "--max-steps-per-epoch", "3", "--output", str(out),
                     "--no-progress", "--no-plot"]) == 0
    printed = capsys.readouterr().out
    assert str(out / "summary.json") in printed and "best.pt" in printed
    s = json.loads((out / "summary.json").read_text())
    assert s["model"] == "fastervit_nano" and s["recipe"] == "digits" and s["val_images"] == 360
    assert s["train_images"] == 1437 and 0 <= s["val_top1"] <= 100
    res = tmp_path / "eval.json"
    assert cli_main(["eval", "--pretrained", s["checkpoint"], "--json", str(res), "--no-progress"]) == 0
    ev = json.loads(res.read_text())
    assert ev["images"] == 360 and ev["top1"] == pytest.approx(s["val_top1"])
    assert ev["input_size"] == [3, 32, 32]


@pytest.mark.slow
@pytest.mark.parametrize("model", ["cabvit_p_tiny", "cabvit_h_l1", "crossformer_t"])
def test_every_family_trains_on_the_embedded_digits(tmp_path, model):
    """A few steps of each family on the embedded data; the best checkpoint reloads into a fresh model."""
    pytest.importorskip("sklearn", reason="needs the train extra (scikit-learn)")
    import torch

    import hybridvit

    out = tmp_path / model
    assert cli_main(["train", "--model", model, "--img-size", "32", "--epochs", "1", "--max-steps-per-epoch", "2",
                     "--output", str(out), "--no-progress", "--no-plot"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["model"] == model and 0 <= s["val_top1"] <= 100
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(m["train_loss"])) for m in metrics)
    fresh = hybridvit.create_model(model, num_classes=10, img_size=32)  # CabViT tables are sized by img_size
    hybridvit.load_checkpoint(fresh, s["checkpoint"])


def test_bf16_on_a_cpu_without_bf16_instructions_warns(monkeypatch):
    """`--amp bf16` on a CPU without bf16 instructions (PyTorch emulates bf16 there, slower than fp32) warns;
    with them, or for another device or precision, it does not."""
    import warnings

    from hybridvit import precision
    from hybridvit.precision import Precision

    cpu = torch.device("cpu")
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)  # as on an AVX2-only CPU
    with pytest.warns(UserWarning, match="no bf16 instructions"):
        p = Precision.from_amp("bf16", cpu)
    assert p.dtype == torch.bfloat16
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Precision.from_amp("none", cpu)
        Precision.from_amp("auto", cpu)
        Precision.from_amp("bf16", torch.device("cuda"))  # only the CPU's instructions are in question
        monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
        assert Precision.from_amp("bf16", cpu).dtype == torch.bfloat16


def test_batch_of_one_meeting_batchnorm_gets_advice(tmp_path, capsys):
    """fastervit_nano at 32 px ends in 1x1 maps with BatchNorm: one image per batch cannot train."""
    pytest.importorskip("sklearn", reason="needs the train extra (scikit-learn)")
    assert cli_main(["train", "--epochs", "1", "--max-steps-per-epoch", "1", "--batch-size", "1",
                     "--output", str(tmp_path / "run"), "--no-progress", "--no-plot"]) == 2
    assert "use --batch-size 2 or more or a larger --img-size" in capsys.readouterr().err


def test_precision_is_built_once_from_amp(tmp_path, capsys, monkeypatch):
    from hybridvit import precision
    from hybridvit.precision import Precision

    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)  # no warning on this CPU
    cpu = torch.device("cpu")
    assert Precision.from_amp("auto", cpu).dtype is None and Precision.from_amp("none", cpu).name == "fp32"
    p = Precision.from_amp("bf16", cpu)
    assert p.dtype == torch.bfloat16 and p.name == "bf16" and not p.grad_scaler().is_enabled()
    assert Precision.from_amp("fp16", cpu).grad_scaler().is_enabled()
    with pytest.raises(ValueError, match="auto, none, bf16, fp16"):
        Precision.from_amp("fp8", cpu)
    with p.autocast():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu")
    with Precision.from_amp("none", cpu).autocast():
        assert not torch.is_autocast_enabled("cpu")
    assert cli_main(["train", "--amp", "fp8", "--output", str(tmp_path / "run"), "--no-progress"]) == 2
    assert "unknown precision --amp 'fp8': choose one of auto, none, bf16, fp16" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_skipped_images_of_training_and_validation_are_listed(tmp_path):
    root = make_folder(tmp_path / "data", n_train=8, n_val=4, ext="jpg")
    bad_train = corrupt_jpeg(root / "train" / "red" / "broken.jpg")
    bad_val = corrupt_jpeg(root / "val" / "blue" / "broken.jpg")
    out = tmp_path / "run"
    summary = train(make_config(None, data=str(root), output=str(out), epochs=2, **TINY))
    assert summary["skipped_images"] == sorted([str(bad_train), str(bad_val)])
    assert json.loads((out / "summary.json").read_text())["skipped_images"] == summary["skipped_images"]
    log = (out / "train.log").read_text()
    assert log.count(f"skipped unreadable image {bad_val}") == 1 and str(bad_train) in log
    assert summary["val_images"] == 9 and summary["val_top5_last"] is None  # 2 classes: no top-5
    # the run records its data folders (absolute) for the commands that use the run later
    config = torch.load(out / "best.pt", weights_only=True)["config"]
    assert config["train_folder"] == str((root / "train").resolve())
    assert config["val_folder"] == str((root / "val").resolve())
    assert summary["config"]["val_folder"] == config["val_folder"]


def test_mesa_is_the_official_distillation_term_from_the_ema_teacher():
    """MESA as FasterViT's train.py computes it: mesa x 50 x KLDivLoss(batchmean)(log_softmax(student / 3),
    softmax(teacher / 3)), from the epoch where epoch / epochs exceeds the start ratio; it needs the EMA."""
    from hybridvit.train.config import TrainConfig, check_config
    from hybridvit.train.engine import mesa_active, mesa_loss

    g = torch.Generator().manual_seed(0)
    student = torch.randn(8, 10, generator=g, requires_grad=True)
    teacher = torch.randn(8, 10, generator=g)
    official = 50.0 * torch.nn.KLDivLoss(reduction="batchmean")(
        torch.nn.functional.log_softmax(student / 3, dim=1), torch.nn.functional.softmax(teacher / 3, dim=1))
    torch.testing.assert_close(mesa_loss(student, teacher), official)
    mesa_loss(student, teacher).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    cfg = TrainConfig(mesa=5.0, mesa_start_ratio=0.25, epochs=8, model_ema=True)
    assert [mesa_active(cfg, e) for e in range(8)] == [False, False, False, True, True, True, True, True]
    assert not mesa_active(TrainConfig(mesa=0.0, epochs=8), 7)
    check_config(cfg)
    with pytest.raises(ValueError, match="--mesa 5.0 distils from the EMA model.*--model-ema"):
        check_config(TrainConfig(mesa=5.0))
    with pytest.raises(ValueError, match="--mesa-start-ratio must be between 0 and 1"):
        check_config(TrainConfig(mesa=1.0, model_ema=True, mesa_start_ratio=1.5))


def test_fastervit_recipes_carry_the_official_mesa():
    """Every FasterViT ImageNet-1K recipe has MESA with the official command's value (TRAINING.md) and the
    config's start ratio, and the EMA it needs."""
    from hybridvit.train.config import load_recipe

    official = {0: (0.1, 0.25), 1: (0.2, 0.25), 2: (0.5, 0.25), 3: (0.5, 0.3), 4: (5.0, 0.25), 5: (5.0, 0.25),
                6: (5.0, 0.25)}
    for i, (mesa, ratio) in official.items():
        r = load_recipe(f"fastervit_{i}")
        assert (r["mesa"], r["mesa_start_ratio"], r["model_ema"]) == (mesa, ratio, True), i


def test_a_validation_at_chance_far_below_training_says_why():
    """Validation in eval mode at chance while training accuracy is far above it (a short CabViT-H run: train
    91.5 %, val 16.67 % on 6 classes): one warning naming the unsettled BatchNorm statistics; nothing when
    validation is above chance, when train accuracy is unknown (mixup) or when the gap is small."""
    from hybridvit.train.engine import eval_mode_gap

    bn = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    why = eval_mode_gap({"train_top1": 91.5, "val_top1": 16.67}, 6, bn)
    assert why and "16.67% is at chance (16.7% for 6 classes)" in why and "BatchNorm running statistics" in why
    assert "overfits" in eval_mode_gap({"train_top1": 91.5, "val_top1": 16.67}, 6, torch.nn.Linear(2, 2))
    assert eval_mode_gap({"train_top1": 91.5, "val_top1": 60.0}, 6, bn) is None
    assert eval_mode_gap({"train_top1": None, "val_top1": 16.67}, 6, bn) is None
    assert eval_mode_gap({"train_top1": 30.0, "val_top1": 16.67}, 6, bn) is None

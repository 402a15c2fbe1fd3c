"""A command line a user can trust (issue 14): one MAC counter, small-data defaults, thread plans, errors
that say what to do, runs that never overwrite each other, consistent plots. Commands are invoked as a
user would, through `hybridvit.cli.main`."""
from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hybridvit
from hybridvit.cli import main
from hybridvit.flops import chw, count_macs, profile_macs
from hybridvit.runtime import plan_threads, resolve_device
from hybridvit.train import config as C
from hybridvit.train.run_dir import RunExistsError, created_run_dir, output_dir, prepare_output_dir


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


# ---------------------------------------------------------------------------- one MAC counter
class _Attention(nn.Module):
    def forward(self, x):  # x: (B, heads, N, d)
        return F.scaled_dot_product_attention(x, x, x)


def test_attention_on_cpu_tensors_is_counted():
    # PyTorch's counter misses the CPU flash kernel: real tensors counted 0 where meta ones counted bmm
    b, h, n, d = 2, 3, 16, 8
    real = count_macs(_Attention(), torch.randn(b, h, n, d))
    meta = count_macs(_Attention(), torch.empty(b, h, n, d, device="meta"))
    assert real == meta == 2 * b * h * n * n * d


def test_macs_per_image_do_not_depend_on_batch_device_or_layout():
    # crossformer's position-bias cache refreshed by eval() inside the count added a batch-independent
    # MLP (crossformerpp_s read 4.43 in the README, 4.42 in `models`, 4.04 in `bench`)
    kw = dict(depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8), embed_dim=32)  # 224 px: every group size its own
    torch.manual_seed(0)
    model = hybridvit.create_model("crossformerpp_s", **kw).train()
    one = count_macs(model, torch.randn(1, 3, 224, 224))
    assert model.training  # mode restored
    assert count_macs(model, torch.randn(2, 3, 224, 224)) == 2 * one
    assert count_macs(model.to(memory_format=torch.channels_last), (3, 224, 224)) == one
    with torch.device("meta"):
        meta = hybridvit.create_model("crossformerpp_s", **kw)
    assert count_macs(meta, (3, 224, 224)) == one
    mods = profile_macs(model, (3, 224, 224))["modules"]
    stages = [mods[f"CrossFormer.stages.{i}"] for i in range(4)]
    assert min(stages) > 0 and sum(stages) < one == mods["CrossFormer"]


def test_models_and_bench_report_the_same_gmacs(tmp_path):
    assert main(["models", "fastervit_nano", "--json", str(tmp_path / "m.json")]) == 0
    assert main(["bench", "-m", "fastervit_nano", "-b", "1", "--warmup", "0", "--repeats", "1", "--threads", "1",
                 "--json", str(tmp_path / "b.json")]) == 0
    listed = json.loads((tmp_path / "m.json").read_text())[0]["gmacs"]
    bench = json.loads((tmp_path / "b.json").read_text())
    assert round(bench["results"][0]["gmacs_per_img"], 2) == listed > 0
    assert bench["environment"]["threads"] == 1


def test_stage_profile_is_channels_first_for_every_family():
    from hybridvit.flops import stage_profile

    for name in ("crossformerpp_s", "fastervit_nano", "cabvit_h_l1"):
        with torch.device("meta"):
            model = hybridvit.create_model(name, img_size=64) if name != "crossformerpp_s" else \
                hybridvit.create_model(name)
        size = model.pretrained_cfg["input_size"]
        stages = stage_profile(model, size)
        chans = [s["num_chs"] for s in model.stage_info]
        assert [s["out_shape"][0] for s in stages] == chans, name
        assert stages[0]["out_shape"][1:] == (size[1] // 4, size[2] // 4), name
        assert all(s["macs"] > 0 for s in stages) and sum(s["macs"] for s in stages) < count_macs(model), name


def test_shapes_are_channels_first():
    assert chw((2, 7, 7, 512), 512) == (512, 7, 7)  # CrossFormer's (B, H, W, C)
    assert chw((2, 512, 7, 7), 512) == (512, 7, 7)
    assert chw((2, 196, 384), 384) == (384, 196)
    with pytest.raises(ValueError, match="no dimension"):
        chw((2, 3, 7, 7), 512)


# ---------------------------------------------------------------------------- small-data defaults
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


# ---------------------------------------------------------------------------- threads
@pytest.mark.parametrize("cpus", [1, 2, 3, 4, 8, 16, 64])
@pytest.mark.parametrize("command", ["train", "eval", "predict", "bench", "export", "analyze"])
def test_threads_and_workers_never_oversubscribe(cpus, command):
    p = plan_threads(command, cpus=cpus)
    assert p.threads >= 1 and p.threads + p.workers <= max(cpus, 2)
    assert (p.workers > 0) == (command in ("train", "eval", "predict") and cpus >= 2)
    if cpus >= 2:
        assert p.threads + p.workers <= cpus


def test_thread_plan_keeps_what_the_user_asked():
    assert plan_threads("train", cpus=2) == plan_threads("train", cpus=2, threads=1, workers=1)
    p = plan_threads("train", cpus=16, threads=2)
    assert (p.threads, p.workers) == (2, 4)
    assert plan_threads("train", cpus=16, in_memory=True).workers == 0
    assert plan_threads("train", cpus=16, processes=4).cpus == 4
    cuda = plan_threads("train", cpus=16, device="cuda")
    assert (cuda.threads, cuda.workers) == (1, 8)
    with pytest.raises(ValueError, match="--threads must be at least 1"):
        plan_threads("eval", threads=0)


def test_export_takes_threads():
    from hybridvit.cli import build_parser
    args = build_parser().parse_args(["export", "-m", "fastervit_nano", "-o", "x.onnx", "--threads", "1"])
    assert args.threads == 1


# ---------------------------------------------------------------------------- one-line errors
def test_bench_unknown_model_lists_close_names(capsys):
    msg = user_error(["bench", "-m", "fastervit_nano", "--compare", "fastervit_9", "--warmup", "0"], capsys)
    assert "fastervit_9" in msg and "Did you mean" in msg


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda_says_what_to_do(capsys, tmp_path):
    msg = user_error(["bench", "-m", "fastervit_nano", "--device", "cuda", "--warmup", "0"], capsys)
    assert "no CUDA device" in msg and "--device cpu" in msg
    with pytest.raises(ValueError, match="--device cpu"):
        resolve_device("cuda:1")
    if importlib.util.find_spec("kornia"):  # train, eval and predict resolve --device the same way
        msg = user_error(["train", "--device", "cuda", "--epochs", "1", "--output", str(tmp_path / "r")], capsys)
        assert "no CUDA device" in msg
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("gpu")


def test_compare_with_timm_without_timm_names_the_extra(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # as if timm were not installed
    msg = user_error(["bench", "-m", "fastervit_nano", "--compare", "timm:resnet18"], capsys)
    assert "pip install 'hybridvit[timm]'" in msg


@pytest.mark.parametrize("size", ["0", "-3"])
def test_bad_image_size_is_refused_up_front(size, capsys, tmp_path):
    assert "--img-size" in user_error(["bench", "-m", "fastervit_nano", "--img-size", size], capsys)
    assert "--img-size" in user_error(["export", "-m", "fastervit_nano", "--img-size", size, "-o",
                                       str(tmp_path / "m.onnx")], capsys)


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


# ---------------------------------------------------------------------------- runs never overwrite
def test_an_existing_run_is_refused_unless_asked(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "best.pt").write_bytes(b"x")
    (run / "train.log").write_text("old run\n")
    (run / "notes.txt").write_text("mine")
    with pytest.raises(RunExistsError, match="--overwrite") as e:
        prepare_output_dir(run)
    assert isinstance(e.value, ValueError) and f"--resume {run}" in str(e.value)
    assert prepare_output_dir(run, resume=True) == run and (run / "best.pt").exists()
    assert prepare_output_dir(run, overwrite=True) == run
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]  # the old run's files only
    assert prepare_output_dir(tmp_path / "empty") == tmp_path / "empty"
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        prepare_output_dir(tmp_path / "missing", resume=True)


def test_default_run_folders_get_a_number(tmp_path):
    base = tmp_path / "runs" / "fastervit_nano-20250101-000000"
    assert prepare_output_dir(None, default=base) == base
    base.mkdir(parents=True)
    assert prepare_output_dir(None, default=base).name == base.name + "-2"


def test_a_failed_start_leaves_no_folder(tmp_path):
    with pytest.raises(ValueError, match="data"):
        with output_dir(tmp_path / "run") as out:
            (out / "train.log").write_text("header\n")
            raise ValueError("data check failed")
    assert not (tmp_path / "run").exists()
    with pytest.raises(RuntimeError):
        with created_run_dir(prepare_output_dir(tmp_path / "run2")) as out:
            (out / "last.pt").write_bytes(b"x")
            raise RuntimeError("crash after a checkpoint")
    assert (tmp_path / "run2" / "last.pt").exists()  # resumable: kept


def test_train_has_an_overwrite_option():
    from hybridvit.cli import build_parser
    assert build_parser().parse_args(["train", "--overwrite"]).overwrite is True
    assert C.make_config().overwrite is False


# ---------------------------------------------------------------------------- metrics.png
def test_metrics_plot_keeps_one_colour_per_series(tmp_path, monkeypatch):
    matplotlib = pytest.importorskip("matplotlib", reason="needs matplotlib (train extra)")
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from hybridvit.train.engine import plot_metrics

    figs = []
    save = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (figs.append(self), save(self, *a, **k))[1])
    rows = [{"epoch": i, "train_loss": 1.0 / (i + 1), "val_loss": 1.2 / (i + 1), "train_top1": 50.0 + i,
             "val_top1": 40.0 + i, "val_top1_ema": 41.0 + i} for i in range(3)]
    plot_metrics(rows, tmp_path / "metrics.png")
    assert (tmp_path / "metrics.png").is_file()
    colours: dict[str, set] = {}
    for ax in figs[0].axes:
        for line in ax.get_lines():
            split = line.get_label().split()[0]  # train / val
            key = "ema" if "EMA" in line.get_label() else split
            colours.setdefault(key, set()).add(matplotlib.colors.to_hex(line.get_color()))
    assert set(colours) == {"train", "val", "ema"}
    assert all(len(c) == 1 for c in colours.values())  # same colour in both panels
    assert len(set.union(*colours.values())) == 3

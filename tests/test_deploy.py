"""The deployment path: `export --format openvino` beside ONNX, exported files that carry their classes and
preprocessing, `eval`/`predict` running them with no PyTorch model (same top-1 as the PyTorch run), and
`bench --runtime` timing torch, compile, onnxruntime and openvino side by side."""
from __future__ import annotations

import json

import pytest
import torch
from _helpers import cli_subprocess

import hybridvit
from hybridvit.cli import main

pytest.importorskip("onnxscript", reason="exporting needs the onnx extra: pip install 'hybridvit[onnx]'")
pytest.importorskip("onnxruntime", reason="running ONNX files needs the onnx extra: pip install 'hybridvit[onnx]'")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A 3-class run checkpoint (weights trained a little), its validation folder, and its exports."""
    from PIL import Image

    from hybridvit.checkpoint import make_run_checkpoint

    tmp = tmp_path_factory.mktemp("deploy")
    torch.manual_seed(0)
    model = hybridvit.create_model("fastervit_nano", num_classes=3, img_size=48).eval()
    ckpt = tmp / "best.pt"
    torch.save(make_run_checkpoint(model_name="fastervit_nano", model_kwargs={"img_size": 48}, num_classes=3,
                                   class_names=["blue", "green", "red"], pretrained_cfg=model.pretrained_cfg,
                                   state_dict=model.state_dict()), ckpt)
    g = torch.Generator().manual_seed(1)
    for _i, cls in enumerate(["blue", "green", "red"]):
        (tmp / "val" / cls).mkdir(parents=True)
        for j in range(4):
            px = (torch.rand(56, 60, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(px).save(tmp / "val" / cls / f"{j}.png")
    files = {"onnx": tmp / "m.onnx"}
    assert main(["export", "--pretrained", str(ckpt), "-o", str(files["onnx"])]) == 0
    if _has("openvino"):
        files["openvino"] = tmp / "m.xml"
        assert main(["export", "--pretrained", str(ckpt), "--format", "openvino", "-o", str(files["openvino"])]) == 0
    return tmp, ckpt, files


def _has(module):
    import importlib.util
    return importlib.util.find_spec(module) is not None


def _eval(pretrained, tmp, capsys, name):
    out = tmp / f"{name}.json"
    assert main(["eval", "--pretrained", str(pretrained), "--data", str(tmp / "val"), "--json", str(out), "--overwrite",
                 "--no-progress"]) == 0
    capsys.readouterr()
    return json.loads(out.read_text())


def _predict(pretrained, tmp, capsys, name):
    out = tmp / f"{name}_pred.json"
    assert main(["predict", "--pretrained", str(pretrained), str(tmp / "val"), "--json", str(out), "--overwrite",
                 "--topk", "1", "--no-progress"]) == 0
    capsys.readouterr()
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
def test_exported_files_run_eval_and_predict_like_pytorch(exported, capsys, fmt):
    tmp, ckpt, files = exported
    if fmt not in files:
        pytest.skip("the openvino extra is not installed: pip install 'hybridvit[openvino]'")
    torch_eval, file_eval = _eval(ckpt, tmp, capsys, "torch"), _eval(files[fmt], tmp, capsys, fmt)
    assert file_eval["images"] == torch_eval["images"] == 12
    assert file_eval["top1"] == torch_eval["top1"] and abs(file_eval["loss"] - torch_eval["loss"]) < 1e-3
    assert file_eval["classes"] == ["blue", "green", "red"]
    torch_pred, file_pred = _predict(ckpt, tmp, capsys, "torch"), _predict(files[fmt], tmp, capsys, fmt)
    assert json.dumps(file_pred, sort_keys=True).count("blue") + json.dumps(file_pred).count("red") > 0
    top = lambda preds: [(p["image"] if "image" in p else p.get("path"), p["top"][0]["class"]) for p in preds] \
        if isinstance(preds, list) else preds
    assert top(file_pred) == top(torch_pred)


@pytest.mark.slow
def test_openvino_file_carries_classes_and_preprocessing(exported):
    tmp, _, files = exported
    if "openvino" not in files:
        pytest.skip("the openvino extra is not installed: pip install 'hybridvit[openvino]'")
    from hybridvit.deploy import ExportedModel
    m = ExportedModel(files["openvino"])
    assert (tmp / "m.bin").is_file()
    assert m.class_names == ["blue", "green", "red"] and m.model_name == "fastervit_nano" and m.num_classes == 3
    assert m.pretrained_cfg["input_size"] == (3, 48, 48)
    ref = hybridvit.load_model(tmp / "best.pt")
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref(x), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_exported_files_refuse_what_they_cannot_be(exported, capsys):
    tmp, _, files = exported
    assert main(["eval", "--pretrained", str(files["onnx"]), "--data", str(tmp / "val"), "--num-classes", "5"]) == 2
    assert "exported with 3 classes" in capsys.readouterr().err
    assert main(["export", "--pretrained", str(tmp / "best.pt"), "--format", "openvino", "-o",
                 str(tmp / "x.onnx")]) == 2
    assert "NAME.xml" in capsys.readouterr().err
    from hybridvit.loading import FINETUNE, load_for_command
    with pytest.raises(hybridvit.checkpoint.CheckpointError, match="fine-tune the run checkpoint"):
        load_for_command(str(files["onnx"]), num_classes=3, purpose=FINETUNE)


@pytest.mark.slow
def test_bench_times_the_runtimes_side_by_side(exported, tmp_path, capsys, monkeypatch):
    import tempfile

    tmp, ckpt, files = exported
    runtimes = ["torch", "onnxruntime"] + (["openvino"] if "openvino" in files else [])
    out = tmp_path / "bench.json"
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    assert main(["bench", "--pretrained", str(ckpt), "--runtime", *runtimes, "-b", "2", "--warmup", "1",
                 "--repeats", "1", "--peak", "--json", str(out)]) == 0
    assert list(scratch.iterdir()) == []  # the exported files it timed are gone with the command
    res = json.loads(out.read_text())["results"]
    assert [r["model"] for r in res] == [f"fastervit_nano [{rt}]" for rt in runtimes]
    assert all(r["img_per_s"] > 0 and 0 < r["pct_of_peak"] for r in res)
    assert len({r["gmacs_per_img"] for r in res}) == 1  # one MAC count, from the PyTorch model


def _needs_int8():
    pytest.importorskip("openvino", reason="OpenVINO export needs its extra: pip install 'hybridvit[openvino]'")
    pytest.importorskip("nncf", reason="--int8 needs the int8 extra: pip install 'hybridvit[int8]'")


@pytest.mark.parametrize("argv, said", [
    (["-o", "m.onnx", "--int8", "--calibration", "."], "add --format openvino"),
    (["--format", "openvino", "-o", "m.xml", "--int8"], "--int8 needs --calibration"),
    (["--format", "openvino", "-o", "m.xml", "--calibration", "."], "--calibration is for --int8"),
    (["--format", "openvino", "-o", "m.xml", "--int8-scheme", "transformer"], "--int8-scheme is for --int8"),
    (["--format", "openvino", "-o", "m.xml", "--int8", "--calibration", "no-such-folder"], "is not a folder"),
    (["--format", "openvino", "-o", "m.xml", "--int8", "--calibration", ".", "--calibration-size", "0"],
     "--calibration-size must be at least 1"),
    (["--format", "openvino", "-o", "m.xml", "--int8", "--calibration", ".", "--amp", "bf16"], "leave --amp out"),
])
def test_int8_options_are_checked_before_the_model_is_built(tmp_path, monkeypatch, capsys, argv, said):
    _needs_int8()
    monkeypatch.chdir(tmp_path)
    import hybridvit.loading as loading
    monkeypatch.setattr(loading, "_from_source", lambda *a, **k: pytest.fail("the model was built"))
    assert main(["export", "-m", "fastervit_nano", *argv]) == 2
    assert said in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing written


def test_int8_calibration_without_a_readable_image_is_a_data_error(tmp_path, capsys):
    _needs_int8()
    (tmp_path / "calib" / "a").mkdir(parents=True)
    (tmp_path / "calib" / "a" / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (tmp_path / "calib" / "y.jpg").write_bytes(b"")
    assert main(["export", "-m", "fastervit_nano", "--img-size", "32", "--format", "openvino", "-o",
                 str(tmp_path / "m.xml"), "--int8", "--calibration", str(tmp_path / "calib")]) == 2
    err = capsys.readouterr().err
    assert "none of the 2 calibration image(s)" in err and "x.png" in err
    assert not (tmp_path / "m.xml").exists() and not (tmp_path / "m.bin").exists()
    (tmp_path / "empty").mkdir()
    assert main(["export", "-m", "fastervit_nano", "--img-size", "32", "--format", "openvino", "-o",
                 str(tmp_path / "m.xml"), "--int8", "--calibration", str(tmp_path / "empty")]) == 2
    assert "holds no image" in capsys.readouterr().err


def test_calibration_images_go_through_the_models_preprocessing(tmp_path):
    from PIL import Image

    from hybridvit.data.transforms import Preprocess
    from hybridvit.deploy import calibration_batches

    cfg = hybridvit.create_model("fastervit_nano", img_size=40).pretrained_cfg
    g = torch.Generator().manual_seed(0)
    for i in range(7):
        Image.fromarray((torch.rand(50 + i, 61, 3, generator=g) * 255).to(torch.uint8).numpy()).save(
            tmp_path / f"{i}.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    batches, failed = calibration_batches(tmp_path, cfg, limit=4, batch_size=3)
    assert [tuple(b.shape) for b in batches] == [(3, 3, 40, 40), (1, 3, 40, 40)]
    assert failed == []  # 4 of 8 files spread evenly: 0, 2, 4, 6 -> the broken one (index 7) is not drawn
    pre = Preprocess.from_cfg(cfg)
    torch.testing.assert_close(batches[0][1], pre(Image.open(tmp_path / "2.png").convert("RGB")))
    batches, failed = calibration_batches(tmp_path, cfg, limit=100)
    assert len(batches) == 7 and failed == [str(tmp_path / "broken.png")]


@pytest.mark.slow
def test_bench_times_openvino_int8_beside_openvino(exported, tmp_path):
    _needs_int8()
    tmp, ckpt, _ = exported
    out = tmp_path / "bench.json"
    printed = cli_subprocess("bench", "--pretrained", ckpt, "--runtime", "openvino", "openvino-int8", "-b", "2",
                             "--warmup", "1", "--repeats", "1", "--peak", "--json", out)
    res = json.loads(out.read_text())["results"]
    assert [r["model"] for r in res] == ["fastervit_nano [openvino]", "fastervit_nano [openvino-int8]"]
    assert all(r["img_per_s"] > 0 and r["runtime"] == "openvino" for r in res)
    assert [r["int8"] for r in res] == [False, True]  # read from the file's own int8 record
    # the int8 row is not counted against the float matmul peak
    assert res[0]["pct_of_peak"] > 0 and res[1]["pct_of_peak"] is None
    assert "[openvino-int8] is int8 (not a share of this peak)" in printed

"""The user journey end to end, on the command line: train on the embedded digits -> eval -> predict ->
export (ONNX, checked with onnxruntime on the validation images) -> analyze -> bench. The run checkpoint
carries its model, classes, input size and preprocessing through every command (no --model needed)."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("kornia", reason="needs the train extra (kornia)")
pytest.importorskip("sklearn", reason="the embedded digits need the train extra (scikit-learn)")

from hybridvit.cli import main  # noqa: E402


def _onnx_top1(onnx_path, model, n_classes: int) -> tuple[float, int]:
    """top-1 (percent) of the exported graph on the validation digits, preprocessed as `eval` does."""
    import onnxruntime as ort

    from hybridvit.data.digits import DigitsDataset
    from hybridvit.data.transforms import EvalTransform, Normalize

    cfg = model.pretrained_cfg
    ds = DigitsDataset("val", EvalTransform.from_cfg(cfg))
    norm = Normalize(cfg["mean"], cfg["std"])
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    hits = 0
    for start in range(0, len(ds), 64):
        items = [ds[i] for i in range(start, min(start + 64, len(ds)))]
        x = norm(torch.stack([img for img, _ in items]))
        (logits,) = sess.run(["logits"], {"images": x.numpy()})
        assert logits.shape == (len(items), n_classes)
        hits += sum(int(row.argmax() == t) for row, (_, t) in zip(logits, items))
    return 100 * hits / len(ds), len(ds)


@pytest.mark.slow  # a real training run, ONNX export
def test_train_eval_predict_export_analyze_bench(tmp_path, capsys):
    import hybridvit

    out = tmp_path / "run"
    assert main(["train", "--epochs", "1", "--max-steps-per-epoch", "8", "--output", str(out), "--no-progress",
                 "--no-plot"]) == 0
    best = str(out / "best.pt")
    model = hybridvit.load_model(best)
    size = model.pretrained_cfg["input_size"][-1]
    assert model.class_names == [str(i) for i in range(10)] and model.num_classes == 10

    ev_json = tmp_path / "eval.json"
    assert main(["eval", "--pretrained", best, "--json", str(ev_json), "--no-progress"]) == 0
    ev = json.loads(ev_json.read_text())
    assert ev["images"] == 360 and ev["input_size"] == [3, size, size]
    assert ev["top1"] == pytest.approx(json.loads((out / "summary.json").read_text())["val_top1"])
    assert ev["top1"] > 20  # eight steps already learn something (chance is 10%)

    # predict names the classes of the run: the digit of each image, as the model itself ranks them
    from hybridvit.data.digits import DigitsDataset
    val = DigitsDataset("val")
    imgs = []
    for i in range(3):
        imgs.append(str(tmp_path / f"digit{i}.png"))
        val.load(i).save(imgs[-1])
    capsys.readouterr()
    assert main(["predict", "--pretrained", best, "--topk", "3", *imgs]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3
    for line in lines:
        top = [part.split(" (")[0] for part in line.split(": ", 1)[1].split(", ")]
        assert len(top) == 3 and set(top) <= set(model.class_names)

    onnx_path = tmp_path / "digits.onnx"
    assert main(["export", "--pretrained", best, "-o", str(onnx_path)]) == 0
    assert "10 classes" in capsys.readouterr().out
    pytest.importorskip("onnxruntime", reason="the ONNX check needs the onnx extra (onnxruntime)")
    onnx_top1, n = _onnx_top1(onnx_path, model, 10)
    assert abs(onnx_top1 - ev["top1"]) <= 100 / n + 1e-9  # within one image
    print(f"journey: {size}x{size} digits, 10 classes, eval top-1 {ev['top1']:.2f}%, onnx top-1 {onnx_top1:.2f}%")

    an_json = tmp_path / "analyze.json"
    assert main(["analyze", "--pretrained", best, "--json", str(an_json)]) == 0
    an = json.loads(an_json.read_text())
    assert an["img_size"] == [size, size]
    assert an["params_m"] == pytest.approx(sum(p.numel() for p in model.parameters()) / 1e6)  # the 10-class head

    bench_json = tmp_path / "bench.json"
    assert main(["bench", "--pretrained", best, "-b", "2", "--warmup", "0", "--repeats", "1",
                 "--json", str(bench_json)]) == 0
    (res,) = json.loads(bench_json.read_text())["results"]
    assert res["model"] == "fastervit_nano" and res["img_size"] == size and res["img_per_s"] > 0

    # INT8 for OpenVINO, calibrated on the run's own training images: the same top-1 within a point
    pytest.importorskip("openvino", reason="OpenVINO export needs the openvino extra")
    pytest.importorskip("nncf", reason="--int8 needs the int8 extra")
    from _helpers import cli_subprocess  # int8 kernels run in a child process (see there)
    xml = tmp_path / "digits_int8.xml"
    out = cli_subprocess("export", "--pretrained", best, "--format", "openvino", "--int8", "--calibration", "digits",
                          "-o", xml)
    assert "INT8, calibrated on 300 image(s)" in out
    int8_json = tmp_path / "eval_int8.json"
    cli_subprocess("eval", "--pretrained", xml, "--data", "digits", "--json", int8_json, "--no-progress")
    int8 = json.loads(int8_json.read_text())
    assert int8["images"] == 360 and int8["classes"] == model.class_names
    assert abs(int8["top1"] - ev["top1"]) <= 1.0
    print(f"journey: openvino int8 top-1 {int8['top1']:.2f}% (PyTorch {ev['top1']:.2f}%)")

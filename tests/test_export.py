"""Export: ONNX checked with onnxruntime (when the onnx extra is installed), torch.export programs."""
import pytest
import torch

import hybridvit
from hybridvit.cli import main

pytestmark = pytest.mark.slow  # every test here exports (ONNX, torch.export)


def test_pt2_export_runs_at_another_batch_size(tmp_path):
    out = tmp_path / "nano.pt2"
    assert main(["export", "-m", "fastervit_nano", "--format", "pt2", "-o", str(out)]) == 0
    prog = torch.export.load(str(out))
    x = torch.randn(3, 3, 64, 64)
    assert prog.module()(x).shape == (3, 1000)


def test_onnx_export_matches_pytorch(tmp_path):
    pytest.importorskip("onnxscript", reason="ONNX export needs the onnx extra (onnxscript)")
    pytest.importorskip("onnxruntime", reason="the ONNX check needs the onnx extra (onnxruntime)")
    from hybridvit.export import check_onnx, export_onnx

    torch.manual_seed(0)
    model = hybridvit.create_model("fastervit_nano", num_classes=7).eval()
    path = export_onnx(model, tmp_path / "nano.onnx", (64, 64))
    assert check_onnx(model, path, (64, 64), batch=3) < 1e-4


@pytest.mark.parametrize("family", ["crossformerpp", "cabvit_h"])
def test_onnx_export_of_the_other_families_matches_pytorch(tmp_path, family):
    """Official fixture weights (so that every block contributes), an input size other than the training
    one (CrossFormer pads its groups, CabViT resizes its digest parameters), batch other than traced."""
    pytest.importorskip("onnxscript", reason="ONNX export needs the onnx extra (onnxscript)")
    pytest.importorskip("onnxruntime", reason="the ONNX check needs the onnx extra (onnxruntime)")
    from conftest import load_fixture
    from test_cabvit import fixture_model as cabvit_fixture_model
    from test_crossformer import fixture_model as crossformer_fixture_model

    from hybridvit.export import check_onnx, export_onnx

    if family == "crossformerpp":
        model = crossformer_fixture_model("crossformerpp_tiny")
    else:
        model = cabvit_fixture_model(load_fixture("cabvit_h_tiny"))
    size = (96, 128)
    path = export_onnx(model.eval(), tmp_path / f"{family}.onnx", size)
    assert check_onnx(model, path, size, batch=3) < 1e-4


def test_export_of_a_run_checkpoint_keeps_its_head_and_size(tmp_path, capsys):
    """A run checkpoint needs no --model and exports its own classifier (not a fresh 1000-class one)."""
    from hybridvit.checkpoint import make_run_checkpoint

    torch.manual_seed(0)
    model = hybridvit.create_model("fastervit_nano", num_classes=10, img_size=48).eval()
    ckpt = tmp_path / "best.pt"
    torch.save(make_run_checkpoint(model_name="fastervit_nano", model_kwargs={"img_size": 48}, num_classes=10,
                                   class_names=[f"c{i}" for i in range(10)], pretrained_cfg=model.pretrained_cfg,
                                   state_dict=model.state_dict()), ckpt)
    out = tmp_path / "run.pt2"
    assert main(["export", "--pretrained", str(ckpt), "--format", "pt2", "-o", str(out)]) == 0
    assert "10 classes (c0, c1, c2, c3, c4, ...)" in capsys.readouterr().out
    x = torch.randn(3, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(torch.export.load(str(out)).module()(x), model(x), rtol=1e-5, atol=1e-5)


def test_onnx_file_carries_its_classes_and_preprocessing(tmp_path):
    """metadata_props: model name, class names and the one Preprocess (size, crop, interpolation, mean, std)."""
    pytest.importorskip("onnxscript", reason="ONNX export needs the onnx extra")
    onnx = pytest.importorskip("onnx", reason="reading the file needs the onnx extra")
    import json

    from hybridvit.checkpoint import make_run_checkpoint
    from hybridvit.data.transforms import Preprocess

    model = hybridvit.create_model("fastervit_nano", num_classes=3, img_size=48).eval()
    ckpt = tmp_path / "best.pt"
    torch.save(make_run_checkpoint(model_name="fastervit_nano", model_kwargs={"img_size": 48}, num_classes=3,
                                   class_names=["cat", "dog", "eel"], pretrained_cfg=model.pretrained_cfg,
                                   state_dict=model.state_dict()), ckpt)
    out = tmp_path / "m.onnx"
    assert main(["export", "--pretrained", str(ckpt), "-o", str(out)]) == 0
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["hybridvit.model_name"] == "fastervit_nano" and meta["hybridvit.num_classes"] == "3"
    assert json.loads(meta["hybridvit.class_names"]) == ["cat", "dog", "eel"]
    assert json.loads(meta["hybridvit.preprocess"]) == Preprocess.from_cfg(model.pretrained_cfg).to_dict()
    assert json.loads(meta["hybridvit.preprocess"])["input_size"] == [3, 48, 48]

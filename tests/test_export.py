"""Export: ONNX checked with onnxruntime (when the onnx extra is installed), torch.export programs."""
import pytest
import torch

import hybridvit
from hybridvit.cli import main


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

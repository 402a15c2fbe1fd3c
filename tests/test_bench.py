"""`hybridvit bench` machinery: interleaved timing, memory, MACs (no speed claims here)."""
import pytest
import torch
from torch import nn

from hybridvit.bench import bench_models, count_macs, peak_memory


def _convnet(width: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(width, 10)).eval()


def test_macs_count_a_known_network():
    m = _convnet(8)
    # conv: 32*32 positions * 8 out * 27 in-taps; linear: 8*10
    assert count_macs(m, torch.randn(1, 3, 32, 32)) == 32 * 32 * 8 * 27 + 80


def test_peak_memory_sees_the_largest_activation():
    m = _convnet(64)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        peak = peak_memory(lambda: m(x), torch.device("cpu"))
    act = 4 * 64 * 32 * 32 * 4  # the conv output in bytes
    assert act <= peak <= 4 * act


def test_bench_models_reports_every_field_for_each_model():
    res = bench_models([("narrow", _convnet(4)), ("wide", _convnet(32))], batch_size=2, img_size=32,
                       warmup=1, repeats=2)
    assert [r["model"] for r in res] == ["narrow", "wide"]
    for r in res:
        assert r["img_per_s"] > 0 and r["latency_b1_ms"] > 0 and len(r["times_ms"]) == 2
        assert r["achieved_gflops"] > 0 and r["peak_mem_per_img_mb"] > 0
    assert res[1]["gmacs_per_img"] > res[0]["gmacs_per_img"]


def test_bench_training_step_updates_weights():
    m = _convnet(4).train()
    before = m[0].weight.detach().clone()
    bench_models([("m", m)], batch_size=2, img_size=16, warmup=1, repeats=1, train=True, memory=False,
                 latency=False)
    assert not torch.equal(before, m[0].weight)


@pytest.mark.slow  # a real benchmark with the matmul peak
def test_bench_command_writes_json_with_peak(tmp_path, capsys):
    import json

    from hybridvit.cli import main
    out = tmp_path / "bench.json"
    assert main(["bench", "-m", "fastervit_nano", "--compare", "cabvit_h_l1", "-b", "2", "--img-size", "64",
                 "--amp", "bf16", "--warmup", "0", "--repeats", "1", "--peak", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert [r["model"] for r in res["results"]] == ["fastervit_nano", "cabvit_h_l1"]
    assert all(r["amp"] == "bf16" and r["img_per_s"] > 0 for r in res["results"])
    assert all("bf16_products" not in r for r in res["results"])  # the bf16-by-fp32-kernels mode is retired
    assert res["matmul_peak_gflops"] > 0 and "--peak" in res["command"]
    assert "matmul peak" in capsys.readouterr().out


def test_compile_modes_are_checked():
    from hybridvit.bench import COMPILE_MODES, compile_model

    assert COMPILE_MODES[0] == "freezing"  # what `hybridvit bench --compile` uses for inference
    with pytest.raises(ValueError, match="compile mode must be one of freezing, default"):
        compile_model(_convnet(4), mode="fast")


@pytest.mark.slow  # a cold inductor compile
def test_frozen_compile_gives_the_eager_output():
    from torch._inductor.utils import run_and_get_code

    from hybridvit.bench import compile_model

    model = _convnet(8)
    x = torch.randn(2, 3, 16, 16)
    compiled = compile_model(model)
    with torch.inference_mode():
        ref = model(x)
        out, code = run_and_get_code(compiled, x)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)
    # the weights really are frozen into the graph (torch.compile's `options={"freezing": True}` leaves
    # them graph inputs)
    assert "_frozen_param" in "".join(code)
    assert compiled._orig_mod is model


@pytest.mark.slow  # cold inductor compiles
@pytest.mark.parametrize("family", ["crossformer", "fastervit"])
def test_frozen_compile_folds_the_position_bias(family):
    """Under `compile_model` the position-bias MLP of the configured geometry folds into one constant: the
    compiled graph adds it to the logits, running neither the MLP nor a gather (a gather left in the graph
    is fused into the softmax kernel, one bounds-checked scalar load per logit)."""
    from torch._inductor.utils import run_and_get_code

    from hybridvit.bench import compile_model
    from hybridvit.models.crossformer import DynamicPositionBias
    from hybridvit.models.fastervit import ContinuousPositionBias

    class Logits(torch.nn.Module):
        def __init__(self, table, geometry):
            super().__init__()
            self.table, self.geometry = table, geometry

        def forward(self, x):
            return (x + self.table(*self.geometry)).softmax(-1)

    if family == "crossformer":
        model = Logits(DynamicPositionBias(32, 4, group_size=7), (7,)).eval()
    else:
        model = Logits(ContinuousPositionBias(4, (7, 7)), (7, 7, 4)).eval()
    x = torch.randn(2, 4, 49 + 4 * (family == "fastervit"), 49 + 4 * (family == "fastervit"))
    with torch.inference_mode():
        ref = model(x)
        out, code = run_and_get_code(compile_model(model), x)
    code = "".join(code)
    assert torch.allclose(out, ref, atol=1e-5)
    assert "_frozen_param" in code
    assert "index out of bounds" not in code and "addmm" not in code, "the bias is computed in the graph"

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


# ------------------------------------------------------------ a bench you can trust (issue 31, item 3)
def test_every_figure_comes_with_its_spread():
    res = bench_models([("narrow", _convnet(4))], batch_size=2, img_size=32, warmup=1, repeats=3)
    (r,) = res
    sp = r["spread"]
    for key in ("batch_time_ms", "latency_b1_ms", "img_per_s"):
        assert sp[key]["min"] <= sp[key]["median"] <= sp[key]["max"], key
    assert sp["batch_time_ms"]["median"] == pytest.approx(r["batch_time_ms"], abs=1e-3)
    assert sp["batch_time_ms"]["min"] == pytest.approx(min(r["times_ms"]), abs=0.01)
    assert sp["latency_b1_ms"]["median"] == pytest.approx(r["latency_b1_ms"], abs=1e-3)
    assert len(r["times_b1_ms"]) == 9  # three batch-1 runs per round


def _row(name, batch_ms, b1_ms):
    from hybridvit.bench import spread

    b = [t / 1e3 for t in batch_ms]
    return {"model": name, "batch_size": 4, "img_size": 32, "device": "cpu", "amp": "fp32", "train": False,
            "img_per_s": 4 / sorted(b)[len(b) // 2], "latency_b1_ms": sorted(b1_ms)[len(b1_ms) // 2],
            "gmacs_per_img": 0.1, "achieved_gflops": 1.0, "peak_mem_per_img_mb": 1.0,
            "spread": {"batch_time_ms": spread(b), "latency_b1_ms": spread([t / 1e3 for t in b1_ms]),
                       "img_per_s": {"min": 4 / max(b), "median": 4 / sorted(b)[len(b) // 2], "max": 4 / min(b)}}}


def test_the_table_shows_the_spread_and_warns_when_it_is_too_wide():
    from hybridvit.bench import header_line, table_lines

    lines = table_lines([_row("steady", [10, 10.5, 11], [2, 2.1, 2.2]), _row("noisy", [10, 11, 12], [232, 240, 780])])
    assert "(min-max)" in lines[0]
    assert "(2.0-2.2)" in lines[1] and "(232.0-780.0)" in lines[2]
    warnings = [x for x in lines if x.startswith("warning:")]
    assert len(warnings) == 1 and warnings[0].startswith("warning: noisy: batch-1 latency spread 232.0-780.0 ms")
    assert "too wide to compare" in warnings[0]
    env = {"cpu": "Some CPU", "threads": 2}
    assert header_line([_row("steady", [10], [2])], env, 7) == \
        "inference: batch 4, 32x32, 2 threads, cpu (Some CPU), amp fp32; median of 7 runs (min-max)"


def test_bench_command_prints_its_conditions_and_keeps_its_json_fields(tmp_path, capsys):
    import json

    from hybridvit.bench import cpu_name
    from hybridvit.cli import main

    out = tmp_path / "bench.json"
    assert main(["bench", "-m", "fastervit_nano", "-b", "2", "--img-size", "32", "--threads", "1", "--warmup", "0",
                 "--repeats", "2", "--json", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == (f"inference: batch 2, 32x32, 1 thread, cpu ({cpu_name()}), amp fp32; median of 2 runs "
                          "(min-max)")
    data = json.loads(out.read_text())
    (r,) = data["results"]
    for key in ("img_per_s", "batch_time_ms", "times_ms", "latency_b1_ms", "spread"):
        assert key in r, key
    assert data["header"] == printed[0] and data["environment"]["cpu"] == cpu_name()

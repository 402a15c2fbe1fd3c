"""bf16 on CPUs without bf16 instructions: fp32 kernels on bf16 operands (layers/accel/cpu_bf16.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import load_fixture
from test_cabvit import fixture_model as cabvit_fixture_model
from test_crossformer import fixture_model as crossformer_fixture_model
from test_fastervit import fixture_model as fastervit_fixture_model

from hybridvit.bench import make_step
from hybridvit.layers.accel import cpu_bf16
from hybridvit.layers.accel.cpu_bf16 import Bf16ByFp32Kernels, bf16_kernels, model_policy, use_fp32_kernels

BF16 = torch.bfloat16


@pytest.fixture
def widened(monkeypatch):
    """Counts operands the mode widened to fp32."""
    calls = []
    real = cpu_bf16._widen

    def spy(t):
        out = real(t)
        if out is not t:
            calls.append(tuple(t.shape))
        return out

    monkeypatch.setattr(cpu_bf16, "_widen", spy)
    return calls


def _models():
    """(model with official fixture weights, fixture input) per family."""
    fv, cab = load_fixture("fastervit_tiny_ls_prop"), load_fixture("cabvit_h_tiny")
    return {"fastervit": (fastervit_fixture_model(fv), fv["input"]),
            "crossformerpp": (crossformer_fixture_model("crossformerpp_tiny"),
                              load_fixture("crossformerpp_tiny")["input"]),
            "cabvit_h": (cabvit_fixture_model(cab), cab["input"])}


@pytest.mark.parametrize("op", ["linear", "conv", "depthwise"])
def test_kernels_are_fp32_on_bf16_operands_rounded_once(op):
    g = torch.Generator().manual_seed(0)
    if op == "linear":
        x, w, b = torch.randn(64, 96, generator=g), torch.randn(48, 96, generator=g), torch.randn(48, generator=g)
        fn = F.linear
    else:
        groups = 16 if op == "depthwise" else 1
        x = torch.randn(2, 16, 20, 20, generator=g).contiguous(memory_format=torch.channels_last)
        w, b = torch.randn(16, 16 // groups, 3, 3, generator=g), torch.randn(16, generator=g)

        def fn(x, w, b):
            return F.conv2d(x, w, b, padding=1, groups=groups)
    xb, wb, bb = x.to(BF16), w.to(BF16), b.to(BF16)
    native = fn(xb, wb, bb)
    with Bf16ByFp32Kernels():
        out = fn(xb, wb, bb)
    assert out.dtype == BF16 and out.shape == native.shape
    # exactly: fp32 products of the bf16 values, rounded to bf16 once
    assert torch.equal(out, fn(xb.float(), wb.float(), bb.float()).to(BF16))
    # and within rounding of PyTorch's own bf16 kernel (fp32 accumulation there too)
    tol = 2 ** -7 * native.float().abs().max().item()
    assert (out.float() - native.float()).abs().max().item() <= tol


def test_other_dtypes_and_mixed_operands_pass_through_unchanged():
    x, w = torch.randn(8, 16), torch.randn(4, 16)
    with Bf16ByFp32Kernels():
        assert torch.equal(F.linear(x, w), F.linear(x, w))  # fp32 stays fp32
        with pytest.raises(RuntimeError):  # bf16 with fp32 fails as in PyTorch, no silent widening
            torch.mm(x.to(BF16), w.t())


def test_policy_decisions(monkeypatch):
    monkeypatch.setattr(cpu_bf16, "cpu_has_native_bf16", lambda: False)
    assert use_fp32_kernels("auto", "cpu", True)
    assert not use_fp32_kernels("auto", "cpu", False)  # fp32 work
    assert not use_fp32_kernels("auto", "cuda", True)
    assert not use_fp32_kernels("native", "cpu", True)
    monkeypatch.setattr(cpu_bf16, "cpu_has_native_bf16", lambda: True)
    assert not use_fp32_kernels("auto", "cpu", True)  # AVX512-BF16 / AMX: PyTorch's own kernels
    assert use_fp32_kernels("fp32", "cpu", True)
    with pytest.raises(ValueError, match="cpu_bf16_kernels must be one of"):
        use_fp32_kernels("fast", "cpu", True)
    with Bf16ByFp32Kernels():
        assert not use_fp32_kernels("fp32", "cpu", True)  # never nested


def test_every_family_under_autocast_is_as_accurate_as_native_bf16(widened):
    for family, (model, x) in _models().items():
        with torch.no_grad():
            ref = model(x)
            outs, counts = {}, {}
            for policy in ("fp32", "native"):
                widened.clear()
                with bf16_kernels(policy, "cpu", BF16), torch.autocast("cpu", dtype=BF16):
                    outs[policy] = model(x).float()
                counts[policy] = len(widened)
        assert counts["fp32"] > 0 and counts["native"] == 0, family
        err = {p: (o - ref).abs().max().item() for p, o in outs.items()}
        scale = ref.abs().max().item()
        assert 0 < err["native"] < 0.1 * scale, family  # bf16 really ran
        assert err["fp32"] <= 2 * err["native"] + 2 ** -7 * scale, (family, err)


def test_models_carry_no_policy_of_their_own(widened):
    """The policy is the caller's context only: a model called without it runs PyTorch's bf16 kernels."""
    model, x = _models()["cabvit_h"]
    with torch.no_grad(), torch.autocast("cpu", dtype=BF16):
        model.forward_features(x)
    assert not widened
    with torch.no_grad(), bf16_kernels("fp32", "cpu", BF16), torch.autocast("cpu", dtype=BF16):
        model.forward_features(x)
    assert widened


def test_training_step_gradients_match_native_bf16(widened):
    model, x = _models()["cabvit_h"]
    model.train()
    grads = {}
    for policy in ("fp32", "native"):
        torch.manual_seed(0)
        model.zero_grad(set_to_none=True)
        widened.clear()
        with bf16_kernels(policy, "cpu", BF16), torch.autocast("cpu", dtype=BF16):
            loss = model(x).float().logsumexp(1).mean()
            loss.backward()
        if policy == "fp32":  # the backward convolutions went through fp32 kernels as well
            assert len(widened) > 0
        grads[policy] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    rel = (grads["fp32"] - grads["native"]).norm() / grads["native"].norm()
    assert rel.item() < 0.05


def test_bench_training_step_runs_in_bf16(widened):
    model, x = _models()["fastervit"]
    model.train().cpu_bf16_kernels = "fp32"
    make_step(model, x, torch.device("cpu"), "bf16", train=True)()
    assert widened


@pytest.mark.slow  # cold torch.compile
def test_compile_fullgraph_under_autocast_takes_no_mode():
    """A compiled model makes its own kernels: the runtime's policy for it is "native" (no mode entered)."""
    model, x = _models()["cabvit_h"]
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, dynamic=False, backend="eager")
    assert model_policy(compiled) == "native" and model_policy(model) == "auto"
    with torch.no_grad(), torch.autocast("cpu", dtype=BF16):
        with bf16_kernels(model_policy(compiled), "cpu", BF16):
            out = compiled(x)
        eager = model(x)
    assert out.dtype == eager.dtype
    assert (out.float() - eager.float()).abs().max().item() <= 2 ** -6 * eager.float().abs().max().item()


def test_a_bf16_model_without_autocast_takes_the_policy(widened):
    model, x = _models()["cabvit_h"]
    model = model.to(BF16)
    with torch.no_grad():
        outs = {}
        for policy in ("fp32", "native"):
            widened.clear()
            with bf16_kernels(policy, "cpu", BF16):
                outs[policy] = model(x.to(BF16)).float()
            assert bool(widened) == (policy == "fp32")
    scale = outs["native"].abs().max().item()
    assert (outs["fp32"] - outs["native"]).abs().max().item() <= 0.05 * scale

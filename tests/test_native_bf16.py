"""bf16 where the CPU has bf16 instructions: fused bf16 linears with cached weights, bf16 residual streams
under layer scales, bf16 attention with a trainable bias (layers/accel/fused_linear.py, fuse.py, attention.py).

The fused linear's native-bf16 gate is patched open so that these run on any CPU (oneDNN emulates bf16
where the instructions are missing: correct, only slow; the shapes here are tiny)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import load_fixture
from test_cabvit import fixture_model as cabvit_fixture_model
from test_crossformer import fixture_model as crossformer_fixture_model

from hybridvit.layers import attention, fuse
from hybridvit.layers.accel import cache as accel_cache
from hybridvit.layers.accel import fused_linear
from hybridvit.layers.accel.fused_linear import linear
from hybridvit.layers.accel.switch import fast_paths
from hybridvit.layers.attention import attend
from hybridvit.layers.fuse import LayerScale, conv_bn, scale_channels
from hybridvit.models import cabvit

BF16 = torch.bfloat16
needs_onednn = pytest.mark.skipif(not fused_linear._ONEDNN_LINEAR, reason="PyTorch built without oneDNN")


@pytest.fixture
def native_bf16(monkeypatch):
    monkeypatch.setattr(fused_linear, "cpu_has_native_bf16", lambda: True)


def _layer_and_input(seed: int = 0) -> tuple[torch.nn.Linear, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    layer = torch.nn.Linear(32, 48)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(48, 32, generator=g) * 0.2)
        layer.bias.copy_(torch.randn(48, generator=g))
    return layer, torch.randn(2, 5, 32, generator=g)


@needs_onednn
@pytest.mark.parametrize("gelu,residual", [(False, False), (True, False), (False, True)])
def test_bf16_fused_linear_equals_plain_autocast_linear(native_bf16, gelu, residual):
    layer, x = _layer_and_input()
    res = torch.randn(2, 5, 48).to(BF16) if residual else None
    with torch.no_grad(), torch.autocast("cpu", dtype=BF16):
        with fast_paths(False):
            plain = linear(x, layer, gelu=gelu, residual=res)
        assert fused_linear.onednn_dtype(x) == BF16
        fused = linear(x, layer, gelu=gelu, residual=res)
    assert fused.dtype == plain.dtype == BF16 and fused.shape == plain.shape
    # the plain path rounds the product to bf16 before GELU / the add; the fused one after: one bf16 ulp
    tol = 2 ** -7 * plain.float().abs().max().item()
    assert (fused.float() - plain.float()).abs().max().item() <= tol
    assert accel_cache._CAST_PARAMS.get(layer.weight) is not None  # the fused path ran, weight cached


@needs_onednn
def test_bf16_weight_copy_follows_in_place_edits(native_bf16):
    layer, x = _layer_and_input()
    with torch.no_grad(), torch.autocast("cpu", dtype=BF16):
        first = linear(x, layer)
        cached = accel_cache._CAST_PARAMS[layer.weight][1]
        assert cached.is_mkldnn == accel_cache._REORDER_LINEAR  # kept in oneDNN's blocked layout
        assert torch.equal(linear(x, layer), first)
        assert accel_cache._CAST_PARAMS[layer.weight][1] is cached  # reused while unchanged
        layer.weight.mul_(-1)  # an EMA update or load_state_dict writes in place
        flipped = linear(x, layer)
        with fast_paths(False):
            plain = linear(x, layer)
    assert accel_cache._CAST_PARAMS[layer.weight][1] is not cached
    assert (flipped.float() - plain.float()).abs().max().item() <= 2 ** -7 * plain.float().abs().max().item()
    assert not torch.allclose(flipped.float(), first.float())


@needs_onednn
@pytest.mark.skipif(not accel_cache._REORDER_LINEAR, reason="this PyTorch has no mkldnn._reorder_linear_weight")
def test_packed_fp32_weight_gives_the_plain_values_and_follows_edits():
    """fp32 inference keeps the weight reordered for oneDNN: F.linear's values, a fresh packing after an
    in-place edit, and the parameter itself untouched (state_dict, training)."""
    layer, x = _layer_and_input()
    with torch.no_grad():
        assert fused_linear.onednn_dtype(x) == torch.float32
        out = linear(x, layer, gelu=True)
        packed = accel_cache._CAST_PARAMS[layer.weight][1]
        assert packed.is_mkldnn and not layer.weight.is_mkldnn
        torch.testing.assert_close(out, F.gelu(F.linear(x, layer.weight, layer.bias)), atol=1e-5, rtol=1e-5)
        layer.weight.mul_(-1)
        torch.testing.assert_close(linear(x, layer), F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)
        assert accel_cache._CAST_PARAMS[layer.weight][1] is not packed
    assert isinstance(layer.state_dict()["weight"], torch.Tensor) and not layer.state_dict()["weight"].is_mkldnn


def test_bf16_fused_linear_only_where_exact(monkeypatch):
    layer, x = _layer_and_input()
    monkeypatch.setattr(fused_linear, "cpu_has_native_bf16", lambda: False)
    with torch.no_grad(), torch.autocast("cpu", dtype=BF16):
        assert fused_linear.onednn_dtype(x) is None  # emulated bf16: the CPU bf16 policy's plain ops
    monkeypatch.setattr(fused_linear, "cpu_has_native_bf16", lambda: True)
    with torch.autocast("cpu", dtype=BF16):
        assert fused_linear.onednn_dtype(x) is None  # autograd: training takes the plain ops
    with torch.no_grad():
        assert fused_linear.onednn_dtype(x.half()) is None
        with torch.autocast("cpu", dtype=torch.float16):
            assert fused_linear.onednn_dtype(x) is None
        with fast_paths(False):
            assert fused_linear.onednn_dtype(x) is None


def test_layer_scale_keeps_the_branch_dtype():
    x = torch.randn(2, 3, 8).to(BF16)
    gamma = torch.rand(8)
    with torch.autocast("cpu", dtype=BF16):
        assert scale_channels(x, gamma).dtype == BF16
    assert torch.equal(scale_channels(x.float(), gamma), x.float() * gamma)  # fp32 unchanged
    ls = LayerScale(8, 0.5)
    assert ls(x).dtype == BF16
    assert torch.equal(ls(x.float()), x.float() * 0.5)


def test_cabvit_residual_stream_stays_bf16_under_autocast():
    model = cabvit_fixture_model(load_fixture("cabvit_h_tiny"))
    x = load_fixture("cabvit_h_tiny")["input"]
    dtypes = []

    def record(_m, _args, out):
        dtypes.append((out[0] if isinstance(out, tuple) else out).dtype)
    hooks = [m.register_forward_hook(record) for m in model.modules()
             if isinstance(m, (cabvit.ConvNeXtBlock, cabvit.CaBBlock))]
    with torch.no_grad(), torch.autocast("cpu", dtype=BF16):
        out = model(x)
    for h in hooks:
        h.remove()
    assert dtypes and all(d == BF16 for d in dtypes), dtypes
    with torch.no_grad():
        ref = model(x)
    assert (out.float() - ref).abs().max().item() < 0.1 * ref.abs().max().item()


def _qkv_bias(dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, 10, 8, generator=g).to(dtype).requires_grad_() for _ in range(3))
    bias = (torch.randn(1, 2, 10, 10, generator=g) * 0.5).requires_grad_()
    return q, k, v, bias


@pytest.mark.parametrize("dtype", [BF16, torch.float16])
def test_cpu_attention_with_a_trainable_bias_has_the_gradients_of_sdpa(dtype):
    """The CPU's explicit attention stays in the query dtype with a trainable bias (SDPA's fused CPU
    kernel takes no bias gradient, and its math path upcasts bf16) and gives SDPA's values and
    gradients (fp32 SDPA as the reference)."""
    q, k, v, bias = _qkv_bias(dtype)
    assert not attention._sdpa_applies(q)
    out = attend(q, k, v, bias)
    assert out.dtype == dtype and out.shape == q.shape
    out.float().square().sum().backward()
    q32, k32, v32, bias32 = (t.detach().float().requires_grad_() for t in (q, k, v, bias))
    ref = F.scaled_dot_product_attention(q32, k32, v32, attn_mask=bias32)
    ref.square().sum().backward()
    tol = 0.03 if dtype == BF16 else 0.005
    assert (out.float() - ref).abs().max().item() <= tol * ref.abs().max().item()
    for a, b in [(q, q32), (k, k32), (v, v32), (bias, bias32)]:
        rel = (a.grad.float() - b.grad).norm() / b.grad.norm()
        assert rel.item() < tol
    with fast_paths(False):  # the plain path: SDPA itself
        assert attention._sdpa_applies(q)


@pytest.mark.parametrize("bias_shape,bias_dtype", [(None, None), ((1, 2, 10, 10), BF16), ((3, 2, 10, 10), BF16),
                                                    ((1, 2, 10, 10), torch.float32)])
def test_eager_scores_match_the_traced_form_and_leave_the_bias_alone(monkeypatch, bias_shape, bias_dtype):
    """The eager scores (bias copied into the output in the query dtype, one baddbmm with the scale as its
    factor) equal the form tracers get (product, then scale and add) up to bf16 rounding, and never write
    to the bias."""
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(3, 2, 10, 16, generator=g).to(BF16) for _ in range(2))
    bias = None if bias_shape is None else torch.randn(bias_shape, generator=g).to(bias_dtype)
    kept = None if bias is None else bias.clone()
    eager = attention._scores(q, k, bias, 0.25)
    monkeypatch.setattr(attention, "is_tracing", lambda: True)
    traced = attention._scores(q, k, None if bias is None else bias.to(BF16), 0.25)
    ref = (q.float() @ k.float().transpose(-2, -1)) * 0.25 + (0 if bias is None else bias.float())
    assert eager.shape == traced.shape == (3, 2, 10, 10) and eager.dtype == BF16
    for out in (eager, traced):
        assert (out.float() - ref).abs().max().item() <= 0.02 * ref.abs().max().item()
    if bias is not None:
        assert torch.equal(bias, kept)


def test_crossformer_bf16_training_step_matches_the_plain_path():
    """A bf16 training step with the bf16 attention is as close to fp32 as SDPA's fp32 math path."""
    model = crossformer_fixture_model("crossformerpp_tiny").train()
    x = load_fixture("crossformerpp_tiny")["input"]

    def grads(fast: bool, amp: bool) -> torch.Tensor:
        torch.manual_seed(0)  # the same drop-path draws
        model.zero_grad(set_to_none=True)
        with fast_paths(fast), torch.autocast("cpu", dtype=BF16, enabled=amp):
            loss = model(x).float().logsumexp(1).mean()
        loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    ref = grads(True, False)
    err = {fast: ((grads(fast, True) - ref).norm() / ref.norm()).item() for fast in (True, False)}
    assert 0 < err[True] < 0.05 and err[True] <= 1.5 * err[False] + 1e-3, err


@pytest.mark.parametrize("name", ["fastervit_nano", "crossformer_t", "cabvit_h_l1"])
def test_a_model_built_under_inference_mode_runs_its_fast_paths(native_bf16, name):
    """Parameters made under torch.inference_mode have no version counter to key a cache on: the fast paths
    cast them per call instead of failing, in fp32 and under bf16 autocast, with the plain path's logits."""
    import hybridvit

    torch.manual_seed(0)
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        model = hybridvit.create_model(name, num_classes=10).eval()
        for amp in (False, True):
            with torch.autocast("cpu", dtype=BF16, enabled=amp):
                fast = model(x).float()
                with fast_paths(False):
                    plain = model(x).float()
            tol = 0.05 if amp else 1e-4
            assert (fast - plain).abs().max().item() <= tol * plain.abs().max().item() + 1e-6


needs_onednn_conv = pytest.mark.skipif(not fuse._ONEDNN_CONV, reason="PyTorch built without oneDNN's fused convolution")


def _conv_ops(fn) -> tuple[torch.Tensor, set[str]]:
    with torch.profiler.profile() as prof:
        out = fn()
    return out, {e.name for e in prof.events()}


@needs_onednn_conv
@pytest.mark.parametrize("act", [None, "relu", "gelu", torch.nn.ReLU(), torch.nn.GELU()])
@pytest.mark.parametrize("with_bn,groups,stride", [(True, 1, 2), (False, 1, 1), (True, 6, 1), (False, 6, 2)])
def test_onednn_conv_gives_the_plain_values_and_reorders_its_weight_once(act, with_bn, groups, stride):
    """In eager fp32 inference conv_bn runs oneDNN's convolution with the activation in its epilogue and
    the (BN-folded) weight reordered once: the plain act(bn(conv(x))) values at every input size and
    layout, no reorder on the next call, a fresh one after an in-place edit; with autograd the plain ops."""
    g = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv2d(6, 12, 3, stride, 1, groups=groups).eval()  # cached in eval, as models run
    bn = torch.nn.BatchNorm2d(12).eval() if with_bn else None
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.3)
        if bn is not None:
            bn.running_var.uniform_(0.5, 2.0, generator=g)
            bn.running_mean.normal_(generator=g)
    plain_act = {"relu": F.relu, "gelu": F.gelu, None: lambda y: y}.get(act, act)

    def ref(x: torch.Tensor) -> torch.Tensor:
        y = conv(x)
        return plain_act(y if bn is None else bn(y))

    x = torch.randn(2, 6, 9, 11, generator=g)
    with torch.no_grad():
        out, ops = _conv_ops(lambda: conv_bn(x, conv, bn, act))
        assert "mkldnn::_convolution_pointwise" in ops and "mkldnn::_reorder_convolution_weight" in ops
        torch.testing.assert_close(out, ref(x), atol=1e-5, rtol=1e-5)
        for other in (torch.randn(1, 6, 20, 7, generator=g), x.contiguous(memory_format=torch.channels_last)):
            out, ops = _conv_ops(lambda other=other: conv_bn(other, conv, bn, act))
            assert "mkldnn::_reorder_convolution_weight" not in ops  # the packed weight is reused
            torch.testing.assert_close(out, ref(other), atol=1e-5, rtol=1e-5)
        conv.weight.mul_(-1)  # in place, as load_state_dict or an EMA writes it
        out, ops = _conv_ops(lambda: conv_bn(x, conv, bn, act))
        assert "mkldnn::_reorder_convolution_weight" in ops
        torch.testing.assert_close(out, ref(x), atol=1e-5, rtol=1e-5)
    out, ops = _conv_ops(lambda: conv_bn(x, conv, bn, act))  # autograd on: the plain ops, differentiable
    assert "mkldnn::_convolution_pointwise" not in ops
    out.sum().backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    assert not conv.state_dict()["weight"].is_mkldnn


@needs_onednn_conv
def test_onednn_conv_in_bf16_and_where_it_does_not_apply(native_bf16, monkeypatch):
    """Under bf16 autocast on a CPU with bf16 instructions the fused convolution computes in bf16 (the plain
    autocast values up to bf16 rounding); without them, under a dispatch mode, with fast paths off or for an
    activation oneDNN has no epilogue for, the plain ops run."""
    torch.manual_seed(0)
    conv, bn = torch.nn.Conv2d(4, 8, 3, 1, 1), torch.nn.BatchNorm2d(8).eval()
    x = torch.randn(2, 4, 10, 10)
    with torch.no_grad(), torch.autocast("cpu", dtype=BF16):
        out, ops = _conv_ops(lambda: conv_bn(x, conv, bn, "gelu"))
        ref = F.gelu(bn(conv(x)).float())
        assert out.dtype == BF16 and "mkldnn::_convolution_pointwise" in ops
        assert (out.float() - ref).abs().max().item() <= 0.02 * ref.abs().max().item()
        with fast_paths(False):
            assert "mkldnn::_convolution_pointwise" not in _conv_ops(lambda: conv_bn(x, conv, bn, "gelu"))[1]
        monkeypatch.setattr(fused_linear, "cpu_has_native_bf16", lambda: False)
        assert "mkldnn::_convolution_pointwise" not in _conv_ops(lambda: conv_bn(x, conv, bn, "gelu"))[1]
    with torch.no_grad():
        silu = torch.nn.SiLU()
        out, ops = _conv_ops(lambda: conv_bn(x, conv, bn, silu))
        assert "mkldnn::_convolution_pointwise" not in ops
        torch.testing.assert_close(out, F.silu(bn(conv(x))), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("keys", [8, 16, 32, 49, 53, 64, 196])
def test_short_rows_take_the_fp32_softmax_kernel_with_the_bf16_values(keys):
    """Eager bf16 inference reads the rows where ATen's fp32 kernel is faster (16-63 keys, not a multiple of
    32) into it and rounds once: the bf16 kernel's values (both accumulate in fp32), rows summing to 1.
    Other lengths and autograd keep the bf16 kernel."""
    g = torch.Generator().manual_seed(0)
    scores = (torch.randn(3, 2, 7, keys, generator=g) * 4).to(BF16)
    with torch.no_grad():
        out, ops = _conv_ops(lambda: attention._softmax(scores))
    assert out.dtype == BF16 and out.shape == scores.shape
    plain = scores.softmax(-1)
    assert (out.float() - plain.float()).abs().max().item() <= 2 ** -8  # one bf16 rounding apart at most
    torch.testing.assert_close(out.float().sum(-1), torch.ones(3, 2, 7), atol=0.02, rtol=0)
    short = keys in (16, 49, 53)
    assert ("aten::_to_copy" in ops) == short  # the fp32 kernel's weights rounded to bf16
    _, ops = _conv_ops(lambda: attention._softmax(scores))  # autograd on
    assert "aten::_to_copy" not in ops

"""FasterViT: official equivalence, every variant's conversion and size, any resolution, dtypes, position tables
computed per forward and stored by fuse(), fusing (compiled without graph breaks: test_contract.py)."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_matches_official_layout, load_fixture

import hybridvit
from hybridvit.layers import MASK_VALUE, LayerScale, PositionTable, attend, conv_bn, fold_bn, plain_paths
from hybridvit.models.fastervit import HierarchicalAttention
from hybridvit.registry import count_params

FIXTURES = ("fastervit_tiny", "fastervit_tiny_ls_prop")
# the published variants the registry must hold (test_variants_registered); the parametrised checks take theirs
# from the registry
VARIANTS = ["fastervit_0", "fastervit_1", "fastervit_2", "fastervit_3", "fastervit_4", "fastervit_5",
            "fastervit_6", "fastervit_4_21k_224", "fastervit_4_21k_384", "fastervit_4_21k_512",
            "fastervit_4_21k_768"]


def fixture_overrides(official_config: dict) -> dict:
    """The official constructor arguments as create_model overrides (`resolution` is our `img_size`)."""
    cfg = dict(official_config)
    cfg["img_size"] = cfg.pop("resolution")
    return cfg


@pytest.fixture(scope="module", params=FIXTURES)
def fixture(request):
    return load_fixture(request.param)


def fixture_model(fx: dict) -> torch.nn.Module:
    """The model of a loaded FasterViT fixture, with its official weights, in eval mode."""
    model = hybridvit.create_model("fastervit_0", **fixture_overrides(fx["official_config"]))
    hybridvit.load_checkpoint(model, {"state_dict": fx["state_dict"]})
    return model.eval()


@pytest.fixture(scope="module")
def tiny():
    """Model with the fastervit_tiny_ls_prop fixture's weights (carrier tokens, layer scale, propagation)."""
    return fixture_model(load_fixture("fastervit_tiny_ls_prop"))


def test_fixture_logits(fixture, tmp_path):
    path = tmp_path / "official.pth.tar"
    torch.save({"state_dict": fixture["state_dict"], "epoch": 7}, path)
    model = hybridvit.create_model("fastervit_0", **fixture_overrides(fixture["official_config"]))
    hybridvit.load_checkpoint(model, path)
    with torch.no_grad():
        logits = model.eval()(fixture["input"])
    assert (logits - fixture["logits"]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", [n if n == "fastervit_0" else pytest.param(n, marks=pytest.mark.slow)  # fast tier: one
                                  for n in hybridvit.list_models("fastervit_*") if n != "fastervit_nano"])
def test_variant_conversion_and_params(name):
    assert_matches_official_layout(name)


def test_variants_registered():
    entries = {n: hybridvit.registry.get_entry(n) for n in hybridvit.list_models("fastervit_*")}
    assert set(VARIANTS) | {"fastervit_nano"} == set(entries)
    for name in VARIANTS:
        e = entries[name]
        assert e.family == "fastervit" and e.top1 is not None
        assert e.url.startswith("https://huggingface.co/ahatamiz/FasterViT/resolve/main/fastervit_")
    # preprocessing as the official default_cfgs publish it
    crops = {n: (entries[n].pretrained_cfg["crop_pct"], entries[n].pretrained_cfg["crop_mode"]) for n in VARIANTS}
    assert crops["fastervit_0"] == (0.875, "center")
    assert all(crops[f"fastervit_{i}"] == (1.0, "center") for i in range(1, 7))
    assert crops["fastervit_4_21k_224"] == (0.95, "squash") and crops["fastervit_4_21k_768"] == (0.93, "squash")
    assert crops["fastervit_4_21k_384"] == crops["fastervit_4_21k_512"] == (1.0, "squash")
    assert entries["fastervit_4_21k_512"].pretrained_cfg["input_size"] == (3, 512, 512)
    assert {e.license for e in entries.values()} == {"nvidia-source-code-license-nc"}
    assert entries["fastervit_4_21k_384"].url.endswith("fastervit_4_21k_384_w24.pth.tar")
    assert entries["fastervit_nano"].url is None


def test_official_duplicate_conv_kept_once(tiny):
    fx = load_fixture("fastervit_tiny_ls_prop")
    sd = fx["state_dict"]
    dup = [k for k in sd if "to_global_feature.pos" in k]
    assert dup, "fixture holds the official duplicate name"
    converted = tiny.convert_official(sd)
    assert not any("relative_" in k or "to_global_feature" in k for k in converted)
    # the alias alone (the other name stripped) still loads
    only_alias = {k: v for k, v in sd.items() if "global_tokenizer.pos_embed" not in k}
    assert sorted(tiny.convert_official(only_alias)) == sorted(converted)


@pytest.mark.parametrize("size", [(256, 320), (160, 160), (33, 47)])
def test_any_resolution(tiny, size):
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        out = tiny(x)
        feats = tiny.forward_features(x)
    assert out.shape == (1, 10) and torch.isfinite(out).all()
    assert feats.shape[-2:] == (math.ceil(size[0] / 32), math.ceil(size[1] / 32))


def test_other_configured_resolution_and_window_load(tmp_path):
    fx = load_fixture("fastervit_tiny")
    cfg = fixture_overrides(fx["official_config"])
    cfg.update(img_size=320, window_size=[7, 7, 10, 5])
    model = hybridvit.create_model("fastervit_0", **cfg)
    hybridvit.load_checkpoint(model, {"model": fx["state_dict"]})
    with torch.no_grad():
        out = model.eval()(torch.randn(1, 3, 160, 192))
    assert torch.isfinite(out).all()


def test_padding_is_masked():
    """Window attention with a key mask equals attention over the unpadded keys only."""
    torch.manual_seed(0)
    attn = HierarchicalAttention(16, 2, (3, 3)).eval()
    nw, B, N = 2, 3, 4 + 9
    x = torch.randn(B * nw, N, 16)
    valid = torch.ones(nw, N, dtype=torch.bool)
    valid[1, -3:] = False  # last column of window 1 is padding
    mask = torch.zeros(nw, N).masked_fill(~valid, MASK_VALUE)[:, None, None, :]
    with torch.no_grad():
        out = attn(x, 3, 3, 4, mask)
        q, k, v = attn.qkv(x).view(B * nw, N, 3, 2, 8).permute(2, 0, 3, 1, 4)
        bias = attn.pos_bias(3, 3, 4)
        for i in range(B * nw):
            keep = valid[i % nw]
            ref = attend(q[i:i + 1], k[i:i + 1, :, keep], v[i:i + 1, :, keep], bias[None][..., keep])
            ref = attn.proj(ref.transpose(1, 2).reshape(1, N, 16))
            torch.testing.assert_close(out[i:i + 1], ref, atol=1e-5, rtol=1e-5)


def test_nano_small_images_fast():
    model = hybridvit.create_model("fastervit_nano", num_classes=10)
    assert model.pretrained_cfg["input_size"] == (3, 64, 64)
    assert count_params(model) < 5_000_000
    x = torch.randn(4, 3, 64, 64)
    loss = model.train()(x).logsumexp(-1).mean()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_multiscale_training_then_eval():
    torch.manual_seed(0)
    model = hybridvit.create_model("fastervit_nano", num_classes=5, drop_path_rate=0.1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for size in [(64, 64), (48, 112), (1, 1)]:
        out = model.train()(torch.randn(2, 3, *size))
        assert out.shape == (2, 5) and torch.isfinite(out).all()
        out.square().mean().backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a, b = model(x), model(torch.cat([x, torch.randn(1, 3, 64, 64)]))[:1]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)  # eval: batch-independent (BN stats)


def test_batch1_train_and_eval(tiny):
    model = hybridvit.create_model("fastervit_0", num_classes=3, dim=16, in_dim=8, depths=[1, 1, 2, 1],
                                   num_heads=[1, 1, 2, 2], layer_scale=1e-5, do_propagation=True)
    x = torch.randn(1, 3, 112, 112)
    model.train()(x).sum().backward()
    with torch.no_grad():
        assert model.eval()(x).shape == (1, 3)


def test_bf16_autocast(tiny):
    x = torch.randn(1, 3, 120, 136)  # padded windows: mask + bias paths
    with torch.no_grad():
        ref = tiny(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = tiny(x)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max().item() < 0.1 * ref.abs().max().item() + 0.05


def test_float64_exact_and_bfloat16():
    fx = load_fixture("fastervit_tiny_ls_prop")
    model = hybridvit.create_model("fastervit_0", **fixture_overrides(fx["official_config"]))
    hybridvit.load_checkpoint(model, fx["state_dict"])
    model = model.eval().to(torch.float64)
    with torch.no_grad():
        out = model(fx["input"][:1].double())
        assert model(torch.randn(1, 3, 100, 90, dtype=torch.float64)).dtype == torch.float64
    assert out.dtype == torch.float64
    assert (out - fx["logits"][:1].double()).abs().max().item() <= 1e-4
    model = model.to(torch.bfloat16)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 100, 90, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


# --------------------------------------------------------------------------------- fast inference paths

def _small_model(**kw):
    """Carrier tokens, layer scale and propagation, all fast paths exercised at 64x64 (2x2 windows)."""
    torch.manual_seed(0)
    cfg = dict(num_classes=5, dim=16, in_dim=8, depths=[1, 1, 2, 2], num_heads=[1, 1, 2, 2], window_size=2,
               img_size=64, hat=[False, False, True, True], layer_scale=1e-1, layer_scale_conv=1e-1,
               do_propagation=True, drop_path_rate=0.0)
    model = hybridvit.create_model("fastervit_0", **{**cfg, **kw})
    # non-trivial BN statistics, so that folding BN is actually tested
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return model


def _tables(model):
    return [m for m in model.modules() if isinstance(m, PositionTable)]


def test_tables_are_computed_at_every_forward_and_fuse_stores_the_configured_size():
    """An ordinary model keeps no table (only the configured size's geometry buffers): every forward computes
    them from the MLPs, so a weight edit, even through `p.data`, is seen at the next call. `fuse()` stores the
    table of the configured size (64x64 here) in a non-persistent `fused_table_*` buffer of each module, which
    is what `table()` then returns; other sizes are still computed."""
    model = _small_model().eval()
    tables = _tables(model)
    assert len(tables) == 4 * 4  # per HAT block: window position embedding and bias, the same for carriers
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fast = model(x)
    assert not any(n.rsplit(".", 1)[-1].startswith("fused_table_") for n, _ in model.named_buffers())
    assert all("_fused_tables" not in t.__dict__ for t in tables)
    slow = model(x)  # autograd on: the same values, gradients reach the MLPs in eval
    torch.testing.assert_close(fast, slow.detach(), atol=1e-6, rtol=1e-6)
    slow.sum().backward()
    assert all(t.mlp.fc1.weight.grad is not None for t in tables)
    for t in tables:  # through .data: no version counter moves, the next forward still sees it
        t.mlp.fc2.weight.data.mul_(3.0)
    with torch.no_grad():
        edited = model(x)
    assert (edited - fast).abs().max().item() > 1e-4
    torch.testing.assert_close(edited, model(x).detach(), atol=1e-6, rtol=1e-6)

    fused = model.fuse()
    for t in tables:
        names = t.__dict__["_fused_tables"]
        assert len(names) == 1 and all(n.startswith("fused_table_") for n in names.values())
        (geometry, name), = names.items()
        stored = getattr(t, name)
        assert t.table(*geometry) is stored  # read, not computed
        torch.testing.assert_close(stored, t.compute(*geometry), atol=0, rtol=0)
        assert name not in t.state_dict()  # non-persistent
    with torch.no_grad():
        torch.testing.assert_close(fused(x), edited, atol=1e-5, rtol=1e-5)
        other = torch.randn(1, 3, 72, 40)  # another size: computed at the call, nothing more stored
        fused(other)
    assert all(len(t.__dict__["_fused_tables"]) == 1 for t in tables)


def test_conv_bn_equals_batchnorm_and_fold_bn():
    """conv_bn == conv followed by the BatchNorm module, in eval (running statistics) and training (batch
    statistics), with and without conv bias; fold_bn's one conv computes the same in eval."""
    torch.manual_seed(0)
    x = torch.randn(2, 8, 9, 11)
    for bias in (True, False):
        conv, bn = torch.nn.Conv2d(8, 6, 3, 2, 1, bias=bias), torch.nn.BatchNorm2d(6, eps=1e-4)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-1, 1)
        bn.eval()
        with torch.no_grad():
            torch.testing.assert_close(conv_bn(x, conv, bn), bn(conv(x)), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(fold_bn(conv, bn)(x), bn(conv(x)), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(conv_bn(x, conv, bn, "relu"), bn(conv(x)).relu(), atol=1e-5, rtol=1e-5)
        bn.train()  # training: the BatchNorm module itself (batch statistics)
        torch.testing.assert_close(conv_bn(x, conv, bn), bn(conv(x)))


def test_conv_bn_follows_every_edit():
    """conv_bn keeps nothing between calls: an in-place edit of a running statistic or a weight, a write
    through `.data` and a statistic replaced under inference mode are seen at the next call; under bf16
    autocast it computes in bf16; with autograd on the gradient reaches the conv."""
    torch.manual_seed(0)
    x = torch.randn(1, 8, 9, 11)
    conv, bn = torch.nn.Conv2d(8, 6, 3, 1, 1, bias=False), torch.nn.BatchNorm2d(6).eval()
    bn.running_var.uniform_(0.5, 2.0)

    def check() -> torch.Tensor:
        with torch.no_grad():
            out = conv_bn(x, conv, bn)
            torch.testing.assert_close(out, bn(conv(x)), atol=1e-5, rtol=1e-5)
        return out

    first = check()
    bn.running_var.mul_(4.0)  # in place, as a BatchNorm update or an EMA writes it
    second = check()
    with torch.no_grad():
        conv.weight.add_(0.5)
    third = check()
    conv.weight.data.mul_(-1)  # through .data
    fourth = check()
    assert not torch.allclose(first, second) and not torch.allclose(second, third)
    assert not torch.allclose(third, fourth)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv_bn(x, conv, bn)
        ref = bn(conv(x))
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref.float()).abs().max().item() <= 0.02 * ref.float().abs().max().item()
    conv_bn(x, conv, bn).sum().backward()  # eval with autograd: differentiable
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    with torch.inference_mode():  # a statistic replaced under inference mode has no version counter
        bn.running_mean = torch.zeros(6)
    check()


def test_fuse_keeps_outputs():
    model = _small_model().eval()
    x = torch.randn(2, 3, 72, 40)
    with torch.no_grad():
        ref = model(x)
        fused = model.fuse()
        out = fused(x)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.stages.modules())
    # only the propagating blocks' carrier scales stay (they also scale the upsampled carriers)
    kept = [m for m in fused.modules() if isinstance(m, LayerScale)]
    assert kept == [s.blocks[-1].ct_gamma_attn for s in fused.stages[2:]]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="eval"):
        _small_model().fuse()


def test_fused_fixture_logits():
    fx = load_fixture("fastervit_tiny_ls_prop")
    model = hybridvit.create_model("fastervit_0", **fixture_overrides(fx["official_config"]))
    hybridvit.load_checkpoint(model, fx["state_dict"])
    model = model.eval().fuse().to(memory_format=torch.channels_last)
    with torch.no_grad():
        logits = model(fx["input"])
    assert (logits - fx["logits"]).abs().max().item() <= 1e-4


def test_cpu_attention_form_follows_the_measured_rule():
    """On the CPU: bf16 training takes the explicit form (two batched products and a softmax: SDPA's fused
    kernel takes no bias gradient and its math path upcasts); bf16 and fp32 inference take SDPA's fused
    kernel (measured faster, benchmarks/levers.py); under `plain_paths()` always SDPA; same logits up to
    bf16 rounding."""
    model = _small_model().eval()
    x = torch.randn(2, 3, 64, 64)

    def ops(grad: bool, plain: bool = False):
        with plain_paths(plain), torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16), \
                torch.profiler.profile() as prof:
            out = model(x).float()
        return out.detach(), {e.name for e in prof.events()}

    train_out, train_names = ops(True)
    infer_out, infer_names = ops(False)
    plain_out, plain_names = ops(True, plain=True)
    assert not any("scaled_dot_product" in n for n in train_names) and "aten::_softmax" in train_names
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in infer_names
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in plain_names or \
        "aten::_scaled_dot_product_attention_math" in plain_names
    for out in (train_out, infer_out):
        assert (out - plain_out).abs().max().item() <= 0.05 * plain_out.abs().max().item()  # bf16 rounding
    with torch.no_grad(), torch.profiler.profile() as prof:  # eager fp32: SDPA
        model(x)
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in {e.name for e in prof.events()}


def test_ema_copies_then_eval_give_the_updated_weights_outputs():
    """timm-style EMA (lerped weights, copied buffers) of a model that never ran in eval: the EMA's eval
    outputs are those of a model built with the EMA's state (nothing stale can travel with the buffers)."""
    from hybridvit.train.ema import ModelEma

    model = _small_model()
    ema = ModelEma(model, decay=0.5)
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    with torch.no_grad():
        for p in model.parameters():
            p.sub_(0.1 * p.grad)
    ema.update(model)  # lerps weights in place, copies every buffer (geometry included)
    ema.module.eval()  # the evaluation loop calls eval() before using the EMA weights
    x = torch.randn(1, 3, 64, 64)
    fresh = _small_model().eval()
    fresh.load_state_dict(ema.module.state_dict())
    with torch.no_grad():
        out = ema.module(x)
        torch.testing.assert_close(out, fresh(x), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out, ema.module(x).detach(), atol=1e-6, rtol=1e-6)

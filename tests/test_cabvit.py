"""CabViT-H (official equivalence, parameter counts, official layout) and CabViT-P (design, gradients)."""
from __future__ import annotations

import copy
import itertools

import pytest
import torch
from conftest import assert_matches_official_layout, load_fixture

import hybridvit
from hybridvit.checkpoint import CheckpointError
from hybridvit.layers import plain_paths
from hybridvit.models.cabvit import CaBAttention, CabViTH
from hybridvit.registry import count_params, get_entry, meta_model

# the published variants the registry must hold (test_registry_entries)
H_VARIANTS = ("cabvit_h_l1", "cabvit_h_l2", "cabvit_h_l3")
P_VARIANTS = ("cabvit_p_tiny", "cabvit_p_small", "cabvit_p_base")
TINY_H = dict(embed_dims=(8, 16, 24, 32), depths=(1, 1, 3, 2), num_heads=(0, 0, 2, 2))  # the fixture's
TINY_P = dict(embed_dim=32, depths=(3, 2), num_heads=2)


@pytest.fixture(scope="module")
def fixture():
    return load_fixture("cabvit_h_tiny")


def fixture_model(fx: dict) -> CabViTH:
    """The model of the loaded cabvit_h_tiny fixture, with its official weights, in eval mode."""
    c = fx["official_config"]
    m = hybridvit.create_model("cabvit_h_l1", num_classes=c["num_classes"], embed_dims=c["embed_dims"],
                               depths=c["depths"], num_heads=c["num_heads"])
    hybridvit.load_checkpoint(m, {"state_dict": fx["state_dict"]})
    return m.eval()


@pytest.fixture(scope="module")
def tiny_h(fixture) -> CabViTH:
    return fixture_model(fixture)


def test_fixture_reproduces_official_logits(fixture, tiny_h):
    with torch.no_grad():
        out = tiny_h(fixture["input"])
    assert (out - fixture["logits"]).abs().max().item() <= 1e-4


def test_fixture_loads_with_other_num_classes(fixture):
    c = fixture["official_config"]
    m = hybridvit.create_model("cabvit_h_l1", num_classes=3, embed_dims=c["embed_dims"], depths=c["depths"],
                               num_heads=c["num_heads"])
    hybridvit.load_checkpoint(m, fixture["state_dict"])
    assert torch.equal(m.stages[2].blocks.blocks[1].digest.scale,
                       fixture["state_dict"]["layer_2.blocks.1.s_scale_factors"])
    assert m.head.out_features == 3


@pytest.mark.parametrize("name", hybridvit.list_models("cabvit_h_*"))
def test_h_params_and_official_layout(name):
    assert_matches_official_layout(name)


def test_registry_entries():
    assert hybridvit.list_models("cabvit_*") == sorted(H_VARIANTS + P_VARIANTS)
    entry = get_entry("cabvit_h_l2")
    assert entry.family == "cabvit" and entry.top1 == 83.0 and entry.url is None
    assert "no CabViT checkpoints are published" in entry.weights_hint
    with pytest.raises(CheckpointError, match="no CabViT checkpoints"):
        hybridvit.create_model("cabvit_p_tiny", pretrained=True)


def test_p_param_counts():
    # DeiT-Ti/S/B (5.72M/22.05M/86.57M) plus the CaB parts: TME convs, digest calibration, layer scales
    # (no enhancement conv in the very last block: the classifier reads only the class token)
    counts = {n: count_params(meta_model(n)) for n in P_VARIANTS}
    assert counts == {"cabvit_p_tiny": 5_834_536, "cabvit_p_small": 22_284_616, "cabvit_p_base": 87_035_272}


def _official_offset_index(h: int, w: int) -> torch.Tensor:
    """The official per-offset index: offsets numbered in order of first appearance."""
    points = list(itertools.product(range(h), range(w)))
    seen: dict[tuple[int, int], int] = {}
    idx = []
    for p1 in points:
        for p2 in points:
            off = (abs(p1[0] - p2[0]), abs(p1[1] - p2[1]))
            idx.append(seen.setdefault(off, len(seen)))
    return torch.tensor(idx).view(h * w, h * w)


def test_relative_bias_exact_at_training_size_and_clamped_beyond():
    attn = CaBAttention(16, 2, 0, (2, 2), rel_grid=(7, 7))
    torch.nn.init.normal_(attn.attention_biases)
    table = attn.attention_biases
    assert torch.equal(attn.relative_bias((7, 7)), table[:, _official_offset_index(7, 7)])
    small = attn.relative_bias((3, 5))  # smaller grids only use offsets inside the table
    assert torch.equal(small, table[:, _official_offset_index(7, 7)].view(2, 7, 7, 7, 7)[:, :3, :5, :3, :5]
                       .reshape(2, 15, 15))
    big = attn.relative_bias((8, 10))  # offsets beyond the table reuse its last row/column
    assert big.shape == (2, 80, 80)
    assert torch.equal(big[:, 0, 9], table[:, 6])          # offset (0, 9) -> (0, 6)
    assert torch.equal(big[:, 0, 7 * 10 + 8], table[:, 6 * 7 + 6])  # offset (7, 8) -> (6, 6)


def test_digest_parameters_resized_only_off_the_training_grid(tiny_h):
    blk = tiny_h.stages[2].blocks.blocks[2]  # third CaB block of stage 3: digests of 2 earlier blocks
    s = torch.randn(1, 2 * 16, 24)
    assert torch.equal(blk.digest(s, (4, 4)), blk.digest.norm(s * blk.digest.scale))
    assert blk.digest(torch.randn(1, 2 * 20, 24), (4, 5)).shape == (1, 40, 24)


def test_h_norm_belongs_to_the_head(tiny_h, fixture):
    """CabViT-H normalises the pooled vector: forward_features is the raw stride-32 map, forward_head pools
    then normalises, and together they give the official logits."""
    with torch.no_grad():
        last = tiny_h.forward_features(fixture["input"])
        _, maps = tiny_h.forward_intermediates(fixture["input"], norm=True)
        pooled = tiny_h.forward_head(last, pre_logits=True)
        logits = tiny_h.forward_head(last)
    assert torch.equal(maps[-1], last) and last.shape == (2, 32, 7, 7)
    torch.testing.assert_close(pooled, tiny_h.norm(last.mean((2, 3))))
    assert (logits - fixture["logits"]).abs().max().item() <= 1e-4


def test_p_tokens_stages_and_errors():
    """CabViT-P: forward_features gives the normalised tokens (class token first) that forward_head reads;
    each of its stages is a stride-16 map."""
    m = hybridvit.create_model("cabvit_p_tiny", num_classes=7, **TINY_P).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        tokens = m.forward_features(x)
        assert tokens.shape == (1, 1 + 196, 32)
        torch.testing.assert_close(m.forward_head(tokens), m(x))
        torch.testing.assert_close(m.forward_head(tokens, pre_logits=True), tokens[:, 0])
    assert [(f["num_chs"], f["reduction"]) for f in m.feature_info] == [(32, 16), (32, 16)]
    with pytest.raises(ValueError, match="at least 16x16 pixels"):
        m(torch.randn(1, 3, 15, 64))
    with pytest.raises(CheckpointError, match="no official CabViT-P"):
        hybridvit.load_checkpoint(m, {"blocks.0.attn.qkv.weight": torch.zeros(96, 32)})


def test_p_checkpoint_round_trip(tmp_path):
    a = hybridvit.create_model("cabvit_p_tiny", num_classes=4, **TINY_P).eval()
    path = tmp_path / "p.pt"
    torch.save({"state_dict": a.state_dict()}, path)
    b = hybridvit.create_model("cabvit_p_tiny", num_classes=4, pretrained=str(path), **TINY_P).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_p_gradients_reach_digest_path():
    torch.manual_seed(0)
    m = hybridvit.create_model("cabvit_p_tiny", num_classes=5, layer_scale_init_value=0.1, drop_path_rate=0.0,
                               **TINY_P).train()
    m(torch.randn(2, 3, 64, 64)).logsumexp(-1).sum().backward()
    for s, stage in enumerate(m.stages):
        blocks = stage.blocks
        for i, blk in enumerate(blocks):
            if i > 0:  # calibration of the earlier blocks' digest tokens
                assert blk.digest.scale.grad.abs().sum() > 0, (s, i)
                assert blk.attn.digest_bias.grad.abs().sum() > 0, (s, i)
            if i < len(blocks) - 1:  # token merge conv making the digest tokens
                assert blk.tme.merge.weight.grad.abs().sum() > 0, (s, i)
            else:
                assert blk.tme.merge is None
            if (s, i) != (len(m.stages) - 1, len(blocks) - 1):  # the head reads only the class token
                assert blk.tme.enhance.conv.weight.grad.abs().sum() > 0, (s, i)
            else:
                assert blk.tme.enhance is None


def test_batch_one_and_autocast(tiny_h):
    x = torch.randn(1, 3, 64, 96)
    p = hybridvit.create_model("cabvit_p_tiny", **TINY_P).eval()
    with torch.no_grad():
        ref = tiny_h(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h16, p16 = tiny_h(x), p(x)
    assert h16.dtype == torch.bfloat16 and p16.dtype == torch.bfloat16
    assert h16.isfinite().all() and p16.isfinite().all()
    assert (h16.float() - ref).abs().max() <= 0.05 * ref.abs().max() + 1e-3


# ------------------------------------------------------------------------------ fast paths == plain path
def _plain_attention(attn: CaBAttention, x: torch.Tensor, digest: torch.Tensor | None) -> torch.Tensor:
    """softmax(q k^T * scale + bias) v written out as in the official code (training-grid only)."""
    B, N, C = x.shape
    h, d = attn.num_heads, attn.head_dim
    q, k, v = attn.qkv(x).view(B, N, 3, h, d).permute(2, 0, 3, 1, 4)
    logits = (q * attn.scale) @ k.transpose(-2, -1) + attn.attention_biases[:, _official_offset_index(*attn.rel_grid)]
    if digest is not None:
        _, ks, vs = attn.qkv(digest).view(B, digest.shape[1], 3, h, d).permute(2, 0, 3, 1, 4)
        logits = torch.cat([logits, (q * attn.scale) @ ks.transpose(-2, -1) + attn.digest_bias], -1)
        v = torch.cat([v, vs], 2)
    return attn.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(B, N, C))


@pytest.mark.parametrize("num_digest_blocks", [0, 2])
def test_attention_fast_path_equals_plain_in_train_and_eval(num_digest_blocks):
    torch.manual_seed(0)
    attn = CaBAttention(32, 4, num_digest_blocks, (2, 2), rel_grid=(5, 6))
    for p in attn.parameters():
        torch.nn.init.normal_(p)
    x = torch.randn(2, 30, 32)
    s = torch.randn(2, num_digest_blocks * 4, 32) if num_digest_blocks else None
    ref = _plain_attention(attn, x, s)
    with torch.no_grad():
        for mode in (True, False, True):  # eval reuses nothing that training could have made stale
            out = attn.train(mode)(x, (5, 6), s)
            assert (out - ref).abs().max().item() < 1e-4 * ref.abs().max().item()


def test_attention_bias_follows_new_weights(tiny_h):
    """No stale bias after load_state_dict, in-place edits or a dtype change, in eval mode."""
    m = hybridvit.create_model("cabvit_h_l1", num_classes=10, **TINY_H)
    m.load_state_dict(tiny_h.state_dict())
    m.eval()
    x = torch.randn(1, 3, 64, 64)
    attn = m.stages[2].blocks.blocks[1].attn
    hw, N = attn.rel_grid, attn.rel_grid[0] * attn.rel_grid[1]  # training grid: the index buffer path
    key = "stages.2.blocks.blocks.1.attn."
    with torch.no_grad():
        before = m(x)
        bias0 = attn.attn_bias(hw, N)
        sd = {k: v.clone() for k, v in m.state_dict().items()}
        sd[key + "attention_biases"].add_(1.0)
        sd[key + "digest_bias"].normal_()
        m.load_state_dict(sd)
        bias1 = attn.attn_bias(hw, N)
        assert torch.equal(bias1[..., :N], bias0[..., :N] + 1.0)
        assert torch.equal(bias1[0, :, 3, N:], sd[key + "digest_bias"][0, :, 0])
        assert not torch.equal(m(x), before)
        attn.attention_biases.mul_(0)  # in-place edit (as an EMA update does) is seen at once
        assert attn.attn_bias(hw, N)[..., :N].abs().max() == 0
        assert attn.to(torch.float64).attn_bias(hw, N).dtype == torch.float64


def test_attention_bias_is_gathered_at_every_forward_and_once_by_fuse(tiny_h):
    """An ordinary model gathers its attention biases at every forward (nothing kept: a write through `.data`
    is seen at the next call), in the query dtype under bf16 autocast, with the plain path's logits. The fused
    model stores the biases of its configured size as `fused_table_*` buffers and gathers none there; at
    another size it gathers them per call."""
    model = copy.deepcopy(tiny_h)  # a module of its own
    side = model.pretrained_cfg["input_size"][-1]
    x = torch.randn(1, 3, side, side)

    def run(m, x, fast: bool = True):
        with plain_paths(not fast), torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), \
                torch.profiler.profile() as prof:
            out = m(x).float()
        return out, [e.name for e in prof.events()]

    first, first_ops = run(model, x)
    again, ops = run(model, x)
    plain, _ = run(model, x, False)
    gathers = first_ops.count("aten::index_select")
    assert gathers > 0 and ops.count("aten::index_select") == gathers
    assert torch.equal(first, again)
    assert (again - plain).abs().max().item() <= 0.05 * plain.abs().max().item()  # bf16 rounding
    attn = model.stages[2].blocks.blocks[1].attn
    hw, N = attn.rel_grid, attn.rel_grid[0] * attn.rel_grid[1]
    with torch.no_grad():
        assert attn.attn_bias(hw, N, torch.bfloat16).dtype == torch.bfloat16
        assert attn.attn_bias(hw, N).dtype == torch.float32
        assert attn.attn_bias(hw, N) is not attn.attn_bias(hw, N)  # gathered, not kept
        before = attn.attn_bias(hw, N)
        attn.attention_biases.data.add_(1.0)  # no version counter moves
        assert torch.equal(attn.attn_bias(hw, N)[..., :N], before[..., :N] + 1.0)
        edited = model(x)

    fused = copy.deepcopy(model).fuse()
    assert any(n.rsplit(".", 1)[-1].startswith("fused_table_") for n, _ in fused.named_buffers())
    with torch.no_grad():
        torch.testing.assert_close(fused(x), edited, atol=1e-4, rtol=0)
    fused_out, fused_ops = run(fused, x)
    assert fused_ops.count("aten::index_select") == 0  # the stored biases, read
    _, other_ops = run(fused, torch.randn(1, 3, side + 32, side + 32))
    assert other_ops.count("aten::index_select") > 0  # another size: gathered at the call


def _randomise_bn_and_layer_scales(m: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.normal_(0, 0.5, generator=g)
                mod.running_var.uniform_(0.5, 2.0, generator=g)
                mod.weight.normal_(1, 0.2, generator=g)
                mod.bias.normal_(0, 0.2, generator=g)
        for name, p in m.named_parameters():
            if name.rsplit(".", 1)[-1] in ("gamma", "gamma_1", "gamma_2"):
                p.uniform_(0.2, 1.0, generator=g)


@pytest.mark.parametrize("family", ["h", "p"])
def test_fuse_keeps_outputs(family, fixture, tiny_h):
    import copy
    if family == "h":
        m, x = copy.deepcopy(tiny_h), fixture["input"]
    else:
        m, x = hybridvit.create_model("cabvit_p_tiny", num_classes=10, **TINY_P).eval(), torch.randn(2, 3, 64, 80)
    _randomise_bn_and_layer_scales(m)
    with torch.no_grad():
        ref = m(x)
        fused = copy.deepcopy(m).fuse()
        out = fused(x)
        cl = fused.to(memory_format=torch.channels_last)(x)
    assert not any(isinstance(mod, torch.nn.BatchNorm2d) for mod in fused.modules())
    assert all(getattr(mod, g, None) is None for mod in fused.modules() for g in ("gamma", "gamma_1", "gamma_2"))
    tol = 1e-5 * ref.abs().max().item()
    assert (out - ref).abs().max().item() <= tol and (cl - ref).abs().max().item() <= tol
    with pytest.raises(RuntimeError, match="eval"):
        copy.deepcopy(m).train().fuse()


def test_fixture_channels_last_and_fused(fixture, tiny_h):
    import copy
    m = copy.deepcopy(tiny_h).fuse().to(memory_format=torch.channels_last)
    with torch.no_grad():
        out = m(fixture["input"])
    assert (out - fixture["logits"]).abs().max().item() <= 1e-4


def test_inference_matches_the_autograd_and_plain_paths(tiny_h):
    """No-grad inference (the linear epilogues) == the autograd path == `plain_paths()`; a training step of a
    model with drop path and layer scales gives finite gradients for every parameter."""
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fast = tiny_h(x)
        with plain_paths():
            plain = tiny_h(x)
    slow = tiny_h(x)  # grad enabled
    assert (fast - slow).abs().max().item() <= 1e-6 * slow.abs().max().item()
    assert (fast - plain).abs().max().item() <= 1e-6 * slow.abs().max().item()
    m = hybridvit.create_model("cabvit_h_l1", num_classes=10, drop_path_rate=0.3, layer_scale_init_value=0.5,
                               **TINY_H).train()
    m(x).square().sum().backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in m.parameters() if p.requires_grad)


def test_cabvit_residual_stream_stays_bf16_under_autocast(tiny_h, fixture):
    """Under bf16 autocast the layer scales keep each block's output, the residual stream, in bf16."""
    from hybridvit.models import cabvit

    model, x = tiny_h, fixture["input"]
    dtypes = []

    def record(_m, _args, out):
        dtypes.append((out[0] if isinstance(out, tuple) else out).dtype)
    hooks = [m.register_forward_hook(record) for m in model.modules()
             if isinstance(m, (cabvit.ConvNeXtBlock, cabvit.CaBBlock))]
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
    finally:
        for h in hooks:
            h.remove()
    assert dtypes and all(d == torch.bfloat16 for d in dtypes), dtypes
    with torch.no_grad():
        ref = model(x)
    assert (out.float() - ref).abs().max().item() < 0.1 * ref.abs().max().item()


@pytest.mark.parametrize("name", ["cabvit_h_l1", "cabvit_p_tiny"])
def test_weights_load_at_another_input_size(name, tmp_path):
    """CabViT's tables sized by the training resolution (per-offset attention biases, digest biases and scale
    factors, CabViT-P's position embedding) are resampled when a checkpoint of one size loads into a model
    of another, through create_model, load_for_command (every command's --pretrained) and load_model;
    before, 18 shapes differed. At the same size nothing changes; a constant table stays that constant."""
    from hybridvit.inference import load_for_command

    torch.manual_seed(0)
    model = hybridvit.create_model(name, num_classes=6, img_size=64).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(("attention_biases", "digest_bias")):
                p.copy_(torch.arange(p.shape[0] if "attention" in n else p.shape[1], dtype=p.dtype).view(
                    (-1, 1) if "attention" in n else (1, -1, 1, 1)).expand_as(p) * 0.1 + 0.5)
            elif n.endswith("digest.scale"):
                p.fill_(1.5)
    hybridvit.save_pretrained(model, tmp_path / "run")
    same = hybridvit.create_model(name, pretrained=str(tmp_path / "run"), img_size=64)
    for (n, a), b in zip(model.state_dict().items(), same.state_dict().values()):
        torch.testing.assert_close(a, b, msg=n)
    for size in (96, 224):
        big = hybridvit.create_model(name, pretrained=str(tmp_path / "run"), img_size=size).eval()
        assert big.pretrained_cfg["input_size"][-1] == size and big.num_classes == 6
        for n, p in big.named_parameters():
            if n.endswith("attention_biases"):
                expected = (torch.arange(p.shape[0], dtype=p.dtype) * 0.1 + 0.5).view(-1, 1).expand_as(p)
                torch.testing.assert_close(p, expected, msg=n)
            elif n.endswith("digest.scale"):
                torch.testing.assert_close(p, torch.full_like(p, 1.5), msg=n)
        with torch.no_grad():
            assert torch.isfinite(big(torch.randn(1, 3, size, size))).all()
    cmd = load_for_command(str(tmp_path / "run"), img_size=96)
    assert cmd.pretrained_cfg["input_size"][-1] == 96


def test_a_real_mismatch_still_names_the_variant(tmp_path):
    """A bare state dict of another variant (no model name in the file) at another size: the resampling leaves
    what no grid explains alone, and the error names the shapes and asks for the matching variant."""
    torch.save(hybridvit.create_model("cabvit_h_l2", num_classes=3, img_size=64).state_dict(), tmp_path / "l2.pt")
    with pytest.raises(CheckpointError, match="shapes differ.*Is it a checkpoint of another variant"):
        hybridvit.create_model("cabvit_h_l1", pretrained=str(tmp_path / "l2.pt"), img_size=96, num_classes=3)

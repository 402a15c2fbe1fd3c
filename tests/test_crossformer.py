"""CrossFormer / CrossFormer++: official equivalence, parameter counts, conversion, any resolution, padding."""
from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_matches_official_layout, load_fixture

import hybridvit
from hybridvit.checkpoint import CheckpointError
from hybridvit.models.crossformer import (
    CrossFormerBlock,
    DynamicPositionBias,
    LongShortDistanceAttention,
    block_group_sizes,
    cel_channels,
    group_tokens,
)
from hybridvit.registry import get_entry, meta_model

# the published variants the registry must hold (test_registry_entries); the parametrised checks take theirs
# from the registry
VARIANTS = ["crossformer_t", "crossformer_s", "crossformer_b", "crossformer_l",
            "crossformerpp_s", "crossformerpp_b", "crossformerpp_l", "crossformerpp_h"]
FIXTURES = {"crossformer_tiny": "crossformer_t", "crossformerpp_tiny": "crossformerpp_s"}


def overrides(official_config: dict) -> dict:
    """The official constructor arguments of a fixture, under this project's config names."""
    c = official_config
    assert all(m == c["merge_size"][0] for m in c["merge_size"])
    assert len(set(c["mlp_ratio"])) == 1
    return dict(embed_dim=c["embed_dim"], depths=tuple(c["depths"]), num_heads=tuple(c["num_heads"]),
                group_size=tuple(c["group_size"]), interval=tuple(c["crs_interval"]),
                stem_kernels=tuple(c["patch_size"]), merge_kernels=tuple(c["merge_size"][0]),
                mlp_ratio=float(c["mlp_ratio"][0]), group_type=c["group_type"], amplitude_cooling=c["use_acl"])


def fixture_model(name: str, **extra) -> torch.nn.Module:
    fx = load_fixture(name)
    model = hybridvit.create_model(FIXTURES[name], num_classes=fx["official_config"]["num_classes"],
                                   **overrides(fx["official_config"]), **extra)
    hybridvit.load_checkpoint(model, {"model": fx["state_dict"]})
    return model.eval()


@pytest.mark.parametrize("name", list(FIXTURES))
def test_fixture_reproduces_official_logits(name, tmp_path):
    fx = load_fixture(name)
    model = hybridvit.create_model(FIXTURES[name], num_classes=10, **overrides(fx["official_config"])).eval()
    # as published: {'model': ...} with derived buffers that older official code saved, 'module.' prefixes
    sd = {f"module.{k}": v for k, v in fx["state_dict"].items()}
    sd["module.layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(49, 49, dtype=torch.long)
    sd["module.layers.0.blocks.1.attn_mask"] = torch.zeros(64, 49, 49)
    path = tmp_path / "official.pth"
    torch.save({"model": sd, "epoch": 299}, path)
    hybridvit.load_checkpoint(model, path)
    with torch.no_grad():
        logits = model(fx["input"])
    assert (logits - fx["logits"]).abs().max().item() <= 1e-4


def test_bare_official_state_dict_and_other_num_classes(tmp_path):
    fx = load_fixture("crossformerpp_tiny")
    path = tmp_path / "bare.pt"
    torch.save(fx["state_dict"], path)
    model = hybridvit.create_model("crossformerpp_s", num_classes=3, pretrained=str(path),
                                   **overrides(fx["official_config"])).eval()
    ref = fixture_model("crossformerpp_tiny")
    with torch.no_grad():  # everything but the classifier is loaded
        torch.testing.assert_close(model.forward_features(fx["input"][:1]), ref.forward_features(fx["input"][:1]))
    assert model.head.out_features == 3


@pytest.mark.parametrize("name", [n if n in ("crossformer_t", "crossformerpp_s")  # fast tier: one of each
                                  else pytest.param(n, marks=pytest.mark.slow)
                                  for n in hybridvit.list_models("crossformer*")])
def test_param_count_and_official_layout(name):
    assert_matches_official_layout(name)


def test_official_group_size_schedules():
    # values printed by the official CrossFormer.compute_group_size at 224 (stage-1 map 56)
    depths, gs = (2, 2, 18, 2), (4, 4, 14, 7)
    assert block_group_sizes(gs, depths, 56, "constant") == [[4, 4], [4, 4], [14] * 18, [7, 7]]
    assert block_group_sizes(gs, depths, 56, "linear") == [
        [4, 7], [5, 6], [4, 4, 5, 5, 6, 6, 7, 7, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13], [7, 7]]
    assert block_group_sizes(gs, depths, 56, "linear_div") == [
        [4, 7], [5, 6], [4, 4, 5, 5, 6, 6] + [7] * 8 + [14] * 4, [7, 7]]
    assert block_group_sizes(gs, depths, 56, "alter") == [
        [4, 7], [5, 6], [4, 4, 5, 5, 6, 6, 7, 7, 7] + [14, 7] * 4 + [14], [7, 7]]
    assert block_group_sizes(gs, depths, 56, "7_14") == [[4, 4], [4, 4], [7] * 4 + [14] * 14, [7, 7]]
    with pytest.raises(ValueError, match="group_type"):
        hybridvit.create_model("crossformerpp_s", group_type="quadratic")
    model = hybridvit.create_model("crossformerpp_s", embed_dim=16, num_heads=(1, 1, 1, 1), group_type="7_14")
    assert [b.group_size for b in model.stages[2].blocks] == [7] * 4 + [14] * 14


def test_cross_scale_embedding_channels_and_cooling_placement():
    assert cel_channels(64, 4) == [32, 16, 8, 8]
    assert cel_channels(192, 2) == [96, 96]
    model = meta_model("crossformerpp_s")
    assert [p.kernel_size[0] for p in model.stem.projs] == [4, 8, 16, 32]
    assert [p.kernel_size[0] for p in model.stages[1].downsample.projs] == [2, 4]
    cooled = [i for i, b in enumerate(model.stages[2].blocks) if not isinstance(b.cooling, torch.nn.Identity)]
    assert cooled == [2, 5, 8, 11, 14]  # every third block, not the stage's last (17)
    assert all(isinstance(b.cooling, torch.nn.Identity) for b in meta_model("crossformer_s").modules()
               if isinstance(b, CrossFormerBlock))


def test_grouping_follows_official_rule_at_run_time():
    lda = CrossFormerBlock(16, 1, group_size=7, interval=2, long_distance=True)
    assert lda.grouping(14, 14) == (7, 2)
    assert lda.grouping(7, 7) == (7, 1)      # map side <= G: one group of the map side, no LDA
    assert lda.grouping(5, 8) == (5, 1)
    sda = CrossFormerBlock(16, 1, group_size=7, interval=2, long_distance=False)
    assert sda.grouping(14, 14) == (7, 1)


@pytest.mark.parametrize("hw", [(256, 320), (160, 160)])
def test_any_resolution_features_and_batch_one(hw):
    model = fixture_model("crossformerpp_tiny")
    batch = 2 if hw == (160, 160) else 1
    x = torch.randn(batch, 3, *hw)
    with torch.no_grad():
        _, feats = model.forward_intermediates(x)
        logits = model(x)
        single = model(x[-1:])  # batch 1; the padding masks line up per sample
    assert logits.shape == (batch, 10) and torch.isfinite(logits).all()
    torch.testing.assert_close(logits[-1:], single, atol=1e-5, rtol=1e-5)
    dim = model.stem.norm.normalized_shape[0]
    assert [f.shape[1:] for f in feats] == [
        (dim * 2 ** i, hw[0] // (4 * 2 ** i), hw[1] // (4 * 2 ** i)) for i in range(4)]


def _reference_group_attention(attn: LongShortDistanceAttention, x: torch.Tensor, H: int, W: int, G: int,
                               S: int) -> torch.Tensor:
    """Each group attends only among its real tokens (padding cropped away), written out with softmax."""
    B, Hp, Wp, C = x.shape
    h = attn.num_heads
    pos = group_tokens(torch.arange(Hp * Wp).reshape(1, Hp, Wp, 1), G, S)[..., 0]  # (nG, N) flat positions
    bias = attn.dpb(G)
    out = torch.zeros(B, Hp * Wp, C)
    flat = x.reshape(B, Hp * Wp, C)
    for group in pos:
        real = torch.tensor([(p // Wp) < H and (p % Wp) < W for p in group.tolist()])
        if not real.any():
            continue
        idx = group[real]
        qkv = attn.qkv(flat[:, idx]).reshape(B, len(idx), 3, h, C // h).permute(2, 0, 3, 1, 4)
        a = (qkv[0] @ qkv[1].transpose(-1, -2)) * (C // h) ** -0.5 + bias[:, real][:, :, real]
        o = (a.softmax(-1) @ qkv[2]).transpose(1, 2).reshape(B, len(idx), C)
        out[:, idx] = attn.proj(o)
    return out.reshape(B, Hp, Wp, C)[:, :H, :W]


@pytest.mark.parametrize("G,S", [(4, 1), (3, 2), (2, 3)])
def test_padding_is_masked(G, S):
    torch.manual_seed(0)
    attn = LongShortDistanceAttention(32, 2).eval()
    H, W = 7, 10
    div = G * S
    Hp, Wp = H + (-H) % div, W + (-W) % div
    x = torch.randn(2, H, W, 32)
    with torch.no_grad():
        out = attn(x, G, S)
        zero_pad = F.pad(x, (0, 0, 0, Wp - W, 0, Hp - H))
        noisy_pad = zero_pad + 100 * torch.randn_like(zero_pad) * (zero_pad == 0)
        noisy = attn.attend_groups(noisy_pad, H, W, G, S)[:, :H, :W]
        ref = _reference_group_attention(attn, zero_pad, H, W, G, S)
    assert out.shape == x.shape
    torch.testing.assert_close(noisy, out, atol=1e-5, rtol=1e-5)  # padded values do not leak
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)    # = attention among real tokens only


def test_training_step_with_padding_has_finite_grads():
    model = hybridvit.create_model("crossformerpp_s", num_classes=5, embed_dim=16, depths=(2, 1, 4, 1),
                                   num_heads=(1, 1, 2, 2), drop_path_rate=0.2).train()
    loss = F.cross_entropy(model(torch.randn(2, 3, 72, 88)), torch.tensor([0, 3]))
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_bf16_autocast():
    # compiled without graph breaks: test_contract.py::test_compile_fullgraph_equals_eager[crossformerpp_fixture]
    model = fixture_model("crossformerpp_tiny")
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
    assert torch.isfinite(low).all() and (low.float() - ref).abs().max().item() < 0.1 * ref.abs().max().item() + 0.05


def test_errors_are_actionable():
    model = hybridvit.create_model("crossformer_t", embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))
    with pytest.raises(ValueError, match="at least 32x32 pixels, got 31x64"):
        model(torch.randn(1, 3, 31, 64))  # the stride-2 downsamplers need maps of 2x2 or more
    assert model(torch.randn(1, 3, 32, 33)).shape == (1, 1000)
    with pytest.raises(CheckpointError, match=r"Google Drive.*pretrained='/path/to/file.pth'"):
        hybridvit.create_model("crossformer_s", pretrained=True)
    with pytest.raises(CheckpointError, match=r"pan\.baidu\.com.*Download the file by hand"):
        hybridvit.create_model("crossformerpp_h", pretrained=True)


def test_registry_entries():
    assert hybridvit.list_models("crossformer*") == sorted(VARIANTS)
    top1 = {n: get_entry(n).top1 for n in VARIANTS}
    assert top1 == {"crossformer_t": 81.5, "crossformer_s": 82.5, "crossformer_b": 83.4, "crossformer_l": 84.0,
                    "crossformerpp_s": 83.2, "crossformerpp_b": 84.2, "crossformerpp_l": 84.7, "crossformerpp_h": 84.9}
    assert all(get_entry(n).family == "crossformer" and get_entry(n).url is None for n in VARIANTS)
    assert {get_entry(n).license for n in VARIANTS} == {"mit"}
    cfgs = [get_entry(n).pretrained_cfg for n in VARIANTS]
    assert all((c["crop_pct"], c["crop_mode"], c["interpolation"]) == (0.875, "center", "bicubic") for c in cfgs)
    assert get_entry("crossformerpp_s").pretrained_cfg["paper_ids"] == "arXiv:2303.06908"


def _dpbs(model: torch.nn.Module) -> list[DynamicPositionBias]:
    return [m for m in model.modules() if isinstance(m, DynamicPositionBias)]


def _small_pp(**kw) -> torch.nn.Module:
    return hybridvit.create_model("crossformerpp_s", num_classes=4, embed_dim=16, depths=(1, 2, 3, 1),
                                  num_heads=(1, 1, 2, 2), drop_path_rate=0.0, **kw)


def test_dpb_is_computed_at_every_forward_and_fuse_stores_the_configured_size():
    """An ordinary model computes the DPB at every forward, even in eval under no_grad (a new tensor each
    call, equal to the MLP's; a weight edit through `.data` is seen at once); with autograd on the MLP gets
    gradients in eval mode. `fuse()` stores the DPB of the configured size as a `fused_table_*` buffer, which
    is what the module returns from then on."""
    model = fixture_model("crossformerpp_tiny")
    x = load_fixture("crossformerpp_tiny")["input"][:1]
    with torch.no_grad():
        inferred = model(x)
        for dpb in _dpbs(model):
            assert dpb(dpb.group_size) is not dpb(dpb.group_size)  # computed, not kept
            torch.testing.assert_close(dpb(dpb.group_size), dpb.compute(dpb.group_size), atol=0, rtol=0)
    assert all("_fused_tables" not in dpb.__dict__ for dpb in _dpbs(model))
    recomputed = model(x)  # autograd on: the MLP runs (and gets gradients), even in eval mode
    assert all(dpb(dpb.group_size).requires_grad for dpb in _dpbs(model))
    torch.testing.assert_close(inferred, recomputed.detach(), atol=1e-5, rtol=0)
    recomputed.sum().backward()
    assert all(dpb.proj.weight.grad is not None for dpb in _dpbs(model))

    edited = fixture_model("crossformerpp_tiny")
    for dpb in _dpbs(edited):
        dpb.proj.weight.data.mul_(-2.0)  # no version counter moves
    with torch.no_grad():
        out = edited(x)
        assert (out - inferred).abs().max().item() > 1e-4
        edited.fuse()
        torch.testing.assert_close(edited(x), out, atol=1e-5, rtol=1e-5)
    for dpb in _dpbs(edited):
        names = dpb.__dict__["_fused_tables"]
        assert names and all(n.startswith("fused_table_") for n in names.values())
        for (G,), name in names.items():
            assert dpb(G) is getattr(dpb, name)  # read, not computed
            torch.testing.assert_close(getattr(dpb, name), dpb.compute(G), atol=0, rtol=0)


@pytest.mark.parametrize("H,W,G,S", [(16, 16, 4, 4), (16, 16, 4, 1), (14, 14, 14, 1), (8, 4, 4, 1), (7, 10, 3, 2)])
def test_inference_paths_equal_plain_ops(H, W, G, S):
    """Residual adds joined to the projections / read through group views, fused oneDNN linears (fp32 CPU
    inference) == the plain training-mode ops."""
    torch.manual_seed(0)
    block = CrossFormerBlock(32, 2, group_size=G, interval=S, long_distance=S > 1)
    x = torch.randn(2, H, W, 32)
    with torch.no_grad():
        plain = block.train()(x)  # no dropout configured: training mode runs the plain ops
        fast = block.eval()(x)
        attn = block.attn(x, G, S)
        torch.testing.assert_close(block.attn(x, G, S, shortcut=x), x + attn, atol=1e-6, rtol=0)
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(block(x).detach(), plain, atol=1e-5, rtol=1e-5)  # autograd on: plain ops


def test_flop_counter_sees_plain_ops_in_inference(monkeypatch):
    from hybridvit.bench import count_macs
    linear_module = importlib.import_module("hybridvit.layers.linear")  # the module, not the function

    model, x = _small_pp().eval(), torch.randn(1, 3, 64, 64)
    counted = count_macs(model, x)  # under a dispatch mode the oneDNN linears step aside
    monkeypatch.setattr(linear_module, "_ONEDNN_LINEAR", False)
    assert counted == count_macs(model, x) > 8e6


def test_crossformer_bf16_training_step_matches_the_plain_path():
    """A bf16 training step with the bf16 attention (explicit on the CPU, with the trainable DPB as its
    bias) is as close to fp32 as SDPA's path under `plain_paths()`."""
    from hybridvit.layers import plain_paths

    model = fixture_model("crossformerpp_tiny").train()
    x = load_fixture("crossformerpp_tiny")["input"]

    def grads(fast: bool, amp: bool) -> torch.Tensor:
        torch.manual_seed(0)  # the same drop-path draws
        model.zero_grad(set_to_none=True)
        with plain_paths(not fast), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = model(x).float().logsumexp(1).mean()
        loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    ref = grads(True, False)
    err = {fast: ((grads(fast, True) - ref).norm() / ref.norm()).item() for fast in (True, False)}
    assert 0 < err[True] < 0.05 and err[True] <= 1.5 * err[False] + 1e-3, err

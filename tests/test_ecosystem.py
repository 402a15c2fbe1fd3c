"""hybridvit in the ecosystem: timm's features_only, optimizer, scheduler and data pieces, torchvision's FX
feature extractor, and Hugging Face transformers' UperNet on hybridvit backbones.

Integration tests: they need timm, torchvision and transformers (the second CI lane,
scripts/test_ecosystem.sh, installs them and fails on any skip here); elsewhere they skip with the reason.
"""
from __future__ import annotations

import math

import pytest
import torch
from test_integrations import TINY, require

import hybridvit

pytestmark = pytest.mark.integration


# ----------------------------------------------------------------------------- timm: features_only
@pytest.mark.parametrize("name", list(TINY))
def test_timm_features_only(name):
    timm = require("timm")
    x = torch.randn(2, 3, 70, 90)
    torch.manual_seed(0)
    ours = hybridvit.create_model(name, features_only=True, out_indices=(1, 3), **TINY[name]).eval()
    for feature_cls in (None, "getter", "Getter"):
        torch.manual_seed(0)
        model = timm.create_model(name, features_only=True, out_indices=(1, 3), feature_cls=feature_cls,
                                  **TINY[name]).eval()
        info = model.feature_info
        assert len(info.info) == 4 and info.out_indices == (1, 3)
        assert info.module_name() == ["stages.1", "stages.3"] and info.reduction() == [8, 32]
        assert [d["index"] for d in info.get_dicts()] == [1, 3]
        with torch.no_grad():
            maps, ref = model(x), ours(x)
        assert [m.shape[1] for m in maps] == info.channels()
        assert all(torch.equal(a, b) for a, b in zip(maps, ref))
        assert [tuple(m.shape[-2:]) for m in maps][1] in ((3, 3), (2, 2))  # ceil or floor of 70/32, 90/32
    with pytest.raises(ValueError, match="fixed strides"):
        timm.create_model(name, features_only=True, output_stride=16, **TINY[name])
    with pytest.raises(ValueError, match="feature_cls='hook' is not supported"):
        timm.create_model(name, features_only=True, feature_cls="hook", **TINY[name])
    assert timm.create_model(name, features_only=True, output_stride=32, **TINY[name]).feature_info.reduction() \
        == [4, 8, 16, 32]


@pytest.mark.parametrize("name", list(TINY))
def test_timm_create_model_device_dtype_and_pool(name):
    timm = require("timm")
    model = timm.create_model(name, device="meta", dtype=torch.bfloat16, **TINY[name])
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    model = timm.create_model(name, num_classes=0, global_pool="", **TINY[name]).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    assert out.ndim == 4 and out.shape[1] == model.num_features
    with pytest.raises(TypeError):
        timm.create_model(name, not_a_model_arg=1, **TINY[name])


# ------------------------------------------------------------------------ torchvision: FX extractor
@pytest.mark.parametrize("name", [*TINY, "cabvit_p_tiny"])
def test_torchvision_fx_feature_extractor_at_two_sizes(name):
    """torchvision's create_feature_extractor traces a hybridvit model once (no timm involved: the
    shape-dependent parts are torch.fx leaf functions) and the graph gives forward_intermediates' maps at
    input sizes other than the traced one."""
    require("torchvision")
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    kw = TINY.get(name, dict(embed_dim=32, depths=(1, 1), num_heads=2))
    model = hybridvit.create_model(name, num_classes=5, **kw).eval()
    train_nodes, eval_nodes = get_graph_node_names(model)
    n = len(model.stages)
    assert all(any(node.startswith(f"stages.{i}.") for node in eval_nodes) for i in range(n))
    stages = [i for i in range(n) if not name.startswith("cabvit_p")]  # CabViT-P: tokens, not maps
    return_nodes = {f"stages.{i}": f"s{i}" for i in stages} or {"stages.1": "s1"}
    extractor = create_feature_extractor(model, return_nodes=return_nodes)
    with torch.no_grad():
        for size in [(64, 64), (90, 122)]:
            x = torch.randn(1, 3, *size)
            out = extractor(x)
            taps = model.forward_intermediates(x, intermediates_only=True)
            for i in stages:
                got = out[f"s{i}"]
                if name.startswith("crossformer"):  # its stages work on (B, H, W, C) maps
                    got = got.permute(0, 3, 1, 2)
                torch.testing.assert_close(got, taps[i], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ timm's training pieces, end to end
COLOURS = [(200, 40, 40), (40, 180, 40), (40, 60, 210), (190, 190, 50)]


def _images(n: int, seed: int):
    """Colour-coded photos-to-be: each class a base colour with noise and a random darker square."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        label = i % len(COLOURS)
        base = torch.tensor(COLOURS[label], dtype=torch.float32).view(3, 1, 1)
        img = base + 35 * torch.randn(3, 80, 96, generator=g)
        y, x = (int(v) for v in torch.randint(0, 40, (2,), generator=g))
        img[:, y:y + 30, x:x + 30] *= 0.6
        arr = img.clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
        out.append((Image.fromarray(arr), label))
    return out


def test_train_and_evaluate_with_timms_pieces():
    """What timm's train.py does, with timm's own pieces on a hybridvit model: create_model,
    resolve_data_config + create_transform (train and eval), create_optimizer_v2 with layer_decay (which
    reads group_matcher and no_weight_decay), create_scheduler_v2 (warm-up + cosine), timm.utils.accuracy."""
    timm = require("timm")
    from timm.data import create_transform, resolve_data_config
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import accuracy

    torch.manual_seed(0)
    model = timm.create_model("fastervit_nano", num_classes=len(COLOURS), drop_rate=0.0, **TINY["fastervit_nano"])
    cfg = resolve_data_config(model=model)
    assert cfg["input_size"] == (3, 64, 64) and cfg["interpolation"] == "bicubic"
    train_tf = create_transform(**cfg, is_training=True, hflip=0.5, color_jitter=0.1)
    eval_tf = create_transform(**cfg)

    optimizer = create_optimizer_v2(model, "adamw", lr=3e-3, weight_decay=0.05, layer_decay=0.75)
    scales = [g["lr_scale"] for g in optimizer.param_groups]
    assert len(scales) > 4 and min(scales) < max(scales) == 1.0  # the stem learns slowest, the head at lr
    by_param = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    assert len(by_param) == sum(1 for _ in model.parameters())  # every parameter, once
    for n, p in model.named_parameters():
        assert (by_param[id(p)]["weight_decay"] == 0.0) == (n in model.no_weight_decay()), n
    assert by_param[id(model.stem.conv1.weight)]["lr_scale"] == min(scales)

    epochs, steps = 4, 6
    scheduler, num_epochs = create_scheduler_v2(optimizer, sched="cosine", num_epochs=epochs, warmup_epochs=1,
                                                warmup_lr=1e-4, updates_per_epoch=steps)
    assert num_epochs == epochs
    data = _images(epochs * steps * 8, seed=0)
    val = _images(64, seed=1)
    loss_fn = torch.nn.CrossEntropyLoss()
    lrs, losses = [], []
    for epoch in range(epochs):
        model.train()
        for step in range(steps):
            batch = data[(epoch * steps + step) * 8:(epoch * steps + step + 1) * 8]
            x = torch.stack([train_tf(img) for img, _ in batch])
            y = torch.tensor([label for _, label in batch])
            loss = loss_fn(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step_update(num_updates=epoch * steps + step + 1)
            losses.append(float(loss))
        scheduler.step(epoch + 1)
        lrs.append(optimizer.param_groups[-1]["lr"])
    assert lrs[0] > lrs[-1] and all(math.isfinite(v) for v in losses)
    model.eval()
    with torch.no_grad():
        x = torch.stack([eval_tf(img) for img, _ in val])
        y = torch.tensor([label for _, label in val])
        top1, = accuracy(model(x), y, topk=(1,))
    assert sum(losses[-6:]) < sum(losses[:6])
    assert float(top1) >= 90.0, f"top-1 {float(top1):.1f}% on 4 colour classes"


# --------------------------------------------------------------------------- transformers' UperNet
@pytest.mark.slow
@pytest.mark.parametrize("name", ["fastervit_0", "crossformerpp_s", "cabvit_h_l1"])
def test_upernet_on_a_hybridvit_backbone(name):
    """transformers' UperNet (the ADE20K head of the FasterViT and CrossFormer++ papers) on the published
    architecture through TimmBackboneConfig: a training step moves the backbone and lowers the loss, and it
    predicts full-resolution logits at two input sizes that no window or group size divides."""
    require("timm")
    require("transformers")
    from transformers import TimmBackboneConfig, UperNetConfig, UperNetForSemanticSegmentation

    torch.manual_seed(0)
    config = UperNetConfig(backbone_config=TimmBackboneConfig(backbone=name, out_indices=(0, 1, 2, 3)),
                           hidden_size=64, auxiliary_channels=32, num_labels=4)
    model = UperNetForSemanticSegmentation(config)
    backbone = model.backbone._backbone
    assert isinstance(backbone, hybridvit.models._base.HybridModel) and backbone.features_only
    assert model.backbone.channels == backbone.feature_info.channels()
    x = torch.randn(2, 3, 96, 96)
    labels = torch.randint(0, 4, (2, 96, 96))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in backbone.parameters()]
    model.train()
    losses = []
    for step in range(3):
        out = model(pixel_values=x, labels=labels)
        opt.zero_grad()
        out.loss.backward()
        if step == 0:
            missing = [n for n, p in backbone.named_parameters() if p.grad is None]
            assert not missing, missing
        opt.step()
        losses.append(float(out.loss))
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0], losses
    assert all(not torch.equal(a, b) for a, b in zip(before, backbone.parameters()))
    model.eval()
    with torch.no_grad():
        for size in [(128, 128), (100, 150)]:
            logits = model(pixel_values=torch.randn(1, 3, *size)).logits
            assert logits.shape == (1, 4, *size) and torch.isfinite(logits).all()

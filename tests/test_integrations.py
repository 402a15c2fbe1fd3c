"""timm and torchvision integrations.

The DetectionBackbone tests need only torch and run everywhere. The timm and torchvision tests run
where those import (the GPU device image has both) and skip elsewhere with the reason: on the CPU-only
development machines torchvision's wheels are CUDA builds that do not import next to the CPU torch, and
timm imports torchvision.
"""
from __future__ import annotations

import importlib
import json
import subprocess
import sys
from collections import OrderedDict

import pytest
import torch
from _hubserver import hub_server, point_hub_at
from conftest import ROOT

import hybridvit
from hybridvit.integrations.torchvision_detection import DetectionBackbone

pytestmark = pytest.mark.integration

# one small model per family; windows/groups of 7 stay as in the published variants
TINY = {
    "fastervit_nano": dict(dim=16, in_dim=8, depths=(1, 1, 1, 1)),
    "crossformer_t": dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), img_size=64),
    "cabvit_h_l1": dict(embed_dims=(16, 32, 48, 64), depths=(1, 1, 1, 1), num_heads=(0, 0, 2, 2), img_size=64),
}


def require(module: str):
    """The module, or a skip saying why it is unavailable (ImportError, or a broken build that raises
    something else on import, as torchvision's CUDA wheels do next to a CPU-only torch)."""
    try:
        return importlib.import_module(module)
    except Exception as e:
        pytest.skip(f"{module} does not import here ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                    f"these checks run where {module} is installed (e.g. the GPU device image)")


# ------------------------------------------------------------------------------------ DetectionBackbone
@pytest.mark.parametrize("name", list(TINY))
def test_detection_backbone_maps(name):
    bb = DetectionBackbone(name, **TINY[name]).eval()
    x = torch.randn(1, 3, 90, 122)  # divisible by neither 32 nor the window size
    with torch.no_grad():
        out = bb(x)
    assert isinstance(out, OrderedDict) and list(out) == ["0", "1", "2", "3"]
    assert bb.strides == [4, 8, 16, 32]
    assert [o.shape[1] for o in out.values()] == bb.out_channels
    for o, s in zip(out.values(), bb.strides):
        assert abs(o.shape[2] - 90 / s) < 1 and abs(o.shape[3] - 122 / s) < 1

    sub = DetectionBackbone(name, out_indices=(1, 3), **TINY[name]).eval()
    assert list(sub(x)) == ["0", "1"] and sub.strides == [8, 32] and sub.out_channels == bb.out_channels[1::2]


def test_detection_backbone_from_a_built_model():
    model = hybridvit.create_model("fastervit_nano", num_classes=10, **TINY["fastervit_nano"])
    bb = DetectionBackbone(model, out_indices=(2, 3))
    assert bb.body is model and model.features_only and model.out_indices == (2, 3)
    with pytest.raises(ValueError, match="go with a model name"):
        DetectionBackbone(model, pretrained=True)
    with pytest.raises(ValueError, match="frozen_stages must be -1"):
        DetectionBackbone("fastervit_nano", frozen_stages=5, **TINY["fastervit_nano"])


def _step(bb: DetectionBackbone) -> None:
    opt = torch.optim.SGD([p for p in bb.parameters() if p.requires_grad], lr=0.1)
    loss = sum(o.square().mean() for o in bb(torch.randn(2, 3, 70, 70)).values())
    opt.zero_grad()
    loss.backward()
    opt.step()


@pytest.mark.parametrize("name", ["fastervit_nano", "cabvit_p_tiny"])
def test_frozen_stages(name):
    kw = TINY.get(name, dict(embed_dim=32, depths=(1, 1), num_heads=2, img_size=64))
    frozen = 1 if name == "fastervit_nano" else 0
    bb = DetectionBackbone(name, frozen_stages=frozen, **kw).train()
    body = bb.body
    stem = body.stem if hasattr(body, "stem") else body.patch_embed
    frozen_mods = [stem] + list(body.stages[:frozen])
    trained_mods = list(body.stages[frozen:])
    assert all(not p.requires_grad for m in frozen_mods for p in m.parameters())
    assert all(p.requires_grad for m in trained_mods for p in m.parameters())
    assert all(not m.training for m in frozen_mods) and all(m.training for m in trained_mods)
    if name == "cabvit_p_tiny":  # parameters held by the model itself (class token, position embedding)
        assert not body.pos_embed.requires_grad and not body.cls_token.requires_grad
    before = {k: v.clone() for k, v in body.state_dict().items()}
    _step(bb)
    after = body.state_dict()
    stem_prefix = "stem." if hasattr(body, "stem") else "patch_embed."
    frozen_prefixes = (stem_prefix,) + tuple(f"stages.{i}." for i in range(frozen))
    for k, v in after.items():
        if k.startswith(frozen_prefixes):  # weights and BatchNorm statistics untouched
            assert torch.equal(v, before[k]), k
    assert any(not torch.equal(v, before[k]) for k, v in after.items() if k.startswith("stages.1.")), \
        "the trained stages did not change"
    # eval()/train() again keeps the frozen part in eval mode
    bb.eval().train()
    assert not stem.training and body.stages[-1].training


def test_norm_eval_keeps_batchnorm_statistics():
    bb = DetectionBackbone("fastervit_nano", norm_eval=True, **TINY["fastervit_nano"]).train()
    bns = [m for m in bb.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(not m.training for m in bns)
    assert bb.body.stages[0].training  # only the norms are in eval mode
    stats = [m.running_mean.clone() for m in bns]
    _step(bb)
    assert all(torch.equal(m.running_mean, s) for m, s in zip(bns, stats))
    assert all(m.weight.grad is not None for m in bns)  # affine parameters still train (as in mmdet)

    plain = DetectionBackbone("fastervit_nano", **TINY["fastervit_nano"]).train()
    stats = [m.running_mean.clone() for m in plain.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    _step(plain)
    moved = [m.running_mean for m in plain.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert any(not torch.equal(a, b) for a, b in zip(moved, stats))


@pytest.mark.slow  # a Python subprocess
def test_import_hybridvit_does_not_import_timm():
    code = "import sys, hybridvit; assert 'timm' not in sys.modules and 'torchvision' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env=_env())


def _env() -> dict:
    import os
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    return env


# ----------------------------------------------------------------------------------------------- timm
@pytest.mark.slow  # Python subprocesses
def test_timm_registry_both_import_orders():
    require("timm")
    for code in ("import hybridvit, timm", "import timm, hybridvit"):
        check = (f"{code}; assert timm.is_model('fastervit_0') and timm.is_model('cabvit_h_l1'); "
                 "assert 'fastervit_0' in timm.list_models('fastervit*'); "
                 "assert 'fastervit_0' in timm.list_models(pretrained=True); "
                 "assert 'crossformer_t' not in timm.list_models(pretrained=True)")
        subprocess.run([sys.executable, "-c", check], check=True, cwd=ROOT, env=_env())


@pytest.mark.parametrize("name", list(TINY))
def test_timm_create_model_and_data_config(name):
    timm = require("timm")
    from timm.data import create_transform, resolve_data_config

    torch.manual_seed(0)
    ours = hybridvit.create_model(name, num_classes=5, **TINY[name]).eval()
    torch.manual_seed(0)
    # the arguments timm's train.py passes (drop_rate=0.0 by default)
    model = timm.create_model(name, num_classes=5, drop_rate=0.0, **TINY[name]).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), ours(x))
    cfg = resolve_data_config(model=model)
    expected = (3, 64, 64) if "img_size" in TINY[name] or name == "fastervit_nano" else (3, 224, 224)
    assert cfg["input_size"] == expected and cfg["interpolation"] == "bicubic"
    assert cfg["mean"] == (0.485, 0.456, 0.406) and cfg["crop_pct"] == model.pretrained_cfg["crop_pct"]
    from PIL import Image
    img = Image.new("RGB", (100, 80), (120, 30, 200))
    assert create_transform(**cfg)(img).shape == expected
    with pytest.raises(ValueError, match="pools by average"):
        timm.create_model(name, global_pool="max", **TINY[name])
    with pytest.raises(ValueError, match="has no drop_block_rate"):
        timm.create_model(name, drop_block_rate=0.1, **TINY[name])


def test_timm_does_not_clobber_a_taken_name(monkeypatch):
    require("timm")
    from timm.models import is_model, model_entrypoint

    from hybridvit.integrations import timm as ht

    # fastervit_nano is taken in timm's registry (here by hybridvit's first registration): registering
    # again keeps that entrypoint and adds hybridvit's model as hybridvit_fastervit_nano
    taken = model_entrypoint("fastervit_nano")
    monkeypatch.delitem(ht._TIMM_NAMES, "fastervit_nano")
    names = ht.register_timm_models()
    assert names["fastervit_nano"] == "hybridvit_fastervit_nano" and is_model("hybridvit_fastervit_nano")
    assert model_entrypoint("fastervit_nano") is taken
    model = model_entrypoint("hybridvit_fastervit_nano")(num_classes=3, **TINY["fastervit_nano"])
    assert model.pretrained_cfg["architecture"] == "hybridvit_fastervit_nano" and model.num_classes == 3


def test_timm_loads_save_pretrained_folders(tmp_path, monkeypatch):
    timm = require("timm")
    require("huggingface_hub")
    torch.manual_seed(0)
    model = hybridvit.create_model("cabvit_h_l1", num_classes=3, **TINY["cabvit_h_l1"]).eval()
    model.class_names = ["a", "b", "c"]
    folder = hybridvit.save_pretrained(model, tmp_path / "repo")
    x = torch.randn(1, 3, 64, 48)
    with torch.no_grad():
        ref = model(x)
    with hub_server({"org/cab": folder}) as (endpoint, requests):
        point_hub_at(monkeypatch, endpoint, tmp_path / "cache")
        for source in ("hf-hub:org/cab", f"local-dir:{folder}"):
            loaded = timm.create_model(source, pretrained=True).eval()
            with torch.no_grad():
                assert torch.equal(loaded(x), ref), source
            assert loaded.class_names == ["a", "b", "c"] and loaded.num_classes == 3
            assert tuple(loaded.pretrained_cfg["input_size"]) == (3, 64, 64)
        assert any("model.safetensors" in r for r in requests)
        fresh = timm.create_model("hf-hub:org/cab").eval()  # timm: architecture only, no weights
        with torch.no_grad():
            assert fresh(x).shape == ref.shape and not torch.equal(fresh(x), ref)
    assert json.loads((folder / "config.json").read_text())["architecture"] == "cabvit_h_l1"


# ----------------------------------------------------------------------------------------- torchvision
def test_torchvision_fpn_on_the_backbone():
    require("torchvision")
    from torchvision.ops import FeaturePyramidNetwork

    bb = DetectionBackbone("crossformer_t", **TINY["crossformer_t"]).eval()
    fpn = FeaturePyramidNetwork(bb.out_channels, 32).eval()
    with torch.no_grad():
        maps = bb(torch.randn(1, 3, 90, 122))
        out = fpn(maps)
    assert list(out) == list(maps) and all(o.shape[1] == 32 for o in out.values())
    assert [o.shape[-2:] for o in out.values()] == [m.shape[-2:] for m in maps.values()]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TINY))
def test_torchvision_maskrcnn_forward_and_training_step(name):
    """Mask R-CNN at an 800x1333-style size: an 800x1200 image, padded by torchvision to 800x1216, gives
    maps (200x304, 100x152, 50x76, 25x38) that no window size of 7 divides."""
    require("torchvision")
    from hybridvit.integrations.torchvision_detection import maskrcnn

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = maskrcnn(name, num_classes=3, frozen_stages=1, norm_eval=True, fpn_channels=64,
                     backbone_kwargs=TINY[name], min_size=800, max_size=1333).to(device)
    images = [torch.rand(3, 800, 1200, device=device)]
    masks = torch.zeros(2, 800, 1200, dtype=torch.uint8, device=device)
    masks[0, 100:300, 200:500] = 1
    masks[1, 400:700, 600:1100] = 1
    targets = [dict(boxes=torch.tensor([[200.0, 100, 500, 300], [600, 400, 1100, 700]], device=device),
                    labels=torch.tensor([1, 2], device=device), masks=masks)]

    model.eval()
    with torch.no_grad():
        maps = model.backbone.body(model.transform(images)[0].tensors)
        (det,) = model(images)
    assert all(s % 7 for m in maps.values() for s in m.shape[-2:]), [tuple(m.shape) for m in maps.values()]
    assert set(det) >= {"boxes", "labels", "scores", "masks"} and det["masks"].shape[-2:] == (800, 1200)

    model.train()
    body = model.backbone.body
    assert not body.body.stem.training and not body.body.stages[0].training and body.body.stages[1].training
    stem_before = [p.clone() for p in body.body.stem.parameters()]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    losses = model(images, targets)
    assert {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"} <= set(losses)
    loss = sum(losses.values())
    assert torch.isfinite(loss)
    opt.zero_grad()
    loss.backward()
    assert all(p.grad is None for p in body.body.stem.parameters())
    assert body.body.stages[-1].parameters().__next__().grad is not None
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(stem_before, body.body.stem.parameters()))


@pytest.mark.parametrize("smuggled", [{"checkpoint_path": "/etc/passwd"}, {"pretrained": "hf-hub:evil/x"},
                                      {"exec": 1}, {"num_classes": 2_000_000}])
def test_timm_hub_config_is_data(tmp_path, smuggled):
    """Through timm too: a Hub folder's model_args (timm passes them as pretrained_model_args) may set only
    the family's construction keys; anything else is refused naming the key."""
    timm = require("timm")
    model = hybridvit.create_model("fastervit_nano", num_classes=3, **TINY["fastervit_nano"]).eval()
    folder = hybridvit.save_pretrained(model, tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_args"].update(smuggled)
    (folder / "config.json").write_text(json.dumps(cfg))
    key = next(iter(smuggled))
    # 'pretrained' collides with timm's own argument: Python refuses the call before any loading
    with pytest.raises((ValueError, TypeError), match=repr(key) if key != "pretrained" else "pretrained"):
        timm.create_model(f"local-dir:{folder}", pretrained=True)

"""The one MAC counter (hybridvit.flops): attention counted on real and meta tensors alike, MACs per image
independent of batch, device and memory layout, per-stage profiles channels first, and `models` and `bench`
reporting the same GMACs."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hybridvit
from hybridvit.cli import main
from hybridvit.flops import chw, count_macs, profile_macs


class _Attention(nn.Module):
    def forward(self, x):  # x: (B, heads, N, d)
        return F.scaled_dot_product_attention(x, x, x)


def test_attention_on_cpu_tensors_is_counted():
    # PyTorch's counter misses the CPU flash kernel: real tensors counted 0 where meta ones counted bmm
    b, h, n, d = 2, 3, 16, 8
    real = count_macs(_Attention(), torch.randn(b, h, n, d))
    meta = count_macs(_Attention(), torch.empty(b, h, n, d, device="meta"))
    assert real == meta == 2 * b * h * n * n * d


def test_macs_per_image_do_not_depend_on_batch_device_or_layout():
    # the position-bias MLP (once per resolution in the inference form) counted per forward added a
    # batch-independent term (crossformerpp_s read 4.43 in the README, 4.42 in `models`, 4.04 in `bench`)
    kw = dict(depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8), embed_dim=32)  # 224 px: every group size its own
    torch.manual_seed(0)
    model = hybridvit.create_model("crossformerpp_s", **kw).train()
    one = count_macs(model, torch.randn(1, 3, 224, 224))
    assert model.training  # mode restored
    assert count_macs(model, torch.randn(2, 3, 224, 224)) == 2 * one
    assert count_macs(model.to(memory_format=torch.channels_last), (3, 224, 224)) == one
    with torch.device("meta"):
        meta = hybridvit.create_model("crossformerpp_s", **kw)
    assert count_macs(meta, (3, 224, 224)) == one
    mods = profile_macs(model, (3, 224, 224))["modules"]
    stages = [mods[f"CrossFormer.stages.{i}"] for i in range(4)]
    assert min(stages) > 0 and sum(stages) < one == mods["CrossFormer"]


def test_models_and_bench_report_the_same_gmacs(tmp_path):
    assert main(["models", "fastervit_nano", "--json", str(tmp_path / "m.json")]) == 0
    assert main(["bench", "-m", "fastervit_nano", "-b", "1", "--warmup", "0", "--repeats", "1", "--threads", "1",
                 "--json", str(tmp_path / "b.json")]) == 0
    listed = json.loads((tmp_path / "m.json").read_text())[0]["gmacs"]
    bench = json.loads((tmp_path / "b.json").read_text())
    assert round(bench["results"][0]["gmacs_per_img"], 2) == listed > 0
    assert bench["environment"]["threads"] == 1


@pytest.mark.slow  # published-size models
def test_stage_profile_is_channels_first_for_every_family():
    from hybridvit.flops import stage_profile

    for name in ("crossformerpp_s", "fastervit_nano", "cabvit_h_l1"):
        with torch.device("meta"):
            model = hybridvit.create_model(name, img_size=64) if name != "crossformerpp_s" else \
                hybridvit.create_model(name)
        size = model.pretrained_cfg["input_size"]
        stages = stage_profile(model, size)
        chans = [s["num_chs"] for s in model.stage_info]
        assert [s["out_shape"][0] for s in stages] == chans, name
        assert stages[0]["out_shape"][1:] == (size[1] // 4, size[2] // 4), name
        assert all(s["macs"] > 0 for s in stages) and sum(s["macs"] for s in stages) < count_macs(model), name


def test_shapes_are_channels_first():
    assert chw((2, 7, 7, 512), 512) == (512, 7, 7)  # CrossFormer's (B, H, W, C)
    assert chw((2, 512, 7, 7), 512) == (512, 7, 7)
    assert chw((2, 196, 384), 384) == (384, 196)
    with pytest.raises(ValueError, match="no dimension"):
        chw((2, 3, 7, 7), 512)

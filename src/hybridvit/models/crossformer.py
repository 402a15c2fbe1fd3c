"""CrossFormer (ICLR 2022) and CrossFormer++ (TPAMI 2023): one model, variants differ by configuration.

Paper concepts (Wang et al., "CrossFormer: A Versatile Vision Transformer Hinging on Cross-scale
Attention"; "CrossFormer++: ..."):

- `CrossScaleEmbedding` (CEL, Sec. 3.1): convolutions of several kernel sizes with one stride, outputs
  concatenated along channels (larger kernels get fewer channels); the stem (kernels 4/8/16/32, norm
  after) and the downsampler between stages (kernels 2/4, norm before).
- `LongShortDistanceAttention` (LSDA, Sec. 3.2): blocks alternate short-distance attention (SDA: adjacent
  GxG groups) and long-distance attention (LDA: tokens sampled every I positions form a group).
  Maps that do not divide are zero-padded at the bottom/right and the padding is masked out as keys.
- `DynamicPositionBias` (DPB, Sec. 3.3): an MLP mapping relative coordinates to per-head biases, so
  any group size works.
- CrossFormer++: a group size per stage (and the official per-block schedules `group_type`), and
  `AmplitudeCooling` (ACL: depthwise 3x3 conv + LayerNorm, no residual) after every third block except
  a stage's last.

Speed (same outputs as the plain computation; `layers.plain_paths()` gives the plain ops): the DPB is
evaluated at every forward from its parameters and once by the inference form (`fuse()`, `layers.table`);
the linears run oneDNN's fused GEMM epilogues (`layers.linear`) and in inference the residual adds join the
output projections.

Departures from the official code, exact at the official resolution: SDA/LDA and the group size are
decided from the feature size at run time (official: from the construction-time resolution), with the
official rule: when the map's shorter side is <= G, the group is the shorter side and no LDA is used.
Any input size works (the official model asserts the training size).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from ..layers import DropPath, Mlp, PositionTable, attend, conv_bn, drop_path_rates, linear, padding_bias_map
from ..layers.context import eager_inference
from ._base import HybridModel
from ._variant import LICENSE_MIT, Variant, pretrained_cfg

GROUP_TYPES = ("constant", "linear", "linear_div", "alter", "7_14")


def cel_channels(out_chans: int, num_kernels: int) -> list[int]:
    """Channel split of a cross-scale embedding (official): halves for the smaller kernels, the largest
    kernel gets what the second largest gets. E.g. 64 over 4 kernels -> [32, 16, 8, 8]."""
    return [out_chans // 2 ** (i + 1) if i < num_kernels - 1 else out_chans // 2 ** i for i in range(num_kernels)]


class CrossScaleEmbedding(nn.Module):
    """CEL: convs with `kernel_sizes` and one `stride`, padding (k - stride) / 2, concatenated.

    Stem (`norm_first=False`): image (B, C, H, W) -> (B, H/s, W/s, D), LayerNorm after the convs.
    Downsampler (`norm_first=True`): (B, H, W, C) -> (B, H/s, W/s, D), LayerNorm before the convs.
    Odd sizes are floored, as every kernel/padding pair here gives floor(H / stride).
    """

    def __init__(self, in_chans: int, out_chans: int, kernel_sizes: Sequence[int], stride: int, norm_first: bool):
        super().__init__()
        self.norm_first = norm_first
        self.norm = nn.LayerNorm(in_chans if norm_first else out_chans)
        self.projs = nn.ModuleList(
            nn.Conv2d(in_chans, d, kernel_size=k, stride=stride, padding=(k - stride) // 2)
            for k, d in zip(kernel_sizes, cel_channels(out_chans, len(kernel_sizes))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm_first:
            x = self.norm(x).permute(0, 3, 1, 2)
        x = torch.cat([conv_bn(x, proj) for proj in self.projs], dim=1).permute(0, 2, 3, 1)
        return x if self.norm_first else self.norm(x)


def group_tokens(x: torch.Tensor, group_size: int, interval: int) -> torch.Tensor:
    """(B, Hp, Wp, C), Hp and Wp multiples of G*I -> (B * nG, G*G, C).

    Tokens I apart form a group (LDA); I = 1 gives adjacent GxG groups (SDA). Group order: batch, then
    region row, region column, offset row, offset column (official order).
    """
    B, Hp, Wp, C = x.shape
    G, S = group_size, interval
    x = x.reshape(B, Hp // (G * S), G, S, Wp // (G * S), G, S, C).permute(0, 1, 4, 3, 6, 2, 5, 7)
    return x.reshape(-1, G * G, C)


def ungroup_view(x: torch.Tensor, group_size: int, interval: int, Hp: int, Wp: int) -> torch.Tensor:
    """(B * nG, G*G, C) -> view (B, Hp/(GI), G, I, Wp/(GI), G, I, C) in map order, without a copy."""
    G, S = group_size, interval
    C = x.shape[-1]
    return x.reshape(-1, Hp // (G * S), Wp // (G * S), S, S, G, G, C).permute(0, 1, 5, 3, 2, 6, 4, 7)


def ungroup_tokens(x: torch.Tensor, group_size: int, interval: int, Hp: int, Wp: int) -> torch.Tensor:
    """(B * nG, G*G, C) -> (B, Hp, Wp, C); inverse of `group_tokens`."""
    return ungroup_view(x, group_size, interval, Hp, Wp).reshape(-1, Hp, Wp, x.shape[-1])


def padding_bias(H: int, W: int, Hp: int, Wp: int, group_size: int, interval: int,
                 device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive key mask of padded tokens, (nG, 1, 1, G*G): 0 for real tokens, MASK_VALUE for padding."""
    mask = padding_bias_map(H, W, Hp, Wp, device, dtype)
    return group_tokens(mask, group_size, interval).reshape(-1, 1, 1, group_size * group_size)


class LongShortDistanceAttention(nn.Module):
    """LSDA: multi-head self-attention within SDA or LDA groups, with the DPB as additive bias.

    (B, H, W, C) -> (B, H, W, C). The map is zero-padded at the bottom/right to a multiple of G*I and the
    padded tokens are masked out as keys, so they never change the real tokens.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, group_size: int = 7):
        super().__init__()
        self.num_heads = num_heads
        self.attn_drop = attn_drop
        self.dpb = DynamicPositionBias(dim // 16, num_heads, group_size)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop) if proj_drop > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, group_size: int, interval: int,
                shortcut: torch.Tensor | None = None) -> torch.Tensor:
        """Attention output, plus `shortcut` (B, H, W, C) if given (inference: no dropout in between)."""
        B, H, W, C = x.shape
        div = group_size * interval
        Hp, Wp = H + (-H) % div, W + (-W) % div
        if Hp != H or Wp != W:
            x = F.pad(x, (0, 0, 0, Wp - W, 0, Hp - H))
            x = self.attend_groups(x, H, W, group_size, interval)[:, :H, :W]
            return x if shortcut is None else shortcut + x
        return self.attend_groups(x, H, W, group_size, interval, shortcut)

    def attend_groups(self, x: torch.Tensor, H: int, W: int, group_size: int, interval: int,
                      shortcut: torch.Tensor | None = None) -> torch.Tensor:
        """Attention on an already padded map (B, Hp, Wp, C) whose real tokens are the top-left H x W;
        `shortcut` (unpadded maps only) is added to the output."""
        B, Hp, Wp, C = x.shape
        G, h = group_size, self.num_heads
        # groups of whole rows of the map (e.g. one group per map): group order is map order
        in_map_order = interval == 1 and Wp == G
        groups = group_tokens(x, G, interval)  # (B*nG, N, C)
        Bg, N, _ = groups.shape
        q, k, v = linear(groups, self.qkv).reshape(Bg, N, 3, h, C // h).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self.dpb(G).unsqueeze(0)  # (1, h, N, N), shared by every group and image
        if Hp != H or Wp != W:
            # per-group masks: SDPA's mask broadcasts per dimension only, so the batch is repeated here
            # (in the compute dtype, and only for the few padded blocks)
            pad = padding_bias(H, W, Hp, Wp, G, interval, x.device, q.dtype)
            bias = (bias.to(q.dtype) + pad).repeat(B, 1, 1, 1)
        out = attend(q, k, v, bias, dropout_p=self.attn_drop if self.training else 0.0)
        out = out.transpose(1, 2).reshape(Bg, N, C)
        if shortcut is not None and in_map_order:  # the residual add joins the projection
            return self.proj_drop(linear(out, self.proj, residual=shortcut)).reshape(B, Hp, Wp, C)
        out = self.proj_drop(linear(out, self.proj))
        if shortcut is None:
            return ungroup_tokens(out, G, interval, Hp, Wp)
        # the residual add reads the groups in map order: no separate un-grouping copy
        out = ungroup_view(out, G, interval, Hp, Wp)
        return (shortcut.reshape(out.shape) + out).reshape(B, Hp, Wp, C)


class DynamicPositionBias(PositionTable):
    """DPB: MLP over relative coordinates (dh, dw) -> per-head bias, for any group size G.

    forward(G) -> (num_heads, G*G, G*G), the bias of token pairs of one GxG group (row-major). It depends
    only on the weights and G: computed at every forward, and once for the configured size by the inference
    form (`fuse()`, `layers.table`).
    """

    GEOMETRY_BUFFERS = ("rel_coords", "rel_index")  # of the configured size (`keep_geometry`)

    def __init__(self, pos_dim: int, num_heads: int, group_size: int = 7):
        super().__init__()
        self.group_size = group_size
        self.proj = nn.Linear(2, pos_dim)
        self.mlp = nn.Sequential(
            nn.LayerNorm(pos_dim), nn.ReLU(), nn.Linear(pos_dim, pos_dim),
            nn.LayerNorm(pos_dim), nn.ReLU(), nn.Linear(pos_dim, pos_dim),
            nn.LayerNorm(pos_dim), nn.ReLU(), nn.Linear(pos_dim, num_heads))
        self.keep_geometry(group_size)

    def geometry(self, G: int, device: torch.device | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The relative coordinates ((2G-1)^2, 2) the MLP reads, and the index (G^4,) of each token pair's
        coordinate (row-major pairs of one GxG group)."""
        rel = torch.arange(1 - G, G, device=device, dtype=torch.float32)
        coords = torch.stack(torch.meshgrid(rel, rel, indexing="ij"), dim=-1).reshape(-1, 2)
        pos = torch.arange(G, device=device)
        ch, cw = (t.reshape(-1) for t in torch.meshgrid(pos, pos, indexing="ij"))
        index = (ch[:, None] - ch[None, :] + G - 1) * (2 * G - 1) + (cw[:, None] - cw[None, :] + G - 1)
        return coords, index.reshape(-1)

    def compute(self, group_size: int) -> torch.Tensor:
        """The bias from the MLP, (num_heads, G*G, G*G); differentiable."""
        G = group_size
        coords, index = self.geometry_for(G, device=self.proj.weight.device)
        table = self.mlp(self.proj(coords.to(self.proj.weight.dtype)))  # ((2G-1)^2, heads)
        return table[index].reshape(G * G, G * G, -1).permute(2, 0, 1).contiguous()

    def forward(self, group_size: int) -> torch.Tensor:
        return self.table(group_size)


class AmplitudeCooling(nn.Module):
    """ACL (CrossFormer++): depthwise 3x3 conv then LayerNorm, no residual; (B, H, W, C) -> same."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(conv_bn(x.permute(0, 3, 1, 2), self.conv).permute(0, 2, 3, 1))


class CrossFormerBlock(nn.Module):
    """Pre-norm LSDA + MLP block, optionally followed by amplitude cooling; (B, H, W, C) -> same.

    `long_distance` blocks use LDA with `interval`, the others SDA. At run time, a map whose shorter side
    is <= `group_size` forms one group of that side and uses SDA (the official rule).
    """

    def __init__(self, dim: int, num_heads: int, group_size: int, interval: int, long_distance: bool,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: float = 0.0, cooling: bool = False):
        super().__init__()
        self.group_size = group_size
        self.interval = interval
        self.long_distance = long_distance
        self.norm1 = nn.LayerNorm(dim)
        self.attn = LongShortDistanceAttention(dim, num_heads, qkv_bias, attn_drop, drop, group_size)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)
        self.cooling = AmplitudeCooling(dim) if cooling else nn.Identity()

    def grouping(self, H: int, W: int) -> tuple[int, int]:
        """(group size, interval) used on an H x W map; interval 1 means SDA."""
        if min(H, W) <= self.group_size:
            return min(H, W), 1
        return self.group_size, self.interval if self.long_distance else 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or not eager_inference():
            x = x + self.drop_path(grouped_attention(self, self.norm1(x)))
            x = x + self.drop_path(self.mlp(self.norm2(x)))
        else:  # no dropout / drop path: the residual adds can join the output projections
            x = grouped_attention(self, self.norm1(x), x)
            x = self.mlp(self.norm2(x), shortcut=x)
        return self.cooling(x)

    def attend(self, x: torch.Tensor, shortcut: torch.Tensor | None = None) -> torch.Tensor:
        """LSDA on the map (B, H, W, C) with the grouping of its size [+ shortcut]."""
        G, interval = self.grouping(x.shape[1], x.shape[2])
        return self.attn(x, G, interval, shortcut=shortcut)

    def extra_repr(self) -> str:
        return f"group_size={self.group_size}, interval={self.interval}, long_distance={self.long_distance}"


def grouped_attention(block: CrossFormerBlock, x: torch.Tensor, shortcut: torch.Tensor | None = None) -> torch.Tensor:
    """`block.attend(x, shortcut)`: a leaf of torch.fx graphs (groups, padding and SDA/LDA are decided
    from the map size in Python, which symbolic tracing cannot follow), so the models trace at any size."""
    return block.attend(x, shortcut)


torch.fx.wrap("grouped_attention")


class CrossFormerStage(nn.Module):
    """Optional CEL downsampler (stride 2), then blocks alternating SDA / LDA; (B, H, W, C) maps."""

    def __init__(self, in_dim: int, dim: int, depth: int, num_heads: int, group_sizes: Sequence[int],
                 interval: int, merge_kernels: Sequence[int] | None, mlp_ratio: float, qkv_bias: bool,
                 drop: float, attn_drop: float, drop_path: Sequence[float], amplitude_cooling: bool):
        super().__init__()
        self.downsample = (CrossScaleEmbedding(in_dim, dim, merge_kernels, stride=2, norm_first=True)
                           if merge_kernels else nn.Identity())
        self.blocks = nn.ModuleList(
            CrossFormerBlock(dim, num_heads, group_sizes[i], interval, long_distance=i % 2 == 1,
                             mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop=drop, attn_drop=attn_drop,
                             drop_path=drop_path[i],
                             cooling=amplitude_cooling and (i + 1) % 3 == 0 and i < depth - 1)
            for i in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        for block in self.blocks:
            x = block(x)
        return x


def _numpy_arange(start: float, stop: float, step: float) -> list[float]:
    """np.arange for floats, value for value (numpy fills start + i * (first step actually taken))."""
    n = max(0, math.ceil((stop - start) / step))
    delta = (start + step) - start
    return [start + i * delta for i in range(n)]


def block_group_sizes(group_size: Sequence[int], depths: Sequence[int], resolution: int,
                      group_type: str = "constant") -> list[list[int]]:
    """Group size of every block (CrossFormer++'s progressive group size), as the official schedules.

    resolution: the stage-1 map side at the training size (img_size // 4). `constant` uses
    `group_size[stage]` everywhere; `linear`, `linear_div`, `alter` grow the group with depth as a
    fraction of the map; `7_14` halves the group of the first four blocks of stage 3.
    """
    if group_type not in GROUP_TYPES:
        raise ValueError(f"unknown group_type {group_type!r}; choose one of {', '.join(GROUP_TYPES)}")
    min_size = 4
    fraction = _numpy_arange(min_size / resolution, 1.0, (1 - min_size / resolution) / sum(depths))
    sizes, cnt = [], 0
    for stage, depth in enumerate(depths):
        res = resolution // 2 ** stage
        sizes.append([])
        for block in range(depth):
            if group_type == "constant":
                g = group_size[stage]
            elif group_type == "7_14":
                g = group_size[stage] if stage != 2 or block >= 4 else group_size[stage] // 2
            else:
                gz = res * fraction[cnt]
                if group_type == "linear_div" and gz > res // 2:
                    gz = res if gz > res * 3 / 4 or stage != 2 else res // 2
                elif group_type == "alter" and gz > res // 2:
                    gz = res if cnt % 2 != 0 or stage != 2 else res // 2
                g = max(min_size, math.ceil(gz))
            sizes[stage].append(g)
            cnt += 1
    return sizes


class CrossFormer(HybridModel):
    """CrossFormer / CrossFormer++ classifier.

    image (B, in_chans, H, W) -> CEL stem (stride 4) -> 4 stages (stride 4, 8, 16, 32; stages 2-4 start
    with a CEL downsampler) -> LayerNorm -> global average pool -> linear head. forward_features: the
    normalised stride-32 map (B, 8 * embed_dim, H/32, W/32) (rule in `_base`).
    """

    min_input_size = 32  # each unpadded stride-2 CEL downsampler needs a map of at least 2x2

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, embed_dim: int = 96,
                 depths: Sequence[int] = (2, 2, 6, 2), num_heads: Sequence[int] = (3, 6, 12, 24),
                 group_size: Sequence[int] = (7, 7, 7, 7), interval: Sequence[int] = (8, 4, 2, 1),
                 group_type: str = "constant", amplitude_cooling: bool = False,
                 stem_kernels: Sequence[int] = (4, 8, 16, 32), merge_kernels: Sequence[int] = (2, 4),
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.1, img_size: int | Sequence[int] = 224):
        super().__init__()
        self.in_chans = in_chans
        self.num_classes = num_classes
        n = len(depths)
        dims = [embed_dim * 2 ** i for i in range(n)]
        self.num_features = dims[-1]
        stride = stem_kernels[0]
        side = img_size if isinstance(img_size, int) else img_size[0]
        groups = block_group_sizes(group_size, depths, side // stride, group_type)
        dpr = drop_path_rates(drop_path_rate, depths)

        self.stem = CrossScaleEmbedding(in_chans, embed_dim, stem_kernels, stride=stride, norm_first=False)
        self.pos_drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.stages = nn.ModuleList(
            CrossFormerStage(dims[max(i - 1, 0)], dims[i], depths[i], num_heads[i], groups[i], interval[i],
                             merge_kernels if i > 0 else None, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate,
                             dpr[i], amplitude_cooling)
            for i in range(n))
        self.stage_info = [dict(num_chs=dims[i], reduction=stride * 2 ** i, module=f"stages.{i}") for i in range(n)]
        self.norm = nn.LayerNorm(self.num_features)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.pos_drop(self.stem(x))  # (B, H/4, W/4, C): stages work on channels-last maps

    def _to_map(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return x.permute(0, 3, 1, 2)

    def convert_official(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return convert_official(state_dict)


_DERIVED_BUFFERS = ("relative_position_index", "attn_mask", "biases")


def _convert_key(key: str) -> str:
    parts = key.split(".")
    if parts[0] == "patch_embed":
        return ".".join(["stem"] + parts[1:])
    if parts[0] != "layers":
        return key
    stage, rest = int(parts[1]), parts[2:]
    if rest[0] == "downsample":  # official: at the end of stage i; here: at the start of stage i + 1
        sub = ["projs"] + rest[2:] if rest[1] == "reductions" else rest[1:]
        return ".".join(["stages", str(stage + 1), "downsample"] + sub)
    # rest = blocks.j.<module>...
    head, tail = rest[:2], rest[2:]
    if tail[:2] == ["attn", "pos"]:
        name = tail[2]
        if name == "pos_proj":
            tail = ["attn", "dpb", "proj"] + tail[3:]
        else:  # posK.{0: LayerNorm, 2: Linear} -> mlp.{3(K-1) + index}
            idx = 3 * (int(name[3:]) - 1) + int(tail[3])
            tail = ["attn", "dpb", "mlp", str(idx)] + tail[4:]
    elif tail[0] in ("ex_conv", "ex_ln"):
        tail = ["cooling", "conv" if tail[0] == "ex_conv" else "norm"] + tail[1:]
    return ".".join(["stages", str(stage)] + head + tail)


def convert_official(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official CrossFormer / CrossFormer++ state dict (as published) -> this implementation's keys.

    Buffers the official code derives from the configuration (relative_position_index, attention masks,
    DPB coordinate tables) are dropped: they are recomputed from the feature size at run time.
    """
    return {_convert_key(k): v for k, v in state_dict.items() if k.rsplit(".", 1)[-1] not in _DERIVED_BUFFERS}


_REPO = "https://github.com/cheerss/CrossFormer"
_V1 = dict(group_size=(7, 7, 7, 7), interval=(8, 4, 2, 1))
_PP = dict(group_size=(4, 4, 14, 7), interval=(4, 2, 1, 1), amplitude_cooling=True)


def _variant(name: str, cfg: dict[str, Any], top1: float, where: str) -> Variant:
    """A variant whose checkpoint the official README links (`where`); official preprocessing: the Swin
    pipeline, bicubic resize to 256/224 of the size then a 224 centre crop (crop_pct 0.875)."""
    paper = "arXiv:2303.06908" if name.startswith("crossformerpp") else "arXiv:2108.00154"
    return Variant(
        name, "crossformer", CrossFormer, cfg, top1=top1,
        weights_hint=(f"the official checkpoint is published only on the links of the official repository "
                      f"({_REPO}): {where}; there is no direct download URL"),
        # the four stem convolutions all read the image
        pretrained_cfg=pretrained_cfg(crop_pct=0.875, first_conv=tuple(f"stem.projs.{i}" for i in range(4)),
                                      min_input_size=CrossFormer.min_input_size,
                                      license=LICENSE_MIT, origin_url=_REPO, paper_ids=paper))


def _links(drive: str | None, baidu: str, key: str) -> str:
    """Where the official README links a checkpoint (Google Drive file id, BaiduCloud share and key;
    the CrossFormer++ shares take the key as `pwd`)."""
    share = f"{baidu}?pwd={key}" if drive is None else baidu
    pan = f"BaiduCloud https://pan.baidu.com/s/{share} (key {key})"
    return f"Google Drive https://drive.google.com/file/d/{drive}/view or {pan}" if drive else pan


_H = (4, 8, 16, 32)
_TABLE = [  # name, embed_dim, depths, num_heads, drop_path_rate, top-1, checkpoint links
    ("crossformer_t", 64, (1, 1, 8, 6), (2, 4, 8, 16), 0.1, 81.5,
     _links("1YSkU9enn-ITyrbxLH13zNcBYvWSEidfq", "1M45YXZgVvp6Ew9DO8UhdlA", "nkju")),
    ("crossformer_s", 96, (2, 2, 6, 2), (3, 6, 12, 24), 0.2, 82.5,
     _links("1RAkigsgr33va0RZ85S2Shs2BhXYcS6U8", "1Xf4MXfb_soCnJFBeNDmoQQ", "fgqj")),
    ("crossformer_b", 96, (2, 2, 18, 2), (3, 6, 12, 24), 0.3, 83.4,
     _links("1bK8biVCi17nz_nkt7rBfio_kywUpllSU", "1f5dH__UGDXb-HoOPHT5p0A", "7md9")),
    ("crossformer_l", 128, (2, 2, 18, 2), _H, 0.5, 84.0,
     _links("1zRWByVW_KIZ87NgaBkDIm60DAsGJErdG", "1YJLeHy_cxLBrZLklQBCA_A", "cc89")),
    ("crossformerpp_s", 64, (2, 2, 18, 2), (2, 4, 8, 16), 0.2, 83.2, _links(None, "1smc_kRoogd0Ig5vfqwuGTA", "crsf")),
    ("crossformerpp_b", 96, (2, 2, 18, 2), (3, 6, 12, 24), 0.3, 84.2, _links(None, "13XVP0ebtNcyRMmkl11ALYg", "crsf")),
    ("crossformerpp_l", 128, (2, 2, 18, 2), _H, 0.5, 84.7, _links(None, "1xtPh-ndcOxRM7fPYYxIIRg", "crsf")),
    ("crossformerpp_h", 128, (6, 6, 18, 2), _H, 0.5, 84.9, _links(None, "1xtPh-ndcOxRM7fPYYxIIRg", "crsf")),
]
VARIANTS = [_variant(name, dict(embed_dim=dim, depths=depths, num_heads=heads, drop_path_rate=dpr,
                                **(_PP if name.startswith("crossformerpp") else _V1)), top1, where)
            for name, dim, depths, heads, dpr, top1, where in _TABLE]

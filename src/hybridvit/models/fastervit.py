"""FasterViT: Fast Vision Transformers with Hierarchical Attention (Hatamizadeh et al., ICLR 2024).

Convolutional stages at strides 4 and 8, then transformer stages at strides 16 and 32 built from
*hierarchical attention* (HAT) blocks (paper Sec. 3.2): a few carrier tokens summarise each local
window (`CarrierTokenInit`), attend to each other globally, then every window attends to
[its carrier tokens + its own tokens] (`HierarchicalAttention`); in the last block of a stage the
carrier tokens are upsampled into the feature map (propagation).

Unlike the official code, which is fixed to its training resolution, every model here accepts any
input size, decided at each forward: maps that do not divide are padded to whole windows (padded
keys are masked), the window shrinks to the map when the map is smaller, the carrier-token grid
follows the number of windows, and the continuous position biases are evaluated for the grid in
use. At the configured resolution all of this reduces exactly to the official computation.

Speed (same outputs as the plain computation, checked by the tests; `layers.plain_paths()` gives the plain
ops):

- attention through SDPA with the position bias as one additive (1, heads, N, N) mask broadcast over
  the windows of the batch;
- the position MLPs (absolute embeddings, continuous relative biases) are evaluated at every forward
  from the parameters; the inference form (`fuse()`) computes them once for the configured size
  (`layers.table`), folds BatchNorm into the convolutions and layer scales into the layers before them;
- a HAT stage partitions its map into windows once, keeps [carrier tokens + window tokens] of every
  window in one (B*nW, P + ws*ws, C) tensor through all its blocks (carriers are updated in place of
  their rows, no per-block concatenation or split) and reverses once;
- maps stay channels_last between the convolutions and the window partitioning.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from ..layers import (
    DropPath,
    LayerNorm2d,
    Mlp,
    PositionTable,
    attend,
    conv_bn,
    drop_path_rates,
    fold_bn,
    fold_layer_scale,
    linear,
    make_layer_scale,
    pad_hw,
    padding_bias_map,
    window_partition,
    window_reverse,
)
from ._base import HybridModel
from ._variant import LICENSE_NVIDIA_NC, Variant, pretrained_cfg

__all__ = ["FasterViT"]

# ---------------------------------------------------------------------------------------------
# Stem and convolutional stages (paper Sec. 3.1)
# ---------------------------------------------------------------------------------------------

class Stem(nn.Module):
    """Two strided conv-BN-ReLU: (B, in_chans, H, W) -> (B, dim, H/4, W/4)."""

    def __init__(self, in_chans: int, in_dim: int, dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, in_dim, 3, 2, 1, bias=False)
        self.norm1 = nn.BatchNorm2d(in_dim, eps=1e-4)
        self.conv2 = nn.Conv2d(in_dim, dim, 3, 2, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(dim, eps=1e-4)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # channels_last from the first conv on (a copy of the 3-channel input only): the convolutions skip
        # their layout reorders and the HAT stages partition NHWC memory directly
        x = x.contiguous(memory_format=torch.channels_last)
        x = conv_bn(x, self.conv1, self.norm1, self.act)
        return conv_bn(x, self.conv2, self.norm2, self.act)

    @torch.no_grad()
    def fuse(self) -> None:
        self.conv1, self.norm1 = fold_bn(self.conv1, self.norm1), nn.Identity()
        self.conv2, self.norm2 = fold_bn(self.conv2, self.norm2), nn.Identity()


class Downsample(nn.Module):
    """LayerNorm2d + strided 3x3 conv: (B, C, H, W) -> (B, 2C, ceil(H/2), ceil(W/2))."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm = LayerNorm2d(dim, eps=1e-6)
        self.reduction = nn.Conv2d(dim, out_dim, 3, 2, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv_bn(self.norm(x), self.reduction)


class ConvBlock(nn.Module):
    """Residual conv block: x + [gamma *] BN(conv3x3(GELU(BN(conv3x3(x))))), (B, C, H, W)."""

    def __init__(self, dim: int, drop_path: float = 0.0, layer_scale: float | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, 3, padding=1)
        self.norm1 = nn.BatchNorm2d(dim)
        self.act = nn.GELU()
        self.conv2 = nn.Conv2d(dim, dim, 3, padding=1)
        self.norm2 = nn.BatchNorm2d(dim)
        self.gamma = nn.Parameter(layer_scale * torch.ones(dim)) if layer_scale is not None else None
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = conv_bn(conv_bn(x, self.conv1, self.norm1, self.act), self.conv2, self.norm2)
        if self.gamma is not None:
            y = y * self.gamma.view(1, -1, 1, 1)
        return x + self.drop_path(y)

    @torch.no_grad()
    def fuse(self) -> None:
        self.conv1, self.norm1 = fold_bn(self.conv1, self.norm1), nn.Identity()
        self.conv2, self.norm2 = fold_bn(self.conv2, self.norm2), nn.Identity()
        fold_layer_scale(self.conv2, self.gamma)
        self.gamma = None


class ConvStage(nn.Module):
    """[Downsample] + residual conv blocks, (B, C, H, W) -> (B, C', H', W')."""

    def __init__(self, dim: int, depth: int, in_dim: int | None, drop_path: Sequence[float],
                 layer_scale: float | None):
        super().__init__()
        self.downsample = Downsample(in_dim, dim) if in_dim is not None else None
        self.blocks = nn.ModuleList(ConvBlock(dim, drop_path[i], layer_scale) for i in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample is not None:
            x = self.downsample(x)
        for blk in self.blocks:
            x = blk(x)
        return x


# ---------------------------------------------------------------------------------------------
# Hierarchical attention stages (paper Sec. 3.2): carrier tokens, position encodings, HAT
# ---------------------------------------------------------------------------------------------

class CarrierTokenInit(nn.Module):
    """Carrier-token initializer (paper Eq. 3): depthwise 3x3 conv position encoding, then average
    pooling of the map down to `ct_size` x `ct_size` tokens per window.

    (B, C, H, W) -> (B, Gh*Gw, C) in raster order, Gh x Gw = ct_size * (windows per column, per row).
    The pooling kernel and stride follow the official formula, for the actual map size.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.pos_embed = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
        x = conv_bn(x, self.pos_embed)
        H, W = x.shape[-2:]
        if H >= grid_h and W >= grid_w:
            sh, sw = H // grid_h, W // grid_w
            x = F.avg_pool2d(x, (H - (grid_h - 1) * sh, W - (grid_w - 1) * sw), (sh, sw))
        else:  # tiny map (smaller than its carrier grid): repeat pixels
            x = F.adaptive_avg_pool2d(x, (grid_h, grid_w))
        return x.flatten(2).transpose(1, 2)


class CoordMLP(nn.Module):
    """2 -> 512 -> out MLP on continuous coordinates (the official `cpb_mlp`)."""

    def __init__(self, out_features: int, hidden: int = 512):
        super().__init__()
        self.fc1 = nn.Linear(2, hidden)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(hidden, out_features, bias=False)

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(coords.to(self.fc1.weight.dtype))))


class AbsolutePositionMLP(PositionTable):
    """Absolute position embedding of a token grid from an MLP on coordinates normalised to
    about [-1, 1] (the official `PosEmbMLPSwinv1D`, rank 2), for any (h, w) grid.

    compute(h, w, num_prefix) -> (1, P + h*w, C): grid tokens in raster order after P zero rows for
    prefix (carrier) tokens; computed once by `fuse()` (`layers.table`).
    """

    def __init__(self, dim: int):
        super().__init__()
        self.mlp = CoordMLP(dim)

    def compute(self, h: int, w: int, num_prefix: int = 0) -> torch.Tensor:
        device = self.mlp.fc1.weight.device

        def axis(n: int) -> torch.Tensor:
            return (torch.arange(n, device=device, dtype=torch.float32) - n // 2) / max(n // 2, 1)
        coords = torch.stack(torch.meshgrid(axis(h), axis(w), indexing="ij"), dim=-1).view(1, h * w, 2)
        pos = self.mlp(coords)
        return F.pad(pos, (0, 0, num_prefix, 0)) if num_prefix else pos

    def forward(self, x: torch.Tensor, h: int, w: int, num_prefix: int = 0) -> torch.Tensor:
        """x (B, P + h*w, C) -> x + embedding (prefix rows unchanged)."""
        return x + self.table(h, w, num_prefix).to(x.dtype)


class ContinuousPositionBias(PositionTable):
    """Swin-V2 style log-spaced continuous relative position bias (the official `PosEmbMLPSwinv2D`).

    Relative offsets are normalised by the grid size the model was configured for (`pretrained_size`),
    so other grid sizes reuse the same offsets and extrapolate smoothly. compute(h, w, P) is the
    additive bias (heads, P + h*w, P + h*w) where the P prefix (carrier) tokens get zero bias; computed
    once for the configured size by the inference form (`fuse()`, `layers.table`).
    """

    GEOMETRY_BUFFERS = ("rel_coords", "rel_index")  # of the configured size (`keep_geometry`)

    def __init__(self, num_heads: int, pretrained_size: tuple[int, int]):
        super().__init__()
        self.num_heads = num_heads
        self.pretrained_size = tuple(pretrained_size)
        self.mlp = CoordMLP(num_heads)
        self.keep_geometry(*self.pretrained_size)

    def geometry(self, h: int, w: int, device: torch.device | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The log-spaced relative coordinates (2h-1, 2w-1, 2) the MLP reads, and the index ((h*w)^2,) of
        each token pair's coordinate (raster order)."""
        ph, pw = self.pretrained_size
        dh = torch.arange(-(h - 1), h, device=device, dtype=torch.float32) / max(ph - 1, 1)
        dw = torch.arange(-(w - 1), w, device=device, dtype=torch.float32) / max(pw - 1, 1)
        table = torch.stack(torch.meshgrid(dh, dw, indexing="ij"), dim=-1) * 8
        table = torch.sign(table) * torch.log2(table.abs() + 1.0) / 3.0  # log2(8) = 3
        ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
        ys, xs = ys.flatten(), xs.flatten()
        index = (ys[:, None] - ys[None, :] + h - 1) * (2 * w - 1) + (xs[:, None] - xs[None, :] + w - 1)
        return table, index.view(-1)

    def compute(self, h: int, w: int, num_prefix: int = 0) -> torch.Tensor:
        table, index = self.geometry_for(h, w, device=self.mlp.fc1.weight.device)
        values = self.mlp(table).view(-1, self.num_heads)  # ((2h-1)(2w-1), heads)
        bias = 16 * torch.sigmoid(values[index].view(h * w, h * w, self.num_heads).permute(2, 0, 1))
        if num_prefix:
            bias = F.pad(bias, (num_prefix, 0, num_prefix, 0))
        return bias.contiguous()

    def forward(self, h: int, w: int, num_prefix: int = 0) -> torch.Tensor:
        return self.table(h, w, num_prefix)


class HierarchicalAttention(nn.Module):
    """Multi-head attention over [P carrier tokens + an h x w token grid] with a continuous relative
    position bias on the grid (paper Eq. 5-6).

    Used twice in a HAT block: as window attention (grid = one window, prefix = the window's carrier
    tokens) and as global carrier-token attention (grid = the carrier-token grid, no prefix).
    x (B*nW, N, C) -> (B*nW, N, C); `key_mask` (nW, 1, 1, N), 0 or MASK_VALUE, hides padded window tokens.
    """

    def __init__(self, dim: int, num_heads: int, pretrained_size: tuple[int, int], qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop) if proj_drop > 0 else nn.Identity()
        self.pos_bias = ContinuousPositionBias(num_heads, pretrained_size)

    def forward(self, x: torch.Tensor, h: int, w: int, num_prefix: int = 0,
                key_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, N, C = x.shape
        nh, d = self.num_heads, self.head_dim
        bias = self.pos_bias(h, w, num_prefix).unsqueeze(0)  # (1, heads, N, N), broadcast over B*nW
        # strided views of the projection: SDPA reads them without copies
        q, k, v = linear(x, self.qkv).view(B, N, 3, nh, d).permute(2, 0, 3, 1, 4).unbind(0)
        dropout_p = self.attn_drop if self.training else 0.0
        if key_mask is None:
            x = attend(q, k, v, bias, dropout_p=dropout_p)
        else:
            # per-window masks: fold the window index into the head axis so one (1, nW*heads, N, N)
            # bias broadcasts over the batch without being copied per image
            nw = key_mask.shape[0]
            bias = (bias + key_mask).reshape(1, nw * nh, N, N)
            q, k, v = (t.reshape(-1, nw * nh, N, d) for t in (q, k, v))
            x = attend(q, k, v, bias, dropout_p=dropout_p).reshape(B, nh, N, d)
        x = x.transpose(1, 2).reshape(B, N, C)  # exported graphs: see `attend`
        return self.proj_drop(linear(x, self.proj))


class HATBlock(nn.Module):
    """Hierarchical attention block (paper Sec. 3.2, Fig. 3).

    Works on the windows of a stage kept as x (B*nW, P + ws*ws, C): the first P = ct_size^2 rows of each
    window are its carrier tokens (P = 0 in a plain window block). With carrier tokens: the carriers of
    all windows (a Gh x Gw grid per image) get ct <- ct + Attn(ct) + MLP(ct) globally and are written
    back into their rows; then each window attends to [its carriers + its tokens] and goes through the
    MLP. In the last block of a stage (`propagate`), `propagate_carriers` upsamples the carriers
    (nearest) into their window.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int, ct_grid: int | None, ct_size: int = 2,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: float = 0.0, layer_scale: float | None = None, propagate: bool = False):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.ct_size = ct_size
        self.has_carriers = ct_grid is not None
        self.propagate = propagate and self.has_carriers
        self.pos_embed = AbsolutePositionMLP(dim)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = HierarchicalAttention(dim, num_heads, (window_size, window_size), qkv_bias, attn_drop, drop)
        self.gamma_attn = make_layer_scale(dim, layer_scale)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, hidden, drop=drop)
        self.gamma_mlp = make_layer_scale(dim, layer_scale)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        if self.has_carriers:
            self.ct_pos_embed = AbsolutePositionMLP(dim)
            self.ct_norm1 = nn.LayerNorm(dim)
            self.ct_attn = HierarchicalAttention(dim, num_heads, (ct_grid, ct_grid), qkv_bias, attn_drop, drop)
            self.ct_gamma_attn = make_layer_scale(dim, layer_scale)  # official gamma1, also scales propagation
            self.ct_norm2 = nn.LayerNorm(dim)
            self.ct_mlp = Mlp(dim, hidden, drop=drop)
            self.ct_gamma_mlp = make_layer_scale(dim, layer_scale)

    def forward(self, x: torch.Tensor, B: int, ws: int, n_wh: int, n_ww: int,
                key_mask: torch.Tensor | None = None) -> torch.Tensor:
        num_ct = self.ct_size ** 2 if self.has_carriers else 0
        if self.has_carriers:
            C = x.shape[-1]
            cs = self.ct_size
            gh, gw = cs * n_wh, cs * n_ww
            ct = window_reverse(x[:, :num_ct], cs, gh, gw).reshape(B, gh * gw, C)
            ct = self.ct_pos_embed(ct, gh, gw)
            ct = ct + self.drop_path(self.ct_gamma_attn(self.ct_attn(self.ct_norm1(ct), gh, gw)))
            ct = ct + self.drop_path(self.ct_gamma_mlp(self.ct_mlp(self.ct_norm2(ct))))
            x = self.pos_embed(x, ws, ws, num_ct)  # a new tensor: its carrier rows can be replaced in place
            x[:, :num_ct] = window_partition(ct.view(B, gh, gw, C), cs).to(x.dtype)
        else:
            x = self.pos_embed(x, ws, ws)
        x = x + self.drop_path(self.gamma_attn(self.attn(self.norm1(x), ws, ws, num_ct, key_mask)))
        return x + self.drop_path(self.gamma_mlp(self.mlp(self.norm2(x))))

    def propagate_carriers(self, x: torch.Tensor, ws: int) -> torch.Tensor:
        """(B*nW, P + ws*ws, C) -> window tokens (B*nW, ws*ws, C) plus gamma * nearest-upsampled carriers."""
        cs = self.ct_size
        # nearest-neighbour source of every window pixel, exactly as F.interpolate picks it
        src = torch.arange(cs * cs, device=x.device, dtype=torch.float32).view(1, 1, cs, cs)
        src = F.interpolate(src, size=(ws, ws), mode="nearest").flatten().long()
        up = x[:, :cs * cs].index_select(1, src)
        return x[:, cs * cs:] + self.ct_gamma_attn(up)

    @torch.no_grad()
    def fuse(self) -> None:
        """Folds the layer scales into the linear layers before them (inference)."""
        pairs = [("attn", "proj", "gamma_attn"), ("mlp", "fc2", "gamma_mlp")]
        if self.has_carriers:
            pairs.append(("ct_mlp", "fc2", "ct_gamma_mlp"))
            if not self.propagate:  # the propagating block's gamma also scales the upsampled carriers
                pairs.append(("ct_attn", "proj", "ct_gamma_attn"))
        for branch, layer, scale in pairs:
            fold_layer_scale(getattr(getattr(self, branch), layer), getattr(self, scale))
            setattr(self, scale, nn.Identity())


class HATStage(nn.Module):
    """[Downsample] + HAT blocks over windows of the map, with carrier tokens when `hat`.

    The window is min(window_size, larger map side); the map is padded to whole windows (padded keys
    masked in attention) and cropped back. The carrier-token grid is ct_size x (windows per axis).
    The map is partitioned once into (B*nW, P + ws*ws, C) windows (carriers first), which all blocks
    work on, and reversed once; the output is a channels_last (B, C, H, W) map.
    """

    def __init__(self, dim: int, depth: int, in_dim: int | None, num_heads: int, window_size: int,
                 hat: bool, ct_size: int, map_size: int, drop_path: Sequence[float], do_propagation: bool,
                 **block_kw: Any):
        super().__init__()
        self.downsample = Downsample(in_dim, dim) if in_dim is not None else None
        self.window_size = window_size
        self.ct_size = ct_size
        # carrier grid at the configured resolution: normalises the carrier attention's position bias
        ct_grid = ct_size * max(map_size // window_size, 1) if hat else None
        self.token_init = CarrierTokenInit(dim) if hat else None
        self.blocks = nn.ModuleList(
            HATBlock(dim, num_heads, window_size, ct_grid, ct_size, drop_path=drop_path[i],
                     propagate=do_propagation and i == depth - 1, **block_kw)
            for i in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample is not None:
            x = self.downsample(x)
        return hat_windows(self, x)

    def attend_windows(self, x: torch.Tensor) -> torch.Tensor:
        """The blocks over the windows of the (downsampled) map (B, C, H, W) -> (B, C, H, W)."""
        # window geometry (padding, window count, carrier grid) is decided per map size: plain ints,
        # so torch.compile specialises on them instead of reasoning symbolically about min/ceil
        B, C = x.shape[:2]  # the batch stays symbolic (dynamic batch in torch.export / ONNX)
        H, W = int(x.shape[2]), int(x.shape[3])
        ws = min(self.window_size, max(H, W))
        n_wh, n_ww = -(-H // ws), -(-W // ws)  # ceil, integer-only (traces cleanly)
        Hp, Wp = n_wh * ws, n_ww * ws
        cs = self.ct_size
        num_ct = cs * cs if self.token_init is not None else 0
        windows = window_partition(pad_hw(x.permute(0, 2, 3, 1), ws), ws)  # (B*nW, ws*ws, C)
        if self.token_init is not None:
            ct = self.token_init(x, cs * n_wh, cs * n_ww).view(B, cs * n_wh, cs * n_ww, C)
            windows = torch.cat([window_partition(ct, cs).to(windows.dtype), windows], dim=1)
        key_mask = None
        if Hp != H or Wp != W:
            key_mask = window_partition(padding_bias_map(H, W, Hp, Wp, x.device), ws).squeeze(-1)  # (nW, ws*ws)
            key_mask = F.pad(key_mask, (num_ct, 0))[:, None, None, :]  # carriers are never padding
        for blk in self.blocks:
            windows = blk(windows, B, ws, n_wh, n_ww, key_mask)
        last = self.blocks[-1] if len(self.blocks) else None
        if last is not None and last.propagate:
            windows = last.propagate_carriers(windows, ws)
        else:
            windows = windows[:, num_ct:]
        x = window_reverse(windows, ws, Hp, Wp)[:, :H, :W]
        return x.permute(0, 3, 1, 2)  # NCHW view of channels_last memory


def hat_windows(stage: HATStage, x: torch.Tensor) -> torch.Tensor:
    """`stage.attend_windows(x)`: a leaf of torch.fx graphs (the window geometry is decided from the map
    size in Python, which symbolic tracing cannot follow), so the models trace at any input size."""
    return stage.attend_windows(x)


torch.fx.wrap("hat_windows")


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------

def _per_stage(value: int | Sequence[int], n: int = 4) -> list[int]:
    return [value] * n if isinstance(value, int) else list(value)


class FasterViT(HybridModel):
    """FasterViT classifier / backbone: stem -> 2 conv stages -> 2 HAT stages -> norm -> pool -> head.
    forward_features: the normalised stride-32 map (B, 8 * dim, H/32, W/32) (rule in `_base`).

    Takes any input size; `img_size` is the configured (training) resolution, which fixes the
    normalisation of the carrier-token position bias (exact official behaviour at that size).
    """

    def __init__(self, dim: int = 64, in_dim: int = 64, depths: Sequence[int] = (2, 3, 6, 5),
                 num_heads: Sequence[int] = (2, 4, 8, 16), window_size: int | Sequence[int] = 7,
                 ct_size: int = 2, mlp_ratio: float = 4.0, img_size: int = 224, in_chans: int = 3,
                 num_classes: int = 1000, drop_path_rate: float = 0.2, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, qkv_bias: bool = True, layer_scale: float | None = None,
                 layer_scale_conv: float | None = None, layer_norm_last: bool = False,
                 hat: Sequence[bool] = (False, False, True, False), do_propagation: bool = False):
        super().__init__()
        if len(depths) != 4 or len(num_heads) != 4 or len(hat) != 4:
            raise ValueError("FasterViT has 4 stages: depths, num_heads and hat need 4 entries each")
        windows = _per_stage(window_size)
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.stem = Stem(in_chans, in_dim, dim)
        dpr = drop_path_rates(drop_path_rate, depths)
        dims = [dim * 2 ** i for i in range(4)]
        self.stages = nn.ModuleList()
        for i in range(4):
            dp = dpr[i]
            prev = dims[i - 1] if i > 0 else None
            if i < 2:
                stage = ConvStage(dims[i], depths[i], prev, dp, layer_scale_conv)
            else:
                stage = HATStage(dims[i], depths[i], prev, num_heads[i], windows[i], bool(hat[i]), ct_size,
                                 img_size // 2 ** (i + 2), dp, do_propagation, mlp_ratio=mlp_ratio,
                                 qkv_bias=qkv_bias, drop=drop_rate, attn_drop=attn_drop_rate,
                                 layer_scale=layer_scale)
            self.stages.append(stage)
        self.num_features = dims[-1]
        self.norm = LayerNorm2d(dims[-1], eps=1e-6) if layer_norm_last else nn.BatchNorm2d(dims[-1])
        self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.stage_info = [dict(num_chs=dims[i], reduction=4 * 2 ** i, module=f"stages.{i}") for i in range(4)]
        self.apply(self._init_weights)

    def no_weight_decay_keywords(self) -> set[str]:
        return {"pos_embed", "pos_bias"}

    def convert_official(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return convert_official(state_dict)

# ---------------------------------------------------------------------------------------------
# Official checkpoint conversion
# ---------------------------------------------------------------------------------------------

_DERIVED = ("relative_coords_table", "relative_position_index", "relative_bias")
_RENAMES = [
    (r"^patch_embed\.conv_down\.0\.", "stem.conv1."),
    (r"^patch_embed\.conv_down\.1\.", "stem.norm1."),
    (r"^patch_embed\.conv_down\.3\.", "stem.conv2."),
    (r"^patch_embed\.conv_down\.4\.", "stem.norm2."),
    (r"^levels\.(\d+)\.global_tokenizer\.pos_embed\.", r"stages.\1.token_init.pos_embed."),
    (r"^levels\.", "stages."),
    (r"\.reduction\.0\.", ".reduction."),
    (r"\.pos_emb_funct\.cpb_mlp\.0\.", ".pos_bias.mlp.fc1."),
    (r"\.pos_emb_funct\.cpb_mlp\.2\.", ".pos_bias.mlp.fc2."),
    (r"pos_embed\.cpb_mlp\.0\.", "pos_embed.mlp.fc1."),
    (r"pos_embed\.cpb_mlp\.2\.", "pos_embed.mlp.fc2."),
    (r"\.hat_pos_embed\.", ".ct_pos_embed."),
    (r"\.hat_norm1\.", ".ct_norm1."),
    (r"\.hat_norm2\.", ".ct_norm2."),
    (r"\.hat_attn\.", ".ct_attn."),
    (r"\.hat_mlp\.", ".ct_mlp."),
    (r"(blocks\.\d+)\.gamma1$", r"\1.ct_gamma_attn.gamma"),
    (r"(blocks\.\d+)\.gamma2$", r"\1.ct_gamma_mlp.gamma"),
    (r"(blocks\.\d+)\.gamma3$", r"\1.gamma_attn.gamma"),
    (r"(blocks\.\d+)\.gamma4$", r"\1.gamma_mlp.gamma"),
]
_ALIAS = re.compile(r"^(levels\.\d+\.global_tokenizer)\.to_global_feature\.pos\.(weight|bias)$")
_DOWNSAMPLE = re.compile(r"^stages\.(\d+)\.downsample\.")


def convert_official(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official FasterViT state dict (NVlabs key names) -> hybridvit keys.

    Drops the buffers the official code derives from its configuration or caches
    (relative_coords_table, relative_position_index, relative_bias) and the second name of the
    carrier-token initializer's depthwise conv; moves each stage's trailing downsampler to the start
    of the next stage.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.rsplit(".", 1)[-1] in _DERIVED:
            continue
        alias = _ALIAS.match(key)
        if alias:  # same tensor as global_tokenizer.pos_embed.*; used only if that name is absent
            if f"{alias.group(1)}.pos_embed.{alias.group(2)}" in state_dict:
                continue
            key = f"{alias.group(1)}.pos_embed.{alias.group(2)}"
        for pattern, repl in _RENAMES:
            key = re.sub(pattern, repl, key)
        down = _DOWNSAMPLE.match(key)
        if down:
            key = f"stages.{int(down.group(1)) + 1}.downsample." + key[down.end():]
        out[key] = value
    return out


# ---------------------------------------------------------------------------------------------
# Variants
# ---------------------------------------------------------------------------------------------

_HF = "https://huggingface.co/ahatamiz/FasterViT/resolve/main/"
_LS = dict(layer_scale=1e-5, layer_scale_conv=None, do_propagation=True)
_BASE = dict(ct_size=2, mlp_ratio=4, window_size=[7, 7, 7, 7], hat=[False, False, True, False])


def _cfg(img_size: int = 224, crop_pct: float = 1.0, crop_mode: str = "center") -> dict[str, Any]:
    """Preprocessing as the official `default_cfgs` publish it (bicubic, ImageNet mean/std)."""
    return pretrained_cfg(img_size=img_size, crop_pct=crop_pct, crop_mode=crop_mode, first_conv="stem.conv1",
                          min_input_size=FasterViT.min_input_size,
                          license=LICENSE_NVIDIA_NC, origin_url="https://github.com/NVlabs/FasterViT",
                          paper_ids="arXiv:2306.06189")


def _variant(name: str, cfg: dict[str, Any], file: str | None, top1: float | None,
             pre: dict[str, Any]) -> Variant:
    return Variant(name, "fastervit", FasterViT, {**_BASE, **cfg}, url=_HF + file if file else None, top1=top1,
                   pretrained_cfg=pre)


VARIANTS = [
    _variant("fastervit_0", dict(dim=64, in_dim=64, depths=[2, 3, 6, 5], num_heads=[2, 4, 8, 16],
                                 drop_path_rate=0.2), "fastervit_0_224_1k.pth.tar", 82.1, _cfg(crop_pct=0.875)),
    _variant("fastervit_1", dict(dim=80, in_dim=32, depths=[1, 3, 8, 5], num_heads=[2, 4, 8, 16],
                                 drop_path_rate=0.2), "fastervit_1_224_1k.pth.tar", 83.2, _cfg()),
    _variant("fastervit_2", dict(dim=96, in_dim=64, depths=[3, 3, 8, 5], num_heads=[2, 4, 8, 16],
                                 drop_path_rate=0.2), "fastervit_2_224_1k.pth.tar", 84.2, _cfg()),
    _variant("fastervit_3", dict(dim=128, in_dim=64, depths=[3, 3, 12, 5], num_heads=[2, 4, 8, 16],
                                 drop_path_rate=0.3, **_LS), "fastervit_3_224_1k.pth.tar", 84.9, _cfg()),
    _variant("fastervit_4", dict(dim=196, in_dim=64, depths=[3, 3, 12, 5], num_heads=[4, 8, 16, 32],
                                 drop_path_rate=0.3, **_LS), "fastervit_4_224_1k.pth.tar", 85.4, _cfg()),
    _variant("fastervit_5", dict(dim=320, in_dim=64, depths=[3, 3, 12, 5], num_heads=[4, 8, 16, 32],
                                 drop_path_rate=0.3, **_LS), "fastervit_5_224_1k.pth.tar", 85.6, _cfg()),
    _variant("fastervit_6", dict(dim=320, in_dim=64, depths=[3, 3, 16, 8], num_heads=[4, 8, 16, 32],
                                 drop_path_rate=0.5, **_LS), "fastervit_6_224_1k.pth.tar", 85.8, _cfg()),
]
# ImageNet-21K pre-trained, 1K fine-tuned: (resolution, window sizes, top-1, official crop_pct); squash crops
for _res, _w, _top1, _crop in ((224, [7, 7, 14, 7], 86.6, 0.95), (384, [7, 7, 24, 12], 87.6, 1.0),
                               (512, [7, 7, 32, 16], 87.8, 1.0), (768, [7, 7, 48, 24], 87.9, 0.93)):
    VARIANTS.append(_variant(
        f"fastervit_4_21k_{_res}", dict(dim=196, in_dim=64, depths=[3, 3, 12, 5], num_heads=[4, 8, 16, 32],
                                        drop_path_rate=0.42, window_size=_w, hat=[False] * 4, img_size=_res, **_LS),
        f"fastervit_4_21k_{_res}_w{_w[2]}.pth.tar", _top1, _cfg(_res, _crop, "squash")))
# Small extra variant for small images / small data (no published weights; code licence as above).
VARIANTS.append(_variant("fastervit_nano", dict(dim=32, in_dim=16, depths=[1, 1, 2, 2], num_heads=[1, 2, 4, 8],
                                                drop_path_rate=0.05, img_size=64), None, None,
                         _cfg(64, crop_pct=0.875)))

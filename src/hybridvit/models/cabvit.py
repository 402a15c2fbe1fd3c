"""CabViT: Cross Attention among Blocks for Vision Transformer (Zhang et al., 2022).

Each CaB block attends to its own tokens and, as extra keys/values, to the *digest tokens* made by
all earlier blocks of the same stage. A block's *token merge and enhancement* (TME) part merges its
tokens spatially with a long-stride large-kernel depthwise convolution (7x7, stride 4: the digest
tokens) and enhances them with a small depthwise convolution (3x3 + BN) before the FFN. Later blocks
normalise the digest tokens and calibrate them with learned per-token scale factors; the attention
logits of digest tokens get a learned per-token bias, those of the block's own tokens a per-offset
relative bias (CabViT-H).

Models:

- `CabViTH` (hybrid, the official `CaBViT_H`): conv stem (two stride-2 3x3 conv+BN), ConvNeXt blocks
  in stages 1-2, CaB blocks in stages 3-4, inverted-bottleneck patch merging, global average pooling.
  Loads the official state-dict layout (`convert_official`).
- `CabViTP` (plain, DeiT-like with a class token): the official repository only holds a DeiT
  placeholder for it, so it is built from the paper's description; see its docstring.

Any input size: the official code ties the per-offset bias table and the per-token digest parameters
to the training resolution (`img_size`). Here the offset table is indexed with offsets clamped to the
table, and the per-digest-token scale factors and biases are resized bilinearly over the digest grid
when it differs; both are exactly the official values at the training size.

Speed (same outputs as the plain computation): CabViT-H runs channels_last from the stem on, so the
ConvNeXt permutes and the (B, H*W, C) token views of the CaB stages are free; attention goes through
SDPA with one additive bias gathered per block from the tiny bias tables at every forward; the inference
form (`fuse()`) folds conv+BN pairs and layer scales and gathers the biases of the configured size once.
`layers.plain_paths()` gives the plain ops.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from ..layers import (
    DropPath,
    Mlp,
    attend,
    conv_bn,
    derived,
    drop_path_rates,
    fold_bn,
    fold_layer_scale,
    linear,
    scale_channels,
)
from ._base import HybridModel
from ._variant import LICENSE_NONE, Variant, pretrained_cfg

DIGEST_KERNEL, DIGEST_STRIDE = 7, 4


def digest_grid(hw: tuple[int, int]) -> tuple[int, int]:
    """Grid of the digest tokens a (H, W) token map merges into (7x7 conv, stride 4, padding 3)."""
    return (hw[0] + DIGEST_STRIDE - 1) // DIGEST_STRIDE, (hw[1] + DIGEST_STRIDE - 1) // DIGEST_STRIDE


def resize_digest_param(p: torch.Tensor, num_blocks: int, grid0: tuple[int, int],
                        grid: tuple[int, int]) -> torch.Tensor:
    """(L, num_blocks * h0 * w0) per-digest-token values -> (L, num_blocks * h * w), bilinear over the
    digest grid of each earlier block; unchanged (exact) at the training grid."""
    if tuple(grid) == tuple(grid0):
        return p
    L = p.shape[0]
    p = p.reshape(L * num_blocks, 1, grid0[0], grid0[1])
    p = F.interpolate(p, size=grid, mode="bilinear", align_corners=False)
    return p.reshape(L, num_blocks * grid[0] * grid[1])


# ----------------------------------------------------------------------------------------- conv parts
class ConvBN(nn.Sequential):
    """Conv2d without bias followed by BatchNorm2d, (B, C, H, W) -> (B, C', H', W'); in eval the BN is
    folded into the conv by the inference form (`fuse()`)."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 1, stride: int = 1, groups: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, kernel_size // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_chs)

    def forward(self, x: torch.Tensor, act: str | None = None) -> torch.Tensor:
        """act(bn(conv(x))), `act` None or "gelu" (exact; `layers.fuse.conv_bn`)."""
        return conv_bn(x, self.conv, self.bn, act)

    @torch.no_grad()
    def fuse(self) -> None:
        self.conv, self.bn = fold_bn(self.conv, self.bn), nn.Identity()


class Stem(nn.Module):
    """Two stride-2 3x3 conv+BN with GELU between: (B, 3, H, W) -> (B, C, H/4, W/4)."""

    def __init__(self, in_chans: int, dim: int):
        super().__init__()
        self.conv1 = ConvBN(in_chans, dim // 2, 3, 2)
        self.conv2 = ConvBN(dim // 2, dim, 3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x, "gelu"))


class PatchMerging(nn.Module):
    """Inverted bottleneck 1x1 -> depthwise 3x3 stride 2 -> 1x1 (conv+BN, GELU between):
    (B, C, H, W) -> (B, C', ceil(H/2), ceil(W/2))."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.conv1 = ConvBN(dim, out_dim, 1)
        self.conv2 = ConvBN(out_dim, out_dim, 3, 2, groups=out_dim)
        self.conv3 = ConvBN(out_dim, out_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.conv2(self.conv1(x, "gelu"), "gelu"))


class ConvNeXtBlock(nn.Module):
    """ConvNeXt block (stages 1-2 of CabViT-H): dw 7x7 -> LN -> MLP -> layer scale, residual. (B, C, H, W)."""

    def __init__(self, dim: int, drop_path: float = 0.0, layer_scale_init_value: float = 1e-6):
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, 4 * dim)
        self.gamma: nn.Parameter | None = nn.Parameter(torch.full((dim,), layer_scale_init_value))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # channels_last input: the permutes are views, LN and the MLP read contiguous (B, H, W, C) rows
        y = self.mlp(self.norm(conv_bn(x, self.conv_dw).permute(0, 2, 3, 1)))
        return x + self.drop_path(scale_channels(y, self.gamma).permute(0, 3, 1, 2))

    @torch.no_grad()
    def fuse(self) -> None:
        fold_layer_scale(self.mlp.fc2, self.gamma)
        self.gamma = None


# ------------------------------------------------------------------------------------------ CaB parts
class TokenMergeEnhance(nn.Module):
    """Token merge and enhancement (TME).

    On the (H, W) map of the block's tokens (prefix tokens such as a class token pass unchanged):
    *merge*: 7x7 depthwise conv, stride 4 -> digest tokens (B, ceil(H/4) * ceil(W/4), C) for the later
    blocks of the stage (absent in a stage's last block, which has no later block);
    *enhance*: 3x3 depthwise conv + BN, replacing the tokens before the FFN (absent where nothing reads
    the enhanced tokens: CabViT-P's very last block, whose classifier reads only the class token).
    (B, P + H*W, C) -> ((B, P + H*W, C), digest tokens or None).
    """

    def __init__(self, dim: int, merge: bool, num_prefix_tokens: int = 0, enhance: bool = True):
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens
        self.merge = nn.Conv2d(dim, dim, DIGEST_KERNEL, DIGEST_STRIDE, DIGEST_KERNEL // 2, groups=dim,
                               bias=False) if merge else None
        self.enhance = ConvBN(dim, dim, 3, groups=dim) if enhance else None

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        P = self.num_prefix_tokens
        prefix, t = x[:, :P], x[:, P:]
        B, N, C = t.shape
        m = t.transpose(1, 2).reshape(B, C, hw[0], hw[1])
        digest = conv_bn(m, self.merge).flatten(2).transpose(1, 2) if self.merge is not None else None
        if self.enhance is None:
            return x, digest
        t = self.enhance(m).flatten(2).transpose(1, 2)
        return (torch.cat([prefix, t], 1) if P else t), digest


class DigestTokens(nn.Module):
    """Calibrates the digest tokens of the `num_blocks` earlier blocks of the stage before attention:
    LayerNorm and a learned scale factor per digest token. (B, num_blocks * h * w, C) -> same.

    The official CabViT-H multiplies by the scale factors *before* the LayerNorm (`scale_first`), which
    the normalisation largely cancels; CabViT-P follows the paper (normalise, then calibrate).
    """

    def __init__(self, dim: int, num_blocks: int, grid: tuple[int, int], scale_first: bool):
        super().__init__()
        self.num_blocks = num_blocks
        self.grid = tuple(grid)
        self.scale_first = scale_first
        self.scale = nn.Parameter(torch.ones(1, num_blocks * grid[0] * grid[1], 1))
        self.norm = nn.LayerNorm(dim)

    def forward(self, s: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        scale = resize_digest_param(self.scale.view(1, -1), self.num_blocks, self.grid, grid).view(1, -1, 1)
        if self.scale_first:
            return self.norm(s * scale)
        return self.norm(s) * scale


class CaBAttention(nn.Module):
    """Cross attention among blocks: queries from the block's N tokens, keys/values from those tokens
    plus M calibrated digest tokens of earlier blocks (projected with the same qkv weights).

    Logits get a per-offset relative bias among the block's own tokens (`rel_grid`, the training token
    grid; offsets beyond it are clamped) and a learned per-head bias per digest token.
    (B, N, C), digest (B, M, C) -> (B, N, C).

    Speed: both biases are gathered in one indexing op from the concatenated (tiny) tables, with an index
    kept for the training grid (a non-persistent buffer derived from the configuration only, so it can
    never go stale when weights change); queries, keys and values of the block's and the digest tokens
    come out of one projection of the (B, N + M, C) tokens, read by SDPA through strided head views.
    """

    def __init__(self, dim: int, num_heads: int, num_digest_blocks: int, digest_grid0: tuple[int, int],
                 rel_grid: tuple[int, int] | None = None, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.num_digest_blocks = num_digest_blocks
        self.digest_grid0 = tuple(digest_grid0)
        self.rel_grid = tuple(rel_grid) if rel_grid is not None else None
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        if rel_grid is not None:  # one bias per |dy|, |dx| offset, flat index |dy| * W0 + |dx|
            self.attention_biases = nn.Parameter(torch.zeros(num_heads, rel_grid[0] * rel_grid[1]))
            self.register_buffer("bias_index", self._bias_index(self.rel_grid, digest_grid0), persistent=False)
        if num_digest_blocks:
            n = num_digest_blocks * digest_grid0[0] * digest_grid0[1]
            self.digest_bias = nn.Parameter(torch.zeros(1, num_heads, 1, n))

    @torch.no_grad()
    def init_non_persistent_buffers(self) -> None:
        """Fills `bias_index` again (timm's hook; after `to_empty` it holds garbage)."""
        if self.rel_grid is not None:
            self.bias_index.copy_(self._bias_index(self.rel_grid, self.digest_grid0, self.bias_index.device))

    def _offset_index(self, hw: tuple[int, int], device: torch.device | None = None) -> torch.Tensor:
        """(H*W, H*W) flat |dy| * W0 + |dx| index into `attention_biases`, offsets clamped to the table."""
        H0, W0 = self.rel_grid
        ys = torch.arange(hw[0], device=device).repeat_interleave(hw[1])
        xs = torch.arange(hw[1], device=device).repeat(hw[0])
        dy = (ys[:, None] - ys[None, :]).abs().clamp_(max=H0 - 1)
        dx = (xs[:, None] - xs[None, :]).abs().clamp_(max=W0 - 1)
        return dy * W0 + dx

    def _bias_index(self, hw: tuple[int, int], dgrid: tuple[int, int],
                    device: torch.device | None = None) -> torch.Tensor:
        """(N, N + M) index into cat([attention_biases, digest biases], 1): N = H*W tokens, M digest tokens."""
        idx = self._offset_index(hw, device)
        if self.num_digest_blocks:
            M = self.num_digest_blocks * dgrid[0] * dgrid[1]
            K = self.rel_grid[0] * self.rel_grid[1]
            didx = torch.arange(K, K + M, device=device).expand(idx.shape[0], M)
            idx = torch.cat([idx, didx], 1)
        return idx

    def relative_bias(self, hw: tuple[int, int]) -> torch.Tensor:
        """(heads, H*W, H*W) bias among a (H, W) token grid; offsets clamped to the training table."""
        return self.attention_biases[:, self._offset_index(hw, self.attention_biases.device)]

    def attn_bias(self, hw: tuple[int, int], num_tokens: int,
                  dtype: torch.dtype | None = None) -> torch.Tensor | None:
        """Additive logit bias (1, heads, N or 1, N + M) for `num_tokens` queries on a (H, W) grid, in
        `dtype` if given. The same for every batch: gathered at every forward from the bias parameters,
        once for the configured size by the inference form (`fuse()`, `layers.table`)."""
        if not (hasattr(self, "attention_biases") or hasattr(self, "digest_bias")):
            return None
        bias = derived(self, (tuple(hw), num_tokens), lambda: self._attn_bias(hw, num_tokens))
        return bias if dtype is None or bias is None else bias.to(dtype)

    def _attn_bias(self, hw: tuple[int, int], num_tokens: int) -> torch.Tensor | None:
        """`attn_bias` computed."""
        h = self.num_heads
        dgrid = digest_grid(hw)
        dbias = None
        if self.num_digest_blocks:
            dbias = resize_digest_param(self.digest_bias.view(h, -1), self.num_digest_blocks, self.digest_grid0,
                                        dgrid)
        if self.rel_grid is None:  # no bias among own tokens: one row broadcast over the queries
            if dbias is None:
                return None
            return torch.cat([dbias.new_zeros(h, num_tokens), dbias], 1).view(1, h, 1, -1)
        if tuple(hw) == self.rel_grid:
            idx = self.bias_index
        else:
            idx = self._bias_index(hw, dgrid, self.attention_biases.device)
        table = self.attention_biases if dbias is None else torch.cat([self.attention_biases, dbias], 1)
        return table.index_select(1, idx.flatten()).view(1, h, idx.shape[0], idx.shape[1])

    def forward(self, x: torch.Tensor, hw: tuple[int, int], digest: torch.Tensor | None = None) -> torch.Tensor:
        B, N, C = x.shape
        h, d = self.num_heads, self.head_dim
        # digest tokens only serve as keys and values; projecting them together with the block's tokens
        # (their unused query rows cost less than concatenating the 2C-wide keys/values after projection)
        qkv = linear(x if digest is None else torch.cat([x, digest.to(x.dtype)], 1), self.qkv)
        q = qkv[:, :N, :C].unflatten(-1, (h, d)).transpose(1, 2)
        k = qkv[..., C:2 * C].unflatten(-1, (h, d)).transpose(1, 2)
        v = qkv[..., 2 * C:].unflatten(-1, (h, d)).transpose(1, 2)
        x = attend(q, k, v, self.attn_bias(hw, N, q.dtype), scale=self.scale)
        return linear(x.transpose(1, 2).reshape(B, N, C), self.proj)


class CaBBlock(nn.Module):
    """CabViT block: x + ls1 * CaBAttention(LN(x), digest) -> TME (enhance; merge digest tokens for the
    later blocks) -> x + ls2 * FFN(LN(x)). (B, P + N, C), list of earlier digests -> (B, P + N, C), digest.

    `ffn_double_norm`: the official CabViT-H FFN carries its own LayerNorm after `norm2`.
    """

    def __init__(self, dim: int, num_heads: int, index: int, merge: bool, grid0: tuple[int, int],
                 mlp_ratio: float = 4.0, layer_scale_init_value: float = 1e-6, drop_path: float = 0.0,
                 rel_pos: bool = True, num_prefix_tokens: int = 0, digest_scale_first: bool = True,
                 ffn_double_norm: bool = True, enhance: bool = True):
        super().__init__()
        dgrid = digest_grid(grid0)
        self.norm1 = nn.LayerNorm(dim)
        self.digest = DigestTokens(dim, index, dgrid, digest_scale_first) if index > 0 else None
        self.attn = CaBAttention(dim, num_heads, index, dgrid, grid0 if rel_pos else None)
        self.gamma_1: nn.Parameter | None = nn.Parameter(torch.full((dim,), layer_scale_init_value))
        self.tme = TokenMergeEnhance(dim, merge, num_prefix_tokens, enhance)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp_norm = nn.LayerNorm(dim) if ffn_double_norm else nn.Identity()
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.gamma_2: nn.Parameter | None = nn.Parameter(torch.full((dim,), layer_scale_init_value))
        self.drop_path = DropPath(drop_path)

    @torch.no_grad()
    def fuse(self) -> None:
        fold_layer_scale(self.attn.proj, self.gamma_1)
        fold_layer_scale(self.mlp.fc2, self.gamma_2)
        self.gamma_1 = self.gamma_2 = None

    def forward(self, x: torch.Tensor, hw: tuple[int, int],
                digests: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        s = self.digest(torch.cat(digests, 1), digest_grid(hw)) if self.digest is not None else None
        x = x + self.drop_path(scale_channels(self.attn(self.norm1(x), hw, s), self.gamma_1))
        x, digest = self.tme(x, hw)
        x = x + self.drop_path(scale_channels(self.mlp(self.mlp_norm(self.norm2(x))), self.gamma_2))
        return x, digest


class CaBStage(nn.Module):
    """A stage of CaB blocks sharing digest tokens: block i attends to the digest tokens of blocks 0..i-1.
    Tokens (B, P + H*W, C) -> (B, P + H*W, C)."""

    def __init__(self, dim: int, depth: int, num_heads: int, grid0: tuple[int, int], drop_path: list[float],
                 enhance_last: bool = True, **block_kwargs: Any):
        super().__init__()
        self.blocks = nn.ModuleList([
            CaBBlock(dim, num_heads, i, i < depth - 1, grid0, drop_path=drop_path[i],
                     enhance=enhance_last or i < depth - 1, **block_kwargs)
            for i in range(depth)])

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        return cab_stage(self, x, hw)

    def run_blocks(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        digests: list[torch.Tensor] = []
        for blk in self.blocks:
            x, d = blk(x, hw, digests)
            if d is not None:
                digests.append(d)
        return x


def cab_stage(stage: CaBStage, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """`stage.run_blocks(x, hw)`: a leaf of torch.fx graphs (digest grids and bias tables are sized from
    the token grid in Python, which symbolic tracing cannot follow), so the models trace at any size."""
    return stage.run_blocks(x, hw)


def position_embedding(pos_embed: torch.Tensor, grid0: tuple[int, int], hw: tuple[int, int]) -> torch.Tensor:
    """CabViT-P's (1, 1 + h0*w0, C) embedding of the training grid `grid0` for a (h, w) patch grid: resized
    bicubically off the training grid (class token unchanged). A torch.fx leaf, like `cab_stage`."""
    if tuple(hw) == tuple(grid0):
        return pos_embed
    cls, pos = pos_embed[:, :1], pos_embed[:, 1:]
    pos = pos.reshape(1, grid0[0], grid0[1], -1).permute(0, 3, 1, 2)
    pos = F.interpolate(pos, size=hw, mode="bicubic", align_corners=False)
    return torch.cat([cls, pos.flatten(2).transpose(1, 2)], 1)


torch.fx.wrap("cab_stage")
torch.fx.wrap("position_embedding")


# ------------------------------------------------------------------------------------------ CabViT-H
class HybridStage(nn.Module):
    """Patch merging (stages 2-4) then ConvNeXt blocks (stages 1-2) or a CaB stage (3-4).
    (B, C_in, H, W) -> (B, C, H', W')."""

    def __init__(self, in_dim: int, dim: int, depth: int, num_heads: int, grid0: tuple[int, int],
                 drop_path: list[float], layer_scale_init_value: float, mlp_ratio: float, downsample: bool):
        super().__init__()
        self.downsample = PatchMerging(in_dim, dim) if downsample else nn.Identity()
        self.cab = num_heads > 0
        if self.cab:
            self.blocks = CaBStage(dim, depth, num_heads, grid0, drop_path, mlp_ratio=mlp_ratio,
                                   layer_scale_init_value=layer_scale_init_value)
        else:
            self.blocks = nn.Sequential(*[ConvNeXtBlock(dim, drop_path[i], layer_scale_init_value)
                                          for i in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if not self.cab:
            return self.blocks(x)
        B, C, H, W = x.shape
        x = self.blocks(x.flatten(2).transpose(1, 2), (H, W))
        return x.transpose(1, 2).reshape(B, C, H, W)


class CabViTH(HybridModel):
    """CabViT-H: stem -> ConvNeXt stages 1-2 -> CaB stages 3-4 -> mean pool -> LN -> linear.

    The LayerNorm acts on the pooled vector (official head), so it belongs to forward_head and
    forward_features is the stage-4 map before it (rule in `_base`).

    Feature maps at strides 4, 8, 16, 32 with `embed_dims` channels. `img_size` is the training
    resolution that sizes the bias tables and digest parameters (other input sizes work too).
    (B, in_chans, H, W) -> (B, num_classes).
    """

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, img_size: int = 224,
                 embed_dims: tuple[int, ...] = (64, 128, 192, 320), depths: tuple[int, ...] = (2, 2, 6, 2),
                 num_heads: tuple[int, ...] = (0, 0, 6, 10), mlp_ratio: float = 4.0,
                 layer_scale_init_value: float = 1e-6, drop_path_rate: float = 0.0):
        super().__init__()
        self.head_norm = True
        if len(embed_dims) != 4 or len(depths) != 4 or len(num_heads) != 4:
            raise ValueError("CabViT-H takes 4 embed_dims, depths and num_heads")
        if num_heads[0] or num_heads[1] or not (num_heads[2] and num_heads[3]):
            raise ValueError(f"CabViT-H has ConvNeXt stages 1-2 (num_heads 0) and CaB stages 3-4, got {num_heads}")
        self.in_chans, self.num_classes = in_chans, num_classes
        self.num_features = embed_dims[-1]
        self.stem = Stem(in_chans, embed_dims[0])
        dpr = [r for stage in drop_path_rates(drop_path_rate, depths) for r in stage]
        stages, cur = [], 0
        for i in range(4):
            grid0 = (math.ceil(img_size / 2 ** (i + 2)),) * 2
            stages.append(HybridStage(embed_dims[max(i - 1, 0)], embed_dims[i], depths[i], num_heads[i], grid0,
                                      dpr[cur:cur + depths[i]], layer_scale_init_value, mlp_ratio, i > 0))
            cur += depths[i]
        self.stages = nn.ModuleList(stages)
        self.norm = nn.LayerNorm(embed_dims[-1])
        self.head = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.stage_info = [dict(num_chs=embed_dims[i], reduction=2 ** (i + 2), module=f"stages.{i}")
                           for i in range(4)]
        self.apply(_init_weights)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        # channels_last throughout: the convs run in NHWC, and the ConvNeXt permutes and the token views
        # of the CaB stages (B, H*W, C) are free
        return self.stem(x.contiguous(memory_format=torch.channels_last))

    def convert_official(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return convert_official_cabvit_h(state_dict)

    def resample_tables(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return resample_cabvit_tables(self, state_dict)

    def no_weight_decay_keywords(self) -> set[str]:
        return {"attention_biases", "digest_bias"}


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, (nn.Conv2d, nn.Linear)):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


_H_BLOCK_RENAMES = (  # official CaBBlock / CxBlock / Conv2d_BN names -> ours
    ("s_token_bias", "attn.digest_bias"), ("s_scale_factors", "digest.scale"), ("s_norm.", "digest.norm."),
    ("attention_biases", "attn.attention_biases"), ("qkv.", "attn.qkv."), ("proj.", "attn.proj."),
    ("dw_conv.", "tme.merge."), ("local_conv.c.", "tme.enhance.conv."), ("local_conv.bn.", "tme.enhance.bn."),
    ("mlp.norm.", "mlp_norm."), ("dwconv.", "conv_dw."), ("pwconv1.", "mlp.fc1."), ("pwconv2.", "mlp.fc2."),
)


def convert_official_cabvit_h(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official `CaBViT_H` state dict -> `CabViTH` keys (same tensors and shapes)."""
    out = {}
    for k, v in state_dict.items():
        if k.endswith("attention_bias_idxs"):
            continue  # derived from the configuration
        n = k
        if n.startswith("patch_embed.seq."):
            n = n.replace("patch_embed.seq.0.", "stem.conv1.").replace("patch_embed.seq.2.", "stem.conv2.")
            n = n.replace(".c.", ".conv.")
        elif n.startswith("layer_"):
            i, rest = int(n[6]), n[8:]
            if rest.startswith("downsample."):
                n = f"stages.{i + 1}.downsample." + rest[len("downsample."):].replace(".c.", ".conv.")
            elif rest.startswith("blocks."):
                j, name = rest[len("blocks."):].split(".", 1)
                for old, new in _H_BLOCK_RENAMES:
                    if name.startswith(old):
                        name = new + name[len(old):]
                        break
                n = f"stages.{i}.blocks.{'blocks.' if i >= 2 else ''}{j}.{name}"
        elif n.startswith("norm_head."):
            n = "norm." + n[len("norm_head."):]
        out[n] = v
    return out


# ------------------------------------------------------------------------------------------ CabViT-P
class CabViTP(HybridModel):
    """CabViT-P: the plain (DeiT-like) CabViT, designed from the paper's description.

    Patch embedding (16x16 conv, stride 16) -> class token + learned absolute position embedding ->
    `sum(depths)` CaB blocks grouped into `len(depths)` stages (default 3 x 4 of DeiT's 12 blocks): block
    i of a stage attends to the digest tokens of blocks 0..i-1 of the same stage (4x4 digest tokens per
    block at 224, so at most 48 extra keys next to 197 tokens) -> LN -> class token -> linear.

    Choices where the paper leaves details open: the class token takes part in attention but not in the
    TME convolutions (it passes through unchanged); digest tokens are normalised and then scaled by their
    calibration factors; no relative bias among the block's own tokens (DeiT's absolute position
    embedding, resized bicubically for other input sizes); a learned per-head bias for digest-token
    logits; layer scale (init 1e-6) on both branches and one LayerNorm before the FFN; no enhancement
    conv in the very last block (only the class token is classified, so it would have no effect).

    `forward_features` gives the normalised tokens (B, 1 + H*W/256, C) (class token first), which
    `forward_head` takes (like timm's ViT); `forward_intermediates` gives each stage's patch tokens as a
    (B, C, H/16, W/16) map.
    """

    num_prefix_tokens = 1
    min_input_size = 16
    global_pool = "token"
    global_pool_types = ("token", "")  # "": every normalised token (the classifier removed)

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, img_size: int = 224, patch_size: int = 16,
                 embed_dim: int = 192, depths: tuple[int, ...] = (4, 4, 4), num_heads: int = 3,
                 mlp_ratio: float = 4.0, layer_scale_init_value: float = 1e-6, drop_path_rate: float = 0.0):
        super().__init__()
        self.in_chans, self.num_classes = in_chans, num_classes
        self.num_features = self.embed_dim = embed_dim
        self.patch_size = patch_size
        self.grid0 = (img_size // patch_size,) * 2
        self.patch_embed = nn.Conv2d(in_chans, embed_dim, patch_size, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid0[0] * self.grid0[1], embed_dim))
        dpr = [r for stage in drop_path_rates(drop_path_rate, depths) for r in stage]
        stages, cur = [], 0
        for i, d in enumerate(depths):
            stages.append(CaBStage(embed_dim, d, num_heads, self.grid0, dpr[cur:cur + d], mlp_ratio=mlp_ratio,
                                   layer_scale_init_value=layer_scale_init_value, rel_pos=False,
                                   num_prefix_tokens=1, digest_scale_first=False, ffn_double_norm=False,
                                   enhance_last=i < len(depths) - 1))
            cur += d
        self.stages = nn.ModuleList(stages)
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.stage_info = [dict(num_chs=embed_dim, reduction=patch_size, module=f"stages.{i}")
                           for i in range(len(depths))]
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_weights)

    def _grid(self, size: tuple[int, int]) -> tuple[int, int]:
        return size[0] // self.patch_size, size[1] // self.patch_size

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> tokens (B, 1 + h*w, C), class token first, with position embedding."""
        x = conv_bn(x, self.patch_embed)
        B, C, h, w = x.shape
        x = torch.cat([self.cls_token.expand(B, -1, -1), x.flatten(2).transpose(1, 2)], 1)
        return x + position_embedding(self.pos_embed, self.grid0, (h, w))

    def _stage(self, i: int, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return self.stages[i](x, self._grid(size))

    def _to_map(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        h, w = self._grid(size)
        return x[:, self.num_prefix_tokens:].transpose(1, 2).reshape(x.shape[0], -1, h, w)

    def _features(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return x  # the normalised tokens: the classifier reads the class token

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0] if self.global_pool else x

    def convert_official(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        from ..errors import CheckpointError
        raise CheckpointError("there is no official CabViT-P (the official repository only has a DeiT "
                              "placeholder): load a checkpoint saved from hybridvit's CabViT-P")

    def resample_tables(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return resample_cabvit_tables(self, state_dict)

    def no_weight_decay_keywords(self) -> set[str]:
        return {"pos_embed", "cls_token", "digest_bias"}


def _grid_of(n: int, like: tuple[int, int]) -> tuple[int, int] | None:
    """The (h, w) grid of n cells with the aspect ratio of `like` (the model's own grid), None if none."""
    h = max(1, round(math.sqrt(n * like[0] / like[1])))
    return (h, n // h) if h * (n // h) == n else None


@torch.no_grad()
def resample_cabvit_tables(model: nn.Module, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`sd` with the tables a CabViT checkpoint sizes by its training resolution resampled to `model`'s:
    per-offset attention biases (bicubic over the offset grid, as timm resizes LeViT-style bias tables),
    per-digest-token biases and scale factors (bilinear per earlier block, as the forward resizes them at
    run time) and CabViT-P's position embedding (bicubic, class token kept, timm's `resample_abs_pos_embed`).
    Tables already of the model's size, and sizes no grid explains, are left for the shape check."""
    sd = dict(sd)
    for name, m in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(m, CaBAttention):
            key = prefix + "attention_biases"
            if m.rel_grid is not None and key in sd and sd[key].shape != m.attention_biases.shape:
                t = sd[key]
                grid = _grid_of(t.shape[-1], m.rel_grid) if t.dim() == 2 and t.shape[0] == m.num_heads else None
                if grid is not None:
                    t = F.interpolate(t.reshape(1, m.num_heads, *grid).float(), size=m.rel_grid, mode="bicubic",
                                      align_corners=False)
                    sd[key] = t.reshape(m.num_heads, -1).to(sd[key].dtype)
            key = prefix + "digest_bias"
            if m.num_digest_blocks and key in sd and sd[key].shape != m.digest_bias.shape:
                t = sd[key]
                if t.dim() == 4 and t.shape[:3] == m.digest_bias.shape[:3] and t.shape[-1] % m.num_digest_blocks == 0:
                    grid = _grid_of(t.shape[-1] // m.num_digest_blocks, m.digest_grid0)
                    if grid is not None:
                        r = resize_digest_param(t.reshape(m.num_heads, -1).float(), m.num_digest_blocks, grid,
                                                m.digest_grid0)
                        sd[key] = r.reshape(m.digest_bias.shape).to(t.dtype)
        elif isinstance(m, DigestTokens):
            key = prefix + "scale"
            if key in sd and sd[key].shape != m.scale.shape:
                t = sd[key]
                if t.dim() == 3 and t.shape[1] % m.num_blocks == 0:
                    grid = _grid_of(t.shape[1] // m.num_blocks, m.grid)
                    if grid is not None:
                        r = resize_digest_param(t.reshape(1, -1).float(), m.num_blocks, grid, m.grid)
                        sd[key] = r.reshape(m.scale.shape).to(t.dtype)
    if isinstance(model, CabViTP) and "pos_embed" in sd and sd["pos_embed"].shape != model.pos_embed.shape:
        t = sd["pos_embed"]
        grid = _grid_of(t.shape[1] - 1, model.grid0) if t.dim() == 3 and t.shape[-1] == model.pos_embed.shape[-1] \
            else None
        if grid is not None:
            sd["pos_embed"] = position_embedding(t.float(), grid, model.grid0).to(t.dtype)
    return sd


# ------------------------------------------------------------------------------------------ variants
_HINT = "no CabViT checkpoints are published (train one with `hybridvit train`)"


def _cfg(plain: bool) -> dict[str, Any]:
    """Preprocessing of the DeiT/ConvNeXt pipeline the official code builds on (bicubic, crop 0.875)."""
    return pretrained_cfg(first_conv="patch_embed" if plain else "stem.conv1.conv", reduction=None if plain else 32,
                          min_input_size=(CabViTP if plain else CabViTH).min_input_size, license=LICENSE_NONE,
                          origin_url="https://github.com/hkzhang91/CabViT", paper_ids="arXiv:2211.07198")


_H_VARIANTS = {  # official cabvit_h_l1..l3 (reference README); params from the official code; top-1 of l2
    "cabvit_h_l1": (dict(embed_dims=(64, 128, 192, 320), depths=(2, 2, 6, 2), num_heads=(0, 0, 6, 10)), None),
    "cabvit_h_l2": (dict(embed_dims=(96, 192, 320, 480), depths=(2, 2, 7, 2), num_heads=(0, 0, 10, 15)), 83.0),
    "cabvit_h_l3": (dict(embed_dims=(96, 192, 320, 512), depths=(3, 6, 12, 3), num_heads=(0, 0, 10, 16)), None),
}
_P_VARIANTS = {  # DeiT-Ti/S/B widths, 12 blocks in 3 CaB stages of 4
    "cabvit_p_tiny": dict(embed_dim=192, depths=(4, 4, 4), num_heads=3),
    "cabvit_p_small": dict(embed_dim=384, depths=(4, 4, 4), num_heads=6),
    "cabvit_p_base": dict(embed_dim=768, depths=(4, 4, 4), num_heads=12),
}
VARIANTS = [Variant(name, "cabvit", CabViTH, dict(cfg, drop_path_rate=0.1), weights_hint=_HINT, published=False,
                    top1=top1, pretrained_cfg=_cfg(plain=False)) for name, (cfg, top1) in _H_VARIANTS.items()]
VARIANTS += [Variant(name, "cabvit", CabViTP, dict(cfg, drop_path_rate=0.1), weights_hint=_HINT, published=False,
                     pretrained_cfg=_cfg(plain=True)) for name, cfg in _P_VARIANTS.items()]

"""Attention weights of the existing modules, mapped back to image positions.

`capture(model, x)` runs one forward under `hybridvit.analysis.capture.capture_attention` and turns every
recorded call into a `TokenLayout` (where each query and key sits in the image) plus its weights
(B, groups per image, heads, N, M). Everything else (maps for a query location, attended distance,
the share of attention that goes to carrier or digest tokens) is computed from those two:

- FasterViT window attention: [carriers of the window + ws x ws window tokens]; the carriers' position is
  the centre of the map region their pooling window covers (`CarrierTokenInit`); the global carrier
  attention ("ct_attn") is a layout of its own over the carrier grid.
- CrossFormer: groups of G x G tokens, adjacent (SDA) or I apart (LDA: interleaved with stride I), from
  the block's own `grouping(H, W)` rule, with bottom/right padding.
- CabViT: the block's tokens (after any class token) then the digest tokens of the earlier blocks of the
  stage; a digest token sits at the centre of its 7x7, stride-4 merge window.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..layers.window import window_partition
from .capture import capture_attention

# key kinds
MAP, CARRIER, DIGEST, PREFIX, PADDING = 0, 1, 2, 3, 4


@dataclass
class TokenLayout:
    """Positions of the queries (N) and keys (M) of one attention call, per group of one image.

    q_index/k_index (Gp, N)/(Gp, M): flat index into the `map_hw` grid (the stage's token map, or the
    carrier grid for carrier attention), -1 for tokens off that grid. q_pos/k_pos (Gp, N|M, 2): (y, x)
    centre in input pixels, NaN without a position (class token, padding). k_kind (Gp, M): MAP, CARRIER,
    DIGEST, PREFIX or PADDING. The weights' group axis is image-major (group g of image b = b * Gp + g).
    """

    module: str
    block: str
    stage: int
    kind: str  # "window", "carriers", "sda", "lda", "cab"
    map_hw: tuple[int, int]
    q_index: torch.Tensor
    k_index: torch.Tensor
    q_pos: torch.Tensor
    k_pos: torch.Tensor
    k_kind: torch.Tensor
    groups_hw: tuple[int, int] = (1, 1)  # grid of the groups per image (FasterViT windows)


def _family(model: nn.Module) -> str:
    from ..models.cabvit import CabViTH, CabViTP
    from ..models.crossformer import CrossFormer
    from ..models.fastervit import FasterViT

    for cls, fam in ((FasterViT, "fastervit"), (CrossFormer, "crossformer"), (CabViTH, "cabvit_h"),
                     (CabViTP, "cabvit_p")):
        if isinstance(model, cls):
            return fam
    raise ValueError(f"attention analysis knows FasterViT, CrossFormer and CabViT models, not {type(model).__name__}")


def _grid_positions(index: torch.Tensor, map_hw: tuple[int, int], stride: tuple[float, float]) -> torch.Tensor:
    """(y, x) pixel centres of flat map indices (any shape), NaN where the index is -1."""
    y = (torch.div(index, map_hw[1], rounding_mode="floor").float() + 0.5) * stride[0]
    x = (index.remainder(map_hw[1]).float() + 0.5) * stride[1]
    pos = torch.stack([y, x], -1)
    return pos.masked_fill((index < 0)[..., None], float("nan"))


def _map_index(H: int, W: int, Hp: int, Wp: int) -> torch.Tensor:
    """(Hp, Wp) flat index i * W + j of each token of a padded map, -1 on the padding."""
    idx = torch.arange(Hp)[:, None] * W + torch.arange(Wp)[None, :]
    return idx.masked_fill((torch.arange(Hp)[:, None] >= H) | (torch.arange(Wp)[None, :] >= W), -1)


def _pool_centres(length: int, n: int) -> torch.Tensor:
    """Token-unit centres of the n pooling windows `CarrierTokenInit` uses along a side of `length` tokens."""
    if length >= n:
        s = length // n
        k = length - (n - 1) * s
        return torch.arange(n).float() * s + (k - 1) / 2
    start = torch.floor(torch.arange(n) * length / n)
    end = torch.ceil((torch.arange(n) + 1) * length / n)
    return (start + end - 1) / 2


def group_index(idx: torch.Tensor, group_size: int, interval: int) -> torch.Tensor:
    """(Hp, Wp) map of token ids -> (nG, G*G) ids per CrossFormer group: G x G tokens `interval` apart
    (LDA; interval 1: adjacent tokens, SDA). Group order: region row, region column, offset row, offset
    column; inside a group, row-major."""
    Hp, Wp = idx.shape
    G, S = group_size, interval
    d = G * S
    a, b, r, c, gy, gx = torch.meshgrid(torch.arange(Hp // d), torch.arange(Wp // d), torch.arange(S),
                                        torch.arange(S), torch.arange(G), torch.arange(G), indexing="ij")
    return idx[a * d + gy * S + r, b * d + gx * S + c].reshape(-1, G * G)


def _layout(model: nn.Module, family: str, module: str, shape: tuple[int, ...], map_hw: tuple[int, int],
            in_hw: tuple[int, int]) -> tuple[TokenLayout, int]:
    """The layout of the attention call of `module` with weights of `shape`, and its number of heads."""
    parts = module.split(".")
    stage, block_name, attr = int(parts[1]), ".".join(parts[:-1]), parts[-1]
    attn, block = model.get_submodule(module), model.get_submodule(block_name)
    H, W = map_hw
    stride = (in_hw[0] / H, in_hw[1] / W)
    N, M = shape[-2:]
    if family == "fastervit":
        ws = min(model.stages[stage].window_size, max(H, W))  # as HATStage decides
        n_wh, n_ww = -(-H // ws), -(-W // ws)
        cs = block.ct_size
        gh, gw = cs * n_wh, cs * n_ww
        cy, cx = _pool_centres(H, gh), _pool_centres(W, gw)
        carrier_pos = torch.stack(torch.meshgrid((cy + 0.5) * stride[0], (cx + 0.5) * stride[1], indexing="ij"),
                                  -1).reshape(-1, 2)
        if attr == "ct_attn":  # global attention among the carriers: a layout over the carrier grid
            ids = torch.arange(gh * gw)[None]
            pos = carrier_pos[None]
            kinds = torch.full(ids.shape, CARRIER)
            return TokenLayout(module, block_name, stage, "carriers", (gh, gw), ids, ids, pos, pos, kinds), \
                attn.num_heads
        P = cs * cs if block.has_carriers else 0
        if N != P + ws * ws:
            raise RuntimeError(f"{module}: {N} tokens per window, expected {P} carriers + {ws}x{ws}")
        idx = _map_index(H, W, n_wh * ws, n_ww * ws)
        win = window_partition(idx[None, :, :, None], ws)[..., 0]  # (nW, ws*ws)
        pos = _grid_positions(win, map_hw, stride)
        kinds = torch.where(win >= 0, MAP, PADDING)
        if P:
            car = window_partition(torch.arange(gh * gw).view(1, gh, gw, 1), cs)[..., 0]  # (nW, P)
            win = torch.cat([torch.full_like(car, -1), win], 1)
            pos = torch.cat([carrier_pos[car], pos], 1)
            kinds = torch.cat([torch.full_like(car, CARRIER), kinds], 1)
        return TokenLayout(module, block_name, stage, "window", map_hw, win, win, pos, pos, kinds,
                           (n_wh, n_ww)), attn.num_heads
    if family == "crossformer":
        G, interval = block.grouping(H, W)
        d = G * interval
        idx = group_index(_map_index(H, W, H + (-H) % d, W + (-W) % d), G, interval)
        pos = _grid_positions(idx, map_hw, stride)
        kinds = torch.where(idx >= 0, MAP, PADDING)
        return TokenLayout(module, block_name, stage, "lda" if interval > 1 else "sda", map_hw, idx, idx, pos, pos,
                           kinds), attn.num_heads
    # CabViT: [prefix (class) tokens + H*W tokens] as queries; digest tokens of earlier blocks as extra keys
    from ..models.cabvit import DIGEST_STRIDE, digest_grid

    P = N - H * W
    dh, dw = digest_grid((H, W))
    n_digest = M - N
    if n_digest != attn.num_digest_blocks * dh * dw:
        raise RuntimeError(f"{module}: {n_digest} digest keys, expected {attn.num_digest_blocks} x {dh}x{dw}")
    q = torch.cat([torch.full((P,), -1), torch.arange(H * W)])
    dpos = torch.stack(torch.meshgrid((torch.arange(dh) * DIGEST_STRIDE + 0.5) * stride[0],
                                      (torch.arange(dw) * DIGEST_STRIDE + 0.5) * stride[1], indexing="ij"), -1)
    k = torch.cat([q, torch.full((n_digest,), -1)])
    qpos = _grid_positions(q, map_hw, stride)
    kpos = torch.cat([qpos, dpos.reshape(-1, 2).repeat(attn.num_digest_blocks, 1)])
    kinds = torch.cat([torch.full((P,), PREFIX), torch.full((H * W,), MAP), torch.full((n_digest,), DIGEST)])
    return TokenLayout(module, block_name, stage, "cab", map_hw, q[None], k[None], qpos[None], kpos[None],
                       kinds[None]), attn.num_heads


def _stage_maps(model: nn.Module, family: str) -> tuple[dict[int, tuple[int, int]], list[Any]]:
    """Forward hooks collecting the token map (H, W) of every stage; returns (sizes, hook handles)."""
    sizes: dict[int, tuple[int, int]] = {}
    handles = []
    if family == "cabvit_p":
        def fn(_m, _i, out):
            for s in range(len(model.stages)):
                sizes[s] = tuple(out.shape[2:])
        return sizes, [model.patch_embed.register_forward_hook(fn)]
    for s, stage in enumerate(model.stages):
        def fn(_m, _i, out, s=s):
            sizes[s] = tuple(out.shape[1:3]) if family == "crossformer" else tuple(out.shape[2:])
        handles.append(stage.register_forward_hook(fn))
    return sizes, handles


@torch.no_grad()
def capture(model: nn.Module, x: torch.Tensor) -> list[tuple[TokenLayout, torch.Tensor]]:
    """(layout, weights (B, Gp, heads, N, M)) of every attention call of one forward of `x`, in order."""
    family = _family(model)
    sizes, handles = _stage_maps(model, family)
    try:
        with capture_attention(model) as cap:
            model.eval()(x)
    finally:
        for h in handles:
            h.remove()
    out = []
    B = x.shape[0]
    for rec in cap.records:
        module = rec["module"]
        stage = int(module.split(".")[1])
        layout, heads = _layout(model, family, module, rec["weights"].shape, sizes[stage], tuple(x.shape[-2:]))
        N, M = rec["weights"].shape[-2:]
        out.append((layout, rec["weights"].reshape(B, -1, heads, N, M)))
    return out


def attended_distance(layout: TokenLayout, weights: torch.Tensor) -> float:
    """Mean distance in input pixels from each query to the keys it attends to, weighted by attention:
    mean over images, heads and the queries on the map of sum_k w_qk |p_q - p_k| (keys without a position,
    such as a class token, left out and the rest renormalised)."""
    w = weights.mean(2)  # (B, Gp, N, M)
    d = torch.linalg.vector_norm(layout.q_pos[:, :, None] - layout.k_pos[:, None], dim=-1)  # (Gp, N, M)
    has = ~d.isnan()
    wk = w * has
    per_query = (wk * d.nan_to_num(0.0)).sum(-1) / wk.sum(-1).clamp_min(1e-12)  # (B, Gp, N)
    return float(per_query[:, layout.q_index >= 0].mean())


def key_share(layout: TokenLayout, weights: torch.Tensor, kind: int) -> torch.Tensor:
    """(Gp,) share of attention the map queries of each group give keys of `kind`, mean over images/heads."""
    w = (weights.mean(2) * (layout.k_kind == kind)[:, None]).sum(-1)  # (B, Gp, N)
    valid = (layout.q_index >= 0).float()
    return (w * valid).sum(-1).mean(0) / valid.sum(-1).clamp_min(1)


def query_map(layout: TokenLayout, weights: torch.Tensor,
              pixel: tuple[float, float]) -> tuple[torch.Tensor, float, tuple[float, float]]:
    """Attention of the query token nearest to `pixel` (y, x) over the `map_hw` grid, mean over heads and
    images: (map (h, w), share of its attention on keys off the grid (carriers, digest, class token),
    (y, x) of the query token)."""
    dist = ((layout.q_pos - torch.tensor(pixel)) ** 2).sum(-1).masked_fill(layout.q_index < 0, float("inf"))
    dist = dist.nan_to_num(float("inf"))
    g, n = divmod(int(dist.argmin()), dist.shape[1])
    row = weights[:, g, :, n].mean(1)  # (B, M)
    on = layout.k_index[g] >= 0
    flat = torch.zeros(row.shape[0], layout.map_hw[0] * layout.map_hw[1])
    flat.index_add_(1, layout.k_index[g][on], row[:, on])
    qy, qx = layout.q_pos[g, n].tolist()
    return flat.mean(0).view(layout.map_hw), float(row[:, ~on].sum(-1).mean()), (qy, qx)


# ------------------------------------------------------------------------------------------ command
def _attention_data(model: nn.Module, x: torch.Tensor, names: list[str],
                    pixel: tuple[float, float]) -> dict[str, Any]:
    """Every attention call's map for the query at `pixel`, its carrier or digest share, and the mean map
    per stage: the JSON data of `run_attention` (without the file list)."""
    H, W = x.shape[-2:]
    calls = capture(model, x)
    if not calls:
        raise ValueError(f"{model.model_name} has no attention at this input size")
    blocks, carriers = [], []
    for layout, w in calls:
        m, off, qpos = query_map(layout, w, pixel)
        entry = {"module": layout.module, "block": layout.block, "stage": layout.stage, "kind": layout.kind,
                 "map_hw": list(layout.map_hw), "query_token_yx": [round(v, 2) for v in qpos],
                 "map": [[round(v, 6) for v in r] for r in m.tolist()], "off_map_share": off,
                 "distance_px": attended_distance(layout, w)}
        if layout.kind == "window" and (layout.k_kind == CARRIER).any():
            share = key_share(layout, w, CARRIER)
            entry["window_carrier_share"] = share.view(layout.groups_hw).tolist()
            entry["carrier_share"] = float(share.mean())
        if layout.kind == "cab":
            entry["digest_share"] = float(key_share(layout, w, DIGEST).mean())
        (carriers if layout.kind == "carriers" else blocks).append(entry)
    per_stage = []
    for s in sorted({b["stage"] for b in blocks}):
        maps = [torch.tensor(b["map"]) for b in blocks if b["stage"] == s]
        per_stage.append({"stage": s, "blocks": [b["block"] for b in blocks if b["stage"] == s],
                          "map": torch.stack(maps).mean(0).tolist()})
    return {"model": model.model_name, "img_size": [H, W], "images": names, "query_yx": list(pixel),
            "stages": per_stage, "blocks": blocks, "carrier_attention": carriers}


def _plot_stages(data: dict[str, Any], shown: torch.Tensor, out_dir: Path) -> list[str]:
    """attention.{png,svg}: the image with the query, then each stage's mean map."""
    from .plotting import overlay, pyplot, save_figure

    plt, pixel, per_stage = pyplot(), data["query_yx"], data["stages"]
    fig, axes = plt.subplots(1, len(per_stage) + 1, figsize=(3.2 * (len(per_stage) + 1), 3.4), squeeze=False)
    ax = axes[0, 0]
    overlay(ax, shown[0], torch.zeros(1, 1), alpha=0.0)
    ax.plot(pixel[1], pixel[0], "c+", ms=14, mew=2)
    ax.set_title(f"query at ({pixel[0]:.0f}, {pixel[1]:.0f})", fontsize=9)
    for ax, st in zip(axes[0, 1:], per_stage):
        overlay(ax, shown[0], torch.tensor(st["map"]))
        ax.plot(pixel[1], pixel[0], "c+", ms=14, mew=2)
        ax.set_title(f"stage {st['stage'] + 1} ({len(st['blocks'])} blocks)", fontsize=9)
    fig.suptitle(f"{data['model']}: attention of the query token, mean over heads, blocks and "
                 f"{len(data['images'])} images", fontsize=10)
    return save_figure(fig, out_dir, "attention")


def _plot_carriers(data: dict[str, Any], shown: torch.Tensor, out_dir: Path) -> list[str]:
    """carriers.{png,svg} (FasterViT): each carrier attention map beside the share each window gives its
    carriers; nothing for a model without carrier tokens."""
    from .plotting import overlay, pyplot, save_figure

    carriers = data["carrier_attention"]
    with_carriers = [b for b in data["blocks"] if "window_carrier_share" in b]
    if not (carriers and with_carriers):
        return []
    plt, pixel, (H, W) = pyplot(), data["query_yx"], data["img_size"]
    n = len(carriers)
    fig, axes = plt.subplots(n, 2, figsize=(6.6, 3.3 * n), squeeze=False)
    for i, (ct, wb) in enumerate(zip(carriers, with_carriers)):
        im = overlay(axes[i, 0], shown[0], torch.tensor(ct["map"]))
        axes[i, 0].plot(pixel[1], pixel[0], "c+", ms=14, mew=2)
        axes[i, 0].set_title(f"{ct['block']}\ncarrier attention of the query's carrier", fontsize=8)
        fig.colorbar(im, ax=axes[i, 0], fraction=0.046)
        share = 100 * torch.tensor(wb["window_carrier_share"])
        im = overlay(axes[i, 1], shown[0], share, cmap="viridis")
        im.set_clim(0, max(float(share.max()), 1e-3))
        nh, nw = share.shape
        for (r, c), v in zip(itertools.product(range(nh), range(nw)), share.flatten().tolist()):
            axes[i, 1].text((c + 0.5) * W / nw - 0.5, (r + 0.5) * H / nh - 0.5, f"{v:.1f}%", color="white",
                            ha="center", va="center", fontsize=8)
        axes[i, 1].set_title(f"{wb['block']}\nattention (%) each window gives its carriers", fontsize=8)
        fig.colorbar(im, ax=axes[i, 1], fraction=0.046)
    return save_figure(fig, out_dir, "carriers")


def _plot_digest(data: dict[str, Any], out_dir: Path) -> list[str]:
    """digest.{png,svg} (CabViT): each block's share of attention to digest tokens; nothing without them."""
    from .plotting import pyplot, save_figure

    cab = [b for b in data["blocks"] if "digest_share" in b]
    if not cab:
        return []
    fig, ax = pyplot().subplots(figsize=(1.0 + 0.5 * len(cab), 3.2))
    ax.bar(range(len(cab)), [100 * b["digest_share"] for b in cab], color="tab:red")
    ax.set_xticks(range(len(cab)), [b["block"].replace("stages.", "s").replace(".blocks", "") for b in cab],
                  rotation=60, fontsize=7)
    ax.set_ylabel("attention to digest tokens (%)")
    ax.set_title(f"{data['model']}: share of attention to digest tokens", fontsize=9)
    return save_figure(fig, out_dir, "digest")


def run_attention(model: nn.Module, x: torch.Tensor, shown: torch.Tensor, names: list[str], out_dir: Path,
                  query: tuple[float, float] | None = None) -> dict[str, Any]:
    """Per-stage attention maps for a query location, carrier (FasterViT) and digest (CabViT) shares;
    writes attention.{png,svg,json} (+ carriers.* or digest.*) into out_dir; returns the JSON data."""
    from .plotting import save_json

    H, W = x.shape[-2:]
    pixel = query if query is not None else ((H - 1) / 2, (W - 1) / 2)
    data = _attention_data(model, x, names, pixel)
    files = _plot_stages(data, shown, out_dir) + _plot_carriers(data, shown, out_dir) + _plot_digest(data, out_dir)
    data["files"] = files + [str(out_dir / "attention.json")]
    save_json(data, out_dir, "attention")
    return data

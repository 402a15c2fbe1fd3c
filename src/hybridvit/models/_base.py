"""What every hybridvit classifier shares: the timm-style interface of the design's contract, written once.

A family model has `stem`-like embedding, a `stages` ModuleList (stage i at `stage_info[i]['reduction']`),
a final `norm`, a linear `head`, and implements at most these hooks:

- `_embed(x)`: image -> the first stage's input (default `self.stem(x)`);
- `_stage(i, x, size)`: runs stage i (default `self.stages[i](x)`; `size` is the input (H, W));
- `_to_map(x, size)`: a stage output as an NCHW map (default: it already is one);
- `_features(x, size)`: what `forward_features` returns from the normalised last stage output (default
  `_to_map`); `_pool(x)`: forward_head's pooling (default: mean over H, W).

The rule for features (all families):

- `forward_features(x)` is everything before the head's pooling: the last stage's output after the
  model's final per-position norm, as an NCHW map (B, num_features, H/32, W/32 for the hierarchical
  models). CabViT-H normalises the pooled vector (its official head), so its `norm` belongs to
  `forward_head` (`head_norm = True`) and its forward_features map is not normalised. CabViT-P, a
  class-token model, returns its normalised tokens (B, 1 + h*w, C) like timm's ViT.
- `forward(x) == forward_head(forward_features(x))` for every model.
- `forward_intermediates` gives the raw stage outputs as NCHW maps; `norm=True` passes the last stage's
  through the final per-position norm. Its `final` equals `forward_features(x)`.
- `features_only` returns `forward_intermediates(..., intermediates_only=True)` of `out_indices` with
  the later stages, the final norm and the head removed (so DDP finds no unused parameter).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..layers.context import is_fx_tracing
from ..layers.table import record_tables


def feature_take_indices(num_stages: int, indices: int | Sequence[int] | None = None) -> tuple[list[int], int]:
    """timm's index rule: None -> every stage; an int n -> the last n stages; a sequence -> those stages
    (negative counts from the end). Returns (sorted-as-given non-negative indices, largest index)."""
    if indices is None:
        indices = num_stages
    if isinstance(indices, int):
        if not 0 < indices <= num_stages:
            raise ValueError(f"indices={indices}: the model has {num_stages} stages, ask for 1..{num_stages}")
        take = list(range(num_stages - indices, num_stages))
    else:
        bad = [i for i in indices if not -num_stages <= i < num_stages]
        if bad or not len(indices):
            raise ValueError(f"indices {tuple(indices)} out of range for {num_stages} stages "
                             f"(use 0..{num_stages - 1} or negatives from the end)")
        take = [i % num_stages for i in indices]
    return take, max(take)


_POOL_NAMES = {"avg": "average", "token": "class token"}


class FeatureInfo:
    """The feature taps of a model in the API of timm's `FeatureInfo` (without importing timm).

    `info`: one dict per stage (num_chs, reduction, module, index), all stages of the architecture even
    when later ones were pruned; `out_indices`: the taps a features_only model returns. `channels()`,
    `reduction()`, `module_name()` and `get(key)` give the values of `out_indices`, or of the stage(s)
    `idx` (an int or a list); `get_dicts()` the dicts. Indexing and `len` address `info`. Compares equal
    to the list of the selected dicts (hybridvit's earlier plain-list feature_info).
    """

    def __init__(self, info: Sequence[dict[str, Any]], out_indices: Sequence[int]):
        self.info = [{**d, "index": d.get("index", i)} for i, d in enumerate(info)]
        self.out_indices = tuple(int(i) for i in out_indices)

    def from_other(self, out_indices: Sequence[int]) -> FeatureInfo:
        return FeatureInfo(self.info, out_indices)

    def _at(self, idx: int | Sequence[int] | None) -> list[int]:
        return list(self.out_indices) if idx is None else list(idx) if isinstance(idx, (list, tuple)) else [idx]

    def get(self, key: str, idx: int | Sequence[int] | None = None) -> Any:
        values = [self.info[i][key] for i in self._at(idx)]
        return values[0] if isinstance(idx, int) else values

    def get_dicts(self, keys: Sequence[str] | None = None, idx: int | Sequence[int] | None = None) -> Any:
        dicts = [dict(self.info[i]) if keys is None else {k: self.info[i][k] for k in keys} for i in self._at(idx)]
        return dicts[0] if isinstance(idx, int) else dicts

    def channels(self, idx: int | Sequence[int] | None = None) -> Any:
        return self.get("num_chs", idx)

    def reduction(self, idx: int | Sequence[int] | None = None) -> Any:
        return self.get("reduction", idx)

    def module_name(self, idx: int | Sequence[int] | None = None) -> Any:
        return self.get("module", idx)

    def __getitem__(self, item: int) -> dict[str, Any]:
        return self.info[item]

    def __len__(self) -> int:
        return len(self.info)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, FeatureInfo):
            return self.info == other.info and self.out_indices == other.out_indices
        if isinstance(other, list):
            return [{k: v for k, v in d.items() if k != "index"} for d in self.get_dicts()] == other
        return NotImplemented

    def __repr__(self) -> str:
        return f"FeatureInfo(out_indices={self.out_indices}, info={self.info})"


class HybridModel(nn.Module):
    """Base class of the family models (see the module docstring for the rule on features)."""

    in_chans: int = 3
    num_classes: int = 1000
    features_only: bool = False
    out_indices: tuple[int, ...] = (0, 1, 2, 3)
    classifier_prefixes: tuple[str, ...] = ("head.",)
    head_norm: bool = False  # True: `norm` acts on the pooled vector (part of the head)
    grad_checkpointing: bool = False
    is_fused: bool = False  # set by fuse(): the frozen inference form (see `fuse`)
    global_pool: str = "avg"  # forward_head's pooling: one of `global_pool_types`
    global_pool_types: tuple[str, ...] = ("avg", "")  # "": no pooling (the classifier removed)
    min_input_size: int = 1  # per side, for models built without a registry entry (pretrained_cfg's wins)
    stage_info: list[dict[str, Any]]
    pretrained_cfg: dict[str, Any]

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        """Initialisation of the official code: truncated-normal linears (std 0.02), unit norms."""
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @property
    def default_cfg(self) -> dict[str, Any]:
        """timm's older name of `pretrained_cfg` (the same dict)."""
        return self.pretrained_cfg

    @default_cfg.setter
    def default_cfg(self, cfg: dict[str, Any]) -> None:
        self.pretrained_cfg = cfg

    # -------------------------------------------------------------------------------- input checks
    def _name(self) -> str:
        return getattr(self, "model_name", type(self).__name__)

    def check_input(self, x: torch.Tensor) -> None:
        """Raises a ValueError saying what to do for a non-image batch, a wrong channel count or an image
        smaller than `pretrained_cfg['min_input_size']`."""
        if x.ndim != 4:
            raise ValueError(f"{self._name()} expects a batch of images (B, C, H, W), got shape {tuple(x.shape)}; "
                             "add a batch dimension with x.unsqueeze(0)")
        if x.shape[1] != self.in_chans:
            raise ValueError(
                f"{self._name()} was built for {self.in_chans}-channel input but got {x.shape[1]} channels "
                f"(shape {tuple(x.shape)}). Convert the images (e.g. grayscale -> RGB with "
                f"x.expand(-1, 3, -1, -1)) or create the model with in_chans={x.shape[1]}.")
        cfg = getattr(self, "pretrained_cfg", None) or {}
        min_h, min_w = cfg.get("min_input_size", (self.in_chans, self.min_input_size, self.min_input_size))[-2:]
        if x.shape[2] < min_h or x.shape[3] < min_w:
            raise ValueError(f"{self._name()} needs images of at least {min_h}x{min_w} pixels, got "
                             f"{x.shape[2]}x{x.shape[3]}; resize or pad the input")

    def _input_size(self, x: torch.Tensor) -> tuple[int, int]:
        """Checks `x` and returns its (H, W) as ints. The one place that keeps the spatial size static
        under torch.compile: window/group geometry (padding, window counts, carrier grids, bias tables) is
        decided from it in Python, and symbolic sizes there make compilation impractically slow (the
        default `dynamic=None` would turn H and W symbolic at the second input size). Each input size
        compiles once; the batch size may stay dynamic."""
        if is_fx_tracing():  # symbolic sizes: the shape-dependent parts are FX leaf functions
            return x.shape[2], x.shape[3]
        self.check_input(x)
        if torch.compiler.is_compiling():
            torch._dynamo.mark_static(x, 2)
            torch._dynamo.mark_static(x, 3)
        return int(x.shape[2]), int(x.shape[3])

    # -------------------------------------------------------------------------------- family hooks
    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.stem(x)

    def _stage(self, i: int, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return self.stages[i](x)

    def _to_map(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return x

    def _features(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return self._to_map(x, size)

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3)) if self.global_pool else x

    def _final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.head_norm else self.norm(x)

    def _run_stage(self, i: int, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            return checkpoint(self._stage, i, x, size, use_reentrant=False)
        return self._stage(i, x, size)

    # -------------------------------------------------------------------------------- forward API
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Image (B, in_chans, H, W) -> features before pooling (see the module docstring)."""
        size = self._input_size(x)
        x = self._embed(x)
        for i in range(len(self.stages)):
            x = self._run_stage(i, x, size)
        return self._features(self._final_norm(x), size)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """forward_features output -> logits (B, num_classes), or the pooled (B, num_features) with
        pre_logits."""
        x = self._pool(x)
        if self.head_norm:  # on the pooled vector; without pooling on the channels of the map
            x = self.norm(x) if self.global_pool else self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        if self.features_only:
            return self.forward_intermediates(x, indices=self.out_indices, intermediates_only=True)
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: torch.Tensor, indices: int | Sequence[int] | None = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False
                              ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """(final, [maps]) with timm's semantics: `indices` None = every stage, an int n = the last n,
        a sequence = those stages (negatives from the end); maps are (B, C_i, H_i, W_i) raw stage outputs
        (`output_fmt='NHWC'`: (B, H_i, W_i, C_i)), the last stage's normalised when `norm`; `final`
        equals forward_features(x) (with `stop_early` before the last stage: the raw output of the last
        requested stage); `intermediates_only` returns the maps alone and stops early."""
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take, max_index = feature_take_indices(len(self.stages), indices)
        size = self._input_size(x)
        last = len(self.stages) - 1
        run = max_index if (stop_early or intermediates_only) else last
        x = self._embed(x)
        maps = []
        for i in range(run + 1):
            x = self._run_stage(i, x, size)
            if i in take:
                m = self._to_map(self._final_norm(x) if norm and i == last else x, size)
                maps.append(m.permute(0, 2, 3, 1) if output_fmt == "NHWC" else m)
        if intermediates_only:
            return maps
        # the final norm is sized for the last stage: a stop before it returns that stage's raw output
        return self._features(self._final_norm(x) if run == last else x, size), maps

    def prune_intermediate_layers(self, indices: int | Sequence[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Removes what the taps `indices` leave unused (timm's rule) and returns the kept indices: the
        stages after the last of them; the final norm with `prune_norm` or when a stage was removed (it
        is sized for the last stage); the classifier and its pooling (`reset_classifier(0, '')`) with
        `prune_head` or when a stage was removed (num_features and head_hidden_size become the last kept
        stage's channels)."""
        take, max_index = feature_take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        self.stages = self.stages[:max_index + 1]
        if prune_end:
            self.num_features = self.stage_info[max_index]["num_chs"]
        if (prune_norm or prune_end) and not self.head_norm:  # a head's norm goes with the head
            self.norm = nn.Identity()
        if prune_head or prune_end:
            self.reset_classifier(0, "")
            if self.head_norm:
                self.norm = nn.Identity()
        return take

    @torch.no_grad()
    def to_empty(self, *, device: torch.device | str | None, recurse: bool = True) -> HybridModel:
        """`nn.Module.to_empty`, then the buffers derived from the configuration (position-bias geometry,
        bias indices: not in the state dict) computed again, so that meta-device construction followed by
        `to_empty` and `load_state_dict` gives the same model (timm's `init_non_persistent_buffers`)."""
        super().to_empty(device=device, recurse=recurse)
        for module in self.modules():
            if hasattr(module, "init_non_persistent_buffers"):
                module.init_non_persistent_buffers()
        return self

    @torch.no_grad()
    def fuse(self) -> HybridModel:
        """Turns the model, in place, into its inference form; outputs unchanged up to float rounding.

        Everything derivable from the weights is computed once, in place of the originals: every block
        folds what it holds through its own `fuse()` (conv+BN pairs into the conv, the BN becoming
        Identity; layer scales into the layer before them), then one forward at the configured input size
        (`pretrained_cfg['input_size']`) stores the position-bias tables and gathered biases it meets
        (`layers.table`); other input sizes compute theirs at each call. The form is frozen: it answers
        for the weights it was fused with, and refuses `train()`, `load_state_dict` and `save_pretrained`
        (edit, train or save the unfused model and fuse again). Needs eval(); returns self."""
        if self.training:
            raise RuntimeError("fuse() is for inference: call model.eval() first")
        if self.is_fused:
            return self
        for m in [m for m in self.modules() if m is not self and callable(getattr(m, "fuse", None))]:
            m.fuse()
        ref = next(self.parameters(), None)
        if ref is not None and ref.device.type != "meta":
            size = tuple(self.pretrained_cfg.get("input_size", (self.in_chans, 224, 224)))[-2:]
            with record_tables():
                self(torch.zeros(1, self.in_chans, *size, device=ref.device, dtype=ref.dtype))
        self.is_fused = True
        return self

    def train(self, mode: bool = True) -> HybridModel:
        if mode and self.is_fused:
            raise RuntimeError("this model was fused for inference (model.fuse()): its BatchNorms and layer scales "
                               "are folded into other layers, so it cannot train. Train the unfused model and fuse "
                               "the copy you deploy")
        return super().train(mode)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        if self.is_fused:
            raise RuntimeError("this model was fused for inference (model.fuse()): it answers for the weights it "
                               "was fused with. Load the weights into an unfused model, then call fuse()")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def set_features_only(self, out_indices: Sequence[int] = (0, 1, 2, 3)) -> None:
        """Turns the classifier into a backbone returning the NCHW maps of `out_indices`; the stages after
        the last of them, the final norm and the head are removed."""
        take = self.prune_intermediate_layers(out_indices, prune_norm=True, prune_head=True)
        self.out_indices = tuple(sorted(set(take)))  # the maps come out in stage order
        self.features_only = True

    @property
    def feature_info(self) -> FeatureInfo:
        """timm's FeatureInfo of the stages (`info`, every stage of the architecture) with `out_indices`
        the maps a features_only model returns (every stage for a classifier)."""
        indices = self.out_indices if self.features_only else range(len(self.stage_info))
        return FeatureInfo(self.stage_info, indices)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Runs each stage under torch.utils.checkpoint in training (activations recomputed in backward)."""
        self.grad_checkpointing = enable

    @property
    def head_hidden_size(self) -> int:
        """Width of forward_head's pre-logits output (the pooled features: no pre-logits layer)."""
        return self.num_features

    def get_classifier(self) -> nn.Module:
        return self.head

    def _set_global_pool(self, global_pool: str, num_classes: int) -> None:
        if global_pool not in self.global_pool_types:
            kinds = " or ".join(f"{_POOL_NAMES[t]} ({t!r})" for t in self.global_pool_types if t)
            raise ValueError(f"{self._name()} pools by {kinds} only, or not at all (''), "
                             f"got global_pool={global_pool!r}")
        if not global_pool and num_classes > 0:
            raise ValueError(f"{self._name()}: pooling can be switched off (global_pool='') only without a "
                             f"classifier (num_classes=0), got num_classes={num_classes}")
        self.global_pool = global_pool

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A fresh linear classifier `head` on the pooled `num_features` (none for num_classes=0), on the
        device and in the dtype of the model; `global_pool` None keeps the pooling (a new classifier after
        '' restores the model's default), '' removes it (only with num_classes=0: forward then returns the
        unpooled features)."""
        if global_pool is None:  # keep the pooling; a classifier on unpooled features gets the default back
            global_pool = self.global_pool if self.global_pool or num_classes == 0 else type(self).global_pool
        self._set_global_pool(global_pool, num_classes)
        self.num_classes = num_classes
        ref = next(self.parameters())
        self.head = (nn.Linear(self.num_features, num_classes, device=ref.device, dtype=ref.dtype)
                     if num_classes > 0 else nn.Identity())
        self.head.train(self.training)

    def adapt_input_channels(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`state_dict` with published RGB first layers fitted to this model's `in_chans` (the module
        function `adapt_input_channels`; `loading.fit_state_dict` calls that, as it calls
        `convert_official`, without importing the models)."""
        return adapt_input_channels(state_dict, self)

    def resample_tables(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`state_dict` (the model's key layout) with tables sized by the training resolution resampled to
        this model's (CabViT's; the other families' position biases are MLPs and fit any size). Called by
        `loading.fit_state_dict` before shapes are compared."""
        return state_dict

    def convert_official(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    def no_weight_decay_keywords(self) -> set[str]:
        """Name fragments of parameters trained without weight decay (position-bias tables etc.)."""
        return set()

    def no_weight_decay(self) -> set[str]:
        """The exact names of every parameter timm's optimizer factory must not decay: position-bias
        tables and embeddings (`no_weight_decay_keywords`), and every 1-D parameter (biases, norms, layer
        scales), the same set as hybridvit's own optimizer groups (`train.optim.param_groups`)."""
        keywords = self.no_weight_decay_keywords()
        return {n for n, p in self.named_parameters()
                if p.ndim <= 1 or n.endswith(".bias") or any(k in n for k in keywords)}

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """timm's parameter grouping (layer-wise lr decay, `timm.optim.create_optimizer_v2(layer_decay=)`):
        the stem (and embeddings) first, then one group per stage (`coarse`) or per block, a stage's
        downsampler and carrier-token initialiser with its first block; the final norm last."""
        stem = r"^(?:stem|patch_embed|cls_token|pos_embed)"
        if coarse:
            return dict(stem=stem, blocks=[(r"^stages\.(\d+)", None), (r"^norm", (99999,))])
        return dict(stem=stem, blocks=[(r"^stages\.(\d+)\.(?:downsample|token_init)\.", (0,)),
                                       (r"^stages\.(\d+)\.blocks\.(?:blocks\.)?(\d+)\.", None),
                                       (r"^norm", (99999,))])


def adapt_input_channels(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """`state_dict` (in the model's key layout) with its image-facing convolutions (`pretrained_cfg`'s
    `first_conv`, one name or several) fitted to `model.in_chans`, as timm adapts published RGB weights:
    for 1 channel the RGB filters are summed (a gray image gives the RGB model's response to that gray
    image); for n channels they are repeated over the channels (R, G, B, R, ...) and scaled by 3 / n,
    which keeps the activations' scale (6 channels holding the RGB image twice give its exact response).
    Weights already of the model's width are left alone."""
    in_chans = int(getattr(model, "in_chans", 3))
    first = (getattr(model, "pretrained_cfg", None) or {}).get("first_conv") or ()
    out = dict(state_dict)
    for name in (first,) if isinstance(first, str) else first:
        w = out.get(f"{name}.weight")
        if w is None or w.ndim != 4 or w.shape[1] == in_chans or w.shape[1] != 3:
            continue
        dtype = w.dtype
        w = w.float()
        if in_chans == 1:
            w = w.sum(dim=1, keepdim=True)
        else:
            w = w.repeat(1, -(-in_chans // 3), 1, 1)[:, :in_chans] * (3 / in_chans)
        out[f"{name}.weight"] = w.to(dtype)
    return out

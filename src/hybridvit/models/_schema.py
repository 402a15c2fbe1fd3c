"""Construction keys each family accepts from a FILE (a Hub folder's config.json `model_args`, a run
checkpoint's `model_kwargs`), with their types and ranges.

Configuration in a file is data, not arguments: a key outside its family's table, a loader argument
(`pretrained`, a path, a hub id), a value of the wrong type or out of range is refused with one line naming
the key, before anything is built or allocated. Values a user passes in code are not limited by this.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..data.transforms import CROP_MODES, INTERPOLATIONS
from ..errors import ConfigError
from .crossformer import GROUP_TYPES

MAX_CLASSES = 100_000   # ImageNet-21K has 21,841; a head of 100,000 x 4096 floats is 1.6 GB
MAX_IMG_SIZE = 4096
MAX_CHANNELS = 64


@dataclass(frozen=True)
class Key:
    """One construction key: `kind` is int, float, bool, str, or a sequence of those ('ints', 'floats',
    'bools'); 'int|ints' takes either; `optional` admits None; `length` fixes a sequence's length."""

    kind: str
    lo: float | None = None
    hi: float | None = None
    optional: bool = False
    choices: tuple[str, ...] = ()
    length: tuple[int, int] = (1, 8)


def _scalar_ok(kind: str, v: Any, key: Key) -> bool:
    if kind == "bool":
        return isinstance(v, bool)
    if kind == "str":
        return isinstance(v, str) and (not key.choices or v in key.choices)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    if kind == "int" and not isinstance(v, int):
        return False
    return (key.lo is None or v >= key.lo) and (key.hi is None or v <= key.hi)


def _value_ok(key: Key, v: Any) -> bool:
    if v is None:
        return key.optional
    for kind in key.kind.split("|"):
        if kind.endswith("s") and kind != "bools" or kind == "bools":
            base = kind[:-1]
            if isinstance(v, (list, tuple)) and key.length[0] <= len(v) <= key.length[1] and all(
                    _scalar_ok(base, x, key) for x in v):
                return True
        elif _scalar_ok(kind, v, key):
            return True
    return False


def _describe(key: Key) -> str:
    what = " or ".join({"int": "an integer", "float": "a number", "bool": "true/false", "str": "a string",
                        "ints": "a list of integers", "floats": "a list of numbers",
                        "bools": "a list of true/false"}[k] for k in key.kind.split("|"))
    if key.choices:
        what += f" (one of {', '.join(key.choices)})"
    if key.lo is not None or key.hi is not None:
        what += f" in [{key.lo}, {key.hi}]"
    return what + (" or null" if key.optional else "")


_RATE = Key("float", 0.0, 1.0)
_DIM = Key("int", 1, 4096)
_SIDE = Key("int|ints", 1, MAX_IMG_SIZE, length=(2, 2))
_STAGES = dict(length=(1, 8))

COMMON: dict[str, Key] = {"in_chans": Key("int", 1, MAX_CHANNELS), "num_classes": Key("int", 0, MAX_CLASSES)}

SCHEMAS: dict[str, dict[str, Key]] = {
    "fastervit": {
        "dim": _DIM, "in_dim": _DIM, "depths": Key("ints", 0, 64, length=(4, 4)),
        "num_heads": Key("ints", 1, 128, length=(4, 4)), "window_size": Key("int|ints", 1, 256, length=(4, 4)),
        "ct_size": Key("int", 1, 64), "mlp_ratio": Key("float", 0.0, 16.0), "img_size": Key("int", 1, MAX_IMG_SIZE),
        "drop_path_rate": _RATE, "drop_rate": _RATE, "attn_drop_rate": _RATE, "qkv_bias": Key("bool"),
        "layer_scale": Key("float", 0.0, 100.0, optional=True),
        "layer_scale_conv": Key("float", 0.0, 100.0, optional=True), "layer_norm_last": Key("bool"),
        "hat": Key("bools", length=(4, 4)), "do_propagation": Key("bool"),
    },
    "crossformer": {
        "embed_dim": _DIM, "depths": Key("ints", 0, 64, **_STAGES), "num_heads": Key("ints", 1, 128, **_STAGES),
        "group_size": Key("ints", 1, 256, **_STAGES), "interval": Key("ints", 1, 256, **_STAGES),
        "group_type": Key("str", choices=GROUP_TYPES),
        "amplitude_cooling": Key("bool"), "stem_kernels": Key("ints", 1, 64, **_STAGES),
        "merge_kernels": Key("ints", 1, 64, **_STAGES), "mlp_ratio": Key("float", 0.0, 16.0),
        "qkv_bias": Key("bool"), "drop_rate": _RATE, "attn_drop_rate": _RATE, "drop_path_rate": _RATE,
        "img_size": _SIDE,
    },
    "cabvit_h": {
        "img_size": Key("int", 1, MAX_IMG_SIZE), "embed_dims": Key("ints", 1, 4096, length=(4, 4)),
        "depths": Key("ints", 0, 64, length=(4, 4)), "num_heads": Key("ints", 0, 128, length=(4, 4)),
        "mlp_ratio": Key("float", 0.0, 16.0), "layer_scale_init_value": Key("float", 0.0, 100.0),
        "drop_path_rate": _RATE,
    },
    "cabvit_p": {
        "img_size": Key("int", 1, MAX_IMG_SIZE), "patch_size": Key("int", 1, 64), "embed_dim": _DIM,
        "depths": Key("ints", 0, 64, **_STAGES), "num_heads": Key("int", 1, 128), "mlp_ratio": Key("float", 0.0, 16.0),
        "layer_scale_init_value": Key("float", 0.0, 100.0), "drop_path_rate": _RATE,
    },
}

# what a file may never set: these load weights, reach files or the network, or change what is built
LOADER_ARGUMENTS = frozenset({
    "pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "pretrained_strict", "checkpoint_path",
    "cache_dir", "hf_hub_id", "url", "file", "path", "source", "model_name", "name", "features_only",
    "out_indices", "feature_cls", "scriptable", "exportable", "no_jit", "device", "dtype",
})


def schema_for(family: str, builder: Any) -> dict[str, Key]:
    """The construction keys of a registry entry (CabViT's two architectures have their own tables)."""
    if family == "cabvit":
        family = "cabvit_p" if "CabViTP" in getattr(builder, "__name__", "") else "cabvit_h"
    return {**COMMON, **SCHEMAS[family]}


def check_file_config(config: dict[str, Any], schema: dict[str, Key], source: str,
                      field: str = "model_args") -> dict[str, Any]:
    """`config` (from a file) when every key is in `schema` with a value of its type and range; lists
    keep their JSON types. A ConfigError naming the key and the file otherwise."""
    if not isinstance(config, dict):
        raise ConfigError(f"{source}: {field} must be an object of construction keys, got "
                          f"{type(config).__name__}")
    out = {}
    for k, v in config.items():
        if not isinstance(k, str):
            raise ConfigError(f"{source}: {field} has a key of type {type(k).__name__}; keys are option names")
        if k in LOADER_ARGUMENTS:
            raise ConfigError(f"{source}: {field} sets {k!r}, a loading argument, which hybridvit never takes "
                              "from a file (a file cannot choose what else gets loaded); remove the key")
        if k not in schema:
            raise ConfigError(f"{source}: {field} sets {k[:80]!r}, which is not a construction key of this "
                              f"model (accepted: {', '.join(sorted(schema))})")
        if not _value_ok(schema[k], v):
            raise ConfigError(f"{source}: {field}[{k!r}] must be {_describe(schema[k])}, got {str(v)[:80]!r}")
        out[k] = v
    return out


def checked_pretrained_cfg(cfg: Any, where: str) -> dict[str, Any]:
    """A `pretrained_cfg` from a file, when its preprocessing fields have sane types and values."""
    if not isinstance(cfg, dict):
        raise ConfigError(f"{where}: pretrained_cfg must be an object")

    def sides(v: Any, n: int) -> bool:
        return isinstance(v, (list, tuple)) and len(v) == n and all(
            isinstance(x, int) and not isinstance(x, bool) and 0 < x <= MAX_IMG_SIZE for x in v)

    def floats(v: Any) -> bool:
        return isinstance(v, (list, tuple)) and 1 <= len(v) <= 64 and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)

    checks = {"input_size": lambda v: sides(v, 3), "min_input_size": lambda v: sides(v, 3),
              "mean": floats, "std": lambda v: floats(v) and all(x > 0 for x in v),
              "crop_pct": lambda v: isinstance(v, (int, float)) and 0 < v <= 4,
              "interpolation": lambda v: v in INTERPOLATIONS, "crop_mode": lambda v: v in CROP_MODES}
    bad = [k for k, ok in checks.items() if k in cfg and not ok(cfg[k])]
    if "input_size" not in cfg:
        bad.append("input_size")
    if bad:
        raise ConfigError(f"{where}: pretrained_cfg field(s) {', '.join(bad)} missing or invalid (input_size is "
                          "[channels, height, width]; mean/std lists of numbers; crop_pct a fraction)")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}

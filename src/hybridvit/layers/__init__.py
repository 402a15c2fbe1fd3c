"""Building blocks shared by the model families."""
from .attention import attend
from .cache import CachedTable
from .drop import DropPath, drop_path_rates
from .fast import fast_paths, fast_paths_enabled, set_fast_paths
from .fuse import LayerScale, conv_bn, fold_bn, fold_layer_scale, make_layer_scale, scale_channels
from .fused_linear import add_residual, gelu_, linear
from .mlp import Mlp
from .norm import LayerNorm2d
from .window import MASK_VALUE, pad_hw, padding_bias_map, window_partition, window_reverse

__all__ = ["attend", "CachedTable", "DropPath", "drop_path_rates", "fast_paths", "fast_paths_enabled",
           "set_fast_paths", "LayerScale", "conv_bn", "fold_bn", "fold_layer_scale", "make_layer_scale",
           "scale_channels", "add_residual", "gelu_", "linear", "Mlp", "LayerNorm2d", "MASK_VALUE", "pad_hw",
           "padding_bias_map", "window_partition", "window_reverse"]

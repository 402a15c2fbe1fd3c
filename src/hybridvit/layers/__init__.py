"""Building blocks shared by the model families; their speed machinery is in `layers.accel`."""
from .accel import CachedTable, add_residual, fast_paths, fast_paths_enabled, gelu_, linear, set_fast_paths
from .attention import attend
from .drop import DropPath, drop_path_rates
from .fuse import LayerScale, conv_bn, fold_bn, fold_layer_scale, make_layer_scale, scale_channels
from .mlp import Mlp
from .norm import LayerNorm2d
from .window import MASK_VALUE, pad_hw, padding_bias_map, window_partition, window_reverse

__all__ = ["attend", "CachedTable", "DropPath", "drop_path_rates", "fast_paths", "fast_paths_enabled",
           "set_fast_paths", "LayerScale", "conv_bn", "fold_bn", "fold_layer_scale", "make_layer_scale",
           "scale_channels", "add_residual", "gelu_", "linear", "Mlp", "LayerNorm2d", "MASK_VALUE", "pad_hw",
           "padding_bias_map", "window_partition", "window_reverse"]

"""Building blocks shared by the model families."""
from .attention import attend
from .context import is_tracing, plain_paths
from .drop import DropPath, drop_path_rates
from .fuse import LayerScale, conv_bn, fold_bn, fold_layer_scale, make_layer_scale, scale_channels
from .linear import linear
from .mlp import Mlp
from .norm import LayerNorm2d
from .table import PositionTable, derived
from .window import MASK_VALUE, pad_hw, padding_bias_map, window_partition, window_reverse

__all__ = ["attend", "is_tracing", "plain_paths", "DropPath", "drop_path_rates", "LayerScale", "conv_bn",
           "fold_bn", "fold_layer_scale", "make_layer_scale", "scale_channels", "linear", "Mlp", "LayerNorm2d",
           "PositionTable", "derived", "MASK_VALUE", "pad_hw", "padding_bias_map", "window_partition",
           "window_reverse"]

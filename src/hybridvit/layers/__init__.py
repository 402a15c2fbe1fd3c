"""Building blocks shared by the model families."""
from .attention import attend
from .drop import DropPath
from .mlp import Mlp
from .norm import LayerNorm2d
from .window import pad_hw, window_partition, window_reverse

__all__ = ["attend", "DropPath", "Mlp", "LayerNorm2d", "pad_hw", "window_partition", "window_reverse"]

"""hybridvit: FasterViT, CrossFormer/CrossFormer++ and CabViT with official weights, training,
benchmarks and export."""
from .checkpoint import load_checkpoint, load_model
from .registry import create_model, list_models

__version__ = "0.1.0"
__all__ = ["create_model", "list_models", "load_checkpoint", "load_model", "__version__"]

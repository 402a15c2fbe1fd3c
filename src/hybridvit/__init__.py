"""hybridvit: FasterViT, CrossFormer/CrossFormer++ and CabViT with official weights, training,
benchmarks and export."""
from .checkpoint import load_checkpoint, load_model
from .hub import save_pretrained
from .integrations import install_timm_hook
from .registry import create_model, list_models

__version__ = "0.1.0"
__all__ = ["create_model", "list_models", "load_checkpoint", "load_model", "save_pretrained", "__version__"]

install_timm_hook()  # hybridvit's models appear in timm's registry once timm is (or gets) imported
